//! Builds `ackvisor.sys` on a Linux host: the project's own kernel image, which the test machine
//! can load and the image check reads. The Windows build stays `cargo make` with the real WDK.
//!
//! The recipe, step by step (each step caches its work under `target/ackvisor-image/`):
//! 1. [`packages`]: Debian 12's packages for it are installed (as root), or named.
//! 2. [`kit`]: a stand-in WDK tree (mingw-w64's DDK headers, import libraries made from its
//!    ntoskrnl/hal export lists), the export lists themselves, and trap stubs.
//! 3. [`wdk_build`]: windows-drivers-rs's `wdk-build`, which wdk-sys's build script needs, made
//!    to run on a Linux host.
//! 4. Debian's `cargo`/`rustc` (1.96, with the library sources for `-Zbuild-std`) compile the
//!    driver crate for `x86_64-pc-windows-msvc`, and `lld-link` links it with wdk-build's WDM
//!    flags into a PE32+ native image.
//!
//! Cargo's own lock file is never touched: the build resolves into a lock file of its own.

pub mod kit;
pub mod packages;
pub mod wdk_build;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target of an x64 Windows kernel driver.
pub const TARGET: &str = "x86_64-pc-windows-msvc";
/// The driver crate.
const PACKAGE: &str = "ackvisor";
/// Its library name: cargo writes `ackvisor.dll` and `ackvisor.pdb`.
const LIB_NAME: &str = "ackvisor";

/// Debian's toolchain (`rustc-web`, `cargo-web`): a rustup toolchain earlier on PATH has no
/// library sources for `-Zbuild-std` and cannot fetch them here.
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
/// LLVM 14's COFF linker (`lld-14`).
const LLD_LINK: &str = "/usr/bin/lld-link-14";
/// libclang for wdk-sys's bindgen (`libclang1-14`), and its resource headers.
const LIBCLANG_DIR: &str = "/usr/lib/llvm-14/lib";
const CLANG_RESOURCE_PARENT: &str = "/usr/lib/llvm-14/lib/clang";

/// wdk-build's link flags for a WDM driver (its `configure_wdk_binary_build`, which only runs on
/// a Windows host), less `/KERNEL` and `/MAP*`, which lld-link 14 does not know (`/KERNEL`
/// only warns in link.exe about objects rustc cannot mark), and `/IGNORE:*` for link.exe's
/// warnings.
pub const WDM_LINK_FLAGS: &[&str] = &[
    "/DRIVER",
    "/NODEFAULTLIB",
    "/SUBSYSTEM:NATIVE",
    "/ENTRY:DriverEntry",
    "/NXCOMPAT",
    "/DYNAMICBASE",
    "/INTEGRITYCHECK",
    "/MANIFEST:NO",
    "/OPT:REF,ICF",
];

/// Which cargo profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `dev` (the README's default `cargo make`).
    Debug,
    /// `release`.
    Release,
}

