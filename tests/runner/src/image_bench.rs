//! The benchmark of the real ackvisor.sys's exit path (kernel scenario `nt-bench`): the runs,
//! and the figures read from them with the same two instruments as the test kernel's own
//! `bench` (`src/bin/bench.rs`).
//!
//! - `e2e`: Bochs's instruction trace, counted by [`crate::trace`] per exit from the first
//!   instruction at the image's HOST_RIP (its `vm_exit_entry`, found in the image's PDB and
//!   placed at the load base the scenario prints) to its VMRESUME, the OS handler's own
//!   instructions (gate entry to IRETQ) left out. The image's calls of `KfRaiseIrql` and
//!   `KeLowerIrql` through its import table run inside that window and are counted in it; they
//!   are also tallied apart (`irql_calls`, `irql`), from the miniature NT's own routine bounds
//!   in the test kernel's symbol table.
//! - `guest_overhead`: the guest's TSC gaps while spinning, minus passthrough's (Bochs's TSC
//!   counts instructions), as in `bench`.
//!
//! The image's statistics IOCTL counts the exits of the traced phase (`exits_stats`): the trace
//! must have closed exactly as many windows. The guest's canary (`xmm_clobbered`) counts the
//! ticks that changed its XMM0/XMM1.
//!
//! **Runs in:** the Linux host.

use std::collections::BTreeMap;

use object::{Object, ObjectSymbol};

use crate::driver::{self, Profile};
use crate::trace::{Counter, RootCount, TraceMap, root_counts_by_mode_in};
use crate::{RunOutput, RunSpec};

/// The kernel scenario.
pub const SCENARIO: &str = "nt-bench";
/// Modes the scenario runs, each one trace window (`Mode::ALL`'s order).
pub const MODES: [&str; 4] = ["passthrough", "exit-sti", "ack-replay", "ack-inject"];
/// The two NT routines the image's platform calls around every replay and exit-sti window.
pub const IRQL_ROUTINES: [&str; 2] = ["KfRaiseIrql", "KeLowerIrql"];
/// `e2e` and `guest_overhead` agree when they differ by at most this share of `e2e` (the test
/// kernel's `bench` uses the same).
pub const AGREEMENT: f64 = 0.05;

/// How long a run of the image benchmark is.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Clock ticks per mode for the gap instrument.
    pub bench_ticks: u32,
    /// Clock ticks per mode under the trace.
    pub trace_ticks: u32,
}

/// The run of `nt-bench` on `model` with the image in `profile`. The debug image's exit path is
/// several thousand instructions: its clock ticks are spaced wider so that none arrives while
/// the previous one is still in root.
pub fn spec(model: &str, profile: Profile, shape: Shape) -> RunSpec {
    let period = match profile {
        Profile::Debug => 60_000,
        Profile::Release => 6_000,
    };
    RunSpec::new(model, SCENARIO)
        .param(driver::PROFILE_PARAM, profile.dir())
        .param("bench_ticks", shape.bench_ticks)
        .param("trace_ticks", shape.trace_ticks)
        .param("clock_period", period)
        .traced(MODES.len() as u32)
}

/// One mode's figures.
#[derive(Clone, Debug)]
pub struct ModeFigures {
    /// The mode.
    pub mode: String,
    /// What the trace counted in the mode's window.
    pub count: RootCount,
    /// Instructions per exit, stub to VMRESUME, the OS handler left out.
    pub e2e: f64,
    /// Mean TSC gap per tick minus passthrough's.
    pub guest_overhead: f64,
    /// The OS handler's instructions per run (gate entry to IRETQ, from the trace), minus
    /// passthrough's: in `guest_overhead`, not in `e2e`.
    pub handler_delta: f64,
    /// External-interrupt exits of the traced phase, by the image's statistics IOCTL.
    pub exits_stats: u64,
    /// Clock replays of the traced phase, by the same.
    pub replays_stats: u64,
    /// Clock ticks of the gap phase, and the gaps the guest saw in it (one per tick).
    pub ticks_and_gaps: (u64, u64),
    /// Ticks on which the guest's XMM0/XMM1 came back changed (the scenario's canary).
    pub xmm_clobbered: u64,
    /// Calls of [`IRQL_ROUTINES`] per exit, from the trace.
    pub irql_calls: f64,
    /// Their instructions per exit (part of `e2e`).
    pub irql: f64,
}

impl ModeFigures {
    /// `guest_overhead - handler_delta` off `e2e`, as a share of `e2e` (signed); None without
    /// exits.
    pub fn net_offset(&self) -> Option<f64> {
        (self.count.exits > 0)
            .then(|| (self.guest_overhead - self.handler_delta - self.e2e) / self.e2e)
    }

