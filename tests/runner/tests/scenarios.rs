//! One test per scenario × CPU model. Each boots the test machine under Bochs and judges its
//! RESULT lines; a failure names the model, the line, the field, the expected and the got value.
//! Tests of scenarios 1-3 judge the same `modes` run (run once per process).

use ackvisor_runner::{RunOutput, RunSpec, Verdict, run_shared};

use ackvisor_runner::modes::ALL as MODES;

/// The modes multi-CPU runs go through: `ACKVISOR_TEST_MODES` (comma list; an unknown name
/// fails) or all four, and the kernel's `modes` param for them.
fn multi_cpu_modes() -> (Vec<&'static str>, u32) {
    let list = ackvisor_runner::modes::from_env();
    let bits = ackvisor_runner::modes::bits(&list);
    (list, bits)
}

fn machine(spec: RunSpec) -> std::sync::Arc<RunOutput> {
    match run_shared(&spec) {
        Ok(run) => run,
        Err(e) => panic!("model {}: {} could not run: {e}", spec.model, spec.name()),
    }
}

/// Checks every scenario makes about the interrupt machinery itself.
fn machine_is_sound(v: &mut Verdict<'_>, line: &ackvisor_runner::ResultLine) {
    v.eq(line, "undrained", 0)
        .eq(line, "lost", 0)
        .eq(line, "isr_left", 0)
        .eq(line, "canary_broken", 0)
        .eq(line, "ctx_violations", 0)
        .eq(line, "wrong_idt", 0)
        .eq(line, "unexpected", 0)
        .eq(line, "ring3_bad_exits", 0)
        .eq(line, "unraised", 0)
        .eq(line, "clock_dups", 0)
        .gt(line, "ran", 0)
        .eq_field(line, "ran", "raised");
}

/// The core's books against the machine's, exact in every mode: one exit per run an
/// acknowledging exit brought (spurious vector included), each either replayed or injected;
/// exit-sti never sees valid interruption info in its window, and an exit follows every
/// hand-over (it re-arms external-interrupt exiting).
fn core_books_are_exact(v: &mut Verdict<'_>, line: &ackvisor_runner::ResultLine) {
    v.eq(line, "exit_mismatch", 0)
        .eq(line, "replay_mismatch", 0)
        .eq(line, "inject_mismatch", 0)
        .eq(line, "sti_window_info_valid", 0)
        .eq_field(line, "exiting_resumes", "guest_takes");
    match line.get("mode") {
        Some("ack-replay" | "ack-inject") => {
            v.gt(line, "acked", 0)
                .eq_field(line, "acked", "exits_extint");
        }
        Some("exit-sti") => {
            v.gt(line, "exiting_resumes", 0).eq(line, "acked", 0);
        }
        _ => {
            v.eq(line, "acked", 0).eq(line, "exits_extint", 0);
        }
    }
}

/// Scenario 0: no hypervisor. The machine's own accounting holds natively, so later failures
/// are the core's.
fn boot_counts_every_interrupt_natively(model: &str) {
    let run = machine(RunSpec::new(model, "boot"));
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line("boot", Some("native")) {
        machine_is_sound(&mut v, l);
        v.eq(l, "vmx", 1)
            .gt(l, "dpc_guest", 0)
            .gt(l, "nested", 0)
            .eq(l, "replayed", 0)
            .eq_field(l, "guest", "ran");
    }
    v.finish();
}

/// Scenario 1: in every mode, raised == handled per vector, nothing left in service.
fn every_mode_delivers_each_interrupt_once(model: &str) {
    let run = machine(RunSpec::new(model, "modes"));
    let mut v = Verdict::new(&run);
    for mode in MODES {
        if let Some(l) = v.line("modes", Some(mode)) {
            machine_is_sound(&mut v, l);
            core_books_are_exact(&mut v, l);
            v.eq(l, "virtualized", 1)
                .eq(l, "ping", 1)
                .eq(l, "irr_left", 0);
        }
    }
    v.finish();
}

