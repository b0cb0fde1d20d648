//! `ackimage`: builds ackvisor.sys on Linux and checks kernel images.
//!
//! ```text
//! ackimage build [--release]            build target/ackvisor-image/<profile>/ackvisor.sys
//! ackimage check IMAGE [--exports DIR] [--pdb FILE]
//!                                       check an image (exports/ and IMAGE.pdb beside it by default)
//! ackimage build-check [--release]      both, on the image just built
//! ```
//! Exit status 0 only when every step passed; a broken rule is printed as `FAIL rule: detail`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ackvisor_image::build::{self, Profile};
use ackvisor_image::check::run::{Target, check_file};

const USAGE: &str = "usage: ackimage build [--release] | check IMAGE [--exports DIR] [--pdb FILE] | build-check [--release]";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ackimage: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
    };
    let profile = if args.iter().any(|a| a == "--release") {
        Profile::Release
    } else {
        Profile::Debug
    };
    let built = |profile| -> Result<build::Image, String> {
        let start = Instant::now();
        let image = build::build(profile)?;
        println!(
            "ackimage: built {} ({:?}, {:.1} s)",
            image.sys.display(),
            profile,
            start.elapsed().as_secs_f64()
        );
        Ok(image)
    };
    let target = match args.first().map(String::as_str) {
        Some("build") => return built(profile).map(|_| ()),
        Some("build-check") => {
            let image = built(profile)?;
            Target {
                image: image.sys,
                exports: Some(image.exports),
                pdb: image.pdb,
            }
        }
        Some("check") => Target {
            image: args.get(1).map(PathBuf::from).ok_or(USAGE)?,
            exports: flag("--exports"),
            pdb: flag("--pdb"),
        },
        _ => return Err(USAGE.into()),
    };
    println!("checking {}", target.image.display());
    let report = check_file(&target)?;
    print!("{report}");
    if report.passed() {
        Ok(())
    } else {
        Err(format!("{} broke the image check", target.image.display()))
    }
}
