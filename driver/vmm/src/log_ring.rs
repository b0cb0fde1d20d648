//! A lock-free per-CPU ring of fixed-size binary log records written in root mode and drained
//! at PASSIVE (DESIGN §4: nothing prints from root).
//!
//! One producer (root on the owning CPU), one consumer (the drain worker). When full, the
//! oldest records are overwritten and counted as lost, so root never waits.
//!
//! **Runs in:** VMX root (push), PASSIVE (drain).
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

/// Records per CPU.
pub const RING_RECORDS: usize = 64;

/// What a record is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum LogKind {
    /// An anomaly (a = `stats::Anomaly`, b = detail such as the raw interruption info).
    Anomaly = 1,
    /// A gate was rejected (a = vector, b = `GateRejection` as u64).
    GateRejected = 2,
    /// Mode applied (a = mode).
    ModeApplied = 3,
    /// A fatal event (a = exit reason, b = guest RIP).
    Fatal = 4,
    /// A foreign VMCALL (a = guest RAX, b = action).
    ForeignVmcall = 5,
}

impl LogKind {
    /// From the stored word.
    pub fn from_raw(v: u64) -> Option<Self> {
        match v {
            1 => Some(Self::Anomaly),
            2 => Some(Self::GateRejected),
            3 => Some(Self::ModeApplied),
            4 => Some(Self::Fatal),
            5 => Some(Self::ForeignVmcall),
            _ => None,
        }
    }
}

/// One record as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// TSC when written.
    pub tsc: u64,
    /// Kind.
    pub kind: LogKind,
    /// First value.
    pub a: u64,
    /// Second value.
    pub b: u64,
}

/// The ring. Slots are atomics so a torn read is detected by the sequence word, not UB.
pub struct LogRing {
    head: AtomicU64,
    tail: AtomicU64,
    lost: AtomicU64,
    slots: [[AtomicU64; 5]; RING_RECORDS],
}

impl Default for LogRing {
    fn default() -> Self {
        Self::new()
    }
}

impl LogRing {
    /// Empty.
    pub const fn new() -> Self {
        Self {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            slots: [const { [const { AtomicU64::new(0) }; 5] }; RING_RECORDS],
        }
    }

    /// Appends a record (producer side, root mode).
    pub fn push(&self, tsc: u64, kind: LogKind, a: u64, b: u64) {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Acquire);
        if head.wrapping_sub(tail) >= RING_RECORDS as u64 {
            self.lost.store(
                self.lost.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
        }
        if let Some(slot) = self.slots.get((head % RING_RECORDS as u64) as usize) {
            // seq = head + 1 marks the slot as written for this lap; 0 means "being written".
            slot[0].store(0, Ordering::Relaxed);
            slot[1].store(tsc, Ordering::Relaxed);
            slot[2].store(kind as u64, Ordering::Relaxed);
            slot[3].store(a, Ordering::Relaxed);
            slot[4].store(b, Ordering::Relaxed);
            slot[0].store(head.wrapping_add(1), Ordering::Release);
        }
        self.head.store(head.wrapping_add(1), Ordering::Release);
    }

    /// Takes every readable record, oldest first (consumer side, PASSIVE).
    pub fn drain(&self, mut f: impl FnMut(Record)) {
        let head = self.head.load(Ordering::Acquire);
        let mut tail = self.tail.load(Ordering::Relaxed);
        if head.wrapping_sub(tail) > RING_RECORDS as u64 {
            tail = head.wrapping_sub(RING_RECORDS as u64);
        }
        while tail != head {
            if let Some(slot) = self.slots.get((tail % RING_RECORDS as u64) as usize) {
                let seq = slot[0].load(Ordering::Acquire);
                let rec = (
                    slot[1].load(Ordering::Relaxed),
                    slot[2].load(Ordering::Relaxed),
                    slot[3].load(Ordering::Relaxed),
                    slot[4].load(Ordering::Relaxed),
                );
                let still = slot[0].load(Ordering::Acquire);
                if seq == tail.wrapping_add(1) && still == seq {
                    if let Some(kind) = LogKind::from_raw(rec.1) {
                        f(Record {
                            tsc: rec.0,
                            kind,
                            a: rec.2,
                            b: rec.3,
                        });
                    }
                } else {
                    self.lost.store(
                        self.lost.load(Ordering::Relaxed).wrapping_add(1),
                        Ordering::Relaxed,
                    );
                }
            }
            tail = tail.wrapping_add(1);
        }
        self.tail.store(tail, Ordering::Release);
    }

    /// Records overwritten before they were drained.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn drains_in_order() {
        let r = LogRing::new();
        r.push(1, LogKind::Anomaly, 10, 11);
        r.push(2, LogKind::ModeApplied, 2, 0);
        let mut got = Vec::new();
        r.drain(|rec| got.push(rec));
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            Record {
                tsc: 1,
                kind: LogKind::Anomaly,
                a: 10,
                b: 11
            }
        );
        assert_eq!(got[1].kind, LogKind::ModeApplied);
        let mut again = 0;
        r.drain(|_| again += 1);
        assert_eq!(again, 0);
    }

    #[test]
    fn wrap_around_keeps_the_newest_and_counts_the_lost() {
        let r = LogRing::new();
        let n = RING_RECORDS as u64 + 10;
        for i in 0..n {
            r.push(i, LogKind::Fatal, i, 0);
        }
        let mut got = Vec::new();
        r.drain(|rec| got.push(rec.a));
        assert_eq!(got.len(), RING_RECORDS);
        assert_eq!(got[0], 10);
        assert_eq!(*got.last().expect("non-empty"), n - 1);
        assert_eq!(r.lost(), 10);
    }
}
