//! Scenario `nt-serve`: `ackctl` drives the real ackvisor.sys. The image is loaded and its
//! DriverEntry called as in `nt-driver`; then the test machine's COM1 server (`control`) runs
//! its serve session, but each request frame is answered the way NT answers `ackctl`'s Windows
//! side (`client/src/transport/device.rs`): `CreateFileW(\\.\Ackvisor)` is an IRP_MJ_CREATE,
//! `DeviceIoControl` an IRP_MJ_DEVICE_CONTROL (METHOD_BUFFERED: one SystemBuffer, the input
//! copied in, the IOCTL code and both lengths in the stack location), `CloseHandle` an
//! IRP_MJ_CLOSE, each sent to the image's `MajorFunction` through `io::send` (which books every
//! completion). The reply is built from `IoStatus` as the I/O manager and the Windows client
//! would see it ([`reply_of`]). When the runner presses the power button, the session closes
//! the machine's books, then DriverUnload runs and the verifier's books are printed.
//!
//! Simplifications, each named where it is made:
//! - one open/close per request: ackctl on Windows opens the device once per command and sends
//!   its requests on that handle; here each frame is a command of its own, so the file books
//!   (`creates`, `closes`) count one of each per request;
//! - the I/O manager's own checks before the dispatch routine (the handle's access rights for
//!   the code's `RequiredAccess`) are not made: the test machine's link has one user;
//! - no preemption (`sched`): the serving thread keeps the BSP while it serves, so the image's
//!   log worker, created on the BSP, runs when the serving thread moves to another CPU or at
//!   unload, not every 250 ms.
//!
//! The requests run on the BSP's initial thread, which the image moves to each CPU and back
//! (`KeSetSystemGroupAffinityThread`, `sched`) to set a mode everywhere; the APs wait in their
//! scheduler loop for it. Only the BSP runs the workload (`control::serve_session`).
//!
//! **Runs in:** PASSIVE, the BSP's initial thread (the serve session's poll; moved to every CPU
//! and back by the image).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use ackvisor_vmm::Mode;
use ackvisor_vmm::control::Request;

use ackvisor_vmm::control::serve::{Responder, Served, serve_with};
use ackvisor_vmm::control::wire::{
    self, CpuModeEntry, CpuStats, ERROR_MAGIC, ErrorReply, Field, SetModeReply, StatsReply,
    StatusReply,
};
use ackvisor_vmm::stats::Snapshot;

use super::io;
use super::layout::DRIVER_OBJECT;
use crate::params::Params;
use crate::percpu::MAX_CPUS;
use crate::report::Line;

const NAME: &str = "nt-serve";

// `ackctl stats --per-cpu` on the most CPUs the kernel runs must fit the system buffer.
const _: () = assert!(io::BUFFER_BYTES >= StatsReply::SIZE + (MAX_CPUS + 1) * CpuStats::SIZE);

/// The image's driver object while the session runs (null before DriverEntry succeeded).
static DRIVER: AtomicPtr<DRIVER_OBJECT> = AtomicPtr::new(core::ptr::null_mut());

/// IRP_MJ_CREATEs the image completed with success: file objects opened.
pub static CREATES: AtomicU64 = AtomicU64::new(0);
/// IRP_MJ_CLOSEs the image completed with success: file objects closed. Equal to [`CREATES`] at
/// the end, or a handle leaked.
pub static CLOSES: AtomicU64 = AtomicU64::new(0);
/// IRP_MJ_DEVICE_CONTROLs the image's dispatch routine received.
pub static DEVICE_CONTROLS: AtomicU64 = AtomicU64::new(0);
/// Client requests that completed with an NTSTATUS outside the protocol's convention (neither
/// success nor ackvisor's facility): answered with that NTSTATUS and no body.
pub static FOREIGN_STATUSES: AtomicU64 = AtomicU64::new(0);
/// Statistics resets the clients asked for and the image did. Each restarts the machine's
/// books with the image's (`control::with_books_restarted`).
pub static CLIENT_RESETS: AtomicU64 = AtomicU64::new(0);
/// Client resets during which the workload did not drain (the books then do not restart
/// together).
pub static UNDRAINED_RESETS: AtomicU64 = AtomicU64::new(0);

/// Requests after which the serving thread ran on another CPU than before: the image's per-CPU
/// loop must leave it where it was (KeRevertToUserGroupAffinityThread).
pub static CPU_CHANGES: AtomicU64 = AtomicU64::new(0);

