//! `ackimage`: builds ackvisor.sys on Linux and checks kernel images.
//!
//! ```text
//! ackimage build [--release]          build target/ackvisor-image/<profile>/ackvisor.sys
//! ackimage check IMAGE [--exports DIR] [--pdb FILE]
//! ackimage build-check [--release]    both
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use ackvisor_image::build::{self, Profile};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let profile = if args.iter().any(|a| a == "--release") {
        Profile::Release
    } else {
        Profile::Debug
    };
    let result = match args.first().map(String::as_str) {
        Some("build") => build::build(profile).map(|i| println!("{}", i.sys.display())),
        _ => Err("usage: ackimage build [--release]".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ackimage: {e}");
            ExitCode::FAILURE
        }
    }
}
