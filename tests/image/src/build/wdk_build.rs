//! windows-drivers-rs's `wdk-build`, made to run on a Linux host.
//!
//! wdk-sys's build script (bindgen over the WDK headers, the WDK's library paths) runs on the
//! host and calls wdk-build. wdk-build 0.6 only builds on Windows: it depends on the `windows`
//! crate for two registry reads that locate an installed WDK, creates one symlink with the
//! Windows call, and its environment helpers are `compile_error!` elsewhere. This module unpacks
//! the published crate and makes those few places host-neutral. With `WDKContentRoot` set
//! (as an eWDK prompt sets it), the registry is never needed. The result is used as a
//! `[patch]` of the build alone; every edit must match exactly, so a different wdk-build
//! version fails here, naming the edit, rather than building something else.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{debian_cargo, run};

/// One textual edit: `find` must occur exactly `count` times.
struct Edit {
    file: &'static str,
    find: &'static str,
    replace: &'static str,
    count: usize,
    why: &'static str,
}

const EDITS: &[Edit] = &[
    Edit {
        file: "Cargo.toml",
        find: "\n[dependencies.windows]\n",
        replace: "\n[target.'cfg(windows)'.dependencies.windows]\n",
        count: 1,
        why: "the windows crate only on a Windows host",
    },
    Edit {
        file: "src/cargo_make.rs",
        find: "std::os::windows::fs::symlink_file(",
        replace: "host_symlink_file(",
        count: 2,
        why: "the host's symlink call (defined at the end of the file)",
    },
    Edit {
        file: "src/utils.rs",
        find: "\nuse windows::{",
        replace: "\n#[cfg(windows)]\nuse windows::{",
        count: 1,
        why: "registry imports only on Windows",
    },
    Edit {
        file: "src/utils.rs",
        find: "\n    if let Some(path) = read_registry_key_string_value(",
        replace: "\n    #[cfg(windows)]\n    if let Some(path) = read_registry_key_string_value(",
        count: 2,
        why: "the registry lookups of an installed WDK only on Windows",
    },
    Edit {
        file: "src/utils.rs",
        find: "\nfn read_registry_key_string_value(",
        replace: "\n#[cfg(windows)]\nfn read_registry_key_string_value(",
        count: 1,
        why: "the registry reader only on Windows",
    },
    Edit {
        file: "src/utils.rs",
        find: "pub fn set_var<K, V>(_key: K, _value: V)",
        replace: "pub fn set_var<K, V>(key: K, value: V)",
        count: 1,
        why: "set_var usable on a non-Windows host (body below)",
    },
    Edit {
        file: "src/utils.rs",
        find: "pub fn remove_var<K>(_key: K)",
        replace: "pub fn remove_var<K>(key: K)",
        count: 1,
        why: "remove_var usable on a non-Windows host (body below)",
    },
];

/// Appended to `src/cargo_make.rs`.
const HOST_SYMLINK: &str = "
// Added by ackvisor's Linux image build: the symlink call of the host this runs on.
#[cfg(windows)]
use std::os::windows::fs::symlink_file as host_symlink_file;
#[cfg(unix)]
use std::os::unix::fs::symlink as host_symlink_file;
";

/// The non-Windows bodies of `set_var` and `remove_var`, in that order, replacing their
/// `compile_error!`. A build script is one thread, as on Windows where wdk-build calls the same.
const ENV_BODIES: [&str; 2] = [
    "    // SAFETY (ackvisor's Linux image build): called from a single-threaded build script.\n    unsafe { env::set_var(key, value) }\n",
    "    // SAFETY (ackvisor's Linux image build): called from a single-threaded build script.\n    unsafe { env::remove_var(key) }\n",
];

/// Bump when the edits change.
const REVISION: &str = "ackvisor host-neutral wdk-build 1";

