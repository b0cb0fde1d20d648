//! VMX instructions and the VMCS handle. Section titles cited in this crate are from the Intel
//! SDM, volume 3C, edition of March 2025.
//!
//! **Runs in:** PASSIVE (VMXON, VMCLEAR, VMPTRLD, launch) and VMX root (VMREAD/VMWRITE).

pub mod access;
pub mod caps;
pub mod fields;
pub mod fixed;
pub mod vmcs;

use crate::arch::{msr, regs};
use core::marker::PhantomData;
use x86::bits64::vmx as insn;
use x86::vmx::vmcs::ro;

/// A failed VMX instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// VMfailValid with the VM-instruction error number.
    VmFailValid(u32),
    /// VMfailInvalid: no current VMCS.
    VmFailInvalid,
}

impl VmxError {
    /// The VM-instruction error number, 0 for VMfailInvalid (which has none).
    pub const fn instruction_error(self) -> u32 {
        match self {
            VmxError::VmFailValid(n) => n,
            VmxError::VmFailInvalid => 0,
        }
    }
}

/// Reads the capability MSRs of this CPU.
pub fn probe() -> caps::RawCaps {
    use x86::msr as m;
    let rd = |msr_index: u32| {
        // SAFETY: the IA32_VMX_* MSRs exist whenever CPUID.1:ECX.VMX = 1, which the caller
        // checked; TRUE_* are read only when VMX_BASIC bit 55 says so, PROCBASED_CTLS2 only when
        // the primary allowed-1 half offers secondary controls.
        unsafe { regs::rdmsr(msr_index) }
    };
    let basic = rd(m::IA32_VMX_BASIC);
    let has_true = msr::VmxBasic::from_raw(basic).true_controls();
    let proc = rd(m::IA32_VMX_PROCBASED_CTLS);
    let proc2 = if msr::AllowedBits(proc).allows(1 << 31) {
        rd(m::IA32_VMX_PROCBASED_CTLS2)
    } else {
        0
    };
    let true_or_zero = |msr_index| if has_true { rd(msr_index) } else { 0 };
    caps::RawCaps {
        basic,
        pin: rd(m::IA32_VMX_PINBASED_CTLS),
        proc,
        exit: rd(m::IA32_VMX_EXIT_CTLS),
        entry: rd(m::IA32_VMX_ENTRY_CTLS),
        true_pin: true_or_zero(m::IA32_VMX_TRUE_PINBASED_CTLS),
        true_proc: true_or_zero(m::IA32_VMX_TRUE_PROCBASED_CTLS),
        true_exit: true_or_zero(m::IA32_VMX_TRUE_EXIT_CTLS),
        true_entry: true_or_zero(m::IA32_VMX_TRUE_ENTRY_CTLS),
        proc2,
        cr0_fixed0: rd(m::IA32_VMX_CR0_FIXED0),
        cr0_fixed1: rd(m::IA32_VMX_CR0_FIXED1),
        cr4_fixed0: rd(m::IA32_VMX_CR4_FIXED0),
        cr4_fixed1: rd(m::IA32_VMX_CR4_FIXED1),
    }
}

fn vm_instruction_error() -> u32 {
    // SAFETY: reading a read-only field is harmless; on failure there is no error number.
    unsafe { insn::vmread(ro::VM_INSTRUCTION_ERROR) }.map_or(0, |v| v as u32)
}

fn check(r: x86::vmx::Result<()>) -> Result<(), VmxError> {
    match r {
        Ok(()) => Ok(()),
        Err(x86::vmx::VmFail::VmFailValid) => Err(VmxError::VmFailValid(vm_instruction_error())),
        Err(x86::vmx::VmFail::VmFailInvalid) => Err(VmxError::VmFailInvalid),
    }
}

/// Enters VMX operation.
///
/// # Safety
/// `region` is this CPU's page-aligned VMXON region with the revision id written; CR0/CR4 carry
/// the VMX fixed bits (CR4.VMXE set); IA32_FEATURE_CONTROL allows VMXON outside SMX.
pub unsafe fn vmxon(region: u64) -> Result<(), VmxError> {
    // SAFETY: caller's duty.
    check(unsafe { insn::vmxon(region) })
}

