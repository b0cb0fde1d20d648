//! Scenario `nt-driver`: the real ackvisor.sys through its life as NT drives it: DriverEntry
//! with a DRIVER_OBJECT and a registry path, then DriverUnload, with the verifier's books
//! (`routines::BOOKS`) read after each. On every CPU the machine has (`cpus`): the image moves
//! the scenario's thread from CPU to CPU (`sched`), and the scenario measures each CPU itself.
//!
//! **Runs in:** PASSIVE, on the BSP's initial thread (the image moves it to every CPU and back).

use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;

use ackvisor_vmm::Mode;
use ackvisor_vmm::control::Request;
use ackvisor_vmm::control::wire::{self, Field, SetModeReply, StatsReply, StatusReply};

use super::exports;
use super::io;
use super::layout::{DRIVER_OBJECT, UNICODE_STRING};
use super::routines::BOOKS;
use crate::params::Params;
use crate::report::Line;

const NAME: &str = "nt-driver";
/// DRIVER_OBJECT's `Type` (IO_TYPE_DRIVER).
const IO_TYPE_DRIVER: i16 = 4;

struct Driver(UnsafeCell<DRIVER_OBJECT>);
// SAFETY: only the BSP's scenario and the image (called from it) touch the object.
unsafe impl Sync for Driver {}

static DRIVER: Driver = Driver(UnsafeCell::new(
    // SAFETY: DRIVER_OBJECT is integers, pointers and options of fn pointers: zero is valid.
    unsafe { core::mem::zeroed() },
));

/// The registry path NT passes: the service key.
const REGISTRY_PATH: &str = "\\Registry\\Machine\\System\\CurrentControlSet\\Services\\ackvisor";
static REGISTRY_PATH_UTF16: [u16; REGISTRY_PATH.len()] = {
    let mut out = [0u16; REGISTRY_PATH.len()];
    let bytes = REGISTRY_PATH.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        out[i] = bytes[i] as u16;
        i += 1;
    }
    out
};

type DriverEntry = extern "win64" fn(*mut DRIVER_OBJECT, *const UNICODE_STRING) -> i32;

/// The scenario.
pub fn scenario(p: &Params) {
    super::sched_check::run(NAME);
    let native_each = super::cpus::probe_each();
    let native_ticks = cpuid_ticks();
    let Some((driver, status)) = enter(NAME) else {
        return;
    };
    let entry_ticks = cpuid_ticks();
    let entry_each = super::cpus::probe_each();
    // SAFETY: DriverEntry has returned; the object is read on this CPU only.
    let unload = unsafe { (*driver).DriverUnload };
    let mut line = Line::new(NAME);
    line.kv("loaded", u32::from(status >= 0))
        .kv("cpus", crate::percpu::online_count())
        .kv("cpuid_ticks_native", native_ticks)
        .kv("cpuid_ticks_loaded", entry_ticks)
        .kv(
            "virtualized_by_cpuid",
            super::cpus::count_virtualized(&native_each, &entry_each),
        )
        .kv(
            "refusal_lines",
            exports::REFUSAL_LINES.load(Ordering::Acquire),
        )
        .kv("injected", super::fault::INJECTED.load(Ordering::Acquire))
        .kv("entry_status", format_args!("{:#010x}", status as u32))
        .kv("devices", BOOKS.devices.load(Ordering::Acquire))
        .kv("links", BOOKS.links.load(Ordering::Acquire))
        .kv("callbacks", BOOKS.callbacks.load(Ordering::Acquire))
        .kv("threads", BOOKS.threads.load(Ordering::Acquire))
        .kv(
            "contiguous_pages",
            BOOKS.contiguous_pages.load(Ordering::Acquire),
        )
        .kv("unload_set", u32::from(unload.is_some()));
    super::fault::report_calls(&mut line);
    line.print();
    if status >= 0 {
        requests(driver, p, &native_each);
    }
    if let Some(unload) = unload {
        // SAFETY: DriverUnload of the image, set by DriverEntry, called once at PASSIVE.
        unsafe { unload(driver) };
    }
    let after_ticks = cpuid_ticks();
    let after_each = super::cpus::probe_each();
    let mut line = Line::new(NAME);
    line.kv("unloaded", u32::from(unload.is_some()))
        .kv("cpuid_ticks_after", after_ticks)
        .kv(
            "virtualized_after",
            super::cpus::count_virtualized(&native_each, &after_each),
        );
    write_books(&mut line);
    line.print();
}

