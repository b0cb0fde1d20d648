//! `nt-driver`'s checks on every CPU, measured by the machine rather than taken from the image:
//! CPUID's cost on each CPU (a virtualized CPU exits on every CPUID), the interrupt workload on
//! every CPU at once with one line per CPU comparing the machine's books with the image's
//! per-CPU statistics, and the same workload during a sleep, when the image has left VMX
//! operation and the interrupts are delivered natively.
//!
//! **Runs in:** PASSIVE on the BSP's initial thread; the probes and workloads on every CPU
//! through the mailbox (`smp`).

use core::sync::atomic::{AtomicU64, Ordering};

use ackvisor_vmm::Mode;
use ackvisor_vmm::control::Request;
use ackvisor_vmm::control::wire::{self, CpuStats, Field, StatsReply};
use ackvisor_vmm::stats::EXIT_REASON_SLOTS;

use super::driver::ioctl;
use super::layout::DRIVER_OBJECT;
use crate::interrupts::{SOURCE_VECTORS, WAKE_VECTOR};
use crate::params::Params;
use crate::percpu::{CPUS, MAX_CPUS, online_count};
use crate::report::Line;
use crate::workload::{self, Shape, Tally};

const NAME: &str = "nt-driver";

/// CPUIDs one probe executes.
pub const CPUID_PROBES: u64 = 100;
/// A virtualized CPU takes a VM exit on every CPUID: hundreds of instructions of the image's root
/// code each, where natively it is one. More than this factor over the native figure means
/// virtualized.
const VIRTUALIZED_FACTOR: u64 = 4;

/// TSC ticks (Bochs: instructions) of [`CPUID_PROBES`] CPUIDs on this CPU, interrupts off.
pub fn cpuid_ticks() -> u64 {
    let flags = crate::arch::rflags();
    crate::arch::cli();
    let start = crate::arch::rdtsc();
    for leaf in 0..CPUID_PROBES {
        let _ = crate::arch::cpuid(leaf as u32 & 1, 0);
    }
    let ticks = crate::arch::rdtsc() - start;
    if flags & crate::arch::RFLAGS_IF != 0 {
        // SAFETY: interrupts were on before the probe; the IDT and LAPIC are ready.
        unsafe { crate::arch::sti() };
    }
    ticks
}

/// Whether `now` ticks for the probe means virtualized, against the native figure.
pub fn virtualized_by_cpuid(native: u64, now: u64) -> bool {
    now > native.saturating_mul(VIRTUALIZED_FACTOR)
}

static PROBED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// The CPUID probe on every online CPU (each measures itself), by CPU index.
pub fn probe_each() -> [u64; MAX_CPUS] {
    let result = crate::smp::run_on_each_cpu(&|cpu| {
        if let Some(slot) = PROBED.get(cpu.0 as usize) {
            slot.store(cpuid_ticks(), Ordering::Release);
        }
        Ok(())
    });
    if let Err((cpu, e)) = result {
        crate::kprintln!("ntos: CPUID probe on cpu{} failed: {e:?}", cpu.0);
    }
    core::array::from_fn(|i| PROBED[i].load(Ordering::Acquire))
}

/// How many online CPUs `now` shows virtualized against `native` (both from [`probe_each`]).
pub fn count_virtualized(native: &[u64; MAX_CPUS], now: &[u64; MAX_CPUS]) -> u32 {
    (0..online_count() as usize)
        .filter(|&i| virtualized_by_cpuid(native[i], now[i]))
        .count() as u32
}

/// Vectors the machine raises and counts (its wake-up IPI excepted: the scheduler and the
/// mailbox send it at any time).
fn counted_vectors() -> impl Iterator<Item = u8> {
    SOURCE_VECTORS.into_iter().filter(|&v| v != WAKE_VECTOR)
}

/// The workload on every CPU at once (cross-CPU IPIs within the team); each CPU publishes its
/// tally.
fn team_workload(p: &Params) {
    crate::scenarios::reset_books_everywhere();
    let shape = Shape {
        rounds: p.rounds,
        clock_period: p.clock_period,
        stretch: p.stretch,
        team: online_count(),
        cross: p.cross != 0,
    };
    let result = crate::smp::run_concurrently(&|_| {
        let drained = workload::run(shape);
        workload::publish(Tally::of(crate::percpu::this_cpu(), None, drained));
        Ok(())
    });
    if let Err((cpu, e)) = result {
        crate::kprintln!("ntos: workload on cpu{} failed: {e:?}", cpu.0);
    }
}

/// Room for a per-CPU statistics reply of every CPU the machine can have.
const PER_CPU_STATS_BYTES: usize = StatsReply::SIZE + (MAX_CPUS + 1) * CpuStats::SIZE;
/// Offsets in an encoded CpuStats: cpu (u32), mode (u32), exits by reason, then external-interrupt
/// exits by vector (u64 each).
const MODE_AT: usize = 4;
const EXITS_AT: usize = 8;
const EXTINT_BY_VECTOR_AT: usize = EXITS_AT + EXIT_REASON_SLOTS * 8;
/// The external-interrupt exit's basic reason.
const EXIT_EXTERNAL_INTERRUPT: usize = 1;

