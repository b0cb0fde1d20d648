//! The miniature NT's threads: a cooperative scheduler per CPU and moving a thread to another
//! CPU (group affinity). Waits on dispatcher objects are in `waits`.
//!
//! A thread runs until it waits, yields, moves or ends; then its CPU goes back to that CPU's
//! *scheduler context*, which finishes what the thread asked for (requeue it, hand it to
//! another CPU, mark it ended) once the thread's stack is no longer in use, and picks the next
//! thread that is ready on this CPU. The scheduler context is the AP's idle loop (`smp`), a
//! dedicated idle stack on the BSP (entered the first time the BSP's initial thread leaves the
//! BSP), or any code that calls [`run_ready`] between its own work.
//!
//! Slot 0 is the BSP's initial thread (the boot stack, where the scenarios run); the other
//! slots are system threads with their own 24 KiB stacks. A switch saves the callee-saved
//! registers and RSP on the thread's stack, and the thread's IRQL (CR8), IF and the interrupt
//! checks' marks (`percpu`) travel with it, so a thread continues on another CPU exactly where it
//! stopped, whether that CPU runs in VMX non-root operation or not.
//!
//! Every change of a thread's state happens under one dispatcher lock (IF=0), like NT's
//! dispatcher database lock. The switch itself is `context`'s.
//!
//! Simplifications, each named where it is made:
//! - no preemption: a thread runs until it waits, yields or moves (NT would preempt it at the
//!   end of its quantum); the scenarios yield where NT's clock would have switched;
//! - no load balancing: a thread runs on one CPU at a time, the one it was created on (its
//!   "user affinity"), unless it sets a system affinity; no priorities, no APCs, no alertable
//!   waits;
//! - a move at DISPATCH_LEVEL happens at once (NT defers it until IRQL drops), and a wait with
//!   a timeout at DISPATCH or above is counted as an IRQL violation and then blocks (NT would
//!   bugcheck); a switch inside an interrupt handler ends the run (`leave`);
//! - timeouts expire on the TSC exactly, not on the next clock tick as NT's do;
//! - a mutex still held when its thread ends is not abandoned (NT bugchecks with
//!   THREAD_TERMINATE_HELD_MUTEX), and a reused slot gives a stale handle the new thread's
//!   identity (there is no handle table).
//!
//! **Runs in:** PASSIVE (threads), the scheduler context (IF=0 while it looks), any CPU.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::sync::atomic::AtomicUsize;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering};

use super::context::{fresh_context, switch};
use super::waits::{STATUS_TIMEOUT, THREAD, header, satisfy_waiters};
use crate::interrupts::IrqOff;
use crate::percpu::{CPUS, MAX_CPUS, this_cpu};
use crate::{arch, smp};

/// Thread slots: the BSP's initial thread and three system threads.
pub const SLOTS: usize = 4;
/// A system thread's stack (NT's kernel stacks are 24 KiB).
const STACK_BYTES: usize = 24 * 1024;
/// The BSP's scheduler stack.
const IDLE_STACK_BYTES: usize = 16 * 1024;

/// Thread states.
pub(super) const FREE: u8 = 0;
pub(super) const READY: u8 = 1;
const RUNNING: u8 = 2;
pub(super) const WAITING: u8 = 3;
const DONE: u8 = 4;

/// What a thread asks its CPU's scheduler context to do once it has left.
const LEAVE_YIELD: u8 = 1;
pub(super) const LEAVE_BLOCK: u8 = 2;
const LEAVE_MOVE: u8 = 3;
const LEAVE_EXIT: u8 = 4;

/// "No CPU" in a thread's system affinity.
const NO_AFFINITY: u32 = u32::MAX;

/// One thread. The dispatcher header comes first: the object the image waits on and
/// references is the thread itself, as NT's KTHREAD begins with its header.
#[repr(C, align(16))]
pub struct Thread {
    header: UnsafeCell<[u64; 3]>,
    pub(super) state: AtomicU8,
    leaving: AtomicU8,
    /// The CPU it runs on, or will run on when it is ready.
    pub(super) cpu: AtomicU32,
    /// Its user affinity: the CPU it was created on (see the module comment).
    home: AtomicU32,
    /// Its system affinity (KeSetSystemGroupAffinityThread), [`NO_AFFINITY`] when none.
    system_cpu: AtomicU32,
    /// Where a move takes it.
    move_to: AtomicU32,
    /// RSP while it is not running.
    rsp: AtomicUsize,
    start: AtomicUsize,
    context: AtomicUsize,
    pub(super) wait_object: AtomicUsize,
    /// TSC at which the wait times out (0: never).
    pub(super) deadline: AtomicU64,
    pub(super) wait_status: AtomicI32,
    /// Handles and references to its object (the slot is reused once it ended and this is 0).
    refs: AtomicU32,
    /// Times it resumed after a wait that blocked it.
    pub wakeups: AtomicU32,
}

