//! The VMCS as the delivery code sees it: read a field, write a field. [`super::Vmcs`] is the
//! real one (VMREAD/VMWRITE on the current VMCS); unit tests implement it with a recorder, so
//! what root writes into the VMCS after a delivery can be observed on the host.
//!
//! **Runs in:** wherever its implementation does (VMX root for [`super::Vmcs`]).
#![forbid(unsafe_code)]

/// Field-level access to a VMCS.
pub trait VmcsAccess {
    /// Reads `field` (a field the CPU lacks reads as 0).
    fn read(&self, field: u32) -> u64;
    /// Writes `field`; a failure surfaces at the next VM entry.
    fn set(&self, field: u32, value: u64);
}

impl VmcsAccess for super::Vmcs {
    #[inline(always)]
    fn read(&self, field: u32) -> u64 {
        super::Vmcs::read(self, field)
    }

    #[inline(always)]
    fn set(&self, field: u32, value: u64) {
        super::Vmcs::set(self, field, value)
    }
}
