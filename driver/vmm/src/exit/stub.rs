//! The two assembly entry points of root mode: the blue-pill launch, and the VM-exit stub that
//! saves the guest's registers, calls `exit::dispatch` and resumes (or devirtualizes).
//!
//! VM entry and exit, as the code relies on them (SDM 3C, "VM Entries", "VM Exits"):
//! 1. VMLAUNCH loads the guest state from the VMCS. GPRs are not in the VMCS, so the guest
//!    continues with whatever the launch stub left in them; guest RSP/RIP/RFLAGS are written by
//!    the launch stub itself, so the guest "returns 0" from [`launch`].
//! 2. A VM exit loads HOST_RSP (our stack, `&PerCpu` in its top slot) and HOST_RIP
//!    ([`vm_exit_entry`]), with RFLAGS = 0x2 (IF=0). GPRs still hold the guest's values.
//! 3. The stub saves the 16 GPRs (SDM order) as a `GuestRegs`, the TSC, and XMM0–15/MXCSR with
//!    FXSAVE (root code may use SSE; the guest's vector state must survive it).
//! 4. `exit::dispatch` returns 0 to resume or 1 to leave VMX operation; in the second case
//!    VMXOFF has already run and `CpuData::devirt_rsp` points at [RFLAGS, RIP] on the guest's
//!    stack, so POPFQ + RET continue the former guest.
//!
//! **Runs in:** VMX root (exit stub), PASSIVE (launch).

use super::guest_regs::GuestRegs;
use crate::cpu::{CpuData, PerCpu};
use core::mem::offset_of;
use x86::vmx::vmcs::guest;

/// FXSAVE area size: 512 bytes, 16-byte aligned.
const FXSAVE_BYTES: usize = 512;
const REGS_BYTES: usize = core::mem::size_of::<GuestRegs>();

/// Result of [`launch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchResult {
    /// Running as the guest.
    Guest,
    /// VMLAUNCH failed with VMfailInvalid.
    FailInvalid,
    /// VMLAUNCH failed with VMfailValid (read the VM-instruction error).
    FailValid,
    /// VM entry failed on guest state or MSR loading; VMX operation was left already.
    EntryFailed,
}

/// Blue-pill launch: writes guest RSP/RIP/RFLAGS for "this call returns 0 as the guest" and
/// runs VMLAUNCH. Returns 0 in the guest, 1 on VMfailInvalid, 2 on VMfailValid, 3 when the VM
/// entry failed its guest-state checks (an exit with reason bit 31, which root turns into a
/// return here: see `launch_failed_resume_point`).
///
/// Stack at VMLAUNCH: `[rsp] = RFLAGS at entry`, then r15..rbx, then our return address; the
/// guest resumes at label 2 with exactly that RSP and so unwinds the same frame.
#[unsafe(naked)]
extern "sysv64" fn launch_raw() -> u64 {
    core::arch::naked_asm!(
        "push rbx",                         // callee-saved registers: the guest pops them back
        "push rbp",                         //
        "push r12",                         //
        "push r13",                         //
        "push r14",                         //
        "push r15",                         //
        "pushfq",                           // the caller's RFLAGS (IF included) become the guest's
        "mov rax, [rsp]",                   //
        "cli",                              // no interrupt between the VMWRITEs and VMLAUNCH
        "mov rdx, {g_rflags}",              //
        "vmwrite rdx, rax",                 // GUEST_RFLAGS = caller's RFLAGS
        "mov rdx, {g_rsp}",                 //
        "vmwrite rdx, rsp",                 // GUEST_RSP = this frame
        "lea rax, [rip + 2f]",              //
        "mov rdx, {g_rip}",                 //
        "vmwrite rdx, rax",                 // GUEST_RIP = label 2
        "vmlaunch",                         // success does not come back here
        "mov eax, 1",                       // VMfailInvalid sets CF ...
        "jc 3f",                            //
        "mov eax, 2",                       // ... VMfailValid sets ZF
        "3:",                               //
        "popfq",                            // give the caller its IF back
        "jmp 4f",                           //
        "2:",                               // the guest starts here, RFLAGS already loaded
        "add rsp, 8",                       // drop the saved RFLAGS
        "xor eax, eax",                     // "returned 0": now the guest
        "jmp 4f",                           //
        ".global ackvisor_launch_failed",   // the first entry failed its guest-state checks:
        "ackvisor_launch_failed:",          // root left VMX operation and continued here
        "add rsp, 8",                       // (RFLAGS restored by the devirtualize path)
        "mov eax, 3",                       //
        "4:",                               //
        "pop r15",                          //
        "pop r14",                          //
        "pop r13",                          //
        "pop r12",                          //
        "pop rbp",                          //
        "pop rbx",                          //
        "ret",                              //
        g_rflags = const guest::RFLAGS,
        g_rsp = const guest::RSP,
        g_rip = const guest::RIP,
    )
}

