//! Per-vector delivery policy for `ack-replay` (and exit-sti's hand-over): `replay`, `inject`
//! or `auto`, the same on every CPU (issue 8, item 2).
//!
//! Why: NT's `KeAccumulateTicks` charges a clock tick whose interrupted IRQL is ≥ DISPATCH to
//! the DPC watchdog and resets the count only on a tick below DISPATCH (or from user mode). A
//! replay raises IRQL to DISPATCH first (DESIGN §4), so every replayed tick looks like DISPATCH
//! and, with the watchdog armed, ack-replay ends in DPC_WATCHDOG_VIOLATION (0x133, arg 1 = 1).
//! `auto` injects such a vector whenever the guest's IRQL is below DISPATCH, so NT takes the
//! tick at its true IRQL, and replays it otherwise (NT would then see ≥ DISPATCH anyway).
//!
//! Layout: one byte per vector (0 = replay), so the exit path pays one byte load and a test.
//!
//! **Runs in:** anywhere (pure; [`SharedPolicy`] is read in VMX root, written at PASSIVE).
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU8, Ordering};

use super::policy::{DISPATCH_LEVEL, Vector};

/// Lowest vector a policy applies to: below it are exceptions (< 0x20) and classes ≤ DISPATCH,
/// which are always injected (DESIGN §4).
pub const FIRST_POLICY_VECTOR: u8 = (DISPATCH_LEVEL + 1) << 4;

/// How one vector is delivered in `ack-replay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum VectorPolicy {
    /// Call this CPU's IDT gate in root mode (the default).
    Replay = 0,
    /// Inject into the guest at VM entry.
    Inject = 1,
    /// Inject while the guest's IRQL (CR8) is below DISPATCH, replay otherwise: the vector
    /// reaches NT at its true IRQL (clock and profile ticks).
    Auto = 2,
}

impl VectorPolicy {
    /// Every policy, in wire order.
    pub const ALL: [VectorPolicy; 3] = [Self::Replay, Self::Inject, Self::Auto];

    /// The name `ackctl` uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Replay => "replay",
            Self::Inject => "inject",
            Self::Auto => "auto",
        }
    }

    /// Parses an `ackctl` policy name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Whether a vector under this policy is injected now, with the guest at `guest_cr8`.
    #[inline(always)]
    pub const fn injects_at(self, guest_cr8: u8) -> bool {
        match self {
            Self::Replay => false,
            Self::Inject => true,
            Self::Auto => guest_cr8 < DISPATCH_LEVEL,
        }
    }
}

impl TryFrom<u32> for VectorPolicy {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            0 => Ok(Self::Replay),
            1 => Ok(Self::Inject),
            2 => Ok(Self::Auto),
            other => Err(other),
        }
    }
}

impl core::fmt::Display for VectorPolicy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `v` takes a policy at all (see [`FIRST_POLICY_VECTOR`]).
pub const fn configurable(v: Vector) -> bool {
    v.0 >= FIRST_POLICY_VECTOR
}

/// What [`super::policy::decide`] asks: the policy of one vector.
pub trait PolicyLookup {
    /// `v`'s policy.
    fn policy(&self, v: Vector) -> VectorPolicy;

    /// Whether `v` is injected now, with the guest at `guest_cr8` (the exit path's question).
    #[inline(always)]
    fn injects_now(&self, v: Vector, guest_cr8: u8) -> bool {
        self.policy(v).injects_at(guest_cr8)
    }
}

/// A table entry as stored: `VectorPolicy as u8`. 0 is `replay`, so a zeroed table replays all.
const fn entry(raw: u8) -> VectorPolicy {
    match raw {
        1 => VectorPolicy::Inject,
        2 => VectorPolicy::Auto,
        _ => VectorPolicy::Replay,
    }
}

/// A whole policy table as a value (platform defaults, snapshots, tests): one byte per vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyTable {
    entries: [u8; 256],
}

impl Default for PolicyTable {
    fn default() -> Self {
        Self::ALL_REPLAY
    }
}

impl PolicyTable {
    /// Every vector replayed.
    pub const ALL_REPLAY: Self = Self { entries: [0; 256] };

    /// Sets `v`'s policy. Vectors that are not [`configurable`] are left as they are.
    pub fn set(&mut self, v: Vector, p: VectorPolicy) {
        if let Some(e) = self
            .entries
            .get_mut(usize::from(v.0))
            .filter(|_| configurable(v))
        {
            *e = p as u8;
        }
    }

