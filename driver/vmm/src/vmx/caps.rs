//! VMX capabilities: the raw capability MSRs, the control words ackvisor runs with (adjusted by
//! their allowed-0/allowed-1 halves, TRUE_* MSRs honoured), and the CR0/CR4 fixed bits.
//!
//! **Runs in:** anywhere (pure; the MSRs are read by `vmx::probe`).
#![forbid(unsafe_code)]

use crate::arch::msr::{AllowedBits, VmxBasic};
use crate::hypervisor::Features;
use core::fmt;
use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};

/// The capability MSRs as read from one CPU (0 for MSRs that do not exist there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawCaps {
    /// IA32_VMX_BASIC.
    pub basic: u64,
    /// IA32_VMX_PINBASED_CTLS.
    pub pin: u64,
    /// IA32_VMX_PROCBASED_CTLS.
    pub proc: u64,
    /// IA32_VMX_EXIT_CTLS.
    pub exit: u64,
    /// IA32_VMX_ENTRY_CTLS.
    pub entry: u64,
    /// IA32_VMX_TRUE_PINBASED_CTLS.
    pub true_pin: u64,
    /// IA32_VMX_TRUE_PROCBASED_CTLS.
    pub true_proc: u64,
    /// IA32_VMX_TRUE_EXIT_CTLS.
    pub true_exit: u64,
    /// IA32_VMX_TRUE_ENTRY_CTLS.
    pub true_entry: u64,
    /// IA32_VMX_PROCBASED_CTLS2 (0 without secondary controls).
    pub proc2: u64,
    /// IA32_VMX_CR0_FIXED0.
    pub cr0_fixed0: u64,
    /// IA32_VMX_CR0_FIXED1.
    pub cr0_fixed1: u64,
    /// IA32_VMX_CR4_FIXED0.
    pub cr4_fixed0: u64,
    /// IA32_VMX_CR4_FIXED1.
    pub cr4_fixed1: u64,
}

/// A control ackvisor cannot run without, and the MSR that refused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Missing {
    /// The control's name.
    pub control: &'static str,
    /// The capability MSR consulted.
    pub msr: &'static str,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} not allowed by {}", self.control, self.msr)
    }
}

/// The control words every VMCS starts from, before the mode's bits are added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    /// Capability MSR pairs actually used (TRUE_* when IA32_VMX_BASIC bit 55 is set).
    pub allowed_pin: AllowedBits,
    /// Primary processor-based allowed bits.
    pub allowed_proc: AllowedBits,
    /// Exit allowed bits.
    pub allowed_exit: AllowedBits,
    /// Pin-based controls without external-interrupt exiting.
    pub pin: u32,
    /// Primary processor-based controls, no window/CR8/MTF exiting.
    pub proc: u32,
    /// Secondary processor-based controls.
    pub proc2: u32,
    /// VM-exit controls without ack-on-exit.
    pub exit: u32,
    /// VM-entry controls.
    pub entry: u32,
}

/// What CPUID tells the OS that only works in a guest when a secondary control enables it
/// (DESIGN §5). Without the control the instruction #UDs in the guest and Windows bugchecks, so
/// an advertised feature whose control is not allowed is a refusal, never a silent drop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Advertised {
    /// CPUID.80000001H:EDX.RDTSCP.
    pub rdtscp: bool,
    /// CPUID.7.0:ECX.RDPID (enabled by the same control as RDTSCP).
    pub rdpid: bool,
    /// CPUID.7.0:EBX.INVPCID.
    pub invpcid: bool,
    /// CPUID.(0DH,1):EAX.XSAVES.
    pub xsaves: bool,
    /// CPUID.7.0:ECX.WAITPKG (TPAUSE, UMONITOR, UMWAIT).
    pub waitpkg: bool,
}

