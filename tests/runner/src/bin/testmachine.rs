//! `cargo run -p ackvisor-runner --bin testmachine [-- OPTIONS]`:
//!
//! - no mode flag: boots the test machine, virtualizes it, runs every interrupt mode in turn and
//!   prints what the machine printed (the hypervisor's statistics per mode, the RESULT lines);
//! - `--serve [--for SECS]`: boots it (2 CPUs unless `--cpus`) with the hypervisor loaded and the
//!   control server on COM1, keeps the workload's interrupts flowing on every CPU, and prints the
//!   `ackctl --machine localhost:PORT ...` line to use from another terminal; runs until Ctrl-C
//!   or SECS seconds, then closes the machine's books and prints them;
//! - `--demo`: the same machine, driven by the real `ackctl` binary: every mode in turn, its
//!   `ackctl stats` table, then the machine's own books, then power off;
//! - `--driver` (with `--serve` or `--demo`): the real ackvisor.sys instead of the kernel's own
//!   core: the runner puts the image on the disk, the machine's miniature NT calls its
//!   DriverEntry, every `ackctl` request reaches it as IRP_MJ_CREATE, IRP_MJ_DEVICE_CONTROL and
//!   IRP_MJ_CLOSE, and at the end DriverUnload runs and the verifier's books are judged (the
//!   command fails when they are not clean).

use std::time::{Duration, Instant};

use ackvisor_runner::{MODELS, Machine, RunSpec, Verdict, ackctl, run, serve_driver, start};

enum What {
    Scenario,
    Serve(Option<Duration>),
    Demo,
}