    /// `guest_overhead` off `e2e`, as a share of `e2e` (signed); None without exits.
    pub fn raw_offset(&self) -> Option<f64> {
        (self.count.exits > 0).then(|| (self.guest_overhead - self.e2e) / self.e2e)
    }
}

/// The start and length of the kernel's function at `address` (its symbol table).
fn routine_bounds(address: u64) -> Result<(u64, u64), String> {
    let elf = crate::kernel_elf_with(true)?;
    let bytes = std::fs::read(&elf).map_err(|e| format!("read {}: {e}", elf.display()))?;
    let file = object::File::parse(&*bytes).map_err(|e| format!("parse {}: {e}", elf.display()))?;
    file.symbols()
        .find(|s| s.address() == address && s.size() > 0)
        .map(|s| (s.address(), s.size()))
        .ok_or_else(|| format!("no symbol at {address:#x} in {}", elf.display()))
}

/// The counter for the image's windows, from the scenario's `map=1` line.
fn counter(line: &crate::ResultLine, stub_rva: u32, watches: &[(String, u64, u64)]) -> Counter {
    let mut c = Counter::new(TraceMap {
        stub: line.num("image_base").unwrap_or(0) + u64::from(stub_rva),
        gates_lo: line.num("gates_lo").unwrap_or(0),
        gates_hi: line.num("gates_hi").unwrap_or(0),
        stride: line.num("gate_stride").unwrap_or(1).max(1),
    });
    for (name, start, len) in watches {
        c.watch(name, *start, *len);
    }
    c
}

/// Every mode's figures from a run of [`spec`] with the image in `profile`.
pub fn figures(out: &RunOutput, profile: Profile) -> Result<Vec<ModeFigures>, String> {
    let tail = || out.tail(20);
    let map = out
        .lines(SCENARIO, None)
        .find(|l| l.get("map").is_some())
        .ok_or_else(|| format!("no {SCENARIO} map line; console tail:\n{}", tail()))?;
    let stub_rva = driver::exit_stub_rva(profile)?;
    let mut watches = Vec::new();
    for (name, key) in IRQL_ROUTINES.iter().zip(["raise_irql", "lower_irql"]) {
        let address = map
            .num(key)
            .filter(|&a| a != 0)
            .ok_or_else(|| format!("the map line has no {key}"))?;
        let (start, len) = routine_bounds(address)?;
        watches.push((name.to_string(), start, len));
    }
    let counts: BTreeMap<String, RootCount> = root_counts_by_mode_in(&out.console, SCENARIO, |l| {
        Some(counter(l, stub_rva, &watches))
    })
    .ok_or_else(|| format!("no trace; console tail:\n{}", tail()))?;
    let mean_gap = |mode: &str| -> Option<f64> {
        let l = out.line(SCENARIO, Some(mode))?;
        let (sum, n) = (l.num("gap_sum")?, l.num("gaps")?);
        (n > 0).then(|| sum as f64 / n as f64)
    };
    let handler = |c: &RootCount| {
        if c.handler_runs == 0 {
            0.0
        } else {
            c.handler_total as f64 / c.handler_runs as f64
        }
    };
    let base = mean_gap("passthrough")
        .ok_or_else(|| format!("no passthrough gaps; console tail:\n{}", tail()))?;
    let base_handler = counts.get("passthrough").map_or(0.0, handler);
    let mut figures = Vec::new();
    for mode in MODES {
        let c = counts
            .get(mode)
            .ok_or_else(|| format!("no trace for {mode}; console tail:\n{}", tail()))?;
        let l = out
            .line(SCENARIO, Some(mode))
            .ok_or_else(|| format!("no {SCENARIO} line for {mode}"))?;
        let gap = mean_gap(mode).ok_or_else(|| format!("no gaps for {mode}"))?;
        let irql = IRQL_ROUTINES
            .iter()
            .filter_map(|r| c.watched.get(*r))
            .fold((0, 0), |(n, i), w| (n + w.calls, i + w.instructions));
        figures.push(ModeFigures {
            mode: mode.to_string(),
            e2e: c.per_exit(c.instructions),
            guest_overhead: gap - base,
            handler_delta: handler(c) - base_handler,
            ticks_and_gaps: (
                l.num("ticks").unwrap_or(u64::MAX),
                l.num("gaps").unwrap_or(0),
            ),
            xmm_clobbered: l.num("xmm_clobbered").unwrap_or(u64::MAX),
            exits_stats: l.num("exits_traced").unwrap_or(u64::MAX),
            replays_stats: l.num("replays_traced").unwrap_or(u64::MAX),
            irql_calls: c.per_exit(irql.0),
            irql: c.per_exit(irql.1),
            count: c.clone(),
        });
    }
    Ok(figures)
}
