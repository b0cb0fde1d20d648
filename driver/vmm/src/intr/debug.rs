//! Debug registers that follow the guest (issue 8, item 3): the decisions, kept pure.
//!
//! A VM exit leaves DR7 = 0x400 and IA32_DEBUGCTL = 0 in the CPU (SDM 3C, "Loading Host
//! Control Registers, Debug Registers, MSRs"). Root mode runs the guest's own interrupt handlers
//! (replay, exit-sti window), so without help a WinDbg `ba` never fires there, and a DR7 that NT
//! writes there (the debugger's thaw after a break-in) is lost at the next VM entry, which loads
//! GUEST_DR7. So, around every root call:
//! - before: load the guest's DR7 when it arms a breakpoint, its DEBUGCTL when non-zero
//!   ([`plan`]); the common case (no breakpoint, DEBUGCTL 0) loads nothing;
//! - after: read DR7 back (one MOV, no VMREAD) and, when the call changed it, write the new
//!   value to GUEST_DR7 ([`changed`]).
//!
//! Root knows the guest's DR7 and DEBUGCTL without a VMREAD per exit: MOV-DR exiting sends
//! every guest MOV DR here ([`mov_dr`]), and the MSR bitmap intercepts WRMSR of IA32_DEBUGCTL
//! ([`debugctl_write`]), so `RootState::guest_dr7`/`guest_debugctl` are exact.
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use crate::arch::debug::{DEBUGCTL_ACCEPTED, DR7_AFTER_EXIT, DR7_FIXED0, DR7_FIXED1, DR7_LE, Dr7};

/// What the CPU holds during one root call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// DR7 during the call. Not armed: the exit's 0x400, nothing loaded. Armed: the guest's,
    /// without GD (a MOV DR in root must not fault), and never 0x400 itself (LE is added, which
    /// arms nothing): so "DR7 ≠ 0x400 after the call" alone tells root to look closer.
    pub dr7: u64,
    /// IA32_DEBUGCTL during the call, when root touches that MSR at all: the guest's value when
    /// it is non-zero or a breakpoint is armed (a debugger is active and may change it).
    pub debugctl: Option<u64>,
}

impl Plan {
    /// Whether the call runs with the guest's DR7 loaded.
    pub const fn loads_dr7(&self) -> bool {
        self.dr7 != DR7_AFTER_EXIT
    }
}

/// Whether a root call loads anything at all: a breakpoint is armed, or DEBUGCTL is non-zero on
/// a CPU that has the MSR. False is the common case, and then [`plan`] is not even computed.
pub fn armed(guest_dr7: u64, guest_debugctl: u64, debugctl_msr: bool) -> bool {
    Dr7::from_raw(guest_dr7).enables() != 0 || (debugctl_msr && guest_debugctl != 0)
}

/// What to load before a root call. `debugctl_msr` is false on a CPU without the MSR (Bochs
/// #GPs on it, DESIGN §7): root then never touches it.
#[inline(always)]
pub fn plan(guest_dr7: u64, guest_debugctl: u64, debugctl_msr: bool) -> Plan {
    if !armed(guest_dr7, guest_debugctl, debugctl_msr) {
        return Plan {
            dr7: DR7_AFTER_EXIT,
            debugctl: None,
        };
    }
    let mut dr7 = Dr7::from_raw(guest_dr7);
    dr7.set_general_detect(false);
    let dr7 = match dr7.raw() {
        DR7_AFTER_EXIT => DR7_AFTER_EXIT | DR7_LE,
        v => v,
    };
    Plan {
        dr7,
        debugctl: if debugctl_msr {
            Some(guest_debugctl)
        } else {
            None
        },
    }
}

/// The value to write back to the VMCS when the call left `after` where it found `during`.
#[inline(always)]
pub const fn changed(during: u64, after: u64) -> Option<u64> {
    if during == after { None } else { Some(after) }
}

/// How root carries out one guest MOV DR (SDM 3B, "MOV—Move to/from Debug Registers";
/// KVM's handle_dr does the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MovDr {
    /// DR7.GD was set: inject #DB with DR6.BD, clear GD; the instruction does not run.
    GeneralDetect,
    /// #UD (DR4/DR5 with CR4.DE set).
    Undefined,
    /// #GP (bits 63:32 set in a value for DR6/DR7).
    GeneralProtection,
    /// Read DR7: the guest's value from the VMCS (root's DR7 is the exit's).
    ReadDr7,
    /// Write DR7: this value into GUEST_DR7 (reserved bits fixed as the CPU fixes them).
    WriteDr7(u64),
    /// Read the shared register `n` (0–3, 6): root and guest have the same one.
    Read(u8),
    /// Write the shared register `n` (0–3, 6).
    Write(u8, u64),
}

/// DR6 bits 63:32 must be 0 on a write.
const UPPER_HALF: u64 = 0xFFFF_FFFF_0000_0000;

/// Decides one MOV DR: `dr` and `to_dr` from the exit qualification, `value` the source
/// register for a write, `cr4_de` the guest's CR4.DE, `guest_dr7` its DR7.
pub fn mov_dr(dr: u8, to_dr: bool, value: u64, cr4_de: bool, guest_dr7: u64) -> MovDr {
    if Dr7::from_raw(guest_dr7).general_detect() {
        return MovDr::GeneralDetect;
    }
    let dr = match dr {
        4 | 5 if cr4_de => return MovDr::Undefined,
        4 => 6,
        5 => 7,
        n => n,
    };
    match (dr, to_dr) {
        (7, false) => MovDr::ReadDr7,
        (7, true) if value & UPPER_HALF != 0 => MovDr::GeneralProtection,
        (7, true) => MovDr::WriteDr7((value | DR7_FIXED1) & !DR7_FIXED0),
        (6, true) if value & UPPER_HALF != 0 => MovDr::GeneralProtection,
        (n, false) => MovDr::Read(n),
        (n, true) => MovDr::Write(n, value),
    }
}

