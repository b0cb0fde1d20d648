//! Per-CPU counters: exits by reason, interrupt exits by vector, deliveries, anomalies and the
//! root-mode cycle cost of external-interrupt exits.
//!
//! One writer (root mode on the owning CPU) updates with a Relaxed load + store (no LOCK on
//! the exit path, DESIGN §8); any CPU may read a [`Snapshot`] at PASSIVE.
//!
//! **Runs in:** VMX root (record), anywhere (snapshot, merge).
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

/// Basic exit reasons counted one by one; higher reasons share the last slot.
pub const EXIT_REASON_SLOTS: usize = 80;
/// Power-of-two buckets of the cycle histogram: bucket `i` holds deltas in `[2^i, 2^(i+1))`
/// (bucket 0 also holds 0).
pub const HISTOGRAM_BUCKETS: usize = 32;

/// Anomalies: things the hardware or the guest did that the design says must not go unseen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Anomaly {
    /// Exit reason 1 with ack on, but the interruption info was invalid.
    InvalidIntrInfo = 0,
    /// Interruption info valid but not of type external interrupt.
    UnexpectedIntrType = 1,
    /// This CPU's IDT gate failed validation; the vector was injected instead.
    RejectedGate = 2,
    /// A vector was acknowledged again while an earlier acknowledge of it still waited (the
    /// guest's EOI cleared its ISR bit and the line was re-sent, issue 8): both are delivered.
    /// Log detail = vector, with `intr::SATURATED_DETAIL` if the set could hold no more.
    DuplicatePending = 3,
    /// A VMCALL that was not ours (wrong key or not CPL 0), answered with #UD or forwarded.
    ForeignVmcall = 4,
}

/// Number of [`Anomaly`] kinds.
pub const ANOMALY_KINDS: usize = 5;

/// The live counters of one CPU.
pub struct Stats {
    exits: [AtomicU64; EXIT_REASON_SLOTS],
    extint_by_vector: [AtomicU64; 256],
    replays_by_vector: [AtomicU64; 256],
    injections_by_vector: [AtomicU64; 256],
    deferrals: AtomicU64,
    sti_windows: AtomicU64,
    guest_takes: AtomicU64,
    anomalies: [AtomicU64; ANOMALY_KINDS],
    cycles_count: AtomicU64,
    cycles_sum: AtomicU64,
    cycles_max: AtomicU64,
    handler_cycles_sum: AtomicU64,
    histogram: [AtomicU64; HISTOGRAM_BUCKETS],
    /// Exits that found external-interrupt exiting suspended by an exit-sti hand-over and
    /// turned it back on. Not in [`Snapshot`] (whose layout is the wire's): read it with
    /// [`Stats::exiting_resumes`].
    exiting_resumes: AtomicU64,
}

/// A copy of one CPU's counters (or the sum of several, see [`Snapshot::merge`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Exits by basic reason; reasons ≥ `EXIT_REASON_SLOTS - 1` share the last slot.
    pub exits: [u64; EXIT_REASON_SLOTS],
    /// External-interrupt exits by acknowledged vector.
    pub extint_by_vector: [u64; 256],
    /// Vectors replayed through the host IDT in root mode.
    pub replays_by_vector: [u64; 256],
    /// Vectors injected into the guest at VM entry.
    pub injections_by_vector: [u64; 256],
    /// Vectors that had to wait in the pending set.
    pub deferrals: u64,
    /// Root-mode interrupt windows opened (exit-sti).
    pub sti_windows: u64,
    /// Times exit-sti let the guest take a vector itself (exiting briefly off).
    pub guest_takes: u64,
    /// Counts by [`Anomaly`].
    pub anomalies: [u64; ANOMALY_KINDS],
    /// External-interrupt exits timed.
    pub cycles_count: u64,
    /// Sum of root-mode TSC cycles over those exits.
    pub cycles_sum: u64,
    /// Largest single exit.
    pub cycles_max: u64,
    /// Part of `cycles_sum` spent inside replayed handlers (the OS's code, not ours).
    pub handler_cycles_sum: u64,
    /// Power-of-two histogram of the same deltas.
    pub histogram: [u64; HISTOGRAM_BUCKETS],
}

/// Whether the counters are compiled in (feature `stats`).
pub const ENABLED: bool = cfg!(feature = "stats");