/// Scenario 2: ack-replay exits once per interrupt, replays in root at CR8 ≥ 2 (also inside the
/// guest's own handlers and from CPL 3), injects the DPC vector and never runs it in root,
/// defers (Bochs lets one exit through after a guest `cli`) and never runs a handler the
/// interrupted code masked. The clock is forced to `replay` (its default `auto` injects it
/// below DISPATCH, issue 8), so that every vector above DISPATCH takes the replay path, the
/// one that arrives at CPL 3 included.
fn ack_replay_exits_once_and_replays_in_root(model: &str) {
    let run = machine(RunSpec::new(model, "modes").param("clock_policy", "replay"));
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line("modes", Some("ack-replay")) {
        v.eq(l, "exit_mismatch", 0)
            .eq(l, "replay_mismatch", 0)
            .eq(l, "inject_mismatch", 0)
            .gt(l, "replayed", 0)
            .gt(l, "nested_root", 0)
            .gt(l, "replayed_nested", 0)
            .gt(l, "replayed_from_ring3", 0)
            .gt(l, "deferrals", 0)
            .eq(l, "guest_hi", 0)
            .eq(l, "replay_low_cr8", 0)
            .eq(l, "dpc_in_root", 0)
            .gt(l, "dpc_guest", 0)
            .eq_field(l, "core_dpc_injections", "dpc_guest")
            .eq(l, "ctx_violations", 0)
            .eq(l, "canary_broken", 0)
            .eq(l, "anomalies", 0);
    }
    v.finish();
}

/// Scenario 3: exit-sti runs vectors in root through its window, ack-inject runs them in the
/// guest, passthrough takes no external-interrupt exit.
fn each_mode_runs_handlers_where_it_should(model: &str) {
    let run = machine(RunSpec::new(model, "modes"));
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line("modes", Some("exit-sti")) {
        v.gt(l, "sti_window", 0)
            .gt(l, "exits_extint", 0)
            .eq(l, "replayed", 0)
            .eq(l, "dpc_in_root", 0);
    }
    if let Some(l) = v.line("modes", Some("ack-inject")) {
        v.eq(l, "replayed", 0)
            .eq(l, "sti_window", 0)
            .eq(l, "nested_root", 0)
            .eq_field(l, "guest", "ran")
            .eq(l, "exit_mismatch", 0)
            .eq(l, "inject_mismatch", 0)
            .gt(l, "exits_extint", 0);
    }
    if let Some(l) = v.line("modes", Some("passthrough")) {
        v.eq(l, "exits_extint", 0)
            .eq(l, "replayed", 0)
            .eq(l, "sti_window", 0)
            .eq(l, "nested_root", 0)
            .eq_field(l, "guest", "ran");
    }
    v.finish();
}

/// Scenario 4: a VMCALL from CPL 3 (even with our key) and one with a wrong key reach the guest
/// as #UD; ours still answers.
fn vmcall_from_ring3_or_with_wrong_key_gets_ud(model: &str) {
    let run = machine(RunSpec::new(model, "vmcall"));
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line("vmcall", None) {
        v.eq(l, "native_ring3_vector", 6)
            .eq(l, "native_ring0_vector", 6)
            .eq(l, "ping", 1)
            .eq(l, "ring3_vector", 6)
            .eq(l, "ring3_at_vmcall", 1)
            .eq(l, "wrong_key_vector", 6)
            .eq(l, "ping_after", 1)
            .eq(l, "foreign_vmcalls", 2);
    }
    v.finish();
}

/// Scenario 5: 20 virtualize/devirtualize cycles give every page back; ping after each.
fn twenty_cycles_return_every_page_and_a_failed_entry_is_refused(model: &str) {
    let run = machine(RunSpec::new(model, "cycles").param("cycles", 20));
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line("cycles", None) {
        v.eq(l, "virtualized", 20)
            .eq(l, "pings", 20)
            .eq(l, "devirtualized", 20)
            .eq(l, "leaky_cycles", 0)
            .eq_field(l, "pool_end", "pool_start")
            .eq(l, "lost", 0)
            // A first VM entry failing its guest-state checks (TSS not busy) is a refusal:
            // exit reason 0x80000021, every page back, and the 20 cycles after it still work.
            .eq(l, "refused_entry", 1)
            .eq(l, "refused_reason", 0x8000_0021)
            .eq(l, "refused_pool_back", 1);
    }
    v.finish();
}

