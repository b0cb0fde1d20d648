//! Books the delivery checks keep beside [`crate::percpu::IntrCounts`], so that every number
//! the core reports can be compared with what the machine saw, in every mode and on every CPU:
//!
//! - which runs were delivered by an exit that acknowledged the vector (the CPU's applied mode
//!   acknowledges on exit and the run was not nested in root): the core's per-vector exits,
//!   replays and injections must match them exactly;
//! - clock deliveries per arming: the handler re-arms a one-shot timer, so a second delivery of
//!   one arming would keep "raised == handled" intact; it is counted here as a duplicate;
//! - in the exit-sti window: whether the window opened while a guest handler was live, and
//!   whether the exit's interruption info was (wrongly) valid;
//! - for replays: the CPL of the interrupted guest, read from the guest state the exit saved
//!   (its CS selector), not from a flag the kernel sets around its ring-3 excursions.
//!
//! **Runs in:** interrupt context (the owning CPU with IF=0), read at PASSIVE after a drain.

use core::sync::atomic::{AtomicU32, Ordering};

use ackvisor_vmm::{CpuIndex, hypervisor};

use crate::interrupts::{CLOCK_VECTOR, Origin};
use crate::percpu::{Counter, Cpu, VectorCounts};

/// VMCS field: guest CS selector (SDM 3D appendix B, 16-bit guest-state fields).
const GUEST_CS_SELECTOR: u32 = 0x802;
/// VMCS field: VM-exit interruption information (32-bit read-only data fields).
const EXIT_INTERRUPTION_INFO: u32 = 0x4404;
/// Interruption info bit 31: valid.
const INFO_VALID: u64 = 1 << 31;
/// Requested privilege level bits of a selector (in 64-bit mode CS.RPL is the CPL).
const RPL_MASK: u64 = 3;
/// User mode.
const CPL_USER: u64 = 3;

/// One CPU's books.
pub struct Books {
    /// Runs delivered by an acknowledging exit, by vector.
    pub acked: VectorCounts,
    /// The arming (its number among the clock's raises) the last clock run belonged to.
    clock_delivered: AtomicU32,
    /// Clock runs of an arming that had already been delivered.
    pub clock_dups: Counter,
    /// Runs in the exit-sti window that interrupted a live guest handler.
    pub sti_window_nested: Counter,
    /// Runs in the exit-sti window whose exit had valid interruption info (ack was on).
    pub sti_window_info_valid: Counter,
    /// Replays of vectors that interrupted the guest at CPL 3 (guest CS.RPL = 3).
    pub replayed_at_cpl3: Counter,
}

impl Books {
    /// All zero.
    pub const fn new() -> Books {
        Books {
            acked: VectorCounts::new(),
            clock_delivered: AtomicU32::new(0),
            clock_dups: Counter::new(),
            sti_window_nested: Counter::new(),
            sti_window_info_valid: Counter::new(),
            replayed_at_cpl3: Counter::new(),
        }
    }

    /// Zeroes the books (with nothing outstanding, like `IntrCounts::reset`).
    pub fn reset(&self) {
        self.acked.reset();
        self.clock_delivered.store(0, Ordering::Relaxed);
        for c in [
            &self.clock_dups,
            &self.sti_window_nested,
            &self.sti_window_info_valid,
            &self.replayed_at_cpl3,
        ] {
            c.reset();
        }
    }
}

/// The books of `cpu` (kept in its `IntrCounts`, reset with them).
pub fn of(cpu: &Cpu) -> &Books {
    &cpu.counts.books
}

fn vmread(field: u32) -> u64 {
    // SAFETY: called only for runs the core's replay or exit-sti window entered, i.e. in VMX
    // root inside an exit of this CPU, where this CPU's VMCS is current.
    let vmcs = unsafe { ackvisor_vmm::vmx::Vmcs::current() };
    vmcs.read(field)
}

/// Records one handler run of `vector` entered from `origin` at handler depth `depth` (runs of
/// this CPU's handlers it interrupted). Call with IF=0, after the run was counted.
pub fn record(cpu: &Cpu, vector: u8, origin: Origin, depth: u32) {
    let b = of(cpu);
    if matches!(origin, Origin::Guest | Origin::Replayed) {
        let index = CpuIndex(cpu.index.load(Ordering::Relaxed));
        if hypervisor::cpu_mode(index).is_some_and(|m| m.acks_on_exit()) {
            b.acked.bump(vector);
        }
    }
    match origin {
        Origin::Replayed if vmread(GUEST_CS_SELECTOR) & RPL_MASK == CPL_USER => {
            b.replayed_at_cpl3.bump();
        }
        Origin::StiWindow => {
            if depth > 0 {
                b.sti_window_nested.bump();
            }
            if vmread(EXIT_INTERRUPTION_INFO) & INFO_VALID != 0 {
                b.sti_window_info_valid.bump();
            }
        }
        _ => {}
    }
    if vector == CLOCK_VECTOR {
        // The clock is raised only when none is outstanding, so the raise count is the number
        // of the arming in flight.
        let arming = cpu.counts.raised.get(CLOCK_VECTOR);
        if b.clock_delivered.swap(arming, Ordering::Relaxed) == arming {
            b.clock_dups.bump();
        }
    }
}
