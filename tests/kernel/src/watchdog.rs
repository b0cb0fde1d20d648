//! NT's DPC-watchdog accounting, modelled so that a delivery that shows NT the wrong IRQL fails
//! a test here (issue 8, item 2).
//!
//! NT's `KeAccumulateTicks` runs on each clock tick with the IRQL the tick interrupted: a tick
//! taken at IRQL ≥ DISPATCH from kernel mode adds to the cumulative DPC-watchdog count, a tick
//! below DISPATCH (or from user mode) resets it; the count reaching its limit (about 120 s of
//! ticks) is bugcheck 0x133, arg 1 = 1. The clock handler here keeps the same count per CPU and
//! remembers its longest run, printed as `dpc_watchdog_max` on the workload's RESULT lines.
//!
//! **Runs in:** interrupt context (the clock handler, guest or root), PASSIVE (reset, read).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::interrupts::DISPATCH_CLASS;
use crate::percpu::MAX_CPUS;

/// Consecutive ticks at IRQL ≥ DISPATCH from kernel mode, per CPU (one writer: that CPU's
/// clock handler, which does not nest in itself).
static RUN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// The longest such run since the last reset, per CPU.
static LONGEST: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// One clock tick on CPU `cpu` that interrupted code at `irql` (its CR8), in user mode or not.
pub fn tick(cpu: usize, irql: u8, from_user: bool) {
    let (Some(run), Some(longest)) = (RUN.get(cpu), LONGEST.get(cpu)) else {
        return;
    };
    if irql >= DISPATCH_CLASS && !from_user {
        let n = run.load(Ordering::Relaxed) + 1;
        run.store(n, Ordering::Relaxed);
        if n > longest.load(Ordering::Relaxed) {
            longest.store(n, Ordering::Relaxed);
        }
    } else {
        run.store(0, Ordering::Relaxed);
    }
}

/// Starts CPU `cpu`'s books afresh (no clock running on it).
pub fn reset(cpu: usize) {
    if let (Some(run), Some(longest)) = (RUN.get(cpu), LONGEST.get(cpu)) {
        run.store(0, Ordering::Relaxed);
        longest.store(0, Ordering::Relaxed);
    }
}

/// CPU `cpu`'s longest run of ticks NT would have charged to the DPC watchdog.
pub fn longest(cpu: usize) -> u64 {
    LONGEST.get(cpu).map_or(0, |l| l.load(Ordering::Relaxed))
}
