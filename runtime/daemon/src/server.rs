//! The HTTP/JSON API over a unix socket (and optionally TCP), one thread per request.
//!
//! Each route is a function with its OpenAPI description beside it (`#[utoipa::path]`);
//! [`ApiDoc`] collects them, so the document at `GET /v1/openapi.json` is generated from the
//! code that serves it, and a test checks that every route the router knows is in it.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use tiny_http::{Header, Method, Request, Response, Server, StatusCode};
use utoipa::OpenApi;

use crate::api;
use crate::daemon::{Daemon, DaemonError};

/// Largest JSON request body.
const JSON_LIMIT: u64 = 1 << 20;
/// Largest file written through the API in one request.
const FILE_LIMIT: u64 = 256 << 20;

/// The OpenAPI document of the API.
#[derive(OpenApi, Debug)]
#[openapi(
    info(
        title = "specd",
        description = "Run VMs from specc snapshot artifacts."
    ),
    paths(
        health,
        openapi_json,
        metrics,
        list_vms,
        create_vm,
        show_vm,
        delete_vm,
        pause_vm,
        resume_vm,
        suspend_vm,
        wake_vm,
        stop_vm,
        start_vm,
        fork_vm,
        exec_vm,
        exec_stdin,
        read_file,
        write_file,
        list_dir,
        logs
    ),
    components(schemas(
        api::Source,
        api::Persistence,
        api::IdlePolicy,
        api::CreateVm,
        api::VmState,
        api::Port,
        api::Vm,
        api::ForkVm,
        api::ForkMode,
        api::Forked,
        api::ForkReport,
        api::ForkPhases,
        api::MemoryCopy,
        api::ForkChild,
        api::Exec,
        api::ExecEvent,
        api::DirEntry,
        api::ApiError,
        api::Health
    ))
)]
pub struct ApiDoc;

