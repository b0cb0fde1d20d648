//! The PASSIVE worker that prints root mode's log records (DESIGN §4: nothing prints from VMX
//! root; root only appends binary records to its CPU's ring, and this thread formats them).
//!
//! A system thread wakes every [`PERIOD_MS`] ms, or when told to stop, and empties every CPU's
//! ring into DbgPrintEx. Unload and the power callback also drain once more before they
//! devirtualize, since devirtualizing frees the rings.
//!
//! **Runs in:** PASSIVE (its own system thread; `drain_all` on the caller's thread).

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use ackvisor_vmm::CpuIndex;
use ackvisor_vmm::hypervisor::{self, MAX_CPUS};
use ackvisor_vmm::log_ring::{LogKind, Record};
use wdk_sys::ntddk::{
    KeInitializeEvent, KeSetEvent, KeWaitForSingleObject, ObReferenceObjectByHandle,
    ObfDereferenceObject, PsCreateSystemThread, PsTerminateSystemThread, ZwClose,
    ZwWaitForSingleObject,
};
use wdk_sys::{
    _EVENT_TYPE::NotificationEvent, _KWAIT_REASON::Executive, _MODE::KernelMode, HANDLE, KEVENT,
    LARGE_INTEGER, NT_SUCCESS, NTSTATUS, OBJ_KERNEL_HANDLE, OBJECT_ATTRIBUTES, PVOID,
    STATUS_SUCCESS, THREAD_ALL_ACCESS,
};

use crate::lifecycle::{Held, LIFECYCLE};
use crate::nt_platform::{Level, print};
use crate::ntapi;

/// How often the worker looks at the rings (each holds 64 records per CPU).
pub const PERIOD_MS: i64 = 250;

/// The stop request: a notification event the worker waits on between drains.
struct StopEvent(UnsafeCell<KEVENT>);

// SAFETY: the KEVENT is only used through KeInitializeEvent (before the worker exists),
// KeSetEvent and KeWaitForSingleObject, which NT synchronizes.
unsafe impl Sync for StopEvent {}

static STOP: StopEvent = StopEvent(UnsafeCell::new(
    // SAFETY: KEVENT is a dispatcher header of integers and list links; all-zero is a valid
    // value, and KeInitializeEvent sets it up before use.
    unsafe { core::mem::zeroed() },
));

/// The worker's referenced thread object, null when no worker runs.
static THREAD: AtomicPtr<c_void> = AtomicPtr::new(ptr::null_mut());

/// Lost-record counts already reported, per CPU (the core's counts only grow).
static LOST_REPORTED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Starts the worker.
pub fn start() -> Result<(), NTSTATUS> {
    // SAFETY: no worker exists (THREAD is null at load), so nobody waits on the event.
    unsafe { KeInitializeEvent(STOP.0.get(), NotificationEvent, 0) };
    // SAFETY: OBJECT_ATTRIBUTES is plain data; all-zero is valid, the fields are set below.
    let mut attributes: OBJECT_ATTRIBUTES = unsafe { core::mem::zeroed() };
    attributes.Length = size_of::<OBJECT_ATTRIBUTES>() as u32;
    // A kernel handle, so no user process can reach the thread through its handle table.
    attributes.Attributes = OBJ_KERNEL_HANDLE;
    let mut handle: HANDLE = ptr::null_mut();
    // SAFETY: at PASSIVE; `worker` has the KSTART_ROUTINE signature and uses no context; the
    // null process handle and client id ask for a thread in the System process.
    let status = unsafe {
        PsCreateSystemThread(
            &mut handle,
            THREAD_ALL_ACCESS,
            &mut attributes,
            ptr::null_mut(),
            ptr::null_mut(),
            Some(worker),
            ptr::null_mut(),
        )
    };
    if !NT_SUCCESS(status) {
        return Err(status);
    }
    let thread_type = ntapi::thread_object_type();
    let mut thread: PVOID = ptr::null_mut();
    // SAFETY: `handle` is the kernel handle just created, of a thread. The reference keeps the
    // thread object alive until `stop` has waited on it.
    let status = unsafe {
        ObReferenceObjectByHandle(
            handle,
            THREAD_ALL_ACCESS,
            thread_type,
            KernelMode as i8,
            &mut thread,
            ptr::null_mut(),
        )
    };
    if !NT_SUCCESS(status) {
        // Without a reference the worker cannot be waited for at unload, and it must not
        // outlive this image: stop it now and wait through the handle instead.
        // SAFETY: the event was initialized above.
        unsafe { KeSetEvent(STOP.0.get(), 0, 0) };
        // SAFETY: `handle` is a valid kernel handle of the thread; a thread handle is signaled
        // when the thread exits, which it does right after its last drain.
        let _ = unsafe { ZwWaitForSingleObject(handle, 0, ptr::null_mut()) };
    }
    // SAFETY: the handle is ours and closed once; the object reference (if taken) outlives it.
    let _ = unsafe { ZwClose(handle) };
    if !NT_SUCCESS(status) {
        return Err(status);
    }
    THREAD.store(thread, Ordering::Release);
    Ok(())
}

