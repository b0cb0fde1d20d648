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

/// The controls ackvisor needs, or the first one the CPU refuses.
pub fn controls(raw: &RawCaps) -> Result<Controls, Missing> {
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

    let mut proc = PrimaryControls::USE_MSR_BITMAPS.bits();
    let mut proc2 = 0;
    if p.proc.0.allows(PrimaryControls::SECONDARY_CONTROLS.bits()) {
        let allowed2 = AllowedBits(raw.proc2);
        // DESIGN §5: without these, RDTSCP/RDPID, INVPCID, XSAVES and TPAUSE/UMWAIT #UD in the
        // guest and Windows crashes; enable each that the CPU offers.
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

/// CR0 with the VMX fixed bits applied (FIXED0 bits set, bits clear in FIXED1 cleared).
pub const fn fixed_cr0(raw: &RawCaps, cr0: u64) -> u64 {
    (cr0 | raw.cr0_fixed0) & raw.cr0_fixed1
}

/// CR4 with the VMX fixed bits applied; this sets CR4.VMXE.
pub const fn fixed_cr4(raw: &RawCaps, cr4: u64) -> u64 {
    (cr4 | raw.cr4_fixed0) & raw.cr4_fixed1
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

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
        let c = controls(&haswell()).expect("haswell offers everything");
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
        let c = controls(&raw).expect("still supported");
        assert_ne!(c.proc & PrimaryControls::CR3_LOAD_EXITING.bits(), 0);
    }

    #[test]
    fn missing_ack_on_exit_names_the_msr() {
        let mut raw = haswell();
        raw.true_exit &= !(u64::from(ExitControls::ACK_INTERRUPT_ON_EXIT.bits()) << 32);
        let err = controls(&raw).expect_err("ack removed");
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
        let err = controls(&raw).expect_err("pin removed");
        assert_eq!(err.control, "external-interrupt exiting");
        assert_eq!(err.msr, "IA32_VMX_TRUE_PINBASED_CTLS");
    }

    #[test]
    fn no_secondary_controls_means_no_secondary_bit() {
        let mut raw = haswell();
        raw.true_proc &= !(1u64 << 63);
        let c = controls(&raw).expect("supported");
        assert_eq!(c.proc & PrimaryControls::SECONDARY_CONTROLS.bits(), 0);
        assert_eq!(c.proc2, 0);
        assert!(!features(&raw, false).rdtscp);
    }

    #[test]
    fn fixed_bits_set_vmxe_and_keep_pe_pg_ne() {
        let raw = haswell();
        assert_ne!(fixed_cr4(&raw, 0x620) & (1 << 13), 0);
        assert_eq!(fixed_cr0(&raw, 0x8000_0011) & 0x8000_0021, 0x8000_0021);
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