// SAFETY: the header is written only under the dispatcher lock (or by its creator before the
// thread is published); every other field is atomic.
unsafe impl Sync for Thread {}

const TYPE_THREAD_HEADER: u64 = THREAD as u64;

pub(super) static THREADS: [Thread; SLOTS] = [const {
    Thread {
        header: UnsafeCell::new([TYPE_THREAD_HEADER, 0, 0]),
        state: AtomicU8::new(FREE),
        leaving: AtomicU8::new(0),
        cpu: AtomicU32::new(0),
        home: AtomicU32::new(0),
        system_cpu: AtomicU32::new(NO_AFFINITY),
        move_to: AtomicU32::new(0),
        rsp: AtomicUsize::new(0),
        start: AtomicUsize::new(0),
        context: AtomicUsize::new(0),
        wait_object: AtomicUsize::new(0),
        deadline: AtomicU64::new(0),
        wait_status: AtomicI32::new(0),
        refs: AtomicU32::new(0),
        wakeups: AtomicU32::new(0),
    }
}; SLOTS];

/// Slot + 1 of the thread each CPU runs (0: its scheduler context). The BSP starts in slot 0.
static CURRENT: [AtomicUsize; MAX_CPUS] = {
    let mut c = [const { AtomicUsize::new(0) }; MAX_CPUS];
    c[0] = AtomicUsize::new(1);
    c
};
/// Whether slot 0 has been claimed by the BSP's initial thread (done on first use).
static INITIAL: AtomicBool = AtomicBool::new(false);
/// The slot each CPU ran last (round robin).
static LAST: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
/// Each CPU's scheduler context while a thread runs there.
static SCHED_RSP: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];

/// Threads moved from one CPU to another (KeSetSystemGroupAffinityThread and its revert).
pub static MOVES: AtomicU32 = AtomicU32::new(0);
/// Thread switches (scheduler context → thread).
pub static SWITCHES: AtomicU32 = AtomicU32::new(0);

#[repr(C, align(16))]
struct Stacks(UnsafeCell<[[u8; STACK_BYTES]; SLOTS]>);
// SAFETY: a slot's stack is used only by the slot's thread, which runs on one CPU at a time.
unsafe impl Sync for Stacks {}
static STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK_BYTES]; SLOTS]));

#[repr(C, align(16))]
struct IdleStack(UnsafeCell<[u8; IDLE_STACK_BYTES]>);
// SAFETY: only the BSP's scheduler context runs on it.
unsafe impl Sync for IdleStack {}
static BSP_IDLE_STACK: IdleStack = IdleStack(UnsafeCell::new([0; IDLE_STACK_BYTES]));

/// The dispatcher lock (IF=0 while held, like NT's at SYNCH_LEVEL). Never held across a switch.
pub(super) struct Lock {
    _off: IrqOff,
}

static LOCKED: AtomicBool = AtomicBool::new(false);

impl Lock {
    pub(super) fn take() -> Lock {
        let off = IrqOff::enter();
        while LOCKED
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Lock { _off: off }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        LOCKED.store(false, Ordering::Release);
    }
}

fn me() -> usize {
    this_cpu().index.load(Ordering::Relaxed) as usize
}

/// Claims slot 0 for the BSP's initial thread the first time the dispatcher is used.
fn claim_initial() {
    if !INITIAL.swap(true, Ordering::AcqRel) {
        let t = &THREADS[0];
        t.state.store(RUNNING, Ordering::Release);
        t.refs.store(1, Ordering::Release);
    }
}

/// The slot of the thread running on this CPU (None in a scheduler context).
pub fn current() -> Option<usize> {
    claim_initial();
    let c = CURRENT.get(me())?.load(Ordering::Acquire);
    c.checked_sub(1)
}

/// The object of the thread running on this CPU (what a KMUTEX's `OwnerThread` holds).
pub fn current_object() -> Option<*mut c_void> {
    current().map(object)
}

