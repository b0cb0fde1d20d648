//! Scenario `misdirected-eoi` (issue 8, item 1): an EOI that lands on a deferred vector, and the
//! same vector acknowledged a second time while the first acknowledge still waits.
//!
//! NT's DPC handler (`KiDpcInterrupt`) runs with IF=0 until its EOI. In ack-replay its vector is
//! injected (class ≤ DISPATCH). A device vector H that exits meanwhile is acknowledged and
//! deferred (the guest has IF=0), so ISR = {H, DPC}. The handler's EOI clears the highest ISR
//! bit, which is H's. A level-triggered line behind an IOAPIC with broadcast EOI (VMware's)
//! is then sent again and acknowledged again. Three acknowledges, and the guest has written one
//! EOI: H must run twice, so that its two EOIs clear H and then the DPC vector. Delivering H
//! once leaves ISR[DPC] set for good, and that CPU never takes a DPC or APC interrupt again.
//!
//! Here the DPC-class vector's handler does exactly that with self-IPIs: it sends H, waits until
//! H is in service (acknowledged by the core, deferred), writes its one EOI, sends H again (the
//! re-asserted line) and waits for the second acknowledge, then returns (IRETQ sets IF=1 and the
//! interrupt window delivers what waits).
//!
//! **Runs in:** PASSIVE on the BSP (the scenario), interrupt context in the guest (the handler).

use core::sync::atomic::{AtomicU32, Ordering};

use ackvisor_vmm::hypervisor;
use ackvisor_vmm::stats::Anomaly;
use ackvisor_vmm::{CpuIndex, Mode};

use crate::params::Params;
use crate::percpu::{Cpu, this_cpu};
use crate::report::Line;
use crate::scenarios::{devirtualize, virtualize};
use crate::{apic, arch, workload};

/// A DISPATCH-class vector (never replayed: always injected) whose handler plays
/// `KiDpcInterrupt`. Not one of the workload's vectors, so its entry can differ.
pub const DPC_CLASS_VECTOR: u8 = 0x2E;
/// H, the device line: a class the DPC class does not mask, replayed in root.
pub const LINE_VECTOR: u8 = 0xC1;
/// Rounds at most (each one is a whole misdirected-EOI sequence).
const MAX_ROUNDS: u32 = 32;
/// TSC ticks to wait for an acknowledge, or for a round to finish.
const WAIT_TICKS: u64 = 20_000_000;

/// Times the handler saw H in service after sending it (2 per round when every send exits).
static ACKED_IN_HANDLER: AtomicU32 = AtomicU32::new(0);

fn in_service(v: u8) -> bool {
    let isr = apic::isr();
    isr.get(usize::from(v / 32))
        .is_some_and(|w| w & (1 << (v % 32)) != 0)
}

fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let t0 = arch::rdtsc();
    while !done() {
        if arch::rdtsc() - t0 > WAIT_TICKS {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn send_line(cpu: &Cpu) {
    cpu.counts.raised.bump(LINE_VECTOR);
    apic::self_ipi(LINE_VECTOR);
}

/// The DPC-class vector's handler, called by the interrupt entry with IF=0 in the guest. It
/// keeps IF=0 throughout and writes one EOI, as `KiDpcInterrupt` does.
pub fn on_dpc_class_vector(cpu: &Cpu) {
    cpu.counts.runs.bump(DPC_CLASS_VECTOR);
    // IF is already 0; the guest's own CLI makes Bochs recompute its interrupt mask inside the
    // guest, so H exits now, as it would on a real CPU (DESIGN §7).
    arch::cli();
    send_line(cpu);
    if wait_until(|| in_service(LINE_VECTOR)) {
        ACKED_IN_HANDLER.fetch_add(1, Ordering::Relaxed);
    }
    // Meant for this handler; the LAPIC clears the highest ISR bit, which is H's.
    apic::eoi();
    // The deferral's VM entry had IF=0, which Bochs does not re-check until the guest changes
    // IF again: CLI once more so the re-sent H exits too.
    arch::cli();
    send_line(cpu);
    if wait_until(|| in_service(LINE_VECTOR)) {
        ACKED_IN_HANDLER.fetch_add(1, Ordering::Relaxed);
    }
}

fn bits(regs: [u32; 8]) -> u64 {
    regs.iter().map(|r| u64::from(r.count_ones())).sum()
}

/// Runs the sequence `rounds` times (at most [`MAX_ROUNDS`]) in ack-replay on the BSP and prints
/// `RESULT misdirected-eoi ... isr_left lost reacked`.
pub fn scenario(p: &Params) {
    let name = "misdirected-eoi";
    if !virtualize(name, Mode::AckReplay) {
        return;
    }
    let cpu = this_cpu();
    let index = cpu.index.load(Ordering::Relaxed);
    hypervisor::reset_stats();
    workload::reset_counts();
    ACKED_IN_HANDLER.store(0, Ordering::Relaxed);
    let rounds = p.rounds.min(MAX_ROUNDS);
    let mut completed = 0u32;
    for _ in 0..rounds {
        cpu.counts.raised.bump(DPC_CLASS_VECTOR);
        apic::self_ipi(DPC_CLASS_VECTOR);
        let c = &cpu.counts;
        if !wait_until(|| c.outstanding(DPC_CLASS_VECTOR) == 0 && c.outstanding(LINE_VECTOR) == 0) {
            break; // a lost delivery or a stuck ISR bit: later rounds would only wait too
        }
        completed += 1;
    }
    let c = &cpu.counts;
    let (d_raised, d_ran) = (c.raised.get(DPC_CLASS_VECTOR), c.runs.get(DPC_CLASS_VECTOR));
    let (h_raised, h_ran) = (c.raised.get(LINE_VECTOR), c.runs.get(LINE_VECTOR));
    let lost = d_raised.abs_diff(d_ran) + h_raised.abs_diff(h_ran);
    let isr_left = bits(apic::isr());
    let irr_left = bits(apic::irr());
    let isr_dpc_class = u8::from(in_service(DPC_CLASS_VECTOR));
    let snapshot = hypervisor::cpu_state(CpuIndex(index)).map(|s| s.stats);
    let core = |f: &dyn Fn(&ackvisor_vmm::stats::Snapshot) -> u64| snapshot.as_ref().map_or(0, f);
    let reacked = core(&|s| s.anomaly(Anomaly::DuplicatePending));
    let other_anomalies = core(&|s| s.anomalies.iter().sum::<u64>()) - reacked;
    let h_replays = core(&|s| s.replays_by_vector[usize::from(LINE_VECTOR)]);
    let d_injections = core(&|s| s.injections_by_vector[usize::from(DPC_CLASS_VECTOR)]);
    let h_exits = core(&|s| s.extint_by_vector[usize::from(LINE_VECTOR)]);
    devirtualize(name);
    Line::new(name)
        .kv("rounds", rounds)
        .kv("completed", completed)
        .kv("dpc_raised", d_raised)
        .kv("dpc_ran", d_ran)
        .kv("dpc_injections", d_injections)
        .kv("h_raised", h_raised)
        .kv("h_exits", h_exits)
        .kv(
            "h_acked_in_handler",
            ACKED_IN_HANDLER.load(Ordering::Relaxed),
        )
        .kv("h_ran", h_ran)
        .kv("h_replays", h_replays)
        .kv("isr_dpc_class", isr_dpc_class)
        .kv("isr_left", isr_left)
        .kv("irr_left", irr_left)
        .kv("lost", lost)
        .kv("reacked", reacked)
        .kv("other_anomalies", other_anomalies)
        .kv("ctx_violations", c.ctx_violations.get())
        .print();
}
