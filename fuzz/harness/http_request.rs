//! The HTTP request parsing of the launcher's API socket (`contracts::http`):
//! `parse_request_head` on the bytes and `read_request` (the launcher's blocking
//! reader) on a stream of them. (noded's API is served by hyper since issue 16.)
//!
//! Shared by `fuzz/fuzz_targets/http_request.rs` (cargo-fuzz) and
//! `contracts/tests/fuzz_standin.rs` (seeded mutations in `cargo test`).

use contracts::http;

/// Parse `data` every way the launcher's API server does. `Ok(body length)` for a
/// request that parses, else the error's message, which must never be empty.
pub fn run(data: &[u8]) -> Result<usize, String> {
    if let Err(e) = http::parse_request_head(data) {
        assert!(!e.to_string().is_empty());
    }
    let _ = http::parse_response_head(data);
    match http::read_request(&mut &data[..]) {
        Ok(r) => {
            assert!(r.body.len() <= http::MAX_BODY_BYTES);
            Ok(r.body.len())
        }
        Err(e) => {
            let m = e.to_string();
            assert!(!m.is_empty());
            Err(m)
        }
    }
}