/// CPUID leaves and bits behind [`Advertised`] (SDM 2A, "CPUID—CPU Identification").
pub mod cpuid {
    /// Highest basic leaf (EAX).
    pub const LEAF_MAX_BASIC: u32 = 0;
    /// Highest extended leaf (EAX).
    pub const LEAF_MAX_EXTENDED: u32 = 0x8000_0000;
    /// Structured extended features.
    pub const LEAF_EXTENDED_FEATURES: u32 = 7;
    /// Processor extended state enumeration (subleaf 1).
    pub const LEAF_XSAVE: u32 = 0xD;
    /// Extended processor signature and feature bits.
    pub const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
    /// Leaf 7.0 EBX: INVPCID.
    pub const L7_EBX_INVPCID: u32 = 1 << 10;
    /// Leaf 7.0 ECX: WAITPKG.
    pub const L7_ECX_WAITPKG: u32 = 1 << 5;
    /// Leaf 7.0 ECX: RDPID.
    pub const L7_ECX_RDPID: u32 = 1 << 22;
    /// Leaf 0xD.1 EAX: XSAVES/XRSTORS.
    pub const LD1_EAX_XSAVES: u32 = 1 << 3;
    /// Leaf 0x8000_0001 EDX: RDTSCP.
    pub const LX1_EDX_RDTSCP: u32 = 1 << 27;
}

impl Advertised {
    /// From the CPUID registers that hold the bits (0 for a leaf beyond the maximum).
    pub const fn decode(l7_ebx: u32, l7_ecx: u32, ld1_eax: u32, lx1_edx: u32) -> Self {
        Self {
            rdtscp: lx1_edx & cpuid::LX1_EDX_RDTSCP != 0,
            rdpid: l7_ecx & cpuid::L7_ECX_RDPID != 0,
            invpcid: l7_ebx & cpuid::L7_EBX_INVPCID != 0,
            xsaves: ld1_eax & cpuid::LD1_EAX_XSAVES != 0,
            waitpkg: l7_ecx & cpuid::L7_ECX_WAITPKG != 0,
        }
    }
}

