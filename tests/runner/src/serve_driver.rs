//! The serve machine with the real ackvisor.sys behind COM1 (scenario `nt-serve`,
//! `tests/kernel/src/ntos/serve.rs`): `ackctl`'s requests reach the image as IRPs, and at the
//! power button the machine closes its books, calls DriverUnload and prints the verifier's.
//! [`judge`] is what `testmachine --serve --driver`/`--demo --driver` and the tests hold those
//! books to.
//!
//! **Runs in:** the Linux host.

use crate::{RunOutput, RunSpec, Verdict};

/// The kernel's scenario name. It starts with `nt-`, so [`crate::driver::attach`] puts the image
/// on the disk.
pub const SCENARIO: &str = "nt-serve";

/// CPUs the driver mode runs on unless told otherwise. The image sets a mode on every CPU by
/// moving its thread there (`KeSetSystemGroupAffinityThread`), which the miniature NT's
/// scheduler does; only the BSP runs the workload.
pub const CPUS: u32 = 2;

/// [`RunSpec::serve`]'s machine with the image loaded by DriverEntry instead of the kernel's own
/// core.
pub fn spec(model: &str, cpus: u32, min_rounds: u32) -> RunSpec {
    let mut spec = RunSpec::serve(model, cpus, min_rounds);
    for (k, v) in &mut spec.params {
        if k == "scenario" {
            *v = SCENARIO.into();
        }
    }
    spec
}

/// The books of a finished `nt-serve` run: the machine's (every interrupt raised ran, none
/// lost, ISR empty, nothing ran in a wrong context; the image's statistics agree with the
/// machine's tallies per vector), the file books (every CREATE closed, one DEVICE_CONTROL per
/// open, at least one per answered request) and the verifier's after DriverUnload (nothing
/// leaked, every IRP completed once with `Information` within its buffer, no IRQL rule broken).
/// `cpus` is the machine's CPU count; `min_interrupts` what the BSP's workload must have run.
pub fn judge(v: &mut Verdict<'_>, out: &RunOutput, cpus: u64, min_interrupts: u64) {
    if let Some(l) = v.line("serve-ready", None) {
        v.eq(l, "driver", 1)
            .eq(l, "cpus", cpus)
            .eq(l, "team", 1)
            .eq(l, "virtualized", cpus)
            .eq(l, "stats_reset", 1);
    }
    let requests = out.line("serve", None).and_then(|l| l.num("requests"));
    let set_modes = out.line("serve", None).and_then(|l| l.num("set_modes"));
    if let Some(l) = v.line("serve", None) {
        v.eq(l, "team", 1).serve_books_hold(l, cpus, min_interrupts);
    }
    match out
        .lines("serve-cpu", None)
        .find(|l| l.num("cpu") == Some(0))
    {
        Some(l) => {
            v.eq(l, "lost", 0)
                .eq(l, "isr_left", 0)
                .eq(l, "undrained", 0)
                .gt(l, "ran", 0)
                .eq_field(l, "ran", "raised");
        }
        None => v.fail("no RESULT serve-cpu line for cpu 0".into()),
    }
    match out
        .lines(SCENARIO, None)
        .find(|l| l.get("start_mode_set").is_some())
    {
        Some(l) => {
            v.eq(l, "start_mode_set", 1);
        }
        None => v.fail(format!("no RESULT {SCENARIO} line with start_mode_set")),
    }
    match out
        .lines(SCENARIO, None)
        .find(|l| l.get("unloaded").is_some())
    {
        Some(l) => {
            v.eq(l, "loaded", 1)
                .eq(l, "entry_status", 0)
                .eq(l, "virtualized_by_cpuid", cpus)
                .eq(l, "unloaded", 1)
                .eq(l, "virtualized_after", 0)
                .eq_field(l, "closes", "creates")
                .eq_field(l, "device_controls", "creates")
                .eq(l, "foreign_statuses", 0)
                .eq(l, "undrained_resets", 0)
                .nt_books_clean(l);
            // Each mode change moves the serving thread to every other CPU and back; nothing
            // else the session asks for moves it.
            if let Some(set_modes) = set_modes {
                v.eq(l, "session_moves", 2 * (cpus - 1) * set_modes);
            }
            // ... and back: every request ends on the CPU it began on.
            v.eq(l, "cpu_changes", 0);
            if let Some(r) = requests {
                v.gt(l, "creates", r.saturating_sub(1));
            }
        }
        None => v.fail(format!("no RESULT {SCENARIO} line with the unload books")),
    }
}

/// The image's statistics against the machine's tallies on the BSP since the books last
/// started (a client's `stats reset` restarts both), for a session that ended in a steady
/// `ack-inject`: per vector, one external-interrupt exit and one injection per handler run.
pub fn judge_agreement(v: &mut Verdict<'_>, out: &RunOutput) {
    match out
        .lines(SCENARIO, None)
        .find(|l| l.get("agreement_mode").is_some())
    {
        Some(l) => {
            if l.get("agreement_mode") != Some("ack-inject") {
                v.fail(format!(
                    "{}: agreement_mode: expected ack-inject (no mode change since the last \
                     reset), got {}",
                    l.label(),
                    l.get("agreement_mode").unwrap_or("-")
                ));
            }
            v.eq(l, "agreement_read", 1)
                .gt(l, "machine_runs", 0)
                .eq_field(l, "image_extint", "machine_runs")
                .eq_field(l, "image_injections", "machine_runs")
                .eq(l, "agreement_mismatch", 0);
        }
        None => v.fail(format!("no RESULT {SCENARIO} line with agreement_mode")),
    }
}
