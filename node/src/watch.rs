//! `?watch=true`: the server side of `nodectl ... -w`. The response is a stream of
//! newline-delimited JSON events, as Kubernetes' watch: `{"type": "ADDED" | "MODIFIED" |
//! "DELETED", "object": {...}}`. The first events describe the current state; then one
//! event per change, as it happens.
//!
//! How changes are found: the loop bumps a `watch` channel after every step that may
//! have changed something (a command that writes, a process event, a timer tick); each
//! watcher then asks the loop for the same view as a plain GET and sends what differs
//! from what it sent last. So a watch shows exactly what a GET would, and the client
//! never polls.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{ask, reply, stream_body, ApiState};
use super::requests::{Body, Req};

/// One event line.
fn line(kind: &str, object: &Value) -> Bytes {
    let mut b = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn streaming(rx: mpsc::Receiver<Bytes>) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        )],
        stream_body(rx),
    )
        .into_response()
}

/// What the loop answers now: `Ok(json)` on success, `Err(status)` otherwise.
async fn fetch(s: &ApiState, req: Req) -> Result<Value, crate::requests::Reply> {
    let r = ask(&s.cmds, req).await;
    match r.body {
        Body::Json(v) if (200..300).contains(&r.status) => Ok(v),
        _ => Err(r),
    }
}

/// Waits for the next change; false when the client went away or noded stops.
async fn next_change(s: &mut ApiState, tx: &mpsc::Sender<Bytes>) -> bool {
    tokio::select! {
        r = s.changes.changed() => r.is_ok(),
        _ = tx.closed() => false,
    }
}

/// Watches one object (a VM, the node status): `ADDED` with its state now, `MODIFIED`
/// at each change, `DELETED` when it goes away (and the stream ends).
pub async fn object<F>(mut s: ApiState, req: F) -> Response
where
    F: Fn() -> Req + Send + 'static,
{
    s.changes.borrow_and_update();
    let first = match fetch(&s, req()).await {
        Ok(v) => v,
        Err(r) => return reply(r),
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        if tx.send(line("ADDED", &first)).await.is_err() {
            return;
        }
        let mut last = first;
        while next_change(&mut s, &tx).await {
            match fetch(&s, req()).await {
                Ok(v) if v != last => {
                    if tx.send(line("MODIFIED", &v)).await.is_err() {
                        return;
                    }
                    last = v;
                }
                Ok(_) => {}
                Err(r) if r.status == 404 => {
                    let _ = tx.send(line("DELETED", &last)).await;
                    return;
                }
                Err(_) => return,
            }
        }
    });
    streaming(rx)
}

fn keyed(v: &Value, key: &str) -> BTreeMap<String, Value> {
    v.as_array()
        .map(|a| a.iter().map(|o| (o[key].to_string(), o.clone())).collect())
        .unwrap_or_default()
}

/// Watches a list (VMs, migration records), items told apart by `key`: `ADDED` for each
/// item now, then `ADDED`, `MODIFIED` or `DELETED` per item as it changes.
pub async fn list<F>(mut s: ApiState, req: F, key: &'static str) -> Response
where
    F: Fn() -> Req + Send + 'static,
{
    s.changes.borrow_and_update();
    let first = match fetch(&s, req()).await {
        Ok(v) => keyed(&v, key),
        Err(r) => return reply(r),
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        for o in first.values() {
            if tx.send(line("ADDED", o)).await.is_err() {
                return;
            }
        }
        let mut last = first;
        while next_change(&mut s, &tx).await {
            let now = match fetch(&s, req()).await {
                Ok(v) => keyed(&v, key),
                Err(_) => return,
            };
            for (k, o) in &now {
                let kind = match last.get(k) {
                    None => "ADDED",
                    Some(old) if old != o => "MODIFIED",
                    Some(_) => continue,
                };
                if tx.send(line(kind, o)).await.is_err() {
                    return;
                }
            }
            for (k, o) in &last {
                if !now.contains_key(k) && tx.send(line("DELETED", o)).await.is_err() {
                    return;
                }
            }
            last = now;
        }
    });
    streaming(rx)
}
