//! Local APIC reads: the highest requested vector (exit-sti, in root) and the LVT timer
//! register (platform delivery defaults, at PASSIVE).
//!
//! **Runs in:** VMX root ([`highest_irr`]), PASSIVE ([`lvt_timer`]).

use crate::platform::ApicAccess;

/// xAPIC IRR0 offset; IRRn at +0x10·n (SDM 3A, "Local APIC Register Address Map").
const XAPIC_IRR0: usize = 0x200;
/// x2APIC IRR0 MSR; IRRn at +n.
const X2APIC_IRR0: u32 = 0x820;

/// xAPIC LVT timer register offset (SDM 3A, "Local APIC Register Address Map").
const XAPIC_LVT_TIMER: usize = 0x320;
/// x2APIC LVT timer MSR.
const X2APIC_LVT_TIMER: u32 = 0x832;

/// This CPU's LVT timer register (vector in bits 7:0, mask in bit 16): what the OS drives from
/// the LAPIC timer, if anything.
pub fn lvt_timer(apic: ApicAccess) -> u32 {
    match apic {
        ApicAccess::XApic { base_va } => {
            let p = (base_va + XAPIC_LVT_TIMER) as *const u32;
            // SAFETY: the platform maps this CPU's xAPIC page at `base_va` for the life of the
            // hypervisor; the LVT timer register is readable 32-bit MMIO with no side effects.
            unsafe { core::ptr::read_volatile(p) }
        }
        ApicAccess::X2Apic => {
            // SAFETY: in x2APIC mode the LVT timer MSR exists and reading it has no side effects.
            let v = unsafe { super::regs::rdmsr(X2APIC_LVT_TIMER) };
            v as u32
        }
    }
}

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

/// xAPIC spurious-interrupt vector register offset (SVR; bits 7:0 are the vector).
const XAPIC_SVR: usize = 0xF0;
/// x2APIC SVR MSR.
const X2APIC_SVR: u32 = 0x80F;

/// The vector this CPU's LAPIC hands out for a spurious interrupt (SVR bits 7:0).
pub fn spurious_vector(apic: ApicAccess) -> u8 {
    let svr = match apic {
        ApicAccess::XApic { base_va } => {
            let p = (base_va + XAPIC_SVR) as *const u32;
            // SAFETY: as in `highest_irr`: this CPU's mapped xAPIC page; SVR is a readable 32-bit
            // register without read side effects.
            unsafe { core::ptr::read_volatile(p) }
        }
        ApicAccess::X2Apic => {
            // SAFETY: in x2APIC mode the SVR MSR exists and reading it has no side effects.
            let v = unsafe { super::regs::rdmsr(X2APIC_SVR) };
            v as u32
        }
    };
    svr as u8
}
