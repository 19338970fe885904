//! noded's HTTP API on a Unix socket (mode 0600), served by hyper and routed by axum.
//! Handlers turn each request into a [`Req`] for the reconciliation loop and write its
//! reply; `?watch=true` streams changes as newline-delimited JSON (see [`super::watch`]).
//! Routes are documented in `docs/openapi.yaml`; [`ROUTES`] lists them, and a test
//! compares the two.
//!
//! Limits, kept from the hand-written server this replaced: the request head is bounded
//! by hyper's read buffer ([`MAX_HEADER_BYTES`], answered with 431), a body by
//! [`MAX_BODY_BYTES`] (413 with a JSON error, checked against Content-Length before
//! anything is read, and again while reading a chunked body), and a client gets
//! [`READ_TIMEOUT`] to send its request head.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::{Body as AxBody, Bytes};
use axum::extract::{FromRequest, Path as UrlPath, RawQuery, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde_json::Value;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};

use super::daemon::{Command, DaemonError};
use super::launchers::Channel;
use super::requests::{err, Body, Reply, Req};
use contracts::http::{MAX_BODY_BYTES, MAX_HEADER_BYTES};

/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `launcher capabilities` may take during an install.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Every route noded serves, as `(method, path template)` in OpenAPI's spelling. The
/// router below is built from the same handlers; `openapi_lists_exactly_the_routes`
/// checks `docs/openapi.yaml` against this list, and `router_serves_every_route` checks
/// that the router answers each of them.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/metrics"),
    ("get", "/v1/status"),
    ("get", "/v1/vms"),
    ("post", "/v1/vms"),
    ("post", "/v1/vms/receive"),
    ("get", "/v1/vms/{name}"),
    ("put", "/v1/vms/{name}"),
    ("delete", "/v1/vms/{name}"),
    ("put", "/v1/vms/{name}/start"),
    ("put", "/v1/vms/{name}/stop"),
    ("put", "/v1/vms/{name}/migrate"),
    ("put", "/v1/vms/{name}/resolve-handover"),
    ("get", "/v1/vms/{name}/migrations"),
    ("get", "/v1/vms/{name}/events"),
    ("get", "/v1/launchers"),
    ("post", "/v1/launchers"),
    ("put", "/v1/update/approve"),
    ("get", "/v1/config"),
    ("put", "/v1/config"),
    // Cluster routes (`crate::cluster::api`): answered from etcd by any node of a
    // cluster, 404 on a single node. In a cluster, POST /v1/vms and DELETE
    // /v1/vms/{name} are cluster-wide too.
    ("get", "/v1/nodes"),
    ("get", "/v1/nodes/{name}"),
    ("put", "/v1/nodes/{name}/cordon"),
    ("put", "/v1/nodes/{name}/uncordon"),
    ("put", "/v1/nodes/{name}/drain"),
    ("get", "/v1/cluster"),
    ("put", "/v1/cluster/config"),
    ("get", "/v1/cluster/vms"),
    ("get", "/v1/cluster/migrations"),
];

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    /// The loop's command channel.
    pub cmds: mpsc::Sender<Command>,
    /// Where installs stage their copy.
    pub launchers_dir: PathBuf,
    /// Bumped by the loop whenever its state may have changed (wakes watchers).
    pub changes: watch::Receiver<u64>,
    /// The cluster this node joined (`--cluster-endpoints`), if any.
    pub cluster: Option<crate::cluster::Cluster>,
}

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

