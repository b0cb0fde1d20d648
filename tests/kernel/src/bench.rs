//! Scenario `bench`: the cost of one clock interrupt per mode, by two independent instruments.
//!
//! - **Gap** (guest side, outside the path): every CPU spins reading the TSC while its clock
//!   ticks. Under Bochs `clock: sync=none` the TSC counts instructions, so the loop's step is a
//!   few ticks except where an interrupt landed: that gap holds everything the interrupt cost
//!   (exit, root, handler, resume). The runner subtracts passthrough's mean gap, where the same
//!   handler runs without any exit.
//! - **Trace** (Bochs's own, inside the path): with `trace_ticks > 0`, every CPU then takes
//!   `trace_ticks` more ticks halted (`sti; hlt`, so the guest adds almost nothing to the
//!   trace) between two magic breakpoints (`xchg bx, bx`). The runner's debugger script turns
//!   Bochs's instruction trace on at the first and off at the second, and counts every executed
//!   instruction from the exit stub's first one to VMRESUME, leaving out the OS handler's own
//!   (gate entry to its IRETQ). The `map` line gives it the addresses it needs.
//!
//! Asserts nothing: the runner prints the figures.
//!
//! **Runs in:** PASSIVE on the BSP (the guest side once virtualized); the loops on every CPU.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ackvisor_vmm::hypervisor;
use ackvisor_vmm::intr::policy::Vector;
use ackvisor_vmm::intr::vector_policy::VectorPolicy;
use ackvisor_vmm::stats::Snapshot;
use ackvisor_vmm::{CpuIndex, Mode};

use crate::interrupts::{self, CLOCK_VECTOR};
use crate::params::Params;
use crate::percpu::{MAX_CPUS, online_count, this_cpu};
use crate::report::Line;
use crate::scenarios::{devirtualize, set_mode, virtualize};
use crate::{arch, smp, workload};

/// A TSC step longer than this in the spin loop is an interrupt's gap. The loop itself takes a
/// handful of instructions; with several CPUs Bochs advances the TSC in quanta of a few tens.
const GAP_MIN_TICKS: u64 = 128;

/// Per-CPU results of one phase, summed by the BSP.
struct PerCpuSums {
    gap_sum: [AtomicU64; MAX_CPUS],
    gaps: [AtomicU64; MAX_CPUS],
    ticks: [AtomicU64; MAX_CPUS],
    tsc: [AtomicU64; MAX_CPUS],
}

static SUMS: PerCpuSums = PerCpuSums {
    gap_sum: [const { AtomicU64::new(0) }; MAX_CPUS],
    gaps: [const { AtomicU64::new(0) }; MAX_CPUS],
    ticks: [const { AtomicU64::new(0) }; MAX_CPUS],
    tsc: [const { AtomicU64::new(0) }; MAX_CPUS],
};

/// Gap-instrument result of one CPU.
pub(crate) struct Gaps {
    pub(crate) sum: u64,
    pub(crate) count: u64,
    pub(crate) elapsed: u64,
}

/// `ticks` clock interrupts while spinning on the TSC; every step above [`GAP_MIN_TICKS`] is
/// an interrupt's gap. Also the image's benchmark (`ntos::bench`).
pub(crate) fn gap_spin(ticks: u32, period: u32) -> Gaps {
    // APs run this from their mailbox, where IF=0.
    let was_enabled = arch::rflags() & arch::RFLAGS_IF != 0;
    let cpu = this_cpu();
    let start = cpu.counts.runs.get(CLOCK_VECTOR);
    let (mut sum, mut count) = (0u64, 0u64);
    let t0 = arch::rdtsc();
    // SAFETY: this CPU's IDT and LAPIC are set up.
    unsafe { arch::sti() };
    interrupts::clock_start(period);
    let mut prev = arch::rdtsc();
    while cpu.counts.runs.get(CLOCK_VECTOR) - start < ticks {
        let now = arch::rdtsc();
        let step = now.wrapping_sub(prev);
        if step > GAP_MIN_TICKS {
            sum += step;
            count += 1;
        }
        prev = now;
    }
    interrupts::clock_stop();
    let elapsed = arch::rdtsc() - t0;
    workload::drain();
    if !was_enabled {
        arch::cli();
    }
    Gaps {
        sum,
        count,
        elapsed,
    }
}

/// `ticks` clock interrupts with the CPU halted in between (the traced phase).
pub(crate) fn halt_ticks(ticks: u32, period: u32) {
    let was_enabled = arch::rflags() & arch::RFLAGS_IF != 0;
    let cpu = this_cpu();
    let start = cpu.counts.runs.get(CLOCK_VECTOR);
    arch::cli();
    interrupts::clock_start(period);
    while cpu.counts.runs.get(CLOCK_VECTOR) - start < ticks {
        // `sti; hlt` is atomic (STI's shadow): the tick cannot slip in before the halt.
        // SAFETY: the clock handler is ready; it only counts and re-arms.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nostack)) };
    }
    interrupts::clock_stop();
    // SAFETY: as above; the last armed tick drains with IF=1.
    unsafe { arch::sti() };
    workload::drain();
    if !was_enabled {
        arch::cli();
    }
}

/// Bochs magic breakpoint: the debugger stops here and the runner's script runs its next
/// commands (trace on / trace off), then continues.
pub(crate) fn magic_break() {
    // SAFETY: `xchg bx, bx` exchanges a register with itself: no effect outside Bochs.
    unsafe { core::arch::asm!("xchg bx, bx", options(nomem, nostack, preserves_flags)) };
}

