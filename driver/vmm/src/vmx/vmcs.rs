//! VMCS setup: controls, host state (the running kernel with this CPU's IDT) and guest state
//! copied from the live CPU (DESIGN §5).
//!
//! **Runs in:** PASSIVE, on the CPU being virtualized, with its VMCS current.

use super::{Vmcs, VmxError};
use crate::arch::gdt::{self, AR_UNUSABLE};
use crate::arch::regs;
use crate::vmx::caps::Controls;
use x86::vmx::vmcs::{control, guest, host};

/// CR4.VMXE: hidden from the guest through the CR4 guest/host mask and read shadow.
pub const CR4_VMXE: u64 = 1 << 13;

/// Values captured on this CPU that the VMCS needs besides live registers.
pub struct HostInputs {
    /// HOST_CR3.
    pub cr3: u64,
    /// HOST_RSP.
    pub rsp: u64,
    /// HOST_RIP (the exit stub).
    pub rip: u64,
    /// Physical address of the MSR bitmap.
    pub msr_bitmap: u64,
    /// Guest IA32_DEBUGCTL.
    pub debugctl: u64,
    /// Guest DR7 (the same value root keeps in `RootState::guest_dr7`).
    pub dr7: u64,
    /// CR4 before VMXE was set (the guest's view).
    pub cr4_shadow: u64,
}

fn gdt_entries(d: &regs::DescriptorTable) -> &'static [u64] {
    let len = (usize::from(d.limit) + 1) / 8;
    // SAFETY: GDTR describes this CPU's live GDT, which the OS keeps mapped for as long as the
    // CPU runs; we only read it.
    unsafe { core::slice::from_raw_parts(d.base as *const u64, len) }
}