/// Scenario 6: gates with IST≠0 or DPL 3 are rejected: injected, counted, run in the guest.
fn rejected_gates_are_injected(model: &str) {
    let run = machine(RunSpec::new(model, "rejected").param("rounds", 50));
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line("rejected", None) {
        v.eq(l, "drained", 1)
            .eq(l, "isr_left", 0)
            .eq(l, "ctx_violations", 0)
            .eq(l, "canary_broken", 0);
        for gate in ["ist", "dpl3"] {
            let k = |f: &str| format!("{gate}_{f}");
            v.gt(l, &k("raised"), 0)
                .eq_field(l, &k("ran"), &k("raised"))
                .eq_field(l, &k("guest"), &k("ran"))
                .eq(l, &k("root"), 0)
                .eq_field(l, &k("injections"), &k("ran"))
                .eq(l, &k("replays"), 0);
        }
        if let (Some(a), Some(b)) = (l.num("ist_ran"), l.num("dpl3_ran")) {
            v.eq(l, "rejected_gates", a + b);
        }
    }
    v.finish();
}

/// Scenario 7: the benchmark prints its figures for every mode (speed is never asserted).
fn bench_prints_figures(model: &str) {
    let run = machine(RunSpec::new(model, "bench").param("bench_ticks", 300));
    let mut v = Verdict::new(&run);
    for mode in MODES {
        if let Some(l) = v.line("bench", Some(mode)) {
            v.gt(l, "bytes_per_cpu", 0).gt(l, "tsc", 0);
            if mode != "passthrough" {
                v.gt(l, "exits_extint", 0);
            }
        }
    }
    v.finish();
}

/// Scenarios 1-2 on `cpus` CPUs (APs started with INIT-SIPI-SIPI): the workload runs on all
/// at once, with cross-CPU IPIs between them besides each CPU's clock and self-IPIs; each CPU's
/// IDT has its own PER_CPU_VECTOR handler, and each tallies itself (a cross-CPU vector is
/// counted raised on its target by its sender).
fn cpus_deliver_and_replay_on_each_cpu(model: &str, cpus: u32) {
    let (modes, bits) = multi_cpu_modes();
    let run = machine(RunSpec::new(model, "modes").cpus(cpus).param("modes", bits));
    let mut v = Verdict::new(&run);
    for mode in modes {
        if let Some(l) = v.line("modes", Some(mode)) {
            machine_is_sound(&mut v, l);
            core_books_are_exact(&mut v, l);
            v.eq(l, "cpus", cpus.into())
                .eq(l, "virtualized", 1)
                .eq(l, "ping", 1)
                .gt(l, "cross_sent", 0)
                .eq_field(l, "cross_handled", "cross_sent");
        }
    }
    if let Some(l) = v.line("modes", Some("ack-replay")) {
        v.eq(l, "exit_mismatch", 0)
            .eq(l, "replay_mismatch", 0)
            .eq(l, "inject_mismatch", 0)
            .gt(l, "replayed", 0)
            .eq(l, "guest_hi", 0)
            .eq(l, "dpc_in_root", 0)
            .eq(l, "replay_low_cr8", 0);
    }
    v.finish();
}

fn two_cpus_deliver_and_replay_on_each_cpu(model: &str) {
    cpus_deliver_and_replay_on_each_cpu(model, 2);
}

fn three_cpus_deliver_and_replay_on_each_cpu(model: &str) {
    cpus_deliver_and_replay_on_each_cpu(model, 3);
}

fn four_cpus_deliver_and_replay_on_each_cpu(model: &str) {
    cpus_deliver_and_replay_on_each_cpu(model, 4);
}

