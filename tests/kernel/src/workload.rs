//! The interrupt workload every delivery scenario runs, and the tally that compares what was
//! raised, what ran where, and (when virtualized) what the core counted.
//!
//! The workload runs stretches the way NT code does: with IF=1, with IF=0 (`cli` … `sti`), at
//! raised CR8, and both, while the clock keeps ticking and self-IPIs of several classes arrive;
//! handlers raise follow-ups (`interrupts::action`), so higher classes nest inside lower ones
//! and a device vector arrives while the guest runs its own DPC handler.
//!
//! **Runs in:** PASSIVE (guest side).

use core::sync::atomic::{AtomicU32, Ordering};

use ackvisor_vmm::intr::policy::Vector;
use ackvisor_vmm::intr::vector_policy::{PolicyLookup, VectorPolicy};
use ackvisor_vmm::stats::Snapshot;

use crate::interrupts::{
    self, CHAINS, DISPATCH_CLASS, DPC_VECTOR, DPL3_GATE_VECTOR, IPI_VECTORS, IST_GATE_VECTOR,
    IrqOff, RaisedCr8, SOURCE_VECTORS, WAKE_VECTOR,
};
use crate::percpu::{Cpu, this_cpu};
use crate::report::Line;
use crate::{apic, arch};

/// Workload size.
#[derive(Clone, Copy)]
pub struct Shape {
    /// Rounds (one self-IPI each).
    pub rounds: u32,
    /// Clock period in TSC ticks.
    pub clock_period: u32,
    /// TSC ticks each stretch spins.
    pub stretch: u32,
    /// CPUs running this workload at the same time (CPU indices `0..team`). With more than one,
    /// each round also sends a cross-CPU IPI to another member, and the members wait for each
    /// other before draining (a CPU's books close only once nobody sends to it any more).
    pub team: u32,
    /// Send cross-CPU IPIs within the team (param `cross`, default 1).
    pub cross: bool,
}

/// Ticks to wait for outstanding interrupts at the end before calling them lost.
const DRAIN_TICKS: u64 = 200_000_000;

/// Zeroes this CPU's interrupt counters (nothing may be outstanding).
pub fn reset_counts() {
    let cpu = this_cpu();
    cpu.counts.reset();
    crate::watchdog::reset(cpu.index.load(Ordering::Relaxed) as usize);
}

/// A reusable barrier for the CPUs of one workload (generation counted, so the same one serves
/// every run). `poll` runs while waiting: the BSP keeps serving its link, APs their mailbox.
pub struct Barrier {
    arrived: AtomicU32,
    generation: AtomicU32,
}

impl Barrier {
    /// An empty barrier.
    pub const fn new() -> Barrier {
        Barrier {
            arrived: AtomicU32::new(0),
            generation: AtomicU32::new(0),
        }
    }

    /// Waits until `n` CPUs arrived.
    pub fn wait(&self, n: u32, poll: &mut dyn FnMut()) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 >= n {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation
                .store(generation.wrapping_add(1), Ordering::Release);
            return;
        }
        while self.generation.load(Ordering::Acquire) == generation {
            poll();
            core::hint::spin_loop();
        }
    }
}

/// The barrier between "stopped sending" and "drain" of a team workload.
static SENDERS_DONE: Barrier = Barrier::new();

/// Runs the workload on this CPU. Counters are not reset: call [`reset_counts`] first.
pub fn run(shape: Shape) -> bool {
    let mut rounds = 0..shape.rounds;
    run_until(shape, &mut || rounds.next().is_none(), &mut || {}).0
}

/// Runs rounds until `done()` (asked before each round), calling `poll` after each round and
/// while waiting; then stops its sources, meets the team, drains. Returns (drained, rounds).
pub fn run_until(
    shape: Shape,
    done: &mut dyn FnMut() -> bool,
    poll: &mut dyn FnMut(),
) -> (bool, u32) {
    // APs run this from their idle loop's mailbox, where IF=0: the workload needs IF=1.
    let was_enabled = arch::rflags() & arch::RFLAGS_IF != 0;
    // SAFETY: this CPU's IDT and LAPIC are set up (percpu::init ran before any work).
    unsafe { arch::sti() };
    CHAINS.store(true, Ordering::Relaxed);
    interrupts::clock_start(shape.clock_period);
    let mut round = 0u32;
    while !done() {
        one_round(round as usize, &shape);
        round = round.wrapping_add(1);
        poll();
    }
    interrupts::clock_stop();
    if shape.team > 1 {
        SENDERS_DONE.wait(shape.team, poll);
    }
    let drained = drain_with(poll);
    CHAINS.store(false, Ordering::Relaxed);
    if !was_enabled {
        arch::cli();
    }
    (drained, round)
}

