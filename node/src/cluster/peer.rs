//! The peer check of self-fencing (docs/cluster.md, "Node failure"): a node that cannot
//! renew its etcd lease asks its peers, directly over the migration network and with
//! the same mutual-TLS identities as migrations, "do you reach etcd, and how long has my
//! lease left there?". The answers decide whether this node is the one cut off (it
//! fences itself) or the control plane is down (its VMs keep running): see
//! [`super::fence::decide`].
//!
//! One exchange per TLS connection, on the node's migration address (its first port;
//! incoming migrations take the ports after it):
//!
//! ```text
//! server → client   Hello  { node }
//! client → server   Ask    { node, lease }
//! server → client   Answer { node, reachesEtcd, leaseTtl }
//! ```
//!
//! Every message is one frame: magic `LVPEER`, version (u16), payload length (u32,
//! at most [`MAX_PAYLOAD`]), CRC-32 of the payload (u32), then the payload (JSON). A
//! receiver refuses a frame with another magic or version, a length over the bound, a
//! CRC mismatch or an undecodable payload, and answers nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use migration::tls::TlsConfig;
use serde::{Deserialize, Serialize};

/// Frame magic.
pub const MAGIC: &[u8; 6] = b"LVPEER";
/// Protocol version.
pub const VERSION: u16 = 1;
/// Payload bound.
pub const MAX_PAYLOAD: usize = 4096;
const HEADER: usize = 6 + 2 + 4 + 4;

/// How long one whole exchange may take (TCP connect, TLS, the etcd call on the peer).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_millis(1200);

/// Errors of the peer check.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A frame that is not ours or is damaged.
    #[error("peer frame refused: {0}")]
    Frame(String),
    /// Network or TLS.
    #[error("peer {peer}: {error}")]
    Io {
        /// Peer address.
        peer: String,
        /// What failed.
        error: String,
    },
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum Message {
    /// The server speaks first (the TLS client learns of a refused certificate from it).
    Hello {
        /// Server's node name.
        node: String,
    },
    /// The question.
    #[serde(rename_all = "camelCase")]
    Ask {
        /// The asking node.
        node: String,
        /// Its lease id in etcd.
        lease: i64,
    },
    /// The answer.
    #[serde(rename_all = "camelCase")]
    Answer {
        /// The answering node.
        node: String,
        /// The peer completed an etcd call just now.
        reaches_etcd: bool,
        /// Seconds left on the asker's lease, as etcd says (`-1`: no such lease, it
        /// expired); `None` when etcd was not reached.
        lease_ttl: Option<i64>,
    },
}