fn u64_at(entry: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(entry.get(at..at + 8)?.try_into().ok()?))
}

/// What the image's statistics say about one CPU.
struct CpuFigures {
    /// `Mode as u32`, or `MODE_NOT_VIRTUALIZED`.
    mode: u32,
    /// External-interrupt exits (basic reason 1), every vector.
    extint: u64,
    /// External-interrupt exits that acknowledged a vector, by vector, summed over
    /// [`counted_vectors`] (exit-sti does not acknowledge, so it has none).
    acked: u64,
    /// Counted vectors with more external-interrupt exits than handler runs on this CPU.
    vectors_over: u32,
}

/// The per-CPU statistics (one IOCTL), decoded for every online CPU; None when it failed.
fn per_cpu_figures(driver: *mut DRIVER_OBJECT) -> Option<[Option<CpuFigures>; MAX_CPUS]> {
    let (o, reply) = ioctl(
        driver,
        Request::Stats { per_cpu: true },
        PER_CPU_STATS_BYTES,
    )?;
    if o.status != 0 {
        return None;
    }
    let (_, rest) = StatsReply::decode_prefix(reply)?;
    Some(core::array::from_fn(|i| {
        // Entry 0 is the aggregate; CPU i's entry follows.
        let entry = rest.get((i + 1) * CpuStats::SIZE..(i + 2) * CpuStats::SIZE)?;
        let mode = u32::from_le_bytes(entry.get(MODE_AT..MODE_AT + 4)?.try_into().ok()?);
        let extint = u64_at(entry, EXITS_AT + EXIT_EXTERNAL_INTERRUPT * 8)?;
        let runs = &CPUS.get(i)?.counts.runs;
        let (mut acked, mut vectors_over) = (0, 0);
        for v in counted_vectors() {
            let n = u64_at(entry, EXTINT_BY_VECTOR_AT + usize::from(v) * 8)?;
            acked += n;
            vectors_over += u32::from(n > u64::from(runs.get(v)));
        }
        Some(CpuFigures {
            mode,
            extint,
            acked,
            vectors_over,
        })
    }))
}

/// One mode, set by IOCTL beforehand: the statistics reset, the workload on every CPU, then one
/// line per CPU with the machine's tally and the image's figures for that CPU.
pub fn workload_in(driver: *mut DRIVER_OBJECT, mode: Mode, p: &Params) {
    let reset = ioctl(driver, Request::ResetStats, wire::ResetStatsReply::SIZE)
        .is_some_and(|(o, _)| o.status == 0);
    team_workload(p);
    let figures = per_cpu_figures(driver);
    for i in 0..online_count() as usize {
        let f = figures.as_ref().and_then(|f| f[i].as_ref());
        let mut line = Line::new(NAME);
        line.kv("mode", mode.name())
            .kv("cpu", i)
            .kv("stats_reset", u32::from(reset))
            .kv(
                "stats_mode_matches",
                u32::from(f.is_some_and(|f| f.mode == mode as u32)),
            );
        match f {
            Some(f) => line
                .kv("extint_exits", f.extint)
                .kv("extint_acked", f.acked)
                .kv("extint_vectors_over", f.vectors_over),
            None => line
                .kv("extint_exits", "none")
                .kv("extint_acked", "none")
                .kv("extint_vectors_over", "none"),
        };
        // Wake-up IPIs (the mailbox's, the scheduler's) are not in the tally but may exit.
        let wakes = CPUS.get(i).map_or(0, |c| c.counts.runs.get(WAKE_VECTOR));
        line.kv("wakes", wakes);
        workload::published(i).write(&mut line);
        line.print();
    }
}

/// Whether the statistics request is refused because no CPU is virtualized (the status the
/// image completes it with when it writes its error reply).
fn stats_refused(driver: *mut DRIVER_OBJECT) -> bool {
    let refused = wire::nt_warning(wire::status::NOT_VIRTUALIZED) as i32;
    ioctl(
        driver,
        Request::Stats { per_cpu: true },
        PER_CPU_STATS_BYTES,
    )
    .is_some_and(|(o, _)| o.status == refused)
}

/// While the machine sleeps (between the power callback's 0 and 1): the workload on every CPU,
/// natively. One line per CPU: the machine's tally, and whether the image's statistics were
/// refused before and after it (the image keeps no counters while no CPU is virtualized, so
/// nothing of the image counts these interrupts; the CPUID probe shows each CPU native).
pub fn workload_asleep(driver: *mut DRIVER_OBJECT, p: &Params) {
    let before = stats_refused(driver);
    team_workload(p);
    let after = stats_refused(driver);
    for i in 0..online_count() as usize {
        let mut line = Line::new(NAME);
        line.kv("asleep", 1)
            .kv("cpu", i)
            .kv("stats_refused_before", u32::from(before))
            .kv("stats_refused_after", u32::from(after));
        workload::published(i).write(&mut line);
        line.print();
    }
}
