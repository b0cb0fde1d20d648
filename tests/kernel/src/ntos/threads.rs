//! System threads without a scheduler: `PsCreateSystemThread` records the start routine; the
//! thread runs, on its own stack and to its end, the first time anyone waits on it
//! ([`wait_thread`]). `PsTerminateSystemThread` (or returning from the start routine) switches
//! back to the waiter. That is enough for ackvisor's one worker, which is only waited for at
//! unload, after its stop event is set (see `routines`' module comment).
//!
//! **Runs in:** PASSIVE, one CPU.

use core::ffi::c_void;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use super::exports::irql_check;
use super::routines::BOOKS;

const STATUS_SUCCESS: i32 = 0;
const STATUS_INVALID_PARAMETER: i32 = 0xC000_000D_u32 as i32;
const STATUS_INSUFFICIENT_RESOURCES: i32 = 0xC000_009A_u32 as i32;

/// Threads the image may have at once.
const SLOTS: usize = 2;
/// Each thread's stack (NT's kernel stacks are 24 KiB).
const STACK_BYTES: usize = 24 * 1024;
/// Kernel handles have the top bit set; the slot is in bits 2.. (handles are multiples of 4).
const HANDLE_BASE: usize = 0xFFFF_FFFF_8000_0000;

const FREE: u8 = 0;
const CREATED: u8 = 1;
const RUNNING: u8 = 2;
const DONE: u8 = 3;

/// One thread: a dispatcher header first (the object the image waits on), then our state.
#[repr(C, align(16))]
struct Thread {
    header: [u64; 3],
    start: AtomicUsize,
    context: AtomicUsize,
    state: AtomicU8,
    /// The waiter's stack pointer while the thread runs (restored by its exit).
    saved_rsp: AtomicUsize,
}

struct Stacks(core::cell::UnsafeCell<[[u8; STACK_BYTES]; SLOTS]>);
// SAFETY: each stack belongs to its slot's thread while it runs; only one runs at a time.
unsafe impl Sync for Stacks {}

#[repr(align(16))]
struct Aligned(Stacks);

static STACKS: Aligned = Aligned(Stacks(core::cell::UnsafeCell::new(
    [[0; STACK_BYTES]; SLOTS],
)));

/// Type byte 6 (ThreadObject) in the header's first byte; not signaled.
const THREAD_HEADER: u64 = 6;

static THREADS: [Thread; SLOTS] = [const {
    Thread {
        header: [THREAD_HEADER, 0, 0],
        start: AtomicUsize::new(0),
        context: AtomicUsize::new(0),
        state: AtomicU8::new(FREE),
        saved_rsp: AtomicUsize::new(0),
    }
}; SLOTS];

core::arch::global_asm!(
    ".global ntos_thread_run",
    "ntos_thread_run:",
    // rdi = start routine (win64), rsi = its context, rdx = stack top, rcx = where to save rsp.
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rcx], rsp",
    "mov r12, rcx",
    "mov rsp, rdx",
    "sub rsp, 32",
    "mov rcx, rsi",
    "call rdi",
    "mov rdi, r12",
    ".global ntos_thread_exit",
    "ntos_thread_exit:",
    // rdi = where the waiter's rsp was saved.
    "mov rsp, [rdi]",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
);

unsafe extern "C" {
    /// Runs `start(context)` on the stack ending at `stack_top` until it returns or calls
    /// [`ntos_thread_exit`] with `save`.
    fn ntos_thread_run(start: usize, context: usize, stack_top: usize, save: *const AtomicUsize);
    /// Abandons the running thread's stack and returns from its [`ntos_thread_run`].
    fn ntos_thread_exit(save: *const AtomicUsize) -> !;
}

fn slot_of_handle(handle: usize) -> Option<usize> {
    let i = handle.checked_sub(HANDLE_BASE)? / 4;
    (handle.is_multiple_of(4) && i < SLOTS && THREADS[i].state.load(Ordering::Acquire) != FREE)
        .then_some(i)
}

/// The thread object a handle names.
pub fn object_of(handle: usize) -> Option<*mut c_void> {
    slot_of_handle(handle).map(|i| core::ptr::from_ref(&THREADS[i]).cast_mut().cast())
}

/// `PsCreateSystemThread(ThreadHandle, DesiredAccess, ObjectAttributes, ProcessHandle,
/// ClientId, StartRoutine, StartContext)`: PASSIVE. The thread starts when first waited on.
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
    if handle.is_null() || start == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    let Some(i) = THREADS.iter().position(|t| {
        t.state
            .compare_exchange(FREE, CREATED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }) else {
        return STATUS_INSUFFICIENT_RESOURCES;
    };
    THREADS[i].start.store(start, Ordering::Release);
    THREADS[i].context.store(context, Ordering::Release);
    BOOKS.threads.fetch_add(1, Ordering::AcqRel);
    BOOKS.handles.fetch_add(1, Ordering::AcqRel);
    // SAFETY: the caller's out-param (checked non-null).
    unsafe { handle.write(HANDLE_BASE + i * 4) };
    STATUS_SUCCESS
}

/// A wait on the thread object `object`: runs the thread if it has not run; true once it has
/// ended (a thread object is signaled when its thread ends).
pub fn wait_thread(object: *mut c_void) -> bool {
    let Some(t) = THREADS
        .iter()
        .find(|t| core::ptr::from_ref(*t).cast::<c_void>() == object.cast_const())
    else {
        return false;
    };
    match t.state.load(Ordering::Acquire) {
        DONE => return true,
        CREATED => {}
        _ => return false,
    }
    t.state.store(RUNNING, Ordering::Release);
    let i = THREADS
        .iter()
        .position(|x| core::ptr::eq(x, t))
        .unwrap_or(0);
    // SAFETY: the slot's stack, unused while the thread is not running.
    let stack = unsafe { (*STACKS.0.0.get())[i].as_mut_ptr_range().end } as usize;
    // SAFETY: `start` is the image's KSTART_ROUTINE (win64); the stack is 16-aligned and unused;
    // the thread ends through ntos_thread_exit with this slot's save area or by returning.
    unsafe {
        ntos_thread_run(
            t.start.load(Ordering::Acquire),
            t.context.load(Ordering::Acquire),
            stack & !0xF,
            &t.saved_rsp,
        )
    };
    t.state.store(DONE, Ordering::Release);
    BOOKS.threads.fetch_sub(1, Ordering::AcqRel);
    true
}

/// `PsTerminateSystemThread(ExitStatus)`: PASSIVE, from a system thread; does not return.
pub extern "win64" fn ps_terminate_system_thread(_status: i32) -> i32 {
    irql_check("PsTerminateSystemThread", 0);
    let Some(t) = THREADS
        .iter()
        .find(|t| t.state.load(Ordering::Acquire) == RUNNING)
    else {
        return STATUS_INVALID_PARAMETER;
    };
    // SAFETY: the running thread was started by ntos_thread_run with this save area, whose
    // frame (on the waiter's stack) is live below.
    unsafe { ntos_thread_exit(&t.saved_rsp) }
}