/// The router: every route of [`ROUTES`], with JSON errors for unknown paths and methods.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/vms", get(list_vms).post(create_vm))
        // Other methods on /v1/vms/receive reach a VM named "receive".
        .route(
            "/v1/vms/receive",
            post(receive)
                .get(|s, q| get_vm(s, UrlPath("receive".into()), q))
                .put(|s, q, b| update_vm(s, UrlPath("receive".into()), q, b))
                .delete(|s| delete_vm(s, UrlPath("receive".into()))),
        )
        .route(
            "/v1/vms/{name}",
            get(get_vm).put(update_vm).delete(delete_vm),
        )
        .route("/v1/vms/{name}/start", put(start_vm))
        .route("/v1/vms/{name}/stop", put(stop_vm))
        .route("/v1/vms/{name}/migrate", put(migrate_vm))
        .route("/v1/vms/{name}/resolve-handover", put(resolve_handover))
        .route("/v1/vms/{name}/migrations", get(migrations))
        .route("/v1/vms/{name}/events", get(events))
        .route("/v1/launchers", get(list_launchers).post(install))
        .route("/v1/update/approve", put(approve))
        .route("/v1/config", get(get_config).put(set_config))
        .route("/v1/nodes", get(|s| cluster_only(s, "GET", vec![], None)))
        .route(
            "/v1/nodes/{name}",
            get(|s, UrlPath(n): UrlPath<String>| cluster_only(s, "GET", vec![n], None)),
        )
        .route(
            "/v1/nodes/{name}/cordon",
            put(|s, UrlPath(n): UrlPath<String>| {
                cluster_only(s, "PUT", vec![n, "cordon".into()], None)
            }),
        )
        .route(
            "/v1/nodes/{name}/uncordon",
            put(|s, UrlPath(n): UrlPath<String>| {
                cluster_only(s, "PUT", vec![n, "uncordon".into()], None)
            }),
        )
        .route(
            "/v1/nodes/{name}/drain",
            put(|s, UrlPath(n): UrlPath<String>| {
                cluster_only(s, "PUT", vec![n, "drain".into()], None)
            }),
        )
        .route("/v1/cluster", get(|s| cluster_path(s, "GET", &[], None)))
        .route(
            "/v1/cluster/config",
            put(|s, JsonBody(b): JsonBody| cluster_path(s, "PUT", &["config"], Some(b))),
        )
        .route(
            "/v1/cluster/vms",
            get(|s| cluster_path(s, "GET", &["vms"], None)),
        )
        .route(
            "/v1/cluster/migrations",
            get(|s| cluster_path(s, "GET", &["migrations"], None)),
        )
        .fallback(|uri: Uri| async move { reply(err(404, format!("no route {}", uri.path()))) })
        .method_not_allowed_fallback(|m: Method, uri: Uri| async move {
            reply(err(
                405,
                format!("method {m} not allowed on {}", uri.path()),
            ))
        })
        .with_state(state)
}

/// Accepts connections until the listener fails for good; each connection is served by
/// hyper's HTTP/1 server with the head limit and read timeout.
pub async fn serve(listener: UnixListener, state: ApiState) {
    let app = router(state);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                // A client that shuts down its write side after the request (as
                // `curl`, `nc -N` and the tests do) still gets its answer.
                .half_close(true)
                // hyper refuses a head that does not fit its read buffer with 431.
                .max_buf_size(MAX_HEADER_BYTES.max(8192))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection ended with an error");
            }
        });
    }
}

/// Converts the loop's reply into an HTTP response.
pub fn reply(r: Reply) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match r.body {
        Body::Json(v) => (status, axum::Json(v)).into_response(),
        Body::Text(t) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            t,
        )
            .into_response(),
    }
}

/// Sends a request to the loop and waits for its answer.
pub async fn ask(cmds: &mpsc::Sender<Command>, req: Req) -> Reply {
    let (tx, rx) = oneshot::channel();
    if cmds.send(Command { req, reply: tx }).await.is_err() {
        return err(503, "noded is shutting down");
    }
    rx.await
        .unwrap_or_else(|_| err(503, "noded is shutting down"))
}

/// A JSON request body (empty means `null`), bounded by [`MAX_BODY_BYTES`] before and
/// while it is read; errors are JSON replies that say what was wrong.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = Response;

    async fn from_request(req: Request, _: &S) -> Result<Self, Response> {
        let too_large = |n: String| {
            reply(err(
                413,
                format!("body of {n} bytes exceeds the limit of {MAX_BODY_BYTES} bytes"),
            ))
        };
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > MAX_BODY_BYTES as u64 {
                return Err(too_large(len.to_string()));
            }
        }
        let bytes: Bytes = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
            .await
            .map_err(|e| {
                if std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                {
                    too_large("more than that".into())
                } else {
                    reply(err(400, format!("cannot read the body: {e}")))
                }
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(Value::Null));
        }
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| reply(err(400, format!("body is not valid JSON: {e}"))))
    }
}

