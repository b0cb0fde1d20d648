//! The dispatcher's NT rules checked through the exported routines before the image runs, with
//! threads of this kernel (the image only ever meets some of them): a relative timeout expires
//! on the TSC and no sooner, a zero timeout polls, a synchronization event releases one waiter
//! per set and resets, a notification event releases every waiter and stays set, a mutex is
//! recursive for its owner and handed to one waiter on its last release, a thread object is
//! signaled when its thread ends, and a release of a mutex nobody holds is refused. And group
//! affinity: KeSetSystemGroupAffinityThread moves the calling thread to the last CPU, where
//! KeGetCurrentProcessorNumberEx reports it (group and number too), the revert brings it home,
//! and an affinity naming a CPU that does not exist, or several, is counted as a misuse.
//!
//! One line: `sched_checks` (checks run) and `sched_failed` with the first failure's name.
//!
//! **Runs in:** PASSIVE, on the BSP's initial thread (the check threads run on the BSP).

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use super::layout::{KEVENT, KMUTEX};
use super::routines::{
    BOOKS, ke_initialize_event, ke_initialize_mutex, ke_release_mutex, ke_set_event,
    ke_wait_for_single_object,
};
use super::sched;
use super::waits::{self, STATUS_SUCCESS, STATUS_TIMEOUT, Timeout};
use crate::arch;
use crate::report::Line;

/// KeInitializeEvent's types.
const NOTIFICATION: u32 = 0;
const SYNCHRONIZATION: u32 = 1;
/// 1 ms in NT's relative 100 ns units.
const ONE_MS_RELATIVE: i64 = -10_000;
/// 1 ms of Bochs TSC ticks at the runner's 50 million instructions per second.
const ONE_MS_TICKS: u64 = 50_000;
/// How long the checking thread sleeps to let the check threads run (they only need a turn).
const SETTLE_TICKS: u64 = 20_000;

struct Cell<T>(UnsafeCell<T>);
// SAFETY: touched only through the dispatcher routines (which synchronize) and by the checking
// thread before the check threads exist.
unsafe impl<T> Sync for Cell<T> {}

static EVENT: Cell<KEVENT> = Cell(UnsafeCell::new(
    // SAFETY: KEVENT is integers and list links: zero is valid.
    unsafe { core::mem::zeroed() },
));
static MUTEX: Cell<KMUTEX> = Cell(UnsafeCell::new(
    // SAFETY: KMUTEX is integers, pointers and list links: zero is valid.
    unsafe { core::mem::zeroed() },
));

fn event() -> *mut KEVENT {
    EVENT.0.get()
}
fn mutex() -> *mut KMUTEX {
    MUTEX.0.get()
}
fn signal_state(object: *mut c_void) -> i32 {
    // SAFETY: a dispatcher object of this module; SignalState is an aligned i32 at offset 4.
    unsafe { (*object.cast::<windows_sys::Wdk::Foundation::DISPATCHER_HEADER>()).SignalState }
}

/// Waiters that returned STATUS_SUCCESS from their wait on EVENT.
static WOKEN: AtomicU32 = AtomicU32::new(0);
/// The mutex taker's thread object once it held the mutex (as its owner).
static TAKER_OWNED: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

fn wait(object: *mut c_void, timeout: Option<i64>) -> i32 {
    let t = timeout.unwrap_or(0);
    let p = if timeout.is_some() {
        &raw const t
    } else {
        core::ptr::null()
    };
    ke_wait_for_single_object(object, 0, 0, 0, p)
}

extern "win64" fn event_waiter(_context: usize) {
    if wait(event().cast(), None) == STATUS_SUCCESS {
        WOKEN.fetch_add(1, Ordering::AcqRel);
    }
}

extern "win64" fn mutex_taker(_context: usize) {
    if wait(mutex().cast(), None) == STATUS_SUCCESS {
        // SAFETY: this thread holds the mutex, so its owner field is stable.
        let owner = unsafe { (*mutex()).OwnerThread }.cast::<c_void>();
        if Some(owner) == sched::current_object() {
            TAKER_OWNED.store(owner, Ordering::Release);
        }
        ke_release_mutex(mutex(), 0);
    }
}