/// What a route answers.
enum Reply {
    Json(u16, Vec<u8>),
    Bytes(Vec<u8>, &'static str),
    /// The route wrote the response itself.
    Done,
}

fn json<T: serde::Serialize>(status: u16, v: &T) -> Reply {
    Reply::Json(status, serde_json::to_vec(v).unwrap_or_default())
}

fn error(e: &DaemonError) -> Reply {
    json(
        e.status(),
        &api::ApiError {
            error: e.to_string(),
        },
    )
}

fn bad(msg: impl Into<String>) -> Reply {
    error(&DaemonError::BadRequest(msg.into()))
}

fn result<T: serde::Serialize>(r: Result<T, DaemonError>) -> Reply {
    match r {
        Ok(v) => json(200, &v),
        Err(e) => error(&e),
    }
}

/// A parsed request.
struct Call {
    req: Option<Request>,
    path: Vec<String>,
    query: Vec<(String, String)>,
}

impl Call {
    fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn body(&mut self, limit: u64) -> Result<Vec<u8>, Reply> {
        let req = self.req.as_mut().ok_or_else(|| bad("no request body"))?;
        if req.body_length().is_some_and(|n| n as u64 > limit) {
            return Err(json(
                413,
                &api::ApiError {
                    error: format!("request body over {limit} bytes"),
                },
            ));
        }
        let mut buf = Vec::new();
        req.as_reader()
            .take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("reading the request body: {e}")))?;
        if buf.len() as u64 > limit {
            return Err(json(
                413,
                &api::ApiError {
                    error: format!("request body over {limit} bytes"),
                },
            ));
        }
        Ok(buf)
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, Reply> {
        let body = self.body(JSON_LIMIT)?;
        serde_json::from_slice(&body).map_err(|e| bad(format!("request body: {e}")))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 3 <= b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_url(url: &str) -> (Vec<String>, Vec<(String, String)>) {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let segs = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let query = query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (segs, query)
}

/// The route a method and path go to, by name (the names are the handler functions').
fn route(method: &Method, path: &[&str]) -> Option<&'static str> {
    Some(match (method, path) {
        (Method::Get, ["v1", "health"]) => "health",
        (Method::Get, ["v1", "openapi.json"]) => "openapi_json",
        (Method::Get, ["metrics"]) => "metrics",
        (Method::Get, ["v1", "vms"]) => "list_vms",
        (Method::Post, ["v1", "vms"]) => "create_vm",
        (Method::Get, ["v1", "vms", _]) => "show_vm",
        (Method::Delete, ["v1", "vms", _]) => "delete_vm",
        (Method::Post, ["v1", "vms", _, "pause"]) => "pause_vm",
        (Method::Post, ["v1", "vms", _, "resume"]) => "resume_vm",
        (Method::Post, ["v1", "vms", _, "suspend"]) => "suspend_vm",
        (Method::Post, ["v1", "vms", _, "wake"]) => "wake_vm",
        (Method::Post, ["v1", "vms", _, "stop"]) => "stop_vm",
        (Method::Post, ["v1", "vms", _, "start"]) => "start_vm",
        (Method::Post, ["v1", "vms", _, "fork"]) => "fork_vm",
        (Method::Post, ["v1", "vms", _, "exec"]) => "exec_vm",
        (Method::Post, ["v1", "vms", _, "execs", _, "stdin"]) => "exec_stdin",
        (Method::Get, ["v1", "vms", _, "files"]) => "read_file",
        (Method::Put, ["v1", "vms", _, "files"]) => "write_file",
        (Method::Get, ["v1", "vms", _, "dir"]) => "list_dir",
        (Method::Get, ["v1", "vms", _, "logs"]) => "logs",
        _ => return None,
    })
}

fn dispatch(d: &Daemon, name: &str, c: &mut Call) -> Reply {
    let id = c.path.get(2).cloned().unwrap_or_default();
    match name {
        "health" => health(d),
        "openapi_json" => openapi_json(),
        "metrics" => metrics(d),
        "list_vms" => list_vms(d),
        "create_vm" => create_vm(d, c),
        "show_vm" => show_vm(d, &id),
        "delete_vm" => delete_vm(d, &id),
        "pause_vm" => pause_vm(d, &id),
        "resume_vm" => resume_vm(d, &id),
        "suspend_vm" => suspend_vm(d, &id),
        "wake_vm" => wake_vm(d, &id),
        "stop_vm" => stop_vm(d, &id),
        "start_vm" => start_vm(d, &id),
        "fork_vm" => fork_vm(d, &id, c),
        "exec_vm" => exec_vm(d, &id, c),
        "exec_stdin" => exec_stdin(d, &id, c),
        "read_file" => read_file(d, &id, c),
        "write_file" => write_file(d, &id, c),
        "list_dir" => list_dir(d, &id, c),
        "logs" => logs(d, &id, c),
        _ => bad(format!("unrouted {name}")),
    }
}

#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = api::Health)))]
fn health(d: &Daemon) -> Reply {
    json(
        200,
        &api::Health {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: d.mode().into(),
            vms: d.list().len(),
        },
    )
}

#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "This document")))]
fn openapi_json() -> Reply {
    Reply::Json(
        200,
        ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_default()
            .into_bytes(),
    )
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
fn metrics(d: &Daemon) -> Reply {
    Reply::Bytes(
        d.metrics.render(&d.state_counts()).into_bytes(),
        "text/plain; version=0.0.4",
    )
}

#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = [api::Vm])))]
fn list_vms(d: &Daemon) -> Reply {
    json(200, &d.list())
}

#[utoipa::path(post, path = "/v1/vms", request_body = api::CreateVm,
    responses((status = 201, body = api::Vm), (status = 400, body = api::ApiError),
              (status = 404, body = api::ApiError), (status = 422, body = api::ApiError)))]
fn create_vm(d: &Daemon, c: &mut Call) -> Reply {
    match c.json::<api::CreateVm>() {
        Ok(req) => match d.create(req) {
            Ok(vm) => json(201, &vm),
            Err(e) => error(&e),
        },
        Err(r) => r,
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}", params(("id" = String, Path)),
    responses((status = 200, body = api::Vm), (status = 404, body = api::ApiError)))]