/// The image's mode as the last successful set-mode request left it (`Mode as u32`;
/// [`NO_MODE`] before the first).
static MODE: AtomicU32 = AtomicU32::new(NO_MODE);
const NO_MODE: u32 = u32::MAX;
/// The mode has not changed since the books last started (the session's start or a client's
/// reset): the image's counters then all come from that one mode.
static STEADY: AtomicBool = AtomicBool::new(false);

/// `NT_SUCCESS`: severity success or informational.
const fn nt_success(status: i32) -> bool {
    status >= 0
}

/// Warning severity (bits 31:30 = 2): METHOD_BUFFERED still copies `Information` bytes back.
const fn nt_warning(status: i32) -> bool {
    (status as u32) >> 30 == 2
}

/// One request as `ackctl` on Windows makes it: open the device, one DeviceIoControl, close.
/// The status and `Information` of the DeviceIoControl (or of the CREATE that failed); the reply
/// is in `output` up to `Information` bytes. None when the image has no dispatch routine for a
/// major function (or the lengths exceed the system buffer). A client's statistics reset
/// restarts the machine's books with it.
fn request(code: u32, input: &[u8], output: &mut [u8], client: bool) -> Option<io::Outcome> {
    let driver = DRIVER.load(Ordering::Acquire);
    if driver.is_null() {
        return None;
    }
    let cpu_before = this_cpu_index();
    let create = io::send(driver, io::IRP_MJ_CREATE, 0, &[], &mut [])?;
    if !nt_success(create.status) {
        // CreateFileW fails: no handle, nothing to send or close.
        return Some(create);
    }
    CREATES.fetch_add(1, Ordering::AcqRel);
    let mut send = || io::send(driver, io::IRP_MJ_DEVICE_CONTROL, code, input, output);
    let outcome = if client && code == wire::IOCTL_RESET_STATS {
        let (outcome, drained) = crate::control::with_books_restarted(send);
        if outcome.is_some_and(|o| o.status == 0) {
            CLIENT_RESETS.fetch_add(1, Ordering::AcqRel);
            STEADY.store(true, Ordering::Release);
            if !drained {
                UNDRAINED_RESETS.fetch_add(1, Ordering::AcqRel);
            }
        }
        outcome
    } else {
        send()
    };
    if outcome.is_some() {
        DEVICE_CONTROLS.fetch_add(1, Ordering::AcqRel);
    }
    // The file object is closed once the image completed the IRP_MJ_CLOSE with success (its
    // completion is booked by `io` like every other).
    if io::send(driver, io::IRP_MJ_CLOSE, 0, &[], &mut []).is_some_and(|o| nt_success(o.status)) {
        CLOSES.fetch_add(1, Ordering::AcqRel);
    }
    if this_cpu_index() != cpu_before {
        CPU_CHANGES.fetch_add(1, Ordering::AcqRel);
    }
    if let Some(o) = outcome
        && code == wire::IOCTL_SET_MODE
        && o.status == 0
        && let Some(reply) = output.get(..o.information.min(output.len()))
        && let Some(r) = SetModeReply::decode(reply)
        && MODE.swap(r.mode, Ordering::AcqRel) != r.mode
    {
        STEADY.store(false, Ordering::Release);
    }
    outcome
}

/// The CPU the calling thread runs on now.
fn this_cpu_index() -> u32 {
    crate::percpu::this_cpu().index.load(Ordering::Relaxed)
}

/// What goes on the wire for one completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WireReply {
    /// The response's status word (0 = success).
    status: u32,
    /// Bytes of the output buffer that form the body.
    body: usize,
    /// The body is an [`ErrorReply`] the server writes itself (the image's had no room).
    synthesized: bool,
    /// The NTSTATUS is outside the protocol's convention.
    foreign: bool,
}

/// The reply from `IoStatus`, as `ackctl`'s Windows side receives it:
/// - success: `Information` bytes of the output buffer, never more than the buffer holds;
/// - ackvisor's warning status (`wire::nt_warning`): METHOD_BUFFERED copied `Information` bytes,
///   the image's [`ErrorReply`]; the protocol status is the NTSTATUS's code;
/// - ackvisor's error status (`wire::nt_error`): nothing copied; the client knows only the code
///   (from `GetLastError`), so the reply is an [`ErrorReply`] of that code without arguments,
///   as `DeviceTransport` builds it;
/// - any other NTSTATUS: that status as the response's status word, no body (ackctl reports a
///   reply it cannot read; on Windows it would report the OS error).
fn reply_of(status: i32, information: usize, output_len: usize) -> WireReply {
    let copied = information.min(output_len);
    if status == 0 {
        return WireReply {
            status: 0,
            body: copied,
            synthesized: false,
            foreign: false,
        };
    }
    match wire::status_from_win32(status as u32) {
        Some(code) if nt_warning(status) => WireReply {
            status: code,
            body: copied,
            synthesized: false,
            foreign: false,
        },
        Some(code) => WireReply {
            status: code,
            body: ErrorReply::SIZE,
            synthesized: true,
            foreign: false,
        },
        None => WireReply {
            status: status as u32,
            body: 0,
            synthesized: false,
            foreign: true,
        },
    }
}

