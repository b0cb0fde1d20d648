//! The two assembly entry points of root mode: the blue-pill launch, and the VM-exit stub that
//! saves the guest's registers, calls `exit::dispatch` and resumes (or devirtualizes).
//!
//! VM entry and exit, as the code relies on them (SDM 3C, "VM Entries", "VM Exits"):
//! 1. VMLAUNCH loads the guest state from the VMCS. GPRs are not in the VMCS, so the guest
//!    continues with whatever the launch stub left in them; guest RSP/RIP/RFLAGS are written by
//!    the launch stub itself, so the guest "returns 0" from [`launch`].
//! 2. A VM exit loads HOST_RSP (our stack, `&PerCpu` in its top slot) and HOST_RIP
//!    ([`vm_exit_entry`]), with RFLAGS = 0x2 (IF=0). GPRs still hold the guest's values.
//! 3. The stub saves the volatile GPRs and calls `exit::dispatch_fast` (external interrupts);
//!    for every other exit it completes the 16 GPRs (SDM order) as a `GuestRegs` and saves
//!    XMM0–15/MXCSR with FXSAVE (handlers may use SSE; the guest's vector state must survive).
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

/// Slot of GPR `n` in [`GuestRegs`] (SDM register number).
const fn gpr(n: usize) -> usize {
    offset_of!(GuestRegs, gpr) + n * 8
}