    /// This table with `vectors` set to `p`.
    pub fn with(mut self, vectors: &[u8], p: VectorPolicy) -> Self {
        for v in vectors {
            self.set(Vector(*v), p);
        }
        self
    }

    /// The vectors whose policy is not `replay`, with their policy, lowest first.
    pub fn marked(&self) -> impl Iterator<Item = (Vector, VectorPolicy)> + '_ {
        (0..=255u8)
            .map(Vector)
            .map(|v| (v, self.policy(v)))
            .filter(|(_, p)| *p != VectorPolicy::Replay)
    }
}

impl PolicyLookup for PolicyTable {
    #[inline(always)]
    fn policy(&self, v: Vector) -> VectorPolicy {
        entry(self.entries.get(usize::from(v.0)).copied().unwrap_or(0))
    }
}

/// One CPU's live table, one byte per vector: read by its root mode at each decision (one
/// byte load: the exit path's whole cost of the policy), written at PASSIVE by
/// `hypervisor::set_policy_all`. Each vector is its own byte, so a write never disturbs another
/// vector's entry and needs no read-modify-write.
#[derive(Debug)]
pub struct SharedPolicy {
    entries: [AtomicU8; 256],
}

impl Default for SharedPolicy {
    fn default() -> Self {
        Self {
            entries: [const { AtomicU8::new(0) }; 256],
        }
    }
}

impl SharedPolicy {
    /// Loads a whole table (for `virtualize`; nothing reads it yet).
    pub fn store_all(&self, t: &PolicyTable) {
        for (dst, src) in self.entries.iter().zip(&t.entries) {
            dst.store(*src, Ordering::Relaxed);
        }
    }

    /// Sets one vector. Non-[`configurable`] vectors are left alone.
    pub fn set(&self, v: Vector, p: VectorPolicy) {
        if let Some(e) = self
            .entries
            .get(usize::from(v.0))
            .filter(|_| configurable(v))
        {
            e.store(p as u8, Ordering::Relaxed);
        }
    }

    /// A copy as a value.
    pub fn snapshot(&self) -> PolicyTable {
        let mut t = PolicyTable::ALL_REPLAY;
        for (dst, src) in t.entries.iter_mut().zip(&self.entries) {
            *dst = src.load(Ordering::Relaxed);
        }
        t
    }
}

impl SharedPolicy {
    #[inline(always)]
    fn raw(&self, v: Vector) -> u8 {
        self.entries
            .get(usize::from(v.0))
            .map_or(0, |e| e.load(Ordering::Relaxed))
    }
}

impl PolicyLookup for SharedPolicy {
    #[inline(always)]
    fn policy(&self, v: Vector) -> VectorPolicy {
        entry(self.raw(v))
    }

    /// On the raw byte, so `replay` costs one load and one test on the exit path (decoding to
    /// the enum first made the compiler spend ten instructions). Entries only ever hold
    /// `VectorPolicy as u8` ([`SharedPolicy::set`], [`SharedPolicy::store_all`]).
    #[inline(always)]
    fn injects_now(&self, v: Vector, guest_cr8: u8) -> bool {
        let raw = self.raw(v);
        raw != VectorPolicy::Replay as u8
            && (raw != VectorPolicy::Auto as u8 || guest_cr8 < DISPATCH_LEVEL)
    }
}

/// LVT timer register: vector in bits 7:0, mask in bit 16 (SDM 3A, "Local Vector Table").
const LVT_VECTOR_MASK: u32 = 0xFF;
const LVT_MASKED: u32 = 1 << 16;

