//! Issue 9's bench line: the real ackvisor.sys's exit path (`nt-bench`), traced from the
//! image's own HOST_RIP (its PDB's `vm_exit_entry` at the load base) to VMRESUME. Asserts
//! that the instrument works and agrees with the independent ones, never a figure's size
//! (STYLE §2.9):
//! - the guest's XMM0/XMM1 survive every tick in every mode (its canary), and no instruction
//!   on the path names a vector register outside an FXSAVE..FXRSTOR bracket (the exit stub's
//!   fast path saves no vector state: such a use changes the guest's);
//! - the gap instrument saw one gap per tick (the first may come before its first read);
//! - the trace closes one window per external-interrupt exit the image's statistics IOCTL
//!   counted in the traced phase, and none it cannot place;
//! - the image calls KfRaiseIrql and KeLowerIrql through its import table once each per exit
//!   where it runs an OS handler in root (ack-replay, exit-sti) and never in ack-inject;
//! - the image unloads with nothing left in the verifier's books and no IRQL violation;
//! - `e2e` agrees with `guest_overhead` (the guest's TSC gaps, outside the path) within
//!   [`AGREEMENT`] once the handler's own difference is taken out, as `bench` reports it.

use ackvisor_runner::driver::Profile;
use ackvisor_runner::image_bench::{self, AGREEMENT, ModeFigures, Shape};
use ackvisor_runner::{MODELS, run};

/// Few ticks: every exit of a mode takes the same path.
const SHAPE: Shape = Shape {
    bench_ticks: 300,
    trace_ticks: 8,
};

fn check(model: &str, profile: Profile) {
    let spec = image_bench::spec(model, profile, SHAPE);
    let out = run(&spec).expect("run nt-bench");
    let figures = image_bench::figures(&out, profile).expect("figures from the run");
    let mut failures = Vec::new();
    let mut fail = |f: &ModeFigures, what: String| {
        failures.push(format!("{model} {profile:?} {}: {what}: {f:?}", f.mode));
    };
    for f in &figures {
        let c = &f.count;
        if c.irregular != 0 {
            fail(f, "windows the reader could not place".into());
        }
        if c.unsaved_vector_uses != 0 {
            fail(
                f,
                format!(
                    "{} uses of the guest's vector registers, first {:?}",
                    c.unsaved_vector_uses, c.first_unsaved_vector_use
                ),
            );
        }
        if f.xmm_clobbered != 0 {
            fail(
                f,
                format!("the guest's XMM0/XMM1 changed on {} ticks", f.xmm_clobbered),
            );
        }
        // A tick may land before the spin's first TSC read.
        let (ticks, gaps) = f.ticks_and_gaps;
        if !(ticks.saturating_sub(1)..=ticks).contains(&gaps) {
            fail(f, format!("{gaps} gaps for {ticks} ticks"));
        }
        if c.exits != f.exits_stats {
            fail(
                f,
                format!("{} windows, {} exits by the image", c.exits, f.exits_stats),
            );
        }
        let ticks = u64::from(SHAPE.trace_ticks);
        match f.mode.as_str() {
            "passthrough" => {
                if f.exits_stats != 0 {
                    fail(f, "exits in passthrough".into());
                }
                continue;
            }
            _ if !(ticks..=ticks + 1).contains(&f.exits_stats) => {
                fail(f, format!("{} exits for {ticks} ticks", f.exits_stats));
            }
            _ => {}
        }
        let expected_irql_calls = match f.mode.as_str() {
            "ack-inject" => 0.0,
            _ => IRQL_CALLS_PER_ROOT_RUN,
        };
        if f.irql_calls != expected_irql_calls {
            fail(
                f,
                format!(
                    "{} IRQL calls per exit, want {expected_irql_calls}",
                    f.irql_calls
                ),
            );
        }
        if f.mode == "ack-replay" && f.replays_stats != f.exits_stats {
            fail(f, "an exit that did not replay the clock".into());
        }
        match f.net_offset() {
            Some(off) if off.abs() <= AGREEMENT => {}
            off => fail(
                f,
                format!("e2e and guest_overhead disagree ({off:?} of e2e, limit {AGREEMENT})"),
            ),
        }
    }
    // The scenario loads and unloads the image like nt-driver: nothing left behind.
    let end = out
        .lines(image_bench::SCENARIO, None)
        .find(|l| l.get("unloaded").is_some());
    let clean = end.is_some_and(|l| {
        l.num("unloaded") == Some(1)
            && l.num("leaks") == Some(0)
            && l.num("irql_violations") == Some(0)
    });
    if !clean {
        failures.push(format!(
            "{model} {profile:?}: unload line {:?}",
            end.map(|l| &l.raw)
        ));
    }
    let fatal = out
        .lines(image_bench::SCENARIO, None)
        .find(|l| l.get("fatal").is_some());
    if let Some(l) = fatal {
        failures.push(format!("{model} {profile:?}: {}", l.raw));
    }
    assert!(
        failures.is_empty(),
        "{}\nconsole tail:\n{}",
        failures.join("\n"),
        out.tail(10)
    );
}

/// KfRaiseIrql before the OS handler, KeLowerIrql after it (the guest runs at IRQL 0).
const IRQL_CALLS_PER_ROOT_RUN: f64 = 2.0;

/// The release image (the build users ship), on both CPU models.
fn image_bench_release(model: &str) {
    check(model, Profile::Release);
}

ackvisor_runner::per_model!(image_bench_release);

#[test]
fn image_bench_debug() {
    check(MODELS[0], Profile::Debug);
}
