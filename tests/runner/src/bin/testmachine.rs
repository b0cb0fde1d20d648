//! `cargo run -p ackvisor-runner --bin testmachine [-- --model M --cpus N --scenario S]`:
//! boots the test machine, virtualizes it, runs every interrupt mode in turn and prints what the
//! machine printed: the hypervisor's statistics per mode and the RESULT lines.

use ackvisor_runner::{MODELS, RunSpec, run};

fn main() {
    let mut spec = RunSpec::new(MODELS[0], "demo").param("rounds", 200);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--model" => spec.model = value(),
            "--cpus" => {
                let n = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--cpus takes a number"));
                spec = spec.cpus(n);
            }
            "--scenario" => {
                let s = value();
                spec.params.retain(|(k, _)| k != "scenario");
                spec.params.insert(0, ("scenario".into(), s));
            }
            "--param" => {
                let kv = value();
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| usage("--param takes key=value"));
                spec = spec.param(k, v);
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    match run(&spec) {
        Ok(out) => {
            // Bochs's banner and debugger chatter come first; the machine's output starts with
            // its own greeting.
            let start = out.console.find("ackvisor test machine").unwrap_or(0);
            for line in out.console[start..]
                .lines()
                .filter(|l| !l.starts_with('(') && !l.starts_with("Next at"))
            {
                println!("{line}");
            }
            println!(
                "--- {} on {} in {:.2}s; run directory {}",
                spec.name(),
                spec.model,
                out.wall.as_secs_f64(),
                out.out_dir.display()
            );
            if out.timed_out {
                eprintln!("Bochs timed out");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("{problem}");
    }
    eprintln!(
        "usage: testmachine [--model M] [--cpus N] [--scenario demo|modes|boot|vmcall|cycles|rejected|bench] [--param key=value]..."
    );
    std::process::exit(2)
}