/// [`control::serve::serve`](ackvisor_vmm::control::serve::serve) with the image behind it:
/// decodes the frame at the front of `received` and writes the answer into `reply` (a NAK for a
/// broken frame, exactly as the core's server does; a response built from the IRPs for a
/// request).
pub fn serve(received: &[u8], reply: &mut [u8], max_request_payload: usize) -> Served {
    serve_with(&Image, received, reply, max_request_payload)
}

/// The loaded image as the server's [`Responder`].
struct Image;

/// One request through the image. The output buffer is what `DeviceTransport::call` passes:
/// the client's capacity, but always room for an [`ErrorReply`] (so a refusal arrives with its
/// arguments); bounded by the server's reply buffer and the system buffer.
impl Responder for Image {
    fn respond(
        &self,
        code: u32,
        capacity: u32,
        input: &[u8],
        body: &mut [u8],
    ) -> Option<(u32, usize)> {
        let output_len = (capacity as usize)
            .max(ErrorReply::SIZE)
            .min(body.len())
            .min(io::BUFFER_BYTES);
        let output = body.get_mut(..output_len)?;
        let wire_reply = match request(code, input, output, true) {
            Some(o) => reply_of(o.status, o.information, output_len),
            // No dispatch routine: NT fails the open with STATUS_INVALID_DEVICE_REQUEST.
            None => reply_of(STATUS_INVALID_DEVICE_REQUEST, 0, output_len),
        };
        if wire_reply.synthesized {
            let error = ErrorReply {
                magic: ERROR_MAGIC,
                status: wire_reply.status,
                arg0: 0,
                arg1: 0,
                arg2: 0,
                reserved: 0,
            };
            error.encode(body)?;
        }
        if wire_reply.foreign {
            FOREIGN_STATUSES.fetch_add(1, Ordering::AcqRel);
        }
        Some((wire_reply.status, wire_reply.body))
    }
}

/// `STATUS_INVALID_DEVICE_REQUEST`.
const STATUS_INVALID_DEVICE_REQUEST: i32 = 0xC000_0010_u32 as i32;

/// The kernel's own requests' output (the session's status and statistics reads).
struct Out(UnsafeCell<[u8; io::BUFFER_BYTES]>);
// SAFETY: used by the serving thread only (the BSP's initial thread), one request at a time.
unsafe impl Sync for Out {}
static OUT: Out = Out(UnsafeCell::new([0; io::BUFFER_BYTES]));

/// A request of the kernel's own (opened and closed like a client's); the reply bytes on
/// success.
fn own_request(req: Request, out_len: usize) -> Option<&'static [u8]> {
    let (input, n) = req.encode();
    // SAFETY: the only reference to OUT while this request runs (see `Out`); the returned
    // borrow is dropped before the next own request (each caller decodes it at once).
    let out = unsafe { &mut *OUT.0.get() };
    let out = out.get_mut(..out_len)?;
    let o = request(req.code(), input.get(..n)?, out, false)?;
    (o.status == 0).then(|| &out[..o.information.min(out_len)])
}

/// The image's status: virtualized CPUs, the first CPU's mode, and whether every virtualized
/// CPU is in that mode. None when the request failed.
pub fn image_status() -> Option<(u32, Option<Mode>, bool)> {
    let reply = own_request(
        Request::Status,
        StatusReply::SIZE + MAX_CPUS * CpuModeEntry::SIZE,
    )?;
    let (status, mut rest) = StatusReply::decode_prefix(reply)?;
    let mut first = None;
    let mut agree = true;
    for _ in 0..status.cpu_count {
        let (entry, tail) = CpuModeEntry::decode_prefix(rest)?;
        rest = tail;
        if let Ok(mode) = Mode::try_from(entry.mode) {
            match first {
                None => first = Some(mode),
                Some(m) => agree &= m == mode,
            }
        }
    }
    Some((status.virtualized_count, first, agree))
}