/// The query flags noded understands: `watch` and `dryRun`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    /// Stream changes (`?watch=true`).
    pub watch: bool,
    /// Validate and answer, change nothing (`?dryRun=true`, or Kubernetes' `All`).
    pub dry_run: bool,
}

/// Parses the query string; an unknown parameter or value is refused, not ignored.
pub fn flags(query: Option<&str>) -> Result<Flags, Reply> {
    let mut f = Flags::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        let on = match v {
            "true" | "1" | "All" => true,
            "false" | "0" => false,
            _ => {
                return Err(err(
                    400,
                    format!("query parameter {k}={v:?}: use true or false"),
                ))
            }
        };
        match k {
            "watch" => f.watch = on,
            "dryRun" => f.dry_run = on,
            _ => {
                return Err(err(
                    400,
                    format!("unknown query parameter {k:?} (known: watch, dryRun)"),
                ))
            }
        }
    }
    Ok(f)
}

macro_rules! flags_or_reply {
    ($q:expr) => {
        match flags($q.0.as_deref()) {
            Ok(f) => f,
            Err(r) => return reply(r),
        }
    };
}

async fn metrics(State(s): State<ApiState>) -> Response {
    reply(ask(&s.cmds, Req::Metrics).await)
}

async fn status(State(s): State<ApiState>, q: RawQuery) -> Response {
    let f = flags_or_reply!(q);
    if f.watch {
        return super::watch::object(s, || Req::Status).await;
    }
    reply(ask(&s.cmds, Req::Status).await)
}

async fn list_vms(State(s): State<ApiState>, q: RawQuery) -> Response {
    let f = flags_or_reply!(q);
    if f.watch {
        return super::watch::list(s, || Req::ListVms, "name").await;
    }
    reply(ask(&s.cmds, Req::ListVms).await)
}

async fn create_vm(State(s): State<ApiState>, q: RawQuery, JsonBody(b): JsonBody) -> Response {
    let f = flags_or_reply!(q);
    // In a cluster the leader places the VM (a dry run is checked here, on this node).
    if !f.dry_run {
        if let Some(r) = cluster_call(&s, "POST", &["v1", "vms"], Some(b.clone())).await {
            return reply(r);
        }
    }
    reply(ask(&s.cmds, Req::CreateVm(b, f.dry_run)).await)
}

async fn receive(State(s): State<ApiState>, JsonBody(b): JsonBody) -> Response {
    reply(ask(&s.cmds, Req::Receive(b)).await)
}

async fn get_vm(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    q: RawQuery,
) -> Response {
    let f = flags_or_reply!(q);
    if f.watch {
        return super::watch::object(s, move || Req::GetVm(name.clone())).await;
    }
    reply(ask(&s.cmds, Req::GetVm(name)).await)
}

async fn update_vm(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    q: RawQuery,
    JsonBody(b): JsonBody,
) -> Response {
    let f = flags_or_reply!(q);
    reply(ask(&s.cmds, Req::UpdateVm(name, b, f.dry_run)).await)
}

async fn delete_vm(State(s): State<ApiState>, UrlPath(name): UrlPath<String>) -> Response {
    if let Some(r) = cluster_call(&s, "DELETE", &["v1", "vms", &name], None).await {
        return reply(r);
    }
    reply(ask(&s.cmds, Req::DeleteVm(name)).await)
}

/// A cluster route answered from etcd (`crate::cluster::api`); `None` on a single node,
/// or when the cluster leaves the request to this node.
async fn cluster_call(
    s: &ApiState,
    method: &str,
    parts: &[&str],
    body: Option<Value>,
) -> Option<Reply> {
    let c = s.cluster.as_ref()?;
    crate::cluster::api::route(c, method, parts, body.filter(|b| !b.is_null())).await
}

