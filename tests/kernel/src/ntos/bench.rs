//! Scenario `nt-bench`: the test kernel's `bench` (crate::bench) with the real ackvisor.sys as
//! the hypervisor, so the image's own exit path is measured: its exit stub, its core built for
//! Windows, and its NT platform, which raises and lowers IRQL around every replay and exit-sti
//! window by calling KfRaiseIrql and KeLowerIrql through its import table (here the miniature
//! NT's exports).
//!
//! The same two instruments as `bench`, on one CPU:
//! - **Gap**: the BSP spins on the TSC for `bench_ticks` clock ticks per mode; the runner
//!   subtracts passthrough's mean gap.
//! - **Trace**: `trace_ticks` more ticks halted between two magic breakpoints. The image has no
//!   breakpoints of its own and nothing of it changes: the runner finds its exit stub (HOST_RIP)
//!   in the image's PDB and adds the load base this scenario prints.
//!
//! Between the two, the guest keeps a pattern in XMM0 and XMM1 across `CANARY_TICKS` halted
//! ticks and counts those that changed it (`xmm_clobbered`).
//!
//! The image's statistics IOCTL counts the external-interrupt exits and replays of each phase:
//! the runner compares them with the windows the trace closed.
//!
//! **Runs in:** PASSIVE, BSP, one CPU.

use core::cell::UnsafeCell;
use core::mem::offset_of;

use ackvisor_vmm::Mode;
use ackvisor_vmm::control::Request;
use ackvisor_vmm::control::wire::{
    CpuStats, Field, ResetStatsReply, SetModeReply, SetPolicyReply, StatsReply,
};
use ackvisor_vmm::intr::vector_policy::VectorPolicy;

use super::io;
use super::layout::DRIVER_OBJECT;
use crate::interrupts::{self, CLOCK_VECTOR};
use crate::params::Params;
use crate::report::Line;

const NAME: &str = "nt-bench";
/// The external-interrupt exit reason.
const EXIT_EXTERNAL_INTERRUPT: usize = 1;
/// A stats reply with the aggregate entry only.
const STATS_BYTES: usize = StatsReply::SIZE + CpuStats::SIZE;

/// Reply buffer (static: a stats reply is over the 4 KiB a frame may hold).
struct Out(UnsafeCell<[u8; io::BUFFER_BYTES]>);
// SAFETY: used by the BSP's scenario only, one request at a time.
unsafe impl Sync for Out {}
static OUT: Out = Out(UnsafeCell::new([0; io::BUFFER_BYTES]));

/// One DEVICE_CONTROL; the status and the reply's bytes (up to `out_len`).
fn ioctl(driver: *mut DRIVER_OBJECT, request: Request, out_len: usize) -> Option<&'static [u8]> {
    let (input, n) = request.encode();
    // SAFETY: the only reference to OUT while this request runs (see `Out`).
    let out = unsafe { &mut *OUT.0.get() };
    let out = out.get_mut(..out_len)?;
    let o = io::send(
        driver,
        io::IRP_MJ_DEVICE_CONTROL,
        request.code(),
        input.get(..n)?,
        out,
    )?;
    (o.status == 0).then_some(&out[..o.information.min(out_len)])
}

/// The aggregate's external-interrupt exits and clock replays, or None.
fn counts(driver: *mut DRIVER_OBJECT) -> Option<(u64, u64)> {
    let reply = ioctl(driver, Request::Stats { per_cpu: false }, STATS_BYTES)?;
    let (_, entry) = StatsReply::decode_prefix(reply)?;
    // CpuStats is #[repr(C)] with its wire size (asserted by `wire_struct!`): its field
    // offsets are the wire's. Read two u64s instead of decoding 7 KiB onto the stack.
    let at = |offset: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            entry.get(offset..offset + 8)?.try_into().ok()?,
        ))
    };
    let exits = at(offset_of!(CpuStats, exits) + EXIT_EXTERNAL_INTERRUPT * 8)?;
    let replays = at(offset_of!(CpuStats, replays_by_vector) + usize::from(CLOCK_VECTOR) * 8)?;
    Some((exits, replays))
}

/// Prints a `fatal=1` line naming what failed.
fn fail(what: &str) {
    Line::new(NAME).kv("fatal", 1).kv("failed", what).print();
}

