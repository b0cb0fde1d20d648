//! The test machine's control server and the `serve` scenario.
//!
//! The BSP serves `ackvisor_vmm::control::serve` (with `control::Live`, the same dispatcher NT's
//! IRP_MJ_DEVICE_CONTROL reaches) on COM1 ([`crate::uart`]), polled between its workload rounds,
//! while every CPU keeps the workload's interrupts flowing: clock, self-IPIs and cross-CPU IPIs.
//! APs run their share from the idle loop (`smp::ap_main`) and poll their mailbox between
//! rounds, so a mode change from `ackctl` (`set_mode_all` → `Platform::for_each_cpu`) reaches
//! every CPU while its interrupts arrive.
//!
//! With the [`Backend::Driver`] (scenario `nt-serve`, `ntos::serve`), the requests go to the real
//! ackvisor.sys as IRPs instead, and only the BSP runs the workload (see [`serve_session`]).
//!
//! Besides frames, the link carries one word for the runner: [`FINISH`], the machine's power
//! button. On it every CPU finishes its rounds (at least `min_rounds`), stops its sources, the
//! team drains, each CPU closes its books (raised == handled per vector, LAPIC ISR empty), and
//! the BSP prints `RESULT serve` lines, devirtualizes and powers off.
//!
//! **Runs in:** PASSIVE (the BSP's server; the APs' loop).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};

use ackvisor_vmm::control::Live;
use ackvisor_vmm::control::frame;
use ackvisor_vmm::control::serve::{ServeEvent, serve};
use ackvisor_vmm::control::wire::{self, Field};
use ackvisor_vmm::hypervisor;
use ackvisor_vmm::{CpuIndex, Mode};

use crate::params::Params;
use crate::percpu::{CPUS, MAX_CPUS, online_count, this_cpu};
use crate::report::Line;
use crate::workload::{self, Barrier, Shape, Tally};
use crate::{arch, interrupts, smp, uart};

/// The runner's "finish" word (not a frame: the frame decoder would call it garbage).
pub const FINISH: &[u8] = b"ACK!FINISH";

/// Largest request payload accepted: prefix plus the largest request struct.
const MAX_REQUEST_PAYLOAD: usize = frame::REQUEST_PREFIX + wire::MAX_REQUEST_BYTES;
const RX_BYTES: usize = 256;
/// Room for the largest reply: stats with the aggregate and one entry per CPU.
const TX_BYTES: usize = frame::OVERHEAD
    + frame::RESPONSE_PREFIX
    + wire::StatsReply::SIZE
    + (MAX_CPUS + 1) * wire::CpuStats::SIZE;
/// TSC ticks one poll may spend before the BSP goes back to its workload.
const POLL_BUDGET: u64 = 400_000;
/// Within a poll, how long to wait for the next byte of a frame in progress. Bochs hands the
/// guest one byte per character time and only once the previous one was read.
const BYTE_GAP: u64 = 20_000;
/// Silence in the middle of a frame after which it is answered as truncated.
const SILENCE: u64 = 30_000_000;

/// What the server did, for the RESULT line.
#[derive(Clone, Copy, Default)]
pub struct LinkCounts {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Requests answered (any status).
    pub requests: u64,
    /// Requests answered with status 0.
    pub ok: u64,
    /// Requests refused (status ≠ 0).
    pub refused: u64,
    /// Mode changes applied.
    pub set_modes: u64,
    /// Broken frames answered with a NAK (truncated ones included).
    pub naks: u64,
    /// Frames answered as truncated after a silence.
    pub truncated: u64,
    /// Garbage runs dropped.
    pub discarded: u64,
    /// Replies that did not fit (never expected).
    pub too_small: u64,
}

struct Server {
    rx: [u8; RX_BYTES],
    rx_len: usize,
    last_rx: u64,
    tx: [u8; TX_BYTES],
    tx_len: usize,
    tx_sent: usize,
    counts: LinkCounts,
}

struct BspOnly(UnsafeCell<Server>);
// SAFETY: only the BSP touches the server (its workload's poll and the scenario around it),
// never from an interrupt handler.
unsafe impl Sync for BspOnly {}
static SERVER: BspOnly = BspOnly(UnsafeCell::new(Server {
    rx: [0; RX_BYTES],
    rx_len: 0,
    last_rx: 0,
    tx: [0; TX_BYTES],
    tx_len: 0,
    tx_sent: 0,
    counts: LinkCounts {
        rx_bytes: 0,
        tx_bytes: 0,
        requests: 0,
        ok: 0,
        refused: 0,
        set_modes: 0,
        naks: 0,
        truncated: 0,
        discarded: 0,
        too_small: 0,
    },
}));

