//! Layouts of VMCS fields the core decodes (SDM 3C, Intel SDM edition named in `vmx/mod.rs`).
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use bitfield::bitfield;

bitfield! {
    /// Exit reason field (SDM 3C, "Basic VM-Exit Information").
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct ExitReasonField(u32); impl Debug;
    /// Basic exit reason.
    pub u16, basic, _: 15, 0;
    /// VM entry failed (reasons 33, 34, 41).
    pub entry_failure, _: 31;
}

impl ExitReasonField {
    /// From the raw field.
    pub const fn from_raw(v: u32) -> Self {
        Self(v)
    }
    /// The raw field.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

bitfield! {
    /// Segment access rights as the VMCS holds them (SDM 3C, "Guest Register State").
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct AccessRights(u32); impl Debug;
    /// Descriptor privilege level (for SS: the current privilege level).
    pub u8, dpl, _: 6, 5;
}

impl AccessRights {
    /// From the raw field.
    pub const fn from_raw(v: u32) -> Self {
        Self(v)
    }
}

/// Basic exit reasons ackvisor handles (SDM 3C appendix "VMX Basic Exit Reasons").
pub mod reason {
    /// Exception or NMI.
    pub const EXCEPTION_OR_NMI: u16 = 0;
    /// External interrupt.
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    /// Triple fault.
    pub const TRIPLE_FAULT: u16 = 2;
    /// INIT signal.
    pub const INIT: u16 = 3;
    /// Start-up IPI.
    pub const SIPI: u16 = 4;
    /// Interrupt window.
    pub const INTERRUPT_WINDOW: u16 = 7;
    /// Task switch.
    pub const TASK_SWITCH: u16 = 9;
    /// CPUID.
    pub const CPUID: u16 = 10;
    /// GETSEC.
    pub const GETSEC: u16 = 11;
    /// HLT.
    pub const HLT: u16 = 12;
    /// INVD.
    pub const INVD: u16 = 13;
    /// VMCALL.
    pub const VMCALL: u16 = 18;
    /// VMCLEAR.
    pub const VMCLEAR: u16 = 19;
    /// VMLAUNCH.
    pub const VMLAUNCH: u16 = 20;
    /// VMPTRLD.
    pub const VMPTRLD: u16 = 21;
    /// VMPTRST.
    pub const VMPTRST: u16 = 22;
    /// VMREAD.
    pub const VMREAD: u16 = 23;
    /// VMRESUME.
    pub const VMRESUME: u16 = 24;
    /// VMWRITE.
    pub const VMWRITE: u16 = 25;
    /// VMXOFF.
    pub const VMXOFF: u16 = 26;
    /// VMXON.
    pub const VMXON: u16 = 27;
    /// Control-register access.
    pub const CR_ACCESS: u16 = 28;
    /// MOV DR (with MOV-DR exiting).
    pub const DR_ACCESS: u16 = 29;
    /// RDMSR.
    pub const RDMSR: u16 = 31;
    /// WRMSR.
    pub const WRMSR: u16 = 32;
    /// VM entry failure: invalid guest state.
    pub const ENTRY_FAIL_GUEST_STATE: u16 = 33;
    /// VM entry failure: MSR loading.
    pub const ENTRY_FAIL_MSR_LOADING: u16 = 34;
    /// Monitor trap flag.
    pub const MONITOR_TRAP_FLAG: u16 = 37;
    /// VM entry failure: machine check.
    pub const ENTRY_FAIL_MACHINE_CHECK: u16 = 41;
    /// INVEPT.
    pub const INVEPT: u16 = 50;
    /// VMX preemption timer expired.
    pub const PREEMPTION_TIMER: u16 = 52;
    /// INVVPID.
    pub const INVVPID: u16 = 53;
    /// XSETBV.
    pub const XSETBV: u16 = 55;
    /// VMFUNC.
    pub const VMFUNC: u16 = 59;
}

/// Interruption type values shared by exit and entry interruption info.
pub mod intr_type {
    /// External interrupt.
    pub const EXTERNAL: u8 = 0;
    /// NMI.
    pub const NMI: u8 = 2;
    /// Hardware exception.
    pub const HARDWARE_EXCEPTION: u8 = 3;
}

/// Exception vectors ackvisor injects.
pub mod exception {
    /// Debug (#DB).
    pub const DB: u8 = 1;
    /// Invalid opcode (#UD).
    pub const UD: u8 = 6;
    /// General protection (#GP), with an error code.
    pub const GP: u8 = 13;
}

bitfield! {
    /// VM-exit interruption information (SDM 3C, "Information for VM Exits Due to Vectored
    /// Events").
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct ExitIntrInfo(u32); impl Debug;
    /// Vector.
    pub u8, vector, _: 7, 0;
    /// Interruption type (see [`intr_type`]).
    pub u8, kind, _: 10, 8;
    /// An error code was delivered.
    pub error_code_valid, _: 11;
    /// Valid.
    pub valid, _: 31;
}

impl ExitIntrInfo {
    /// From the raw field.
    pub const fn from_raw(v: u32) -> Self {
        Self(v)
    }
    /// The raw field.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

bitfield! {
    /// VM-entry interruption-information field (SDM 3C, "VM-Entry Controls for Event
    /// Injection").
    #[derive(Clone, Copy, PartialEq, Eq, Default)]
    pub struct EntryIntrInfo(u32); impl Debug;
    /// Vector.
    pub u8, vector, set_vector: 7, 0;
    /// Interruption type (see [`intr_type`]).
    pub u8, kind, set_kind: 10, 8;
    /// Deliver an error code.
    pub deliver_error_code, set_deliver_error_code: 11;
    /// Valid.
    pub valid, set_valid: 31;
}

impl EntryIntrInfo {
    /// A valid external interrupt.
    pub fn external(vector: u8) -> Self {
        let mut i = Self(0);
        i.set_vector(vector);
        i.set_kind(intr_type::EXTERNAL);
        i.set_valid(true);
        i
    }

