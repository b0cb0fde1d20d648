//! Issue 11: the external-interrupt exit path runs without FXSAVE, so the code it reaches must
//! touch no vector or x87 register. Disassembles the test kernel as built (both feature sets)
//! and walks the fast path from the exit stub (`ackvisor_runner::rootcode`).

use ackvisor_runner::{kernel_elf_with, rootcode};

/// The walk found nothing, and it is not vacuous: it went through the dispatcher, the replay
/// and the stub's tail. `what` names the build in the failures.
fn judge(report: &rootcode::Report, what: &str) {
    let listing: Vec<String> = report
        .findings
        .iter()
        .map(|f| format!("{:#x} {}: {} ({})", f.address, f.function, f.text, f.why))
        .collect();
    assert!(
        report.findings.is_empty(),
        "{what}: the fast exit path uses vector state or escapes the walk:\n{}",
        listing.join("\n")
    );
    for part in ["vm_exit_entry", "dispatch_fast", "replay_trampoline"] {
        assert!(
            report.reached(part),
            "{what}: the walk never reached {part}: {:?}",
            report.functions
        );
    }
    assert!(
        report.instructions > 200,
        "{what}: only {} instructions walked",
        report.instructions
    );
}

#[test]
fn root_code_uses_no_vector_registers() {
    for stats in [true, false] {
        let elf = kernel_elf_with(stats).expect("build the test kernel");
        let bytes = std::fs::read(&elf).expect("read the kernel ELF");
        let report = rootcode::check(&bytes).expect("walk the exit path");
        judge(&report, &format!("test kernel, stats={stats}"));
    }
}

/// The same walk on the release ackvisor.sys, with the functions and labels its PDB names: the
/// image's core is compiled by another compiler for another target, and what the test kernel's
/// build leaves scalar the image's may not (issue 9: the release image's `PendingSet::is_empty`
/// was SSE on this path). The debug image is not walked: unoptimized, its fast path reaches
/// panic-formatting code that copies through XMM0 and jump tables the walk cannot follow
/// (its trace in `image_bench_debug` shows none of it executed).
#[test]
fn image_root_code_uses_no_vector_registers() {
    use ackvisor_runner::driver::{self, Profile};
    let (image, names) = driver::pdb_names(Profile::Release).expect("build ackvisor.sys");
    let bytes = std::fs::read(&image.sys).expect("read ackvisor.sys");
    let names: Vec<(u32, String)> = names
        .iter()
        .chain(names.labels())
        .map(|(r, n)| (r, n.to_string()))
        .collect();
    let report = rootcode::check_pe(&bytes, &names).expect("walk the image's exit path");
    judge(&report, "release image");
}
