//! `cargo run -p ackvisor-runner --bin bench [-- MODEL...]`: per CPU model, CPU count (1 and 2),
//! kernel build (the core's `stats` feature on and off) and interrupt mode: external-interrupt
//! exits, root cycles per exit with and without the replayed handler body, and the hypervisor's
//! memory per CPU. The clock runs on every CPU at once; figures are summed over CPUs. Under
//! Bochs `clock: sync=none` the TSC counts emulated instructions, so the cycle figures are
//! instruction counts, comparable between modes and builds only. Without `stats` the core keeps
//! only the timed-exit count and the cycle sums, so "exits" is the timed count in both builds.

use ackvisor_runner::{MODELS, RunSpec, run};

fn main() {
    let models: Vec<String> = {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.is_empty() {
            MODELS.iter().map(|m| m.to_string()).collect()
        } else {
            args
        }
    };
    println!(
        "{:<20} {:>4} {:>5} {:<12} {:>6} {:>10} {:>8} {:>14} {:>24} {:>10} {:>10}",
        "model",
        "cpus",
        "stats",
        "mode",
        "ticks",
        "tsc/tick",
        "exits",
        "root cyc/exit",
        "root cyc/exit excl hndlr",
        "max",
        "bytes/cpu"
    );
    let mut failed = false;
    for model in &models {
        for cpus in [1, 2] {
            for stats in [true, false] {
                let mut spec = RunSpec::new(model, "bench")
                    .cpus(cpus)
                    .param("bench_ticks", 2000);
                if !stats {
                    spec = spec.without_stats();
                }
                match run(&spec) {
                    Ok(out) => {
                        let lines: Vec<_> = out
                            .lines("bench", None)
                            .filter(|l| l.get("mode").is_some())
                            .collect();
                        if lines.is_empty() {
                            eprintln!(
                                "{model} cpus={cpus} stats={stats}: no bench lines; console tail:\n{}",
                                out.tail(20)
                            );
                            failed = true;
                        }
                        for l in lines {
                            let f = |k: &str| l.get(k).unwrap_or("?").to_string();
                            println!(
                                "{:<20} {:>4} {:>5} {:<12} {:>6} {:>10} {:>8} {:>14} {:>24} {:>10} {:>10}",
                                model,
                                cpus,
                                if stats { "on" } else { "off" },
                                f("mode"),
                                f("ticks"),
                                f("tsc_per_tick"),
                                f("exits_timed"),
                                f("root_cycles_per_exit"),
                                f("root_cycles_per_exit_excl_handler"),
                                f("root_cycles_max"),
                                f("bytes_per_cpu")
                            );
                        }
                    }
                    Err(e) => {
                        eprintln!("{model} cpus={cpus} stats={stats}: {e}");
                        failed = true;
                    }
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
