//! Ring-3 excursions: run a few instructions at CPL 3 and come back when they fault.
//!
//! `enter` saves the callee-saved registers and its RSP in the per-CPU `UserEscape`, then IRETQs
//! to ring 3 (USER_CS/USER_DS, IF=0, so no interrupt is taken there). The first exception from
//! CPL 3 makes `exception_dispatch` record vector/RIP/RAX and IRETQ to `user_return` in ring 0
//! on the saved stack. Ring 3 can reach the kernel's code and its stack because boot.rs maps
//! everything with U=1 (and CR4.SMEP/SMAP are off).
//!
//! **Runs in:** PASSIVE, CPL 0 → 3 → 0.

use core::sync::atomic::Ordering;

use crate::percpu::{self, this_cpu};

core::arch::global_asm!(
    r#"
.section .text.user, "ax", @progbits
.global user_enter
user_enter:                       // (rip = rdi, rsp = rsi, rax = rdx, rcx = rcx, rdx = r8,
                                  //  rflags = r9)
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov gs:[{kernel_rsp}], rsp
    push {user_ds}                // SS
    push rsi                      // RSP
    push r9                       // RFLAGS
    push {user_cs}                // CS
    push rdi                      // RIP
    mov rax, rdx
    mov rdx, r8
    iretq
.global user_return
user_return:                      // from exception_dispatch, CPL 0, RSP = saved kernel RSP
    mov qword ptr gs:[{kernel_rsp}], 0
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

.global user_spin
user_spin:                        // ring 3, IF=1: count RCX down while interrupts arrive
    dec rcx
    jnz user_spin
.global user_spin_done
user_spin_done:
    ud2                           // leave through #UD

.global user_vmcall_probe
user_vmcall_probe:                // ring 3: a VMCALL must fault (#UD) right here
    vmcall
.global user_after_vmcall
user_after_vmcall:                // reached only if the VMCALL returned: leave through #UD
    ud2
.text
"#,
    kernel_rsp = const core::mem::offset_of!(percpu::Cpu, user) + core::mem::offset_of!(percpu::UserEscape, kernel_rsp),
    user_ds = const percpu::USER_DS as u32,
    user_cs = const percpu::USER_CS as u32,
);

unsafe extern "sysv64" {
    fn user_enter(rip: u64, rsp: u64, rax: u64, rcx: u64, rdx: u64, rflags: u64);
    static user_spin: u8;
    static user_spin_done: u8;
    static user_return: u8;
    static user_vmcall_probe: u8;
    static user_after_vmcall: u8;
}

/// Where `exception_dispatch` sends the CPU back to ring 0.
pub fn return_address() -> u64 {
    &raw const user_return as u64
}

#[repr(C, align(16))]
struct UserStack(core::cell::UnsafeCell<[u8; 4096]>);
// SAFETY: only ring 3 writes a stack, on the CPU that owns it; Rust never reads them.
unsafe impl Sync for UserStack {}
static USER_STACKS: [UserStack; percpu::MAX_CPUS] =
    [const { UserStack(core::cell::UnsafeCell::new([0; 4096])) }; percpu::MAX_CPUS];

/// RFLAGS of the VMCALL probe: reserved bit 1, IF=0 (nothing but the probe's fault arrives).
const RFLAGS_RING3_QUIET: u64 = 0x2;

fn user_stack_top() -> u64 {
    let stack = &USER_STACKS[this_cpu().index.load(Ordering::Relaxed) as usize];
    stack.0.get() as u64 + 4096 - 16
}