/// HOST_RIP. Stack on entry (HOST_RSP, 16-byte aligned): `[rsp] = &PerCpu`.
///
/// ```text
///   HOST_RSP  -> &PerCpu
///   rsp       -> GuestRegs (144 bytes: 16 GPR slots, pad)   at both CALLs
/// ```
///
/// Two paths (issue 11: the external-interrupt exit is the one that must be cheap):
/// - **fast**: save the nine registers the System V ABI lets a callee clobber (RAX, RCX, RDX,
///   RSI, RDI, R8–R11) and call `exit::dispatch_fast`, which handles exit reason 1 in full.
///   The callee-saved six are preserved by the call itself, and no XMM register is saved:
///   the code reachable from here uses none (the runner's `root_code_uses_no_vector_registers`
///   test disassembles it), NT's interrupt entry saves the volatile XMM registers for the
///   handler it runs, and platform IRQL calls go through [`with_fx_saved`].
/// - **slow** (`dispatch_fast` returned nonzero: any other exit): [`exit_slow`] completes
///   `GuestRegs` with the six callee-saved registers (still the guest's), saves the vector
///   state and calls `exit::dispatch`; then all fifteen come back (handlers may change any).
///
/// On the msvc target both carry unwind data (HyperPlatform's idea, STYLE §2.5) so that
/// WinDbg's `k`, stopped in a handler that root replayed, walks through the dispatcher into
/// this frame and ends cleanly: the codes describe the saved registers (they come back in the
/// unwound context) and count the `&PerCpu` slot as allocated, so the unwinder's return address
/// is the zeroed qword above HOST_RSP, which ends the walk.
#[unsafe(naked)]
pub extern "sysv64" fn vm_exit_entry() -> ! {
    core::arch::naked_asm!(
        // -- fast path: volatile registers into their GuestRegs slots.
        #[cfg(windows)]
        ".seh_proc {this}",                 // unwind data for WinDbg (see above)
        #[cfg(windows)]
        ".seh_stackalloc 8",                // the &PerCpu slot HOST_RSP points at
        "sub rsp, {regs}",                  // GuestRegs, ending at HOST_RSP
        #[cfg(windows)]
        ".seh_stackalloc {regs}",           //
        "mov [rsp + {rax}], rax",           //
        #[cfg(windows)]
        ".seh_savereg rax, {rax}",
        "mov [rsp + {rcx}], rcx",           //
        #[cfg(windows)]
        ".seh_savereg rcx, {rcx}",
        "mov [rsp + {rdx}], rdx",           //
        #[cfg(windows)]
        ".seh_savereg rdx, {rdx}",
        "mov [rsp + {rsi}], rsi",           //
        #[cfg(windows)]
        ".seh_savereg rsi, {rsi}",
        "mov [rsp + {rdi}], rdi",           //
        #[cfg(windows)]
        ".seh_savereg rdi, {rdi}",
        "mov [rsp + {r8}], r8",             //
        #[cfg(windows)]
        ".seh_savereg r8, {r8}",
        "mov [rsp + {r9}], r9",             //
        #[cfg(windows)]
        ".seh_savereg r9, {r9}",
        "mov [rsp + {r10}], r10",           //
        #[cfg(windows)]
        ".seh_savereg r10, {r10}",
        "mov [rsp + {r11}], r11",           //
        #[cfg(windows)]
        ".seh_savereg r11, {r11}",
        #[cfg(windows)]
        ".seh_endprologue",                 //
        "mov rdi, [rsp + {regs}]",          // arg 1: &PerCpu from the top slot
        "cld",                              // the ABI wants DF=0; the guest may have set it
        "call {fast}",                      // rax = 0: handled, resume; else the slow path
        "test eax, eax",                    //
        "jnz 2f",                           //
        "mov r11, [rsp + {r11}]",           // -- fast resume: the same nine back
        "mov r10, [rsp + {r10}]",           //
        "mov r9, [rsp + {r9}]",             //
        "mov r8, [rsp + {r8}]",             //
        "mov rdi, [rsp + {rdi}]",           //
        "mov rsi, [rsp + {rsi}]",           //
        "mov rdx, [rsp + {rdx}]",           //
        "mov rcx, [rsp + {rcx}]",           //
        "mov rax, [rsp + {rax}]",           //
        "add rsp, {regs}",                  // rsp = HOST_RSP again
        "vmresume",                         // success does not come back
        "jmp 4f",                           //
        "2:",                               // -- slow path: every other exit
        "mov rdi, rsp",                     // arg 1: &mut GuestRegs
        "mov rsi, [rsp + {regs}]",          // arg 2: &PerCpu
        "call {slow}",                      // rax = 0 resume, 1 devirtualize
        "cmp rax, 1",                       // flags survive the loads below
        "mov rax, [rsp + {rax}]",           // -- restore all fifteen
        "mov rcx, [rsp + {rcx}]",           //
        "mov rdx, [rsp + {rdx}]",           //
        "mov rbx, [rsp + {rbx}]",           //
        "mov rbp, [rsp + {rbp}]",           //
        "mov rsi, [rsp + {rsi}]",           //
        "mov rdi, [rsp + {rdi}]",           //
        "mov r8, [rsp + {r8}]",             //
        "mov r9, [rsp + {r9}]",             //
        "mov r10, [rsp + {r10}]",           //
        "mov r11, [rsp + {r11}]",           //
        "mov r12, [rsp + {r12}]",           //
        "mov r13, [rsp + {r13}]",           //
        "mov r14, [rsp + {r14}]",           //
        "mov r15, [rsp + {r15}]",           //
        "lea rsp, [rsp + {regs}]",          // rsp = HOST_RSP, [rsp] = &PerCpu (LEA keeps flags)
        "je 5f",                            // dispatch said devirtualize
        "vmresume",                         // success does not come back
        "4:",                               //
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
        regs = const REGS_BYTES,
        rax = const gpr(0),
        rcx = const gpr(1),
        rdx = const gpr(2),
        rbx = const gpr(3),
        rbp = const gpr(5),
        rsi = const gpr(6),
        rdi = const gpr(7),
        r8 = const gpr(8),
        r9 = const gpr(9),
        r10 = const gpr(10),
        r11 = const gpr(11),
        r12 = const gpr(12),
        r13 = const gpr(13),
        r14 = const gpr(14),
        r15 = const gpr(15),
        devirt = const offset_of!(PerCpu, data) + offset_of!(CpuData, devirt_rsp),
        fast = sym super::dispatch_fast,
        slow = sym exit_slow,
        failed = sym resume_failed,
        #[cfg(windows)]
        this = sym vm_exit_entry,
    )
}

