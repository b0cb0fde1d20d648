//! The kernel refuses params it does not know: a misspelt or stale param would otherwise run
//! the scenario with a default, and a test would pass on something it never asked for.

use ackvisor_runner::{MODELS, RunSpec, run};

/// An unknown param and a malformed value both fail the run with a `fatal` line naming the
/// first one, before any scenario runs.
#[test]
fn an_unknown_kernel_param_fails_the_run() {
    let spec = RunSpec::new(MODELS[0], "boot")
        .param("rounds", 10)
        .param("no_such_param", 1)
        .param("stretch", "lots");
    let out = run(&spec).unwrap_or_else(|e| panic!("{} could not run: {e}", spec.name()));
    let fatal = out
        .lines("boot", None)
        .find(|l| l.get("fatal").is_some())
        .unwrap_or_else(|| {
            panic!(
                "no fatal line for an unknown param; console tail:\n{}",
                out.tail(15)
            )
        });
    assert_eq!(fatal.num("params_rejected"), Some(2), "{}", fatal.raw);
    assert_eq!(
        fatal.get("first_rejected"),
        Some("no_such_param=1"),
        "{}",
        fatal.raw
    );
    assert!(
        out.line("boot", Some("native")).is_none(),
        "the scenario must not run with rejected params"
    );
}