/// One round: a self-IPI in one kind of stretch, and (in a team) a cross-CPU IPI.
fn one_round(round: usize, shape: &Shape) {
    let stretch = u64::from(shape.stretch);
    let vector = IPI_VECTORS[round % IPI_VECTORS.len()];
    if shape.team > 1 && shape.cross {
        // Every other member in turn, so with 4 CPUs every pair exchanges IPIs.
        let me = this_cpu().index.load(Ordering::Relaxed);
        let others = shape.team - 1;
        let target = (me + 1 + (round as u32 % others)) % shape.team;
        interrupts::send_cross(target);
    }
    // Each vector meets every kind of stretch: the kind changes every IPI_VECTORS rounds.
    match (round / IPI_VECTORS.len()) % 5 {
        0 => {
            interrupts::raise(vector);
            arch::spin(stretch);
        }
        1 => {
            // IF=0 stretch: the vector waits for the `sti`. In an exit mode the `cli` ran
            // after the last VM entry, so Bochs still lets one exit through with IF=0: the
            // core must defer it.
            let _off = IrqOff::enter();
            interrupts::raise(vector);
            arch::spin(stretch);
        }
        2 => {
            // CR8 stretch: classes ≤ 5 (DPC, 0x41, cross-CPU) wait, 0x61 and up get in.
            let _cr8 = RaisedCr8::to(5);
            interrupts::raise(vector);
            arch::spin(stretch);
        }
        3 => {
            let _off = IrqOff::enter();
            let _cr8 = RaisedCr8::to(9);
            interrupts::raise(vector);
            arch::spin(stretch);
        }
        _ => {
            // User mode with IF=1: interrupts arrive at CPL 3 (the loop turn is ~2 ticks).
            interrupts::raise(vector);
            if !crate::user::spin_in_ring3(stretch / 2) {
                this_cpu().counts.ring3_bad_exits.bump();
            }
        }
    }
}

/// Waits (IF=1) until every interrupt requested for this CPU has run.
pub fn drain() -> bool {
    drain_with(&mut || {})
}

fn drain_with(poll: &mut dyn FnMut()) -> bool {
    let cpu = this_cpu();
    let t0 = arch::rdtsc();
    loop {
        if counted_vectors().all(|v| cpu.outstanding(v) == 0) {
            return true;
        }
        if arch::rdtsc() - t0 > DRAIN_TICKS {
            return false;
        }
        poll();
        core::hint::spin_loop();
    }
}

/// Vectors whose raises this kernel counts (the wake-up IPI is the mailbox's, not counted).
fn counted_vectors() -> impl Iterator<Item = u8> {
    SOURCE_VECTORS.into_iter().filter(|&v| v != WAKE_VECTOR)
}

fn diff(a: u64, b: u64) -> u64 {
    a.abs_diff(b)
}

