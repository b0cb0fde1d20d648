//! Layouts of the MSRs the core decodes (SDM 3C, "VMX Capability Reporting Facility";
//! SDM 3A, "IA32_FEATURE_CONTROL").
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use bitfield::bitfield;

/// IA32_FEATURE_CONTROL.
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
/// IA32_APIC_BASE.
pub const IA32_APIC_BASE: u32 = 0x1B;
/// IA32_DEBUGCTL.
pub const IA32_DEBUGCTL: u32 = 0x1D9;
/// Hyper-V/KVM synthetic MSRs start here (passed through only under an outer hypervisor).
pub const SYNTHETIC_MSR_FIRST: u32 = 0x4000_0000;
/// Last synthetic MSR.
pub const SYNTHETIC_MSR_LAST: u32 = 0x4000_FFFF;

/// Byte offset of the write bitmap for MSRs 0..0x1FFF in the MSR-bitmap page (SDM 3C,
/// "MSR-Bitmap Address": read-low, read-high, write-low, write-high, 1 KiB each).
const BITMAP_WRITE_LOW: usize = 2048;

/// The bitmap's low range covers MSRs 0..=0x1FFF.
const BITMAP_LOW_LAST: u32 = 0x1FFF;

/// Byte and bit of the MSR-bitmap page that makes WRMSR of `msr` (0..=0x1FFF) exit.
pub const fn bitmap_write_bit(msr: u32) -> (usize, u8) {
    let low = (msr & BITMAP_LOW_LAST) as usize;
    (BITMAP_WRITE_LOW + low / 8, (low % 8) as u8)
}

bitfield! {
    /// IA32_FEATURE_CONTROL (0x3A).
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct FeatureControl(u64); impl Debug;
    /// Lock: writes #GP until reset.
    pub locked, _: 0;
    /// VMXON allowed inside SMX operation.
    pub vmx_inside_smx, _: 1;
    /// VMXON allowed outside SMX operation.
    pub vmx_outside_smx, _: 2;
}

impl FeatureControl {
    /// From the raw MSR value.
    pub const fn from_raw(v: u64) -> Self {
        Self(v)
    }
}

bitfield! {
    /// IA32_VMX_BASIC (0x480).
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct VmxBasic(u64); impl Debug;
    /// VMCS revision identifier.
    pub u32, revision_id, _: 30, 0;
    /// Bytes to allocate for the VMXON region and VMCS.
    pub u16, region_size, _: 44, 32;
    /// The TRUE_* control MSRs exist and override the default-1 classes.
    pub true_controls, _: 55;
}

impl VmxBasic {
    /// From the raw MSR value.
    pub const fn from_raw(v: u64) -> Self {
        Self(v)
    }
}

bitfield! {
    /// IA32_APIC_BASE (0x1B).
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct ApicBase(u64); impl Debug;
    /// Bootstrap processor.
    pub bsp, _: 8;
    /// x2APIC mode enabled.
    pub x2apic, _: 10;
    /// xAPIC global enable.
    pub enabled, _: 11;
    /// Physical page number of the xAPIC register page.
    pub u64, base_page, _: 51, 12;
}

impl ApicBase {
    /// From the raw MSR value.
    pub const fn from_raw(v: u64) -> Self {
        Self(v)
    }
}

/// A VMX control capability MSR: bits 31:0 are the allowed-0 settings (1 = must be 1),
/// bits 63:32 the allowed-1 settings (0 = must be 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AllowedBits(pub u64);

impl AllowedBits {
    /// Bits that must be 1.
    pub const fn must_be_one(self) -> u32 {
        self.0 as u32
    }

    /// Bits that may be 1.
    pub const fn may_be_one(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// `wanted` forced into what the CPU allows.
    pub const fn adjust(self, wanted: u32) -> u32 {
        (wanted | self.must_be_one()) & self.may_be_one()
    }

    /// Whether every bit of `bits` may be 1.
    pub const fn allows(self, bits: u32) -> bool {
        self.may_be_one() & bits == bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjust_forces_must_be_one_and_drops_disallowed() {
        // Bochs haswell TRUE_PROCBASED: 0xfff9fffe_04006172 (allowed-1 lacks bit 0).
        let a = AllowedBits(0xFFF9_FFFE_0400_6172);
        assert_eq!(a.adjust(0), 0x0400_6172);
        assert_eq!(a.adjust(1) & 1, 0);
        assert!(a.allows(1 << 31));
        assert!(!a.allows(1 << 17));
    }

    #[test]
    fn apic_base_fields() {
        let a = ApicBase::from_raw(0xFEE0_0D00);
        assert!(a.bsp() && a.x2apic() && a.enabled());
        assert_eq!(a.base_page() << 12, 0xFEE0_0000);
    }

    #[test]
    fn debugctl_write_intercept_bit() {
        assert_eq!(bitmap_write_bit(IA32_DEBUGCTL), (2048 + 59, 1));
    }

    #[test]
    fn vmx_basic_fields() {
        let b = VmxBasic::from_raw(0x00d8_1000_0000_002b);
        assert_eq!(b.revision_id(), 0x2b);
        assert_eq!(b.region_size(), 0x1000);
        assert!(b.true_controls());
    }
}