fn show_vm(d: &Daemon, id: &str) -> Reply {
    result(d.show(id))
}

#[utoipa::path(delete, path = "/v1/vms/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = api::ApiError)))]
fn delete_vm(d: &Daemon, id: &str) -> Reply {
    match d.delete(id) {
        Ok(()) => Reply::Json(204, Vec::new()),
        Err(e) => error(&e),
    }
}

#[utoipa::path(post, path = "/v1/vms/{id}/pause", params(("id" = String, Path)),
    responses((status = 200, body = api::Vm), (status = 409, body = api::ApiError)))]
fn pause_vm(d: &Daemon, id: &str) -> Reply {
    result(d.pause(id))
}

#[utoipa::path(post, path = "/v1/vms/{id}/resume", params(("id" = String, Path)),
    responses((status = 200, body = api::Vm), (status = 409, body = api::ApiError)))]
fn resume_vm(d: &Daemon, id: &str) -> Reply {
    result(d.resume(id))
}

#[utoipa::path(post, path = "/v1/vms/{id}/suspend", params(("id" = String, Path)),
    responses((status = 200, body = api::Vm, description = "Suspended"),
              (status = 204, description = "Ephemeral: deleted instead"),
              (status = 409, body = api::ApiError)))]
fn suspend_vm(d: &Daemon, id: &str) -> Reply {
    match d.suspend(id) {
        Ok(Some(vm)) => json(200, &vm),
        Ok(None) => Reply::Json(204, Vec::new()),
        Err(e) => error(&e),
    }
}

#[utoipa::path(post, path = "/v1/vms/{id}/wake", params(("id" = String, Path)),
    responses((status = 200, body = api::Vm), (status = 409, body = api::ApiError)))]
fn wake_vm(d: &Daemon, id: &str) -> Reply {
    result(d.wake(id).map(|(vm, _)| vm))
}

/// Powers the VM off: its guest syncs, the VMM exits, its memory is discarded and only its
/// disk is kept. Exec and file calls on a stopped VM answer 409 until it is started.
#[utoipa::path(post, path = "/v1/vms/{id}/stop", params(("id" = String, Path)),
    responses((status = 200, body = api::Vm, description = "Stopped"),
              (status = 409, body = api::ApiError), (status = 422, body = api::ApiError,
               description = "No kernel to boot it again: nothing was done")))]
fn stop_vm(d: &Daemon, id: &str) -> Reply {
    result(d.stop(id))
}

/// Cold-boots a stopped VM from its kernel and its own disk (files written before the stop
/// are there; memory and `/tmp` are not); wakes a suspended one, resumes a paused one.
#[utoipa::path(post, path = "/v1/vms/{id}/start", params(("id" = String, Path)),
    responses((status = 200, body = api::Vm), (status = 409, body = api::ApiError)))]
fn start_vm(d: &Daemon, id: &str) -> Reply {
    result(d.start(id).map(|(vm, _)| vm))
}

/// Forks a running VM (a paused one is resumed, a suspended one woken first) into `count`
/// new running VMs, in `mode` (`precopy` by default); answers with the new VMs and the VMM's
/// figures of the fork.
#[utoipa::path(post, path = "/v1/vms/{id}/fork", params(("id" = String, Path)),
    request_body = api::ForkVm,
    responses((status = 200, body = api::Forked), (status = 400, body = api::ApiError),
        (status = 409, body = api::ApiError)))]
fn fork_vm(d: &Daemon, id: &str, c: &mut Call) -> Reply {
    match c.json::<api::ForkVm>() {
        Ok(req) => result(d.fork(id, req.count, req.mode.unwrap_or_default())),
        Err(r) => r,
    }
}

enum ExecMsg {
    Line(Vec<u8>),
    Failed(DaemonError),
}

