//! The project's own Linux build of ackvisor.sys (what the test machine will load) builds, and
//! the image passes the image check. Installs the Debian packages it needs when run as root; a
//! repeated run reuses every cached step (seconds).

use ackvisor_image::build::{self, Profile};
use ackvisor_image::check::run::{Target, check_file};

#[test]
fn the_debug_image_builds_on_linux_and_passes_the_image_check() {
    let lock = build::workspace_root().join("Cargo.lock");
    let lock_before = std::fs::read(&lock).unwrap();
    let image = build::build(Profile::Debug).unwrap_or_else(|e| panic!("{e}"));
    // The build resolves (with its patched wdk-build) into a lock file of its own.
    assert!(
        std::fs::read(&lock).unwrap() == lock_before,
        "the image build changed the workspace's Cargo.lock"
    );
    let report = check_file(&Target {
        image: image.sys.clone(),
        exports: Some(image.exports.clone()),
        pdb: image.pdb.clone(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    println!("{report}");
    assert!(
        report.passed(),
        "{} broke the image check: {:?}",
        image.sys.display(),
        report.violations
    );
    // The data exports are imported through their slots (ntapi.rs), by name, from ntoskrnl.
    let ntoskrnl = report
        .imports
        .iter()
        .find(|(m, _)| m.eq_ignore_ascii_case("ntoskrnl.exe"))
        .map(|(_, names)| names)
        .expect("imports from ntoskrnl.exe");
    for data in ["PsInitialSystemProcess", "PsThreadType"] {
        assert!(ntoskrnl.iter().any(|n| n == data), "{data} not imported");
    }
    // Names came from the PDB: the functions the issue measured are there, within the limit.
    assert!(
        report
            .frames
            .iter()
            .any(|(f, _)| f.name.as_deref() == Some("ackvisor_vmm::control::stats")),
        "control::stats not named"
    );
}
