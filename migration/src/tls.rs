//! TLS for TCP migration: rustls (ring provider, TLS 1.3 only), mutual
//! certificates given as files in one directory, as Cloud Hypervisor's
//! `tls_dir`:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the CA certificate(s) both sides trust |
//! | `cert.pem` | this side's certificate (chain), signed by that CA |
//! | `key.pem` | this side's private key (PKCS#8, PKCS#1 or SEC1) |
//!
//! Both sides use the same directory layout and the same [`TlsConfig`]: the
//! destination is the TLS server and requires a client certificate that
//! chains to `ca.pem` (no name is checked on the client certificate: holding
//! a certificate of the migration CA is the authorisation, as in Cloud
//! Hypervisor); the source is the TLS client and checks that the
//! destination's certificate chains to `ca.pem` and names the server name
//! (the URI's HOST, or `--tls-server-name`).
//!
//! # Refused before any frame is read
//!
//! The handshake runs to completion inside `transport::connect_with` and
//! `Listener::accept`, before a [`Stream`](crate::transport::Stream) exists,
//! so the frame parser never sees a byte from an unauthenticated peer. A
//! failed handshake is a [`TlsError::Handshake`] whose text says what was
//! wrong: no certificate, unknown CA, expired, name mismatch, or, on the side
//! that was refused, which alert the peer sent. In TLS 1.3 the client learns
//! that the server refused its certificate only from the server's next
//! record, so the client also waits (bounded by the handshake timeout) for
//! the first application bytes: the receiver always speaks first (its
//! preamble), so a refusal is reported by `connect` itself, not later as a
//! broken stream.
//!
//! # Duplex use by two threads
//!
//! The sender writes frames on one thread while a return-path thread reads
//! the receiver's answers from a clone of the same stream. A
//! `rustls::StreamOwned` behind one mutex would deadlock: a reader blocked in
//! `read(2)` while holding the lock would stop every write. [`TlsStream`]
//! therefore splits the work:
//!
//! - the rustls `Connection` (pure state: keys, buffers) sits behind a mutex
//!   that is held **only for in-memory work**, never across a socket call;
//! - a reader reads ciphertext from the socket *without* the lock, then takes
//!   it to decrypt;
//! - a writer takes a separate write lock (which orders the records on the
//!   wire), encrypts under the connection lock, releases it, and only then
//!   writes the ciphertext to the socket;
//! - the reader never writes to the socket (a write could block on a peer
//!   that is itself blocked writing to us). Records that reading produces
//!   (a TLS 1.3 key-update answer, an alert) are sent by the next write or by
//!   [`TlsStream::shutdown`].
//!
//! So a read blocked on the socket cannot hold up a write, and a write
//! blocked on a full socket buffer cannot hold up a read. At most one handle
//! should read at a time (a second reader waits for the first); that is how
//! the sender and the receiver use their streams.
//!
//! Socket timeouts (`set_read_timeout`, `set_write_timeout`) and
//! `shutdown` act on the shared TCP socket, as for plain TCP. A peer that
//! closes the TCP connection without a TLS `close_notify` reads as a plain
//! end of stream: the migration protocol never relies on an end of stream
//! (every exchange ends with an explicit message), and the frame layer
//! reports a cut mid-frame as a truncated stream.

use std::fmt;
use std::fs;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore,
    ServerConfig, ServerConnection,
};
use thiserror::Error;
use vmm::sync::lock;

/// The CA file in a TLS directory.
pub const CA_FILE: &str = "ca.pem";
/// This side's certificate (chain) in a TLS directory.
pub const CERT_FILE: &str = "cert.pem";
/// This side's private key in a TLS directory.
pub const KEY_FILE: &str = "key.pem";

/// How long a TLS handshake may take (both sides), so that a peer that
/// connects and says nothing cannot hold a listener or a sender forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Size of the ciphertext read buffer (a bit more than one TLS record).
const READ_BUF: usize = 32 << 10;
/// Plaintext rustls may buffer before we flush it to the socket.
const SEND_BUFFER_LIMIT: usize = 1 << 20;

/// Errors of the TLS layer.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file of the TLS directory cannot be read.
    #[error("TLS directory {dir}: cannot read {file}: {source} (a TLS directory holds ca.pem, cert.pem and key.pem)")]
    Read {
        dir: String,
        file: &'static str,
        source: io::Error,
    },
    /// A file holds no usable PEM object of the kind needed.
    #[error("TLS directory {dir}: {file}: {what}")]
    Pem {
        dir: String,
        file: &'static str,
        what: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS directory {dir}: {what}")]
    Config { dir: String, what: String },
    /// The server name to verify is not a DNS name or an IP address.
    #[error("invalid TLS server name {0:?}: use a DNS name or an IP address")]
    ServerName(String),
    /// The handshake failed; `reason` says why, for a user.
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
}