/// Set once the runner pressed the power button.
static FINISHING: AtomicBool = AtomicBool::new(false);

/// What answers the requests.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The test kernel's own core (`control::Live`), virtualized by the scenario.
    Core = 0,
    /// The real ackvisor.sys, loaded by the miniature NT: each request becomes IRPs
    /// (`ntos::serve`).
    Driver = 1,
}

/// The session's [`Backend`] (`Backend as u8`).
static BACKEND: AtomicU8 = AtomicU8::new(Backend::Core as u8);

fn backend() -> Backend {
    if BACKEND.load(Ordering::Acquire) == Backend::Driver as u8 {
        Backend::Driver
    } else {
        Backend::Core
    }
}

impl Server {
    fn consume(&mut self, n: usize) {
        let n = n.min(self.rx_len);
        self.rx.copy_within(n..self.rx_len, 0);
        self.rx_len -= n;
    }

    fn count(&mut self, event: ServeEvent) {
        let c = &mut self.counts;
        match event {
            ServeEvent::Idle => {}
            ServeEvent::Answered { code, status } => {
                c.requests += 1;
                if status == 0 {
                    c.ok += 1;
                    if code == wire::IOCTL_SET_MODE {
                        c.set_modes += 1;
                    }
                } else {
                    c.refused += 1;
                }
            }
            ServeEvent::Nak(_) => c.naks += 1,
            ServeEvent::Discarded(_) => c.discarded += 1,
            ServeEvent::ReplyBufferTooSmall(_) => c.too_small += 1,
        }
    }

    /// One server step within [`POLL_BUDGET`]: send what is pending, take what arrived, answer
    /// complete frames, answer a frame cut off by a long silence as truncated.
    fn poll(&mut self) {
        let start = arch::rdtsc();
        loop {
            if self.tx_sent < self.tx_len {
                let n = uart::write(&self.tx[self.tx_sent..self.tx_len]);
                self.tx_sent += n;
                self.counts.tx_bytes += n as u64;
                if self.tx_sent < self.tx_len {
                    if arch::rdtsc() - start > POLL_BUDGET {
                        return;
                    }
                    continue;
                }
                (self.tx_sent, self.tx_len) = (0, 0);
            }
            while self.rx_len < RX_BYTES {
                let Some(b) = uart::read() else { break };
                self.rx[self.rx_len] = b;
                self.rx_len += 1;
                self.counts.rx_bytes += 1;
                self.last_rx = arch::rdtsc();
            }
            let rx = &self.rx[..self.rx_len];
            if rx.starts_with(FINISH) {
                FINISHING.store(true, Ordering::Release);
                self.consume(FINISH.len());
                continue;
            }
            let waiting_for_finish = !rx.is_empty() && FINISH.starts_with(rx);
            if !waiting_for_finish {
                let s = match backend() {
                    Backend::Core => serve(&Live, rx, &mut self.tx, MAX_REQUEST_PAYLOAD),
                    Backend::Driver => {
                        crate::ntos::serve::serve(rx, &mut self.tx, MAX_REQUEST_PAYLOAD)
                    }
                };
                self.count(s.event);
                self.consume(s.consumed);
                if s.reply_len > 0 {
                    (self.tx_len, self.tx_sent) = (s.reply_len, 0);
                    continue;
                }
                if s.consumed > 0 {
                    continue;
                }
            }
            if self.rx_len == 0 {
                return;
            }
            let now = arch::rdtsc();
            let quiet = now - self.last_rx;
            if quiet > SILENCE {
                self.truncated();
                continue;
            }
            if quiet > BYTE_GAP || now - start > POLL_BUDGET {
                return;
            }
        }
    }

    /// NAKs the frame in progress as truncated and drops it (the `serve` loop's "on a long
    /// silence: frame::truncated").
    fn truncated(&mut self) {
        let rx = &self.rx[..self.rx_len];
        let error = frame::truncated(rx, MAX_REQUEST_PAYLOAD);
        // The sequence number, if the header got that far: the client matches NAKs by it.
        let seq = match rx.get(6..8) {
            Some(&[a, b]) if rx.starts_with(&frame::MAGIC) => u16::from_le_bytes([a, b]),
            _ => 0,
        };
        self.rx_len = 0;
        self.counts.truncated += 1;
        if let Some(error) = error
            && let Ok(n) = frame::encode_nak(seq, error, &mut self.tx)
        {
            self.counts.naks += 1;
            (self.tx_len, self.tx_sent) = (n, 0);
        }
    }
}