    /// A valid hardware exception, with or without an error code.
    pub fn exception(vector: u8, error_code: bool) -> Self {
        let mut i = Self(0);
        i.set_vector(vector);
        i.set_kind(intr_type::HARDWARE_EXCEPTION);
        i.set_deliver_error_code(error_code);
        i.set_valid(true);
        i
    }

    /// The raw field.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

bitfield! {
    /// Guest interruptibility state (SDM 3C, "Guest Non-Register State").
    #[derive(Clone, Copy, PartialEq, Eq, Default)]
    pub struct Interruptibility(u32); impl Debug;
    /// Blocking by STI.
    pub blocking_by_sti, set_blocking_by_sti: 0;
    /// Blocking by MOV SS / POP SS.
    pub blocking_by_mov_ss, set_blocking_by_mov_ss: 1;
    /// Blocking by SMI.
    pub blocking_by_smi, _: 2;
    /// Blocking by NMI.
    pub blocking_by_nmi, set_blocking_by_nmi: 3;
}

impl Interruptibility {
    /// From the raw field.
    pub const fn from_raw(v: u32) -> Self {
        Self(v)
    }
    /// The raw field.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

/// Guest activity state (SDM 3C, "Guest Non-Register State").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivityState {
    /// Executing instructions.
    Active,
    /// Halted by HLT.
    Hlt,
    /// Shutdown (triple fault).
    Shutdown,
    /// Waiting for SIPI.
    WaitForSipi,
}

impl ActivityState {
    /// The field value.
    pub const fn raw(self) -> u32 {
        match self {
            Self::Active => 0,
            Self::Hlt => 1,
            Self::Shutdown => 2,
            Self::WaitForSipi => 3,
        }
    }
}

impl TryFrom<u32> for ActivityState {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            0 => Ok(Self::Active),
            1 => Ok(Self::Hlt),
            2 => Ok(Self::Shutdown),
            3 => Ok(Self::WaitForSipi),
            other => Err(other),
        }
    }
}

bitfield! {
    /// Exit qualification for control-register accesses (SDM 3C, "Exit Qualification for
    /// Control-Register Accesses").
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct CrAccessQual(u64); impl Debug;
    /// Control register number.
    pub u8, cr, _: 3, 0;
    /// 0 = MOV to CR, 1 = MOV from CR, 2 = CLTS, 3 = LMSW.
    pub u8, access_type, _: 5, 4;
    /// General-purpose register operand (SDM register numbering).
    pub u8, gpr, _: 11, 8;
}

impl CrAccessQual {
    /// From the raw qualification.
    pub const fn from_raw(v: u64) -> Self {
        Self(v)
    }
}

/// [`CrAccessQual::access_type`] values.
pub mod cr_access {
    /// MOV to CR.
    pub const MOV_TO: u8 = 0;
    /// MOV from CR.
    pub const MOV_FROM: u8 = 1;
}

bitfield! {
    /// Exit qualification for MOV DR (SDM 3C, "Exit Qualification for MOV DR").
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub struct DrAccessQual(u64); impl Debug;
    /// Debug register number.
    pub u8, dr, _: 2, 0;
    /// 0 = MOV to DR, 1 = MOV from DR.
    pub from_dr, _: 4;
    /// General-purpose register operand (SDM register numbering).
    pub u8, gpr, _: 11, 8;
}

impl DrAccessQual {
    /// From the raw qualification.
    pub const fn from_raw(v: u64) -> Self {
        Self(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dr_access_qualification() {
        // MOV RSP -> DR7 is 7 | to | gpr 4; MOV DR0 -> RAX is 0 | from (bit 4) | gpr 0.
        let q = DrAccessQual::from_raw(0x407);
        assert_eq!((q.dr(), q.from_dr(), q.gpr()), (7, false, 4));
        let q = DrAccessQual::from_raw(0x10);
        assert_eq!((q.dr(), q.from_dr(), q.gpr()), (0, true, 0));
    }

    #[test]
    fn exit_intr_info_decodes_vector_type_and_valid() {
        let i = ExitIntrInfo::from_raw(0x8000_0041);
        assert!(i.valid());
        assert_eq!(i.vector(), 0x41);
        assert_eq!(i.kind(), intr_type::EXTERNAL);
        assert!(!ExitIntrInfo::from_raw(0x41).valid());
        assert_eq!(ExitIntrInfo::from_raw(0x8000_0202).kind(), intr_type::NMI);
    }

    #[test]
    fn entry_intr_info_encodings() {
        assert_eq!(EntryIntrInfo::external(0x2f).raw(), 0x8000_002f);
        assert_eq!(
            EntryIntrInfo::exception(exception::UD, false).raw(),
            0x8000_0306
        );
        assert_eq!(
            EntryIntrInfo::exception(exception::GP, true).raw(),
            0x8000_0b0d
        );
    }

    #[test]
    fn exit_reason_splits_entry_failure() {
        let r = ExitReasonField::from_raw(0x8000_0021);
        assert!(r.entry_failure());
        assert_eq!(r.basic(), reason::ENTRY_FAIL_GUEST_STATE);
    }

    #[test]
    fn cr_access_qualification() {
        // MOV CR8 <- RCX: cr=8, type 0, gpr 1.
        let q = CrAccessQual::from_raw(0x108);
        assert_eq!(
            (q.cr(), q.access_type(), q.gpr()),
            (8, cr_access::MOV_TO, 1)
        );
    }

    #[test]
    fn activity_state_round_trips() {
        for s in [
            ActivityState::Active,
            ActivityState::Hlt,
            ActivityState::Shutdown,
            ActivityState::WaitForSipi,
        ] {
            assert_eq!(ActivityState::try_from(s.raw()), Ok(s));
        }
        assert!(ActivityState::try_from(7).is_err());
    }
}