/// Writes the controls, host state and guest state. Guest RSP, RIP and RFLAGS are written by
/// the launch stub at the moment of VMLAUNCH.
pub fn setup(vmcs: &Vmcs, c: &Controls, h: &HostInputs) -> Result<(), VmxError> {
    let gdtr = regs::sgdt();
    let idtr = regs::sidt();
    let gdt = gdt_entries(&gdtr);

    // ---- controls
    vmcs.write(control::PINBASED_EXEC_CONTROLS, u64::from(c.pin))?;
    vmcs.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, u64::from(c.proc))?;
    if c.proc2 != 0 {
        vmcs.write(
            control::SECONDARY_PROCBASED_EXEC_CONTROLS,
            u64::from(c.proc2),
        )?;
    }
    vmcs.write(control::VMEXIT_CONTROLS, u64::from(c.exit))?;
    vmcs.write(control::VMENTRY_CONTROLS, u64::from(c.entry))?;
    vmcs.write(control::EXCEPTION_BITMAP, 0)?;
    // VMCLEAR does not promise zeroed fields (KVM writes these too): no #PF or XSAVES exits.
    vmcs.write(control::PAGE_FAULT_ERR_CODE_MASK, 0)?;
    vmcs.write(control::PAGE_FAULT_ERR_CODE_MATCH, 0)?;
    if c.proc2 & x86::vmx::vmcs::control::SecondaryControls::ENABLE_XSAVES_XRSTORS.bits() != 0 {
        vmcs.write(control::XSS_EXITING_BITMAP_FULL, 0)?;
    }
    vmcs.write(control::CR3_TARGET_COUNT, 0)?;
    vmcs.write(control::VMEXIT_MSR_STORE_COUNT, 0)?;
    vmcs.write(control::VMEXIT_MSR_LOAD_COUNT, 0)?;
    vmcs.write(control::VMENTRY_MSR_LOAD_COUNT, 0)?;
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0)?;
    vmcs.write(control::MSR_BITMAPS_ADDR_FULL, h.msr_bitmap)?;
    vmcs.write(control::CR0_GUEST_HOST_MASK, 0)?;
    vmcs.write(control::CR0_READ_SHADOW, regs::cr0())?;
    vmcs.write(control::CR4_GUEST_HOST_MASK, CR4_VMXE)?;
    vmcs.write(control::CR4_READ_SHADOW, h.cr4_shadow & !CR4_VMXE)?;

    // ---- host: the same kernel, this CPU's GDT/IDT/TSS/GS, our stack and stub.
    let tr = regs::tr();
    let tr_seg = gdt::decode(gdt, tr);
    vmcs.write(host::CR0, regs::cr0())?;
    vmcs.write(host::CR3, h.cr3)?;
    vmcs.write(host::CR4, regs::cr4())?;
    // Host selectors must have RPL = TI = 0; VM exit loads them without descriptor checks.
    vmcs.write(host::CS_SELECTOR, u64::from(regs::cs() & !7))?;
    vmcs.write(host::SS_SELECTOR, u64::from(regs::ss() & !7))?;
    vmcs.write(host::DS_SELECTOR, u64::from(regs::ds() & !7))?;
    vmcs.write(host::ES_SELECTOR, u64::from(regs::es() & !7))?;
    vmcs.write(host::FS_SELECTOR, u64::from(regs::fs() & !7))?;
    vmcs.write(host::GS_SELECTOR, u64::from(regs::gs() & !7))?;
    vmcs.write(host::TR_SELECTOR, u64::from(tr & !7))?;
    // SAFETY: FS/GS base and SYSENTER MSRs (this and the reads below) exist on every x86-64 CPU.
    let fs_base = unsafe { regs::rdmsr(x86::msr::IA32_FS_BASE) };
    // SAFETY: as above.
    let gs_base = unsafe { regs::rdmsr(x86::msr::IA32_GS_BASE) };
    // SAFETY: as above.
    let sysenter_cs = unsafe { regs::rdmsr(x86::msr::IA32_SYSENTER_CS) };
    // SAFETY: as above.
    let sysenter_esp = unsafe { regs::rdmsr(x86::msr::IA32_SYSENTER_ESP) };
    // SAFETY: as above.
    let sysenter_eip = unsafe { regs::rdmsr(x86::msr::IA32_SYSENTER_EIP) };
    vmcs.write(host::FS_BASE, fs_base)?;
    vmcs.write(host::GS_BASE, gs_base)?;
    vmcs.write(host::TR_BASE, tr_seg.base)?;
    vmcs.write(host::GDTR_BASE, gdtr.base)?;
    vmcs.write(host::IDTR_BASE, idtr.base)?;
    vmcs.write(host::IA32_SYSENTER_CS, sysenter_cs)?;
    vmcs.write(host::IA32_SYSENTER_ESP, sysenter_esp)?;
    vmcs.write(host::IA32_SYSENTER_EIP, sysenter_eip)?;
    vmcs.write(host::RSP, h.rsp)?;
    vmcs.write(host::RIP, h.rip)?;

    // ---- guest: the live CPU.
    vmcs.write(guest::CR0, regs::cr0())?;
    vmcs.write(guest::CR3, regs::cr3())?;
    vmcs.write(guest::CR4, regs::cr4())?;
    vmcs.write(guest::DR7, h.dr7)?;
    let segs = [
        (
            guest::ES_SELECTOR,
            guest::ES_BASE,
            guest::ES_LIMIT,
            guest::ES_ACCESS_RIGHTS,
            regs::es(),
        ),
        (
            guest::CS_SELECTOR,
            guest::CS_BASE,
            guest::CS_LIMIT,
            guest::CS_ACCESS_RIGHTS,
            regs::cs(),
        ),
        (
            guest::SS_SELECTOR,
            guest::SS_BASE,
            guest::SS_LIMIT,
            guest::SS_ACCESS_RIGHTS,
            regs::ss(),
        ),
        (
            guest::DS_SELECTOR,
            guest::DS_BASE,
            guest::DS_LIMIT,
            guest::DS_ACCESS_RIGHTS,
            regs::ds(),
        ),
        (
            guest::FS_SELECTOR,
            guest::FS_BASE,
            guest::FS_LIMIT,
            guest::FS_ACCESS_RIGHTS,
            regs::fs(),
        ),
        (
            guest::GS_SELECTOR,
            guest::GS_BASE,
            guest::GS_LIMIT,
            guest::GS_ACCESS_RIGHTS,
            regs::gs(),
        ),
        (
            guest::LDTR_SELECTOR,
            guest::LDTR_BASE,
            guest::LDTR_LIMIT,
            guest::LDTR_ACCESS_RIGHTS,
            regs::ldtr(),
        ),
        (
            guest::TR_SELECTOR,
            guest::TR_BASE,
            guest::TR_LIMIT,
            guest::TR_ACCESS_RIGHTS,
            tr,
        ),
    ];
    for (sel_f, base_f, limit_f, ar_f, sel) in segs {
        let s = gdt::decode(gdt, sel);
        vmcs.write(sel_f, u64::from(sel))?;
        vmcs.write(base_f, s.base)?;
        vmcs.write(limit_f, u64::from(s.limit))?;
        // A segment the CPU loaded is marked accessed; VM entry insists on it for CS.
        let ar = if s.access_rights == AR_UNUSABLE
            || sel_f == guest::TR_SELECTOR
            || sel_f == guest::LDTR_SELECTOR
        {
            s.access_rights
        } else {
            s.access_rights | 1
        };
        vmcs.write(ar_f, u64::from(ar))?;
    }
    vmcs.write(guest::FS_BASE, fs_base)?;
    vmcs.write(guest::GS_BASE, gs_base)?;
    vmcs.write(guest::GDTR_BASE, gdtr.base)?;
    vmcs.write(guest::GDTR_LIMIT, u64::from(gdtr.limit))?;
    vmcs.write(guest::IDTR_BASE, idtr.base)?;
    vmcs.write(guest::IDTR_LIMIT, u64::from(idtr.limit))?;
    vmcs.write(guest::IA32_DEBUGCTL_FULL, h.debugctl)?;
    vmcs.write(guest::IA32_SYSENTER_CS, sysenter_cs)?;
    vmcs.write(guest::IA32_SYSENTER_ESP, sysenter_esp)?;
    vmcs.write(guest::IA32_SYSENTER_EIP, sysenter_eip)?;
    vmcs.write(guest::LINK_PTR_FULL, u64::MAX)?;
    vmcs.write(guest::INTERRUPTIBILITY_STATE, 0)?;
    vmcs.write(guest::ACTIVITY_STATE, 0)?;
    vmcs.write(guest::PENDING_DBG_EXCEPTIONS, 0)?;
    Ok(())
}
