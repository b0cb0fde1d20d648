//! Debug-register layouts (SDM 3B, "Debug Registers") and what a VM exit leaves in them.
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use bitfield::bitfield;

/// DR7 after every VM exit (SDM 3C, "Loading Host Control Registers, Debug Registers, MSRs"):
/// no breakpoint enabled, only the always-one bit 10.
pub const DR7_AFTER_EXIT: u64 = 0x400;
/// DR7.LE (local exact): ignored by every CPU since the P6, arms nothing.
pub const DR7_LE: u64 = 1 << 8;
/// DR7 bit 10 reads as 1.
pub const DR7_FIXED1: u64 = 1 << 10;
/// DR7 bits 12, 14 and 15 read as 0.
pub const DR7_FIXED0: u64 = (1 << 12) | (1 << 14) | (1 << 15);
/// DR6.BD: the #DB was raised by DR7.GD (general detect).
pub const DR6_BD: u64 = 1 << 13;

bitfield! {
    /// DR7 (SDM 3B, "Debug Control Register (DR7)").
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct Dr7(u64); impl Debug;
    /// L0, G0, L1, G1, … L3, G3: a breakpoint is armed when any is set.
    pub u8, enables, _: 7, 0;
    /// GD: the next MOV DR raises #DB.
    pub general_detect, set_general_detect: 13;
    /// Bits 63:32 (MOV to DR7 #GPs unless 0).
    pub u32, upper, _: 63, 32;
}

impl Dr7 {
    /// From a raw value.
    pub const fn from_raw(v: u64) -> Self {
        Self(v)
    }
    /// The raw value.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

/// IA32_DEBUGCTL bits ackvisor lets a guest WRMSR set (SDM 3B, "IA32_DEBUGCTL MSR"): LBR,
/// BTF, TR, BTS, BTINT, BTS_OFF_OS, BTS_OFF_USR, FREEZE_LBRS_ON_PMI, FREEZE_PERFMON_ON_PMI.
/// A bit outside the set #GPs in the guest, as on a CPU without it: written into the VMCS, an
/// unsupported bit would fail the next VM entry instead.
pub const DEBUGCTL_ACCEPTED: u64 = 0b1_1111_1100_0011;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr7_fields() {
        let d = Dr7::from_raw(0x2401);
        assert_eq!(d.enables(), 1);
        assert!(d.general_detect());
        assert_eq!(Dr7::from_raw(1 << 40).upper(), 1 << 8);
        assert_eq!(Dr7::from_raw(DR7_AFTER_EXIT).enables(), 0);
    }
}
