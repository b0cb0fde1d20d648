//! System threads and their handles: `PsCreateSystemThread` makes a ready thread on the
//! scheduler (`sched`) with its own 24 KiB stack, which runs as soon as its CPU's running thread
//! waits, yields or moves; `PsTerminateSystemThread` (or returning from the start routine) ends
//! it, and its thread object becomes signaled. Handles and object references are counted per
//! thread, and the slot is reused once the thread ended and nothing refers to it.
//!
//! Simplification: a kernel handle names a thread slot directly (there is no handle table, and
//! only thread handles exist).
//!
//! **Runs in:** PASSIVE.

use core::ffi::c_void;
use core::sync::atomic::Ordering;

use super::exports::irql_check;
use super::routines::BOOKS;
use super::sched;

const STATUS_SUCCESS: i32 = 0;
const STATUS_INVALID_PARAMETER: i32 = 0xC000_000D_u32 as i32;
const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32 as i32;

/// Kernel handles have the top bit set; the slot is in bits 2.. (handles are multiples of 4).
const HANDLE_BASE: usize = 0xFFFF_FFFF_8000_0000;

/// The thread slot a handle names (None for anything that is not a live thread's handle).
pub fn slot_of_handle(handle: usize) -> Option<usize> {
    let i = handle.checked_sub(HANDLE_BASE)? / 4;
    (handle.is_multiple_of(4) && i > 0 && i < sched::SLOTS && sched::exists(i)).then_some(i)
}

/// The thread object a handle names.
pub fn object_of(handle: usize) -> Option<*mut c_void> {
    slot_of_handle(handle).map(sched::object)
}

/// `PsCreateSystemThread(ThreadHandle, DesiredAccess, ObjectAttributes, ProcessHandle,
/// ClientId, StartRoutine, StartContext)`: PASSIVE. The new thread is ready on the caller's CPU.
pub extern "win64" fn ps_create_system_thread(
    handle: *mut usize,
    _access: u32,
    _attributes: *const c_void,
    _process: usize,
    _client_id: *mut c_void,
    start: usize,
    context: usize,
) -> i32 {
    irql_check("PsCreateSystemThread", 0);
    if super::fault::fails("PsCreateSystemThread") {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    create_system_thread(handle, start, context)
}

/// PsCreateSystemThread without the IRQL check and the fault injection, for this kernel's own
/// checks (`sched_check`): their calls must not shift the image's call numbers that
/// `nt-refusals` fails on.
pub fn create_system_thread(handle: *mut usize, start: usize, context: usize) -> i32 {
    if handle.is_null() || start == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    let Some(slot) = sched::create(start, context) else {
        return STATUS_INSUFFICIENT_RESOURCES;
    };
    BOOKS.threads.fetch_add(1, Ordering::AcqRel);
    BOOKS.handles.fetch_add(1, Ordering::AcqRel);
    // SAFETY: the caller's out-param (checked non-null).
    unsafe { handle.write(HANDLE_BASE + slot * 4) };
    STATUS_SUCCESS
}

/// `PsTerminateSystemThread(ExitStatus)`: PASSIVE, from a system thread; does not return.
/// Simplified: the exit status is dropped (nothing here queries a thread's exit status).
/// Called from anything else (the BSP's initial thread) it fails, as NT's does.
pub extern "win64" fn ps_terminate_system_thread(_status: i32) -> i32 {
    irql_check("PsTerminateSystemThread", 0);
    match sched::current() {
        Some(slot) if slot > 0 => sched::exit_current(),
        _ => STATUS_INVALID_PARAMETER,
    }
}