/// Zeroes the image's statistics (the session's start: both books start together).
pub fn reset_image_stats() -> bool {
    let done = own_request(Request::ResetStats, wire::ResetStatsReply::SIZE).is_some();
    STEADY.store(done, Ordering::Release);
    done
}

/// The image's counters of each CPU, read once at the close of the books.
struct Snapshots(UnsafeCell<[Snapshot; MAX_CPUS]>);
// SAFETY: written by the serving thread in `read_image_stats`, read afterwards by it only.
unsafe impl Sync for Snapshots {}
static SNAPSHOTS: Snapshots = Snapshots(UnsafeCell::new(
    // SAFETY: Snapshot is u64 counters and arrays of them: zero is valid.
    unsafe { core::mem::zeroed() },
));
/// CPUs whose counters [`read_image_stats`] read (bit per CPU index).
static READ_CPUS: AtomicU64 = AtomicU64::new(0);

/// Reads the image's per-CPU statistics (the IOCTL `ackctl stats --per-cpu` sends) into
/// [`SNAPSHOTS`]; the CPUs it got are then available through [`image_stats`].
pub fn read_image_stats() {
    READ_CPUS.store(0, Ordering::Release);
    let Some(reply) = own_request(
        Request::Stats { per_cpu: true },
        StatsReply::SIZE + (MAX_CPUS + 1) * CpuStats::SIZE,
    ) else {
        return;
    };
    let Some((header, entries)) = StatsReply::decode_prefix(reply) else {
        return;
    };
    if header.entry_size as usize != CpuStats::SIZE {
        return;
    }
    // The aggregate first, then one entry per CPU.
    let mut got = 0u64;
    for entry in entries.chunks_exact(CpuStats::SIZE).skip(1) {
        let Some(cpu) = entry.get(..4).and_then(|b| b.try_into().ok()) else {
            continue;
        };
        let index = u32::from_le_bytes(cpu) as usize;
        // SAFETY: the serving thread only (see `Snapshots`); no reference into SNAPSHOTS is live.
        let snapshots = unsafe { &mut *SNAPSHOTS.0.get() };
        if let Some(slot) = snapshots.get_mut(index)
            && fill(slot, entry)
        {
            got |= 1 << index;
        }
    }
    READ_CPUS.store(got, Ordering::Release);
}

/// The counters of one [`CpuStats`] entry into `s`, field by field in wire order (decoding the
/// entry whole would put a 7 KiB value on the stack).
fn fill(s: &mut Snapshot, entry: &[u8]) -> bool {
    let Some(counters) = entry.get(wire::CPU_STATS_COUNTERS_OFFSET..) else {
        return false;
    };
    let mut words = counters
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
    let slots = s
        .exits
        .iter_mut()
        .chain(s.extint_by_vector.iter_mut())
        .chain(s.replays_by_vector.iter_mut())
        .chain(s.injections_by_vector.iter_mut())
        .chain([&mut s.deferrals, &mut s.sti_windows, &mut s.guest_takes])
        .chain(s.anomalies.iter_mut())
        .chain([
            &mut s.cycles_count,
            &mut s.cycles_sum,
            &mut s.cycles_max,
            &mut s.handler_cycles_sum,
        ])
        .chain(s.histogram.iter_mut());
    let mut filled = 0;
    for slot in slots {
        let Some(w) = words.next() else {
            return false;
        };
        *slot = w;
        filled += 1;
    }
    filled * 8 + wire::CPU_STATS_COUNTERS_OFFSET == CpuStats::SIZE
}

/// CPU `index`'s counters from the last [`read_image_stats`], if it read them.
pub fn image_stats(index: usize) -> Option<&'static Snapshot> {
    if index >= MAX_CPUS || READ_CPUS.load(Ordering::Acquire) & (1 << index) == 0 {
        return None;
    }
    // SAFETY: written only in `read_image_stats`, which has returned; shared reads only.
    let snapshots = unsafe { &*SNAPSHOTS.0.get() };
    snapshots.get(index)
}