/// Starts a check thread on this CPU (booked as a thread, as PsCreateSystemThread would).
fn spawn(start: extern "win64" fn(usize)) -> Option<usize> {
    let slot = sched::create(start as usize, 0)?;
    BOOKS.threads.fetch_add(1, Ordering::AcqRel);
    Some(slot)
}

/// Waits for the check thread to end (its object is signaled) and drops the creator's reference.
fn join(slot: Option<usize>) -> bool {
    let Some(slot) = slot else {
        return false;
    };
    let ended = waits::wait(sched::object(slot), Timeout::Never) == STATUS_SUCCESS
        && signal_state(sched::object(slot)) == 1;
    sched::dereference(slot) && ended
}

struct Checks {
    run: u32,
    failed: u32,
    first: &'static str,
}

impl Checks {
    fn check(&mut self, name: &'static str, ok: bool) {
        self.run += 1;
        if !ok {
            self.failed += 1;
            if self.failed == 1 {
                self.first = name;
            }
            crate::kprintln!("ntos: dispatcher check {name} failed");
        }
    }
}

/// Runs the checks and prints their line.
pub fn run(name: &str) {
    let mut c = Checks {
        run: 0,
        failed: 0,
        first: "-",
    };

    ke_initialize_event(event(), NOTIFICATION, 0);
    let t0 = arch::rdtsc();
    let status = wait(event().cast(), Some(ONE_MS_RELATIVE));
    c.check(
        "relative_timeout",
        status == STATUS_TIMEOUT && arch::rdtsc() - t0 >= ONE_MS_TICKS,
    );
    c.check(
        "zero_timeout",
        wait(event().cast(), Some(0)) == STATUS_TIMEOUT,
    );

    ke_initialize_event(event(), SYNCHRONIZATION, 0);
    WOKEN.store(0, Ordering::Release);
    let (a, b) = (spawn(event_waiter), spawn(event_waiter));
    waits::sleep(SETTLE_TICKS);
    let none_yet = WOKEN.load(Ordering::Acquire) == 0;
    ke_set_event(event(), 0, 0);
    waits::sleep(SETTLE_TICKS);
    let one = WOKEN.load(Ordering::Acquire) == 1 && signal_state(event().cast()) == 0;
    ke_set_event(event(), 0, 0);
    waits::sleep(SETTLE_TICKS);
    let two = WOKEN.load(Ordering::Acquire) == 2;
    // Joined whatever the outcome, so a failed check does not keep its threads' slots.
    let joined = join(a) & join(b);
    c.check(
        "synchronization_event_one_per_set",
        none_yet && one && two && joined,
    );

    ke_initialize_event(event(), NOTIFICATION, 0);
    WOKEN.store(0, Ordering::Release);
    let (a, b) = (spawn(event_waiter), spawn(event_waiter));
    waits::sleep(SETTLE_TICKS);
    ke_set_event(event(), 0, 0);
    waits::sleep(SETTLE_TICKS);
    let all = WOKEN.load(Ordering::Acquire) == 2 && signal_state(event().cast()) == 1;
    let joined = join(a) & join(b);
    c.check("notification_event_all", all && joined);

    ke_initialize_mutex(mutex(), 0);
    let me = sched::current_object();
    let twice = wait(mutex().cast(), None) == STATUS_SUCCESS
        && wait(mutex().cast(), None) == STATUS_SUCCESS
        && signal_state(mutex().cast()) == -1
        // SAFETY: held by this thread: the owner field is stable.
        && Some(unsafe { (*mutex()).OwnerThread }.cast::<c_void>()) == me;
    TAKER_OWNED.store(core::ptr::null_mut(), Ordering::Release);
    let taker = spawn(mutex_taker);
    waits::sleep(SETTLE_TICKS);
    ke_release_mutex(mutex(), 0);
    waits::sleep(SETTLE_TICKS);
    let still_held = TAKER_OWNED.load(Ordering::Acquire).is_null();
    ke_release_mutex(mutex(), 0);
    waits::sleep(SETTLE_TICKS);
    let handed = taker.is_some_and(|t| TAKER_OWNED.load(Ordering::Acquire) == sched::object(t));
    let joined = join(taker);
    c.check(
        "mutex_recursive_then_handed_over",
        twice && still_held && handed && joined && signal_state(mutex().cast()) == 1,
    );
    c.check(
        "mutex_release_not_held_refused",
        matches!(
            waits::release_mutex(mutex().cast()),
            Err(waits::ReleaseError::NotHeld)
        ),
    );

    handle_wait_check(&mut c);
    affinity_checks(&mut c);

    Line::new(name)
        .kv("sched_checks", c.run)
        .kv("sched_failed", c.failed)
        .kv("sched_first_failed", c.first)
        .print();
}