/// Spins `iterations` loop turns at CPL 3 with IF=1, so interrupts arrive from user mode (the
/// core must then build a replay frame on its own stack, DESIGN §3.4). Returns whether the
/// excursion ended where it should (the UD2 after the loop).
pub fn spin_in_ring3(iterations: u64) -> bool {
    let cpu = this_cpu();
    let was_enabled = crate::arch::rflags() & crate::arch::RFLAGS_IF != 0;
    // SAFETY: as in `vmcall_from_ring3`; IF=1 in ring 3 lets interrupts in, and the entry from
    // CPL 3 takes TSS.RSP0 then this CPU's ISR stack, which is idle (no handler is running).
    unsafe {
        user_enter(
            &raw const user_spin as u64,
            user_stack_top(),
            0,
            iterations.max(1),
            0,
            RFLAGS_RING3_QUIET | crate::arch::RFLAGS_IF,
        )
    };
    if was_enabled {
        // SAFETY: the caller had IF=1; `user_return` comes back with IF=0.
        unsafe { crate::arch::sti() };
    }
    cpu.user.rip.load(Ordering::Relaxed) == &raw const user_spin_done as u64
}

/// How a ring-3 VMCALL ended.
#[derive(Clone, Copy, Debug)]
pub struct UserVmcall {
    /// Exception vector that ended the excursion.
    pub vector: u64,
    /// True when it faulted on the VMCALL itself (false: the VMCALL returned).
    pub at_vmcall: bool,
    /// RAX after a VMCALL that returned.
    pub rax: u64,
}

/// Runs `vmcall` at CPL 3 with these registers.
pub fn vmcall_from_ring3(rax: u64, rcx: u64, rdx: u64) -> UserVmcall {
    let cpu = this_cpu();
    let top = user_stack_top();
    let (probe, after) = (
        &raw const user_vmcall_probe as u64,
        &raw const user_after_vmcall as u64,
    );
    let _off = crate::interrupts::IrqOff::enter();
    // SAFETY: `user_enter` returns through `user_return` once ring 3 faults (it always does:
    // the probe ends in UD2); the per-CPU escape state is set by the asm itself.
    unsafe { user_enter(probe, top, rax, rcx, rdx, RFLAGS_RING3_QUIET) };
    let rip = cpu.user.rip.load(Ordering::Relaxed);
    UserVmcall {
        vector: cpu.user.vector.load(Ordering::Relaxed),
        at_vmcall: rip == probe,
        rax: if rip == after {
            cpu.user.rax.load(Ordering::Relaxed)
        } else {
            0
        },
    }
}

core::arch::global_asm!(
    r#"
.section .text.probe, "ax", @progbits
.global probe_vmcall
probe_vmcall:                     // (rax = rdi, rcx = rsi, rdx = rdx) -> rax
    mov rax, rdi
    mov rcx, rsi
.global probe_vmcall_insn
probe_vmcall_insn:
    vmcall
.global probe_vmcall_resume
probe_vmcall_resume:
    ret
.text
"#
);

unsafe extern "sysv64" {
    fn probe_vmcall(rax: u64, rcx: u64, rdx: u64) -> u64;
    static probe_vmcall_insn: u8;
    static probe_vmcall_resume: u8;
}

/// Runs a VMCALL at CPL 0, expecting it may fault: returns `Err(vector)` if it did, else RAX.
pub fn vmcall_expecting_fault(rax: u64, rcx: u64, rdx: u64) -> Result<u64, u64> {
    let cpu = this_cpu();
    let (insn, resume) = (
        &raw const probe_vmcall_insn as u64,
        &raw const probe_vmcall_resume as u64,
    );
    cpu.recovery.vector_plus_one.store(0, Ordering::Relaxed);
    cpu.recovery.resume_rip.store(resume, Ordering::Relaxed);
    cpu.recovery.fault_rip.store(insn, Ordering::Relaxed);
    // SAFETY: a fault on the VMCALL resumes at its `ret` (registered above); otherwise the
    // hypervisor returns normally.
    let rax_out = unsafe { probe_vmcall(rax, rcx, rdx) };
    cpu.recovery.fault_rip.store(0, Ordering::Relaxed);
    match cpu.recovery.vector_plus_one.load(Ordering::Relaxed) {
        0 => Ok(rax_out),
        v => Err(v - 1),
    }
}
