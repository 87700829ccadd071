//! The API client `specc vm` uses: HTTP/1.1 over the daemon's unix socket.
//!
//! Written here on `httparse` rather than taken from an HTTP client crate: ureq has no
//! unix-socket transport, and hyper would bring an async runtime into a synchronous CLI for
//! one connection per command. One request per connection (`Connection: close`); bodies are
//! read as they arrive, so an exec's output streams.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ApiError, ExecEvent};

/// Errors of talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is not there or refuses.
    #[error("cannot reach specd at {} (is it running? start it with `specd`)", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The connection failed mid-request.
    #[error("talking to specd failed")]
    Io(#[from] io::Error),
    /// The answer is not HTTP or not the JSON expected.
    #[error("specd answered something unexpected: {0}")]
    Protocol(String),
    /// The daemon refused the request.
    #[error("specd: {message} (HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The daemon's error text.
        message: String,
    },
}

/// A client of one daemon.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A response whose body has not been read yet.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Length(io::Take<BufReader<UnixStream>>),
    Chunked(Chunked),
    Rest(BufReader<UnixStream>),
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Length(r) => r.read(buf),
            Body::Chunked(r) => r.read(buf),
            Body::Rest(r) => r.read(buf),
        }
    }
}

/// A `Transfer-Encoding: chunked` body.
#[derive(Debug)]
struct Chunked {
    inner: BufReader<UnixStream>,
    left: u64,
    done: bool,
}

impl Read for Chunked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
        }
        Ok(n)
    }
}

impl Response {
    /// The whole body.
    pub fn bytes(mut self) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::new();
        self.body.read_to_end(&mut out)?;
        Ok(out)
    }

    /// The body as JSON of type `T`.
    pub fn json<T: DeserializeOwned>(self) -> Result<T, ClientError> {
        let bytes = self.bytes()?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", String::from_utf8_lossy(&bytes))))
    }

    /// The body as a reader (streaming).
    pub fn reader(self) -> impl BufRead {
        BufReader::new(self.body)
    }
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_owned(),
        }
    }

    /// Sends a request; an error status becomes [`ClientError::Api`].
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<Response, ClientError> {
        let mut stream = self.connect()?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: specd\r\nConnection: close\r\n");
        let data = body.map(|(ct, b)| {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
            b
        });
        head.push_str(&format!(
            "Content-Length: {}\r\n\r\n",
            data.map_or(0, <[u8]>::len)
        ));
        stream.write_all(head.as_bytes())?;
        if let Some(b) = data {
            stream.write_all(b)?;
        }
        answer(stream)
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        })
    }

    /// Feeds the stdin of a running exec started with `stdin_stream` (`exec` is the `stdin`
    /// name of its `started` event): every read of `body` is sent on at once, as one chunk of
    /// a chunked request, and the end of `body` closes the process's stdin.
    pub fn exec_stdin(&self, id: &str, exec: &str, body: &mut dyn Read) -> Result<(), ClientError> {
        let mut stream = self.connect()?;
        write!(
            stream,
            "POST /v1/vms/{id}/execs/{exec}/stdin HTTP/1.1\r\nHost: specd\r\n\
             Connection: close\r\nContent-Type: application/octet-stream\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        )?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // No final chunk: the daemon sees a broken upload, not the end of the input.
                Err(e) => return Err(ClientError::Io(e)),
            };
            write!(stream, "{n:x}\r\n")?;
            stream.write_all(&buf[..n])?;
            stream.write_all(b"\r\n")?;
        }
        stream.write_all(b"0\r\n\r\n")?;
        answer(stream).map(|_| ())
    }

    /// A JSON request with a JSON answer.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let json = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.request(
            method,
            path,
            json.as_deref().map(|b| ("application/json", b)),
        )?
        .json()
    }

    /// Runs an exec, calling `on_event` for every line as it arrives; returns the last event
    /// (`Exit` or `Error`).
    pub fn exec(
        &self,
        id: &str,
        req: &crate::api::Exec,
        mut on_event: impl FnMut(&ExecEvent),
    ) -> Result<ExecEvent, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = self.request(
            "POST",
            &format!("/v1/vms/{id}/exec"),
            Some(("application/json", &body)),
        )?;
        let mut last = None;
        for line in resp.reader().lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let ev: ExecEvent = serde_json::from_str(&line)
                .map_err(|e| ClientError::Protocol(format!("{e}: {line}")))?;
            on_event(&ev);
            last = Some(ev);
        }
        match last {
            Some(ev @ (ExecEvent::Exit { .. } | ExecEvent::Error { .. })) => Ok(ev),
            _ => Err(ClientError::Protocol(
                "the exec stream ended without an exit status".into(),
            )),
        }
    }
}

/// The daemon's answer on `stream`; an error status is [`ClientError::Api`].
fn answer(stream: UnixStream) -> Result<Response, ClientError> {
    let resp = read_head(BufReader::new(stream))?;
    if resp.status >= 400 {
        let status = resp.status;
        let bytes = resp.bytes()?;
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        return Err(ClientError::Api { status, message });
    }
    Ok(resp)
}

fn read_head(mut r: BufReader<UnixStream>) -> Result<Response, ClientError> {
    let mut buf = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "connection closed before a response".into(),
            ));
        }
        if buf.ends_with(b"\r\n\r\n") {
            break;
        }
        if buf.len() > 64 << 10 {
            return Err(ClientError::Protocol("response head over 64 KiB".into()));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    parsed
        .parse(&buf)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let status = parsed.code.unwrap_or(0);
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        Body::Chunked(Chunked {
            inner: r,
            left: 0,
            done: false,
        })
    } else if let Some(len) = header("content-length") {
        let len = len
            .parse()
            .map_err(|_| ClientError::Protocol(format!("bad Content-Length {len}")))?;
        Body::Length(r.take(len))
    } else {
        Body::Rest(r)
    };
    Ok(Response { status, body })
}