/// Leaves VMX operation.
///
/// # Safety
/// Must run in VMX root with nothing relying on VMX afterwards (the guest's state is restored).
pub unsafe fn vmxoff() -> Result<(), VmxError> {
    // SAFETY: caller's duty.
    check(unsafe { insn::vmxoff() })
}

/// Initializes a VMCS region and makes it inactive.
///
/// # Safety
/// `vmcs` is a page-aligned region of ours with the revision id written, in VMX operation.
pub unsafe fn vmclear(vmcs: u64) -> Result<(), VmxError> {
    // SAFETY: caller's duty.
    check(unsafe { insn::vmclear(vmcs) })
}

/// Makes a VMCS current on this CPU and returns the handle that VMREAD/VMWRITE go through.
///
/// # Safety
/// `vmcs` was VMCLEARed (or is already current) and belongs to this CPU.
pub unsafe fn vmptrld(vmcs: u64) -> Result<Vmcs, VmxError> {
    // SAFETY: caller's duty.
    check(unsafe { insn::vmptrld(vmcs) })?;
    Ok(Vmcs {
        _not_send: PhantomData,
    })
}

/// The current VMCS of this CPU. `!Send`: only the CPU that loaded it may use it.
pub struct Vmcs {
    _not_send: PhantomData<*const ()>,
}

impl Vmcs {
    /// The current VMCS, in root mode inside an exit (the exit proves one is current).
    ///
    /// # Safety
    /// A VMCS must be current on this CPU (true from VM exit until VMXOFF).
    pub unsafe fn current() -> Vmcs {
        Vmcs {
            _not_send: PhantomData,
        }
    }

    /// VMREAD. A field this CPU lacks reads as 0 (VMfailValid leaves the destination as it was,
    /// and no caller can do better than a neutral value). Hand-written rather than the x86
    /// crate's, which spends two more instructions per read on RFLAGS: this is the exit path.
    #[inline(always)]
    pub fn read(&self, field: u32) -> u64 {
        let value: u64;
        // SAFETY: a VMCS is current (type invariant); VMREAD only reads it into a register.
        unsafe {
            core::arch::asm!("vmread {v}, {f}", f = in(reg) u64::from(field), v = inout(reg) 0u64 => value,
                options(nostack, nomem))
        };
        value
    }

    /// VMREAD of a 32-bit field.
    #[inline(always)]
    pub fn read32(&self, field: u32) -> u32 {
        self.read(field) as u32
    }

    /// VMREAD of a field every VMX processor has (the guest-state area's registers, the exit
    /// reason and interruption information): one instruction less than [`Vmcs::read`], which
    /// zeroes the destination first for fields that may be missing. The exit path's reads.
    #[inline(always)]
    pub fn read_known(&self, field: u32) -> u64 {
        let value: u64;
        // SAFETY: a VMCS is current (type invariant); VMREAD only reads it into a register.
        unsafe {
            core::arch::asm!("vmread {v}, {f}", f = in(reg) u64::from(field), v = out(reg) value,
                options(nostack, nomem))
        };
        value
    }

    /// [`Vmcs::read_known`] of a 32-bit field.
    #[inline(always)]
    pub fn read32_known(&self, field: u32) -> u32 {
        self.read_known(field) as u32
    }

    /// VMWRITE.
    #[inline(always)]
    pub fn write(&self, field: u32, value: u64) -> Result<(), VmxError> {
        // SAFETY: a VMCS is current (type invariant); VMWRITE changes only the VMCS, and what
        // the VMCS means is checked by the next VM entry.
        check(unsafe { insn::vmwrite(field, value) })
    }

    /// VMWRITE where failure cannot happen for a field every VMX CPU has; a failure is ignored
    /// deliberately (root mode has no one to report to) and would surface at VM entry.
    #[inline(always)]
    pub fn set(&self, field: u32, value: u64) {
        // SAFETY: as in `write`; the flags are not inspected.
        unsafe {
            core::arch::asm!("vmwrite {f}, {v}", f = in(reg) u64::from(field), v = in(reg) value,
                options(nostack, nomem))
        };
    }
}
