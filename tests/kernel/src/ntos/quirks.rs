//! Bochs quirks the image meets and NT never would: Bochs raises #GP on RDMSR/WRMSR of
//! IA32_DEBUGCTL (0x1D9), which every VMX-capable Intel CPU has. The test kernel's own platform
//! avoids the read (`platform.rs`, `debugctl`); the image cannot, so the exception handler
//! completes the access here: a read returns the MSR's reset value 0, a write of 0 is accepted.
//! Only accesses from the loaded image are completed; the count is reported.
//!
//! **Runs in:** the exception handler (any IRQL, root mode included).

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// IA32_DEBUGCTL.
const IA32_DEBUGCTL: u64 = 0x1D9;
const GP: u64 = 13;
const RDMSR: [u8; 2] = [0x0F, 0x32];
const WRMSR: [u8; 2] = [0x0F, 0x30];

/// The loaded image's range (start, end), set by the loader's caller.
pub static IMAGE_START: AtomicUsize = AtomicUsize::new(0);
/// See [`IMAGE_START`].
pub static IMAGE_END: AtomicUsize = AtomicUsize::new(0);
/// Accesses completed.
pub static DEBUGCTL_EMULATED: AtomicU64 = AtomicU64::new(0);

/// Completes a faulting IA32_DEBUGCTL access of the image; false when the fault is anything
/// else (the handler then reports it as usual).
pub fn emulate_debugctl(frame: &mut crate::interrupts::ExceptionFrame) -> bool {
    let (vector, rcx) = (frame.vector, frame.rcx);
    let (start, end) = (
        IMAGE_START.load(Ordering::Acquire),
        IMAGE_END.load(Ordering::Acquire),
    );
    let at = frame.rip as usize;
    if vector != GP || rcx & 0xFFFF_FFFF != IA32_DEBUGCTL || at < start || at + 2 > end {
        return false;
    }
    // SAFETY: `at..at + 2` lies inside the loaded image (checked above), which is mapped.
    let bytes = unsafe { (at as *const [u8; 2]).read_unaligned() };
    if bytes == RDMSR {
        frame.rax = 0;
        frame.rdx = 0;
    } else if bytes != WRMSR || frame.rax & 0xFFFF_FFFF != 0 || frame.rdx & 0xFFFF_FFFF != 0 {
        return false;
    }
    frame.rip += 2;
    DEBUGCTL_EMULATED.fetch_add(1, Ordering::Relaxed);
    true
}
