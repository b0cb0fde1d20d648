//! The CR0/CR4 fixed bits of VMX operation (SDM 3D, "VMX-Fixed Bits in CR0" and "in CR4"):
//! what may be added to the running OS's control registers, and the refusal when the OS runs
//! with a bit VMX operation forbids (issue 8: never change the machine silently).
//!
//! **Runs in:** anywhere (pure; the MSRs are read by `vmx::probe`).
#![forbid(unsafe_code)]

use super::caps::{Missing, RawCaps};

/// CR0 for VMX operation: FIXED0 bits added. A bit the OS has set that FIXED1 forbids is a
/// refusal naming it: clearing it would change the machine under the OS.
pub const fn fixed_cr0(raw: &RawCaps, cr0: u64) -> Result<u64, Missing> {
    match lowest_bit(cr0 & !raw.cr0_fixed1) {
        Some(bit) => Err(Missing {
            control: cr0_bit_name(bit),
            msr: "IA32_VMX_CR0_FIXED1",
        }),
        None => Ok(cr0 | raw.cr0_fixed0),
    }
}

/// CR4 for VMX operation (this adds CR4.VMXE). A bit the OS has set that FIXED1 forbids (CET,
/// PKS, UINTR, LAM under a lagging nested hypervisor) is a refusal naming it.
pub const fn fixed_cr4(raw: &RawCaps, cr4: u64) -> Result<u64, Missing> {
    match lowest_bit(cr4 & !raw.cr4_fixed1) {
        Some(bit) => Err(Missing {
            control: cr4_bit_name(bit),
            msr: "IA32_VMX_CR4_FIXED1",
        }),
        None => Ok(cr4 | raw.cr4_fixed0),
    }
}

const fn lowest_bit(v: u64) -> Option<u32> {
    if v == 0 {
        None
    } else {
        Some(v.trailing_zeros())
    }
}

/// CR0 bits the OS can have set (SDM 3A, "Control Registers").
const fn cr0_bit_name(bit: u32) -> &'static str {
    match bit {
        0 => "CR0.PE (bit 0), set by the OS,",
        1 => "CR0.MP (bit 1), set by the OS,",
        2 => "CR0.EM (bit 2), set by the OS,",
        3 => "CR0.TS (bit 3), set by the OS,",
        4 => "CR0.ET (bit 4), set by the OS,",
        5 => "CR0.NE (bit 5), set by the OS,",
        16 => "CR0.WP (bit 16), set by the OS,",
        18 => "CR0.AM (bit 18), set by the OS,",
        29 => "CR0.NW (bit 29), set by the OS,",
        30 => "CR0.CD (bit 30), set by the OS,",
        31 => "CR0.PG (bit 31), set by the OS,",
        _ => "a CR0 bit unknown to ackvisor, set by the OS,",
    }
}

/// CR4 bits the OS can have set (SDM 3A, "Control Registers").
const fn cr4_bit_name(bit: u32) -> &'static str {
    match bit {
        0 => "CR4.VME (bit 0), set by the OS,",
        1 => "CR4.PVI (bit 1), set by the OS,",
        2 => "CR4.TSD (bit 2), set by the OS,",
        3 => "CR4.DE (bit 3), set by the OS,",
        4 => "CR4.PSE (bit 4), set by the OS,",
        5 => "CR4.PAE (bit 5), set by the OS,",
        6 => "CR4.MCE (bit 6), set by the OS,",
        7 => "CR4.PGE (bit 7), set by the OS,",
        8 => "CR4.PCE (bit 8), set by the OS,",
        9 => "CR4.OSFXSR (bit 9), set by the OS,",
        10 => "CR4.OSXMMEXCPT (bit 10), set by the OS,",
        11 => "CR4.UMIP (bit 11), set by the OS,",
        12 => "CR4.LA57 (bit 12), set by the OS,",
        14 => "CR4.SMXE (bit 14), set by the OS,",
        16 => "CR4.FSGSBASE (bit 16), set by the OS,",
        17 => "CR4.PCIDE (bit 17), set by the OS,",
        18 => "CR4.OSXSAVE (bit 18), set by the OS,",
        19 => "CR4.KL (bit 19), set by the OS,",
        20 => "CR4.SMEP (bit 20), set by the OS,",
        21 => "CR4.SMAP (bit 21), set by the OS,",
        22 => "CR4.PKE (bit 22), set by the OS,",
        23 => "CR4.CET (bit 23), set by the OS,",
        24 => "CR4.PKS (bit 24), set by the OS,",
        25 => "CR4.UINTR (bit 25), set by the OS,",
        28 => "CR4.LAM_SUP (bit 28), set by the OS,",
        32 => "CR4.FRED (bit 32), set by the OS,",
        _ => "a CR4 bit unknown to ackvisor, set by the OS,",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::caps::tests::haswell;

    #[test]
    fn fixed_bits_set_vmxe_and_keep_pe_pg_ne() {
        let raw = haswell();
        assert_ne!(fixed_cr4(&raw, 0x620).expect("allowed") & (1 << 13), 0);
        let cr0 = fixed_cr0(&raw, 0x8000_0011).expect("allowed");
        assert_eq!(cr0 & 0x8000_0021, 0x8000_0021, "NE added from FIXED0");
        assert_eq!(cr0, 0x8000_0031, "nothing else changed");
    }

    #[test]
    fn a_cr4_bit_fixed1_forbids_is_refused_by_name() {
        // A lagging nested hypervisor: the OS runs with CET, FIXED1 does not allow it.
        let raw = haswell();
        const CET: u64 = 1 << 23;
        assert_eq!(raw.cr4_fixed1 & CET, 0);
        let err = fixed_cr4(&raw, 0x620 | CET).expect_err("CET forbidden");
        extern crate std;
        use std::string::ToString;
        assert_eq!(
            err.to_string(),
            "CR4.CET (bit 23), set by the OS, not allowed by IA32_VMX_CR4_FIXED1"
        );
        let lam = fixed_cr4(&raw, 0x620 | (1 << 28)).expect_err("LAM forbidden");
        assert_eq!(lam.control, "CR4.LAM_SUP (bit 28), set by the OS,");
    }

    #[test]
    fn a_cr0_bit_fixed1_forbids_is_refused() {
        let mut raw = haswell();
        raw.cr0_fixed1 &= !(1 << 16); // a hypervisor that cannot run with CR0.WP
        let err = fixed_cr0(&raw, 0x8001_0031).expect_err("WP forbidden");
        assert_eq!(err.control, "CR0.WP (bit 16), set by the OS,");
        assert_eq!(err.msr, "IA32_VMX_CR0_FIXED1");
    }
}
