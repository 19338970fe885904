//! Builds the tiny test guests with the system C toolchain (gcc, ld).
//!
//! Each guest is compiled as freestanding x86-64 code (its PVH entry in `entry.S` is 32-bit and
//! switches to long mode), linked at 1 MiB with `guest/link.ld` into an ELF64 file (linux-loader
//! reads only ELF64, QEMU reads both). The results are `$OUT_DIR/<guest>.elf`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests and their own sources (besides the common ones).
const GUESTS: &[(&str, &[&str])] = &[
    ("hello", &["hello.c"]),
    ("pattern", &["pattern.c"]),
    ("smp", &["smp.c", "smp_trampoline.S"]),
    ("timer", &["timer.c"]),
    ("blkjournal", &["blkjournal.c"]),
    ("netecho", &["netecho.c"]),
];

/// Linked into every guest.
const COMMON: &[&str] = &["entry.S", "common.c"];

/// Other inputs that must trigger a rebuild.
const EXTRA_INPUTS: &[&str] = &["guest.h", "virtio.h", "link.ld"];

const CFLAGS: &[&str] = &[
    "-m64",
    "-mcmodel=small",
    "-mno-red-zone",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-nostdlib",
    "-static",
    "-O2",
    "-mno-sse",
    "-mno-mmx",
    "-mno-sse2",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fcf-protection=none",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Wextra",
    "-Wno-override-init",
    "-Werror",
];

fn tool(var: &str, default: &str) -> String {
    println!("cargo:rerun-if-env-changed={var}");
    env::var(var).unwrap_or_else(|_| default.to_string())
}

fn check_tool(program: &str, what: &str) {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "test-guests: `{program} --version` failed ({}); the tiny test guests need {what}",
            out.status
        ),
        Err(e) => panic!(
            "test-guests: cannot run `{program}` ({e}). The tiny test guests are built with the \
             system C toolchain: install gcc and binutils (Debian/Ubuntu: `apt-get install gcc \
             binutils`), or point {} at one",
            if what.contains("compiler") {
                "TEST_GUESTS_CC"
            } else {
                "TEST_GUESTS_LD"
            }
        ),
    }
}

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("test-guests: cannot run {shown}: {e}"));
    if !out.status.success() {
        panic!(
            "test-guests: command failed ({}): {shown}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn object_name(src: &str) -> String {
    let stem = Path::new(src)
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("source file name");
    format!("{stem}.o")
}

#[path = "../tool_probe.rs"]
mod tool_probe;

fn main() {
    // `has_qemu`: the QEMU cross-check runs (else it is ignored, outside CI).
    println!("cargo::rerun-if-changed=../tool_probe.rs");
    tool_probe::emit(&[("qemu-system-x86_64", "qemu")]);
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let src_dir = manifest.join("guest");
    let obj_dir = out.join("obj");
    std::fs::create_dir_all(&obj_dir).expect("create object directory");

    let cc = tool("TEST_GUESTS_CC", "gcc");
    let ld = tool("TEST_GUESTS_LD", "ld");
    check_tool(&cc, "a C compiler (gcc) for x86-64");
    check_tool(&ld, "the GNU linker (ld, binutils)");

    println!("cargo:rerun-if-changed=build.rs");
    for f in EXTRA_INPUTS {
        println!("cargo:rerun-if-changed={}", src_dir.join(f).display());
    }

    let compile = |src: &str| -> PathBuf {
        let input = src_dir.join(src);
        println!("cargo:rerun-if-changed={}", input.display());
        let obj = obj_dir.join(object_name(src));
        run(Command::new(&cc)
            .args(CFLAGS)
            .arg("-I")
            .arg(&src_dir)
            .arg("-c")
            .arg(&input)
            .arg("-o")
            .arg(&obj));
        obj
    };

    let common: Vec<PathBuf> = COMMON.iter().map(|s| compile(s)).collect();
    for (name, sources) in GUESTS {
        let mut objs = common.clone();
        objs.extend(sources.iter().map(|s| compile(s)));
        run(Command::new(&ld)
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-static",
                "-z",
                "noexecstack",
            ])
            .args(["-z", "max-page-size=4096"])
            .arg("-T")
            .arg(src_dir.join("link.ld"))
            .arg("-o")
            .arg(out.join(format!("{name}.elf")))
            .args(&objs));
    }
}
