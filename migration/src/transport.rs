//! Transports: `unix:PATH` and `tcp:HOST:PORT` URIs, duplex streams,
//! a runtime-adjustable bandwidth limit, and memory fd passing over Unix
//! sockets with `SCM_RIGHTS`.
//!
//! TCP is either TLS with mutual certificates ([`crate::tls`]) or, only when
//! the caller says so explicitly ([`TcpSecurity::Insecure`], the launcher's
//! `--insecure`), plain TCP. [`connect_with`] and [`Listener::bind_with`]
//! refuse a `tcp:` URI when neither was chosen. Unix sockets are unaffected:
//! they are protected by file permissions and peer credentials.

use std::fmt;
use std::fs;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use thiserror::Error;

use crate::tls::{TlsConfig, TlsError, TlsStream};

/// Most fds one message may carry (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS: usize = 64;
const SCM_MAX_FD: usize = 253;

/// Errors of the transport layer.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("invalid migration URI {uri:?}: {reason} (expected unix:PATH or tcp:HOST:PORT)")]
    InvalidUri { uri: String, reason: String },
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: io::Error },
    #[error("cannot listen on {uri}: {source}")]
    Listen { uri: String, source: io::Error },
    #[error("cannot accept on {uri}: {source}")]
    Accept { uri: String, source: io::Error },
    #[error("{uri}: address in use")]
    AddressInUse { uri: String },
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("{0} fds requested, at most {MAX_FDS} per message")]
    TooManyFds(usize),
    #[error("received {got} fds, at most {max} expected (all closed)")]
    UnexpectedFds { got: usize, max: usize },
    #[error("fd passing needs a unix: transport")]
    NotUnix,
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("plain TCP migration ({uri}) is neither authenticated nor encrypted: use --tls-dir DIR (with ca.pem, cert.pem and key.pem) on both sides, or pass --insecure to allow plain TCP")]
    InsecureTcp { uri: String },
}

/// How a `tcp:` URI is secured. Unix sockets ignore it.
#[derive(Debug, Clone, Default)]
pub enum TcpSecurity {
    /// Nothing was chosen: plain TCP is refused with [`TransportError::InsecureTcp`].
    #[default]
    Unset,
    /// Plain TCP, neither authenticated nor encrypted (`--insecure`).
    Insecure,
    /// TLS with mutual certificates. The destination's certificate must name
    /// `server_name`, or the URI's HOST when it is `None`.
    Tls {
        config: Arc<TlsConfig>,
        server_name: Option<String>,
    },
}

/// A migration endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, TransportError> {
        let bad = |reason: &str| TransportError::InvalidUri {
            uri: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            if path.contains('\0') {
                return Err(bad("NUL byte in socket path"));
            }
            return Ok(MigrationUri::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :PORT"))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            if host.contains(':') && !rest.starts_with('[') {
                return Err(bad(
                    "IPv6 addresses must be written in brackets, tcp:[::1]:PORT",
                ));
            }
            let port = port
                .parse::<u16>()
                .map_err(|_| bad(&format!("port {port:?} is not a number in 0..=65535")))?;
            return Ok(MigrationUri::Tcp {
                host: host.to_string(),
                port,
            });
        }
        match s.split_once(':') {
            Some((scheme, _)) => Err(bad(&format!("unknown scheme {scheme:?}"))),
            None => Err(bad("no scheme")),
        }
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// A connected duplex stream.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// TLS over TCP; clones share the session (see [`crate::tls`]).
    Tls(TlsStream),
}

impl Stream {
    /// A second handle on the same connection (e.g. for the return path).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.clone()),
        })
    }

    /// Shuts the connection down; blocked reads and writes on other handles
    /// return (used to cancel).
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(s) => s.shutdown(),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.tcp().set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.tcp().set_write_timeout(t),
        }
    }

    /// The Unix socket, for fd passing.
    pub fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            Stream::Unix(s) => Some(s),
            Stream::Tcp(_) | Stream::Tls(_) => None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to `uri` (TCP with `TCP_NODELAY`), with an optional timeout
