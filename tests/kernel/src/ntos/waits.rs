//! Waits on dispatcher objects (events, mutexes, threads) for the scheduler's threads (`sched`):
//! a wait that cannot be satisfied blocks the thread, and its CPU runs another. Waits are
//! satisfied by the signaller (KeSetEvent, KeReleaseMutex, a thread's end) under the dispatcher
//! lock, so a synchronization event releases exactly one waiter and a mutex is handed to exactly
//! one; a timeout is noticed by the waiter's CPU when its scheduler looks (`sched::pick`).
//!
//! Simplification: waiters are woken in thread-slot order, not NT's FIFO order of the wait list.
//!
//! **Runs in:** PASSIVE (waits), IRQL ≤ DISPATCH (signals), any CPU.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::sync::atomic::Ordering;

use super::sched::{
    LEAVE_BLOCK, Lock, READY, THREADS, WAITING, current, current_object, leave, wake_cpu,
};
use crate::arch;

/// NT's status codes the waits return.
pub const STATUS_SUCCESS: i32 = 0;
/// See [`STATUS_SUCCESS`].
pub const STATUS_TIMEOUT: i32 = 0x102;
/// A wait the miniature NT cannot carry out (see [`wait`]).
pub const STATUS_INVALID_PARAMETER: i32 = 0xC000_000D_u32 as i32;
/// A wait on something that is no dispatcher object.
pub const STATUS_OBJECT_TYPE_MISMATCH: i32 = 0xC000_0024_u32 as i32;

/// DISPATCHER_HEADER.Type values (wdm.h's KOBJECTS).
pub const EVENT_NOTIFICATION: u8 = 0;
/// See [`EVENT_NOTIFICATION`].
pub const EVENT_SYNCHRONIZATION: u8 = 1;
/// See [`EVENT_NOTIFICATION`].
pub const MUTANT: u8 = 2;
/// See [`EVENT_NOTIFICATION`].
pub const THREAD: u8 = 6;

/// Bochs's TSC counts one tick per emulated instruction, and the runner runs the machine at 50
/// million instructions per emulated second (`IPS` in the runner's library): 5 ticks per 100 ns.
const TSC_TICKS_PER_100NS: u64 = 5;

/// A notification event nobody sets: what [`sleep`] waits on.
struct Never(UnsafeCell<[u64; 3]>);
// SAFETY: only `wait` touches it, under the dispatcher lock.
unsafe impl Sync for Never {}
static NEVER: Never = Never(UnsafeCell::new([EVENT_NOTIFICATION as u64, 0, 0]));

/// The running thread sleeps `ticks` TSC ticks (a wait that times out), so its CPU runs its
/// other threads meanwhile.
pub fn sleep(ticks: u64) {
    let _ = wait(
        NEVER.0.get().cast(),
        Timeout::At(arch::rdtsc().saturating_add(ticks)),
    );
}

/// A dispatcher header.
///
/// # Safety
/// `object` points at a dispatcher object the caller may access (under the lock).
pub(super) unsafe fn header<'a>(
    object: *mut c_void,
) -> &'a mut windows_sys::Wdk::Foundation::DISPATCHER_HEADER {
    // SAFETY: caller's duty.
    unsafe { &mut *object.cast() }
}

/// `OwnerThread` of a KMUTEX.
fn owner_of(mutex: *mut c_void) -> *mut c_void {
    // SAFETY: a KMUTEX (the caller's contract), read under the lock.
    unsafe { (*mutex.cast::<super::layout::KMUTEX>()).OwnerThread.cast() }
}

fn set_owner(mutex: *mut c_void, owner: *mut c_void) {
    // SAFETY: as `owner_of`.
    unsafe { (*mutex.cast::<super::layout::KMUTEX>()).OwnerThread = owner.cast() };
}

/// Satisfies a wait of `thread` on `object` now if its state allows, taking the object if that
/// is its type's rule. None when `object` is no dispatcher object this kernel knows.
/// Call under the lock.
fn try_acquire(object: *mut c_void, thread: *mut c_void) -> Option<bool> {
    // SAFETY: a dispatcher object (the caller's contract); under the lock.
    let h = unsafe { header(object) };
    // SAFETY: Type is the header's first byte.
    let kind = unsafe { object.cast::<u8>().read() };
    let state = h.SignalState;
    match kind {
        EVENT_NOTIFICATION | THREAD => Some(state > 0),
        EVENT_SYNCHRONIZATION => {
            if state > 0 {
                h.SignalState = 0;
            }
            Some(state > 0)
        }
        // NT's rule: free (state 1), or already owned by this thread (recursion: state goes
        // down once per acquisition, up once per release).
        MUTANT => {
            if state > 0 || owner_of(object) == thread {
                h.SignalState = state - 1;
                set_owner(object, thread);
                Some(true)
            } else {
                Some(false)
            }
        }
        _ => None,
    }
}