fn server() -> &'static mut Server {
    // SAFETY: BSP only (see `BspOnly`), and no two of these references are live at once: each
    // caller uses it for one poll or one read of the counts.
    unsafe { &mut *SERVER.0.get() }
}

/// Per-CPU rounds run in the serve workload.
static ROUNDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Asks an AP's idle loop to join the serve workload.
static SERVE_REQUEST: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// The serve workload's shape, set by the BSP before it wakes the APs.
static SHAPE: [AtomicU32; 5] = [const { AtomicU32::new(0) }; 5];
/// The books are closed on every CPU of the team.
static TALLIED: Barrier = Barrier::new();

fn shape() -> (Shape, u32) {
    let v = |i: usize| SHAPE[i].load(Ordering::Acquire);
    (
        Shape {
            rounds: 0,
            clock_period: v(0),
            stretch: v(1),
            team: v(2),
            cross: v(4) != 0,
        },
        v(3),
    )
}

/// Whether the BSP asked AP `index` to join the serve workload (clears the request).
pub fn take_serve_request(index: u32) -> bool {
    SERVE_REQUEST
        .get(index as usize)
        .is_some_and(|r| r.swap(false, Ordering::AcqRel))
}

/// One CPU's part: rounds until the runner finishes (and at least `min_rounds`), drain, books.
fn serve_part(poll: &mut dyn FnMut()) {
    let (shape, min_rounds) = shape();
    let cpu = this_cpu();
    let mut asked = 0u32;
    let mut done = || {
        let finish = FINISHING.load(Ordering::Acquire) && asked >= min_rounds;
        asked = asked.saturating_add(1);
        finish
    };
    let was_enabled = arch::rflags() & arch::RFLAGS_IF != 0;
    let (drained, rounds) = workload::run_until(shape, &mut done, poll);
    // SAFETY: IF=1 while the team closes its books, so a mode change posted meanwhile finds
    // this CPU able to take the interrupts it still has pending.
    unsafe { arch::sti() };
    let index = cpu.index.load(Ordering::Relaxed) as usize;
    ROUNDS[index].store(rounds, Ordering::Release);
    // The core's counters of this CPU since the serve run began (unless a client reset them):
    // its books are compared with the machine's in the RESULT lines. With the driver the
    // kernel's own core does not run (its fields stay 0); the image's counters are compared
    // with the machine's by `ntos::serve` after the session.
    let core = match backend() {
        Backend::Core => hypervisor::cpu_state(CpuIndex(index as u32)).map(|s| s.stats),
        Backend::Driver => None,
    };
    workload::publish(Tally::of(cpu, core.as_ref(), drained));
    TALLIED.wait(shape.team, poll);
    if !was_enabled {
        arch::cli();
    }
}

/// Runs `f` (a client's statistics reset, with the driver backend) with this CPU's books
/// restarted just before it: the clock stopped, every raised interrupt run, the machine's
/// counts zeroed, then `f`, then the clock re-armed if it was running. So the machine's tallies
/// and the image's counters start together again and can be compared at the end. Returns what
/// `f` returned and whether the workload drained.
pub fn with_books_restarted<R>(f: impl FnOnce() -> R) -> (R, bool) {
    let cpu = this_cpu();
    let clock_was_on = cpu.clock_on.load(Ordering::Relaxed);
    interrupts::clock_stop();
    let drained = workload::drain();
    cpu.counts.reset();
    let r = f();
    if clock_was_on {
        interrupts::clock_start(SHAPE[0].load(Ordering::Acquire));
    }
    (r, drained)
}

/// An AP's share of the serve workload, from its idle loop.
pub fn serve_ap() {
    let cpu = this_cpu();
    serve_part(&mut || smp::poll_mailbox(cpu));
}

fn virtualized_cpus() -> (u32, Option<Mode>, bool) {
    let mut count = 0;
    let mut first = None;
    let mut agree = true;
    for i in 0..online_count() {
        if let Some(s) = hypervisor::cpu_state(CpuIndex(i)) {
            count += 1;
            match first {
                None => first = Some(s.mode),
                Some(m) => agree &= m == s.mode,
            }
        }
    }
    (count, first, agree)
}

