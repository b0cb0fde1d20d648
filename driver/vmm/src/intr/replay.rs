//! Root-mode replay of an acknowledged vector through this CPU's IDT (DESIGN §3.4), and the
//! exit-sti root interrupt window.
//!
//! **Runs in:** VMX root; the replayed handler runs with IF=0 until it enables interrupts
//! itself, at IRQL ≥ DISPATCH.

use super::policy::{self, FrameStack, Vector};
use crate::arch::debug::DR7_AFTER_EXIT;
use crate::arch::idt::IdtGate;
use crate::arch::{msr, regs};

/// Calls an interrupt handler the way the CPU would have: switch to `frame_rsp` (0 = stay on
/// the VMM stack, aligned down to 16), push SS, the VMM's RSP, RFLAGS (IF=0), CS and CALL the
/// gate target; the handler's IRETQ lands on `ackvisor_replay_return` with RSP = the VMM's.
///
/// ```text
///   frame_rsp -> (guest's live data above)
///               SS        = kernel SS
///               RSP       = VMM RSP (rbp)     IRETQ returns onto the VMM stack
///               RFLAGS    = root RFLAGS, IF=0
///               CS        = kernel CS
///   rsp at the CALL target -> return RIP = ackvisor_replay_return
/// ```
/// The handler preserves every register (interrupt handlers must); RBP anchors our frame
/// because no unwinder knows that the callee returns with IRETQ (KVM's vmenter.S does the same).
/// On the msvc target that anchor is declared as the frame register in unwind data, so WinDbg's
/// `k` walks from the handler's machine frame (RIP = the return site, RSP = RBP) back into the
/// exit path.
#[unsafe(naked)]
unsafe extern "sysv64" fn replay_trampoline(handler: u64, frame_rsp: u64, ss: u64, cs: u64) {
    core::arch::naked_asm!(
        #[cfg(windows)]
        ".seh_proc {this}",               // unwind data for WinDbg (see above)
        "push rbp",                       // anchor: IRETQ brings RSP back to this value
        #[cfg(windows)]
        ".seh_pushreg rbp",               //
        "mov rbp, rsp",                   //
        #[cfg(windows)]
        ".seh_setframe rbp, 0",           //
        #[cfg(windows)]
        ".seh_endprologue",               //
        "test rsi, rsi",                  // DESIGN §3.4: guest CPL 0 -> its stack,
        "jnz 1f",                         //
        "mov rsi, rsp",                   //   CPL 3 -> ours,
        "and rsi, -16",                   //   aligned like the CPU aligns interrupt frames
        "1:",                             //
        "mov rsp, rsi",                   // frame goes where a real interrupt's would
        "push rdx",                       // SS
        "push rbp",                       // RSP to return to: the VMM stack
        "pushfq",                         // RFLAGS: root mode, IF=0
        "push rcx",                       // CS: kernel, so the OS skips SWAPGS
        "call rdi",                       // pushes RIP; the handler ends in IRETQ
        ".global ackvisor_replay_return", //
        "ackvisor_replay_return:",        // IRETQ resumes here with RSP = rbp
        "pop rbp",                        //
        "ret",                            //
        #[cfg(windows)]
        ".seh_endproc",                   //
        #[cfg(windows)]
        this = sym replay_trampoline,
    )
}

/// exit-sti: `sti; nop; cli` on `window_rsp` (0 = stay on the VMM stack). The interrupt is
/// recognized after the NOP (STI's one-instruction shadow), so the CPU's frame holds RIP =
/// `ackvisor_sti_window_return` (the CLI).
///
/// The CPU pushes its frame on the current stack, so the window must run where a real
/// interrupt's frame would go (DESIGN §3.4, as for replay): on the guest's stack at CPL 0, or
/// NT's "already on the ISR stack?" check fails and its entry overwrites the live frames of a
/// guest handler that was interrupted.
/// Unwind data on the msvc target as for [`replay_trampoline`]: the CPU's frame holds RIP =
/// the return site, and RBP leads back to the VMM stack.
#[unsafe(naked)]
unsafe extern "sysv64" fn sti_window_on(window_rsp: u64) {
    core::arch::naked_asm!(
        #[cfg(windows)]
        ".seh_proc {this}", // unwind data for WinDbg
        "push rbp",      // anchor for the way back
        #[cfg(windows)]
        ".seh_pushreg rbp", //
        "mov rbp, rsp",  //
        #[cfg(windows)]
        ".seh_setframe rbp, 0", //
        #[cfg(windows)]
        ".seh_endprologue", //
        "test rdi, rdi", // 0: the VMM stack (guest at CPL 3)
        "jz 1f",         //
        "mov rsp, rdi",  // the guest's stack, already aligned down to 16
        "1:",            //
        "sti",           // IF=1 after the next instruction
        "nop",           // the shadow: interrupts arrive after this
        ".global ackvisor_sti_window_return",
        "ackvisor_sti_window_return:", // frame RIP of a root-mode delivery
        "cli",                         //
        "mov rsp, rbp",                // back to the VMM stack
        "pop rbp",                     //
        "ret",                         //
        #[cfg(windows)]
        ".seh_endproc",                //
        #[cfg(windows)]
        this = sym sti_window_on,
    )
}