/// Set while the benchmark runs. The delivery books ([`crate::books::record`]) do more work in a
/// handler run in root (they read the VMCS) than in one run by the guest, and the DPC-watchdog
/// model ([`crate::watchdog::tick`]) takes another branch at the IRQL a replay or window runs
/// at. The benchmark judges neither, and leaving them out keeps the handler the same in every
/// mode, which `guest_overhead` (the gap in a mode minus the gap in passthrough) assumes.
static MEASURING: AtomicBool = AtomicBool::new(false);

/// Whether the benchmark is running (the handler then skips the delivery books).
pub fn measuring() -> bool {
    MEASURING.load(Ordering::Relaxed)
}

/// Starts or ends a benchmark run (also the image's, `ntos::bench`).
pub(crate) fn set_measuring(on: bool) {
    MEASURING.store(on, Ordering::Relaxed);
}

/// The scenario.
pub fn run(p: &Params) {
    let name = "bench";
    MEASURING.store(true, Ordering::Relaxed);
    let [replay_site, window_site] = ackvisor_vmm::root_interrupt_return_sites();
    let (gates_lo, gates_hi) = interrupts::device_gate_range();
    Line::new(name)
        .kv("map", 1)
        .kv(
            "stub",
            format_args!("{:#x}", ackvisor_vmm::exit_stub_address()),
        )
        .kv("gates_lo", format_args!("{gates_lo:#x}"))
        .kv("gates_hi", format_args!("{gates_hi:#x}"))
        .kv("gate_stride", interrupts::STUB_BYTES)
        .kv("replay_return", format_args!("{replay_site:#x}"))
        .kv("window_return", format_args!("{window_site:#x}"))
        .kv("trace_ticks", p.trace_ticks)
        .print();
    if !virtualize(name, Mode::Passthrough) {
        return;
    }
    // The benchmark measures the replay path: the clock's default (`auto`) would inject it,
    // since the benchmark's guest spins at IRQL 0.
    hypervisor::set_policy_all(Vector(CLOCK_VECTOR), VectorPolicy::Replay);
    for mode in Mode::ALL {
        if !set_mode(name, mode) {
            return;
        }
        hypervisor::reset_stats();
        let (ticks, period) = (p.bench_ticks, p.clock_period);
        let result = smp::run_concurrently(&|index| {
            let g = gap_spin(ticks, period);
            let i = index.0 as usize;
            SUMS.gap_sum[i].store(g.sum, Ordering::Relaxed);
            SUMS.gaps[i].store(g.count, Ordering::Relaxed);
            SUMS.tsc[i].store(g.elapsed, Ordering::Relaxed);
            SUMS.ticks[i].store(u64::from(ticks), Ordering::Relaxed);
            Ok(())
        });
        if let Err((cpu, e)) = result {
            fail(name, format_args!("cpu{}:{e:?}", cpu.0));
            return;
        }
        let mut s = Snapshot::zero();
        let (mut gap_sum, mut gaps, mut tsc) = (0, 0, 0);
        for i in 0..online_count() {
            if let Some(state) = hypervisor::cpu_state(CpuIndex(i)) {
                s.merge(&state.stats);
            }
            let i = i as usize;
            gap_sum += SUMS.gap_sum[i].load(Ordering::Relaxed);
            gaps += SUMS.gaps[i].load(Ordering::Relaxed);
            tsc = u64::max(tsc, SUMS.tsc[i].load(Ordering::Relaxed));
        }
        if p.trace_ticks > 0 {
            let trace_ticks = p.trace_ticks;
            magic_break();
            let traced = smp::run_concurrently(&|_| {
                halt_ticks(trace_ticks, period);
                Ok(())
            });
            magic_break();
            if let Err((cpu, e)) = traced {
                fail(name, format_args!("cpu{}:{e:?}", cpu.0));
                return;
            }
        }
        let per_exit = s.cycles_sum.checked_div(s.cycles_count).unwrap_or(0);
        let excl = s
            .cycles_sum
            .saturating_sub(s.handler_cycles_sum)
            .checked_div(s.cycles_count)
            .unwrap_or(0);
        Line::new(name)
            .kv("mode", mode.name())
            .kv("cpus", online_count())
            .kv("stats", u8::from(ackvisor_vmm::stats::ENABLED))
            .kv("ticks", p.bench_ticks)
            .kv("tsc", tsc)
            .kv("tsc_per_tick", tsc / u64::from(p.bench_ticks.max(1)))
            .kv("gap_sum", gap_sum)
            .kv("gaps", gaps)
            .kv("trace_ticks", p.trace_ticks)
            .kv("exits_extint", s.exits[1])
            .kv("exits_timed", s.cycles_count)
            .kv("exits_total", s.total_exits())
            .kv("root_cycles_per_exit", per_exit)
            .kv("root_cycles_per_exit_excl_handler", excl)
            .kv("root_cycles_max", s.cycles_max)
            .kv("bytes_per_cpu", hypervisor::bytes_per_cpu())
            .print();
    }
    devirtualize(name);
}

fn fail(scenario: &str, detail: impl core::fmt::Display) {
    Line::new(scenario)
        .kv("fatal", 1)
        .kv("bench", detail)
        .print();
}
