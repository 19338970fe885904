//! noded's HTTP API on a Unix socket (mode 0600). Each connection carries one request;
//! the handler turns it into a [`Req`] for the reconciliation loop and writes the reply.
//! Routes are documented in `docs/openapi.yaml`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::daemon::{Command, DaemonError};
use super::launchers::Channel;
use super::requests::{err, Body, Reply, Req};
use crate::cluster::Cluster;
use contracts::http::{self, HttpError};

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `launcher capabilities` may take during an install.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the API socket: refuses when another noded answers on it, removes a stale file
/// otherwise, and restricts it to the owner.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let io = |source| DaemonError::Io {
        path: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let l = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(l)
}

/// Accepts connections forever.
pub async fn serve(
    listener: UnixListener,
    cmds: mpsc::Sender<Command>,
    launchers_dir: PathBuf,
    cluster: Option<Cluster>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let cmds = cmds.clone();
                let dir = launchers_dir.clone();
                let cluster = cluster.clone();
                tokio::spawn(async move { connection(stream, cmds, dir, cluster).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(
    mut stream: UnixStream,
    cmds: mpsc::Sender<Command>,
    launchers_dir: PathBuf,
    cluster: Option<Cluster>,
) {
    let reply =
        match tokio::time::timeout(READ_TIMEOUT, http::read_request_async(&mut stream)).await {
            Err(_) => err(408, "request not received in time"),
            Ok(Err(HttpError::Eof)) => return,
            Ok(Err(e)) => err(e.status(), e),
            Ok(Ok(req)) => {
                tracing::debug!(method = %req.method, path = %req.path, "request");
                let cluster_reply = match &cluster {
                    Some(c) => cluster_route(c, &req).await,
                    None => None,
                };
                match cluster_reply
                    .map(Ok)
                    .unwrap_or_else(|| route(&req.method, &req.path, &req))
                {
                    Ok(Routed::Reply(r)) => r,
                    Ok(Routed::Loop(r)) => ask(&cmds, r).await,
                    Ok(Routed::Install(i)) => install(&cmds, i, launchers_dir).await,
                    Err(reply) => reply,
                }
            }
        };
    let bytes = match &reply.body {
        Body::Json(v) => http::encode_response(reply.status, v),
        Body::Text(t) => {
            http::encode_raw_response(reply.status, "text/plain; version=0.0.4", t.as_bytes())
        }
    };
    let _ = http::write_response_async(&mut stream, &bytes).await;
}

async fn ask(cmds: &mpsc::Sender<Command>, req: Req) -> Reply {
    let (tx, rx) = oneshot::channel();
    if cmds.send(Command { req, reply: tx }).await.is_err() {
        return err(503, "noded is shutting down");
    }
    rx.await
        .unwrap_or_else(|_| err(503, "noded is shutting down"))
}

/// Stages and probes the copy outside the loop (it runs a process), then registers it.
async fn install(cmds: &mpsc::Sender<Command>, i: Install, launchers_dir: PathBuf) -> Reply {
    let src = PathBuf::from(&i.path);
    if !src.is_absolute() {
        return err(400, format!("path {:?} must be absolute", src.display()));
    }
    let staged = tokio::task::spawn_blocking(move || {
        super::launchers::stage_copy(&src, &launchers_dir, PROBE_TIMEOUT)
    })
    .await;
    match staged {
        Ok(Ok((caps, staged))) => {
            ask(
                cmds,
                Req::RegisterLauncher {
                    caps,
                    staged,
                    channel: i.channel,
                    force: i.force,
                },
            )
            .await
        }
        Ok(Err(e)) => err(400, e),
        Err(e) => err(500, e),
    }
}

enum Routed {
    Loop(Req),
    Install(Install),
    Reply(Reply),
}

/// A cluster route (`crate::cluster::api`), answered from etcd.
async fn cluster_route(c: &Cluster, req: &http::Request) -> Option<Routed> {
    let parts: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
    let body = if req.body.is_empty() {
        None
    } else {
        match req.json() {
            Ok(v) => Some(v),
            Err(e) => return Some(Routed::Reply(err(400, e))),
        }
    };
    crate::cluster::api::route(c, &req.method, &parts, body)
        .await
        .map(Routed::Reply)
}

/// `POST /v1/launchers` body.
#[derive(Debug, PartialEq)]
struct Install {
    path: String,
    channel: Channel,
    force: bool,
}

/// Checks the install body before any copying: a bad channel is refused up front.
fn install_body(body: &Value) -> Result<Install, Reply> {
    let usage = "body must be {\"path\": \"/absolute/path/to/launcher\", \"channel\": \"stable\"|\"candidate\", \"force\": false}";
    let Some(obj) = body.as_object() else {
        return Err(err(400, usage));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["path", "channel", "force"].contains(&k.as_str()))
    {
        return Err(err(400, format!("unknown field {k:?}: {usage}")));
    }
    let path = obj
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| err(400, usage))?
        .to_string();
    let channel = match obj.get("channel") {
        None | Some(Value::Null) => Channel::Stable,
        Some(c) => c.as_str().and_then(Channel::parse).ok_or_else(|| {
            err(
                400,
                format!("unknown channel {c} (use {})", Channel::NAMES.join(" or ")),
            )
        })?,
    };
    let force = match obj.get("force") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(err(400, format!("force: {other} must be true or false"))),
    };
    Ok(Install {
        path,
        channel,
        force,
    })
}

fn json_body(req: &http::Request) -> Result<Value, Reply> {
    req.json().map_err(|e| err(400, e))
}

/// Maps method and path to a request.
fn route(method: &str, path: &str, req: &http::Request) -> Result<Routed, Reply> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let loop_req = |r| Ok(Routed::Loop(r));
    let allow = |allowed: &str| {
        err(
            405,
            format!("method {method} not allowed on {path} (allowed: {allowed})"),
        )
    };
    match parts.as_slice() {
        ["metrics"] => match method {
            "GET" => loop_req(Req::Metrics),
            _ => Err(allow("GET")),
        },
        ["v1", "status"] => match method {
            "GET" => loop_req(Req::Status),
            _ => Err(allow("GET")),
        },
        ["v1", "vms"] => match method {
            "GET" => loop_req(Req::ListVms),
            "POST" => loop_req(Req::CreateVm(json_body(req)?)),
            _ => Err(allow("GET, POST")),
        },
        // Only POST: other methods on /v1/vms/receive reach a VM named "receive".
        ["v1", "vms", "receive"] if method == "POST" => loop_req(Req::Receive(json_body(req)?)),
        ["v1", "vms", name] => match method {
            "GET" => loop_req(Req::GetVm(name.to_string())),
            "PUT" => loop_req(Req::UpdateVm(name.to_string(), json_body(req)?)),
            "DELETE" => loop_req(Req::DeleteVm(name.to_string())),
            _ => Err(allow("GET, PUT, DELETE")),
        },
        ["v1", "vms", name, action] => match (method, *action) {
            ("PUT", "start") => loop_req(Req::StartVm(name.to_string())),
            ("PUT", "stop") => loop_req(Req::StopVm(name.to_string())),
            ("GET", "migrations") => loop_req(Req::Migrations(name.to_string())),
            ("PUT", "migrate") => loop_req(Req::MigrateOut(name.to_string(), json_body(req)?)),
            (_, "migrate") => Err(allow("PUT")),
            (_, "start" | "stop") => Err(allow("PUT")),
            (_, "migrations") => Err(allow("GET")),
            _ => Err(err(404, format!("no route {path}"))),
        },
        ["v1", "launchers"] => match method {
            "GET" => loop_req(Req::ListLaunchers),
            "POST" => Ok(Routed::Install(install_body(&json_body(req)?)?)),
            _ => Err(allow("GET, POST")),
        },
        ["v1", "update", "approve"] => match method {
            "PUT" => loop_req(Req::Approve),
            _ => Err(allow("PUT")),
        },
        ["v1", "config"] => match method {
            "GET" => loop_req(Req::GetConfig),
            "PUT" => loop_req(Req::SetConfig(json_body(req)?)),
            _ => Err(allow("GET, PUT")),
        },
        _ => Err(err(404, format!("no route {path}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: &str, path: &str, body: &str) -> Result<Routed, Reply> {
        let req = http::Request {
            method: method.into(),
            path: path.into(),
            query: None,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        };
        route(method, path, &req)
    }

    #[test]
    fn routes() {
        assert!(matches!(
            r("GET", "/v1/status", ""),
            Ok(Routed::Loop(Req::Status))
        ));
        assert!(matches!(
            r("GET", "/v1/vms/", ""),
            Ok(Routed::Loop(Req::ListVms))
        ));
        assert!(
            matches!(r("PUT", "/v1/vms/a/start", ""), Ok(Routed::Loop(Req::StartVm(n))) if n == "a")
        );
        assert!(
            matches!(r("POST", "/v1/launchers", "{\"path\":\"/x\"}"), Ok(Routed::Install(i)) if i == Install { path: "/x".into(), channel: Channel::Stable, force: false })
        );
        assert!(
            matches!(r("POST", "/v1/launchers", "{\"path\":\"/x\",\"channel\":\"candidate\",\"force\":true}"), Ok(Routed::Install(i)) if i.channel == Channel::Candidate && i.force)
        );
        let e = r(
            "POST",
            "/v1/launchers",
            "{\"path\":\"/x\",\"channel\":\"beta\"}",
        )
        .err()
        .expect("bad channel refused");
        assert_eq!(e.status, 400);
        assert!(
            matches!(&e.body, Body::Json(v) if v["error"].as_str().unwrap_or("").contains("unknown channel \"beta\""))
        );
        assert!(matches!(
            r("PUT", "/v1/vms/a", "{\"name\":\"a\"}"),
            Ok(Routed::Loop(Req::UpdateVm(n, _))) if n == "a"
        ));
        assert!(matches!(
            r("POST", "/v1/vms/receive", "{}"),
            Ok(Routed::Loop(Req::Receive(_)))
        ));
        assert!(matches!(
            r("GET", "/v1/vms/receive", ""),
            Ok(Routed::Loop(Req::GetVm(n))) if n == "receive"
        ));
        assert!(matches!(
            r("PUT", "/v1/vms/a/migrate", "{}"),
            Ok(Routed::Loop(Req::MigrateOut(n, _))) if n == "a"
        ));
        assert!(matches!(
            r("PUT", "/v1/config", "{\"a\":1}"),
            Ok(Routed::Loop(Req::SetConfig(_)))
        ));
        assert_eq!(
            r("POST", "/v1/status", "").err().map(|e| e.status),
            Some(405)
        );
        assert_eq!(r("GET", "/nope", "").err().map(|e| e.status), Some(404));
        assert_eq!(
            r("POST", "/v1/vms", "{bad").err().map(|e| e.status),
            Some(400)
        );
        assert_eq!(
            r("POST", "/v1/launchers", "{}").err().map(|e| e.status),
            Some(400)
        );
    }
}
