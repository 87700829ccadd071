//! The OCI distribution API client: push an OCI layout to a registry, pull one back, and pull
//! ordinary container images (image index → platform manifest → config + layers).
//!
//! Every blob is verified (size and digest) while it streams, into a temp file that is renamed
//! into the layout only when it checks out. Anonymous bearer-token auth (`401` with
//! `WWW-Authenticate: Bearer realm=...`) is followed once per request; credentials are not
//! supported yet.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use specc_plan::ir::Digest;
use ureq::http;

use crate::hashio::HashWriter;
use crate::oci::{self, OciError};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Manifests bigger than this are refused (the OCI spec suggests registries accept 4 MiB).
const MANIFEST_LIMIT: u64 = 4 << 20;

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("bad reference {reference:?}: {reason}")]
    BadReference {
        /// The reference.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// The registry cannot be reached at all.
    #[error("registry {registry} unreachable")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// A transfer failed midway.
    #[error("{op}: transfer failed")]
    Transfer {
        /// What was being done.
        op: String,
        /// The cause.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The registry answered with an unexpected status.
    #[error("{op}: registry answered HTTP {status}: {body}")]
    Status {
        /// What was being done.
        op: String,
        /// The HTTP status.
        status: u16,
        /// The start of the response body (the registry's error JSON, usually).
        body: String,
    },
    /// The registry does not have it.
    #[error("{what} not found in the registry")]
    NotFound {
        /// What was asked for.
        what: String,
    },
    /// The registry wants credentials, or the token flow failed.
    #[error("registry {registry} refused access: {reason}")]
    Unauthorized {
        /// `host[:port]`.
        registry: String,
        /// What happened.
        reason: String,
    },
    /// What came back does not hash to the digest asked for.
    #[error("{what}: digest mismatch, the bytes hash to {actual} (expected {expected})")]
    DigestMismatch {
        /// What was fetched.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of the bytes.
        actual: String,
    },
    /// What came back has the wrong length.
    #[error("{what}: {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// What was fetched.
        what: String,
        /// The size of the descriptor.
        expected: u64,
        /// The size received.
        actual: u64,
    },
    /// The registry broke the protocol (missing header, bad JSON, unknown media type).
    #[error("{0}")]
    Protocol(String),
    /// An image index has no manifest for the platform.
    #[error("{reference} has no manifest for platform {platform} (it has: {available})")]
    NoPlatform {
        /// The reference.
        reference: String,
        /// The platform asked for.
        platform: String,
        /// The platforms it has.
        available: String,
    },
    /// The layout has no (or no single) manifest to push.
    #[error("{}: {reason}", dir.display())]
    NoManifest {
        /// The layout.
        dir: PathBuf,
        /// Why none was chosen.
        reason: String,
    },
    /// A local file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the OCI layout failed.
    #[error(transparent)]
    Layout(#[from] OciError),
}

type Result<T> = std::result::Result<T, RegistryError>;

/// `host[:port]/repository[:tag|@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    /// The repository path (`library/debian`).
    pub repository: String,
    /// The tag, if given.
    pub tag: Option<String>,
    /// The manifest digest (`sha256:...`), if given.
    pub digest: Option<String>,
}

