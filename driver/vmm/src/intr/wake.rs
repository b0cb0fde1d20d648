//! What root writes into the VMCS after it delivered a vector: the injection itself, and the
//! guest's activity state (a halted guest that got an interrupt would have woken, DESIGN §1).
//! Generic over [`VmcsAccess`] so unit tests watch the writes through a recorder; on the exit
//! path it is the real [`crate::vmx::Vmcs`] and compiles to the same VMWRITEs as before.
//!
//! **Runs in:** VMX root (pure over its accessor).
#![forbid(unsafe_code)]

use super::policy;
use crate::vmx::access::VmcsAccess;
use crate::vmx::fields::{ActivityState, EntryIntrInfo};
use x86::vmx::vmcs::{control, guest};

/// After a delivery to a guest that was in `before`: writes the activity state the guest must
/// enter with, if it differs (one VMWRITE for a halted guest, none otherwise).
#[inline(always)]
pub fn after_delivery<V: VmcsAccess + ?Sized>(vmcs: &V, before: ActivityState) {
    let next = policy::activity_after_delivery(before);
    if next != before {
        vmcs.set(guest::ACTIVITY_STATE, u64::from(next.raw()));
    }
}

/// Injects external-interrupt vector `v` at the next VM entry into a guest that was in
/// `before`, and wakes it if it was halted.
#[inline(always)]
pub fn inject_external<V: VmcsAccess + ?Sized>(vmcs: &V, v: u8, before: ActivityState) {
    vmcs.set(
        control::VMENTRY_INTERRUPTION_INFO_FIELD,
        u64::from(EntryIntrInfo::external(v).raw()),
    );
    after_delivery(vmcs, before);
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;

    /// A VMCS that remembers every write (and reads back what was written, 0 otherwise).
    #[derive(Default)]
    struct Recorder {
        writes: RefCell<[(u32, u64); 8]>,
        count: RefCell<usize>,
    }

    impl Recorder {
        fn written(&self) -> ([(u32, u64); 8], usize) {
            (*self.writes.borrow(), *self.count.borrow())
        }
        fn value(&self, field: u32) -> Option<u64> {
            let (w, n) = self.written();
            w[..n]
                .iter()
                .rev()
                .find(|(f, _)| *f == field)
                .map(|(_, v)| *v)
        }
    }

    impl VmcsAccess for Recorder {
        fn read(&self, field: u32) -> u64 {
            self.value(field).unwrap_or(u64::MAX)
        }
        fn set(&self, field: u32, value: u64) {
            let mut n = self.count.borrow_mut();
            self.writes.borrow_mut()[*n] = (field, value);
            *n += 1;
        }
    }

    #[test]
    fn a_halted_guest_is_woken_after_a_delivery() {
        let vmcs = Recorder::default();
        after_delivery(&vmcs, ActivityState::Hlt);
        assert_eq!(
            vmcs.value(guest::ACTIVITY_STATE),
            Some(u64::from(ActivityState::Active.raw()))
        );
        assert_eq!(vmcs.written().1, 1);
    }

    #[test]
    fn an_active_guest_gets_no_activity_write() {
        let vmcs = Recorder::default();
        after_delivery(&vmcs, ActivityState::Active);
        assert_eq!(vmcs.written().1, 0);
    }

    #[test]
    fn an_injection_into_a_halted_guest_writes_the_event_and_wakes_it() {
        let vmcs = Recorder::default();
        inject_external(&vmcs, 0x2F, ActivityState::Hlt);
        assert_eq!(
            vmcs.value(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            Some(u64::from(EntryIntrInfo::external(0x2F).raw()))
        );
        assert_eq!(
            vmcs.value(guest::ACTIVITY_STATE),
            Some(u64::from(ActivityState::Active.raw()))
        );
        let active = Recorder::default();
        inject_external(&active, 0x2F, ActivityState::Active);
        assert_eq!(active.written().1, 1);
        assert_eq!(active.value(guest::ACTIVITY_STATE), None);
    }
}
