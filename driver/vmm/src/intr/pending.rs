//! The per-CPU set of acknowledged vectors waiting for the guest (DESIGN §3 step 2).
//!
//! A 256-bit set for "which vectors wait" (highest vector first, which is also highest class
//! first) plus a count of acknowledges per vector: no allocation.
//!
//! Why a count: the LAPIC can acknowledge a vector again while an earlier acknowledge of it still
//! waits here. The guest's EOI clears the *highest* ISR bit, and a deferred vector is often the
//! highest, so an EOI meant for the interrupted handler (NT's DPC handler runs with IF=0 until its
//! EOI) clears the deferred vector's bit instead. A level-triggered line whose IOAPIC uses
//! broadcast EOI (VMware's has no EOI register) is then sent and acknowledged again. Each
//! acknowledge must be delivered once, or one ISR bit stays set for good and masks its class and
//! everything below it on that CPU (issue 8, item 1).
//!
//! **Runs in:** VMX root (pure data).
#![forbid(unsafe_code)]

use super::policy::Vector;

/// Acknowledges of one vector the set can hold before it refuses (each needs an EOI in between,
/// so reaching it means the guest EOIs far faster than it takes interrupts: an anomaly).
pub const MAX_ACKS_PER_VECTOR: u8 = u8::MAX;

/// Why [`PendingSet::insert`] refused a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saturated;

/// Vectors acknowledged but not yet delivered, with how many times each was acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingSet {
    bits: [u64; 4],
    acks: [u8; 256],
    /// Acknowledges waiting (the sum of `acks`), so that [`PendingSet::is_empty`] is one scalar
    /// compare. An OR over `bits` is what an optimizing compiler makes SSE of (`por`,
    /// `pcmpeqd`): on the exit stub's fast path, which saves no vector state, the release
    /// ackvisor.sys changed the guest's XMM0 and XMM1 on every external-interrupt exit.
    waiting: u32,
}

impl Default for PendingSet {
    fn default() -> Self {
        Self::new()
    }
}

impl PendingSet {
    /// Empty.
    pub const fn new() -> Self {
        Self {
            bits: [0; 4],
            acks: [0; 256],
            waiting: 0,
        }
    }

    fn slot(v: Vector) -> (usize, u64) {
        (usize::from(v.0 >> 6), 1u64 << (v.0 & 63))
    }

    /// Adds one acknowledge of `v`; returns how many of `v` now wait (more than 1: the vector
    /// was acknowledged again before its first delivery, see the module docs).
    pub fn insert(&mut self, v: Vector) -> Result<u8, Saturated> {
        let (i, m) = Self::slot(v);
        let (Some(w), Some(n)) = (self.bits.get_mut(i), self.acks.get_mut(usize::from(v.0))) else {
            return Err(Saturated);
        };
        if *n == MAX_ACKS_PER_VECTOR {
            return Err(Saturated);
        }
        *n += 1;
        *w |= m;
        self.waiting = self.waiting.saturating_add(1);
        Ok(*n)
    }

    /// Takes one acknowledge of `v` out (the vector stays while more wait).
    pub fn remove(&mut self, v: Vector) {
        let (i, m) = Self::slot(v);
        let (Some(w), Some(n)) = (self.bits.get_mut(i), self.acks.get_mut(usize::from(v.0))) else {
            return;
        };
        if *n == 0 {
            return;
        }
        *n -= 1;
        self.waiting = self.waiting.saturating_sub(1);
        if *n == 0 {
            *w &= !m;
        }
    }

    /// Whether `v` waits.
    pub fn contains(&self, v: Vector) -> bool {
        let (i, m) = Self::slot(v);
        self.bits.get(i).is_some_and(|w| w & m != 0)
    }

    /// How many acknowledges of `v` wait.
    pub fn count(&self, v: Vector) -> u8 {
        self.acks.get(usize::from(v.0)).copied().unwrap_or(0)
    }

