//! TLS: handshakes that succeed and fail for each reason, and duplex use
//! (one thread reads while another writes a lot) without deadlock.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::*;
use crate::transport::{connect_with, Listener, MigrationUri, Stream, TcpSecurity, TransportError};

/// A CA that issues leaf certificates into TLS directories.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// Writes `dir/{ca,cert,key}.pem`: this CA, and a leaf for `names` (expired if asked).
    fn issue(&self, dir: &Path, names: &[&str], expired: bool) {
        fs::create_dir_all(dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        fs::write(dir.join(CA_FILE), self.cert.pem()).unwrap();
        fs::write(dir.join(CERT_FILE), cert.pem()).unwrap();
        fs::write(dir.join(KEY_FILE), key.serialize_pem()).unwrap();
    }
}

fn tmp(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "lvm-tls-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).unwrap();
    p
}

struct Dirs {
    root: PathBuf,
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Runs one handshake: a TLS server with `server_dir` on 127.0.0.1, a client with
/// `client_dir` verifying `name`. The server writes 12 bytes first (as the receiver
/// writes its preamble). Returns both results.
fn handshake_pair(
    server_dir: &Path,
    client_dir: &Path,
    name: &str,
) -> (Result<TlsStream, TlsError>, Result<TlsStream, TlsError>) {
    let server_cfg = TlsConfig::load(server_dir).unwrap();
    let client_cfg = TlsConfig::load(client_dir).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let r = server_cfg.accept(s);
        if let Ok(t) = &r {
            let mut t = t.clone();
            let _ = t.write_all(b"LVMIGR\0\0\x01\0\0\0");
        }
        r
    });
    let sock = TcpStream::connect(addr).unwrap();
    let c = client_cfg.connect(sock, name);
    let s = server.join().unwrap();
    (s, c)
}

fn err_text<T>(r: Result<T, TlsError>) -> String {
    match r {
        Ok(_) => panic!("expected a handshake failure"),
        Err(e) => {
            eprintln!("{e}");
            e.to_string()
        }
    }
}

#[test]
fn mutual_handshake_and_duplex_transfer() {
    let root = tmp("ok");
    let _g = Dirs { root: root.clone() };
    let ca = Ca::new("migration CA");
    ca.issue(&root.join("a"), &["localhost", "127.0.0.1"], false);
    ca.issue(&root.join("b"), &["localhost", "127.0.0.1"], false);
    let (s, c) = handshake_pair(&root.join("a"), &root.join("b"), "127.0.0.1");
    let (server, client) = (s.unwrap(), c.unwrap());

    // Client: one thread writes 48 MiB while another reads the server's messages;
    // the server answers every MiB with a small message while it reads. A design
    // where a blocked read held up writes (or the reverse) would hang here.
    const TOTAL: usize = 48 << 20;
    const CHUNK: usize = 1 << 20;
    let mut reader = client.clone();
    let client_reader = thread::spawn(move || {
        let mut pre = [0u8; 12];
        reader.read_exact(&mut pre).unwrap();
        assert_eq!(&pre[..8], b"LVMIGR\0\0");
        let mut acks = 0;
        let mut b = [0u8; 8];
        while acks < TOTAL / CHUNK {
            reader.read_exact(&mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), acks as u64);
            acks += 1;
        }
        acks
    });
    let server_thread = {
        let mut r = server.clone();
        let mut w = server.clone();
        thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 256 << 10];
            let mut sum = 0u64;
            while got < TOTAL {
                let n = r.read(&mut buf).unwrap();
                assert!(n > 0, "early end of stream after {got} bytes");
                for (i, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, ((got + i) % 251) as u8, "byte {}", got + i);
                }
                sum += n as u64;
                let before = got / CHUNK;
                got += n;
                for k in before..got / CHUNK {
                    w.write_all(&(k as u64).to_le_bytes()).unwrap();
                }
            }
            sum
        })
    };
    let mut w = client.clone();
    let data: Vec<u8> = (0..CHUNK * 2).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    while sent < TOTAL {
        // Vectored, in odd pieces, as the frame writer does.
        let off = sent % 251;
        let a = &data[off..off + 1000];
        let b = &data[off + 1000..off + CHUNK - 7];
        let n = w
            .write_vectored(&[std::io::IoSlice::new(a), std::io::IoSlice::new(b)])
            .unwrap();
        assert!(n > 0);
        sent += n;
        if sent > TOTAL {
            panic!("test bug: wrote past the total");
        }
        // Keep the pattern aligned: the next write starts at `sent`.
        let rest = TOTAL - sent;
        if rest < CHUNK {
            let off = sent % 251;
            w.write_all(&data[off..off + rest]).unwrap();
            sent += rest;
        }
    }
    assert_eq!(server_thread.join().unwrap(), TOTAL as u64);
    assert_eq!(client_reader.join().unwrap(), TOTAL / CHUNK);
    client.shutdown().unwrap();
    let mut r = server.clone();
    let mut one = [0u8; 1];
    assert_eq!(
        r.read(&mut one).unwrap(),
        0,
        "close_notify reads as the end"
    );
}

