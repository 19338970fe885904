//! Stamps the launcher version from `LAUNCHER_VERSION` (default: the crate version),
//! so that two builds of the same tree can carry different versions.
fn main() {
    println!("cargo:rerun-if-env-changed=LAUNCHER_VERSION");
    let version = std::env::var("LAUNCHER_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    println!("cargo:rustc-env=LAUNCHER_VERSION={version}");
}
