//! The C memory functions the prebuilt `core` calls (there is no libc). Written with string
//! instructions in `asm!` so LLVM cannot recognise the loops and turn them back into calls.
//!
//! **Runs in:** anywhere.

/// # Safety
/// C `memcpy` contract: `n` bytes valid at both, no overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller's duty; DF is clear (the ABI guarantees it at calls).
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
            options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
/// C `memmove` contract: `n` bytes valid at both; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if n == 0
        || (dst as usize) <= (src as usize)
        || (dst as usize) >= (src as usize).wrapping_add(n)
    {
        // SAFETY: forward copy is correct when dst is below src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backwards copy from the last byte; DF is set only for this instruction.
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") dst.wrapping_add(n - 1) => _,
            inout("rsi") src.wrapping_add(n - 1) => _, options(nostack))
    };
    dst
}

/// # Safety
/// C `memset` contract: `n` bytes valid at `dst`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: caller's duty.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
            options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
/// C `memcmp` contract: `n` bytes valid at both.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, within both buffers (caller's duty); volatile keeps this a loop.
        let x = unsafe { core::ptr::read_volatile(a.wrapping_add(i)) };
        // SAFETY: as above.
        let y = unsafe { core::ptr::read_volatile(b.wrapping_add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
