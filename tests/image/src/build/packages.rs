//! The Debian 12 packages the image build needs, installed when missing (as root), or named.

use std::process::{Command, Stdio};

/// Each package and why the build needs it.
pub const PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "rustc 1.96 (Debian's newer toolchain), the compiler of the image",
    ),
    ("cargo-web", "its cargo"),
    (
        "rust-web-src",
        "the library sources -Zbuild-std compiles core and alloc from",
    ),
    ("lld-14", "lld-link-14, the COFF linker"),
    (
        "llvm-14",
        "llvm-dlltool-14, which writes the import libraries",
    ),
    ("libclang1-14", "libclang for wdk-sys's bindgen"),
    (
        "libclang-common-14-dev",
        "clang's builtin headers for that bindgen",
    ),
    (
        "mingw-w64-x86-64-dev",
        "the DDK headers and the ntoskrnl/hal export lists",
    ),
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b" installed"))
}

/// Whether this process runs as root (uid 0), from /proc/self/status.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// The packages not installed yet.
pub fn missing() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect()
}

/// Installs the missing packages with apt-get when root; otherwise fails naming them.
pub fn ensure_installed() -> Result<(), String> {
    let missing = missing();
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!("apt-get install {}", missing.join(" "));
    if !is_root() {
        return Err(format!(
            "building ackvisor.sys needs Debian packages that are missing; as root run: {line}"
        ));
    }
    eprintln!("ackimage: installing {}", missing.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .map_err(|e| format!("run apt-get update: {e}"))?;
    if !update.success() {
        return Err(format!("apt-get update failed ({update})"));
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| format!("run {line}: {e}"))?;
    if !status.success() {
        return Err(format!("{line} failed ({status})"));
    }
    Ok(())
}