/// Declares [`Tally`]: every field is a count that adds up across CPUs and is printed as
/// `name=value` in the RESULT line.
macro_rules! tally {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// What one CPU's counters (and the core's snapshot of that CPU) add up to; summed
        /// over CPUs for the RESULT line.
        #[derive(Default, Clone, Copy)]
        pub struct Tally {
            $($(#[$doc])* pub $field: u64,)*
            /// Core: largest single exit (a maximum, not a sum).
            pub cycles_max: u64,
            /// Longest run of clock ticks NT would charge to the DPC watchdog on one CPU
            /// (`watchdog`; a maximum over CPUs, not a sum).
            pub dpc_watchdog_max: u64,
            /// Last violation seen (vector << 56 | RIP), 0 if none.
            pub last_violation: u64,
        }

        impl Tally {
            /// All zero.
            pub const ZERO: Tally = Tally {
                $($field: 0,)*
                cycles_max: 0,
                dpc_watchdog_max: 0,
                last_violation: 0,
            };

            /// Adds another CPU's tally.
            pub fn add(&mut self, o: &Tally) {
                $(self.$field = self.$field.wrapping_add(o.$field);)*
                self.cycles_max = self.cycles_max.max(o.cycles_max);
                self.dpc_watchdog_max = self.dpc_watchdog_max.max(o.dpc_watchdog_max);
                if o.last_violation != 0 {
                    self.last_violation = o.last_violation;
                }
            }

            /// Appends every field to a RESULT line.
            pub fn write(&self, line: &mut Line) {
                $(line.kv(stringify!($field), self.$field);)*
                line.kv("cycles_max", self.cycles_max)
                    .kv("dpc_watchdog_max", self.dpc_watchdog_max)
                    .kv("last_violation", format_args!("{:#x}", self.last_violation));
            }
        }
    };
}

tally! {
    /// CPUs whose interrupts did not all run before the drain timeout.
    undrained,
    /// Interrupts raised (self-IPIs and clock arms).
    raised,
    /// Handler runs of counted vectors.
    ran,
    /// Σ |raised − ran| per vector.
    lost,
    /// Runs in the guest.
    guest,
    /// Runs of class > DISPATCH in the guest, rejected-gate vectors and vectors whose delivery
    /// policy is not `replay` (the clock, `auto` by default) excluded.
    guest_hi,
    /// DPC runs in the guest.
    dpc_guest,
    /// Runs called by the core's replay.
    replayed,
    /// Runs in the exit-sti window.
    sti_window,
    /// Runs nested in root.
    nested_root,
    /// Runs that interrupted another handler.
    nested,
    /// Replays that interrupted a guest handler (their frame went below its live frames).
    replayed_nested,
    /// Replays entered with CR8 < 2.
    replay_low_cr8,
    /// Replays while the guest ran at CPL 3.
    replayed_from_ring3,
    /// Ring-3 excursions that ended elsewhere than their final UD2.
    ring3_bad_exits,
    /// DPC runs in root.
    dpc_in_root,
    /// Runs while the interrupted code masked the vector.
    ctx_violations,
    /// Canaries broken.
    canary_broken,
    /// Per-CPU gate reached on another CPU.
    wrong_idt,
    /// Vectors without a source.
    unexpected,
    /// LAPIC ISR bits left set.
    isr_left,
    /// LAPIC IRR bits left set.
    irr_left,
    /// Core: external-interrupt exits (reason 1).
    exits_extint,
    /// Core: Σ |extint_by_vector − (runs − nested_root)|: one exit per interrupt that did not
    /// arrive nested in root.
    exit_mismatch,
    /// Core: Σ |replays_by_vector − replayed runs|.
    replay_mismatch,
    /// Core: Σ |injections_by_vector − guest runs|.
    inject_mismatch,
    /// Core: total replays.
    core_replays,
    /// Core: total injections.
    core_injections,
    /// Core: injections of the DPC vector.
    core_dpc_injections,
    /// Core: deferrals.
    deferrals,
    /// Core: exit-sti windows.
    sti_windows,
    /// Core: exit-sti hand-backs to the guest.
    guest_takes,
    /// Core: rejected gates.
    rejected_gates,
    /// Core: every anomaly.
    anomalies,
    /// Core: exits timed.
    cycles_count,
    /// Core: root cycles over them.
    cycles_sum,
    /// Core: root cycles inside replayed handlers.
    handler_cycles_sum,
    /// Runs beyond what was raised: Σ max(ran − raised, 0) over counted vectors, plus runs of
    /// vectors nobody raises (the spurious vector aside, which has its own field).
    unraised,
    /// Deliveries of the LAPIC's spurious vector (no EOI; in the core's books like any vector).
    spurious,
    /// Clock deliveries of an arming that had already been delivered.
    clock_dups,
    /// Cross-CPU IPIs this CPU sent.
    cross_sent,
    /// Cross-CPU IPIs this CPU handled.
    cross_handled,
    /// Runs delivered by an acknowledging exit (the core's per-vector books must match them).
    acked,
    /// exit-sti window runs that interrupted a live guest handler.
    sti_window_nested,
    /// exit-sti window runs whose exit had valid interruption info.
    sti_window_info_valid,
    /// Core: exits that re-armed external-interrupt exiting after an exit-sti hand-over.
    exiting_resumes,
}

fn bits(regs: [u32; 8]) -> u64 {
    regs.iter().map(|r| u64::from(r.count_ones())).sum()
}

/// One tally slot per CPU, written by that CPU at the end of a concurrent run.
struct Slot(core::cell::UnsafeCell<Tally>);
// SAFETY: each CPU writes only its own slot inside `smp::run_concurrently`, and the BSP reads
// them after that returned (the mailbox's Release/Acquire orders the writes before the read).
unsafe impl Sync for Slot {}
static TALLIES: [Slot; crate::percpu::MAX_CPUS] =
    [const { Slot(core::cell::UnsafeCell::new(Tally::ZERO)) }; crate::percpu::MAX_CPUS];

/// Stores this CPU's tally (call on that CPU, inside `smp::run_concurrently`).
pub fn publish(t: Tally) {
    let i = this_cpu().index.load(Ordering::Relaxed) as usize;
    // SAFETY: only this CPU writes its slot (see `Slot`).
    unsafe { *TALLIES[i].0.get() = t };
}

/// CPU `i`'s published tally (call after the concurrent run).
pub fn published(i: usize) -> Tally {
    // SAFETY: the concurrent run is over (see `Slot`).
    TALLIES
        .get(i)
        .map_or(Tally::ZERO, |s| unsafe { *s.0.get() })
}

/// The sum of every online CPU's published tally (call after `smp::run_concurrently`).
pub fn collect() -> Tally {
    let mut sum = Tally::default();
    for (i, cpu) in crate::percpu::CPUS.iter().enumerate() {
        if cpu.online.load(Ordering::Acquire) {
            // SAFETY: the concurrent run is over (see `Slot`).
            sum.add(unsafe { &*TALLIES[i].0.get() });
        }
    }
    sum
}

impl Tally {
    /// Adds up `cpu`'s counters; reads the LAPIC, so call it on that CPU.
    pub fn of(cpu: &Cpu, core: Option<&Snapshot>, drained: bool) -> Tally {
        let c = &cpu.counts;
        let mut t = Tally {
            undrained: u64::from(!drained),
            ..Tally::default()
        };
        let books = crate::books::of(cpu);
        for v in counted_vectors() {
            let (raised, runs) = (u64::from(cpu.raised(v)), u64::from(c.runs.get(v)));
            t.raised += raised;
            t.ran += runs;
            t.lost += raised.saturating_sub(runs);
            t.unraised += runs.saturating_sub(raised);
        }
        // Only meaningful while virtualized (with the core's snapshot at hand).
        let policy = core.and_then(|_| {
            ackvisor_vmm::hypervisor::policy(ackvisor_vmm::CpuIndex(
                cpu.index.load(Ordering::Relaxed),
            ))
        });
        let replayed_by_policy = |v: u8| {
            policy
                .as_ref()
                .is_none_or(|p| p.policy(Vector(v)) == VectorPolicy::Replay)
        };
        for v in 0..=255u8 {
            if !SOURCE_VECTORS.contains(&v) && v != apic::SPURIOUS_VECTOR {
                t.unraised += u64::from(c.runs.get(v));
            }
            if crate::interrupts::cross_sender(v).is_some() {
                t.cross_handled += u64::from(c.runs.get(v));
            }
        }
        t.spurious = u64::from(c.runs.get(apic::SPURIOUS_VECTOR));
        t.cross_sent = c
            .sent_to
            .iter()
            .map(|s| u64::from(s.load(Ordering::Relaxed)))
            .sum();
        t.clock_dups = books.clock_dups.get();
        t.sti_window_nested = books.sti_window_nested.get();
        t.sti_window_info_valid = books.sti_window_info_valid.get();
        for v in 0..=255u8 {
            let guest = u64::from(c.guest.get(v));
            t.guest += guest;
            if v >> 4 > DISPATCH_CLASS
                && v != IST_GATE_VECTOR
                && v != DPL3_GATE_VECTOR
                && replayed_by_policy(v)
            {
                t.guest_hi += guest;
            }
            t.replayed += u64::from(c.replayed.get(v));
            t.sti_window += u64::from(c.sti_window.get(v));
            t.nested_root += u64::from(c.nested_root.get(v));
            t.replay_low_cr8 += u64::from(c.replay_low_cr8.get(v));
            t.nested += u64::from(c.nested.get(v));
            t.replayed_nested += u64::from(c.replayed_nested.get(v));
            let acked = u64::from(books.acked.get(v));
            t.acked += acked;
            if let Some(s) = core {
                // Every run an acknowledging exit brought was one exit, and either a replay (it
                // ran from the replay trampoline) or an injection (it ran in the guest). Runs in
                // other modes, in the exit-sti window or nested in root had no such exit.
                let i = usize::from(v);
                let replayed = u64::from(c.replayed.get(v));
                t.exit_mismatch += diff(s.extint_by_vector[i], acked);
                t.replay_mismatch += diff(s.replays_by_vector[i], replayed);
                t.inject_mismatch +=
                    diff(s.injections_by_vector[i], acked.saturating_sub(replayed));
            }
        }
        t.dpc_guest = u64::from(c.guest.get(DPC_VECTOR));
        t.replayed_from_ring3 = books.replayed_at_cpl3.get();
        t.ring3_bad_exits = c.ring3_bad_exits.get();
        t.dpc_in_root = c.dpc_in_root.get();
        t.ctx_violations = c.ctx_violations.get();
        t.canary_broken = c.canary_broken.get();
        t.wrong_idt = c.wrong_idt.get();
        t.unexpected = c.unexpected.get();
        t.last_violation = c.last_violation.load(Ordering::Relaxed);
        t.dpc_watchdog_max = crate::watchdog::longest(cpu.index.load(Ordering::Relaxed) as usize);
        t.isr_left = bits(apic::isr());
        t.irr_left = bits(apic::irr());
        if let Some(s) = core {
            t.exits_extint = s.exits[1];
            t.core_replays = s.total_replays();
            t.core_injections = s.total_injections();
            t.core_dpc_injections = s.injections_by_vector[usize::from(DPC_VECTOR)];
            t.deferrals = s.deferrals;
            t.sti_windows = s.sti_windows;
            t.guest_takes = s.guest_takes;
            t.rejected_gates = s.anomaly(ackvisor_vmm::stats::Anomaly::RejectedGate);
            t.anomalies = s.anomalies.iter().sum();
            t.cycles_count = s.cycles_count;
            t.cycles_sum = s.cycles_sum;
            t.cycles_max = s.cycles_max;
            t.handler_cycles_sum = s.handler_cycles_sum;
            let index = ackvisor_vmm::CpuIndex(cpu.index.load(Ordering::Relaxed));
            t.exiting_resumes =
                ackvisor_vmm::hypervisor::with_cpu_counters(index, |_, s| s.exiting_resumes())
                    .unwrap_or(0);
        }
        t
    }
}

/// Prints one line per vector that had any activity (for reading a failed run's console).
pub fn print_vectors(label: &str, cpu: &Cpu, core: Option<&Snapshot>) {
    let c = &cpu.counts;
    for v in 0..=255u8 {
        let i = usize::from(v);
        let (extint, replays, injections) = core.map_or((0, 0, 0), |s| {
            (
                s.extint_by_vector[i],
                s.replays_by_vector[i],
                s.injections_by_vector[i],
            )
        });
        if c.runs.get(v) == 0 && cpu.raised(v) == 0 && extint == 0 {
            continue;
        }
        crate::kprintln!(
            "VECTOR {label} cpu={} v={v:#04x} raised={} runs={} guest={} replayed={} sti_window={} nested_root={} | core extint={extint} replays={replays} injections={injections}",
            cpu.index.load(Ordering::Relaxed),
            cpu.raised(v),
            c.runs.get(v),
            c.guest.get(v),
            c.replayed.get(v),
            c.sti_window.get(v),
            c.nested_root.get(v),
        );
    }
}