/// The TSC's low 32 bits for the root-cycle counters, or 0 without `stats`: the build without
/// the counters has no timing instrument on the exit path either (issue 11). Benchmarks measure
/// from outside the path instead (Bochs's instruction trace, the guest's TSC gaps). Deltas are
/// taken with [`Tsc::elapsed`], modulo 2^32: one exit lasting 2^32 cycles (a second or more)
/// would wrap, and root mode never runs that long with IF=0.
#[inline(always)]
pub fn tsc() -> Tsc {
    if ENABLED {
        Tsc(crate::arch::regs::rdtsc() as u32)
    } else {
        Tsc(0)
    }
}

/// A [`tsc`] reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tsc(u32);

impl Tsc {
    /// Cycles from `self` to now (0 without `stats`).
    #[inline(always)]
    pub fn elapsed(self) -> u64 {
        u64::from(tsc().0.wrapping_sub(self.0))
    }
}

#[inline(always)]
fn bump(c: &AtomicU64) {
    if !ENABLED {
        return;
    }
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Histogram bucket of a TSC delta: `floor(log2(delta))`, 0 for 0, clamped to the last bucket.
pub const fn bucket(delta: u64) -> usize {
    // `| 1` puts 0 in bucket 0 without a branch (1 is there anyway).
    let b = (delta | 1).ilog2() as usize;
    if b >= HISTOGRAM_BUCKETS {
        HISTOGRAM_BUCKETS - 1
    } else {
        b
    }
}

fn copy<const N: usize>(src: &[AtomicU64; N]) -> [u64; N] {
    core::array::from_fn(|i| src.get(i).map_or(0, |c| c.load(Ordering::Relaxed)))
}

impl Default for Stats {
    #[inline]
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// All zero.
    // Inline: compiled only into crates that call it. Its frame holds a 7 KiB value, over the
    // 4 KiB a kernel frame may have; an unused copy in the core's object files would still have
    // to link in the driver (lld-link resolves every symbol of an object it pulls in).
    #[inline]
    pub const fn new() -> Self {
        Self {
            exits: [const { AtomicU64::new(0) }; EXIT_REASON_SLOTS],
            extint_by_vector: [const { AtomicU64::new(0) }; 256],
            replays_by_vector: [const { AtomicU64::new(0) }; 256],
            injections_by_vector: [const { AtomicU64::new(0) }; 256],
            deferrals: AtomicU64::new(0),
            sti_windows: AtomicU64::new(0),
            guest_takes: AtomicU64::new(0),
            anomalies: [const { AtomicU64::new(0) }; ANOMALY_KINDS],
            cycles_count: AtomicU64::new(0),
            cycles_sum: AtomicU64::new(0),
            cycles_max: AtomicU64::new(0),
            handler_cycles_sum: AtomicU64::new(0),
            histogram: [const { AtomicU64::new(0) }; HISTOGRAM_BUCKETS],
            exiting_resumes: AtomicU64::new(0),
        }
    }

    /// Counts one exit by its basic reason.
    #[inline(always)]
    pub fn exit(&self, basic_reason: u16) {
        let slot = usize::from(basic_reason).min(EXIT_REASON_SLOTS - 1);
        if let Some(c) = self.exits.get(slot) {
            bump(c);
        }
    }

    /// Counts an external-interrupt exit that acknowledged `vector`.
    #[inline(always)]
    pub fn extint(&self, vector: u8) {
        #[expect(clippy::indexing_slicing, reason = "u8 index into a 256-entry table")]
        bump(&self.extint_by_vector[usize::from(vector)]);
    }

    /// Counts a replay of `vector`.
    #[inline(always)]
    pub fn replay(&self, vector: u8) {
        #[expect(clippy::indexing_slicing, reason = "u8 index into a 256-entry table")]
        bump(&self.replays_by_vector[usize::from(vector)]);
    }

    /// Counts an injection of `vector`.
    #[inline(always)]
    pub fn injection(&self, vector: u8) {
        #[expect(clippy::indexing_slicing, reason = "u8 index into a 256-entry table")]
        bump(&self.injections_by_vector[usize::from(vector)]);
    }

    /// Counts a deferral into the pending set.
    pub fn deferral(&self) {
        bump(&self.deferrals);
    }

    /// Counts a root-mode interrupt window.
    pub fn sti_window(&self) {
        bump(&self.sti_windows);
    }

    /// Counts a hand-back of a pending IRR vector to the guest (exit-sti policy).
    pub fn guest_take(&self) {
        bump(&self.guest_takes);
    }

    /// Counts an exit that re-armed external-interrupt exiting after a hand-over.
    pub fn exiting_resumed(&self) {
        bump(&self.exiting_resumes);
    }

    /// Exits that re-armed external-interrupt exiting after an exit-sti hand-over: one follows
    /// every hand-over ([`Snapshot::guest_takes`]) once the guest ran.
    pub fn exiting_resumes(&self) -> u64 {
        self.exiting_resumes.load(Ordering::Relaxed)
    }

    /// Counts an anomaly.
    pub fn anomaly(&self, kind: Anomaly) {
        if let Some(c) = self.anomalies.get(kind as usize) {
            bump(c);
        }
    }

    /// Adds one external-interrupt exit's root-mode TSC delta (nothing without `stats`).
    #[inline(always)]
    pub fn cycles(&self, delta: u64) {
        if !ENABLED {
            return;
        }
        let count = self.cycles_count.load(Ordering::Relaxed);
        self.cycles_count
            .store(count.wrapping_add(1), Ordering::Relaxed);
        let sum = self.cycles_sum.load(Ordering::Relaxed);
        self.cycles_sum
            .store(sum.wrapping_add(delta), Ordering::Relaxed);
        if delta > self.cycles_max.load(Ordering::Relaxed) {
            self.cycles_max.store(delta, Ordering::Relaxed);
        }
        if let Some(c) = self.histogram.get(bucket(delta)) {
            bump(c);
        }
    }

    /// Adds TSC cycles spent inside a replayed handler call.
    #[inline(always)]
    pub fn handler_cycles(&self, delta: u64) {
        if !ENABLED {
            return;
        }
        let sum = self.handler_cycles_sum.load(Ordering::Relaxed);
        self.handler_cycles_sum
            .store(sum.wrapping_add(delta), Ordering::Relaxed);
    }

    /// Zeroes every counter. Called from PASSIVE: a concurrent root-mode increment may survive.
    pub fn reset(&self) {
        let all = self
            .exits
            .iter()
            .chain(&self.extint_by_vector)
            .chain(&self.replays_by_vector)
            .chain(&self.injections_by_vector)
            .chain(&self.anomalies)
            .chain(&self.histogram)
            .chain([
                &self.deferrals,
                &self.sti_windows,
                &self.guest_takes,
                &self.cycles_count,
                &self.cycles_sum,
                &self.cycles_max,
                &self.handler_cycles_sum,
                &self.exiting_resumes,
            ]);
        for c in all {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// A copy of the counters now.
    // Inline: compiled only into crates that call it. Its frame holds a 7 KiB value, over the
    // 4 KiB a kernel frame may have; an unused copy in the core's object files would still have
    // to link in the driver (lld-link resolves every symbol of an object it pulls in).
    #[inline]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            exits: copy(&self.exits),
            extint_by_vector: copy(&self.extint_by_vector),
            replays_by_vector: copy(&self.replays_by_vector),
            injections_by_vector: copy(&self.injections_by_vector),
            deferrals: self.deferrals.load(Ordering::Relaxed),
            sti_windows: self.sti_windows.load(Ordering::Relaxed),
            guest_takes: self.guest_takes.load(Ordering::Relaxed),
            anomalies: copy(&self.anomalies),
            cycles_count: self.cycles_count.load(Ordering::Relaxed),
            cycles_sum: self.cycles_sum.load(Ordering::Relaxed),
            cycles_max: self.cycles_max.load(Ordering::Relaxed),
            handler_cycles_sum: self.handler_cycles_sum.load(Ordering::Relaxed),
            histogram: copy(&self.histogram),
        }
    }
}

/// Number of counter groups: the fields of [`Snapshot`], in declaration order, which is also the
/// wire order of `control::wire::CpuStats`.
pub const COUNTER_GROUPS: usize = 13;

/// Counters read group by group in [`Snapshot`] field order: a [`Snapshot`], or one CPU's live
/// [`Stats`] read in place. A `Snapshot` is 7 KiB, more than a function may keep on NT's 24 KiB
/// kernel stack (where the control dispatcher runs), so kernel paths encode from the live
/// counters through this trait instead of copying them first.
pub trait Counters {
    /// Calls `f(group, value)` for every counter, group by group, in [`Snapshot`] field order.
    fn each(&self, f: &mut dyn FnMut(usize, u64));
}

impl Stats {
    /// The counter groups in [`Snapshot`] field order.
    fn groups(&self) -> [&[AtomicU64]; COUNTER_GROUPS] {
        use core::slice::from_ref;
        // Destructured without `..`: a new counter fails to compile here until it is placed.
        let Self {
            exits,
            extint_by_vector,
            replays_by_vector,
            injections_by_vector,
            deferrals,
            sti_windows,
            guest_takes,
            anomalies,
            cycles_count,
            cycles_sum,
            cycles_max,
            handler_cycles_sum,
            histogram,
            // Not a wire counter: read through `Stats::exiting_resumes`, reset with the rest.
            exiting_resumes: _,
        } = self;
        [
            exits,
            extint_by_vector,
            replays_by_vector,
            injections_by_vector,
            from_ref(deferrals),
            from_ref(sti_windows),
            from_ref(guest_takes),
            anomalies,
            from_ref(cycles_count),
            from_ref(cycles_sum),
            from_ref(cycles_max),
            from_ref(handler_cycles_sum),
            histogram,
        ]
    }
}

impl Counters for Stats {
    fn each(&self, f: &mut dyn FnMut(usize, u64)) {
        for (g, group) in self.groups().into_iter().enumerate() {
            for c in group {
                f(g, c.load(Ordering::Relaxed));
            }
        }
    }
}

impl Counters for Snapshot {
    fn each(&self, f: &mut dyn FnMut(usize, u64)) {
        for (g, group) in self.groups().into_iter().enumerate() {
            for v in group {
                f(g, *v);
            }
        }
    }
}

fn add<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y);
    }
}