/// Launches the current VMCS as a copy of the caller.
///
/// # Safety
/// The current VMCS holds a complete guest/host state of this CPU (vmx::vmcs::setup ran) and
/// HOST_RSP/HOST_RIP point at this CPU's stack and [`vm_exit_entry`].
pub unsafe fn launch() -> LaunchResult {
    match launch_raw() {
        0 => LaunchResult::Guest,
        1 => LaunchResult::FailInvalid,
        3 => LaunchResult::EntryFailed,
        _ => LaunchResult::FailValid,
    }
}

unsafe extern "C" {
    static ackvisor_launch_failed: u8;
}

/// Where the guest continues when its very first VM entry failed: [`launch`] returns
/// [`LaunchResult::EntryFailed`] from there.
pub fn launch_failed_resume_point() -> u64 {
    core::ptr::addr_of!(ackvisor_launch_failed) as u64
}

/// HOST_RIP. Stack on entry (HOST_RSP, 16-byte aligned): `[rsp] = &PerCpu`.
///
/// ```text
///   HOST_RSP  -> &PerCpu
///             -  pad, entry_tsc          (GuestRegs tail)
///             -  r15 … rax (rsp slot)    (GuestRegs.gpr, rax lowest)
///   rsp       -> FXSAVE area (512)       at the CALL
/// ```
///
/// On the msvc target the stub carries unwind data (HyperPlatform's idea, STYLE §2.5) so that
/// WinDbg's `k`, stopped in a handler that root replayed, walks through `dispatch` into this
/// frame and ends cleanly: the codes describe every push (the guest's GPRs come back in the
/// unwound context) and count the `&PerCpu` slot as allocated, so the unwinder's return address
/// is the zeroed qword above HOST_RSP, which ends the walk.
#[unsafe(naked)]
pub extern "sysv64" fn vm_exit_entry() -> ! {
    core::arch::naked_asm!(
        #[cfg(windows)]
        ".seh_proc {this}",                 // unwind data for WinDbg (see above)
        #[cfg(windows)]
        ".seh_stackalloc 8",                // the &PerCpu slot HOST_RSP points at
        // -- save: GuestRegs is built by pushes, highest field first.
        "sub rsp, 16",                      // GuestRegs.{_pad, entry_tsc}
        #[cfg(windows)]
        ".seh_stackalloc 16",               //
        "push r15",                         //
        #[cfg(windows)]
        ".seh_pushreg r15",                 //
        "push r14",                         //
        #[cfg(windows)]
        ".seh_pushreg r14",                 //
        "push r13",                         //
        #[cfg(windows)]
        ".seh_pushreg r13",                 //
        "push r12",                         //
        #[cfg(windows)]
        ".seh_pushreg r12",                 //
        "push r11",                         //
        #[cfg(windows)]
        ".seh_pushreg r11",                 //
        "push r10",                         //
        #[cfg(windows)]
        ".seh_pushreg r10",                 //
        "push r9",                          //
        #[cfg(windows)]
        ".seh_pushreg r9",                  //
        "push r8",                          //
        #[cfg(windows)]
        ".seh_pushreg r8",                  //
        "push rdi",                         //
        #[cfg(windows)]
        ".seh_pushreg rdi",                 //
        "push rsi",                         //
        #[cfg(windows)]
        ".seh_pushreg rsi",                 //
        "push rbp",                         //
        #[cfg(windows)]
        ".seh_pushreg rbp",                 //
        "sub rsp, 8",                       // RSP slot: the guest's RSP is in the VMCS
        #[cfg(windows)]
        ".seh_stackalloc 8",                //
        "push rbx",                         //
        #[cfg(windows)]
        ".seh_pushreg rbx",                 //
        "push rdx",                         //
        #[cfg(windows)]
        ".seh_pushreg rdx",                 //
        "push rcx",                         //
        #[cfg(windows)]
        ".seh_pushreg rcx",                 //
        "push rax",                         // rsp = &GuestRegs, still 16-byte aligned
        #[cfg(windows)]
        ".seh_pushreg rax",                 //
        "rdtsc",                            // start of the root-mode cost (rax/rdx saved)
        "shl rdx, 32",                      //
        "or rax, rdx",                      //
        "mov [rsp + {tsc}], rax",           // GuestRegs.entry_tsc
        "mov rdi, rsp",                     // arg 1: &mut GuestRegs
        "mov rsi, [rsp + {regs}]",          // arg 2: &PerCpu from the top slot
        "sub rsp, {fx}",                    //
        #[cfg(windows)]
        ".seh_stackalloc {fx}",             //
        #[cfg(windows)]
        ".seh_endprologue",                 //
        "fxsave64 [rsp]",                   // XMM0-15, MXCSR, 64-bit x87 FIP/FDP: root uses SSE
        "mov rdx, rsp",                     // arg 3: &mut FxArea (forwarded XMM hypercalls)
        "cld",                              // the ABI wants DF=0; the guest may have set it
        "call {dispatch}",                  // rax = 0 resume, 1 devirtualize
        "fxrstor64 [rsp]",                  //
        "add rsp, {fx}",                    // rsp = &GuestRegs
        "cmp rax, 1",                       // flags survive the pops below
        "pop rax",                          // -- restore, same order reversed
        "pop rcx",                          //
        "pop rdx",                          //
        "pop rbx",                          //
        "lea rsp, [rsp + 8]",               // RSP slot (LEA keeps the flags)
        "pop rbp",                          //
        "pop rsi",                          //
        "pop rdi",                          //
        "pop r8",                           //
        "pop r9",                           //
        "pop r10",                          //
        "pop r11",                          //
        "pop r12",                          //
        "pop r13",                          //
        "pop r14",                          //
        "pop r15",                          //
        "lea rsp, [rsp + 16]",              // rsp = HOST_RSP again, [rsp] = &PerCpu
        "je 5f",                            // dispatch said devirtualize
        "vmresume",                         // success does not come back
        "pushfq",                           // VMfailInvalid (CF) or VMfailValid (ZF)
        "pop rsi",                          // arg 2: RFLAGS after the failure
        "mov rdi, [rsp]",                   // arg 1: &PerCpu
        "call {failed}",                    // does not return
        "ud2",                              //
        "5:",                               // VMXOFF done: continue the former guest
        "mov rsp, [rsp]",                   // rsp = &PerCpu (no free register left)
        "mov rsp, [rsp + {devirt}]",        // rsp = guest RSP - 16: [RFLAGS, RIP]
        "popfq",                            // guest RFLAGS (may set IF)
        "ret",                              // guest RIP, RSP = guest RSP
        #[cfg(windows)]
        ".seh_endproc",                     //
        tsc = const offset_of!(GuestRegs, entry_tsc),
        regs = const REGS_BYTES,
        fx = const FXSAVE_BYTES,
        devirt = const offset_of!(PerCpu, data) + offset_of!(CpuData, devirt_rsp),
        dispatch = sym super::dispatch,
        failed = sym resume_failed,
        #[cfg(windows)]
        this = sym vm_exit_entry,
    )
}

/// VMRESUME failed: nothing can continue on this CPU.
extern "sysv64" fn resume_failed(cpu: &PerCpu, rflags: u64) -> ! {
    super::resume_failed(cpu, rflags)
}

const _: () = assert!(REGS_BYTES.is_multiple_of(16) && FXSAVE_BYTES.is_multiple_of(16));