/// Thread `slot`'s object.
pub fn object(slot: usize) -> *mut c_void {
    THREADS
        .get(slot)
        .map_or(core::ptr::null_mut(), |t| t.header.get().cast())
}

/// The slot whose object is `object`.
pub fn slot_of_object(object: *mut c_void) -> Option<usize> {
    THREADS
        .iter()
        .position(|t| t.header.get().cast::<c_void>() == object)
}

/// Whether `slot` holds a thread (running, waiting or ended but still referenced).
pub fn exists(slot: usize) -> bool {
    THREADS
        .get(slot)
        .is_some_and(|t| t.state.load(Ordering::Acquire) != FREE)
}

/// Wake-ups after blocking waits of the system threads that exist now (not the BSP's initial
/// thread, not threads already gone).
pub fn system_wakeups() -> u32 {
    THREADS
        .iter()
        .skip(1)
        .filter(|t| t.state.load(Ordering::Acquire) != FREE)
        .map(|t| t.wakeups.load(Ordering::Acquire))
        .sum()
}

/// Whether the running thread is a system thread (PsCreateSystemThread's).
pub fn in_system_thread() -> bool {
    current().is_some_and(|slot| slot > 0)
}

/// Creates a ready thread on this CPU that calls `start(context)` (win64) on its own stack.
/// Returns its slot, or None when every slot is taken.
pub fn create(start: usize, context: usize) -> Option<usize> {
    claim_initial();
    let _lock = Lock::take();
    let slot = (1..SLOTS).find(|&i| THREADS[i].state.load(Ordering::Acquire) == FREE)?;
    let t = &THREADS[slot];
    // SAFETY: the slot is free, so its stack is unused.
    let top = unsafe { (*STACKS.0.get())[slot].as_mut_ptr_range().end } as usize;
    t.rsp
        .store(fresh_context(top, thread_main), Ordering::Release);
    t.start.store(start, Ordering::Release);
    t.context.store(context, Ordering::Release);
    // SAFETY: under the lock; the object is not published yet. Not signaled until it ends.
    unsafe { *t.header.get() = [TYPE_THREAD_HEADER, 0, 0] };
    let here = me() as u32;
    t.cpu.store(here, Ordering::Release);
    t.home.store(here, Ordering::Release);
    t.system_cpu.store(NO_AFFINITY, Ordering::Release);
    t.wait_object.store(0, Ordering::Release);
    t.deadline.store(0, Ordering::Release);
    t.wakeups.store(0, Ordering::Release);
    t.refs.store(1, Ordering::Release);
    t.state.store(READY, Ordering::Release);
    Some(slot)
}

/// Takes a reference to thread `slot` (a handle or an object reference).
pub fn reference(slot: usize) {
    if let Some(t) = THREADS.get(slot) {
        t.refs.fetch_add(1, Ordering::AcqRel);
    }
}

/// Drops a reference to thread `slot`; frees the slot once the thread ended and nobody refers to
/// it. False when there was no reference to drop.
pub fn dereference(slot: usize) -> bool {
    let Some(t) = THREADS.get(slot) else {
        return false;
    };
    let _lock = Lock::take();
    let refs = t.refs.load(Ordering::Acquire);
    if refs == 0 {
        return false;
    }
    t.refs.store(refs - 1, Ordering::Release);
    if refs == 1 && t.state.load(Ordering::Acquire) == DONE {
        t.state.store(FREE, Ordering::Release);
    }
    true
}

/// The first code of a new thread: PASSIVE, interrupts on, then its start routine.
extern "C" fn thread_main() -> ! {
    let cpu = this_cpu();
    // SAFETY: IF=0 (the scheduler switched here with interrupts off); a new thread starts at
    // PASSIVE_LEVEL.
    unsafe { arch::set_cr8(0) };
    cpu.ctx_cr8.store(0, Ordering::Relaxed);
    cpu.ctx_if_off.store(false, Ordering::Relaxed);
    // SAFETY: this CPU's IDT and LAPIC are ready; the thread's state is consistent.
    unsafe { arch::sti() };
    if let Some(slot) = current() {
        let t = &THREADS[slot];
        let (start, context) = (
            t.start.load(Ordering::Acquire),
            t.context.load(Ordering::Acquire),
        );
        // SAFETY: `start` is the image's KSTART_ROUTINE (win64), given to PsCreateSystemThread.
        let routine = unsafe { core::mem::transmute::<usize, extern "win64" fn(usize)>(start) };
        routine(context);
    }
    exit_current()
}