/// ZwWaitForSingleObject on the handle PsCreateSystemThread returns (the image calls it only on
/// a failure path of its worker's start): it times out while the thread waits, succeeds once the
/// thread ended, and refuses the handle once ZwClose gave it back.
fn handle_wait_check(c: &mut Checks) {
    use super::routines::{zw_close, zw_wait_for_single_object};
    use super::threads::create_system_thread;
    const STATUS_INVALID_HANDLE: i32 = 0xC000_0008_u32 as i32;

    ke_initialize_event(event(), NOTIFICATION, 0);
    WOKEN.store(0, Ordering::Release);
    let mut handle = 0usize;
    let created =
        create_system_thread(&mut handle, event_waiter as *const () as usize, 0) == STATUS_SUCCESS;
    let one_ms = ONE_MS_RELATIVE;
    let timed_out = zw_wait_for_single_object(handle, 0, &one_ms) == STATUS_TIMEOUT;
    ke_set_event(event(), 0, 0);
    let ended = zw_wait_for_single_object(handle, 0, core::ptr::null()) == STATUS_SUCCESS
        && WOKEN.load(Ordering::Acquire) == 1;
    let closed = created && zw_close(handle) == STATUS_SUCCESS;
    let refused = zw_wait_for_single_object(handle, 0, &one_ms) == STATUS_INVALID_HANDLE;
    c.check(
        "zw_wait_on_thread_handle",
        created && timed_out && ended && closed && refused,
    );
}

/// Group affinity through the exported routines (see the module comment).
fn affinity_checks(c: &mut Checks) {
    use super::exports::nt_ke_get_current_processor_number_ex as current_number;
    use super::layout::{GROUP_AFFINITY, PROCESSOR_NUMBER};
    use super::routines::{
        ke_revert_to_user_group_affinity_thread, ke_set_system_group_affinity_thread,
    };

    let last = super::groups::online() - 1;
    let target = super::groups::affinity_of(last);
    let mut previous = GROUP_AFFINITY {
        Mask: usize::MAX,
        Group: u16::MAX,
        Reserved: [0; 3],
    };
    ke_set_system_group_affinity_thread(&target, &mut previous);
    let mut there = PROCESSOR_NUMBER {
        Group: u16::MAX,
        Number: u8::MAX,
        Reserved: 0,
    };
    let index = current_number(&mut there);
    let expected = super::groups::number_of(last);
    ke_revert_to_user_group_affinity_thread(&previous);
    let home = current_number(core::ptr::null_mut());
    c.check(
        "affinity_moves_and_reverts",
        index == last
            && expected.is_some_and(|n| n.Group == there.Group && n.Number == there.Number)
            && previous.Mask == 0
            && home == 0,
    );

    // A CPU past the last one of its group, and a mask of two CPUs: each a counted misuse that
    // leaves the thread where it is. The check takes its two misuses back off the books.
    let size = super::groups::group_size();
    let misuses = BOOKS.misuses.load(Ordering::Acquire);
    let absent = GROUP_AFFINITY {
        Mask: 1 << size,
        Group: 0,
        Reserved: [0; 3],
    };
    let two = GROUP_AFFINITY {
        Mask: 0b11,
        Group: 0,
        Reserved: [0; 3],
    };
    ke_set_system_group_affinity_thread(&absent, core::ptr::null_mut());
    ke_set_system_group_affinity_thread(&two, core::ptr::null_mut());
    let counted = BOOKS.misuses.load(Ordering::Acquire) - misuses;
    BOOKS.misuses.fetch_sub(counted, Ordering::AcqRel);
    c.check(
        "affinity_misuse_counted",
        counted == 2 && current_number(core::ptr::null_mut()) == 0,
    );
    // `affinity_group*` and `thread_moves` count the image's calls and moves only.
    for n in &super::routines::AFFINITY_CALLS_BY_GROUP {
        n.store(0, Ordering::Release);
    }
    sched::MOVES.store(0, Ordering::Release);
}