/// Reply buffer for the requests (static: a stats reply is over the 4 KiB a frame may hold).
struct Out(UnsafeCell<[u8; io::BUFFER_BYTES]>);
// SAFETY: used by the BSP's scenario only, one request at a time.
unsafe impl Sync for Out {}
static OUT: Out = Out(UnsafeCell::new([0; io::BUFFER_BYTES]));

/// CPUID's basic exit reason: CPUID exits unconditionally in VMX non-root operation, so the
/// count the stats IOCTL reports for it proves this CPU runs virtualized.
const EXIT_CPUID: usize = 10;

use super::cpus::{CPUID_PROBES, cpuid_ticks};

/// One DEVICE_CONTROL with `request`'s input; the outcome and the reply bytes.
pub(super) fn ioctl(
    driver: *mut DRIVER_OBJECT,
    request: Request,
    out_len: usize,
) -> Option<(io::Outcome, &'static [u8])> {
    let (input, n) = request.encode();
    // SAFETY: the only reference to OUT while this request runs (see `Out`).
    let out = unsafe { &mut *OUT.0.get() };
    let out = out.get_mut(..out_len)?;
    let outcome = io::send(
        driver,
        io::IRP_MJ_DEVICE_CONTROL,
        request.code(),
        &input[..n],
        out,
    )?;
    let reply_len = outcome.information.min(out_len);
    Some((outcome, &out[..reply_len]))
}

/// `virtualized_count` of the status IOCTL (`none` when the request failed).
fn virtualized(driver: *mut DRIVER_OBJECT) -> Count {
    match ioctl(driver, Request::Status, STATUS_REPLY_BYTES) {
        Some((o, reply)) if o.status == 0 => StatusReply::decode_prefix(reply)
            .map_or(Count(None), |(r, _)| Count(Some(r.virtualized_count))),
        _ => Count(None),
    }
}

/// Room for a status reply of up to 64 CPUs.
const STATUS_REPLY_BYTES: usize = StatusReply::SIZE + 64 * wire::CpuModeEntry::SIZE;

/// A count from a reply, or `none`.
struct Count(Option<u32>);

impl core::fmt::Display for Count {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("none"),
        }
    }
}

/// One DEVICE_CONTROL with raw input and an output of `out_len` bytes (in the static buffer).
pub fn ioctl_raw(
    driver: *mut DRIVER_OBJECT,
    code: u32,
    input: &[u8],
    out_len: usize,
) -> Option<io::Outcome> {
    // SAFETY: the only reference to OUT while this request runs (see `Out`).
    let out = unsafe { &mut *OUT.0.get() };
    io::send(
        driver,
        io::IRP_MJ_DEVICE_CONTROL,
        code,
        input,
        out.get_mut(..out_len)?,
    )
}

/// CPUID exits in the aggregate statistics, or None when the request failed.
fn cpuid_exits(driver: *mut DRIVER_OBJECT) -> Option<u64> {
    exits(driver, EXIT_CPUID)
}