#[utoipa::path(post, path = "/v1/vms/{id}/exec", params(("id" = String, Path)),
    request_body = api::Exec,
    responses((status = 200, description = "application/x-ndjson: one ExecEvent per line as \
        the process writes, ending with exit (or error)", body = api::ExecEvent),
        (status = 404, body = api::ApiError), (status = 409, body = api::ApiError)))]
fn exec_vm(d: &Daemon, id: &str, c: &mut Call) -> Reply {
    let req: api::Exec = match c.json() {
        Ok(r) => r,
        Err(r) => return r,
    };
    let (tx, rx) = mpsc::sync_channel::<ExecMsg>(64);
    std::thread::scope(|s| {
        let tx2 = tx.clone();
        let id2 = id.to_owned();
        s.spawn(move || {
            let r = d.exec(&id2, &req, |ev| {
                let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                line.push(b'\n');
                let _ = tx2.send(ExecMsg::Line(line));
            });
            if let Err(e) = r {
                let _ = tx2.send(ExecMsg::Failed(e));
            }
        });
        drop(tx);
        // Errors before the first line (no such VM, the wake failed) are HTTP errors; once
        // the answer has started they become an `error` line.
        let first = match rx.recv() {
            Ok(ExecMsg::Line(l)) => l,
            Ok(ExecMsg::Failed(e)) => return error(&e),
            Err(_) => return error(&DaemonError::BadRequest("exec produced nothing".into())),
        };
        let Some(req) = c.req.take() else {
            return bad("no request");
        };
        let mut w = req.into_writer();
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\
                    Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
        let mut ok = w.write_all(head.as_bytes()).is_ok();
        let send = |w: &mut dyn Write, data: &[u8]| -> bool {
            write!(w, "{:x}\r\n", data.len()).is_ok()
                && w.write_all(data).is_ok()
                && w.write_all(b"\r\n").is_ok()
                && w.flush().is_ok()
        };
        ok = ok && send(&mut w, &first);
        for msg in rx.iter() {
            let line = match msg {
                ExecMsg::Line(l) => l,
                ExecMsg::Failed(e) => {
                    let mut l = serde_json::to_vec(&api::ExecEvent::Error {
                        message: e.to_string(),
                    })
                    .unwrap_or_default();
                    l.push(b'\n');
                    l
                }
            };
            // A client that went away stops reading; the command still runs to its end.
            ok = ok && send(&mut w, &line);
        }
        if ok {
            let _ = w.write_all(b"0\r\n\r\n").and_then(|()| w.flush());
        }
        Reply::Done
    })
}

#[utoipa::path(post, path = "/v1/vms/{id}/execs/{exec}/stdin",
    params(("id" = String, Path), ("exec" = String, Path,
        description = "The `stdin` name of the exec's `started` event")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The process's stdin, forwarded as it arrives (send it chunked to \
        stream); its end closes stdin"),
    responses((status = 204, description = "All of the body was forwarded and stdin closed"),
        (status = 404, body = api::ApiError), (status = 409, body = api::ApiError)))]
fn exec_stdin(d: &Daemon, id: &str, c: &mut Call) -> Reply {
    let exec = c.path.get(4).cloned().unwrap_or_default();
    let Some(req) = c.req.as_mut() else {
        return bad("no request");
    };
    match d.feed_stdin(id, &exec, req.as_reader()) {
        Ok(_) => Reply::Json(204, Vec::new()),
        Err(e) => error(&e),
    }
}

fn path_param(c: &Call) -> Result<String, Reply> {
    match c.query("path") {
        Some(p) if p.starts_with('/') => Ok(p.to_owned()),
        _ => Err(bad("query parameter `path` must be an absolute guest path")),
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}/files", params(("id" = String, Path),
    ("path" = String, Query, description = "Absolute guest path")),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
              (status = 400, body = api::ApiError)))]
fn read_file(d: &Daemon, id: &str, c: &mut Call) -> Reply {
    match path_param(c) {
        Ok(p) => match d.read_file(id, &p) {
            Ok(b) => Reply::Bytes(b, "application/octet-stream"),
            Err(e) => error(&e),
        },
        Err(r) => r,
    }
}