/// Encodes one frame.
pub fn encode(m: &Message) -> Result<Vec<u8>, PeerError> {
    let payload = serde_json::to_vec(m).map_err(|e| PeerError::Frame(e.to_string()))?;
    if payload.len() > MAX_PAYLOAD {
        return Err(PeerError::Frame(format!(
            "payload of {} bytes is over {MAX_PAYLOAD}",
            payload.len()
        )));
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks a frame header; returns the payload length and CRC.
fn check_header(h: &[u8; HEADER]) -> Result<(usize, u32), PeerError> {
    if &h[..6] != MAGIC {
        return Err(PeerError::Frame(
            "bad magic (not a peer-check frame)".into(),
        ));
    }
    let version = u16::from_le_bytes([h[6], h[7]]);
    if version != VERSION {
        return Err(PeerError::Frame(format!(
            "version {version}, this node speaks {VERSION}"
        )));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(PeerError::Frame(format!(
            "length {len} is over {MAX_PAYLOAD}"
        )));
    }
    Ok((len, u32::from_le_bytes([h[12], h[13], h[14], h[15]])))
}

/// Decodes one frame from a complete buffer (header and payload).
pub fn decode(buf: &[u8]) -> Result<Message, PeerError> {
    let h: &[u8; HEADER] = buf
        .get(..HEADER)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| PeerError::Frame("truncated header".into()))?;
    let (len, crc) = check_header(h)?;
    let payload = buf
        .get(HEADER..HEADER + len)
        .ok_or_else(|| PeerError::Frame("truncated payload".into()))?;
    if buf.len() != HEADER + len {
        return Err(PeerError::Frame("trailing bytes after the payload".into()));
    }
    decode_payload(payload, crc)
}

fn decode_payload(payload: &[u8], crc: u32) -> Result<Message, PeerError> {
    if crc32fast::hash(payload) != crc {
        return Err(PeerError::Frame("CRC mismatch".into()));
    }
    serde_json::from_slice(payload).map_err(|e| PeerError::Frame(format!("bad payload: {e}")))
}

/// Reads one frame from a stream.
pub fn read_message(r: &mut impl Read) -> Result<Message, PeerError> {
    let io = |e: std::io::Error| PeerError::Frame(format!("read: {e}"));
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h).map_err(io)?;
    let (len, crc) = check_header(&h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(io)?;
    decode_payload(&payload, crc)
}

/// Writes one frame.
pub fn write_message(w: &mut impl Write, m: &Message) -> Result<(), PeerError> {
    let bytes = encode(m)?;
    w.write_all(&bytes)
        .and_then(|_| w.flush())
        .map_err(|e| PeerError::Frame(format!("write: {e}")))
}

/// The answer a peer gives: `(reaches_etcd, lease_ttl)`.
pub type Verdict = (bool, Option<i64>);

/// Serves the peer check on `listener` (a thread per connection; each exchange is
/// bounded by socket timeouts). `answer` asks etcd about a lease.
pub fn serve(
    listener: TcpListener,
    tls: Arc<TlsConfig>,
    node: String,
    answer: Arc<dyn Fn(i64) -> Verdict + Send + Sync>,
) {
    for conn in listener.incoming() {
        let Ok(sock) = conn else {
            continue;
        };
        let (tls, node, answer) = (tls.clone(), node.clone(), answer.clone());
        std::thread::spawn(move || {
            if let Err(e) = serve_one(sock, &tls, &node, answer.as_ref()) {
                tracing::debug!(error = %e, "peer check from a peer failed");
            }
        });
    }
}

fn serve_one(
    sock: TcpStream,
    tls: &TlsConfig,
    node: &str,
    answer: &(dyn Fn(i64) -> Verdict + Send + Sync),
) -> Result<(), PeerError> {
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let io = |error: String| PeerError::Io {
        peer: peer.clone(),
        error,
    };
    let _ = sock.set_read_timeout(Some(EXCHANGE_TIMEOUT));
    let _ = sock.set_write_timeout(Some(EXCHANGE_TIMEOUT));
    let mut s = tls.accept(sock).map_err(|e| io(e.to_string()))?;
    write_message(
        &mut s,
        &Message::Hello {
            node: node.to_string(),
        },
    )?;
    let Message::Ask { node: asker, lease } = read_message(&mut s)? else {
        return Err(PeerError::Frame("expected Ask".into()));
    };
    let (reaches_etcd, lease_ttl) = answer(lease);
    tracing::info!(asker = %asker, reaches_etcd, lease_ttl = ?lease_ttl, "answered a peer check");
    write_message(
        &mut s,
        &Message::Answer {
            node: node.to_string(),
            reaches_etcd,
            lease_ttl,
        },
    )?;
    let _ = s.shutdown();
    Ok(())
}

/// Asks one peer (blocking; call from a blocking thread).
pub fn ask(
    tls: &TlsConfig,
    addr: SocketAddr,
    me: &str,
    lease: i64,
) -> Result<(String, Verdict), PeerError> {
    let io = |error: String| PeerError::Io {
        peer: addr.to_string(),
        error,
    };
    let sock =
        TcpStream::connect_timeout(&addr, EXCHANGE_TIMEOUT).map_err(|e| io(e.to_string()))?;
    let _ = sock.set_read_timeout(Some(EXCHANGE_TIMEOUT));
    let _ = sock.set_write_timeout(Some(EXCHANGE_TIMEOUT));
    let mut s = tls
        .connect(sock, &addr.ip().to_string())
        .map_err(|e| io(e.to_string()))?;
    let Message::Hello { .. } = read_message(&mut s)? else {
        return Err(PeerError::Frame("expected Hello".into()));
    };
    write_message(
        &mut s,
        &Message::Ask {
            node: me.to_string(),
            lease,
        },
    )?;
    match read_message(&mut s)? {
        Message::Answer {
            node,
            reaches_etcd,
            lease_ttl,
        } => Ok((node, (reaches_etcd, lease_ttl))),
        _ => Err(PeerError::Frame("expected Answer".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Message {
        Message::Answer {
            node: "b".into(),
            reaches_etcd: true,
            lease_ttl: Some(-1),
        }
    }

    #[test]
    fn frames_roundtrip() {
        for m in [
            Message::Hello { node: "a".into() },
            Message::Ask {
                node: "a".into(),
                lease: 7,
            },
            answer(),
        ] {
            assert_eq!(decode(&encode(&m).unwrap()).unwrap(), m);
            let bytes = encode(&m).unwrap();
            assert_eq!(read_message(&mut bytes.as_slice()).unwrap(), m);
        }
    }

    #[test]
    fn damaged_frames_are_refused_never_guessed() {
        let good = encode(&answer()).unwrap();
        let refused = |b: &[u8], what: &str| {
            let e = decode(b).unwrap_err().to_string();
            assert!(e.contains(what), "{e} should say {what}");
        };
        let mut b = good.clone();
        b[0] = b'X';
        refused(&b, "bad magic");
        let mut b = good.clone();
        b[6] = 2;
        refused(&b, "version 2");
        let mut b = good.clone();
        b[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        refused(&b, "over");
        let mut b = good.clone();
        let last = b.len() - 1;
        b[last] ^= 1;
        refused(&b, "CRC");
        refused(&good[..good.len() - 1], "truncated");
        refused(&good[..5], "truncated");
        let mut b = good.clone();
        b.push(0);
        refused(&b, "trailing");
        // A well-framed payload that is not a message.
        let payload = br#"{"kind":"answer","node":"b","extra":1}"#;
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        b.extend_from_slice(payload);
        refused(&b, "bad payload");
    }

    #[test]
    fn oversized_messages_are_not_sent() {
        let m = Message::Hello {
            node: "x".repeat(MAX_PAYLOAD),
        };
        assert!(encode(&m).is_err());
    }
}