impl Profile {
    /// cargo's directory name for it.
    pub fn dir(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

/// A built image and what the image check reads beside it.
#[derive(Clone, Debug)]
pub struct Image {
    /// `ackvisor.sys`.
    pub sys: PathBuf,
    /// Its PDB (function names), when the linker wrote one.
    pub pdb: Option<PathBuf>,
    /// The export lists it was linked against: `ntoskrnl.def`, `hal.def`.
    pub exports: PathBuf,
}

/// The workspace root (this crate is `tests/image`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .map_or_else(|| here.to_path_buf(), Path::to_path_buf)
}

/// Where every cached step and the images live.
pub fn cache_dir() -> PathBuf {
    workspace_root().join("target").join("ackvisor-image")
}

/// Builds `ackvisor.sys` in `profile`, installing what is missing when root. Repeated calls
/// reuse every cached step and cargo's incremental state: a rebuild with no change takes
/// seconds. Serialized across processes by a lock file.
pub fn build(profile: Profile) -> Result<Image, String> {
    packages::ensure_installed()?;
    let cache = cache_dir();
    fs::create_dir_all(&cache).map_err(|e| format!("create {}: {e}", cache.display()))?;
    let lock_path = cache.join("build.lock");
    let lock =
        fs::File::create(&lock_path).map_err(|e| format!("create {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;

    let root = workspace_root();
    let kit = kit::prepare(&cache)?;
    // Not in an ancestor of the target directory: wdk-build takes the first directory above its
    // OUT_DIR holding a Cargo.lock for the workspace root.
    let lockfile = cache.join("lock").join("Cargo.lock");
    sync_lockfile(&root.join("Cargo.lock"), &lockfile)?;
    let wdk_build = wdk_build::prepare(&cache, &root, &lockfile)?;

    let target_dir = cache.join("cargo");
    let mut cmd = debian_cargo(&root, &lockfile);
    cmd.arg("--config")
        .arg(format!(
            "patch.crates-io.wdk-build.path={}",
            toml_string(&wdk_build)
        ))
        .arg("--config")
        .arg(format!(
            "target.{TARGET}.linker={}",
            toml_string(Path::new(LLD_LINK))
        ))
        .args([
            "rustc", "--quiet", "-p", PACKAGE, "--lib", "--target", TARGET,
        ])
        .arg("-Zbuild-std=core,alloc")
        .arg("--target-dir")
        .arg(&target_dir)
        .args((profile == Profile::Release).then_some("--release"))
        .arg("--")
        .arg("-L")
        .arg(format!("native={}", kit.lib_dir.display()));
    for flag in WDM_LINK_FLAGS {
        cmd.arg("-C").arg(format!("link-arg={flag}"));
    }
    cmd.arg("-C")
        .arg(format!("link-arg={}", kit.trap_stubs.display()));
    // wdk-sys's build script finds the WDK through these (an eWDK prompt sets the same).
    // Line tables in release too, so its PDB names every function for the image check's report;
    // debug information changes no code.
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "line-tables-only");
    cmd.env("WDKContentRoot", &kit.wdk_root)
        .env("Version_Number", kit::SDK_VERSION)
        .env("LIBCLANG_PATH", LIBCLANG_DIR)
        .env("BINDGEN_EXTRA_CLANG_ARGS", bindgen_args(&kit)?);
    run(&mut cmd, "cargo rustc for the driver image")?;

    let built = target_dir.join(TARGET).join(profile.dir());
    let out = cache.join(profile.dir());
    fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let sys = out.join(format!("{LIB_NAME}.sys"));
    copy(&built.join(format!("{LIB_NAME}.dll")), &sys)?;
    let pdb_built = built.join(format!("{LIB_NAME}.pdb"));
    let pdb = if pdb_built.is_file() {
        let pdb = out.join(format!("{LIB_NAME}.pdb"));
        copy(&pdb_built, &pdb)?;
        Some(pdb)
    } else {
        None
    };
    Ok(Image {
        sys,
        pdb,
        exports: kit.exports,
    })
}

/// Debian's cargo with the build's own lock file, run from the workspace root (so the
/// workspace's `.cargo/config.toml`, with the static CRT the WDK wants, applies).
pub(crate) fn debian_cargo(root: &Path, lockfile: &Path) -> Command {
    let mut cmd = Command::new(DEBIAN_CARGO);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![PathBuf::from("/usr/bin")];
    paths.extend(std::env::split_paths(&path));
    cmd.current_dir(root)
        // -Z options of Debian's stable toolchain (build-std, lockfile-path).
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTC", DEBIAN_RUSTC)
        .env("PATH", std::env::join_paths(paths).unwrap_or(path))
        // The lock file of our own, set in the environment rather than on the command line:
        // wdk-sys's build script runs `cargo metadata` itself (through wdk-build), which sees
        // the [patch] too but not our flags, and would write the patched resolution into the
        // workspace's Cargo.lock.
        .env("CARGO_UNSTABLE_LOCKFILE_PATH", "true")
        .env("CARGO_RESOLVER_LOCKFILE_PATH", lockfile);
    // What a surrounding `cargo test` or the user's shell set for *their* build.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_X86_64_PC_WINDOWS_MSVC_RUSTFLAGS",
        "CARGO_TARGET_X86_64_PC_WINDOWS_MSVC_LINKER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Refreshes the build's lock file from the workspace's when that one changed: the build adds
/// the patched wdk-build to its copy, the workspace's stays as cargo left it.
fn sync_lockfile(workspace: &Path, ours: &Path) -> Result<(), String> {
    let stamp = ours.with_extension("lock.from");
    if let Some(dir) = ours.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let source = fs::read(workspace).map_err(|e| format!("read {}: {e}", workspace.display()))?;
    if fs::read(&stamp).ok().as_deref() == Some(source.as_slice()) && ours.is_file() {
        return Ok(());
    }
    fs::write(ours, &source).map_err(|e| format!("write {}: {e}", ours.display()))?;
    fs::write(&stamp, &source).map_err(|e| format!("write {}: {e}", stamp.display()))
}

/// Clang flags for wdk-sys's bindgen over mingw-w64's headers: the GNU dialect those headers
/// test for, LLVM 14's own builtin headers, and the stand-in declarations of [`kit`].
fn bindgen_args(kit: &kit::Kit) -> Result<String, String> {
    let resource = fs::read_dir(CLANG_RESOURCE_PARENT)
        .map_err(|e| format!("read {CLANG_RESOURCE_PARENT}: {e} (libclang-common-14-dev)"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("include").is_dir())
        .ok_or_else(|| format!("no clang resource directory under {CLANG_RESOURCE_PARENT}"))?;
    Ok(format!(
        "-fgnuc-version=4.2.1 -resource-dir={} -include {}",
        resource.display(),
        kit.compat_header.display()
    ))
}

/// A path as a TOML string for `--config`.
fn toml_string(p: &Path) -> String {
    let s = p.display().to_string();
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

/// Runs a command, its output going to ours; an error names what failed.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot run {:?}: {e}", cmd.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status}); see its output above"))
    }
}