#[utoipa::path(put, path = "/v1/vms/{id}/files", params(("id" = String, Path),
    ("path" = String, Query, description = "Absolute guest path"),
    ("mode" = Option<String>, Query, description = "Octal permission bits, default 644")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 400, body = api::ApiError)))]
fn write_file(d: &Daemon, id: &str, c: &mut Call) -> Reply {
    let p = match path_param(c) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mode = match c.query("mode").map(|m| u32::from_str_radix(m, 8)) {
        None => 0o644,
        Some(Ok(m)) if m <= 0o7777 => m,
        Some(_) => return bad("mode must be octal permission bits"),
    };
    let data = match c.body(FILE_LIMIT) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match d.write_file(id, &p, mode, &data) {
        Ok(()) => Reply::Json(204, Vec::new()),
        Err(e) => error(&e),
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}/dir", params(("id" = String, Path),
    ("path" = String, Query, description = "Absolute guest path")),
    responses((status = 200, body = [api::DirEntry]), (status = 400, body = api::ApiError)))]
fn list_dir(d: &Daemon, id: &str, c: &mut Call) -> Reply {
    match path_param(c) {
        Ok(p) => result(d.list_dir(id, &p)),
        Err(r) => r,
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}/logs", params(("id" = String, Path),
    ("lines" = Option<usize>, Query, description = "How many last lines, default 100")),
    responses((status = 200, description = "Console text", content_type = "text/plain")))]
fn logs(d: &Daemon, id: &str, c: &mut Call) -> Reply {
    let lines = c.query("lines").and_then(|l| l.parse().ok()).unwrap_or(100);
    match d.logs(id, lines) {
        Ok(t) => Reply::Bytes(t.into_bytes(), "text/plain; charset=utf-8"),
        Err(e) => error(&e),
    }
}

