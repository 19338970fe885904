use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::thread;

use super::*;
use crate::frame::{encode_control_frame, FrameReader, FrameWriter};
use crate::protocol::{FdRegion, SenderMessage};

fn tmp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("migration-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn uri_parsing() {
    assert_eq!(
        "unix:/run/x.sock".parse::<MigrationUri>().unwrap(),
        MigrationUri::Unix("/run/x.sock".into())
    );
    assert_eq!(
        "tcp:127.0.0.1:4444".parse::<MigrationUri>().unwrap(),
        MigrationUri::Tcp {
            host: "127.0.0.1".into(),
            port: 4444
        }
    );
    let v6: MigrationUri = "tcp:[::1]:80".parse().unwrap();
    assert_eq!(
        v6,
        MigrationUri::Tcp {
            host: "::1".into(),
            port: 80
        }
    );
    assert_eq!(v6.to_string(), "tcp:[::1]:80");
    assert_eq!(
        "tcp:host:1".parse::<MigrationUri>().unwrap().to_string(),
        "tcp:host:1"
    );
    for bad in [
        "",
        "unix:",
        "tcp:",
        "tcp:host",
        "tcp::80",
        "tcp:host:99999",
        "tcp:host:x",
        "tcp:::1:80",
        "http://x",
        "/path",
        "fd:3",
    ] {
        let e = bad.parse::<MigrationUri>().unwrap_err();
        assert!(matches!(e, TransportError::InvalidUri { .. }), "{bad}: {e}");
        assert!(e.to_string().contains("unix:PATH"), "{e}");
    }
    let e = "ssh:host".parse::<MigrationUri>().unwrap_err().to_string();
    assert!(e.contains("unknown scheme \"ssh\""), "{e}");
}

fn echo_roundtrip(uri: MigrationUri) {
    let listener = Listener::bind(&uri).unwrap();
    let uri = listener.local_uri().unwrap();
    let t = thread::spawn(move || {
        let mut s = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        let mut back = s.try_clone().unwrap();
        back.write_all(&buf).unwrap();
    });
    let mut c = connect(&uri, Some(Duration::from_secs(5))).unwrap();
    if let Stream::Tcp(t) = &c {
        assert!(t.nodelay().unwrap());
    }
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    t.join().unwrap();
}

#[test]
fn unix_and_tcp_streams() {
    let path = tmp_path("echo.sock");
    echo_roundtrip(MigrationUri::Unix(path.clone()));
    assert!(!path.exists(), "listener removes its socket");
    echo_roundtrip(MigrationUri::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    });
    let e = connect(&MigrationUri::Unix(tmp_path("nobody.sock")), None).unwrap_err();
    assert!(e.to_string().contains("nobody.sock"), "{e}");
}

#[test]
fn stale_and_live_unix_sockets() {
    let path = tmp_path("stale.sock");
    // A stale socket file (its listener is gone without cleanup).
    let l = UnixListener::bind(&path).unwrap();
    drop(l);
    assert!(path.exists());
    let live = Listener::bind(&MigrationUri::Unix(path.clone())).unwrap();
    assert!(matches!(
        Listener::bind(&MigrationUri::Unix(path.clone())),
        Err(TransportError::AddressInUse { .. })
    ));
    drop(live);
    let file = tmp_path("regular-file");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Listener::bind(&MigrationUri::Unix(file.clone())),
        Err(TransportError::AddressInUse { .. })
    ));
    assert!(file.exists());
}