/// The loaded contents of a TLS directory: a client and a server configuration.
pub struct TlsConfig {
    dir: PathBuf,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("dir", &self.dir).finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsConfig {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir` and builds both
    /// configurations (so that a bad directory is reported at start-up, not
    /// at the first connection).
    pub fn load(dir: &Path) -> Result<Arc<TlsConfig>, TlsError> {
        let d = dir.display().to_string();
        let read = |file: &'static str| {
            fs::read(dir.join(file)).map_err(|source| TlsError::Read {
                dir: d.clone(),
                file,
                source,
            })
        };
        let pem = |file: &'static str, what: String| TlsError::Pem {
            dir: d.clone(),
            file,
            what,
        };
        let certs = |file: &'static str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let bytes = read(file)?;
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem(file, format!("invalid PEM: {e}")))?;
            if certs.is_empty() {
                return Err(pem(file, "holds no CERTIFICATE".into()));
            }
            Ok(certs)
        };
        let ca = certs(CA_FILE)?;
        let chain = certs(CERT_FILE)?;
        let key_bytes = read(KEY_FILE)?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
            pem(
                KEY_FILE,
                format!("holds no usable private key (PKCS#8, PKCS#1 or SEC1): {e}"),
            )
        })?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .map_err(|e| pem(CA_FILE, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let config = |what: &str, e: rustls::Error| TlsError::Config {
            dir: d.clone(),
            what: format!("{what}: {e}"),
        };
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Config {
                    dir: d.clone(),
                    what: format!("server certificate verifier: {e}"),
                })?;
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Config {
                dir: d.clone(),
                what: format!("client certificate verifier: {e}"),
            })?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config("TLS 1.3", e))?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| config("cert.pem and key.pem do not go together", e))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config("TLS 1.3", e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain, key)
            .map_err(|e| config("cert.pem and key.pem do not go together", e))?;
        Ok(Arc::new(TlsConfig {
            dir: dir.to_path_buf(),
            client: Arc::new(client),
            server: Arc::new(server),
        }))
    }

    /// The directory the files came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs the client side of the handshake on a connected socket; `server_name`
    /// is the name the server's certificate must carry (a DNS name or an IP address).
    pub fn connect(&self, sock: TcpStream, server_name: &str) -> Result<TlsStream, TlsError> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        let peer = peer_name(&sock);
        let conn =
            ClientConnection::new(self.client.clone(), name).map_err(|e| TlsError::Handshake {
                peer: peer.clone(),
                reason: e.to_string(),
            })?;
        self.finish(
            sock,
            Connection::Client(conn),
            Side::Client {
                server_name: server_name.to_string(),
            },
        )
    }

    /// Runs the server side of the handshake on an accepted socket.
    pub fn accept(&self, sock: TcpStream) -> Result<TlsStream, TlsError> {
        let conn = ServerConnection::new(self.server.clone()).map_err(|e| TlsError::Handshake {
            peer: peer_name(&sock),
            reason: e.to_string(),
        })?;
        self.finish(sock, Connection::Server(conn), Side::Server)
    }

    fn finish(
        &self,
        mut sock: TcpStream,
        mut conn: Connection,
        side: Side,
    ) -> Result<TlsStream, TlsError> {
        let peer = peer_name(&sock);
        let fail = |reason: String| TlsError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let io_fail = |e: io::Error| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                fail(format!(
                    "the peer did not complete the handshake within {HANDSHAKE_TIMEOUT:?}"
                ))
            } else {
                fail(format!("i/o error: {e}"))
            }
        };
        let old_read = sock.read_timeout().map_err(io_fail)?;
        let old_write = sock.write_timeout().map_err(io_fail)?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        let mut pending: Vec<u8> = Vec::new();
        let res = handshake(&mut sock, &mut conn, &side, deadline, &mut pending);
        match res {
            Ok(()) => {}
            Err(Failure::Io(e)) => return Err(io_fail(e)),
            Err(Failure::Eof) => {
                return Err(fail(match side {
                    Side::Client { .. } => "the destination closed the connection during the handshake (it may have refused our certificate, or it is not a TLS listener: check --tls-dir on both sides)".into(),
                    Side::Server => "the source closed the connection during the handshake (it may have refused our certificate, or it does not speak TLS: check --tls-dir on both sides)".into(),
                }))
            }
            Err(Failure::Tls(e)) => return Err(fail(describe(&e, &side, &self.dir))),
        }
        sock.set_read_timeout(old_read).map_err(io_fail)?;
        sock.set_write_timeout(old_write).map_err(io_fail)?;
        Ok(TlsStream {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                sock,
                writer: Mutex::new(Vec::new()),
                reader: Mutex::new(ReadState {
                    buf: pending,
                    start: 0,
                    eof: false,
                }),
            }),
        })
    }
}

/// Which side of the handshake we are (for error messages).
enum Side {
    Client { server_name: String },
    Server,
}

enum Failure {
    Io(io::Error),
    Eof,
    Tls(rustls::Error),
}

fn remaining(deadline: Instant) -> Result<Duration, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Failure::Io(io::ErrorKind::TimedOut.into()));
    }
    Ok(left)
}

/// Drives the handshake to the end. The client then also waits for the
/// first application bytes (the receiver's preamble), because in TLS 1.3 a
/// refusal of the client's certificate arrives only after the client
/// considers the handshake done. Ciphertext read beyond what rustls took is
/// left in `pending`.
fn handshake(
    sock: &mut TcpStream,
    conn: &mut Connection,
    side: &Side,
    deadline: Instant,
    pending: &mut Vec<u8>,
) -> Result<(), Failure> {
    let flush = |sock: &mut TcpStream, conn: &mut Connection| -> Result<(), Failure> {
        while conn.wants_write() {
            sock.set_write_timeout(Some(remaining(deadline)?))
                .map_err(Failure::Io)?;
            conn.write_tls(sock).map_err(Failure::Io)?;
        }
        Ok(())
    };
    let mut buf = vec![0u8; READ_BUF];
    loop {
        flush(sock, conn)?;
        let done = !conn.is_handshaking();
        let have_data = match conn.process_new_packets() {
            Ok(st) => st.plaintext_bytes_to_read() > 0,
            Err(e) => {
                // Tell the peer why (an alert), best effort.
                let _ = flush(sock, conn);
                return Err(Failure::Tls(e));
            }
        };
        let need_first_bytes = matches!(side, Side::Client { .. });
        if done && (!need_first_bytes || have_data) {
            return Ok(());
        }
        sock.set_read_timeout(Some(remaining(deadline)?))
            .map_err(Failure::Io)?;
        let n = loop {
            match sock.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io(e)),
            }
        };
        if n == 0 {
            return Err(Failure::Eof);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match conn.read_tls(&mut rest) {
                Ok(_) => {}
                // The plaintext buffer is full (the receiver wrote a lot at once):
                // keep the rest for the stream.
                Err(_) => break,
            }
            if let Err(e) = conn.process_new_packets() {
                let _ = flush(sock, conn);
                return Err(Failure::Tls(e));
            }
        }
        pending.extend_from_slice(rest);
        if !pending.is_empty() && !conn.is_handshaking() {
            // Plaintext is waiting (the buffer filled up): the handshake is over.
            flush(sock, conn)?;
            return Ok(());
        }
    }
}

/// A user-facing sentence for a handshake failure.
fn describe(e: &rustls::Error, side: &Side, dir: &Path) -> String {
    let ca = dir.join(CA_FILE);
    let ca = ca.display();
    let peer = match side {
        Side::Client { .. } => "the destination",
        Side::Server => "the source",
    };
    match e {
        rustls::Error::NoCertificatesPresented => {
            format!("{peer} presented no certificate (a client certificate is required: pass --tls-dir on both sides)")
        }
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "{peer}'s certificate is not signed by the CA in {ca} (unknown CA)"
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("{peer}'s certificate has expired")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("{peer}'s certificate is not valid yet")
            }
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => format!(
                "{peer}'s certificate is not valid for the name {} (name mismatch: it is for {}; use --tls-server-name to verify another name)",
                expected.to_str(),
                if presented.is_empty() {
                    "no name".to_string()
                } else {
                    presented
                        .iter()
                        .map(|p| bare_name(p))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ),
            CertificateError::NotValidForName => {
                let name = match side {
                    Side::Client { server_name } => server_name.as_str(),
                    Side::Server => "?",
                };
                format!("{peer}'s certificate is not valid for the name {name} (name mismatch; use --tls-server-name to verify another name)")
            }
            CertificateError::Revoked => format!("{peer}'s certificate is revoked"),
            CertificateError::BadSignature => {
                format!("{peer}'s certificate has a bad signature")
            }
            other => format!("{peer}'s certificate is invalid: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => {
            let why = match alert {
                AlertDescription::CertificateRequired => {
                    "it requires a certificate and we presented none".to_string()
                }
                AlertDescription::UnknownCA => {
                    "it does not trust our certificate (unknown CA: our cert.pem is not signed by its ca.pem)".to_string()
                }
                AlertDescription::CertificateExpired => {
                    "it says our certificate has expired".to_string()
                }
                AlertDescription::BadCertificate => {
                    "it refused our certificate (bad certificate, e.g. a name mismatch)".to_string()
                }
                AlertDescription::DecryptError => {
                    "the handshake signatures do not verify (decrypt error: does key.pem match cert.pem?)".to_string()
                }
                other => format!("it sent the alert {other:?}"),
            };
            format!("{peer} refused the connection: {why}")
        }
        other => format!("{other}"),
    }
}

/// `DnsName("a.example")` (how rustls lists presented names) as `a.example`.
fn bare_name(presented: &str) -> &str {
    match (presented.find('"'), presented.rfind('"')) {
        (Some(a), Some(b)) if b > a => &presented[a + 1..b],
        _ => presented,
    }
}

fn peer_name(sock: &TcpStream) -> String {
    sock.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "the peer".into())
}

/// Ciphertext read from the socket but not yet handed to rustls.
struct ReadState {
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

struct Shared {
    /// rustls state; held only for in-memory work, never across a socket call.
    conn: Mutex<Connection>,
    sock: TcpStream,
    /// Orders records on the wire: held from encrypting to the end of the socket
    /// write. Holds the outgoing ciphertext buffer.
    writer: Mutex<Vec<u8>>,
    /// Serializes readers; holds the incoming ciphertext not yet given to rustls.
    reader: Mutex<ReadState>,
}

fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// A TLS stream over TCP that one thread may read while another writes;
/// clones share the connection (see the module documentation).
#[derive(Clone)]
pub struct TlsStream {
    shared: Arc<Shared>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("sock", &self.shared.sock)
            .finish()
    }
}

impl TlsStream {
    /// The TCP socket (for timeouts and addresses).
    pub fn tcp(&self) -> &TcpStream {
        &self.shared.sock
    }

    /// Sends `close_notify` if no write is in progress, then shuts the socket
    /// down both ways: blocked reads and writes on other handles return.
    pub fn shutdown(&self) -> io::Result<()> {
        if let Ok(mut out) = self.shared.writer.try_lock() {
            out.clear();
            {
                let mut c = lock(&self.shared.conn);
                c.send_close_notify();
                while c.wants_write() {
                    if c.write_tls(&mut *out).is_err() {
                        break;
                    }
                }
            }
            // Best effort, and never long: the socket may be full or gone.
            let old = self.shared.sock.write_timeout().ok().flatten();
            let _ = self
                .shared
                .sock
                .set_write_timeout(Some(Duration::from_millis(100)));
            let _ = (&self.shared.sock).write_all(&out);
            let _ = self.shared.sock.set_write_timeout(old);
            out.clear();
        }
        self.shared.sock.shutdown(Shutdown::Both)
    }

    /// Encrypts with `f` (which feeds plaintext to rustls and returns how much
    /// it took) and writes the resulting records.
    fn write_with(
        &self,
        mut f: impl FnMut(&mut Connection) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut out = lock(&self.shared.writer);
        loop {
            out.clear();
            let n = {
                let mut c = lock(&self.shared.conn);
                let n = f(&mut c)?;
                while c.wants_write() {
                    c.write_tls(&mut *out)?;
                }
                n
            };
            (&self.shared.sock).write_all(&out)?;
            out.clear();
            if n > 0 {
                return Ok(n);
            }
            // rustls took nothing because its buffer was full; it is flushed now.
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut rs = lock(&self.shared.reader);
        loop {
            {
                let mut c = lock(&self.shared.conn);
                match c.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // TCP ended without close_notify: a plain end of stream (see the module doc).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if rs.eof {
                    return Ok(0);
                }
                if rs.start < rs.buf.len() {
                    let st = rs.start;
                    let mut rest = &rs.buf[st..];
                    let before = rest.len();
                    c.read_tls(&mut rest)?;
                    let took = before - rest.len();
                    if took == 0 {
                        return Err(io::Error::other("TLS: rustls accepts no more input"));
                    }
                    rs.start += took;
                    c.process_new_packets().map_err(tls_io_error)?;
                    continue;
                }
            }
            // Nothing buffered: read from the socket without holding the connection lock.
            rs.buf.resize(READ_BUF, 0);
            rs.start = 0;
            let n = loop {
                match (&self.shared.sock).read(&mut rs.buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        rs.buf.clear();
                        return Err(e);
                    }
                }
            };
            rs.buf.truncate(n);
            if n == 0 {
                rs.eof = true;
                let mut c = lock(&self.shared.conn);
                let _ = c.read_tls(&mut io::empty());
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.write_with(|c| c.writer().write(buf))
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        self.write_with(|c| c.writer().write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