fn handle(d: &Daemon, req: Request) {
    let method = req.method().clone();
    let (path, query) = parse_url(req.url());
    let name = route(
        &method,
        &path.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let shown = path.join("/");
    let t0 = std::time::Instant::now();
    let mut call = Call {
        req: Some(req),
        path,
        query,
    };
    let reply = match name {
        Some(n) => dispatch(d, n, &mut call),
        None => json(
            404,
            &api::ApiError {
                error: format!("no route {method} /{shown}"),
            },
        ),
    };
    tracing::debug!(%method, path = %shown, took_us = t0.elapsed().as_micros(), "request");
    let Some(req) = call.req.take() else {
        return;
    };
    let ct = |v: &str| Header::from_bytes("Content-Type", v).ok();
    let r = match reply {
        Reply::Json(status, body) => {
            let mut resp = Response::from_data(body).with_status_code(StatusCode(status));
            if status != 204
                && let Some(h) = ct("application/json")
            {
                resp.add_header(h);
            }
            req.respond(resp)
        }
        Reply::Bytes(body, content_type) => {
            let mut resp = Response::from_data(body);
            if let Some(h) = ct(content_type) {
                resp.add_header(h);
            }
            req.respond(resp)
        }
        Reply::Done => Ok(()),
    };
    if let Err(e) = r {
        tracing::debug!("answering: {e}");
    }
}

/// Serves the API on `server` until it is closed.
pub fn serve(d: &Arc<Daemon>, server: &Server) {
    for req in server.incoming_requests() {
        let d = d.clone();
        let spawned = std::thread::Builder::new()
            .name("specd-request".into())
            .spawn(move || handle(&d, req));
        if let Err(e) = spawned {
            tracing::error!("cannot start a request thread: {e}");
        }
    }
}

/// Binds the unix socket at `path` (replacing a stale one; refusing a live one).
pub fn bind_unix(path: &Path) -> Result<Server, std::io::Error> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is in use by a running specd", path.display()),
        ));
    }
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    Server::http_unix(path).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_openapi_document() {
        let doc: serde_json::Value =
            serde_json::from_str(&ApiDoc::openapi().to_json().expect("json")).expect("parse");
        let paths = doc["paths"].as_object().expect("paths");
        let cases = [
            (Method::Get, "/v1/health", "get"),
            (Method::Get, "/v1/openapi.json", "get"),
            (Method::Get, "/metrics", "get"),
            (Method::Get, "/v1/vms", "get"),
            (Method::Post, "/v1/vms", "post"),
            (Method::Get, "/v1/vms/{id}", "get"),
            (Method::Delete, "/v1/vms/{id}", "delete"),
            (Method::Post, "/v1/vms/{id}/pause", "post"),
            (Method::Post, "/v1/vms/{id}/resume", "post"),
            (Method::Post, "/v1/vms/{id}/suspend", "post"),
            (Method::Post, "/v1/vms/{id}/wake", "post"),
            (Method::Post, "/v1/vms/{id}/stop", "post"),
            (Method::Post, "/v1/vms/{id}/start", "post"),
            (Method::Post, "/v1/vms/{id}/fork", "post"),
            (Method::Post, "/v1/vms/{id}/exec", "post"),
            (Method::Post, "/v1/vms/{id}/execs/{exec}/stdin", "post"),
            (Method::Get, "/v1/vms/{id}/files", "get"),
            (Method::Put, "/v1/vms/{id}/files", "put"),
            (Method::Get, "/v1/vms/{id}/dir", "get"),
            (Method::Get, "/v1/vms/{id}/logs", "get"),
        ];
        for (m, p, verb) in &cases {
            let segs: Vec<&str> = p.split('/').filter(|s| !s.is_empty()).collect();
            assert!(route(m, &segs).is_some(), "{m} {p} is not routed");
            assert!(
                paths.get(*p).and_then(|v| v.get(*verb)).is_some(),
                "{verb} {p} missing from the OpenAPI document"
            );
        }
        let documented: usize = paths
            .values()
            .map(|v| v.as_object().map_or(0, |o| o.len()))
            .sum();
        assert_eq!(
            documented,
            cases.len(),
            "the document has routes the router lacks"
        );
        assert!(route(&Method::Get, &["v1", "nope"]).is_none());
    }

    /// The fork request's mode is optional (precopy), named in the document, and a mode the
    /// VMM does not have is refused; the answer carries the VMM's report.
    #[test]
    fn fork_mode_is_optional_documented_and_checked() {
        let req: api::ForkVm = serde_json::from_str(r#"{"count": 2}"#).unwrap();
        assert_eq!(
            (req.count, req.mode.unwrap_or_default()),
            (2, api::ForkMode::Precopy)
        );
        let req: api::ForkVm = serde_json::from_str(r#"{"count": 1, "mode": "cow"}"#).unwrap();
        assert_eq!(req.mode, Some(api::ForkMode::Cow));
        assert!(serde_json::from_str::<api::ForkVm>(r#"{"count": 1, "mode": "copy"}"#).is_err());
        let doc: serde_json::Value =
            serde_json::from_str(&ApiDoc::openapi().to_json().expect("json")).expect("parse");
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["ForkMode"]["enum"],
            serde_json::json!(["cow", "precopy"]),
            "{}",
            schemas["ForkMode"]
        );
        assert!(schemas["ForkVm"]["properties"]["mode"].is_object());
        for field in ["pause_us", "report", "vms"] {
            assert!(
                schemas["Forked"]["properties"][field].is_object(),
                "Forked.{field}"
            );
        }
        for field in [
            "mode", "pause_us", "owner_us", "phases", "precopy", "children",
        ] {
            assert!(
                schemas["ForkReport"]["properties"][field].is_object(),
                "ForkReport.{field}"
            );
        }
    }

    #[test]
    fn urls_are_split_and_decoded() {
        let (p, q) = parse_url("/v1/vms/ab/files?path=%2Fetc%2Fhost%20name&mode=600");
        assert_eq!(p, ["v1", "vms", "ab", "files"]);
        assert_eq!(q[0], ("path".into(), "/etc/host name".into()));
        assert_eq!(q[1], ("mode".into(), "600".into()));
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
