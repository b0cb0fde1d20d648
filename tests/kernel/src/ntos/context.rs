//! Switching between contexts on one CPU and across CPUs: the callee-saved registers and RSP
//! on the stack being left, then the other context's; IF, CR8 (the IRQL) and the interrupt
//! checks' marks (`percpu`) are restored by the context that resumes, on whichever CPU it
//! resumes. Used by `sched` only, with the dispatcher's guarantee that a saved context is
//! resumed on one CPU at a time.
//!
//! **Runs in:** PASSIVE (threads) and the scheduler contexts, IF=0 across the switch.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::arch;
use crate::percpu::this_cpu;

core::arch::global_asm!(
    ".global ntos_switch",
    "ntos_switch:",
    // rdi = where to save this context's RSP, rsi = the RSP of the context to resume. The
    // System V callee-saved registers go on the stack being left; the win64 image's extra ones
    // (RDI, RSI, XMM6-15) were saved by the win64 routine that led here, on the same stack.
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rdi], rsp",
    "mov rsp, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
);

unsafe extern "C" {
    /// Saves the running context's RSP at `save` and resumes the context whose RSP is `load`.
    fn ntos_switch(save: *mut usize, load: usize);
}

/// Registers `ntos_switch` pops before its RET: r15, r14, r13, r12, rbx, rbp.
const SAVED_REGS: usize = 6;

/// Builds a fresh context on the stack ending at `top` that starts in `entry` (which must not
/// return), and returns its RSP.
pub(super) fn fresh_context(top: usize, entry: extern "C" fn() -> !) -> usize {
    let top = top & !0xF;
    // After the RET pops `entry`, RSP = top - 8, as after a CALL: ≡ 8 (mod 16).
    let frame = (top - 8 - 8 - SAVED_REGS * 8) as *mut usize;
    for i in 0..SAVED_REGS {
        // SAFETY: the words lie inside the stack below `top`, which no context uses yet.
        unsafe { frame.wrapping_add(i).write(0) };
    }
    // SAFETY: as above.
    unsafe { frame.wrapping_add(SAVED_REGS).write(entry as usize) };
    // SAFETY: as above; a null return address ends any backtrace.
    unsafe { frame.wrapping_add(SAVED_REGS + 1).write(0) };
    frame as usize
}

/// Switches from the running context to the one whose RSP is `load`, saving ours at `save`;
/// returns when something switches back to us, possibly on another CPU. IF, CR8 and this
/// context's interrupt marks are restored on the CPU we come back on.
pub(super) fn switch(save: &AtomicUsize, load: usize) {
    let was_enabled = arch::rflags() & arch::RFLAGS_IF != 0;
    arch::cli();
    let cpu = this_cpu();
    let marks = (
        cpu.ctx_if_off.load(Ordering::Relaxed),
        cpu.ctx_cr8.load(Ordering::Relaxed),
    );
    let cr8 = arch::cr8();
    cpu.ctx_if_off.store(true, Ordering::Relaxed);
    // SAFETY: `load` is the RSP a switch saved (or `fresh_context` built) for a context that is
    // not running anywhere: the dispatcher hands each one to one CPU only. IF=0 across it.
    unsafe { ntos_switch(save.as_ptr(), load) };
    let cpu = this_cpu();
    // SAFETY: IF=0: no interrupt sees the CPU between the priority and the marks; this is the
    // IRQL this context had when it left.
    unsafe { arch::set_cr8(cr8) };
    cpu.ctx_cr8.store(marks.1, Ordering::Relaxed);
    cpu.ctx_if_off.store(marks.0, Ordering::Relaxed);
    if was_enabled {
        // SAFETY: interrupts were on when this context left; its state is restored.
        unsafe { arch::sti() };
    }
}
