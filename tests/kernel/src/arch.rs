//! One-instruction wrappers. Safe only where no argument can break memory or the machine.
//!
//! **Runs in:** anywhere at CPL 0.

use core::arch::asm;

/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must be one whose side effects the caller wants (console, PIC, shutdown).
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: caller's duty.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
///
/// # Safety
/// The port must be one whose read side effects the caller wants (the UART's receive buffer
/// pops a byte).
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: caller's duty.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and the value must not break the kernel's own state.
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: caller's duty.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags))
    };
}

/// CPUID leaf/subleaf.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Time-stamp counter: emulated instructions under Bochs `clock: sync=none` with one CPU.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter; CR4.TSD is clear so it never faults at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Busy-waits `ticks` TSC ticks.
pub fn spin(ticks: u64) {
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < ticks {
        core::hint::spin_loop();
    }
}

/// CR3.
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CR8 (task-priority class).
#[inline(always)]
pub fn cr8() -> u8 {
    let v: u64;
    // SAFETY: reading CR8 has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) };
    (v & 0xF) as u8
}

/// Writes CR8. Not `nomem`: the compiler must not move the marks in `percpu` across it.
///
/// # Safety
/// Lowering CR8 lets lower-class interrupts in: the caller must be ready for them.
#[inline(always)]
pub unsafe fn set_cr8(class: u8) {
    // SAFETY: caller's duty.
    unsafe {
        asm!("mov cr8, {}", in(reg) u64::from(class & 0xF), options(nostack, preserves_flags))
    };
}

/// RFLAGS.
#[inline(always)]
pub fn rflags() -> u64 {
    let v: u64;
    // SAFETY: pushfq/pop only touch the stack slot they use.
    unsafe { asm!("pushfq", "pop {}", out(reg) v, options(preserves_flags)) };
    v
}

/// Clears IF. Not `nomem`: a compiler barrier, so marks written after it stay after it.
#[inline(always)]
pub fn cli() {
    // SAFETY: masking interrupts cannot break memory.
    unsafe { asm!("cli", options(nostack)) };
}

/// Sets IF.
///
/// # Safety
/// Interrupt handlers may run at once: the caller's state must allow that.
#[inline(always)]
pub unsafe fn sti() {
    // SAFETY: caller's duty.
    unsafe { asm!("sti", options(nostack)) };
}

/// Halts until the next interrupt (used only with IF=1 or while shutting down).
#[inline(always)]
pub fn hlt() {
    // SAFETY: HLT waits for an interrupt; it touches no memory.
    unsafe { asm!("hlt", options(nostack)) };
}

/// A descriptor-table register image (SGDT/SIDT/LGDT/LIDT operand).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub struct DescriptorPointer {
    /// Limit (size - 1).
    pub limit: u16,
    /// Linear base.
    pub base: u64,
}