/// for TCP connects; `tcp:` is TLS or plain as `security` says, and refused
/// when it says nothing. A TLS handshake completes (or fails, saying why)
/// before this returns.
pub fn connect_with(
    uri: &MigrationUri,
    timeout: Option<Duration>,
    security: &TcpSecurity,
) -> Result<Stream, TransportError> {
    match (uri, security) {
        (MigrationUri::Unix(_), _) | (MigrationUri::Tcp { .. }, TcpSecurity::Insecure) => {
            connect(uri, timeout)
        }
        (MigrationUri::Tcp { .. }, TcpSecurity::Unset) => Err(TransportError::InsecureTcp {
            uri: uri.to_string(),
        }),
        (
            MigrationUri::Tcp { host, .. },
            TcpSecurity::Tls {
                config,
                server_name,
            },
        ) => {
            let Stream::Tcp(sock) = connect(uri, timeout)? else {
                return Err(TransportError::Io(io::Error::other("not a TCP stream")));
            };
            let name = server_name.as_deref().unwrap_or(host);
            Ok(Stream::Tls(config.connect(sock, name)?))
        }
    }
}

/// Connects to `uri` with plain TCP for `tcp:` URIs (no TLS, no check:
/// callers that take user input use [`connect_with`]).
pub fn connect(uri: &MigrationUri, timeout: Option<Duration>) -> Result<Stream, TransportError> {
    let err = |source| TransportError::Connect {
        uri: uri.to_string(),
        source,
    };
    match uri {
        MigrationUri::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).map_err(err)?)),
        MigrationUri::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolves to no address");
            for addr in (host.as_str(), *port).to_socket_addrs().map_err(err)? {
                let res = match timeout {
                    Some(t) => TcpStream::connect_timeout(&addr, t),
                    None => TcpStream::connect(addr),
                };
                match res {
                    Ok(s) => {
                        s.set_nodelay(true).map_err(err)?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(err(last))
        }
    }
}

/// A listening endpoint. A Unix listener removes its socket file on drop.
#[derive(Debug)]
pub enum Listener {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp(TcpListener),
    /// A TCP listener whose connections must complete a TLS handshake.
    Tls {
        listener: TcpListener,
        config: Arc<TlsConfig>,
    },
}

impl Listener {
    /// Binds `uri`; `tcp:` listens for TLS or plain connections as `security`
    /// says, and is refused when it says nothing.
    pub fn bind_with(
        uri: &MigrationUri,
        security: &TcpSecurity,
    ) -> Result<Listener, TransportError> {
        match (uri, security) {
            (MigrationUri::Unix(_), _) | (MigrationUri::Tcp { .. }, TcpSecurity::Insecure) => {
                Listener::bind(uri)
            }
            (MigrationUri::Tcp { .. }, TcpSecurity::Unset) => Err(TransportError::InsecureTcp {
                uri: uri.to_string(),
            }),
            (MigrationUri::Tcp { host, port }, TcpSecurity::Tls { config, .. }) => {
                let listener = TcpListener::bind((host.as_str(), *port)).map_err(|source| {
                    TransportError::Listen {
                        uri: uri.to_string(),
                        source,
                    }
                })?;
                Ok(Listener::Tls {
                    listener,
                    config: config.clone(),
                })
            }
        }
    }

