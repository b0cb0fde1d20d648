//! `cargo run -p ackvisor-runner --bin bench [-- MODEL...]`: per CPU model and interrupt mode,
//! external-interrupt exits, root cycles per exit with and without the replayed handler body,
//! and the hypervisor's memory per CPU. Under Bochs `clock: sync=none` the TSC counts emulated
//! instructions, so the cycle figures are instruction counts, comparable between modes only.

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
        "{:<22} {:<12} {:>6} {:>10} {:>12} {:>8} {:>16} {:>24} {:>10} {:>14}",
        "model",
        "mode",
        "ticks",
        "tsc/tick",
        "extint exits",
        "exits",
        "root cyc/exit",
        "root cyc/exit excl hndlr",
        "max",
        "bytes/cpu"
    );
    let mut failed = false;
    for model in &models {
        let spec = RunSpec::new(model, "bench").param("bench_ticks", 2000);
        match run(&spec) {
            Ok(out) => {
                let lines: Vec<_> = out
                    .lines("bench", None)
                    .filter(|l| l.get("mode").is_some())
                    .collect();
                if lines.is_empty() {
                    eprintln!("{model}: no bench lines; console tail:\n{}", out.tail(20));
                    failed = true;
                }
                for l in lines {
                    let f = |k: &str| l.get(k).unwrap_or("?").to_string();
                    println!(
                        "{:<22} {:<12} {:>6} {:>10} {:>12} {:>8} {:>16} {:>24} {:>10} {:>14}",
                        model,
                        f("mode"),
                        f("ticks"),
                        f("tsc_per_tick"),
                        f("exits_extint"),
                        f("exits_total"),
                        f("root_cycles_per_exit"),
                        f("root_cycles_per_exit_excl_handler"),
                        f("root_cycles_max"),
                        f("bytes_per_cpu")
                    );
                }
            }
            Err(e) => {
                eprintln!("{model}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
