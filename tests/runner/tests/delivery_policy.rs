//! Issue 8, items 1 and 2, judged on the test machine per CPU model:
//! - `misdirected-eoi`: an EOI that lands on a deferred vector and a second acknowledge of that
//!   vector; every acknowledge must be delivered, so the ISR ends empty.
//! - the clock reaches the guest at its true IRQL: the test kernel's model of NT's DPC-watchdog
//!   accounting (`dpc_watchdog_max`) stays as small as natively with the default policy, and
//!   grows when the clock is forced to `replay` (which shows this test can fail).

use ackvisor_runner::{RunOutput, RunSpec, Verdict, run_shared};

fn machine(spec: RunSpec) -> std::sync::Arc<RunOutput> {
    match run_shared(&spec) {
        Ok(run) => run,
        Err(e) => panic!("model {}: {} could not run: {e}", spec.model, spec.name()),
    }
}

/// The DPC-class handler (IF=0 until its EOI) sends H twice: H is acknowledged and deferred,
/// the handler's EOI clears H's ISR bit, H is acknowledged again while the first waits. Both
/// must run (three acknowledges, three EOIs), or ISR keeps the DPC-class bit for good.
fn misdirected_eoi_delivers_every_acknowledge(model: &str) {
    let run = machine(RunSpec::new(model, "misdirected-eoi"));
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line("misdirected-eoi", None) {
        v.gt(l, "rounds", 0)
            .eq_field(l, "completed", "rounds")
            // The sequence really happened: every H was acknowledged inside the handler, and
            // the core saw each second acknowledge while the first one still waited.
            .eq_field(l, "h_acked_in_handler", "h_raised")
            .eq_field(l, "h_exits", "h_raised")
            .gt(l, "reacked", 0)
            .eq_field(l, "reacked", "rounds")
            // And it ended well: every acknowledge delivered (by replay), nothing in service.
            .eq_field(l, "h_ran", "h_raised")
            .eq_field(l, "h_replays", "h_raised")
            .eq_field(l, "dpc_ran", "dpc_raised")
            .eq_field(l, "dpc_injections", "dpc_raised")
            .eq(l, "isr_dpc_class", 0)
            .eq(l, "isr_left", 0)
            .eq(l, "irr_left", 0)
            .eq(l, "lost", 0)
            .eq(l, "other_anomalies", 0)
            .eq(l, "ctx_violations", 0);
    }
    v.finish();
}

/// Passthrough (bit 0) as the native yardstick and ack-replay (bit 2).
const PASSTHROUGH_AND_ACK_REPLAY: u32 = 1 | 1 << 2;

/// Runs passthrough and ack-replay with the clock's policy left at the platform default
/// (`None`) or forced, checks the run is sound and reports the policy it was asked for, and
/// hands the longest run of ticks at IRQL ≥ 2 of each (native, ack-replay) to `judge`.
fn watchdog_runs(
    model: &str,
    clock_policy: Option<&str>,
    judge: impl FnOnce(&mut Verdict<'_>, u64, u64),
) {
    let mut spec = RunSpec::new(model, "modes").param("modes", PASSTHROUGH_AND_ACK_REPLAY);
    if let Some(p) = clock_policy {
        spec = spec.param("clock_policy", p);
    }
    let run = machine(spec);
    let mut v = Verdict::new(&run);
    let want = clock_policy.unwrap_or("auto");
    let mut runs = [None; 2];
    for (slot, mode) in runs.iter_mut().zip(["passthrough", "ack-replay"]) {
        let Some(l) = v.line("modes", Some(mode)) else {
            continue;
        };
        v.eq(l, "lost", 0).eq(l, "isr_left", 0).gt(l, "ran", 0);
        if l.get("clock_policy") != Some(want) {
            v.fail(format!(
                "{}: field clock_policy: expected {want}, got {:?}",
                l.label(),
                l.get("clock_policy")
            ));
        }
        *slot = l.num("dpc_watchdog_max");
        if slot.is_none() {
            v.fail(format!("{}: no dpc_watchdog_max", l.label()));
        }
    }
    if let [Some(native), Some(replay)] = runs {
        judge(&mut v, native, replay);
    }
    v.finish();
}

/// Default policy: the clock is `auto` (injected below DISPATCH), so NT's count resets as it
/// does natively. Forced to `replay`: every tick looks like DISPATCH and the count only grows.
fn clock_reaches_the_guest_at_its_true_irql(model: &str) {
    watchdog_runs(model, None, |v, native, replay| {
        let ceiling = 2 * native.max(4);
        if replay > ceiling {
            v.fail(format!(
                "default policy: ack-replay dpc_watchdog_max {replay} > {ceiling} (native {native})"
            ));
        }
    });
    watchdog_runs(model, Some("replay"), |v, native, replay| {
        let floor = 10 * native.max(4);
        if replay < floor {
            v.fail(format!(
                "clock forced to replay: ack-replay dpc_watchdog_max {replay} < {floor} (native \
                 {native}): replayed ticks no longer look like DISPATCH to the model"
            ));
        }
    });
}

ackvisor_runner::per_model!(
    misdirected_eoi_delivers_every_acknowledge,
    clock_reaches_the_guest_at_its_true_irql,
);