/// Stops the worker and waits until it has exited (it drains once more on its way out).
/// Call without holding the lifecycle lock: the worker takes it to drain.
pub fn stop() {
    let thread = THREAD.swap(ptr::null_mut(), Ordering::AcqRel);
    if thread.is_null() {
        return;
    }
    // SAFETY: the event was initialized in `start`, before THREAD was set.
    unsafe { KeSetEvent(STOP.0.get(), 0, 0) };
    // SAFETY: `thread` is a referenced thread object; a thread object is signaled when the
    // thread exits. No timeout: the worker exits right after its last drain.
    let _ =
        unsafe { KeWaitForSingleObject(thread, Executive, KernelMode as i8, 0, ptr::null_mut()) };
    // SAFETY: drops the reference taken in `start`, once.
    unsafe { ObfDereferenceObject(thread) };
}

/// The worker thread.
///
/// # Safety
/// Started by `PsCreateSystemThread` in `start`, at PASSIVE, with no context.
unsafe extern "C" fn worker(_context: PVOID) {
    // Relative timeout in 100 ns units.
    let mut period = LARGE_INTEGER {
        QuadPart: -PERIOD_MS * 10_000,
    };
    loop {
        // SAFETY: the event was initialized before this thread was created; `period` lives on
        // this stack across the wait.
        let status = unsafe {
            KeWaitForSingleObject(
                STOP.0.get().cast(),
                Executive,
                KernelMode as i8,
                0,
                &mut period,
            )
        };
        drain_all(&LIFECYCLE.lock());
        if status == STATUS_SUCCESS {
            break;
        }
    }
    // SAFETY: ends this system thread (our own, at PASSIVE); it never returns.
    let _ = unsafe { PsTerminateSystemThread(STATUS_SUCCESS) };
}

/// Prints every record root mode has left in every CPU's ring. The lifecycle lock keeps the
/// rings from being freed meanwhile (lifecycle.rs).
pub fn drain_all(_held: &Held) {
    for index in 0..hypervisor::cpu_count() {
        let cpu = CpuIndex(index);
        let Some(lost) = hypervisor::drain_log(cpu, |record| show(cpu, record)) else {
            continue;
        };
        if let Some(reported) = LOST_REPORTED.get(index as usize) {
            let before = reported.swap(lost, Ordering::Relaxed);
            if lost > before {
                print(
                    Level::Error,
                    format_args!(
                        "cpu {index}: {} log records lost (ring full)",
                        lost - before
                    ),
                );
            }
        }
    }
}

/// One record as one line.
fn show(cpu: CpuIndex, r: Record) {
    let level = match r.kind {
        LogKind::Anomaly | LogKind::GateRejected | LogKind::Fatal => Level::Error,
        LogKind::ModeApplied | LogKind::ForeignVmcall => Level::Info,
    };
    print(
        level,
        format_args!(
            "cpu {} tsc {}: {:?} a={:#x} b={:#x}",
            cpu.0, r.tsc, r.kind, r.a, r.b
        ),
    );
}
