//! Fuzz the migration stream receiver's frame parsing (see harness/migration_stream.rs).
#![no_main]

#[path = "../harness/migration_stream.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run(data);
});
