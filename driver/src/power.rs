//! Sleep and hibernation: devirtualize before S3/S4, virtualize again on the way back to S0
//! (DESIGN §5). A CPU that sleeps loses VMX operation with its state; without this, the first
//! hypercall after resume (unload, a mode change) would #UD.
//!
//! NT announces both transitions through the `\Callback\PowerState` callback object with
//! `Argument1 = PO_CB_SYSTEM_STATE_LOCK`: `Argument2` is 0 just before the system leaves S0 and
//! 1 once it is back (HyperPlatform handles the same pair).
//!
//! **Runs in:** PASSIVE (the power manager's thread).

use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use ackvisor_vmm::sleep;
use wdk_sys::ntddk::{
    ExCreateCallback, ExRegisterCallback, ExUnregisterCallback, ObfDereferenceObject,
};
use wdk_sys::{
    NT_SUCCESS, NTSTATUS, OBJ_CASE_INSENSITIVE, OBJ_KERNEL_HANDLE, OBJECT_ATTRIBUTES,
    PCALLBACK_OBJECT, PO_CB_SYSTEM_STATE_LOCK, PVOID, STATUS_UNSUCCESSFUL,
};

use crate::device::{unicode, utf16};
use crate::lifecycle::LIFECYCLE;
use crate::log_drain;
use crate::nt_platform::{PLATFORM, dbg_line};

const CALLBACK_NAME_STR: &str = "\\Callback\\PowerState";
static CALLBACK_NAME: [u16; CALLBACK_NAME_STR.len()] = utf16(CALLBACK_NAME_STR);

/// The callback object, referenced by ExCreateCallback; null when not registered.
static OBJECT: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());
/// ExRegisterCallback's registration handle.
static REGISTRATION: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());
/// The callback acts only between a successful load and the start of unload.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Registers the callback (disabled until [`enable`]).
pub fn register() -> Result<(), NTSTATUS> {
    let mut name = unicode(&CALLBACK_NAME);
    // SAFETY: OBJECT_ATTRIBUTES is plain data; all-zero is valid, the fields are set below.
    let mut attributes: OBJECT_ATTRIBUTES = unsafe { core::mem::zeroed() };
    attributes.Length = size_of::<OBJECT_ATTRIBUTES>() as u32;
    attributes.ObjectName = &mut name;
    attributes.Attributes = OBJ_CASE_INSENSITIVE | OBJ_KERNEL_HANDLE;
    let mut object: PCALLBACK_OBJECT = ptr::null_mut();
    // SAFETY: at PASSIVE; `attributes` names the existing \Callback\PowerState object
    // (Create = FALSE opens it), and `object` receives a referenced pointer.
    let status = unsafe { ExCreateCallback(&mut object, &mut attributes, 0, 1) };
    if !NT_SUCCESS(status) {
        return Err(status);
    }
    // SAFETY: `object` is the referenced callback object; `on_power_state` has the
    // CALLBACK_FUNCTION signature and needs no context.
    let registration = unsafe { ExRegisterCallback(object, Some(on_power_state), ptr::null_mut()) };
    if registration.is_null() {
        // SAFETY: drops the reference ExCreateCallback took, once.
        unsafe { ObfDereferenceObject(object.cast()) };
        return Err(STATUS_UNSUCCESSFUL);
    }
    OBJECT.store(object.cast(), Ordering::Release);
    REGISTRATION.store(registration, Ordering::Release);
    Ok(())
}

/// Unregisters the callback. Call without the lifecycle lock: ExUnregisterCallback waits for a
/// callback in progress, which may be waiting for that lock.
pub fn unregister() {
    let registration = REGISTRATION.swap(ptr::null_mut(), Ordering::AcqRel);
    if !registration.is_null() {
        // SAFETY: the handle came from ExRegisterCallback and is unregistered once.
        unsafe { ExUnregisterCallback(registration) };
    }
    let object = OBJECT.swap(ptr::null_mut(), Ordering::AcqRel);
    if !object.is_null() {
        // SAFETY: drops the reference ExCreateCallback took, once.
        unsafe { ObfDereferenceObject(object) };
    }
}

/// Lets the callback act (end of a successful load; caller holds the lifecycle lock).
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Stops the callback from acting (start of unload; caller holds the lifecycle lock).
pub fn disable() {
    ENABLED.store(false, Ordering::Release);
}

/// The `\Callback\PowerState` routine.
///
/// # Safety
/// Called by NT's callback object at PASSIVE with the power-state arguments.
unsafe extern "C" fn on_power_state(_context: PVOID, argument1: PVOID, argument2: PVOID) {
    if argument1 as usize != PO_CB_SYSTEM_STATE_LOCK as usize {
        return;
    }
    let held = LIFECYCLE.lock();
    if !ENABLED.load(Ordering::Acquire) {
        return;
    }
    // The decisions (try every CPU, reap the dead on wake) are the core's: `sleep`.
    if argument2.is_null() {
        // Leaving S0: keep the last log records, then leave VMX on every CPU.
        log_drain::drain_all(&held);
        let r = sleep::before_sleep();
        let t = r.tally;
        dbg_line!(
            Info,
            "before sleep: {} cpus left VMX, {} failed, {} were not virtualized",
            t.left,
            t.failed,
            t.not_virtualized
        );
        if let Some((cpu, e)) = t.first_failure.or(r.unreachable) {
            dbg_line!(
                Error,
                "cpu {}: devirtualize before sleep failed: {e}",
                cpu.0
            );
        }
    } else {
        let w = sleep::after_wake(&PLATFORM, |cpu| {
            dbg_line!(
                Error,
                "cpu {}: still marked virtualized after wake; its VMX state died with the sleep, block freed",
                cpu.0
            );
        });
        match w.restored {
            Some((mode, Ok(()))) => dbg_line!(Info, "virtualized again after sleep (mode {mode})"),
            Some((_, Err((cpu, e)))) => dbg_line!(
                Error,
                "cpu {}: virtualize after sleep failed, running without the hypervisor: {e}",
                cpu.0
            ),
            None => {}
        }
    }
}