impl Reference {
    /// What to put after `/manifests/`: the digest, else the tag, else `latest`.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The tag, `latest` if none was given.
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }

    /// The registry's host without the port.
    fn host(&self) -> &str {
        if let Some(rest) = self.registry.strip_prefix('[') {
            return rest.split(']').next().unwrap_or(rest);
        }
        self.registry.split(':').next().unwrap_or(&self.registry)
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Reference> {
        let bad = |reason: &str| RegistryError::BadReference {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (registry, rest) = s
            .split_once('/')
            .ok_or_else(|| bad("want host[:port]/repository[:tag|@digest]"))?;
        let host_ok = !registry.is_empty()
            && (registry.starts_with('[')
                || registry
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':')));
        if !host_ok {
            return Err(bad("the registry host is not host[:port]"));
        }
        let (name_tag, digest) = match rest.split_once('@') {
            Some((n, d)) => {
                crate::digest_serde::parse(d).map_err(|e| bad(&e))?;
                (n, Some(d.to_owned()))
            }
            None => (rest, None),
        };
        let (repository, tag) = match name_tag.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_owned())),
            _ => (name_tag, None),
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'.' | b'_' | b'-')
                    })
                    && c.as_bytes()[0].is_ascii_alphanumeric()
            });
        if !repo_ok {
            return Err(bad(
                "the repository must be lowercase path components of [a-z0-9._-]",
            ));
        }
        if let Some(t) = &tag {
            let ok = t.len() <= 128
                && t.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !ok {
                return Err(bad(
                    "a tag is up to 128 of [A-Za-z0-9._-], not starting with . or -",
                ));
            }
        }
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }
}

/// How to talk to the registry.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Use plain HTTP even for a non-loopback registry. Loopback registries (`localhost`,
    /// `127.*`, `[::1]`) and hosts listed in `$SPECC_INSECURE_REGISTRIES` (comma-separated
    /// `host[:port]`) always use HTTP.
    pub insecure: bool,
    /// Blobs larger than this are uploaded in chunks of this size (`PATCH` with
    /// `Content-Range`), so a multi-GiB memory blob is not one request; 0 means the default,
    /// [`DEFAULT_CHUNK`].
    pub chunk_size: u64,
}

/// The default upload chunk size (64 MiB).
pub const DEFAULT_CHUNK: u64 = 64 << 20;

/// What a push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// The manifest digest.
    pub manifest_digest: String,
    /// Blobs uploaded.
    pub uploaded: Vec<String>,
    /// Blobs the registry already had.
    pub skipped: Vec<String>,
    /// Bytes uploaded (blobs only).
    pub bytes_uploaded: u64,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The manifest, as listed in the layout's `index.json`.
    pub manifest: Descriptor,
    /// Its config blob.
    pub config: Descriptor,
    /// Its layer blobs, in order.
    pub layers: Vec<Descriptor>,
    /// Blobs downloaded (the others were already in the layout).
    pub fetched: usize,
    /// Bytes downloaded (blobs only).
    pub bytes_fetched: u64,
}

/// A connection to one repository of one registry.
#[derive(Debug)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    reference: Reference,
    token: Option<String>,
    chunk: u64,
}

