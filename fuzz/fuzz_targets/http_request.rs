//! Fuzz the API sockets' HTTP request parsing (see harness/http_request.rs).
#![no_main]

use std::sync::OnceLock;

#[path = "../harness/http_request.rs"]
mod harness;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run(data, runtime());
});