/// Ends the running thread (PsTerminateSystemThread, or its start routine returned).
pub fn exit_current() -> ! {
    leave(LEAVE_EXIT);
    // An ended thread is never resumed.
    crate::report::fatal_result(format_args!("ended_thread_resumed=1"))
}

/// The running thread gives up its CPU for `action`; returns when it is resumed (for a move, on
/// the new CPU).
pub(super) fn leave(action: u8) {
    let Some(slot) = current() else {
        return;
    };
    // A switch inside an interrupt handler would finish the handler's second half on another
    // CPU or much later: its EOI would reach the wrong LAPIC and this CPU's in-service bit would
    // stay set. NT forbids waiting there (and defers a move until IRQL drops); end the run
    // naming it rather than corrupt both CPUs.
    if this_cpu().depth.load(Ordering::Relaxed) > 0 {
        crate::report::fatal_result(format_args!("thread_switch_in_interrupt_handler=1"));
    }
    let here = me();
    let t = &THREADS[slot];
    t.leaving.store(action, Ordering::Release);
    let sched = scheduler_rsp(here);
    switch(&t.rsp, sched);
}

/// This CPU's scheduler context: the one saved when it switched to the running thread, or for
/// the BSP's initial thread, a fresh one on the BSP's idle stack.
fn scheduler_rsp(cpu: usize) -> usize {
    let saved = SCHED_RSP[cpu].swap(0, Ordering::AcqRel);
    if saved != 0 {
        return saved;
    }
    // An AP's scheduler context always exists before one of its threads runs (`run_ready`
    // saved it); only the BSP's initial thread can get here without one.
    if cpu != 0 {
        crate::report::fatal_result(format_args!("ap_without_scheduler_context=1 cpu={cpu}"));
    }
    // SAFETY: only the BSP's scheduler context uses the idle stack, and it has never run (or has
    // no frame live: it only ever switches away from inside `run_ready`, which saved SCHED_RSP).
    let top = unsafe { (*BSP_IDLE_STACK.0.get()).as_mut_ptr_range().end } as usize;
    fresh_context(top, bsp_idle)
}

/// The BSP's scheduler context, entered the first time its initial thread leaves it.
extern "C" fn bsp_idle() -> ! {
    let cpu = this_cpu();
    // SAFETY: IF=0 (switched here with interrupts off); the scheduler runs at PASSIVE.
    unsafe { arch::set_cr8(0) };
    cpu.ctx_cr8.store(0, Ordering::Relaxed);
    // The idle loop's mark stays clear: it halts with IF=1 (the mark is never set while IF=1).
    cpu.ctx_if_off.store(false, Ordering::Relaxed);
    finish(me());
    loop {
        idle_once(cpu);
    }
}

/// One turn of the BSP's idle loop (IF=0 at entry and exit): runs the work posted to its
/// mailbox, then a ready thread; without either, [`halt_idle`].
fn idle_once(cpu: &'static crate::percpu::Cpu) {
    arch::cli();
    smp::poll_mailbox(cpu);
    if run_ready() {
        return;
    }
    halt_idle();
}

/// An idle CPU waits for an interrupt (a wake-up IPI, say); with a timed wait pending on this
/// CPU it only pauses, so the timeout is noticed on time (there is no timer to wake it). IF=0
/// at entry and exit.
pub fn halt_idle() {
    let timed = has_timed_waiter(me());
    if timed {
        // SAFETY: interrupts are expected in the idle loop; IF=0 again before returning.
        unsafe { core::arch::asm!("sti", "pause", "cli", options(nostack)) };
    } else {
        // SAFETY: as above; `sti; hlt` is atomic (STI's one-instruction shadow), so a wake-up
        // IPI cannot slip in between the caller's checks and the halt.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nostack)) };
    }
}

/// From a scheduler context: wakes timed-out waiters of this CPU and runs one ready thread until
/// it leaves. False when none was ready.
pub fn run_ready() -> bool {
    claim_initial();
    let here = me();
    if CURRENT[here].load(Ordering::Acquire) != 0 {
        // Called from a thread, not a scheduler context: nothing to do here.
        return false;
    }
    let Some(slot) = pick(here) else {
        return false;
    };
    let t = &THREADS[slot];
    CURRENT[here].store(slot + 1, Ordering::Release);
    SWITCHES.fetch_add(1, Ordering::AcqRel);
    switch(&SCHED_RSP[here], t.rsp.load(Ordering::Acquire));
    finish(here);
    true
}

