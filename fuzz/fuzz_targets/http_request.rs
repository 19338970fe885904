//! Fuzz the launcher API socket's HTTP request parsing (see harness/http_request.rs).
#![no_main]

#[path = "../harness/http_request.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run(data);
});