#[test]
fn rate_limit_and_lifting_it() {
    let limit = RateLimit::new(200_000);
    let mut w = RateLimitedWriter::new(Vec::new(), limit.clone());
    let start = Instant::now();
    w.write_all(&vec![1u8; 50_000]).unwrap();
    let t = start.elapsed();
    // 50 kB at 200 kB/s with a 10 kB burst: about 0.2 s.
    assert!(
        t >= Duration::from_millis(150) && t < Duration::from_secs(2),
        "{t:?}"
    );
    limit.set(0);
    let start = Instant::now();
    w.write_all(&vec![2u8; 10_000_000]).unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(w.get_ref().len(), 10_050_000);
    // Lifting the limit while a writer waits lets it go on quickly.
    limit.set(1000);
    let l2 = limit.clone();
    let lifter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        l2.set(0);
    });
    let start = Instant::now();
    w.write_all(&vec![3u8; 100_000]).unwrap();
    assert!(start.elapsed() < Duration::from_secs(2));
    lifter.join().unwrap();
    // Vectored writes respect the limit too.
    let mut v = FrameWriter::new(RateLimitedWriter::new(
        Vec::new(),
        RateLimit::new(1_000_000),
    ));
    v.write_memory(
        &[
            crate::frame::MemoryRange::data(0, 8192),
            crate::frame::MemoryRange::data(8192, 8192),
        ],
        &[&[1u8; 8192], &[2u8; 8192]],
    )
    .unwrap();
    assert_eq!(v.get_ref().get_ref().len() as u64, v.bytes_written());
    // Abort fails waiting writers.
    limit.set(1);
    limit.abort();
    assert!(w.write_all(&[0u8; 10]).is_err());
}

fn memfd_with(content: &[u8]) -> File {
    let mut f: File = nix::sys::memfd::memfd_create(
        c"migration-test",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .unwrap()
    .into();
    f.write_all(content).unwrap();
    f
}

#[test]
fn fds_travel_with_a_frame() {
    let (a, b) = UnixStream::pair().unwrap();
    let f1 = memfd_with(b"region one");
    let f2 = memfd_with(b"region two");
    let msg = SenderMessage::MemoryFds {
        regions: vec![
            FdRegion {
                gpa: 0,
                size: 4096,
                file_offset: 0,
            },
            FdRegion {
                gpa: 1 << 32,
                size: 4096,
                file_offset: 0,
            },
        ],
    };
    let frame = encode_control_frame(&msg).unwrap();
    let mut w = FrameWriter::new(a.try_clone().unwrap());
    w.write_control(&SenderMessage::IterationDone { iteration: 0 })
        .unwrap();
    send_fds(&a, &frame, &[f1.as_raw_fd(), f2.as_raw_fd()]).unwrap();
    w.write_control(&SenderMessage::Complete).unwrap();

    let mut r = FrameReader::new(FdReader::new(b, 2));
    assert_eq!(
        r.read_control_frame::<SenderMessage>().unwrap(),
        SenderMessage::IterationDone { iteration: 0 }
    );
    assert_eq!(r.read_control_frame::<SenderMessage>().unwrap(), msg);
    let fds = r.get_mut().take_fds();
    assert_eq!(fds.len(), 2);
    for (fd, want) in fds.into_iter().zip([&b"region one"[..], b"region two"]) {
        let mut f = File::from(fd);
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(got, want);
    }
    assert_eq!(
        r.read_control_frame::<SenderMessage>().unwrap(),
        SenderMessage::Complete
    );
}

#[test]
fn unexpected_fds_are_refused_and_closed() {
    let (a, b) = UnixStream::pair().unwrap();
    let f = memfd_with(b"x");
    send_fds(&a, b"abc", &[f.as_raw_fd(), f.as_raw_fd()]).unwrap();
    let mut buf = [0u8; 16];
    let e = recv_fds(&b, &mut buf, 1).unwrap_err();
    assert!(
        matches!(e, TransportError::UnexpectedFds { got: 2, max: 1 }),
        "{e}"
    );
    // Plain data without fds.
    send_fds(&a, b"def", &[]).unwrap();
    let (n, fds) = recv_fds(&b, &mut buf, 0).unwrap();
    assert_eq!((&buf[..n], fds.len()), (&b"def"[..], 0));
    let many: Vec<RawFd> = vec![f.as_raw_fd(); MAX_FDS + 1];
    assert!(matches!(
        send_fds(&a, b"x", &many),
        Err(TransportError::TooManyFds(_))
    ));
    // An FdReader that expects none fails the read.
    send_fds(&a, b"ghi", &[f.as_raw_fd()]).unwrap();
    let mut r = FdReader::new(b, 0);
    assert!(r.read(&mut buf).is_err());
    assert_eq!(r.pending_fds(), 0);
}