#[test]
fn a_blocked_read_does_not_block_a_write_and_shutdown_wakes_it() {
    let root = tmp("block");
    let _g = Dirs { root: root.clone() };
    let ca = Ca::new("migration CA");
    ca.issue(&root.join("a"), &["localhost"], false);
    let (s, c) = handshake_pair(&root.join("a"), &root.join("a"), "localhost");
    let (server, client) = (s.unwrap(), c.unwrap());
    let mut pre = [0u8; 12];
    client.clone().read_exact(&mut pre).unwrap();
    // A reader blocks: the server sends nothing more.
    let mut r = client.clone();
    let blocked = thread::spawn(move || {
        let mut b = [0u8; 16];
        r.read(&mut b)
    });
    thread::sleep(Duration::from_millis(100));
    // Writes still go through.
    let mut w = client.clone();
    w.write_all(b"hello while a read is blocked").unwrap();
    let mut got = [0u8; 29];
    server.clone().read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello while a read is blocked");
    // Shutting down from a third handle wakes the blocked reader.
    client.shutdown().unwrap();
    let r = blocked.join().unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

#[test]
fn certificate_from_another_ca_is_refused_both_ways() {
    let root = tmp("ca");
    let _g = Dirs { root: root.clone() };
    let ca = Ca::new("migration CA");
    let rogue = Ca::new("rogue CA");
    ca.issue(&root.join("good"), &["localhost"], false);
    rogue.issue(&root.join("rogue"), &["localhost"], false);
    // A client with a rogue certificate (trusting the rogue CA only, so it also
    // refuses the server): both sides say "unknown CA"-ish things.
    let (s, c) = handshake_pair(&root.join("good"), &root.join("rogue"), "localhost");
    let c = err_text(c);
    assert!(c.contains("unknown CA"), "{c}");
    let s = err_text(s);
    assert!(
        s.contains("closed the connection") || s.contains("refused") || s.contains("unknown CA"),
        "{s}"
    );

    // A rogue client that trusts the real CA: the server refuses its certificate
    // and the client hears why.
    let mixed = root.join("mixed");
    rogue.issue(&mixed, &["localhost"], false);
    fs::write(mixed.join(CA_FILE), ca.cert.pem()).unwrap();
    let (s, c) = handshake_pair(&root.join("good"), &mixed, "localhost");
    let s = err_text(s);
    assert!(
        s.contains("the source's certificate is not signed by the CA") && s.contains("unknown CA"),
        "{s}"
    );
    let c = err_text(c);
    assert!(
        c.contains("destination refused the connection") && c.contains("unknown CA"),
        "{c}"
    );
}

#[test]
fn expired_certificate_is_refused() {
    let root = tmp("expired");
    let _g = Dirs { root: root.clone() };
    let ca = Ca::new("migration CA");
    ca.issue(&root.join("old"), &["localhost"], true);
    ca.issue(&root.join("good"), &["localhost"], false);
    let (_s, c) = handshake_pair(&root.join("old"), &root.join("good"), "localhost");
    let c = err_text(c);
    assert!(c.contains("destination's certificate has expired"), "{c}");
    let (s, c) = handshake_pair(&root.join("good"), &root.join("old"), "localhost");
    let s = err_text(s);
    assert!(s.contains("source's certificate has expired"), "{s}");
    let c = err_text(c);
    assert!(c.contains("expired"), "{c}");
}

#[test]
fn name_mismatch_is_refused() {
    let root = tmp("name");
    let _g = Dirs { root: root.clone() };
    let ca = Ca::new("migration CA");
    ca.issue(&root.join("a"), &["dest.example"], false);
    let (_s, c) = handshake_pair(&root.join("a"), &root.join("a"), "other.example");
    let c = err_text(c);
    assert!(
        c.contains("not valid for the name other.example") && c.contains("dest.example"),
        "{c}"
    );
    // The same certificate is fine under its own name.
    let (s, c) = handshake_pair(&root.join("a"), &root.join("a"), "dest.example");
    assert!(s.is_ok() && c.is_ok());
}

#[test]
fn client_without_certificate_is_refused() {
    let root = tmp("nocert");
    let _g = Dirs { root: root.clone() };
    let ca = Ca::new("migration CA");
    ca.issue(&root.join("a"), &["localhost"], false);
    let server_cfg = TlsConfig::load(&root.join("a")).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = thread::spawn(move || server_cfg.accept(l.accept().unwrap().0));
    // A client that trusts the CA but presents no certificate.
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(root.join("a").join(CA_FILE)).unwrap())
        .unwrap();
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = ClientConnection::new(Arc::new(cfg), "localhost".try_into().unwrap()).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut client_err = None;
    for _ in 0..20 {
        if let Err(e) = conn.complete_io(&mut sock) {
            client_err = Some(e.to_string());
            break;
        }
        if !conn.is_handshaking() {
            // Wait for the server's verdict.
            let mut b = [0u8; 1];
            if let Err(e) = conn.reader().read(&mut b) {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    client_err = Some(e.to_string());
                    break;
                }
            }
        }
    }
    let s = err_text(server.join().unwrap());
    assert!(s.contains("presented no certificate"), "{s}");
    assert!(client_err.is_some());
}