/// exit-sti opens its window on the VMM's stack; a handler that arrives there while the guest
/// was inside its own handler (on the ISR stack) must not overwrite that handler's live frame.
/// Long handler bodies make the clock arrive inside them often (one CPU, no cross-CPU IPIs).
fn exit_sti_window_keeps_an_interrupted_guest_handler_intact(model: &str) {
    let run = machine(
        RunSpec::new(model, "modes")
            .param("modes", 1 << 1)
            .param("handler_body", 3000),
    );
    let mut v = Verdict::new(&run);
    if let Some(l) = v.line("modes", Some("exit-sti")) {
        machine_is_sound(&mut v, l);
        core_books_are_exact(&mut v, l);
        // The precondition of this test: windows did open while a guest handler was live.
        v.gt(l, "sti_window", 0).gt(l, "sti_window_nested", 0);
    }
    v.finish();
}

/// Scenario 7 on two CPUs, with the core's counters and without them (feature `stats` off):
/// figures for both, the counters' memory included.
fn bench_prints_figures_on_two_cpus_with_and_without_stats(model: &str) {
    for stats in [true, false] {
        let mut spec = RunSpec::new(model, "bench")
            .cpus(2)
            .param("bench_ticks", 300);
        if !stats {
            spec = spec.without_stats();
        }
        let run = machine(spec);
        let mut v = Verdict::new(&run);
        for mode in MODES {
            if let Some(l) = v.line("bench", Some(mode)) {
                v.eq(l, "cpus", 2)
                    .eq(l, "stats", u64::from(stats))
                    .gt(l, "bytes_per_cpu", 0)
                    .gt(l, "tsc", 0)
                    .gt(l, "gaps", 0);
                if mode != "passthrough" {
                    if stats {
                        v.gt(l, "exits_extint", 0).gt(l, "exits_timed", 0);
                    } else {
                        // Without `stats` the exit path has no counters and no timing at all.
                        v.eq(l, "exits_extint", 0).eq(l, "exits_timed", 0);
                    }
                }
            }
        }
        v.finish();
    }
}

/// Scenario 1 with the kernel built without the core's counters (feature `stats` off): the
/// delivery itself does not depend on them. The core's per-vector books are compiled out, so
/// they must read 0 while the machine's own books still add up.
fn modes_without_stats_deliver_each_interrupt_once(model: &str) {
    let run = machine(RunSpec::new(model, "modes").without_stats());
    let mut v = Verdict::new(&run);
    for mode in MODES {
        if let Some(l) = v.line("modes", Some(mode)) {
            machine_is_sound(&mut v, l);
            v.eq(l, "virtualized", 1)
                .eq(l, "ping", 1)
                .eq(l, "irr_left", 0)
                .eq(l, "exits_extint", 0)
                .eq(l, "core_replays", 0)
                .eq(l, "core_injections", 0);
            match mode {
                "ack-replay" => {
                    v.gt(l, "acked", 0)
                        .gt(l, "replayed", 0)
                        .eq(l, "dpc_in_root", 0)
                        .eq(l, "guest_hi", 0);
                }
                "ack-inject" => {
                    v.gt(l, "acked", 0).eq_field(l, "guest", "ran");
                }
                "exit-sti" => {
                    v.gt(l, "sti_window", 0).eq(l, "acked", 0);
                }
                _ => {
                    v.eq(l, "acked", 0).eq_field(l, "guest", "ran");
                }
            }
        }
    }
    v.finish();
}

ackvisor_runner::per_model!(
    boot_counts_every_interrupt_natively,
    every_mode_delivers_each_interrupt_once,
    ack_replay_exits_once_and_replays_in_root,
    each_mode_runs_handlers_where_it_should,
    vmcall_from_ring3_or_with_wrong_key_gets_ud,
    twenty_cycles_return_every_page_and_a_failed_entry_is_refused,
    rejected_gates_are_injected,
    bench_prints_figures,
    two_cpus_deliver_and_replay_on_each_cpu,
    three_cpus_deliver_and_replay_on_each_cpu,
    four_cpus_deliver_and_replay_on_each_cpu,
    exit_sti_window_keeps_an_interrupted_guest_handler_intact,
    bench_prints_figures_on_two_cpus_with_and_without_stats,
    modes_without_stats_deliver_each_interrupt_once,
);
