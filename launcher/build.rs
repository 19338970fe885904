//! Stamps the launcher version from `LAUNCHER_VERSION` (default: the crate version),
//! so that two builds of the same tree can carry different versions.
//!
//! Test and packaging knobs (empty or unset = the tree's own values), read by
//! `launcher::capabilities()` so that noded's update policy (machine types, migration
//! protocol windows) can be exercised with real builds rather than fake scripts:
//! - `LAUNCHER_EXTRA_MACHINE_TYPES=a,b`: extra machine-type names this build advertises
//!   and runs, as aliases of its first built-in platform (a packager's new name for an
//!   unchanged platform; tests use it to get a second runnable machine type);
//! - `LAUNCHER_WITHOUT_MACHINE_TYPES=a,b`: built-in machine types this build neither
//!   advertises nor runs (a release that dropped them);
//! - `LAUNCHER_MIGRATION_PROTOCOL_MIN` / `_MAX`: the migration-protocol window this build
//!   declares (a release that no longer accepts older streams).
fn main() {
    for knob in [
        "LAUNCHER_VERSION",
        "LAUNCHER_EXTRA_MACHINE_TYPES",
        "LAUNCHER_WITHOUT_MACHINE_TYPES",
        "LAUNCHER_MIGRATION_PROTOCOL_MIN",
        "LAUNCHER_MIGRATION_PROTOCOL_MAX",
    ] {
        println!("cargo:rerun-if-env-changed={knob}");
    }
    let version = std::env::var("LAUNCHER_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    println!("cargo:rustc-env=LAUNCHER_VERSION={version}");
    for knob in [
        "LAUNCHER_EXTRA_MACHINE_TYPES",
        "LAUNCHER_WITHOUT_MACHINE_TYPES",
        "LAUNCHER_MIGRATION_PROTOCOL_MIN",
        "LAUNCHER_MIGRATION_PROTOCOL_MAX",
    ] {
        let v = std::env::var(knob).unwrap_or_default();
        if knob.starts_with("LAUNCHER_MIGRATION") && !v.is_empty() && v.parse::<u32>().is_err() {
            panic!("{knob}={v:?} is not a protocol version number");
        }
        println!("cargo:rustc-env={knob}={v}");
    }
}