struct Pairs {
    pin: (AllowedBits, &'static str),
    proc: (AllowedBits, &'static str),
    exit: (AllowedBits, &'static str),
    entry: (AllowedBits, &'static str),
}

fn pairs(raw: &RawCaps) -> Pairs {
    if VmxBasic::from_raw(raw.basic).true_controls() {
        Pairs {
            pin: (AllowedBits(raw.true_pin), "IA32_VMX_TRUE_PINBASED_CTLS"),
            proc: (AllowedBits(raw.true_proc), "IA32_VMX_TRUE_PROCBASED_CTLS"),
            exit: (AllowedBits(raw.true_exit), "IA32_VMX_TRUE_EXIT_CTLS"),
            entry: (AllowedBits(raw.true_entry), "IA32_VMX_TRUE_ENTRY_CTLS"),
        }
    } else {
        Pairs {
            pin: (AllowedBits(raw.pin), "IA32_VMX_PINBASED_CTLS"),
            proc: (AllowedBits(raw.proc), "IA32_VMX_PROCBASED_CTLS"),
            exit: (AllowedBits(raw.exit), "IA32_VMX_EXIT_CTLS"),
            entry: (AllowedBits(raw.entry), "IA32_VMX_ENTRY_CTLS"),
        }
    }
}

fn require(
    pair: (AllowedBits, &'static str),
    bits: u32,
    control: &'static str,
) -> Result<(), Missing> {
    if pair.0.allows(bits) {
        Ok(())
    } else {
        Err(Missing {
            control,
            msr: pair.1,
        })
    }
}

/// The secondary controls an OS needs when CPUID advertises their instructions, named for the
/// refusal.
fn needed_secondary(adv: &Advertised) -> [(bool, u32, &'static str); 4] {
    [
        (
            adv.rdtscp || adv.rdpid,
            SecondaryControls::ENABLE_RDTSCP.bits(),
            "enable RDTSCP (CPUID advertises RDTSCP/RDPID)",
        ),
        (
            adv.invpcid,
            SecondaryControls::ENABLE_INVPCID.bits(),
            "enable INVPCID (CPUID advertises INVPCID)",
        ),
        (
            adv.xsaves,
            SecondaryControls::ENABLE_XSAVES_XRSTORS.bits(),
            "enable XSAVES/XRSTORS (CPUID advertises XSAVES)",
        ),
        (
            adv.waitpkg,
            SecondaryControls::ENABLE_USER_WAIT_PAUSE.bits(),
            "enable user wait and pause (CPUID advertises WAITPKG)",
        ),
    ]
}

/// The controls ackvisor needs, or the first one the CPU refuses. `adv` is what CPUID tells
/// the OS: each advertised instruction's secondary control must be allowed.
pub fn controls(raw: &RawCaps, adv: &Advertised) -> Result<Controls, Missing> {
    let p = pairs(raw);
    require(
        p.pin,
        PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits(),
        "external-interrupt exiting",
    )?;
    require(
        p.exit,
        ExitControls::ACK_INTERRUPT_ON_EXIT.bits(),
        "ack-on-exit",
    )?;
    require(
        p.exit,
        ExitControls::HOST_ADDRESS_SPACE_SIZE.bits(),
        "host address-space size",
    )?;
    require(
        p.entry,
        EntryControls::IA32E_MODE_GUEST.bits(),
        "IA-32e mode guest",
    )?;
    require(
        p.proc,
        PrimaryControls::INTERRUPT_WINDOW_EXITING.bits(),
        "interrupt-window exiting",
    )?;
    require(
        p.proc,
        PrimaryControls::CR8_LOAD_EXITING.bits(),
        "CR8-load exiting",
    )?;
    require(
        p.proc,
        PrimaryControls::USE_MSR_BITMAPS.bits(),
        "MSR bitmaps",
    )?;
    // intr::debug: every guest MOV DR exits, so root knows the guest's DR7 without a VMREAD.
    require(
        p.proc,
        PrimaryControls::MOV_DR_EXITING.bits(),
        "MOV-DR exiting",
    )?;

    let secondary = p.proc.0.allows(PrimaryControls::SECONDARY_CONTROLS.bits());
    for (needed, bits, control) in needed_secondary(adv) {
        if !needed {
            continue;
        }
        if !secondary {
            return Err(Missing {
                control,
                msr: p.proc.1,
            });
        }
        require(
            (AllowedBits(raw.proc2), "IA32_VMX_PROCBASED_CTLS2"),
            bits,
            control,
        )?;
    }

    let mut proc = (PrimaryControls::USE_MSR_BITMAPS | PrimaryControls::MOV_DR_EXITING).bits();
    let mut proc2 = 0;
    if secondary {
        let allowed2 = AllowedBits(raw.proc2);
        // DESIGN §5: without these, RDTSCP/RDPID, INVPCID, XSAVES and TPAUSE/UMWAIT #UD in the
        // guest and Windows crashes; enable each that the CPU offers (each one CPUID
        // advertises was required above).
        let wanted = SecondaryControls::ENABLE_RDTSCP
            | SecondaryControls::ENABLE_INVPCID
            | SecondaryControls::ENABLE_XSAVES_XRSTORS
            | SecondaryControls::ENABLE_USER_WAIT_PAUSE;
        proc2 = allowed2.adjust(wanted.bits()) & wanted.bits();
        if proc2 != 0 {
            proc |= PrimaryControls::SECONDARY_CONTROLS.bits();
        }
    }
    Ok(Controls {
        allowed_pin: p.pin.0,
        allowed_proc: p.proc.0,
        allowed_exit: p.exit.0,
        pin: p.pin.0.adjust(0),
        proc: p.proc.0.adjust(proc),
        proc2,
        // Exits clear DR7 and IA32_DEBUGCTL: save the guest's and load them back at entry, or
        // WinDbg's hardware breakpoints vanish at the first exit.
        exit: p.exit.0.adjust(
            (ExitControls::HOST_ADDRESS_SPACE_SIZE | ExitControls::SAVE_DEBUG_CONTROLS).bits(),
        ),
        entry: p
            .entry
            .0
            .adjust((EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_DEBUG_CONTROLS).bits()),
    })
}

/// What the machine offers, for `ackctl status`.
pub fn features(raw: &RawCaps, outer_hypervisor: bool) -> Features {
    let p = pairs(raw);
    let secondary = p.proc.0.allows(PrimaryControls::SECONDARY_CONTROLS.bits());
    let sec = AllowedBits(if secondary { raw.proc2 } else { 0 });
    Features {
        true_controls: VmxBasic::from_raw(raw.basic).true_controls(),
        external_interrupt_exiting: p
            .pin
            .0
            .allows(PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits()),
        ack_on_exit: p.exit.0.allows(ExitControls::ACK_INTERRUPT_ON_EXIT.bits()),
        preemption_timer: p
            .pin
            .0
            .allows(PinbasedControls::VMX_PREEMPTION_TIMER.bits()),
        monitor_trap_flag: p.proc.0.allows(PrimaryControls::MONITOR_TRAP_FLAG.bits()),
        secondary_controls: secondary,
        rdtscp: sec.allows(SecondaryControls::ENABLE_RDTSCP.bits()),
        invpcid: sec.allows(SecondaryControls::ENABLE_INVPCID.bits()),
        xsaves: sec.allows(SecondaryControls::ENABLE_XSAVES_XRSTORS.bits()),
        user_wait_pause: sec.allows(SecondaryControls::ENABLE_USER_WAIT_PAUSE.bits()),
        ept: sec.allows(SecondaryControls::ENABLE_EPT.bits()),
        vpid: sec.allows(SecondaryControls::ENABLE_VPID.bits()),
        outer_hypervisor,
    }
}

/// What exit-sti lacks on a CPU with neither a preemption timer nor the monitor trap flag: it
/// could not force the exit that ends a hand-over to the guest (DESIGN §2).
pub const EXIT_STI_MISSING: Missing = Missing {
    control: "VMX preemption timer or monitor trap flag (needed by exit-sti)",
    msr: "IA32_VMX_TRUE_PINBASED_CTLS / IA32_VMX_TRUE_PROCBASED_CTLS",
};

/// Whether this CPU can run `mode`.
pub const fn mode_supported(mode: crate::intr::Mode, f: &Features) -> Result<(), Missing> {
    match mode {
        crate::intr::Mode::ExitSti if !f.preemption_timer && !f.monitor_trap_flag => {
            Err(EXIT_STI_MISSING)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const NONE: Advertised = Advertised {
        rdtscp: false,
        rdpid: false,
        invpcid: false,
        xsaves: false,
        waitpkg: false,
    };
    const ALL: Advertised = Advertised {
        rdtscp: true,
        rdpid: true,
        invpcid: true,
        xsaves: true,
        waitpkg: true,
    };

    /// Bochs corei7_haswell_4770's values (read from Bochs 2.7 running that model).
    pub(crate) fn haswell() -> RawCaps {
        RawCaps {
            basic: 0x00d8_1000_0000_002b,
            pin: 0x7f_0000_0016,
            proc: 0xfff9_fffe_0401_e172,
            exit: 0x7f_ffff_0003_6dff,
            entry: 0xf3ff_0000_11ff,
            true_pin: 0x7f_0000_0016,
            true_proc: 0xfff9_fffe_0400_6172,
            true_exit: 0x7f_ffff_0003_6dfb,
            true_entry: 0xf3ff_0000_11fb,
            proc2: 0x4_7fff_0000_0000,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x17_27ff,
        }
    }

    #[test]
    fn haswell_controls_use_true_msrs_and_secondary_features() {
        let c = controls(&haswell(), &NONE).expect("haswell offers everything");
        // TRUE_PROCBASED clears CR3-load/store exiting from the default-1 set.
        assert_eq!(c.proc & PrimaryControls::CR3_LOAD_EXITING.bits(), 0);
        assert_ne!(c.proc & PrimaryControls::USE_MSR_BITMAPS.bits(), 0);
        assert_ne!(c.proc2 & SecondaryControls::ENABLE_RDTSCP.bits(), 0);
        assert_ne!(c.proc2 & SecondaryControls::ENABLE_INVPCID.bits(), 0);
        assert_ne!(c.exit & ExitControls::HOST_ADDRESS_SPACE_SIZE.bits(), 0);
        assert_eq!(c.exit & ExitControls::ACK_INTERRUPT_ON_EXIT.bits(), 0);
        assert_ne!(c.entry & EntryControls::IA32E_MODE_GUEST.bits(), 0);
        assert_eq!(
            c.pin & PinbasedControls::EXTERNAL_INTERRUPT_EXITING.bits(),
            0
        );
    }

    #[test]
    fn without_true_controls_default_one_bits_stay_set() {
        let mut raw = haswell();
        raw.basic &= !(1 << 55);
        let c = controls(&raw, &NONE).expect("still supported");
        assert_ne!(c.proc & PrimaryControls::CR3_LOAD_EXITING.bits(), 0);
    }

    #[test]
    fn missing_ack_on_exit_names_the_msr() {
        let mut raw = haswell();
        raw.true_exit &= !(u64::from(ExitControls::ACK_INTERRUPT_ON_EXIT.bits()) << 32);
        let err = controls(&raw, &NONE).expect_err("ack removed");
        extern crate std;
        use std::string::ToString;
        assert_eq!(
            err.to_string(),
            "ack-on-exit not allowed by IA32_VMX_TRUE_EXIT_CTLS"
        );
    }

    #[test]
    fn missing_external_interrupt_exiting_is_reported_first() {
        let mut raw = haswell();
        raw.true_pin = 0x16;
        let err = controls(&raw, &NONE).expect_err("pin removed");
        assert_eq!(err.control, "external-interrupt exiting");
        assert_eq!(err.msr, "IA32_VMX_TRUE_PINBASED_CTLS");
    }

    #[test]
    fn no_secondary_controls_means_no_secondary_bit() {
        let mut raw = haswell();
        raw.true_proc &= !(1u64 << 63);
        let c = controls(&raw, &NONE).expect("supported");
        assert_eq!(c.proc & PrimaryControls::SECONDARY_CONTROLS.bits(), 0);
        assert_eq!(c.proc2, 0);
        assert!(!features(&raw, false).rdtscp);
    }

    #[test]
    fn advertised_features_decode_from_their_cpuid_bits() {
        let a = Advertised::decode(1 << 10, (1 << 22) | (1 << 5), 1 << 3, 1 << 27);
        assert_eq!(a, ALL);
        assert_eq!(Advertised::decode(0, 0, 0, 0), NONE);
    }

    #[test]
    fn advertised_instruction_without_its_control_is_refused_by_name() {
        // Haswell's PROCBASED_CTLS2 allows RDTSCP and INVPCID but not XSAVES or user wait.
        let raw = haswell();
        let xsaves = Advertised {
            xsaves: true,
            ..NONE
        };
        let err = controls(&raw, &xsaves).expect_err("XSAVES not allowed");
        assert_eq!(
            err.control,
            "enable XSAVES/XRSTORS (CPUID advertises XSAVES)"
        );
        assert_eq!(err.msr, "IA32_VMX_PROCBASED_CTLS2");
        let wait = Advertised {
            waitpkg: true,
            ..NONE
        };
        let err = controls(&raw, &wait).expect_err("user wait not allowed");
        assert_eq!(
            err.control,
            "enable user wait and pause (CPUID advertises WAITPKG)"
        );
        let ok = Advertised {
            rdtscp: true,
            rdpid: true,
            invpcid: true,
            ..NONE
        };
        assert!(controls(&raw, &ok).is_ok());
    }

    #[test]
    fn advertised_instruction_without_secondary_controls_is_refused() {
        let mut raw = haswell();
        raw.true_proc &= !(1u64 << 63);
        let rdpid = Advertised {
            rdpid: true,
            ..NONE
        };
        let err = controls(&raw, &rdpid).expect_err("no secondary controls");
        assert_eq!(err.control, "enable RDTSCP (CPUID advertises RDTSCP/RDPID)");
        assert_eq!(err.msr, "IA32_VMX_TRUE_PROCBASED_CTLS");
        let invpcid = Advertised {
            invpcid: true,
            ..NONE
        };
        let err = controls(&raw, &invpcid).expect_err("no secondary controls");
        assert_eq!(err.control, "enable INVPCID (CPUID advertises INVPCID)");
    }

    #[test]
    fn mov_dr_exiting_is_required_and_set() {
        let c = controls(&haswell(), &NONE).expect("haswell offers it");
        assert_ne!(c.proc & PrimaryControls::MOV_DR_EXITING.bits(), 0);
        let mut raw = haswell();
        raw.true_proc &= !(u64::from(PrimaryControls::MOV_DR_EXITING.bits()) << 32);
        assert_eq!(
            controls(&raw, &NONE).expect_err("removed").control,
            "MOV-DR exiting"
        );
    }

    #[test]
    fn exit_sti_needs_a_way_to_force_the_next_exit() {
        use crate::intr::Mode;
        let none = Features::default();
        assert_eq!(mode_supported(Mode::ExitSti, &none), Err(EXIT_STI_MISSING));
        assert_eq!(mode_supported(Mode::AckReplay, &none), Ok(()));
        let timer = Features {
            preemption_timer: true,
            ..Features::default()
        };
        let mtf = Features {
            monitor_trap_flag: true,
            ..Features::default()
        };
        assert_eq!(mode_supported(Mode::ExitSti, &timer), Ok(()));
        assert_eq!(mode_supported(Mode::ExitSti, &mtf), Ok(()));
    }

    #[test]
    fn features_decode_haswell() {
        let f = features(&haswell(), false);
        assert!(f.ack_on_exit && f.external_interrupt_exiting && f.preemption_timer);
        assert!(f.true_controls && f.secondary_controls && f.ept && f.vpid);
        assert!(!f.outer_hypervisor);
    }
}
