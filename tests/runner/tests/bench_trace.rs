//! Issue 11: the benchmark's in-path instrument (Bochs's instruction trace between the
//! kernel's magic breakpoints) sees every exit of the traced ticks as one stub-to-VMRESUME
//! window with the OS handler cut out, and nothing it cannot place. Asserts that the
//! instrument works, never a figure's size (STYLE §2.9).

use ackvisor_runner::trace::{VMCS_ACCESS, root_counts_by_mode};
use ackvisor_runner::{MODELS, RunSpec, run};

#[test]
fn trace_counts_one_window_per_exit_and_cuts_out_the_handler() {
    let ticks = 8u64;
    let spec = RunSpec::new(MODELS[0], "bench")
        .param("bench_ticks", 200)
        .param("trace_ticks", ticks)
        .traced(4);
    let out = run(&spec).expect("run the bench scenario");
    let counts = root_counts_by_mode(&out.console).expect("a map line");
    let pass = &counts["passthrough"];
    assert_eq!(pass.exits, 0, "passthrough has no exits: {pass:?}");
    assert!(pass.handler_runs >= ticks, "passthrough handlers: {pass:?}");
    for mode in ["exit-sti", "ack-replay", "ack-inject"] {
        let c = &counts[mode];
        // Each traced tick is one exit; the clock armed before the end adds at most one.
        assert!(
            (ticks..=ticks + 1).contains(&c.exits),
            "{mode}: {} windows for {ticks} ticks",
            c.exits
        );
        assert_eq!(c.irregular, 0, "{mode}: windows the reader could not place");
        assert!(
            c.of(&VMCS_ACCESS) >= c.exits,
            "{mode}: every exit reads the VMCS"
        );
        assert!(
            c.handler_runs >= ticks,
            "{mode}: handler runs {}",
            c.handler_runs
        );
        if mode != "ack-inject" {
            // The handler ran inside the window and was cut out of the root count.
            assert!(
                c.handler_instructions > 0,
                "{mode}: no handler inside the window"
            );
        } else {
            assert_eq!(
                c.handler_instructions, 0,
                "ack-inject runs the handler in the guest"
            );
        }
    }
}
