//! `cargo run -p ackvisor-runner --bin bench [-- MODEL...]`: what one clock interrupt costs in
//! each mode, per CPU model, on 1 and 2 CPUs, with the core's `stats` feature on and off.
//! One line per mode:
//!
//! `RESULT bench mode=M cpus=N stats=S e2e=.. guest_overhead=.. vmcs=.. heavy=.. agree=..`
//!
//! - `e2e`: instructions per VM exit from the exit stub's first instruction to VMRESUME, the
//!   OS handler's own instructions (gate entry to its IRETQ) left out. Counted by Bochs itself:
//!   the kernel brackets `trace_ticks` halted clock ticks per mode with magic breakpoints, the
//!   debugger traces every instruction in between, and [`ackvisor_runner::trace`] counts them.
//! - `guest_overhead`: the guest spins on the TSC (= instructions under `clock: sync=none`) for
//!   `bench_ticks` ticks; mean gap per interrupt in the mode minus that in passthrough, where
//!   the same handler runs without an exit. Independent of the trace.
//! - `vmcs`: VMREAD + VMWRITE per exit; `heavy`: FXSAVE, FXRSTOR, RDTSC(P), RDMSR, WRMSR (and
//!   the XSAVE family) per exit; both counted from the same trace by mnemonic.
//! - `agree`: whether `e2e` and `guest_overhead` are within 5% of each other; `agree_net` the
//!   same after taking `handler_delta` (below) out of `guest_overhead`.
//! - `handler`, `handler_delta`: the OS handler's instructions per run (gate entry to IRETQ,
//!   from the same trace) and their difference to passthrough's. The test kernel's handler
//!   does a little more bookkeeping when it finds itself called from root: that difference is
//!   in `guest_overhead` and not in `e2e`, and explains most of the gap between them.
//!
//! Then the real ackvisor.sys (`nt-bench`, [`ackvisor_runner::image_bench`]), release and
//! debug image, 1 CPU, stats on (the image's own build), one line per mode beside the test
//! kernel's figure for the same mode, CPU count and stats:
//!
//! `RESULT bench-image image=P mode=M e2e=.. guest_overhead=.. agree_net=.. irql_calls=..
//! irql=.. platform_e2e=.. vs_platform=..`
//!
//! - `e2e`, `guest_overhead`, `agree`, `agree_net`, `handler_delta`: as above, the window
//!   opening at the image's HOST_RIP (its PDB's `vm_exit_entry` at the load base).
//! - `irql_calls`, `irql`: calls of KfRaiseIrql/KeLowerIrql through the image's import table
//!   per exit, and their instructions per exit (the miniature NT's routines; part of `e2e`).
//! - `exits_stats`: the image's own count of the traced phase's exits (the statistics IOCTL).
//! - `platform_e2e`: the test kernel's `e2e` (cpus=1 stats=on); `vs_platform`: the difference.
//! - `xmm_unsaved`: counted instructions naming a vector register outside FXSAVE..FXRSTOR
//!   (the guest's own registers; must be 0), the first one printed below the line.
//!
//! `bench --image-only [MODEL...]` runs only the kernel's cpus=1 stats=on line and the image's.
//!
//! Exits 1 if a run fails or prints no figures; never asserts on the figures themselves.

use std::collections::BTreeMap;

use ackvisor_runner::driver::Profile;
use ackvisor_runner::image_bench::{self, ModeFigures, Shape};
use ackvisor_runner::trace::{HEAVY, RootCount, VMCS_ACCESS, root_counts_by_mode};
use ackvisor_runner::{MODELS, RunOutput, RunSpec, run};

/// Ticks per mode for the gap instrument.
const BENCH_TICKS: u32 = 2000;
/// Ticks per mode under the trace (every exit of a mode takes the same path: a few suffice).
const TRACE_TICKS: u32 = 16;
/// Modes the kernel runs, each one trace window.
const MODES: u32 = 4;
/// `e2e` and `guest_overhead` agree when they differ by at most this share of `e2e`.
const AGREEMENT: f64 = 0.05;