/// Times out this CPU's expired waits, then takes the first ready thread of this CPU.
fn pick(here: usize) -> Option<usize> {
    let now = arch::rdtsc();
    let _lock = Lock::take();
    for t in &THREADS {
        let deadline = t.deadline.load(Ordering::Acquire);
        if t.state.load(Ordering::Acquire) == WAITING
            && t.cpu.load(Ordering::Acquire) as usize == here
            && deadline != 0
            && now >= deadline
        {
            t.wait_object.store(0, Ordering::Release);
            t.deadline.store(0, Ordering::Release);
            t.wait_status.store(STATUS_TIMEOUT, Ordering::Release);
            t.state.store(READY, Ordering::Release);
        }
    }
    // Round robin: start after the thread that ran here last, so a yield lets the others run.
    let last = LAST[here].load(Ordering::Relaxed);
    let slot = (1..=SLOTS).map(|k| (last + k) % SLOTS).find(|&i| {
        let t = &THREADS[i];
        t.state.load(Ordering::Acquire) == READY && t.cpu.load(Ordering::Acquire) as usize == here
    })?;
    THREADS[slot].state.store(RUNNING, Ordering::Release);
    LAST[here].store(slot, Ordering::Relaxed);
    Some(slot)
}

fn has_timed_waiter(here: usize) -> bool {
    THREADS.iter().any(|t| {
        t.state.load(Ordering::Acquire) == WAITING
            && t.cpu.load(Ordering::Acquire) as usize == here
            && t.deadline.load(Ordering::Acquire) != 0
    })
}

/// In the scheduler context, once the thread that ran here has left its stack: does what it
/// asked for.
fn finish(here: usize) {
    let Some(slot) = CURRENT[here].swap(0, Ordering::AcqRel).checked_sub(1) else {
        return;
    };
    let t = &THREADS[slot];
    let mut wake = None;
    {
        let _lock = Lock::take();
        match t.leaving.swap(0, Ordering::AcqRel) {
            LEAVE_YIELD => t.state.store(READY, Ordering::Release),
            // Already WAITING, or READY if a signal came while it was leaving.
            LEAVE_BLOCK => {}
            LEAVE_MOVE => {
                let to = t.move_to.load(Ordering::Acquire);
                t.cpu.store(to, Ordering::Release);
                t.state.store(READY, Ordering::Release);
                MOVES.fetch_add(1, Ordering::AcqRel);
                wake = Some(to as usize);
            }
            LEAVE_EXIT => {
                t.state.store(DONE, Ordering::Release);
                super::routines::BOOKS
                    .threads
                    .fetch_sub(1, Ordering::AcqRel);
                // A thread object is signaled when its thread ends (and stays signaled).
                // SAFETY: under the lock; the header is the thread's own.
                unsafe { header(object(slot)).SignalState = 1 };
                satisfy_waiters(object(slot));
                if t.refs.load(Ordering::Acquire) == 0 {
                    t.state.store(FREE, Ordering::Release);
                }
            }
            _ => t.state.store(READY, Ordering::Release),
        }
    }
    if let Some(to) = wake {
        wake_cpu(to);
    }
}

/// Wakes CPU `cpu` from its idle halt (no-op for this CPU).
pub(super) fn wake_cpu(cpu: usize) {
    if cpu != me()
        && let Some(c) = CPUS.get(cpu)
    {
        smp::wake(c);
    }
}

/// The running thread lets the other ready threads of its CPU run (NT's clock would preempt it;
/// see the module comment).
pub fn yield_now() {
    leave(LEAVE_YIELD);
}

/// Moves the running thread to CPU `to`: its stack continues there. No-op when it is already
/// there or no thread is running.
fn move_to(to: u32) {
    let Some(slot) = current() else {
        return;
    };
    if to as usize == me() {
        return;
    }
    THREADS[slot].move_to.store(to, Ordering::Release);
    leave(LEAVE_MOVE);
}

/// Sets the running thread's system affinity to CPU `cpu` (moving it there), or clears it
/// (`None`: back to its user affinity, its home CPU). Returns the previous system affinity.
pub fn set_affinity(cpu: Option<u32>) -> Option<u32> {
    let slot = current()?;
    let t = &THREADS[slot];
    let previous = t
        .system_cpu
        .swap(cpu.unwrap_or(NO_AFFINITY), Ordering::AcqRel);
    move_to(cpu.unwrap_or_else(|| t.home.load(Ordering::Acquire)));
    (previous != NO_AFFINITY).then_some(previous)
}