    /// Binds `uri` (plain TCP for `tcp:`; callers that take user input use
    /// [`Listener::bind_with`]). A Unix socket file left by a dead process
    /// (nobody accepts on it) is replaced; a live one, or a file that is not a
    /// socket, is an error.
    pub fn bind(uri: &MigrationUri) -> Result<Listener, TransportError> {
        let err = |source| TransportError::Listen {
            uri: uri.to_string(),
            source,
        };
        match uri {
            MigrationUri::Unix(path) => {
                if let Ok(meta) = fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() || UnixStream::connect(path).is_ok() {
                        return Err(TransportError::AddressInUse {
                            uri: uri.to_string(),
                        });
                    }
                    fs::remove_file(path).map_err(err)?;
                }
                let listener = UnixListener::bind(path).map_err(err)?;
                Ok(Listener::Unix {
                    listener,
                    path: path.clone(),
                })
            }
            MigrationUri::Tcp { host, port } => Ok(Listener::Tcp(
                TcpListener::bind((host.as_str(), *port)).map_err(err)?,
            )),
        }
    }

    /// The bound URI (with the actual port when port 0 was asked for).
    pub fn local_uri(&self) -> Result<MigrationUri, TransportError> {
        match self {
            Listener::Unix { path, .. } => Ok(MigrationUri::Unix(path.clone())),
            Listener::Tcp(l) | Listener::Tls { listener: l, .. } => {
                let a = l.local_addr()?;
                Ok(MigrationUri::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                })
            }
        }
    }

    /// Waits for one connection. On a TLS listener the handshake completes
    /// before this returns; a peer refused in the handshake is a
    /// [`TransportError::Tls`] (the listener stays usable).
    pub fn accept(&self) -> Result<Stream, TransportError> {
        let err = |source| TransportError::Accept {
            uri: self.local_uri().map(|u| u.to_string()).unwrap_or_default(),
            source,
        };
        match self {
            Listener::Unix { listener, .. } => Ok(Stream::Unix(listener.accept().map_err(err)?.0)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Tls { listener, config } => {
                let (s, _) = listener.accept().map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                Ok(Stream::Tls(config.accept(s)?))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = fs::remove_file(path);
        }
    }
}

/// A bandwidth limit shared between the writer and whoever adjusts it.
#[derive(Debug, Default)]
pub struct RateLimit {
    bytes_per_sec: AtomicU64,
    aborted: AtomicBool,
}

impl RateLimit {
    /// `bytes_per_sec` 0 means unlimited.
    pub fn new(bytes_per_sec: u64) -> Arc<Self> {
        Arc::new(RateLimit {
            bytes_per_sec: AtomicU64::new(bytes_per_sec),
            aborted: AtomicBool::new(false),
        })
    }

    pub fn set(&self, bytes_per_sec: u64) {
        self.bytes_per_sec.store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.bytes_per_sec.load(Ordering::Relaxed)
    }

    /// Makes writes that wait for tokens fail at once (cancellation).
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
    }

    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Relaxed)
    }
}

/// Default of [`stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The stall timeout of this process in milliseconds (0: the default).
static STALL_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the stall timeout of this process (`launcher run --migration-stall-timeout-ms`,
/// a hidden option for tests that stall connections on purpose). A zero duration
/// restores the default.
pub fn set_stall_timeout(d: Duration) {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    STALL_TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// How long a migration stream may make no progress at all (the sender's socket
/// accepts no byte, the receiver gets no byte, an answer does not come) before
/// the side that waits gives up: a stalled connection must not hang a launcher,
/// least of all a paused source. [`DEFAULT_STALL_TIMEOUT`] unless the process set
/// another with [`set_stall_timeout`].
pub fn stall_timeout() -> Duration {
    match STALL_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => DEFAULT_STALL_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
}

/// A socket timeout (`EAGAIN` after `SO_SNDTIMEO`/`SO_RCVTIMEO`) as an error that says
/// what happened; other errors unchanged.
pub fn stall_error(e: io::Error, what: &str) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("stalled connection: {what} for {:?}", stall_timeout()),
        ),
        _ => e,
    }
}

/// Longest single sleep, so a lifted limit or an abort is seen quickly.
const MAX_SLEEP: Duration = Duration::from_millis(20);

/// A token-bucket writer: at most the limit's bytes per second, with bursts
/// of up to 50 ms worth of bytes (at least 4 KiB).
pub struct RateLimitedWriter<W> {
    inner: W,
    limit: Arc<RateLimit>,
    tokens: f64,
    last: Instant,
}