fn main() {
    let mut spec = RunSpec::new(MODELS[0], "demo").param("rounds", 200);
    let mut what = What::Scenario;
    let mut cpus = None;
    let mut secs = None;
    let mut driver = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--model" => spec.model = value(),
            "--cpus" => {
                let n: u32 = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--cpus takes a number"));
                cpus = Some(n);
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
            "--serve" => what = What::Serve(None),
            "--for" => {
                let s: f64 = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--for takes seconds"));
                secs = Some(Duration::from_secs_f64(s));
            }
            "--demo" => what = What::Demo,
            "--driver" => driver = true,
            "--no-stats" => spec.stats = false,
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if let (What::Serve(limit), Some(s)) = (&mut what, secs) {
        *limit = Some(s);
    }
    match what {
        What::Scenario if driver => usage("--driver goes with --serve or --demo"),
        What::Scenario => scenario(&spec),
        What::Serve(limit) => serve(serve_spec(&spec, cpus, driver), limit),
        What::Demo => demo(serve_spec(&spec, cpus, driver)),
    }
}

/// The serve machine: the model, stats choice and extra params of `spec`, 2 CPUs by default
/// ([`serve_driver::CPUS`] with the driver).
fn serve_spec(spec: &RunSpec, cpus: Option<u32>, driver: bool) -> RunSpec {
    let mut s = if driver {
        serve_driver::spec(&spec.model, cpus.unwrap_or(serve_driver::CPUS), 0)
    } else {
        RunSpec::serve(&spec.model, cpus.unwrap_or(2), 0)
    };
    s.stats = spec.stats;
    for (k, v) in &spec.params {
        if !matches!(k.as_str(), "scenario" | "smp" | "rounds") {
            s = s.param(k, v);
        }
    }
    s.timeout = Duration::from_secs(24 * 3600);
    s
}

fn scenario(spec: &RunSpec) {
    match run(spec) {
        Ok(out) => {
            print_machine_output(&out.console);
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
        Err(e) => fail(&e),
    }
}

/// Bochs's banner and debugger chatter come first; the machine's output starts with its own
/// greeting.
fn print_machine_output(console: &str) {
    let start = console.find("ackvisor test machine").unwrap_or(0);
    for line in console[start..]
        .lines()
        .filter(|l| !l.starts_with('(') && !l.starts_with("Next at"))
    {
        println!("{line}");
    }
}

fn boot(spec: &RunSpec) -> (Machine, String) {
    let mut m = start(spec).unwrap_or_else(|e| fail(&e));
    if let Err(e) = m.wait_for_result("serve-ready", Duration::from_secs(120)) {
        fail(&e);
    }
    let addr = m.machine_arg().unwrap_or_else(|| fail("no serial link"));
    (m, addr)
}

/// Closes the books, prints the machine's final lines; with the driver, judges its books and
/// the verifier's after DriverUnload.
fn finish(m: Machine) {
    if let Err(e) = m.finish() {
        fail(&e);
    }
    let out = m.wait().unwrap_or_else(|e| fail(&e));
    println!("--- the machine's own books (raised == handled per vector and CPU):");
    for l in out
        .results
        .iter()
        .filter(|l| l.scenario.starts_with("serve"))
    {
        println!("{}", l.raw);
    }
    let driver = out.spec.scenario() == serve_driver::SCENARIO;
    if driver {
        println!(
            "--- the image's counters against the machine's runs (since the last reset), then \
             DriverUnload and the verifier's books:"
        );
        for l in out
            .results
            .iter()
            .filter(|l| l.scenario == serve_driver::SCENARIO && l.get("end").is_none())
        {
            println!("{}", l.raw);
        }
    }
    println!("--- run directory {}", out.out_dir.display());
    if driver {
        let mut v = Verdict::new(&out);
        serve_driver::judge(&mut v, &out, u64::from(out.spec.cpus), 1);
        if !v.failures().is_empty() {
            fail(&format!(
                "the books are not clean:\n  {}",
                v.failures().join("\n  ")
            ));
        }
        println!("--- books clean: nothing lost, nothing leaked, every IRP completed once");
    }
}

fn serve(spec: RunSpec, limit: Option<Duration>) {
    let (mut m, addr) = boot(&spec);
    let ackctl_path = ackctl::binary()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "ackctl".into());
    if spec.scenario() == serve_driver::SCENARIO {
        println!(
            "test machine up: {} CPUs of {}, the real ackvisor.sys loaded (DriverEntry ran), \
             interrupts flowing on the BSP; each ackctl request reaches the image as IRPs.",
            spec.cpus, spec.model
        );
    } else {
        println!(
            "test machine up: {} CPUs of {}, hypervisor loaded, interrupts flowing on every CPU.",
            spec.cpus, spec.model
        );
    }
    // With the image on 2 CPUs a per-CPU statistics reply can take longer than ackctl's
    // default 3 s (see LINK_TIMEOUT).
    let machine = if spec.scenario() == serve_driver::SCENARIO {
        format!("--machine {addr} --timeout {LINK_TIMEOUT}")
    } else {
        format!("--machine {addr}")
    };
    println!("From another terminal:");
    println!("  {ackctl_path} {machine} status");
    println!("  {ackctl_path} {machine} mode exit-sti");
    println!("  {ackctl_path} {machine} stats --per-cpu --watch 1");
    match limit {
        Some(l) => println!(
            "Running for {:.0} s (Ctrl-C stops it at once).",
            l.as_secs_f64()
        ),
        None => println!("Running until Ctrl-C (or use --for SECS to close its books at the end)."),
    }
    let started = Instant::now();
    while m.running() && limit.is_none_or(|l| started.elapsed() < l) {
        std::thread::sleep(Duration::from_millis(200));
    }
    if !m.running() {
        print_machine_output(&m.console());
        fail("the machine stopped");
    }
    finish(m);
}

fn demo(spec: RunSpec) {
    let (m, addr) = boot(&spec);
    let ackctl = |args: &[&str]| {
        let mut full = vec!["--timeout", LINK_TIMEOUT];
        full.extend_from_slice(args);
        let out = ackctl::run(&addr, &full).unwrap_or_else(|e| fail(&e));
        println!("$ {}", out.command);
        print!("{}", out.stdout);
        if !out.ok() {
            eprint!("{}", out.stderr);
            eprintln!("--- machine console tail:\n{}", tail(&m.console(), 30));
            fail(&format!("`{}` failed", out.command));
        }
    };
    ackctl(&["status"]);
    for mode in ["passthrough", "exit-sti", "ack-replay", "ack-inject"] {
        println!();
        ackctl(&["mode", mode]);
        ackctl(&["stats", "reset"]);
        std::thread::sleep(Duration::from_secs(2));
        ackctl(&["stats"]);
    }
    println!();
    ackctl(&["status"]);
    finish(m);
}

/// `ackctl --timeout` for the demo: Bochs emulating two CPUs on a busy host can take longer than
/// ackctl's default 3 s to send a 21 KiB statistics reply.
const LINK_TIMEOUT: &str = "20";

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn fail(e: &str) -> ! {
    eprintln!("testmachine: {e}");
    std::process::exit(1)
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("{problem}");
    }
    eprintln!(
        "usage: testmachine [--model M] [--cpus N] [--no-stats] [--param key=value]...\n\
         \x20      [--scenario demo|modes|boot|vmcall|cycles|rejected|bench|misdirected-eoi]   run one scenario (default demo)\n\
         \x20      --serve [--for SECS]   keep the machine running for ackctl --machine (2 CPUs by default)\n\
         \x20      --demo                 flip every mode with the real ackctl and print its tables\n\
         \x20      --driver               with --serve or --demo: the real ackvisor.sys answers, as IRPs (2 CPUs by default)"
    );
    std::process::exit(2)
}
