//! Builds `outpost-init` (the `init/` crate) as a static binary that the
//! agent embeds and mounts into every job container as PID 1.
//!
//! The crate has no dependency but std, so `rustc` alone builds it, with
//! `-C target-feature=+crt-static` for this binary only (cargo cannot set
//! that flag per package). The result runs in any image, even `FROM scratch`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("../init/src");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let target = std::env::var("TARGET").expect("TARGET");
    println!("cargo:rerun-if-changed={}", src.display());
    for file in ["lib.rs", "main.rs", "protocol.rs", "sys.rs"] {
        println!("cargo:rerun-if-changed={}", src.join(file).display());
    }
    let common = |cmd: &mut Command| {
        cmd.args(["--edition", "2024", "--target", &target])
            .args(["-C", "opt-level=s", "-C", "panic=abort"])
            .args(["-C", "target-feature=+crt-static", "-C", "debuginfo=0"])
            .args(["--cap-lints", "warn"]);
    };
    let mut lib = Command::new(&rustc);
    common(&mut lib);
    lib.args(["--crate-type", "rlib", "--crate-name", "outpost_init"])
        .arg("--out-dir")
        .arg(&out)
        .arg(src.join("lib.rs"));
    run(lib, "the outpost-init library");
    let mut bin = Command::new(&rustc);
    common(&mut bin);
    bin.args(["--crate-type", "bin", "--crate-name", "outpost_init"])
        .args(["-C", "strip=symbols"])
        .arg("--extern")
        .arg(format!(
            "outpost_init={}",
            out.join("liboutpost_init.rlib").display()
        ))
        .arg("-o")
        .arg(out.join("outpost-init"))
        .arg(src.join("main.rs"));
    run(bin, "the static outpost-init binary");
}

fn run(mut cmd: Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running rustc for {what}: {e}"));
    assert!(status.success(), "rustc failed to build {what}: {status}");
}
