//! nodectl's HTTP client for noded's Unix socket (hyper's HTTP/1 client): plain calls
//! with a bounded body, and watch streams read line by line as they arrive.

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::Request;
use serde_json::Value;
use tokio::net::UnixStream;

use contracts::http::MAX_BODY_BYTES;

/// Where noded is, and whether the user chose it (for the error hint).
pub struct Client {
    /// The socket.
    pub socket: PathBuf,
    /// The socket is the built-in default.
    pub from_default: bool,
}

/// Longest a plain call may take (installs run `launcher capabilities`).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest watch event line accepted.
const MAX_LINE: usize = MAX_BODY_BYTES;

impl Client {
    fn unreachable(&self, e: &std::io::Error) -> String {
        format!(
            "cannot reach noded at {} ({e}): is it running? Start it with `noded --state-dir DIR`{}",
            self.socket.display(),
            if self.from_default {
                " and pass --socket DIR/noded.sock (or set NODED_SOCKET)"
            } else {
                ""
            }
        )
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<Incoming>, String> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.unreachable(&e))?;
        let talk = |e: &dyn std::fmt::Display| {
            format!("talking to noded at {}: {e}", self.socket.display())
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| talk(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| talk(&e))?;
        sender.send_request(req).await.map_err(|e| talk(&e))
    }

    /// One request; the JSON answer on 2xx, noded's error message otherwise.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let work = async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading noded's answer: {e}"))?
                .to_bytes();
            let v: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .map_err(|e| format!("noded answered something that is not JSON: {e}"))?
            };
            if status.is_success() {
                Ok(v)
            } else {
                Err(v["error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("noded answered {status}")))
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .map_err(|_| format!("noded did not answer {method} {path} within {CALL_TIMEOUT:?}"))?
    }

    /// Opens a `GET ...?watch=true` stream; read its events with [`Watch::next`].
    pub async fn open_watch(&self, path: &str) -> Result<Watch, String> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let resp = self
            .send("GET", &format!("{path}{sep}watch=true"), None)
            .await?;
        let status = resp.status();
        let body = resp.into_body();
        if !status.is_success() {
            let bytes = Limited::new(body, MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading noded's answer: {e}"))?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("noded answered {status}")));
        }
        Ok(Watch {
            body,
            buf: Vec::new(),
        })
    }

    /// Calls `on_event` with each event of a watch (`{"type", "object"}`) as it
    /// arrives, until the stream ends or `on_event` returns false.
    pub async fn watch(
        &self,
        path: &str,
        mut on_event: impl FnMut(Value) -> Result<bool, String>,
    ) -> Result<(), String> {
        let mut w = self.open_watch(path).await?;
        while let Some(ev) = w.next().await? {
            if !on_event(ev)? {
                break;
            }
        }
        Ok(())
    }
}

/// An open watch stream.
pub struct Watch {
    body: Incoming,
    buf: Vec<u8>,
}

impl Watch {
    /// The next event, or `None` when noded ended the stream.
    pub async fn next(&mut self) -> Result<Option<Value>, String> {
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|e| format!("noded sent a watch event that is not JSON: {e}"));
            }
            if self.buf.len() > MAX_LINE {
                return Err(format!("watch event longer than {MAX_LINE} bytes"));
            }
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|e| format!("watch stream broke: {e}"))?;
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }
}
