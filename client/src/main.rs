//! `ackctl`: switch ackvisor's interrupt mode and read its statistics.
//!
//! **Runs in:** user mode (Windows: the `\\.\Ackvisor` device; anywhere: `--machine HOST:PORT`).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ackctl::cli::Cli::parse();
    let mut out = std::io::stdout().lock();
    match ackctl::run(&cli, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            eprintln!("ackctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
