//! Deterministic stand-in for the `http_request` cargo-fuzz target: a few thousand
//! seeded mutations of the requests the launcher's API socket takes go through the
//! same harness (`fuzz/harness/http_request.rs`): the reader must never panic and must
//! end bad input with a non-empty error. `FUZZ_STANDIN_ITERS` changes the count.

#[path = "../../fuzz/harness/http_request.rs"]
mod harness;
#[path = "../../fuzz/harness/mutate.rs"]
mod mutate;

fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: t\r\n");
    if !body.is_empty() {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("Connection: close\r\n\r\n");
    r.push_str(body);
    r.into_bytes()
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        request("GET", "/v1/status", ""),
        request(
            "PUT",
            "/v1/migrate",
            r#"{"to":"tcp:127.0.0.1:4444","tlsDir":"/etc/lvm/tls","downtimeMs":300,"maxBandwidth":0,"autoConverge":false}"#,
        ),
        request(
            "PUT",
            "/v1/snapshot",
            r#"{"path":"/tmp/x.snap","stop":true}"#,
        ),
        request("GET", "/v1/vms?state=running&limit=10", ""),
        request(
            "POST",
            "/v1/vms",
            r#"{"name":"vm1","kernel":"/k","memory":"64M","runStrategy":"Always"}"#,
        ),
        request("PUT", "/v1/migrate/cancel", ""),
    ]
}

/// With `FUZZ_WRITE_SEEDS` set, write the seeds to `fuzz/corpus/NAME/` for cargo-fuzz.
fn write_seeds(name: &str, seeds: &[Vec<u8>]) {
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), s).expect("seed");
    }
}

#[test]
fn seeds_parse() {
    write_seeds("http_request", &seeds());
    for s in seeds() {
        assert!(harness::run(&s).is_ok(), "{}", String::from_utf8_lossy(&s));
    }
}

#[test]
fn mutated_requests_fail_cleanly() {
    let iters = mutate::iterations(5000);
    let (ok, err) =
        mutate::run_mutants("http_request", &seeds(), iters, 0x5eed_0003, 1 << 16, |d| {
            harness::run(d)
        });
    eprintln!("http_request stand-in: {iters} mutants, {ok} parsed, {err} refused");
    assert!(err > 0 && ok > 0, "{ok} parsed, {err} refused");
}

/// Oversized inputs are refused by the limits, not by running out of memory.
#[test]
fn limits() {
    let mut huge = b"GET /v1/status HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 << 10));
    huge.extend_from_slice(b"\r\n\r\n");
    assert!(harness::run(&huge).is_err());
    let big_body = b"PUT /v1/migrate HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n{}".to_vec();
    assert!(harness::run(&big_body).is_err());
}
