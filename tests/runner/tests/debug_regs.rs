//! Scenario `debug-regs` (issue 8, item 3): a guest's hardware breakpoint fires in handlers the
//! core runs in root (replay, exit-sti window), and a DR7 written inside such a handler is the
//! guest's DR7 afterwards.

use ackvisor_runner::{RunSpec, Verdict, run_shared};

fn breakpoints_follow_the_guest_into_root(model: &str) {
    let spec = RunSpec::new(model, "debug-regs");
    let run = match run_shared(&spec) {
        Ok(run) => run,
        Err(e) => panic!("model {model}: {} could not run: {e}", spec.name()),
    };
    let mut v = Verdict::new(&run);
    for mode in ["ack-replay", "exit-sti"] {
        if let Some(l) = v.line("debug-regs", Some(mode)) {
            let rounds = l.num("rounds").unwrap_or(0);
            // Natively every interrupt hits the breakpoint: Bochs raises it at all.
            v.gt(l, "rounds", 0)
                .eq(l, "native_hits", rounds)
                // Every handler ran in root and hit the guest's breakpoint there.
                .eq(l, "hw_bp_in_root", rounds)
                .eq(l, "hw_bp_in_guest", 0)
                // The handler's own DR7 write is what the guest has afterwards...
                .eq(l, "rewritten_in_root", 1)
                .eq(l, "dr7_kept", 1)
                // ...and the breakpoint it removed stays removed.
                .eq(l, "hits_after_removal", 0);
        }
    }
    v.finish();
}

#[test]
fn corei7_haswell_4770() {
    breakpoints_follow_the_guest_into_root("corei7_haswell_4770");
}

#[test]
fn corei7_skylake_x() {
    breakpoints_follow_the_guest_into_root("corei7_skylake_x");
}
