//! The HTTP request parsing of the launcher's and noded's API sockets
//! (`contracts::http`): `parse_request_head` on the bytes, `read_request` (the
//! launcher's blocking reader) and `read_request_async` (noded's) on a stream
//! of them; both readers must agree.
//!
//! Shared by `fuzz/fuzz_targets/http_request.rs` (cargo-fuzz) and
//! `contracts/tests/fuzz_standin.rs` (seeded mutations in `cargo test`).

use contracts::http;

/// Parse `data` every way the API servers do. `Ok(body length)` for a request
/// that parses, else the error's message, which must never be empty.
pub fn run(data: &[u8], rt: &tokio::runtime::Runtime) -> Result<usize, String> {
    if let Err(e) = http::parse_request_head(data) {
        assert!(!e.to_string().is_empty());
    }
    let _ = http::parse_response_head(data);
    let blocking = http::read_request(&mut &data[..]);
    let async_ = rt.block_on(async {
        let mut r = data;
        http::read_request_async(&mut r).await
    });
    match (&blocking, &async_) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.method, b.method);
            assert_eq!(a.path, b.path);
            assert_eq!(a.body, b.body);
            assert!(a.body.len() <= http::MAX_BODY_BYTES);
        }
        (Err(a), Err(_)) => assert!(!a.to_string().is_empty()),
        (a, b) => panic!(
            "the blocking and async readers disagree: {:?} vs {:?}",
            a.as_ref().map(|r| &r.path),
            b.as_ref().map(|r| &r.path)
        ),
    }
    blocking.map(|r| r.body.len()).map_err(|e| e.to_string())
}