/// Prepares the host-neutral wdk-build of the version `lockfile` names; returns its directory.
pub fn prepare(cache: &Path, root: &Path, lockfile: &Path) -> Result<PathBuf, String> {
    let version = locked_version(lockfile, "wdk-build")?;
    let dir = cache.join(format!("wdk-build-{version}"));
    let stamp = dir.join(".ackvisor-ready");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(REVISION) {
        return Ok(dir);
    }
    let crate_file = match registry_crate(&version) {
        Some(f) => f,
        None => {
            // Downloads every locked package, wdk-build among them, into cargo's cache.
            let mut fetch = debian_cargo(root, lockfile);
            fetch.args(["fetch", "--target", super::TARGET]);
            run(&mut fetch, "cargo fetch")?;
            registry_crate(&version)
                .ok_or_else(|| format!("wdk-build-{version}.crate not in cargo's cache"))?
        }
    };
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| format!("remove {}: {e}", dir.display()))?;
    }
    let mut untar = Command::new("tar");
    untar.arg("-xzf").arg(&crate_file).arg("-C").arg(cache);
    run(&mut untar, "unpacking wdk-build")?;
    for file in ["Cargo.toml", "src/cargo_make.rs", "src/utils.rs"] {
        let p = dir.join(file);
        let mut text = read(&p)?.replace("\r\n", "\n");
        for e in EDITS.iter().filter(|e| e.file == file) {
            let found = text.matches(e.find).count();
            if found != e.count {
                return Err(format!(
                    "wdk-build {version} {file}: expected {} of {:?} ({}), found {found}",
                    e.count, e.find, e.why
                ));
            }
            text = text.replace(e.find, e.replace);
        }
        if file == "src/cargo_make.rs" {
            text.push_str(HOST_SYMLINK);
        }
        if file == "src/utils.rs" {
            text = replace_compile_errors(&text, &version)?;
        }
        fs::write(&p, text).map_err(|e| format!("write {}: {e}", p.display()))?;
    }
    fs::write(&stamp, REVISION).map_err(|e| format!("write {}: {e}", stamp.display()))?;
    Ok(dir)
}

/// Replaces the two `compile_error!( ... );` statements (set_var's, then remove_var's).
fn replace_compile_errors(text: &str, version: &str) -> Result<String, String> {
    const START: &str = "    compile_error!(";
    const END: &str = "\n    );\n";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    for body in ENV_BODIES {
        let start = rest
            .find(START)
            .ok_or_else(|| format!("wdk-build {version} utils.rs: compile_error! not found"))?;
        let end = rest[start..]
            .find(END)
            .map(|e| start + e + END.len())
            .ok_or_else(|| format!("wdk-build {version} utils.rs: end of compile_error!"))?;
        out.push_str(&rest[..start]);
        out.push_str(body);
        rest = &rest[end..];
    }
    if rest.contains(START) {
        return Err(format!(
            "wdk-build {version} utils.rs: more than two compile_error!"
        ));
    }
    out.push_str(rest);
    Ok(out)
}

/// The version of `name` in a Cargo.lock.
fn locked_version(lockfile: &Path, name: &str) -> Result<String, String> {
    let text = read(lockfile)?;
    let needle = format!("name = \"{name}\"\nversion = \"");
    let start = text
        .find(&needle)
        .map(|i| i + needle.len())
        .ok_or_else(|| format!("{name} not in {}", lockfile.display()))?;
    let len = text[start..]
        .find('"')
        .ok_or_else(|| format!("{name}'s version in {}", lockfile.display()))?;
    Ok(text[start..start + len].to_string())
}

/// `wdk-build-<version>.crate` in cargo's download cache, if there.
fn registry_crate(version: &str) -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let file = format!("wdk-build-{version}.crate");
    fs::read_dir(home.join("registry").join("cache"))
        .ok()?
        .filter_map(Result::ok)
        .map(|d| d.path().join(&file))
        .find(|p| p.is_file())
}

fn read(p: &Path) -> Result<String, String> {
    fs::read_to_string(p).map_err(|e| format!("read {}: {e}", p.display()))
}
