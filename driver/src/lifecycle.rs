//! The lock that keeps the core's per-CPU state alive while it is read.
//!
//! `ackvisor_vmm::hypervisor` frees a CPU's block when that CPU devirtualizes, and its readers
//! (`cpu_state`, `drain_log`, the control dispatcher) trust the platform to never run alongside
//! that. Every path here that changes or reads the virtualized state takes this lock: load,
//! unload, the power callback, control requests and the log drain.
//!
//! A `KMUTEX` rather than a spin lock: holders wait for every CPU (mode broadcast,
//! virtualization) and run at PASSIVE, where a waiter should sleep, not spin.
//!
//! **Runs in:** PASSIVE.

use core::cell::UnsafeCell;
use core::marker::PhantomData;
use core::ptr;

use wdk_sys::ntddk::{KeInitializeMutex, KeReleaseMutex, KeWaitForSingleObject};
use wdk_sys::{_KWAIT_REASON::Executive, _MODE::KernelMode, KMUTEX};

/// A `KMUTEX` in the driver image's nonpaged data.
pub struct Lifecycle {
    mutex: UnsafeCell<KMUTEX>,
}

// SAFETY: the KMUTEX is only touched through KeInitializeMutex (once, before any other thread
// can see it), KeWaitForSingleObject and KeReleaseMutex, which NT makes safe to call from any
// thread concurrently.
unsafe impl Sync for Lifecycle {}

/// The driver's one instance.
pub static LIFECYCLE: Lifecycle = Lifecycle {
    // SAFETY: KMUTEX is plain data (integers, pointers, list links); all-zero is a valid value
    // of it, and `init` gives it its real initial state before any use.
    mutex: UnsafeCell::new(unsafe { core::mem::zeroed() }),
};

/// Proof that the lifecycle lock is held; releases it when dropped. `!Send`: a KMUTEX is
/// released by the thread that owns it.
pub struct Held(PhantomData<*const ()>);

impl Lifecycle {
    /// Initializes the mutex.
    ///
    /// # Safety
    /// Called once, from `DriverEntry`, before any other routine of this driver can run.
    pub unsafe fn init(&self) {
        // SAFETY: the storage is ours, in nonpaged image data, and nobody uses it yet (caller).
        unsafe { KeInitializeMutex(self.mutex.get(), 0) };
    }

    /// Waits for the lock (PASSIVE or APC level; never from VMX root).
    pub fn lock(&self) -> Held {
        // SAFETY: the mutex was initialized in DriverEntry before any caller could exist; a
        // kernel-mode, non-alertable wait with no timeout on it can only return STATUS_SUCCESS
        // (or STATUS_ABANDONED, which still grants ownership).
        let _ = unsafe {
            KeWaitForSingleObject(
                self.mutex.get().cast(),
                Executive,
                KernelMode as i8,
                0,
                ptr::null_mut(),
            )
        };
        Held(PhantomData)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: a `Held` exists only while this thread owns the mutex (`lock`), and is
        // dropped on the thread that took it (it is neither `Send` nor `Clone`).
        unsafe { KeReleaseMutex(LIFECYCLE.mutex.get(), 0) };
    }
}