impl Snapshot {
    /// All zero.
    // Inline: compiled only into crates that call it. Its frame holds a 7 KiB value, over the
    // 4 KiB a kernel frame may have; an unused copy in the core's object files would still have
    // to link in the driver (lld-link resolves every symbol of an object it pulls in).
    #[inline]
    pub const fn zero() -> Self {
        Self {
            exits: [0; EXIT_REASON_SLOTS],
            extint_by_vector: [0; 256],
            replays_by_vector: [0; 256],
            injections_by_vector: [0; 256],
            deferrals: 0,
            sti_windows: 0,
            guest_takes: 0,
            anomalies: [0; ANOMALY_KINDS],
            cycles_count: 0,
            cycles_sum: 0,
            cycles_max: 0,
            handler_cycles_sum: 0,
            histogram: [0; HISTOGRAM_BUCKETS],
        }
    }

    /// The counter groups in field order (see [`Counters`]).
    pub fn groups(&self) -> [&[u64]; COUNTER_GROUPS] {
        use core::slice::from_ref;
        // Destructured without `..`, like [`Stats`]'s: the two orders are checked equal by a test.
        let Self {
            exits,
            extint_by_vector,
            replays_by_vector,
            injections_by_vector,
            deferrals,
            sti_windows,
            guest_takes,
            anomalies,
            cycles_count,
            cycles_sum,
            cycles_max,
            handler_cycles_sum,
            histogram,
        } = self;
        [
            exits,
            extint_by_vector,
            replays_by_vector,
            injections_by_vector,
            from_ref(deferrals),
            from_ref(sti_windows),
            from_ref(guest_takes),
            anomalies,
            from_ref(cycles_count),
            from_ref(cycles_sum),
            from_ref(cycles_max),
            from_ref(handler_cycles_sum),
            histogram,
        ]
    }

