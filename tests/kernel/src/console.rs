//! Output on Bochs's port 0xE9 (stdout of the Bochs process, flushed per byte) and power-off.
//!
//! **Runs in:** anywhere, VMX root included (only `fatal` prints from root).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::outb;

const E9_PORT: u16 = 0xE9;
/// Bochs's "unmapped" device powers off when it reads "Shutdown" written to this port.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

struct E9;

impl Write for E9 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            // SAFETY: port 0xE9 is Bochs's debug console (port_e9_hack); writing has no other effect.
            unsafe { outb(E9_PORT, b) };
        }
        Ok(())
    }
}

static LOCK: AtomicBool = AtomicBool::new(false);

/// Prints under a lock so lines of different CPUs don't interleave. The wait is bounded: a CPU
/// may hold the lock when a VM exit or an interrupt stops it, and printing is never worth a hang.
pub fn print(args: fmt::Arguments<'_>) {
    let mut spins = 0u32;
    let mut locked = true;
    while LOCK
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
        spins += 1;
        if spins > 5_000_000 {
            locked = false;
            break;
        }
    }
    let _ = E9.write_fmt(args);
    if locked {
        LOCK.store(false, Ordering::Release);
    }
}

/// `print!` to port 0xE9.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// `println!` to port 0xE9.
#[macro_export]
macro_rules! kprintln {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Powers the machine off (Bochs exits; its exit code is always 1, the runner judges output).
pub fn shutdown() -> ! {
    for b in *b"Shutdown" {
        // SAFETY: Bochs's shutdown port; the machine stops here by design.
        unsafe { outb(BOCHS_SHUTDOWN_PORT, b) };
    }
    loop {
        crate::arch::cli();
        crate::arch::hlt();
    }
}
