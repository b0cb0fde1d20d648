//! The real `ackctl` binary, driven as a user would: found (or built) through cargo, run with
//! `--machine localhost:PORT`, its output returned as text or parsed JSON.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use crate::workspace_root;

/// The `ackctl` binary: `$ACKCTL` if set, otherwise built by cargo (a no-op when fresh) in the
/// profile this process was built with, at the path cargo reports for it.
pub fn binary() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(locate).clone()
}

fn locate() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ACKCTL") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("ACKCTL={} is not a file", p.display()))
        };
    }
    let release = std::env::current_exe()
        .ok()
        .and_then(|e| {
            e.ancestors()
                .find(|d| d.file_name().is_some_and(|n| n == "release"))
                .map(|_| ())
        })
        .is_some();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "-p", "ackctl", "--bin", "ackctl"])
        .args(["--message-format", "json-render-diagnostics"])
        .args(release.then_some("--release"))
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .output()
        .map_err(|e| format!("run cargo to build ackctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building ackctl failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "ackctl")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| "cargo built ackctl but named no executable".to_string())
}

/// What one `ackctl` run printed.
#[derive(Clone, Debug)]
pub struct Output {
    /// The command line (for failure messages).
    pub command: String,
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Output {
    /// Whether it exited with 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Standard output as JSON, or a message naming the command and what it printed.
    pub fn json(&self) -> Result<serde_json::Value, String> {
        if !self.ok() {
            return Err(format!(
                "`{}` failed (exit {:?}): {}",
                self.command,
                self.code,
                self.stderr.trim()
            ));
        }
        serde_json::from_str(&self.stdout).map_err(|e| {
            format!(
                "`{}` printed no JSON ({e}): {}",
                self.command,
                self.stdout.trim()
            )
        })
    }
}

/// Runs `ackctl --machine <machine> <args...>`.
pub fn run(machine: &str, args: &[&str]) -> Result<Output, String> {
    let bin = binary()?;
    let out = Command::new(&bin)
        .args(["--machine", machine])
        .args(args)
        .output()
        .map_err(|e| format!("run {}: {e}", bin.display()))?;
    Ok(Output {
        command: format!("ackctl --machine {machine} {}", args.join(" ")),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
