//! Decides, when the integration tests are compiled, which of them can run here: see
//! `tool_probe.rs` (tests that need `ip` or `etcd` are ignored where it is missing, outside CI) and
//! `LVM_SKIP_LINUX=1` (the Linux boot test is ignored).

#[path = "tool_probe.rs"]
mod tool_probe;

fn main() {
    println!("cargo::rerun-if-changed=tool_probe.rs");
    tool_probe::emit(&[("ip", "ip"), ("etcd", "etcd")]);
    println!("cargo::rustc-check-cfg=cfg(lvm_skip_linux)");
    println!("cargo::rerun-if-env-changed=LVM_SKIP_LINUX");
    if std::env::var("LVM_SKIP_LINUX").as_deref() == Ok("1") {
        println!("cargo::rustc-cfg=lvm_skip_linux");
    }
}