/// Defaults for a platform whose tick vectors are `fixed`, plus the vector the LAPIC timer of
/// this CPU is programmed with, when it is unmasked (`lvt_timer` is the raw LVT timer register):
/// whatever the OS drives from the LAPIC timer is its clock or its profile tick, and both must
/// reach it at their true IRQL. Every one of them gets `auto`.
pub fn tick_defaults(fixed: &[u8], lvt_timer: Option<u32>) -> PolicyTable {
    let mut t = PolicyTable::ALL_REPLAY.with(fixed, VectorPolicy::Auto);
    if let Some(lvt) = lvt_timer.filter(|l| l & LVT_MASKED == 0) {
        t.set(Vector((lvt & LVT_VECTOR_MASK) as u8), VectorPolicy::Auto);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wire_values_round_trip() {
        for p in VectorPolicy::ALL {
            assert_eq!(VectorPolicy::from_name(p.name()), Some(p));
            assert_eq!(VectorPolicy::try_from(p as u32), Ok(p));
        }
        assert_eq!(VectorPolicy::try_from(3), Err(3));
        assert_eq!(VectorPolicy::from_name("Inject"), None);
    }

    #[test]
    fn auto_injects_only_below_dispatch() {
        assert!(VectorPolicy::Auto.injects_at(0));
        assert!(VectorPolicy::Auto.injects_at(1));
        assert!(!VectorPolicy::Auto.injects_at(2));
        assert!(!VectorPolicy::Auto.injects_at(0xC));
        assert!(VectorPolicy::Inject.injects_at(0xC));
        assert!(!VectorPolicy::Replay.injects_at(0));
    }

    #[test]
    fn every_vector_has_its_own_entry_in_both_tables() {
        assert_eq!(entry(VectorPolicy::Inject as u8), VectorPolicy::Inject);
        assert_eq!(entry(VectorPolicy::Auto as u8), VectorPolicy::Auto);
        assert_eq!(entry(0xFF), VectorPolicy::Replay);
        let shared = SharedPolicy::default();
        let mut value = PolicyTable::ALL_REPLAY;
        for v in FIRST_POLICY_VECTOR..=255 {
            let p = VectorPolicy::ALL[usize::from(v) % 3];
            value.set(Vector(v), p);
            shared.set(Vector(v), p);
        }
        for v in 0..=255u8 {
            let want = if v < FIRST_POLICY_VECTOR {
                VectorPolicy::Replay
            } else {
                VectorPolicy::ALL[usize::from(v) % 3]
            };
            assert_eq!(value.policy(Vector(v)), want, "{v:#x}");
            assert_eq!(shared.policy(Vector(v)), want, "{v:#x}");
        }
        assert_eq!(shared.snapshot(), value);
        // The exit path's shortcut answers what the enum does, at every IRQL.
        for v in 0..=255u8 {
            for cr8 in 0..16 {
                assert_eq!(
                    shared.injects_now(Vector(v), cr8),
                    value.policy(Vector(v)).injects_at(cr8),
                    "{v:#x} at {cr8}"
                );
            }
        }
        let copy = SharedPolicy::default();
        copy.store_all(&value);
        assert_eq!(copy.snapshot(), value);
    }

    #[test]
    fn setting_back_to_replay_clears_both_maps() {
        let shared = SharedPolicy::default();
        shared.set(Vector(0xD1), VectorPolicy::Auto);
        shared.set(Vector(0xD1), VectorPolicy::Inject);
        assert_eq!(shared.policy(Vector(0xD1)), VectorPolicy::Inject);
        shared.set(Vector(0xD1), VectorPolicy::Replay);
        assert_eq!(shared.snapshot(), PolicyTable::ALL_REPLAY);
    }

    #[test]
    fn dispatch_class_and_exception_vectors_take_no_policy() {
        let mut t = PolicyTable::ALL_REPLAY;
        for v in [0x00, 0x0E, 0x1F, 0x20, 0x2F] {
            assert!(!configurable(Vector(v)));
            t.set(Vector(v), VectorPolicy::Inject);
        }
        assert_eq!(t, PolicyTable::ALL_REPLAY);
        assert!(configurable(Vector(0x30)));
    }

    #[test]
    fn tick_defaults_add_an_unmasked_lapic_timer_vector() {
        let fixed = [0xD1, 0xD2];
        let t = tick_defaults(&fixed, None);
        let marked: [_; 2] = core::array::from_fn(|i| t.marked().nth(i));
        assert_eq!(
            marked,
            [
                Some((Vector(0xD1), VectorPolicy::Auto)),
                Some((Vector(0xD2), VectorPolicy::Auto))
            ]
        );
        assert_eq!(t.marked().count(), 2);
        // Masked LVT: ignored. Unmasked: its vector joins. A DISPATCH-class one is refused.
        assert_eq!(tick_defaults(&fixed, Some(LVT_MASKED | 0xFD)), t);
        let with_timer = tick_defaults(&fixed, Some(0x2_00FD));
        assert_eq!(with_timer.policy(Vector(0xFD)), VectorPolicy::Auto);
        assert_eq!(with_timer.marked().count(), 3);
        assert_eq!(tick_defaults(&fixed, Some(0x2F)), t);
    }
}
