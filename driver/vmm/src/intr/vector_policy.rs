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
//! Layout: two 256-bit maps, "not plain replay" and "auto". The common case (replay) costs one
//! bit test on the exit path; only a marked vector reads the second map.
//!
//! **Runs in:** anywhere (pure; [`SharedPolicy`] is read in VMX root, written at PASSIVE).
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

use super::policy::{DISPATCH_LEVEL, Vector};

/// Lowest vector a policy applies to: below it are exceptions (< 0x20) and classes ≤ DISPATCH,
/// which are always injected (DESIGN §4).
pub const FIRST_POLICY_VECTOR: u8 = (DISPATCH_LEVEL + 1) << 4;

/// How one vector is delivered in `ack-replay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
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
}

const fn slot(v: Vector) -> (usize, u64) {
    ((v.0 >> 6) as usize, 1u64 << (v.0 & 63))
}

/// A whole policy table as a value (platform defaults, snapshots, tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyTable {
    /// Bit set: the vector is not plain replay.
    marked: [u64; 4],
    /// Bit set (with `marked`): `auto`; clear: `inject`.
    auto: [u64; 4],
}

impl PolicyTable {
    /// Every vector replayed.
    pub const ALL_REPLAY: Self = Self {
        marked: [0; 4],
        auto: [0; 4],
    };

    /// Sets `v`'s policy. Vectors that are not [`configurable`] are left as they are.
    pub fn set(&mut self, v: Vector, p: VectorPolicy) {
        if !configurable(v) {
            return;
        }
        let (i, m) = slot(v);
        let (Some(marked), Some(auto)) = (self.marked.get_mut(i), self.auto.get_mut(i)) else {
            return;
        };
        match p {
            VectorPolicy::Replay => {
                *marked &= !m;
                *auto &= !m;
            }
            VectorPolicy::Inject => {
                *marked |= m;
                *auto &= !m;
            }
            VectorPolicy::Auto => {
                *marked |= m;
                *auto |= m;
            }
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
        let (i, m) = slot(v);
        lookup(self.marked.get(i).copied().unwrap_or(0), m, || {
            self.auto.get(i).copied().unwrap_or(0)
        })
    }
}

#[inline(always)]
fn lookup(marked: u64, m: u64, auto: impl FnOnce() -> u64) -> VectorPolicy {
    if marked & m == 0 {
        VectorPolicy::Replay
    } else if auto() & m != 0 {
        VectorPolicy::Auto
    } else {
        VectorPolicy::Inject
    }
}

/// One CPU's live table: read by its root mode at every decision, written at PASSIVE by
/// `hypervisor::set_policy_all` (a single word store per map, so root never sees a torn entry
/// of another vector; one entry may briefly read `inject` between an `auto` write's two stores,
/// which is a correct delivery either way).
#[derive(Debug, Default)]
pub struct SharedPolicy {
    marked: [AtomicU64; 4],
    auto: [AtomicU64; 4],
}

impl SharedPolicy {
    /// Loads a whole table (for `virtualize`; nothing reads it yet).
    pub fn store_all(&self, t: &PolicyTable) {
        for (dst, src) in self.marked.iter().zip(t.marked) {
            dst.store(src, Ordering::Relaxed);
        }
        for (dst, src) in self.auto.iter().zip(t.auto) {
            dst.store(src, Ordering::Relaxed);
        }
    }

    /// Sets one vector. Atomic read-modify-writes, so two PASSIVE callers setting different
    /// vectors at once both land. Non-[`configurable`] vectors are left alone.
    pub fn set(&self, v: Vector, p: VectorPolicy) {
        if !configurable(v) {
            return;
        }
        let (i, m) = slot(v);
        let (Some(marked), Some(auto)) = (self.marked.get(i), self.auto.get(i)) else {
            return;
        };
        // Order: `auto` before `marked` when marking, `marked` before `auto` when unmarking, so
        // a concurrent reader sees the old policy, `inject`, or the new one.
        match p {
            VectorPolicy::Replay => {
                marked.fetch_and(!m, Ordering::Relaxed);
                auto.fetch_and(!m, Ordering::Relaxed);
            }
            VectorPolicy::Inject => {
                marked.fetch_or(m, Ordering::Relaxed);
                auto.fetch_and(!m, Ordering::Relaxed);
            }
            VectorPolicy::Auto => {
                auto.fetch_or(m, Ordering::Relaxed);
                marked.fetch_or(m, Ordering::Relaxed);
            }
        }
    }

    /// A copy as a value.
    pub fn snapshot(&self) -> PolicyTable {
        let mut t = PolicyTable::ALL_REPLAY;
        for (dst, src) in t.marked.iter_mut().zip(&self.marked) {
            *dst = src.load(Ordering::Relaxed);
        }
        for (dst, src) in t.auto.iter_mut().zip(&self.auto) {
            *dst = src.load(Ordering::Relaxed);
        }
        t
    }
}

impl PolicyLookup for SharedPolicy {
    #[inline(always)]
    fn policy(&self, v: Vector) -> VectorPolicy {
        let (i, m) = slot(v);
        let marked = self.marked.get(i).map_or(0, |w| w.load(Ordering::Relaxed));
        lookup(marked, m, || {
            self.auto.get(i).map_or(0, |w| w.load(Ordering::Relaxed))
        })
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