/// Wakes the threads waiting on `object` that its new state satisfies, in slot order: every
/// waiter of a notification event or an ended thread, one of a synchronization event or a
/// mutex. Call under the lock.
pub(super) fn satisfy_waiters(object: *mut c_void) {
    for (slot, t) in THREADS.iter().enumerate() {
        if t.state.load(Ordering::Acquire) != WAITING
            || t.wait_object.load(Ordering::Acquire) != object as usize
        {
            continue;
        }
        if try_acquire(object, super::sched::object(slot)) != Some(true) {
            break;
        }
        t.wait_object.store(0, Ordering::Release);
        t.deadline.store(0, Ordering::Release);
        t.wait_status.store(STATUS_SUCCESS, Ordering::Release);
        t.state.store(READY, Ordering::Release);
        wake_cpu(t.cpu.load(Ordering::Acquire) as usize);
    }
}

/// A wait's timeout: NT's LARGE_INTEGER in 100 ns units, negative = relative. Absolute times
/// (positive) count from boot here (the miniature NT's system time starts at 0).
#[derive(Clone, Copy)]
pub enum Timeout {
    /// No timeout.
    Never,
    /// The TSC value at which the wait gives up (0 timeouts: now).
    At(u64),
}

impl Timeout {
    /// From a `PLARGE_INTEGER` value (None: null pointer).
    pub fn from_nt(value: Option<i64>) -> Timeout {
        match value {
            None => Timeout::Never,
            Some(v) if v < 0 => Timeout::At(
                arch::rdtsc().saturating_add(v.unsigned_abs().saturating_mul(TSC_TICKS_PER_100NS)),
            ),
            Some(v) => Timeout::At((v as u64).saturating_mul(TSC_TICKS_PER_100NS)),
        }
    }
}

/// Waits for `object` (KeWaitForSingleObject's rules): returns STATUS_SUCCESS once the wait is
/// satisfied, STATUS_TIMEOUT when the timeout passed first. The running thread blocks, letting
/// its CPU run other threads; a scheduler context (no thread) cannot block and only polls.
pub fn wait(object: *mut c_void, timeout: Timeout) -> i32 {
    if object.is_null() {
        return STATUS_INVALID_PARAMETER;
    }
    let Some(slot) = current() else {
        return wait_polling(object, timeout);
    };
    let t = &THREADS[slot];
    {
        let _lock = Lock::take();
        match try_acquire(object, super::sched::object(slot)) {
            None => return STATUS_OBJECT_TYPE_MISMATCH,
            Some(true) => return STATUS_SUCCESS,
            Some(false) => {}
        }
        let deadline = match timeout {
            Timeout::Never => 0,
            Timeout::At(at) if arch::rdtsc() >= at => return STATUS_TIMEOUT,
            // 0 means "never" in the thread's record.
            Timeout::At(at) => at.max(1),
        };
        t.wait_object.store(object as usize, Ordering::Release);
        t.deadline.store(deadline, Ordering::Release);
        t.wait_status.store(STATUS_TIMEOUT, Ordering::Release);
        t.state.store(WAITING, Ordering::Release);
    }
    leave(LEAVE_BLOCK);
    t.wakeups.fetch_add(1, Ordering::AcqRel);
    t.wait_status.load(Ordering::Acquire)
}

/// A wait outside any thread: polls until satisfied or timed out (a deadlock without timeout
/// ends the run). Not NT behaviour; only the kernel's own code could get here.
fn wait_polling(object: *mut c_void, timeout: Timeout) -> i32 {
    loop {
        {
            let _lock = Lock::take();
            match try_acquire(object, core::ptr::null_mut()) {
                None => return STATUS_OBJECT_TYPE_MISMATCH,
                Some(true) => return STATUS_SUCCESS,
                Some(false) => {}
            }
        }
        match timeout {
            Timeout::At(at) if arch::rdtsc() >= at => return STATUS_TIMEOUT,
            Timeout::At(_) => core::hint::spin_loop(),
            Timeout::Never => super::exports::unimplemented_deadlock("wait_outside_a_thread"),
        }
    }
}

/// Sets `event` and wakes what that satisfies; returns the previous state (KeSetEvent).
pub fn set_event(event: *mut c_void) -> i32 {
    let _lock = Lock::take();
    // SAFETY: an initialized KEVENT (the caller's contract), under the lock.
    let h = unsafe { header(event) };
    let previous = h.SignalState;
    h.SignalState = 1;
    satisfy_waiters(event);
    previous
}

/// Why a mutex release was refused.
pub enum ReleaseError {
    /// The mutex was not held.
    NotHeld,
    /// Another thread holds it.
    NotOwner,
}

/// Releases `mutex` once for the running thread (KeReleaseMutex); hands it to a waiter when it
/// becomes free. Returns the previous state.
pub fn release_mutex(mutex: *mut c_void) -> Result<i32, ReleaseError> {
    let me = current_object().unwrap_or(core::ptr::null_mut());
    let _lock = Lock::take();
    // SAFETY: an initialized KMUTEX (the caller's contract), under the lock.
    let h = unsafe { header(mutex) };
    let state = h.SignalState;
    if state >= 1 {
        return Err(ReleaseError::NotHeld);
    }
    if owner_of(mutex) != me {
        return Err(ReleaseError::NotOwner);
    }
    h.SignalState = state + 1;
    if state + 1 == 1 {
        set_owner(mutex, core::ptr::null_mut());
        satisfy_waiters(mutex);
    }
    Ok(state)
}