impl Client {
    /// A client for `reference`'s repository.
    pub fn new(reference: &Reference, opts: &Options) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .max_redirects(8)
            .user_agent(concat!("specc/", env!("CARGO_PKG_VERSION")))
            .build();
        let scheme = if use_http(reference, opts) {
            "http"
        } else {
            "https"
        };
        Client {
            agent: ureq::Agent::new_with_config(config),
            base: format!("{scheme}://{}", reference.registry),
            reference: reference.clone(),
            token: None,
            chunk: if opts.chunk_size == 0 {
                DEFAULT_CHUNK
            } else {
                opts.chunk_size
            },
        }
    }

    /// `GET /v2/`: whether the registry answers at all (401 counts as answering).
    pub fn ping(&mut self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let resp = self.send("ping", "GET", &url, &[], &mut || Ok(Body::Empty))?;
        check(resp, "ping", &[200]).map(|_| ())
    }

    /// Whether the repository has blob `digest` (`HEAD /v2/<name>/blobs/<digest>`).
    pub fn has_blob(&mut self, digest: &str) -> Result<bool> {
        let url = self.url(&format!("blobs/{digest}"));
        let op = format!("HEAD blob {digest}");
        let resp = self.send(&op, "HEAD", &url, &[], &mut || Ok(Body::Empty))?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => check(resp, &op, &[200]).map(|_| false),
        }
    }

    /// Uploads the file at `path` as blob `digest` of `size` bytes: `POST` to open an upload,
    /// then one `PUT ?digest=` with the bytes, or, above the chunk size, `PATCH`es of one chunk
    /// each followed by an empty `PUT ?digest=`.
    pub fn upload_blob(&mut self, digest: &str, path: &Path, size: u64) -> Result<()> {
        let op = format!("upload blob {digest}");
        let url = self.url("blobs/uploads/");
        let resp = self.send(&op, "POST", &url, &[], &mut || Ok(Body::Empty))?;
        let resp = check(resp, &op, &[202])?;
        let mut location = self.location(&resp, &op)?;
        let open = || {
            File::open(path).map_err(|source| RegistryError::Io {
                op: "open",
                path: path.to_owned(),
                source,
            })
        };
        let mut final_body = size;
        if size > self.chunk {
            let mut offset = 0;
            while offset < size {
                let len = self.chunk.min(size - offset);
                let headers = [
                    ("content-type", "application/octet-stream".to_owned()),
                    ("content-length", len.to_string()),
                    ("content-range", format!("{offset}-{}", offset + len - 1)),
                ];
                let resp = self.send(&op, "PATCH", &location, &headers, &mut || {
                    let f = open()?;
                    Ok(Body::Range(f, offset, len))
                })?;
                let resp = check(resp, &op, &[202])?;
                location = self.location(&resp, &op)?;
                offset += len;
            }
            final_body = 0;
        }
        let mut put = location;
        put.push(if put.contains('?') { '&' } else { '?' });
        put.push_str("digest=");
        put.push_str(&digest.replace(':', "%3A"));
        let headers = [
            ("content-type", "application/octet-stream".to_owned()),
            ("content-length", final_body.to_string()),
        ];
        let resp = self.send(&op, "PUT", &put, &headers, &mut || {
            if final_body == 0 {
                Ok(Body::Empty)
            } else {
                open().map(Body::File)
            }
        })?;
        check(resp, &op, &[201]).map(|_| ())
    }

    fn location(&self, resp: &http::Response<ureq::Body>, op: &str) -> Result<String> {
        resp.headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(|l| self.absolute(l))
            .ok_or_else(|| RegistryError::Protocol(format!("{op}: no Location header")))
    }

    /// `PUT /v2/<name>/manifests/<reference>`; returns the digest the registry reports.
    pub fn put_manifest(
        &mut self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String> {
        let op = format!("PUT manifest {reference}");
        let url = self.url(&format!("manifests/{reference}"));
        let headers = [("content-type", media_type.to_owned())];
        let resp = self.send(&op, "PUT", &url, &headers, &mut || {
            Ok(Body::Bytes(bytes.to_vec()))
        })?;
        let resp = check(resp, &op, &[201, 200])?;
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_default())
    }

    /// Fetches a manifest or index by tag or digest; returns its media type and bytes (verified
    /// against the digest when fetched by digest).
    pub fn get_manifest(&mut self, reference: &str) -> Result<(String, Vec<u8>)> {
        let op = format!("GET manifest {}", self.reference.repository);
        let url = self.url(&format!("manifests/{reference}"));
        let accept = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", ");
        let headers = [("accept", accept)];
        let resp = self.send(&op, "GET", &url, &headers, &mut || Ok(Body::Empty))?;
        if resp.status().as_u16() == 404 {
            return Err(RegistryError::NotFound {
                what: format!(
                    "manifest {}/{}:{reference}",
                    self.reference.registry, self.reference.repository
                ),
            });
        }
        let mut resp = check(resp, &op, &[200])?;
        let header_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_owned());
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MANIFEST_LIMIT)
            .read_to_vec()
            .map_err(|e| transfer(&op, e))?;
        if reference.starts_with("sha256:") {
            let actual = sha256(&bytes).to_prefixed();
            if actual != reference {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {reference}"),
                    expected: reference.to_owned(),
                    actual,
                });
            }
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Protocol(format!("{op}: the manifest is not JSON: {e}")))?;
        let media_type = probe.media_type.or(header_type).unwrap_or_else(|| {
            if probe.manifests.is_some() {
                OCI_INDEX
            } else {
                OCI_MANIFEST
            }
            .to_owned()
        });
        Ok((media_type, bytes))
    }

    /// Downloads blob `desc` into layout `dir` (verifying size and digest as it streams) unless
    /// the layout already has it intact. Returns the bytes downloaded.
    pub fn fetch_blob(&mut self, desc: &Descriptor, dir: &Path) -> Result<u64> {
        let digest = oci::from_oci_digest(desc.digest()).ok_or_else(|| {
            RegistryError::Protocol(format!("blob {} is not sha256", desc.digest()))
        })?;
        let what = format!("blob {}", desc.digest());
        if oci::verify_blob(dir, desc, &what).is_ok() {
            return Ok(0);
        }
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|source| RegistryError::Io {
            op: "create",
            path: blobs.clone(),
            source,
        })?;
        let url = self.url(&format!("blobs/{}", desc.digest()));
        let resp = self.send(&what, "GET", &url, &[], &mut || Ok(Body::Empty))?;
        if resp.status().as_u16() == 404 {
            return Err(RegistryError::NotFound { what });
        }
        let resp = check(resp, &what, &[200])?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&blobs)
            .map_err(|source| RegistryError::Io {
                op: "create a temp file in",
                path: blobs.clone(),
                source,
            })?;
        let mut w = HashWriter::new(io::BufWriter::with_capacity(1 << 20, tmp.as_file()));
        let mut body = resp.into_body();
        let mut reader = body
            .with_config()
            .limit(desc.size().saturating_add(1))
            .reader();
        io::copy(&mut reader, &mut w).map_err(|e| match e.downcast::<ureq::Error>() {
            Ok(u) => transfer(&what, u),
            Err(e) => RegistryError::Io {
                op: "write",
                path: tmp.path().to_owned(),
                source: e,
            },
        })?;
        let (buf, actual, len) = w.finish();
        buf.into_inner().map_err(|e| RegistryError::Io {
            op: "write",
            path: tmp.path().to_owned(),
            source: e.into_error(),
        })?;
        if len != desc.size() {
            return Err(RegistryError::SizeMismatch {
                what,
                expected: desc.size(),
                actual: len,
            });
        }
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                what,
                expected: digest.to_prefixed(),
                actual: actual.to_prefixed(),
            });
        }
        oci::persist_blob(tmp, dir, &digest)?;
        Ok(len)
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.reference.repository)
    }

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else {
            format!("{}{location}", self.base)
        }
    }

    /// Sends a request; on `401` with a Bearer challenge, fetches an anonymous token and sends
    /// it again (`body` is called once per attempt).
    fn send(
        &mut self,
        op: &str,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        body: &mut dyn FnMut() -> Result<Body>,
    ) -> Result<http::Response<ureq::Body>> {
        let mut retried = false;
        loop {
            let mut req = http::Request::builder().method(method).uri(url);
            for (k, v) in headers {
                req = req.header(*k, v.as_str());
            }
            if let Some(t) = &self.token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let send = match body()? {
                Body::Empty => req.body(ureq::SendBody::none()),
                Body::Bytes(b) => req.body(ureq::SendBody::from_owned_reader(io::Cursor::new(b))),
                Body::File(f) => req.body(ureq::SendBody::from_owned_reader(
                    BufReader::with_capacity(1 << 20, f),
                )),
                Body::Range(mut f, offset, len) => {
                    f.seek(io::SeekFrom::Start(offset))
                        .map_err(|source| RegistryError::Io {
                            op: "seek",
                            path: PathBuf::from(url),
                            source,
                        })?;
                    req.body(ureq::SendBody::from_owned_reader(
                        BufReader::with_capacity(1 << 20, f).take(len),
                    ))
                }
            }
            .map_err(|e| RegistryError::Protocol(format!("{op}: cannot build the request: {e}")))?;
            let resp = self.agent.run(send).map_err(|e| self.classify(op, e))?;
            if resp.status().as_u16() == 401 && !retried {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                self.token = Some(self.fetch_token(&challenge, method)?);
                retried = true;
                continue;
            }
            return Ok(resp);
        }
    }

    fn fetch_token(&self, challenge: &str, method: &str) -> Result<String> {
        let unauthorized = |reason: String| RegistryError::Unauthorized {
            registry: self.reference.registry.clone(),
            reason,
        };
        let params = parse_bearer(challenge).ok_or_else(|| {
            unauthorized(format!(
                "it wants credentials (WWW-Authenticate: {challenge:?}); only anonymous bearer tokens are supported"
            ))
        })?;
        let realm = params
            .get("realm")
            .ok_or_else(|| unauthorized("the Bearer challenge has no realm".into()))?;
        let default_scope = format!(
            "repository:{}:{}",
            self.reference.repository,
            if matches!(method, "GET" | "HEAD") {
                "pull"
            } else {
                "pull,push"
            }
        );
        let scope = params.get("scope").cloned().unwrap_or(default_scope);
        let mut url = format!(
            "{realm}{}scope={}",
            if realm.contains('?') { '&' } else { '?' },
            urlencode(&scope)
        );
        if let Some(service) = params.get("service") {
            url.push_str("&service=");
            url.push_str(&urlencode(service));
        }
        let mut resp = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| unauthorized(format!("token request to {realm} failed: {e}")))?;
        if resp.status().as_u16() != 200 {
            return Err(unauthorized(format!(
                "token request to {realm} answered HTTP {}",
                resp.status().as_u16()
            )));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| unauthorized(format!("token response: {e}")))?;
        let t: Token = serde_json::from_slice(&bytes)
            .map_err(|e| unauthorized(format!("token response is not JSON: {e}")))?;
        t.token
            .or(t.access_token)
            .ok_or_else(|| unauthorized("the token response has no token".into()))
    }

    fn classify(&self, op: &str, e: ureq::Error) -> RegistryError {
        match e {
            ureq::Error::Io(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Timeout(_)
            | ureq::Error::Tls(_)
            | ureq::Error::Rustls(_) => RegistryError::Unreachable {
                registry: self.reference.registry.clone(),
                source: Box::new(e),
            },
            e => transfer(op, e),
        }
    }
}