/// A route that exists only in a cluster.
async fn cluster_only(
    State(s): State<ApiState>,
    method: &str,
    rest: Vec<String>,
    body: Option<Value>,
) -> Response {
    let mut parts = vec!["v1", "nodes"];
    parts.extend(rest.iter().map(String::as_str));
    match cluster_call(&s, method, &parts, body).await {
        Some(r) => reply(r),
        None => not_in_cluster(),
    }
}

/// `/v1/cluster/...`.
async fn cluster_path(
    State(s): State<ApiState>,
    method: &str,
    rest: &[&str],
    body: Option<Value>,
) -> Response {
    let mut parts = vec!["v1", "cluster"];
    parts.extend(rest);
    match cluster_call(&s, method, &parts, body).await {
        Some(r) => reply(r),
        None => not_in_cluster(),
    }
}

fn not_in_cluster() -> Response {
    reply(err(
        404,
        "this noded is not in a cluster (start it with --cluster-endpoints)",
    ))
}

async fn start_vm(State(s): State<ApiState>, UrlPath(name): UrlPath<String>) -> Response {
    reply(ask(&s.cmds, Req::StartVm(name)).await)
}

async fn stop_vm(State(s): State<ApiState>, UrlPath(name): UrlPath<String>) -> Response {
    reply(ask(&s.cmds, Req::StopVm(name)).await)
}

async fn migrate_vm(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    JsonBody(b): JsonBody,
) -> Response {
    reply(ask(&s.cmds, Req::MigrateOut(name, b)).await)
}

async fn resolve_handover(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    JsonBody(b): JsonBody,
) -> Response {
    reply(ask(&s.cmds, Req::ResolveHandover(name, b)).await)
}

async fn migrations(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    q: RawQuery,
) -> Response {
    let f = flags_or_reply!(q);
    if f.watch {
        return super::watch::list(s, move || Req::Migrations(name.clone()), "startedAt").await;
    }
    reply(ask(&s.cmds, Req::Migrations(name)).await)
}

async fn events(State(s): State<ApiState>, UrlPath(name): UrlPath<String>) -> Response {
    reply(ask(&s.cmds, Req::Events(name)).await)
}

async fn list_launchers(State(s): State<ApiState>) -> Response {
    reply(ask(&s.cmds, Req::ListLaunchers).await)
}

async fn approve(State(s): State<ApiState>) -> Response {
    reply(ask(&s.cmds, Req::Approve).await)
}

async fn get_config(State(s): State<ApiState>) -> Response {
    reply(ask(&s.cmds, Req::GetConfig).await)
}

async fn set_config(State(s): State<ApiState>, q: RawQuery, JsonBody(b): JsonBody) -> Response {
    let f = flags_or_reply!(q);
    reply(ask(&s.cmds, Req::SetConfig(b, f.dry_run)).await)
}

/// `POST /v1/launchers`: stages and probes the copy outside the loop (it runs a
/// process), then registers it.
async fn install(State(s): State<ApiState>, JsonBody(b): JsonBody) -> Response {
    let i = match install_body(&b) {
        Ok(i) => i,
        Err(r) => return reply(r),
    };
    let src = PathBuf::from(&i.path);
    if !src.is_absolute() {
        return reply(err(
            400,
            format!("path {:?} must be absolute", src.display()),
        ));
    }
    let dir = s.launchers_dir.clone();
    let staged = tokio::task::spawn_blocking(move || {
        super::launchers::stage_copy(&src, &dir, PROBE_TIMEOUT)
    })
    .await;
    reply(match staged {
        Ok(Ok((caps, staged))) => {
            ask(
                &s.cmds,
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
    })
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

/// A streamed body from a channel of chunks (used by watches).
pub(crate) fn stream_body(rx: mpsc::Receiver<Bytes>) -> AxBody {
    AxBody::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }))
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