/// The scenario.
pub fn run(p: &Params) {
    if crate::percpu::online_count() != 1 {
        fail("cpus(one_cpu_only)");
        return;
    }
    // DriverEntry as nt-driver calls it; the load base is where the loader put the image.
    let Some((driver, status)) = super::driver::enter(NAME) else {
        return;
    };
    let image_base = super::quirks::IMAGE_START.load(core::sync::atomic::Ordering::Acquire);
    // SAFETY: DriverEntry has returned; the object is read on this CPU only.
    let unload = unsafe { (*driver).DriverUnload };
    if status < 0 {
        Line::new(NAME)
            .kv("fatal", 1)
            .kv("entry_status", format_args!("{:#010x}", status as u32))
            .print();
        return;
    }
    let (gates_lo, gates_hi) = interrupts::device_gate_range();
    let export = |name: &[u8]| super::exports::find(b"ntoskrnl.exe", name).unwrap_or(0);
    Line::new(NAME)
        .kv("map", 1)
        .kv("image_base", format_args!("{image_base:#x}"))
        .kv("gates_lo", format_args!("{gates_lo:#x}"))
        .kv("gates_hi", format_args!("{gates_hi:#x}"))
        .kv("gate_stride", interrupts::STUB_BYTES)
        .kv("raise_irql", format_args!("{:#x}", export(b"KfRaiseIrql")))
        .kv("lower_irql", format_args!("{:#x}", export(b"KeLowerIrql")))
        .print();
    let create = io::send(driver, io::IRP_MJ_CREATE, 0, &[], &mut []);
    if create.is_none_or(|o| o.status != 0) {
        fail("create");
    } else if ioctl(
        driver,
        Request::SetPolicy(CLOCK_VECTOR, VectorPolicy::Replay),
        SetPolicyReply::SIZE,
    )
    .is_none()
    {
        // The image's default for NT's clock vector is `auto`, which injects the ticks of a
        // guest at IRQL 0; the benchmark measures the replay path, as `bench` does.
        fail("set_policy");
    } else {
        crate::bench::set_measuring(true);
        for mode in Mode::ALL {
            if !measure(driver, mode, p) {
                break;
            }
        }
        crate::bench::set_measuring(false);
        let close = io::send(driver, io::IRP_MJ_CLOSE, 0, &[], &mut []);
        if close.is_none_or(|o| o.status != 0) {
            fail("close");
        }
    }
    if let Some(unload) = unload {
        // SAFETY: DriverUnload of the image, set by DriverEntry, called once at PASSIVE.
        unsafe { unload(driver) };
    }
    Line::new(NAME)
        .kv("unloaded", u32::from(unload.is_some()))
        .kv("leaks", super::routines::BOOKS.leaks())
        .kv(
            "irql_violations",
            super::exports::IRQL_VIOLATIONS.load(core::sync::atomic::Ordering::Acquire),
        )
        .print();
}

/// Clock ticks per mode of the vector-register canary.
const CANARY_TICKS: u32 = 16;
/// What the canary keeps in XMM0 and XMM1 across each halted tick.
const CANARY: [u64; 2] = [0x5afe_0a11_c0de_0001, 0x5afe_0a11_c0de_0002];

/// Ticks on which the guest's XMM0 or XMM1 came back changed: the guest keeps a pattern in
/// both across each halted tick (`sti; hlt`). An interrupt, delivered by the CPU, injected or
/// replayed, must give the interrupted code its vector registers back, as NT's interrupt
/// entry and the exit stub's FXSAVE do; passthrough is the baseline with no exit at all.
fn xmm_clobbered(ticks: u32, period: u32) -> u32 {
    let cpu = crate::percpu::this_cpu();
    let start = cpu.counts.runs.get(CLOCK_VECTOR);
    let mut clobbered = 0;
    crate::arch::cli();
    interrupts::clock_start(period);
    while cpu.counts.runs.get(CLOCK_VECTOR) - start < ticks {
        let (x0, x1): (u64, u64);
        // SAFETY: loads two XMM registers (declared clobbered), halts until the clock's tick
        // (its handler only counts and re-arms) and reads them back; `sti; hlt` is atomic.
        unsafe {
            core::arch::asm!(
                "movq xmm0, {c0}",
                "movq xmm1, {c1}",
                "sti",
                "hlt",
                "cli",
                "movq {x0}, xmm0",
                "movq {x1}, xmm1",
                c0 = in(reg) CANARY[0],
                c1 = in(reg) CANARY[1],
                x0 = lateout(reg) x0,
                x1 = lateout(reg) x1,
                out("xmm0") _,
                out("xmm1") _,
                options(nostack),
            )
        };
        clobbered += u32::from([x0, x1] != CANARY);
    }
    interrupts::clock_stop();
    // SAFETY: the last armed tick drains with IF=1; the handler is ready.
    unsafe { crate::arch::sti() };
    crate::workload::drain();
    clobbered
}

/// One mode: the gap phase, the canary, then the traced phase; one line. False when a request
/// failed.
fn measure(driver: *mut DRIVER_OBJECT, mode: Mode, p: &Params) -> bool {
    let applied = ioctl(driver, Request::SetMode(mode), SetModeReply::SIZE)
        .and_then(SetModeReply::decode)
        .is_some_and(|r| r.mode == mode as u32);
    if !applied || ioctl(driver, Request::ResetStats, ResetStatsReply::SIZE).is_none() {
        fail("set_mode");
        return false;
    }
    let g = crate::bench::gap_spin(p.bench_ticks, p.clock_period);
    let clobbered = xmm_clobbered(CANARY_TICKS, p.clock_period);
    let Some((gap_exits, gap_replays)) = counts(driver) else {
        fail("stats");
        return false;
    };
    if p.trace_ticks > 0 {
        crate::bench::magic_break();
        crate::bench::halt_ticks(p.trace_ticks, p.clock_period);
        crate::bench::magic_break();
    }
    let Some((exits, replays)) = counts(driver) else {
        fail("stats");
        return false;
    };
    Line::new(NAME)
        .kv("mode", mode.name())
        .kv("ticks", p.bench_ticks)
        .kv("gap_sum", g.sum)
        .kv("gaps", g.count)
        .kv("xmm_clobbered", clobbered)
        .kv("exits_traced", exits.saturating_sub(gap_exits))
        .kv("replays_traced", replays.saturating_sub(gap_replays))
        .print();
    true
}