/// The scenario: DriverEntry, the serve session through the image, DriverUnload, the books.
pub fn scenario(p: &Params) {
    // CPUID's cost on each CPU before the load, to tell virtualized CPUs by it afterwards.
    let native = super::cpus::probe_each();
    let Some((driver, status)) = super::driver::enter(NAME) else {
        return;
    };
    let loaded = super::cpus::probe_each();
    // SAFETY: DriverEntry has returned; only this thread reads the object.
    let unload = unsafe { (*driver).DriverUnload };
    if status < 0 {
        let mut line = Line::new(NAME);
        line.kv("fatal", 1)
            .kv("loaded", 0)
            .kv("entry_status", format_args!("{:#010x}", status as u32));
        super::driver::write_books(&mut line);
        line.print();
        return;
    }
    DRIVER.store(driver, Ordering::Release);
    // The session starts in `start_mode`, as the core's does (DriverEntry leaves passthrough).
    let mode = Mode::try_from(p.start_mode).unwrap_or(Mode::AckReplay);
    let started = own_request(Request::SetMode(mode), SetModeReply::SIZE)
        .and_then(SetModeReply::decode)
        .is_some_and(|r| r.mode == mode as u32);
    let moves_before = super::sched::MOVES.load(Ordering::Acquire);
    crate::control::serve_session(p, crate::control::Backend::Driver);
    let session_moves = super::sched::MOVES
        .load(Ordering::Acquire)
        .wrapping_sub(moves_before);
    // The workload has drained: nothing is in flight, both books are final.
    read_image_stats();
    let mut agreement = Line::new(NAME);
    agreement.kv("start_mode_set", u8::from(started));
    write_agreement(&mut agreement);
    agreement.print();
    DRIVER.store(core::ptr::null_mut(), Ordering::Release);
    if let Some(unload) = unload {
        // SAFETY: DriverUnload of the image, set by DriverEntry, called once at PASSIVE.
        unsafe { unload(driver) };
    }
    let after = super::cpus::probe_each();
    let mut line = Line::new(NAME);
    line.kv("loaded", 1)
        .kv("entry_status", format_args!("{:#010x}", status as u32))
        .kv(
            "virtualized_by_cpuid",
            super::cpus::count_virtualized(&native, &loaded),
        )
        .kv("unloaded", u32::from(unload.is_some()))
        .kv(
            "virtualized_after",
            super::cpus::count_virtualized(&native, &after),
        )
        .kv("session_moves", session_moves)
        .kv("cpu_changes", CPU_CHANGES.load(Ordering::Acquire))
        .kv("creates", CREATES.load(Ordering::Acquire))
        .kv("closes", CLOSES.load(Ordering::Acquire))
        .kv("device_controls", DEVICE_CONTROLS.load(Ordering::Acquire))
        .kv("foreign_statuses", FOREIGN_STATUSES.load(Ordering::Acquire))
        .kv("client_resets", CLIENT_RESETS.load(Ordering::Acquire))
        .kv("undrained_resets", UNDRAINED_RESETS.load(Ordering::Acquire));
    super::driver::write_books(&mut line);
    line.print();
}

/// The image's statistics against the machine's own tallies on the BSP (the one workload CPU),
/// both since the books last started. When the mode was ack-inject throughout, each interrupt
/// is one external-interrupt exit and one injection and runs once in the guest, so per vector
/// the image's exits and injections equal the machine's handler runs: `agreement_mismatch` is
/// Σ over vectors of |exits − runs| + |injections − runs|. In other modes the relation is not
/// one to one (exit-sti and ack-replay take some interrupts in root without an exit), so the
/// mismatch is not computed (`agreement_mismatch=-`).
fn write_agreement(line: &mut Line) {
    let mode = MODE.load(Ordering::Acquire);
    let steady = STEADY.load(Ordering::Acquire);
    let name = match Mode::try_from(mode) {
        Ok(m) if steady => m.name(),
        _ => "mixed",
    };
    line.kv("agreement_mode", name);
    let Some(image) = image_stats(0) else {
        line.kv("agreement_read", 0);
        return;
    };
    let runs = &crate::percpu::CPUS[0].counts.runs;
    let (mut exits, mut injections, mut machine, mut mismatch) = (0u64, 0u64, 0u64, 0u64);
    for v in 0..=255u8 {
        let i = usize::from(v);
        let ran = u64::from(runs.get(v));
        exits += image.extint_by_vector[i];
        injections += image.injections_by_vector[i];
        machine += ran;
        mismatch += image.extint_by_vector[i].abs_diff(ran);
        mismatch += image.injections_by_vector[i].abs_diff(ran);
    }
    line.kv("agreement_read", 1)
        .kv("image_extint", exits)
        .kv("image_injections", injections)
        .kv("machine_runs", machine);
    if name == Mode::AckInject.name() {
        line.kv("agreement_mismatch", mismatch);
    } else {
        line.kv("agreement_mismatch", "-");
    }
}