/// A request body that can be produced again for a retry.
#[derive(Debug)]
enum Body {
    Empty,
    Bytes(Vec<u8>),
    File(File),
    /// `len` bytes of the file from `offset`.
    Range(File, u64, u64),
}

fn transfer(op: &str, e: ureq::Error) -> RegistryError {
    RegistryError::Transfer {
        op: op.to_owned(),
        source: Box::new(e),
    }
}

/// Passes responses with one of the `ok` statuses; turns the others into errors with the start
/// of the registry's error body.
fn check(
    mut resp: http::Response<ureq::Body>,
    op: &str,
    ok: &[u16],
) -> Result<http::Response<ureq::Body>> {
    let status = resp.status().as_u16();
    if ok.contains(&status) {
        return Ok(resp);
    }
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_vec()
        .map(|b| {
            String::from_utf8_lossy(&b[..b.len().min(600)])
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    Err(RegistryError::Status {
        op: op.to_owned(),
        status,
        body,
    })
}

fn use_http(r: &Reference, opts: &Options) -> bool {
    let host = r.host();
    if opts.insecure || host == "localhost" || host == "::1" || host.starts_with("127.") {
        return true;
    }
    std::env::var("SPECC_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .any(|h| !h.is_empty() && (h == r.registry || h == host))
}

/// Parses `Bearer realm="...",service="...",scope="..."`.
fn parse_bearer(challenge: &str) -> Option<HashMap<String, String>> {
    let rest = challenge.trim();
    let rest = rest
        .strip_prefix("Bearer ")
        .or_else(|| rest.strip_prefix("bearer "))?;
    let mut out = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (q[..end].to_owned(), &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        out.insert(key, value);
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sha256(bytes: &[u8]) -> Digest {
    use sha2::Digest as _;
    Digest(sha2::Sha256::digest(bytes).into())
}

/// Pushes a manifest of the OCI layout `oci_dir` (the one named by the reference's tag, or the
/// only one) with its config and layers to `reference`. Blobs the registry already has are not
/// uploaded.
pub fn push(oci_dir: &Path, reference: &str, opts: &Options) -> Result<PushReport> {
    let r: Reference = reference.parse()?;
    let index = oci::read_index(oci_dir)?;
    let chosen: Vec<&Descriptor> = match (&r.digest, &r.tag) {
        (Some(d), _) => index
            .manifests()
            .iter()
            .filter(|m| m.digest().to_string() == *d)
            .collect(),
        (None, tag) => {
            let named: Vec<&Descriptor> = index
                .manifests()
                .iter()
                .filter(|m| tag.is_some() && oci::ref_name(m) == tag.as_deref())
                .collect();
            if named.is_empty() && index.manifests().len() == 1 {
                index.manifests().iter().collect()
            } else {
                named
            }
        }
    };
    let desc = match chosen.as_slice() {
        [one] => *one,
        [] => {
            return Err(RegistryError::NoManifest {
                dir: oci_dir.to_owned(),
                reason: format!("no manifest matches {}", r.manifest_ref()),
            });
        }
        _ => {
            return Err(RegistryError::NoManifest {
                dir: oci_dir.to_owned(),
                reason: format!("several manifests match {}", r.manifest_ref()),
            });
        }
    };
    let manifest_bytes = oci::read_small_blob(oci_dir, desc, "manifest")?;
    let manifest = ImageManifest::from_reader(&manifest_bytes[..]).map_err(|e| {
        RegistryError::Protocol(format!(
            "manifest {} is not an image manifest: {e}",
            desc.digest()
        ))
    })?;
    let mut client = Client::new(&r, opts);
    let mut report = PushReport {
        manifest_digest: desc.digest().to_string(),
        ..PushReport::default()
    };
    let blobs = std::iter::once(manifest.config()).chain(manifest.layers().iter());
    let mut seen = std::collections::BTreeSet::new();
    for blob in blobs {
        let digest = blob.digest().to_string();
        if !seen.insert(digest.clone()) {
            continue;
        }
        oci::verify_blob(oci_dir, blob, &format!("blob {digest}"))?;
        if client.has_blob(&digest)? {
            report.skipped.push(digest);
            continue;
        }
        let d = oci::from_oci_digest(blob.digest())
            .ok_or_else(|| RegistryError::Protocol(format!("blob {digest} is not sha256")))?;
        client.upload_blob(&digest, &oci::blob_path(oci_dir, &d), blob.size())?;
        report.bytes_uploaded += blob.size();
        report.uploaded.push(digest);
    }
    let media_type = desc.media_type().to_string();
    let target = r
        .digest
        .clone()
        .unwrap_or_else(|| r.tag_or_latest().to_owned());
    let got = client.put_manifest(&target, &media_type, &manifest_bytes)?;
    if !got.is_empty() && got != report.manifest_digest {
        return Err(RegistryError::DigestMismatch {
            what: format!("manifest pushed to {r}"),
            expected: report.manifest_digest,
            actual: got,
        });
    }
    Ok(report)
}

/// Pulls the manifest `reference` names (a single manifest, not an index) with its config and
/// layers into the OCI layout `oci_dir` (created if missing), listed in `index.json` under the
/// reference's tag.
pub fn pull(reference: &str, oci_dir: &Path, opts: &Options) -> Result<Pulled> {
    let r: Reference = reference.parse()?;
    let mut client = Client::new(&r, opts);
    let (media_type, bytes) = client.get_manifest(r.manifest_ref())?;
    if media_type == OCI_INDEX || media_type == DOCKER_LIST {
        return Err(RegistryError::Protocol(format!(
            "{r} is an image index; pull an image with a platform instead"
        )));
    }
    store_manifest(&mut client, &r, oci_dir, &media_type, &bytes, None)
}

/// Pulls an ordinary Docker or OCI image for `platform` (`os/arch[/variant]`, e.g.
/// `linux/amd64`) into the OCI layout `dest_layout_dir`: an image index or Docker manifest list
/// is resolved to the platform's manifest; the manifest, config and layers (media types kept as
/// the registry serves them) are written as blobs and `index.json` lists the manifest (with its
/// platform and the reference's tag as `org.opencontainers.image.ref.name`).
pub fn pull_image(
    reference: &str,
    dest_layout_dir: &Path,
    platform: &str,
    opts: &Options,
) -> Result<Pulled> {
    let r: Reference = reference.parse()?;
    let mut parts = platform.split('/');
    let (os, arch, variant) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next(),
    );
    if os.is_empty() || arch.is_empty() {
        return Err(RegistryError::Protocol(format!(
            "bad platform {platform:?}: want os/arch[/variant]"
        )));
    }
    let mut client = Client::new(&r, opts);
    let (media_type, bytes) = client.get_manifest(r.manifest_ref())?;
    if media_type != OCI_INDEX && media_type != DOCKER_LIST {
        return store_manifest(&mut client, &r, dest_layout_dir, &media_type, &bytes, None);
    }
    let index = ImageIndex::from_reader(&bytes[..])
        .map_err(|e| RegistryError::Protocol(format!("{r}: bad image index: {e}")))?;
    let matches = |d: &&Descriptor| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == os
                && p.architecture().to_string() == arch
                && variant.is_none_or(|v| p.variant().as_deref() == Some(v))
        })
    };
    let Some(chosen) = index.manifests().iter().find(matches) else {
        let available = index
            .manifests()
            .iter()
            .filter_map(|d| d.platform().as_ref())
            .map(|p| format!("{}/{}", p.os(), p.architecture()))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(RegistryError::NoPlatform {
            reference: r.to_string(),
            platform: platform.to_owned(),
            available,
        });
    };
    let digest = chosen.digest().to_string();
    let (mt, mbytes) = client.get_manifest(&digest)?;
    if mbytes.len() as u64 != chosen.size() {
        return Err(RegistryError::SizeMismatch {
            what: format!("manifest {digest}"),
            expected: chosen.size(),
            actual: mbytes.len() as u64,
        });
    }
    store_manifest(
        &mut client,
        &r,
        dest_layout_dir,
        &mt,
        &mbytes,
        chosen.platform().clone(),
    )
}

fn store_manifest(
    client: &mut Client,
    r: &Reference,
    dir: &Path,
    media_type: &str,
    bytes: &[u8],
    platform: Option<oci_spec::image::Platform>,
) -> Result<Pulled> {
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Err(RegistryError::Protocol(format!(
            "{r}: unsupported manifest media type {media_type:?}"
        )));
    }
    let manifest = ImageManifest::from_reader(bytes)
        .map_err(|e| RegistryError::Protocol(format!("{r}: bad manifest: {e}")))?;
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(|source| RegistryError::Io {
        op: "create",
        path: blobs.clone(),
        source,
    })?;
    let layout = dir.join("oci-layout");
    if !layout.exists() {
        fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(|source| {
            RegistryError::Io {
                op: "write",
                path: layout.clone(),
                source,
            }
        })?;
    }
    let mut pulled = Pulled {
        manifest: Descriptor::new(
            MediaType::ImageManifest,
            0,
            oci::oci_digest(&Digest::default()),
        ),
        config: manifest.config().clone(),
        layers: manifest.layers().clone(),
        fetched: 0,
        bytes_fetched: 0,
    };
    for d in std::iter::once(manifest.config()).chain(manifest.layers().iter()) {
        let n = client.fetch_blob(d, dir)?;
        if n > 0 {
            pulled.fetched += 1;
            pulled.bytes_fetched += n;
        }
    }
    let digest = oci::write_blob_bytes(dir, bytes)?;
    let mut desc = Descriptor::new(
        MediaType::from(media_type),
        bytes.len() as u64,
        oci::oci_digest(&digest),
    );
    desc.set_artifact_type(manifest.artifact_type().clone());
    desc.set_platform(platform);
    desc.set_annotations(Some(HashMap::from([(
        oci::ANNOTATION_REF_NAME.to_owned(),
        r.tag_or_latest().to_owned(),
    )])));
    oci::add_to_index(dir, desc.clone())?;
    pulled.manifest = desc;
    Ok(pulled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_host_port_repo_tag_and_digest() {
        let r: Reference = "localhost:5000/specc/app:v1".parse().expect("parse");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "specc/app");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_ref(), "v1");
        let d = format!("sha256:{}", "ab".repeat(32));
        let r: Reference = format!("registry.example.com/a/b/c@{d}")
            .parse()
            .expect("parse");
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.manifest_ref(), d);
        assert_eq!(r.tag, None);
        let r: Reference = "127.0.0.1:5999/x".parse().expect("parse");
        assert_eq!(r.manifest_ref(), "latest");
        assert!(use_http(&r, &Options::default()));
        let r: Reference = "ghcr.io/x/y:1".parse().expect("parse");
        assert!(!use_http(&r, &Options::default()));
        assert!(use_http(
            &r,
            &Options {
                insecure: true,
                ..Options::default()
            }
        ));
        for bad in [
            "nohost",
            "host/UPPER",
            "host/a:b:c/",
            "host/a@sha256:12",
            "host/a:.bad",
            "/repo",
        ] {
            assert!(bad.parse::<Reference>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn bearer_challenges_parse() {
        let p = parse_bearer(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        )
        .expect("bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/debian:pull");
        assert!(parse_bearer(r#"Basic realm="x""#).is_none());
        assert_eq!(
            urlencode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }

    #[test]
    fn connection_refused_is_a_clear_unreachable_error() {
        // Bind and drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let err = pull(
            &format!("127.0.0.1:{port}/x:y"),
            dir.path(),
            &Options::default(),
        )
        .expect_err("nobody listens");
        assert!(
            err.to_string()
                .starts_with(&format!("registry 127.0.0.1:{port} unreachable")),
            "{err}"
        );
    }

    /// A one-shot HTTP server answering 401 + Bearer challenge, then serving a token, then
    /// checking the retried request carries it.
    #[test]
    fn a_401_bearer_challenge_is_answered_with_an_anonymous_token() {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for conn in listener.incoming().take(3) {
                let mut conn = conn.expect("accept");
                let mut reader = io::BufReader::new(conn.try_clone().expect("clone"));
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).expect("line");
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    head.push(line);
                }
                let first = head[0].clone();
                let auth = head.iter().any(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("authorization: bearer tok123")
                });
                let reply = if first.starts_with("GET /token") {
                    let body = r#"{"token":"tok123"}"#;
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else if auth {
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
                } else {
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"t\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                };
                conn.write_all(reply.as_bytes()).expect("reply");
                seen.push((first, auth));
            }
            seen
        });
        let r: Reference = format!("127.0.0.1:{port}/x:y").parse().expect("parse");
        let mut c = Client::new(&r, &Options::default());
        let has = c
            .has_blob(&format!("sha256:{}", "0".repeat(64)))
            .expect("has_blob");
        assert!(has);
        let seen = server.join().expect("server");
        assert!(seen[0].0.starts_with("HEAD /v2/x/blobs/") && !seen[0].1);
        assert!(
            seen[1]
                .0
                .starts_with("GET /token?scope=repository%3Ax%3Apull&service=t"),
            "{:?}",
            seen[1]
        );
        assert!(seen[2].0.starts_with("HEAD /v2/x/blobs/") && seen[2].1);
    }
}