/// Exits of basic reason `reason` in the aggregate statistics, or None when the request failed.
fn exits(driver: *mut DRIVER_OBJECT, reason: usize) -> Option<u64> {
    let (o, reply) = ioctl(
        driver,
        Request::Stats { per_cpu: false },
        StatsReply::SIZE + wire::CpuStats::SIZE,
    )?;
    if o.status != 0 {
        return None;
    }
    let (_, rest) = StatsReply::decode_prefix(reply)?;
    // CpuStats: cpu (u32), mode (u32), then the exit counts by reason (u64 each).
    let at = 8 + reason * 8;
    let bytes: [u8; 8] = rest.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// CREATE, status, every mode by IOCTL, the CPUID probe through the statistics, a sleep,
/// malformed requests, CLOSE.
fn requests(driver: *mut DRIVER_OBJECT, p: &Params, native_each: &[u64; crate::percpu::MAX_CPUS]) {
    let mut line = Line::new(NAME);
    let create = io::send(driver, io::IRP_MJ_CREATE, 0, &[], &mut []);
    line.kv("create_status", create.map_or(-1, |o| o.status));
    line.kv("virtualized", virtualized(driver));
    let mut modes_applied = 0;
    for mode in [
        Mode::ExitSti,
        Mode::AckReplay,
        Mode::AckInject,
        Mode::Passthrough,
    ] {
        if let Some((o, reply)) = ioctl(driver, Request::SetMode(mode), SetModeReply::SIZE)
            && o.status == 0
            && let Some(r) = SetModeReply::decode(reply)
            && r.mode == mode as u32
            && r.cpus_applied == crate::percpu::online_count()
        {
            modes_applied += 1;
        }
        super::cpus::workload_in(driver, mode, p);
        // Where NT's clock would end the thread's quantum: the log-drain worker runs if its
        // period has passed (`sched`: no preemption).
        super::sched::yield_now();
    }
    line.kv("modes_applied", modes_applied);
    // Before the sleep: its power callback drains the rings on this thread. The release image
    // sets the four modes in less than one worker period, so afterwards the worker found the
    // rings empty and printed nothing (worker_lines=0); here the mode changes' records wait.
    worker_ran();
    let before = cpuid_exits(driver);
    for leaf in 0..CPUID_PROBES {
        let _ = crate::arch::cpuid(leaf as u32 & 1, 0);
    }
    let after = cpuid_exits(driver);
    match (before, after) {
        (Some(b), Some(a)) => line.kv("cpuid_exits", a.saturating_sub(b)),
        _ => line.kv("cpuid_exits", "none"),
    };
    // A sleep as NT announces it: PO_CB_SYSTEM_STATE_LOCK with 0 before, 1 after the wake.
    let notified = super::routines::notify_power_state(0);
    let asleep_each = super::cpus::probe_each();
    line.kv("sleep_notified", u32::from(notified))
        .kv("virtualized_asleep", virtualized(driver))
        .kv(
            "virtualized_by_cpuid_asleep",
            super::cpus::count_virtualized(native_each, &asleep_each),
        );
    // The interrupts keep flowing while the image is out of VMX operation: counted natively.
    super::cpus::workload_asleep(driver, p);
    super::routines::notify_power_state(1);
    let awake_each = super::cpus::probe_each();
    line.kv("virtualized_awake", virtualized(driver)).kv(
        "virtualized_by_cpuid_awake",
        super::cpus::count_virtualized(native_each, &awake_each),
    );
    super::malformed::sweep(driver, &mut line);
    let close = io::send(driver, io::IRP_MJ_CLOSE, 0, &[], &mut []);
    line.kv("close_status", close.map_or(-1, |o| o.status));
    line.print();
}

/// The log-drain worker's period (ackvisor's `log_drain::PERIOD_MS`) in TSC ticks (50 per µs).
const WORKER_PERIOD_TICKS: u64 = 250 * 50_000;
/// How long the scenario sleeps at most for the worker to show it ran.
const WORKER_WAIT_TICKS: u64 = 3 * WORKER_PERIOD_TICKS;
/// The slices it sleeps in.
const WORKER_SLICE_TICKS: u64 = WORKER_PERIOD_TICKS / 10;

/// Before unload: the image's log-drain worker has run on its own (woken by its period, it
/// printed the rings' records), not only when unload stops it. The scenario's thread sleeps
/// (a timed wait: its CPU runs the worker meanwhile) until it has, or a bound passes.
fn worker_ran() {
    let start = crate::arch::rdtsc();
    let shown = || {
        super::sched::system_wakeups() > 0
            && exports::SYSTEM_THREAD_LINES.load(Ordering::Acquire) > 0
    };
    while !shown() && crate::arch::rdtsc() - start < WORKER_WAIT_TICKS {
        super::waits::sleep(WORKER_SLICE_TICKS);
    }
    Line::new(NAME)
        .kv("worker_wakeups", super::sched::system_wakeups())
        .kv(
            "worker_lines",
            exports::SYSTEM_THREAD_LINES.load(Ordering::Acquire),
        )
        .kv("thread_moves", super::sched::MOVES.load(Ordering::Acquire))
        .kv(
            "affinity_group0",
            super::routines::AFFINITY_CALLS_BY_GROUP[0].load(Ordering::Acquire),
        )
        .kv(
            "affinity_group1",
            super::routines::AFFINITY_CALLS_BY_GROUP[1].load(Ordering::Acquire),
        )
        .print();
}

/// Loads the image from the disk (a failure prints the `fatal=1` line under `name`) and calls
/// its DriverEntry as NT's loader does: a DRIVER_OBJECT with the image's start and size, and
/// the service key as the registry path. Returns the object and DriverEntry's status.
pub fn enter(name: &str) -> Option<(*mut DRIVER_OBJECT, i32)> {
    let (_, image) = super::load_image(name)?;
    let driver = DRIVER.0.get();
    // SAFETY: nothing else references the object before DriverEntry.
    unsafe {
        (*driver).Type = IO_TYPE_DRIVER;
    }
    // SAFETY: as above.
    unsafe {
        (*driver).Size = size_of::<DRIVER_OBJECT>() as i16;
    }
    // SAFETY: as above.
    unsafe {
        (*driver).DriverStart = image.base as *mut core::ffi::c_void;
    }
    // SAFETY: as above.
    unsafe {
        (*driver).DriverSize = image.size;
    }
    let path = UNICODE_STRING {
        Length: (REGISTRY_PATH.len() * 2) as u16,
        MaximumLength: (REGISTRY_PATH.len() * 2) as u16,
        Buffer: REGISTRY_PATH_UTF16.as_ptr().cast_mut(),
    };
    // SAFETY: `entry` is the image's AddressOfEntryPoint, DriverEntry (/ENTRY:DriverEntry),
    // with the DRIVER_INITIALIZE signature, relocated and bound by the loader.
    let entry = unsafe { core::mem::transmute::<usize, DriverEntry>(image.entry) };
    crate::kprintln!(
        "ntos: ackvisor.sys at {:#x}..{:#x}, calling DriverEntry",
        image.base,
        image.base + image.size as usize
    );
    let status = entry(driver, &path);
    Some((driver, status))
}

/// The verifier's books after DriverUnload: what the image still holds (`leaks`), misuses, the
/// I/O manager's completion books and the IRQL rule violations.
pub fn write_books(line: &mut Line) {
    line.kv("leaks", BOOKS.leaks())
        .kv("misuses", BOOKS.misuses.load(Ordering::Acquire))
        .kv(
            "double_completions",
            io::DOUBLE_COMPLETIONS.load(Ordering::Acquire),
        )
        .kv("uncompleted", io::UNCOMPLETED.load(Ordering::Acquire))
        .kv(
            "status_mismatches",
            io::STATUS_MISMATCHES.load(Ordering::Acquire),
        )
        .kv(
            "information_overflows",
            io::INFORMATION_OVERFLOWS.load(Ordering::Acquire),
        )
        .kv(
            "stray_completions",
            io::STRAY_COMPLETIONS.load(Ordering::Acquire),
        )
        .kv(
            "debugctl_emulated",
            super::quirks::DEBUGCTL_EMULATED.load(Ordering::Acquire),
        )
        .kv(
            "irql_violations",
            exports::IRQL_VIOLATIONS.load(Ordering::Acquire),
        )
        .kv("first_violation", exports::first_violation());
}