impl<W: Write> RateLimitedWriter<W> {
    pub fn new(inner: W, limit: Arc<RateLimit>) -> Self {
        RateLimitedWriter {
            inner,
            limit,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Waits until at least one byte may be written; returns how many
    /// (`usize::MAX` when unlimited).
    fn acquire(&mut self, want: usize) -> io::Result<usize> {
        loop {
            if self.limit.is_aborted() {
                return Err(io::Error::other("migration cancelled"));
            }
            let rate = self.limit.get();
            let now = Instant::now();
            if rate == 0 {
                self.last = now;
                self.tokens = 0.0;
                return Ok(usize::MAX);
            }
            let burst = (rate as f64 * 0.05).max(4096.0);
            let elapsed = now.duration_since(self.last).as_secs_f64();
            self.last = now;
            self.tokens = (self.tokens + elapsed * rate as f64).min(burst);
            if self.tokens >= 1.0 {
                return Ok((self.tokens as usize).min(want).max(1));
            }
            let need = (want as f64).min(burst) - self.tokens;
            let wait = Duration::from_secs_f64(need / rate as f64).min(MAX_SLEEP);
            std::thread::sleep(wait.max(Duration::from_micros(100)));
        }
    }

    fn consume(&mut self, n: usize) {
        if self.limit.get() != 0 {
            self.tokens -= n as f64;
        }
    }
}

impl<W: Write> Write for RateLimitedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.acquire(buf.len())?;
        let written = self
            .inner
            .write(&buf[..n.min(buf.len())])
            .map_err(|e| stall_error(e, "the peer accepted no data"))?;
        self.consume(written);
        Ok(written)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let allowed = self.acquire(total)?;
        let written = if allowed >= total {
            self.inner
                .write_vectored(bufs)
                .map_err(|e| stall_error(e, "the peer accepted no data"))?
        } else {
            let mut left = allowed;
            let mut cut: Vec<IoSlice<'_>> = Vec::new();
            for b in bufs {
                if left == 0 {
                    break;
                }
                let take = b.len().min(left);
                cut.push(IoSlice::new(&b[..take]));
                left -= take;
            }
            self.inner
                .write_vectored(&cut)
                .map_err(|e| stall_error(e, "the peer accepted no data"))?
        };
        self.consume(written);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Sends `bytes` with `fds` attached as `SCM_RIGHTS` to the first byte;
/// the rest of `bytes`, if the first `sendmsg` was short, follows without fds.
pub fn send_fds(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> Result<(), TransportError> {
    if fds.len() > MAX_FDS {
        return Err(TransportError::TooManyFds(fds.len()));
    }
    if bytes.is_empty() {
        return Err(TransportError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "fds need at least one byte of data",
        )));
    }
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = loop {
        match sendmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(TransportError::Io(e.into())),
        }
    };
    let mut s = stream;
    s.write_all(&bytes[sent..])?;
    Ok(())
}

/// Receives up to `buf.len()` bytes and any fds attached to them. More
/// than `max_fds` fds is an error, and all of them are closed.
pub fn recv_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> Result<(usize, Vec<OwnedFd>), TransportError> {
    let mut cmsg_buf = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let (bytes, fds) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<UnixAddr>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                // The buffer holds SCM_MAX_FD fds, so the kernel cannot
                // truncate an SCM_RIGHTS message; a truncation would come
                // from other ancillary data, which we never ask for.
                let cmsgs = msg.cmsgs().map_err(|e| TransportError::Io(e.into()))?;
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel just installed `fd` in this
                            // process for us; nothing else owns it.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                break (msg.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(TransportError::Io(e.into())),
        }
    };
    if fds.len() > max_fds {
        let got = fds.len();
        drop(fds);
        return Err(TransportError::UnexpectedFds { got, max: max_fds });
    }
    Ok((bytes, fds))
}

/// A reader over a Unix socket that collects fds arriving with the data
/// (for the receiver in local mode: read frames as usual through this, and
/// take the fds after decoding `MemoryFds`). At most `max_fds` fds may be
/// pending; beyond that the read fails and the extra fds are closed.
pub struct FdReader {
    stream: UnixStream,
    pending: Vec<OwnedFd>,
    max_fds: usize,
}

impl FdReader {
    pub fn new(stream: UnixStream, max_fds: usize) -> Self {
        FdReader {
            stream,
            pending: Vec::new(),
            max_fds: max_fds.min(MAX_FDS),
        }
    }

    /// Takes the fds received so far.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.pending)
    }

    pub fn pending_fds(&self) -> usize {
        self.pending.len()
    }

    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
    }
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = self.max_fds - self.pending.len();
        match recv_fds(&self.stream, buf, room) {
            Ok((n, fds)) => {
                self.pending.extend(fds);
                Ok(n)
            }
            Err(TransportError::Io(e)) => Err(e),
            Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
