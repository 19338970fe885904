//! A frame-aware man-in-the-middle proxy between two launchers, for fault injection.
//!
//! It accepts one migration connection on a Unix socket, connects to the receiver, and
//! pumps each direction on its own thread: the preamble, then whole frames (header and
//! payload, `migration::frame` layout). Every unit is handed to that direction's fault
//! callback before it is forwarded, so a test acts at exact protocol points (the state
//! frame, `Go`, `Ready`, the n-th memory frame) instead of at guessed times; the
//! launchers have no fault-injection hooks. The callback decides with a [`Verdict`] and
//! may act on the connection itself through the [`Link`] (write a prefix, end one way,
//! close both, stall, kill a process), keeping whatever state it needs between frames.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::frame::{self, FrameType, HEADER_LEN};
use migration::protocol::{ReceiverMessage, SenderMessage, PREAMBLE_LEN};

use crate::{path_str, SAFETY};

/// One unit of a direction's stream, as the callback sees it.
pub struct Frame {
    /// `None` for the preamble, else the frame type.
    pub ty: Option<u16>,
    /// Offset of the first byte in this direction's stream (the preamble starts at 0).
    pub offset: u64,
    /// The bytes to forward (header and payload, or the preamble); may be changed.
    pub bytes: Vec<u8>,
}

impl Frame {
    /// True for a frame of type `t`.
    pub fn is(&self, t: FrameType) -> bool {
        self.ty == Some(t as u16)
    }

    /// The sender's control message in this frame, if it is one.
    pub fn sender_msg(&self) -> Option<SenderMessage> {
        self.payload_if_control()
            .and_then(|p| frame::decode_control(p).ok())
    }

    /// The receiver's control message in this frame, if it is one.
    pub fn receiver_msg(&self) -> Option<ReceiverMessage> {
        self.payload_if_control()
            .and_then(|p| frame::decode_control(p).ok())
    }

    fn payload_if_control(&self) -> Option<&[u8]> {
        self.is(FrameType::Control)
            .then(|| &self.bytes[HEADER_LEN..])
    }
}

/// What the pump does after the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward `Frame::bytes` (as the callback left them) and go on.
    Forward,
    /// Forward nothing; the callback dealt with this frame. Go on with the next one.
    Handled,
    /// Stop this direction and close both connections (unless stalled).
    Stop,
}

#[derive(Clone)]
struct Ends {
    src: Arc<UnixStream>,
    dst: Arc<UnixStream>,
    stalled: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Ends {
    fn close(&self) {
        let _ = self.src.shutdown(std::net::Shutdown::Both);
        let _ = self.dst.shutdown(std::net::Shutdown::Both);
    }
}

/// The connection as one direction's callback can act on it.
pub struct Link<'a> {
    ends: &'a Ends,
    /// True for sender → receiver.
    forward: bool,
}

impl Link<'_> {
    /// Write `bytes` towards this direction's reader; false if that failed.
    pub fn write(&self, bytes: &[u8]) -> bool {
        let mut w = if self.forward {
            &*self.ends.dst
        } else {
            &*self.ends.src
        };
        w.write_all(bytes).is_ok()
    }

    /// End this direction towards its reader (it sees end of stream; the other
    /// direction still flows).
    pub fn end_way(&self) {
        let w = if self.forward {
            &self.ends.dst
        } else {
            &self.ends.src
        };
        let _ = w.shutdown(std::net::Shutdown::Write);
    }

    /// Close both connections.
    pub fn close(&self) {
        self.ends.close();
    }

    /// Forward nothing more either way, sockets kept open, until the proxy is dropped
    /// (or the safety deadline); then close both.
    pub fn stall(&self) {
        self.ends.stalled.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + SAFETY;
        while !self.ends.release.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.ends.close();
    }

    /// Record what happened, for failure messages ([`Proxy::log`]).
    pub fn note(&self, s: impl Into<String>) {
        self.ends.log.lock().unwrap().push(s.into());
    }
}

/// A direction's fault callback.
pub type Callback = Box<dyn FnMut(&mut Frame, &Link) -> Verdict + Send>;

/// The proxy; dropping it releases a stall, joins its threads and removes the socket.
pub struct Proxy {
    path: PathBuf,
    release: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    /// Listen on `path`; forward one connection to the Unix socket `to`, passing the
    /// sender → receiver units to `forward` and the receiver → sender units to `back`.
    pub fn start(path: PathBuf, to: PathBuf, forward: Callback, back: Callback) -> Proxy {
        let listener = UnixListener::bind(&path).expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let release = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (rel, lg) = (release.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + SAFETY;
            let src = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if !rel.load(Ordering::SeqCst) && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => return,
                }
            };
            src.set_nonblocking(false).expect("blocking");
            let Ok(dst) = UnixStream::connect(&to) else {
                lg.lock()
                    .unwrap()
                    .push("cannot connect to the receiver".into());
                return;
            };
            let ends = Ends {
                src: Arc::new(src),
                dst: Arc::new(dst),
                stalled: Arc::new(AtomicBool::new(false)),
                release: rel,
                log: lg,
            };
            let e1 = ends.clone();
            let fwd = std::thread::spawn(move || pump(&e1, true, forward));
            pump(&ends, false, back);
            let _ = fwd.join();
            ends.close();
        });
        Proxy {
            path,
            release,
            thread: Some(thread),
            log,
        }
    }

    /// The `unix:` URI a sender migrates to.
    pub fn uri(&self) -> String {
        format!("unix:{}", path_str(&self.path))
    }

    /// What the callbacks noted so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.release.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Read the next unit of a direction: the preamble first, then whole frames.
fn read_unit(r: &mut &UnixStream, first: bool, offset: u64) -> Option<Frame> {
    if first {
        let mut bytes = vec![0u8; PREAMBLE_LEN];
        r.read_exact(&mut bytes).ok()?;
        return Some(Frame {
            ty: None,
            offset,
            bytes,
        });
    }
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    let ty = u16::from_le_bytes([h[4], h[5]]);
    let mut bytes = Vec::with_capacity(HEADER_LEN + len);
    bytes.extend_from_slice(&h);
    bytes.resize(HEADER_LEN + len, 0);
    r.read_exact(&mut bytes[HEADER_LEN..]).ok()?;
    Some(Frame {
        ty: Some(ty),
        offset,
        bytes,
    })
}

fn pump(ends: &Ends, forward: bool, mut cb: Callback) {
    let mut r = if forward { &*ends.src } else { &*ends.dst };
    let link = Link { ends, forward };
    let mut offset = 0u64;
    let mut first = true;
    while let Some(mut f) = read_unit(&mut r, first, offset) {
        first = false;
        offset += f.bytes.len() as u64;
        if ends.stalled.load(Ordering::SeqCst) {
            return;
        }
        match cb(&mut f, &link) {
            Verdict::Forward if link.write(&f.bytes) => {}
            Verdict::Handled => {}
            Verdict::Forward | Verdict::Stop => break,
        }
    }
    if !ends.stalled.load(Ordering::SeqCst) {
        ends.close();
    }
}