    /// Adds another CPU's counters (max for the maximum).
    pub fn merge(&mut self, other: &Snapshot) {
        add(&mut self.exits, &other.exits);
        add(&mut self.extint_by_vector, &other.extint_by_vector);
        add(&mut self.replays_by_vector, &other.replays_by_vector);
        add(&mut self.injections_by_vector, &other.injections_by_vector);
        add(&mut self.anomalies, &other.anomalies);
        add(&mut self.histogram, &other.histogram);
        self.deferrals = self.deferrals.wrapping_add(other.deferrals);
        self.sti_windows = self.sti_windows.wrapping_add(other.sti_windows);
        self.guest_takes = self.guest_takes.wrapping_add(other.guest_takes);
        self.cycles_count = self.cycles_count.wrapping_add(other.cycles_count);
        self.cycles_sum = self.cycles_sum.wrapping_add(other.cycles_sum);
        self.cycles_max = self.cycles_max.max(other.cycles_max);
        self.handler_cycles_sum = self
            .handler_cycles_sum
            .wrapping_add(other.handler_cycles_sum);
    }

    /// Total exits of every reason.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().fold(0, |a, b| a.wrapping_add(*b))
    }

    /// Total replays.
    pub fn total_replays(&self) -> u64 {
        self.replays_by_vector
            .iter()
            .fold(0, |a, b| a.wrapping_add(*b))
    }

    /// Total injections.
    pub fn total_injections(&self) -> u64 {
        self.injections_by_vector
            .iter()
            .fold(0, |a, b| a.wrapping_add(*b))
    }

    /// Count of one anomaly kind.
    pub fn anomaly(&self, kind: Anomaly) -> u64 {
        self.anomalies.get(kind as usize).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn histogram_buckets_are_floor_log2_and_clamped() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(3), 1);
        assert_eq!(bucket(4), 2);
        assert_eq!(bucket(1023), 9);
        assert_eq!(bucket(1024), 10);
        assert_eq!(bucket(u64::MAX), HISTOGRAM_BUCKETS - 1);
    }

    #[test]
    fn cycles_track_count_sum_max_and_histogram() {
        let s = Stats::new();
        for d in [100, 300, 50, 1000] {
            s.cycles(d);
        }
        let snap = s.snapshot();
        assert_eq!(snap.cycles_count, 4);
        assert_eq!(snap.cycles_sum, 1450);
        assert_eq!(snap.cycles_max, 1000);
        assert_eq!(snap.histogram[bucket(100)], 1);
        assert_eq!(snap.histogram[bucket(50)], 1);
        assert_eq!(snap.histogram.iter().sum::<u64>(), 4);
    }

    #[test]
    fn exit_reasons_past_the_table_share_the_last_slot() {
        let s = Stats::new();
        s.exit(1);
        s.exit(1);
        s.exit(200);
        s.exit(u16::MAX);
        let snap = s.snapshot();
        assert_eq!(snap.exits[1], 2);
        assert_eq!(snap.exits[EXIT_REASON_SLOTS - 1], 2);
        assert_eq!(snap.total_exits(), 4);
    }

    #[test]
    fn merge_adds_counters_and_keeps_the_larger_max() {
        let a = Stats::new();
        let b = Stats::new();
        a.extint(0x40);
        a.replay(0x40);
        a.cycles(10);
        b.extint(0x40);
        b.injection(0x2f);
        b.anomaly(Anomaly::RejectedGate);
        b.cycles(99);
        let mut m = a.snapshot();
        m.merge(&b.snapshot());
        assert_eq!(m.extint_by_vector[0x40], 2);
        assert_eq!(m.total_replays(), 1);
        assert_eq!(m.total_injections(), 1);
        assert_eq!(m.anomaly(Anomaly::RejectedGate), 1);
        assert_eq!(m.cycles_max, 99);
        assert_eq!(m.cycles_count, 2);
    }

    #[test]
    fn live_counters_read_in_place_equal_the_snapshot() {
        let s = Stats::new();
        // A distinct value in every group, so a group out of place shows.
        s.exit(3);
        s.extint(0x41);
        s.extint(0x41);
        s.replay(0x42);
        s.injection(0x2f);
        s.deferral();
        s.sti_window();
        s.guest_take();
        s.anomaly(Anomaly::ForeignVmcall);
        s.cycles(700);
        s.cycles(50);
        s.handler_cycles(9);
        let mut live = std::vec::Vec::new();
        s.each(&mut |g, v| live.push((g, v)));
        let mut copied = std::vec::Vec::new();
        s.snapshot().each(&mut |g, v| copied.push((g, v)));
        assert_eq!(live, copied);
        assert_eq!(
            live.len(),
            EXIT_REASON_SLOTS + 3 * 256 + 3 + ANOMALY_KINDS + 4 + HISTOGRAM_BUCKETS
        );
        assert!(live.contains(&(9, 750)), "cycles_sum is group 9");
        assert!(live.contains(&(10, 700)), "cycles_max is group 10");
    }

    #[test]
    fn reset_zeroes_everything() {
        let s = Stats::new();
        s.exit(10);
        s.extint(0xd1);
        s.deferral();
        s.anomaly(Anomaly::InvalidIntrInfo);
        s.cycles(5);
        s.reset();
        assert_eq!(s.snapshot(), Snapshot::zero());
    }
}