/// Ticks per mode of the image's runs.
const IMAGE_SHAPE: Shape = Shape {
    bench_ticks: BENCH_TICKS,
    trace_ticks: TRACE_TICKS,
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let image_only = args.iter().any(|a| a == "--image-only");
    args.retain(|a| a != "--image-only");
    let models: Vec<String> = if args.is_empty() {
        MODELS.iter().map(|m| m.to_string()).collect()
    } else {
        args
    };
    let mut failed = false;
    for model in &models {
        println!("# {model}");
        // The test kernel's e2e per mode with 1 CPU and stats on: what the image's lines are
        // set beside.
        let mut platform: BTreeMap<String, f64> = BTreeMap::new();
        for cpus in [1, 2] {
            for stats in [true, false] {
                if image_only && (cpus != 1 || !stats) {
                    continue;
                }
                let mut spec = RunSpec::new(model, "bench")
                    .cpus(cpus)
                    .param("bench_ticks", BENCH_TICKS)
                    .param("trace_ticks", TRACE_TICKS)
                    .traced(MODES);
                if !stats {
                    spec = spec.without_stats();
                }
                match run(&spec).map_err(|e| e.to_string()).and_then(|out| {
                    let (lines, e2e) = figures(&out, cpus, stats)?;
                    if cpus == 1 && stats {
                        platform = e2e;
                    }
                    Ok(lines)
                }) {
                    Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                    Err(e) => {
                        eprintln!("{model} cpus={cpus} stats={stats}: {e}");
                        failed = true;
                    }
                }
            }
        }
        for profile in [Profile::Release, Profile::Debug] {
            let spec = image_bench::spec(model, profile, IMAGE_SHAPE);
            match run(&spec).and_then(|out| image_bench::figures(&out, profile)) {
                Ok(figures) => {
                    for f in &figures {
                        println!("{}", image_line(f, profile, &platform, model));
                        if let Some(first) = &f.count.first_unsaved_vector_use {
                            println!("#   first unsaved vector register use: {first}");
                        }
                    }
                }
                Err(e) => {
                    eprintln!("{model} image={}: {e}", profile.dir());
                    failed = true;
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}

/// `yes(+1.2%)` / `NO(-7.0%)` for a signed offset, `n/a` without exits.
fn agreement(offset: Option<f64>) -> String {
    match offset {
        None => "n/a".to_string(),
        Some(off) => format!(
            "{}({:+.1}%)",
            if off.abs() <= AGREEMENT { "yes" } else { "NO" },
            off * 100.0
        ),
    }
}

/// One image line.
fn image_line(
    f: &ModeFigures,
    profile: Profile,
    platform: &BTreeMap<String, f64>,
    model: &str,
) -> String {
    let c = &f.count;
    let beside = match platform.get(&f.mode) {
        Some(p) => format!("platform_e2e={p:.1} vs_platform={:+.1}", f.e2e - p),
        None => "platform_e2e=n/a vs_platform=n/a".to_string(),
    };
    format!(
        "RESULT bench-image image={} mode={} cpus=1 stats=on e2e={:.1} guest_overhead={:.1} \
         agree={} agree_net={} handler_delta={:+.1} irql_calls={:.1} irql={:.1} {beside} \
         vmcs={:.1} heavy={:.1} exits={} exits_stats={} replays_stats={} xmm={} xmm_unsaved={} \
         irregular={} model={model}",
        profile.dir(),
        f.mode,
        f.e2e,
        f.guest_overhead,
        agreement(f.raw_offset()),
        agreement(f.net_offset()),
        f.handler_delta,
        f.irql_calls,
        f.irql,
        c.per_exit(c.of(&VMCS_ACCESS)),
        c.per_exit(c.of(&HEAVY)),
        c.exits,
        f.exits_stats,
        f.replays_stats,
        c.vector_register_uses,
        c.unsaved_vector_uses,
        c.irregular,
    )
}

/// Figure lines and `e2e` by mode.
type Figures = (Vec<String>, BTreeMap<String, f64>);

/// The figure lines of one run, and each mode's `e2e`.
fn figures(out: &RunOutput, cpus: u32, stats: bool) -> Result<Figures, String> {
    let counts: BTreeMap<String, RootCount> = root_counts_by_mode(&out.console)
        .ok_or_else(|| format!("no map line; console tail:\n{}", out.tail(20)))?;
    let mean_gap = |mode: &str| -> Option<f64> {
        let l = out.line("bench", Some(mode))?;
        let (sum, n) = (l.num("gap_sum")?, l.num("gaps")?);
        (n > 0).then(|| sum as f64 / n as f64)
    };
    let base = mean_gap("passthrough")
        .ok_or_else(|| format!("no passthrough gaps; console tail:\n{}", out.tail(20)))?;
    let mut lines = Vec::new();
    let mut e2e_by_mode = BTreeMap::new();
    for mode in ["passthrough", "exit-sti", "ack-replay", "ack-inject"] {
        let c = counts
            .get(mode)
            .ok_or_else(|| format!("no trace for {mode}; console tail:\n{}", out.tail(20)))?;
        let gap = mean_gap(mode).ok_or_else(|| format!("no gaps for {mode}"))?;
        let overhead = gap - base;
        let e2e = c.per_exit(c.instructions);
        e2e_by_mode.insert(mode.to_string(), e2e);
        let agree = if c.exits == 0 {
            "n/a".to_string()
        } else {
            let off = (e2e - overhead).abs() / e2e;
            format!(
                "{}({:+.1}%)",
                if off <= AGREEMENT { "yes" } else { "NO" },
                { (overhead - e2e) / e2e * 100.0 }
            )
        };
        let traced_ticks = u64::from(TRACE_TICKS) * u64::from(cpus);
        let handler = |c: &RootCount| {
            if c.handler_runs == 0 {
                0.0
            } else {
                c.handler_total as f64 / c.handler_runs as f64
            }
        };
        let handler_delta = handler(c) - counts.get("passthrough").map_or(0.0, handler);
        // The same comparison with the handler's own difference taken out of the gap: the test
        // kernel's handler does origin-dependent bookkeeping (more when called by a replay,
        // less in an exit-sti window), which the gap contains and `e2e` by definition does not.
        let agree_net = if c.exits == 0 {
            "n/a".to_string()
        } else {
            let net = overhead - handler_delta;
            let off = (e2e - net).abs() / e2e;
            format!(
                "{}({:+.1}%)",
                if off <= AGREEMENT { "yes" } else { "NO" },
                (net - e2e) / e2e * 100.0
            )
        };
        lines.push(format!(
            "RESULT bench mode={mode} cpus={cpus} stats={} e2e={e2e:.1} guest_overhead={overhead:.1} \
             vmcs={:.1} heavy={:.1} agree={agree} agree_net={agree_net} handler={:.1} \
             handler_delta={handler_delta:+.1} \
             exits={} ticks={traced_ticks} \
             vmread={:.1} vmwrite={:.1} fxsave={:.1} fxrstor={:.1} rdtsc={:.1} rdmsr={:.1} \
             wrmsr={:.1} xmm={} irregular={} model={}",
            if stats { "on" } else { "off" },
            c.per_exit(c.of(&VMCS_ACCESS)),
            c.per_exit(c.of(&HEAVY)),
            handler(c),
            c.exits,
            c.per_exit(c.of(&["vmread"])),
            c.per_exit(c.of(&["vmwrite"])),
            c.per_exit(c.of(&["fxsave"])),
            c.per_exit(c.of(&["fxrstor"])),
            c.per_exit(c.of(&["rdtsc", "rdtscp"])),
            c.per_exit(c.of(&["rdmsr"])),
            c.per_exit(c.of(&["wrmsr"])),
            c.vector_register_uses,
            c.irregular,
            out.spec.model,
        ));
    }
    Ok((lines, e2e_by_mode))
}
