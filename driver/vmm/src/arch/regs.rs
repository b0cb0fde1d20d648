//! One-instruction register accessors the x86 crate lacks (CR8, ...).
//!
//! **Runs in:** anywhere at CPL 0.

/// Reads CR8 (the task-priority class, = IRQL on x64).
#[inline(always)]
pub fn cr8() -> u8 {
    let v: u64;
    // SAFETY: reading CR8 has no side effects; this crate only runs at CPL 0.
    unsafe { core::arch::asm!("mov {}, cr8", out(reg) v, options(nomem, nostack, preserves_flags)) };
    (v & 0xF) as u8
}

/// Raises CR8 to `to` if it is lower; returns the previous value.
#[inline(always)]
pub fn raise_cr8(to: u8) -> u8 {
    let old = cr8();
    if old < to {
        // SAFETY: raising the task priority only masks interrupts; it cannot break memory.
        unsafe { set_cr8(to) };
    }
    old
}

/// Puts CR8 back to `to` (a value [`raise_cr8`] returned).
#[inline(always)]
pub fn lower_cr8(to: u8) {
    if cr8() != to {
        // SAFETY: restores the caller's own earlier task priority.
        unsafe { set_cr8(to) };
    }
}

/// Writes CR8.
///
/// # Safety
/// Lowering CR8 lets interrupts of lower classes in: the caller must be ready for them.
#[inline(always)]
pub unsafe fn set_cr8(v: u8) {
    // SAFETY: caller's duty (see above).
    unsafe {
        core::arch::asm!("mov cr8, {}", in(reg) u64::from(v & 0xF), options(nomem, nostack, preserves_flags))
    };
}