/// A guest WRMSR to IA32_DEBUGCTL: the value for GUEST_IA32_DEBUGCTL, or `None` for #GP.
pub const fn debugctl_write(value: u64) -> Option<u64> {
    if value & !DEBUGCTL_ACCEPTED == 0 {
        Some(value)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BP0: u64 = DR7_AFTER_EXIT | 1; // L0
    const DR6_BD_IS_DR7_GD: u64 = 1 << 13;

    #[test]
    fn plan_loads_nothing_without_breakpoints_or_debugctl() {
        let p = plan(DR7_AFTER_EXIT, 0, true);
        assert_eq!(
            p,
            Plan {
                dr7: DR7_AFTER_EXIT,
                debugctl: None
            }
        );
        assert!(!p.loads_dr7());
        // Length/type fields without an enable bit arm nothing.
        assert!(!plan(0x000F_0400, 0, true).loads_dr7());
    }

    #[test]
    fn plan_loads_an_armed_dr7_and_reads_debugctl_back() {
        let p = plan(BP0, 0, true);
        assert_eq!(
            p,
            Plan {
                dr7: BP0,
                debugctl: Some(0)
            }
        );
        // A global enable (G3) arms too.
        assert!(plan(DR7_AFTER_EXIT | 0x80, 0, true).loads_dr7());
    }

    #[test]
    fn plan_loads_debugctl_alone_and_never_without_the_msr() {
        let p = plan(DR7_AFTER_EXIT, 0b10, true);
        assert_eq!(p.debugctl, Some(0b10));
        // DR7 arms nothing, but is not the exit's value either: the write-back is reached.
        assert_eq!(p.dr7, DR7_AFTER_EXIT | DR7_LE);
        assert_eq!(plan(BP0, 0b10, false).debugctl, None);
        assert_eq!(plan(BP0, 0b10, false).dr7, BP0);
        assert_eq!(
            plan(DR7_AFTER_EXIT, 0b10, false).dr7,
            DR7_AFTER_EXIT,
            "not armed"
        );
    }

    #[test]
    fn plan_never_loads_general_detect() {
        // GD would make root's own MOV from DR7 after the call fault.
        assert_eq!(plan(BP0 | DR6_BD_IS_DR7_GD, 0, true).dr7, BP0);
    }

    #[test]
    fn armed_agrees_with_the_plan() {
        for (dr7, dc, msr) in [
            (DR7_AFTER_EXIT, 0, true),
            (BP0, 0, true),
            (DR7_AFTER_EXIT, 2, true),
            (DR7_AFTER_EXIT, 2, false),
            (0x000F_0400, 0, true),
        ] {
            let p = plan(dr7, dc, msr);
            // Armed exactly when the plan puts something other than the exit's DR7 in the CPU.
            assert_eq!(armed(dr7, dc, msr), p.loads_dr7(), "{dr7:#x} {dc} {msr}");
        }
    }

    #[test]
    fn changed_reports_only_a_difference() {
        assert_eq!(changed(BP0, BP0), None);
        assert_eq!(changed(BP0, DR7_AFTER_EXIT), Some(DR7_AFTER_EXIT));
        assert_eq!(changed(DR7_AFTER_EXIT, BP0), Some(BP0));
    }

    #[test]
    fn mov_dr_reads_and_writes() {
        assert_eq!(mov_dr(7, false, 0, false, BP0), MovDr::ReadDr7);
        assert_eq!(mov_dr(7, true, 1, false, 0x400), MovDr::WriteDr7(BP0));
        assert_eq!(
            mov_dr(7, true, 0xD401, false, 0x400),
            MovDr::WriteDr7(BP0),
            "reserved bits fixed like the CPU"
        );
        assert_eq!(
            mov_dr(0, true, 0xFFFF_8000_0000_1000, false, 0x400),
            MovDr::Write(0, 0xFFFF_8000_0000_1000)
        );
        assert_eq!(mov_dr(3, false, 0, false, 0x400), MovDr::Read(3));
        assert_eq!(
            mov_dr(6, true, 0xFFFF_0FF0, false, 0x400),
            MovDr::Write(6, 0xFFFF_0FF0)
        );
    }

    #[test]
    fn mov_dr_faults_like_the_cpu() {
        assert_eq!(
            mov_dr(7, true, 1 << 32, false, 0x400),
            MovDr::GeneralProtection
        );
        assert_eq!(
            mov_dr(6, true, 1 << 40, false, 0x400),
            MovDr::GeneralProtection
        );
        assert_eq!(mov_dr(4, false, 0, true, 0x400), MovDr::Undefined);
        assert_eq!(mov_dr(5, true, 0, true, 0x400), MovDr::Undefined);
        assert_eq!(mov_dr(0, false, 0, false, 0x2400), MovDr::GeneralDetect);
    }

    #[test]
    fn dr4_dr5_alias_dr6_dr7_without_cr4_de() {
        assert_eq!(mov_dr(4, false, 0, false, 0x400), MovDr::Read(6));
        assert_eq!(mov_dr(5, false, 0, false, 0x400), MovDr::ReadDr7);
        assert_eq!(mov_dr(5, true, 2, false, 0x400), MovDr::WriteDr7(0x402));
    }

    #[test]
    fn debugctl_writes_outside_the_accepted_bits_gp() {
        assert_eq!(debugctl_write(0b11), Some(0b11));
        assert_eq!(debugctl_write(0), Some(0));
        assert_eq!(debugctl_write(1 << 2), None, "reserved bit 2");
        assert_eq!(debugctl_write(1 << 16), None);
    }
}