/// The slow path of [`vm_exit_entry`], a function of its own so that its stack frame (the
/// FXSAVE area) has a prologue of its own: completes `GuestRegs` with the six callee-saved
/// registers (still the guest's: the fast call preserved them), saves XMM0–15/MXCSR and calls
/// `exit::dispatch`. Returns its answer (0 resume, 1 devirtualize). The XMM check stops at its
/// first instruction (`ackvisor_exit_slow`), which starts with the saving.
///
/// ```text
///   rsp at entry + 8 -> GuestRegs (rdi)
///   rsp              -> return into vm_exit_entry
///                    -  pad (8), FXSAVE area (512)   at the CALL of dispatch
/// ```
#[unsafe(naked)]
extern "sysv64" fn exit_slow(regs: &mut GuestRegs, cpu: &PerCpu) -> u64 {
    core::arch::naked_asm!(
        #[cfg(windows)]
        ".seh_proc {this}",                 // unwind data (see vm_exit_entry)
        ".global ackvisor_exit_slow",       // the XMM check's boundary
        "ackvisor_exit_slow:",              //
        "mov [rdi + {rbx}], rbx",           // callee-saved: still the guest's
        "mov [rdi + {rbp}], rbp",           //
        "mov [rdi + {r12}], r12",           //
        "mov [rdi + {r13}], r13",           //
        "mov [rdi + {r14}], r14",           //
        "mov [rdi + {r15}], r15",           //
        "sub rsp, {frame}",                 // 16-byte aligned FXSAVE area
        #[cfg(windows)]
        ".seh_stackalloc {frame}",          //
        #[cfg(windows)]
        ".seh_endprologue",                 //
        "fxsave64 [rsp]",                   // XMM0-15, MXCSR, 64-bit x87 FIP/FDP
        "mov rdx, rsp",                     // arg 3: &mut FxArea (rdi, rsi: args 1, 2)
        "call {dispatch}",                  // rax = 0 resume, 1 devirtualize
        "fxrstor64 [rsp]",                  //
        "add rsp, {frame}",                 //
        "ret",                              //
        #[cfg(windows)]
        ".seh_endproc",                     //
        rbx = const gpr(3),
        rbp = const gpr(5),
        r12 = const gpr(12),
        r13 = const gpr(13),
        r14 = const gpr(14),
        r15 = const gpr(15),
        frame = const FXSAVE_BYTES + 8,
        dispatch = sym super::dispatch,
        #[cfg(windows)]
        this = sym exit_slow,
    )
}

/// Calls `f(arg)` with the caller's XMM0–15/MXCSR saved around it (FXSAVE64/FXRSTOR64 on a
/// 16-byte-aligned area of this stack). For code on the fast exit path that is not ours to
/// prove free of XMM: the platform's IRQL functions (DESIGN §4, NT).
///
/// # Safety
/// `f` is the address of an `extern "sysv64" fn(usize)`-compatible function that may be
/// called with `arg`, and the stack has 528 bytes to spare.
#[unsafe(naked)]
unsafe extern "sysv64" fn fx_saved_raw(f: usize, arg: usize) {
    core::arch::naked_asm!(
        "push rbp",            // rsp 16-aligned now
        "mov rbp, rsp",        //
        "sub rsp, {fx}",       //
        "fxsave64 [rsp]",      // the guest's vector state
        "mov rax, rdi",        //
        "mov rdi, rsi",        // arg 1 of f: arg
        "call rax",            //
        "fxrstor64 [rsp]",     //
        "mov rsp, rbp",        //
        "pop rbp",             //
        "ret",                 //
        fx = const FXSAVE_BYTES,
    )
}

/// Calls `f(arg)` with the vector state saved around it (`fx_saved_raw`), for a typed argument.
#[inline(always)]
pub fn with_fx_saved<T>(f: extern "sysv64" fn(&T), arg: &T) {
    // SAFETY: `f` is a function taking one pointer-sized argument in RDI, called with a valid
    // `&T` for the whole call; exit paths use a few hundred bytes of the 24 KiB host stack.
    unsafe { fx_saved_raw(f as usize, arg as *const T as usize) };
}

/// VMRESUME failed: nothing can continue on this CPU.
extern "sysv64" fn resume_failed(cpu: &PerCpu, rflags: u64) -> ! {
    super::resume_failed(cpu, rflags)
}

const _: () = assert!(REGS_BYTES.is_multiple_of(16) && FXSAVE_BYTES.is_multiple_of(16));
const _: () = assert!(gpr(15) + 8 <= REGS_BYTES);