    /// The highest waiting vector.
    pub fn highest(&self) -> Option<Vector> {
        self.bits
            .iter()
            .enumerate()
            .rev()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| Vector((i as u8) * 64 + (63 - w.leading_zeros() as u8)))
    }

    /// Takes one acknowledge of the highest waiting vector out and returns that vector.
    pub fn pop(&mut self) -> Option<Vector> {
        let v = self.highest()?;
        self.remove(v);
        Some(v)
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        // One compare: the exit path asks this on every interrupt (see `waiting`).
        self.waiting == 0
    }

    /// Number of waiting acknowledges (each one still owes the guest a delivery and an EOI).
    pub fn len(&self) -> usize {
        self.waiting as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_pending_vectors_of_different_priority_come_out_highest_first() {
        let mut p = PendingSet::new();
        assert_eq!(p.insert(Vector(0x41)), Ok(1));
        assert_eq!(p.insert(Vector(0xD1)), Ok(1));
        assert_eq!(p.insert(Vector(0x2F)), Ok(1));
        assert_eq!(p.len(), 3);
        assert_eq!(p.pop(), Some(Vector(0xD1)));
        assert_eq!(p.pop(), Some(Vector(0x41)));
        assert_eq!(p.pop(), Some(Vector(0x2F)));
        assert_eq!(p.pop(), None);
        assert!(p.is_empty());
    }

    #[test]
    fn a_vector_acknowledged_twice_is_delivered_twice() {
        // Issue 8 item 1: H deferred, the guest's EOI lands on H, H is sent and acknowledged
        // again. Two acknowledges owe two deliveries (two EOIs), or ISR[0x2F] stays set.
        let mut p = PendingSet::new();
        assert_eq!(p.insert(Vector(0x61)), Ok(1));
        assert_eq!(p.insert(Vector(0x61)), Ok(2));
        assert_eq!((p.len(), p.count(Vector(0x61))), (2, 2));
        assert_eq!(p.pop(), Some(Vector(0x61)));
        assert!(
            p.contains(Vector(0x61)),
            "the second acknowledge still waits"
        );
        assert_eq!(p.pop(), Some(Vector(0x61)));
        assert_eq!(p.pop(), None);
        assert!(p.is_empty());
    }

    #[test]
    fn repeated_acknowledges_keep_priority_order_with_other_vectors() {
        let mut p = PendingSet::new();
        for v in [0x41, 0xB1, 0x41, 0xB1, 0x41] {
            p.insert(Vector(v)).unwrap();
        }
        let order: [Option<Vector>; 6] = core::array::from_fn(|_| p.pop());
        assert_eq!(
            order,
            [
                Some(Vector(0xB1)),
                Some(Vector(0xB1)),
                Some(Vector(0x41)),
                Some(Vector(0x41)),
                Some(Vector(0x41)),
                None
            ]
        );
    }

    #[test]
    fn removing_a_vector_that_does_not_wait_changes_nothing() {
        let mut p = PendingSet::new();
        p.remove(Vector(0x41));
        assert!(p.is_empty());
        assert_eq!(p.insert(Vector(0xD1)), Ok(1));
        p.remove(Vector(0x41));
        assert_eq!((p.len(), p.is_empty()), (1, false));
        p.remove(Vector(0xD1));
        assert_eq!((p.len(), p.is_empty()), (0, true));
    }

    #[test]
    fn a_saturated_vector_is_refused_not_wrapped() {
        let mut p = PendingSet::new();
        for i in 1..=MAX_ACKS_PER_VECTOR {
            assert_eq!(p.insert(Vector(0x81)), Ok(i));
        }
        assert_eq!(p.insert(Vector(0x81)), Err(Saturated));
        assert_eq!(p.count(Vector(0x81)), MAX_ACKS_PER_VECTOR);
        p.remove(Vector(0x81));
        assert_eq!(p.insert(Vector(0x81)), Ok(MAX_ACKS_PER_VECTOR));
    }

    #[test]
    fn every_vector_maps_to_its_own_bit() {
        let mut p = PendingSet::new();
        for v in 0..=255u8 {
            assert_eq!(p.insert(Vector(v)), Ok(1));
            assert_eq!(p.highest(), Some(Vector(v)));
        }
        for v in (0..=255u8).rev() {
            assert!(p.contains(Vector(v)));
            assert_eq!(p.pop(), Some(Vector(v)));
        }
    }
}