#[test]
fn plain_peers_are_refused_by_a_tls_listener_and_a_tls_client() {
    let root = tmp("plain");
    let _g = Dirs { root: root.clone() };
    let ca = Ca::new("migration CA");
    ca.issue(&root.join("a"), &["localhost", "127.0.0.1"], false);
    let cfg = TlsConfig::load(&root.join("a")).unwrap();
    let sec = TcpSecurity::Tls {
        config: cfg.clone(),
        server_name: None,
    };
    let uri: MigrationUri = "tcp:127.0.0.1:0".parse().unwrap();
    let l = Listener::bind_with(&uri, &sec).unwrap();
    let bound = l.local_uri().unwrap();
    // A plain migration sender (its preamble) is refused in the handshake.
    let t = thread::spawn(move || l.accept().map(|_| ()));
    let mut c = crate::transport::connect(&bound, None).unwrap();
    let _ = c.write_all(b"LVMIGR\0\0\x01\0\0\0");
    let e = t.join().unwrap().unwrap_err();
    assert!(matches!(e, TransportError::Tls(_)), "{e}");
    // A TLS sender against a plain receiver (which writes its preamble) is refused.
    let plain = Listener::bind_with(&uri, &TcpSecurity::Insecure).unwrap();
    let bound = plain.local_uri().unwrap();
    let t = thread::spawn(move || {
        let mut s = plain.accept().unwrap();
        let _ = s.write_all(b"LVMIGR\0\0\x01\0\0\0");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let e = connect_with(&bound, Some(Duration::from_secs(5)), &sec).unwrap_err();
    assert!(e.to_string().contains("TLS handshake"), "{e}");
    t.join().unwrap();
}

#[test]
fn plain_tcp_needs_an_explicit_choice() {
    let uri: MigrationUri = "tcp:127.0.0.1:0".parse().unwrap();
    let e = Listener::bind_with(&uri, &TcpSecurity::Unset).unwrap_err();
    assert!(e.to_string().contains("--insecure"), "{e}");
    assert!(e.to_string().contains("--tls-dir"), "{e}");
    let e = connect_with(&uri, None, &TcpSecurity::Unset).unwrap_err();
    assert!(matches!(e, TransportError::InsecureTcp { .. }), "{e}");
    // Unix sockets do not need a choice.
    let dir = tmp("unix");
    let _g = Dirs { root: dir.clone() };
    let uri = MigrationUri::Unix(dir.join("s.sock"));
    let l = Listener::bind_with(&uri, &TcpSecurity::Unset).unwrap();
    let c = connect_with(&uri, None, &TcpSecurity::Unset).unwrap();
    assert!(matches!(c, Stream::Unix(_)));
    drop(l);
}

#[test]
fn bad_tls_directories_are_reported() {
    let root = tmp("bad");
    let _g = Dirs { root: root.clone() };
    let e = TlsConfig::load(&root.join("missing")).unwrap_err();
    assert!(e.to_string().contains("ca.pem"), "{e}");
    let ca = Ca::new("migration CA");
    let d = root.join("d");
    ca.issue(&d, &["localhost"], false);
    fs::write(d.join(KEY_FILE), "not a key").unwrap();
    let e = TlsConfig::load(&d).unwrap_err();
    assert!(e.to_string().contains("key.pem"), "{e}");
    ca.issue(&d, &["localhost"], false);
    fs::write(d.join(CERT_FILE), "").unwrap();
    let e = TlsConfig::load(&d).unwrap_err();
    assert!(
        e.to_string().contains("cert.pem: holds no CERTIFICATE"),
        "{e}"
    );
    // A key that does not belong to the certificate.
    ca.issue(&d, &["localhost"], false);
    fs::write(
        d.join(KEY_FILE),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let e = TlsConfig::load(&d).unwrap_err();
    assert!(e.to_string().contains("do not go together"), "{e}");
}