/// Opens the exit-sti window where `frame` says a real interrupt's frame would go.
#[inline(always)]
pub fn sti_window(frame: FrameStack) {
    let rsp = match frame {
        FrameStack::Guest(rsp) => rsp,
        FrameStack::Vmm => 0,
    };
    // SAFETY: the CPU delivers through this CPU's IDT (HOST_IDTR) onto `rsp`: the guest's own
    // CPL-0 stack below its live data (no red zone in the x64 kernel) or ours; the handlers
    // preserve every register, and IRETQ returns here.
    unsafe { sti_window_on(rsp) };
}

unsafe extern "C" {
    static ackvisor_replay_return: u8;
    static ackvisor_sti_window_return: u8;
}

/// `[replay return, sti window return]` addresses.
pub fn return_sites() -> [usize; 2] {
    [
        core::ptr::addr_of!(ackvisor_replay_return) as usize,
        core::ptr::addr_of!(ackvisor_sti_window_return) as usize,
    ]
}

/// Reads vector `v`'s gate from an IDT at `base` with `limit`, if the entry lies inside.
#[inline(always)]
pub fn read_gate(base: u64, limit: u16, v: Vector) -> Option<IdtGate> {
    if policy::gate_end(v) > u32::from(limit) {
        return None;
    }
    let p = (base + u64::from(v.0) * 16) as *const IdtGate;
    // SAFETY: `base`/`limit` are this CPU's IDTR as the guest loaded it, mapped in the kernel
    // address space root mode shares; the entry lies within the limit (checked above).
    Some(unsafe { core::ptr::read_volatile(p) })
}

/// Calls a validated gate's handler (DESIGN §3.4) with its frame on `frame`.
#[inline(always)]
pub fn call_handler(handler: u64, kernel_cs: u16, kernel_ss: u16, frame: FrameStack) {
    let rsp = match frame {
        FrameStack::Guest(rsp) => rsp,
        FrameStack::Vmm => 0,
    };
    // SAFETY: `handler` is a present 64-bit interrupt gate of this CPU's IDT with DPL 0, the
    // kernel CS and no IST (`policy::validate_gate` accepted it), i.e. an OS interrupt handler
    // expecting exactly the frame built; the frame goes below the guest's own RSP at CPL 0 (the
    // x64 kernel has no red zone; a real interrupt writes there too) or on our stack.
    unsafe { replay_trampoline(handler, rsp, u64::from(kernel_ss), u64::from(kernel_cs)) };
}

/// Loads what `plan` says before a root call (`intr::debug`). The common plan loads nothing.
#[inline(always)]
pub fn load_guest_debug(plan: &super::debug::Plan) {
    if plan.loads_dr7() {
        // SAFETY: the guest's own DR7 (GD clear: MOV-DR exits emulate GD and never leave it set
        // in the shadow), so its breakpoints fire in the guest's handlers this call runs, as
        // they would have without ackvisor; the DR0-3 addresses are the guest's already.
        unsafe { regs::write_dr7(plan.dr7) };
    }
    if let Some(debugctl) = plan.debugctl
        && debugctl != 0
    {
        // SAFETY: the MSR exists (`plan` only names it when the platform has it) and the value
        // is the guest's, accepted by VM entry (`intr::debug::debugctl_write`).
        unsafe { regs::wrmsr(msr::IA32_DEBUGCTL, debugctl) };
    }
}

/// After a root call whose DR7 reads `dr7`: puts the exit's DR7 (and DEBUGCTL, when `plan`
/// touches it) back, so root code outside the call runs without the guest's breakpoints, and
/// returns what the call left in DEBUGCTL.
#[inline(always)]
pub fn take_guest_debug(plan: &super::debug::Plan, dr7: u64) -> Option<u64> {
    if dr7 != DR7_AFTER_EXIT {
        // SAFETY: the value every VM exit loads; disables every breakpoint.
        unsafe { regs::write_dr7(DR7_AFTER_EXIT) };
    }
    match plan.debugctl {
        Some(_) => {
            // SAFETY: the MSR exists (`plan` names it only then).
            let now = unsafe { regs::rdmsr(msr::IA32_DEBUGCTL) };
            if now != 0 {
                // SAFETY: 0 is what every VM exit loads.
                unsafe { regs::wrmsr(msr::IA32_DEBUGCTL, 0) };
            }
            Some(now)
        }
        None => None,
    }
}