/// The virtualized CPUs, the first one's mode and whether all agree, as the backend sees them
/// (the image through its status IOCTL; a failed request counts none).
fn backend_status() -> (u32, Option<Mode>, bool) {
    match backend() {
        Backend::Core => virtualized_cpus(),
        Backend::Driver => crate::ntos::serve::image_status().unwrap_or((0, None, false)),
    }
}

/// The `serve` scenario (see the module docs).
pub fn serve_scenario(p: &Params) {
    let name = "serve";
    let mode = Mode::try_from(p.start_mode).unwrap_or(Mode::AckReplay);
    if !crate::scenarios::virtualize(name, mode) {
        return;
    }
    serve_session(p, Backend::Core);
    crate::scenarios::devirtualize(name);
}

/// The serve session with the hypervisor already loaded: the workload and the server until the
/// runner's finish word, then the books (`RESULT serve-cpu` per workload CPU, `RESULT serve`).
///
/// With [`Backend::Core`] every online CPU runs the workload. With [`Backend::Driver`] only the
/// BSP does (team of one, no cross-CPU IPIs): the APs stay in their idle loop, where the
/// miniature NT's scheduler runs the image's threads (a thread the image moves to an AP by
/// affinity must find that AP there, not in a workload loop); every CPU's mode is still seen
/// through the image's status.
pub fn serve_session(p: &Params, backend: Backend) {
    let name = "serve";
    BACKEND.store(backend as u8, Ordering::Release);
    uart::init();
    let online = online_count();
    let team = match backend {
        Backend::Core => online,
        Backend::Driver => 1,
    };
    for cpu in CPUS
        .iter()
        .take(team as usize)
        .filter(|c| c.online.load(Ordering::Acquire))
    {
        cpu.counts.reset();
    }
    // Both books start together: nothing is outstanding before the workload starts.
    let stats_reset = match backend {
        Backend::Core => {
            hypervisor::reset_stats();
            true
        }
        Backend::Driver => crate::ntos::serve::reset_image_stats(),
    };
    for (slot, v) in SHAPE
        .iter()
        .zip([p.clock_period, p.stretch, team, p.min_rounds, p.cross])
    {
        slot.store(v, Ordering::Release);
    }
    FINISHING.store(false, Ordering::Release);
    for (i, cpu) in CPUS.iter().enumerate().take(team as usize).skip(1) {
        if cpu.online.load(Ordering::Acquire) {
            SERVE_REQUEST[i].store(true, Ordering::Release);
            smp::wake(cpu);
        }
    }
    let (virtualized, mode_now, _) = backend_status();
    Line::new("serve-ready")
        .kv("cpus", online)
        .kv("team", team)
        .kv("driver", u8::from(backend == Backend::Driver))
        .kv("virtualized", virtualized)
        .kv("mode", mode_now.map_or("none", Mode::name))
        .kv("stats", u8::from(ackvisor_vmm::stats::ENABLED))
        .kv("stats_reset", u8::from(stats_reset))
        .print();

    serve_part(&mut || server().poll());
    // Answer anything still on the wire (a reply in flight) before the books are printed.
    for _ in 0..16 {
        server().poll();
    }

    let (virtualized, mode_now, agree) = backend_status();
    let mut total = Tally::ZERO;
    let mut min_rounds = u32::MAX;
    for (i, _) in CPUS
        .iter()
        .enumerate()
        .take(team as usize)
        .filter(|(_, c)| c.online.load(Ordering::Acquire))
    {
        let t = workload::published(i);
        let rounds = ROUNDS[i].load(Ordering::Acquire);
        min_rounds = min_rounds.min(rounds);
        let mut l = Line::new("serve-cpu");
        l.kv("cpu", i).kv("rounds", rounds);
        t.write(&mut l);
        l.print();
        total.add(&t);
    }
    let c = server().counts;
    let mut l = Line::new(name);
    l.kv("summary", 1)
        .kv("cpus", online)
        .kv("team", team)
        .kv("virtualized", virtualized)
        .kv("modes_agree", u8::from(agree))
        .kv("mode", mode_now.map_or("none", Mode::name))
        .kv("rounds_min", min_rounds)
        .kv("requests", c.requests)
        .kv("ok", c.ok)
        .kv("refused", c.refused)
        .kv("set_modes", c.set_modes)
        .kv("naks", c.naks)
        .kv("truncated", c.truncated)
        .kv("discarded", c.discarded)
        .kv("too_small", c.too_small)
        .kv("rx_bytes", c.rx_bytes)
        .kv("tx_bytes", c.tx_bytes);
    total.write(&mut l);
    l.print();
}
