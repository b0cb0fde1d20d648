//! Local APIC reads root mode needs (exit-sti: the highest requested vector).
//!
//! **Runs in:** VMX root.

use crate::platform::ApicAccess;

/// xAPIC IRR0 offset; IRRn at +0x10·n (SDM 3A, "Local APIC Register Address Map").
const XAPIC_IRR0: usize = 0x200;
/// x2APIC IRR0 MSR; IRRn at +n.
const X2APIC_IRR0: u32 = 0x820;

/// The highest vector set in this CPU's IRR.
pub fn highest_irr(apic: ApicAccess) -> Option<u8> {
    for i in (0..8u8).rev() {
        let word = match apic {
            ApicAccess::XApic { base_va } => {
                let p = (base_va + XAPIC_IRR0 + usize::from(i) * 0x10) as *const u32;
                // SAFETY: the platform maps this CPU's xAPIC page at `base_va` for the life of the
                // hypervisor; IRR registers are readable 32-bit MMIO with no side effects.
                unsafe { core::ptr::read_volatile(p) }
            }
            ApicAccess::X2Apic => {
                // SAFETY: in x2APIC mode the IRR MSRs exist and reading them has no side effects.
                let v = unsafe { super::regs::rdmsr(X2APIC_IRR0 + u32::from(i)) };
                v as u32
            }
        };
        if word != 0 {
            return Some(i * 32 + (31 - word.leading_zeros() as u8));
        }
    }
    None
}
