//! The per-CPU set of acknowledged vectors waiting for the guest (DESIGN §3 step 2).
//!
//! A 256-bit set: no allocation, highest vector first (which is also highest class first).
//!
//! **Runs in:** VMX root (pure data).
#![forbid(unsafe_code)]

use super::policy::Vector;

/// Vectors acknowledged but not yet delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingSet {
    bits: [u64; 4],
}

impl PendingSet {
    /// Empty.
    pub const fn new() -> Self {
        Self { bits: [0; 4] }
    }

    fn slot(v: Vector) -> (usize, u64) {
        (usize::from(v.0 >> 6), 1u64 << (v.0 & 63))
    }

    /// Adds `v`; false if it was already there (a second acknowledge of one vector before the
    /// first was delivered: the LAPIC cannot do that, so it is an anomaly).
    pub fn insert(&mut self, v: Vector) -> bool {
        let (i, m) = Self::slot(v);
        match self.bits.get_mut(i) {
            Some(w) => {
                let new = *w & m == 0;
                *w |= m;
                new
            }
            None => false,
        }
    }

    /// Removes `v`.
    pub fn remove(&mut self, v: Vector) {
        let (i, m) = Self::slot(v);
        if let Some(w) = self.bits.get_mut(i) {
            *w &= !m;
        }
    }

    /// Whether `v` waits.
    pub fn contains(&self, v: Vector) -> bool {
        let (i, m) = Self::slot(v);
        self.bits.get(i).is_some_and(|w| w & m != 0)
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

    /// Removes and returns the highest waiting vector.
    pub fn pop(&mut self) -> Option<Vector> {
        let v = self.highest()?;
        self.remove(v);
        Some(v)
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        // One OR chain and one branch: the exit path asks this on every interrupt.
        self.bits.iter().fold(0, |acc, w| acc | w) == 0
    }

    /// Number of waiting vectors.
    pub fn len(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_pending_vectors_of_different_priority_come_out_highest_first() {
        let mut p = PendingSet::new();
        assert!(p.insert(Vector(0x41)));
        assert!(p.insert(Vector(0xD1)));
        assert!(p.insert(Vector(0x2F)));
        assert_eq!(p.len(), 3);
        assert_eq!(p.pop(), Some(Vector(0xD1)));
        assert_eq!(p.pop(), Some(Vector(0x41)));
        assert_eq!(p.pop(), Some(Vector(0x2F)));
        assert_eq!(p.pop(), None);
        assert!(p.is_empty());
    }

    #[test]
    fn duplicate_insert_is_reported_and_kept_once() {
        let mut p = PendingSet::new();
        assert!(p.insert(Vector(0x61)));
        assert!(!p.insert(Vector(0x61)));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn every_vector_maps_to_its_own_bit() {
        let mut p = PendingSet::new();
        for v in 0..=255u8 {
            assert!(p.insert(Vector(v)));
            assert_eq!(p.highest(), Some(Vector(v)));
        }
        for v in (0..=255u8).rev() {
            assert!(p.contains(Vector(v)));
            assert_eq!(p.pop(), Some(Vector(v)));
        }
    }
}
