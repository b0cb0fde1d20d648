//! The scenarios the runner selects through the params sector. Each prints `RESULT <scenario>
//! key=value ...` lines and ends with `RESULT <scenario> end=1`; the runner judges them.
//!
//! **Runs in:** PASSIVE on the BSP (the guest side once virtualized).

use core::sync::atomic::Ordering;

use ackvisor_vmm::hypercall::{self, Call, KEY, PING_REPLY, Status};
use ackvisor_vmm::hypervisor::{self, Config};
use ackvisor_vmm::intr::policy::Vector;
use ackvisor_vmm::intr::vector_policy::{PolicyLookup, VectorPolicy};
use ackvisor_vmm::stats::{Anomaly, Snapshot};
use ackvisor_vmm::{CpuIndex, Mode};

use crate::interrupts::{self, DPL3_GATE_VECTOR, IST_GATE_VECTOR};
use crate::params::Params;
use crate::percpu::{CPUS, online_count, this_cpu};
use crate::platform::PLATFORM;
use crate::report::Line;
use crate::workload::{self, Shape, Tally};
use crate::{arch, pool, smp};

/// #UD.
const UD_VECTOR: u64 = 6;

fn shape(p: &Params) -> Shape {
    Shape {
        rounds: p.rounds,
        clock_period: p.clock_period,
        stretch: p.stretch,
        team: online_count(),
        cross: p.cross != 0,
    }
}

fn fail(scenario: &str, what: &str, detail: impl core::fmt::Display) {
    Line::new(scenario).kv("fatal", 1).kv(what, detail).print();
}

fn this_snapshot() -> Option<Snapshot> {
    hypervisor::cpu_state(CpuIndex(this_cpu().index.load(Ordering::Relaxed))).map(|s| s.stats)
}

/// Virtualizes every CPU in `mode`, or prints a fatal line.
pub fn virtualize(scenario: &str, mode: Mode) -> bool {
    match hypervisor::virtualize_all(&PLATFORM, Config { mode }) {
        Ok(()) => true,
        Err((cpu, e)) => {
            fail(scenario, "virtualize", format_args!("cpu{}:{:?}", cpu.0, e));
            false
        }
    }
}

/// Devirtualizes every CPU, or prints a fatal line.
pub fn devirtualize(scenario: &str) -> bool {
    match hypervisor::devirtualize_all() {
        Ok(()) => true,
        Err((cpu, e)) => {
            fail(
                scenario,
                "devirtualize",
                format_args!("cpu{}:{:?}", cpu.0, e),
            );
            false
        }
    }
}

/// Applies `mode` everywhere, retrying while the core reports vectors still pending.
pub fn set_mode(scenario: &str, mode: Mode) -> bool {
    for _ in 0..1000 {
        match hypervisor::set_mode_all(mode) {
            Ok(()) => return true,
            Err((_, ackvisor_vmm::Error::Busy)) => arch::spin(10_000),
            Err((cpu, e)) => {
                fail(
                    scenario,
                    "set_mode",
                    format_args!("{}:cpu{}:{:?}", mode.name(), cpu.0, e),
                );
                return false;
            }
        }
    }
    fail(scenario, "set_mode", format_args!("{}:busy", mode.name()));
    false
}

fn ping() -> bool {
    hypercall::vmcall(Call::Ping, 0) == (Some(Status::Ok), PING_REPLY)
}

/// Zeroes every online CPU's handler books and DPC-watchdog model before a workload.
pub(crate) fn reset_books_everywhere() {
    for (i, cpu) in CPUS
        .iter()
        .enumerate()
        .filter(|(_, c)| c.online.load(Ordering::Acquire))
    {
        cpu.counts.reset();
        crate::watchdog::reset(i);
    }
}

/// Runs the workload on every CPU at once; each CPU tallies itself (its LAPIC, its counters,
/// the core's snapshot of it). Returns the sum.
fn workload_everywhere(p: &Params, core: bool) -> Tally {
    reset_books_everywhere();
    let shape = shape(p);
    let result = smp::run_concurrently(&|index| {
        let drained = workload::run(shape);
        let snapshot = if core {
            hypervisor::cpu_state(index).map(|s| s.stats)
        } else {
            None
        };
        workload::publish(Tally::of(this_cpu(), snapshot.as_ref(), drained));
        Ok(())
    });
    if let Err((cpu, e)) = result {
        crate::kprintln!("workload on cpu{} failed: {e:?}", cpu.0);
    }
    workload::collect()
}

fn print_all_vectors(label: &str, core: bool) {
    for (i, cpu) in CPUS
        .iter()
        .enumerate()
        .filter(|(_, c)| c.online.load(Ordering::Acquire))
    {
        let snapshot = if core {
            hypervisor::cpu_state(CpuIndex(i as u32)).map(|s| s.stats)
        } else {
            None
        };
        workload::print_vectors(label, cpu, snapshot.as_ref());
    }
}

/// No hypervisor: the workload natively, proving the machine itself (interrupt entry, nesting,
/// marks, canaries, accounting) before anything is blamed on the core.
pub fn boot(p: &Params) {
    let vmx = arch::cpuid(1, 0)[2] & (1 << 5) != 0;
    let t = workload_everywhere(p, false);
    if p.verbose != 0 || t.lost != 0 {
        print_all_vectors("native", false);
    }
    let mut l = Line::new("boot");
    l.kv("mode", "native")
        .kv("cpus", online_count())
        .kv("vmx", u8::from(vmx))
        .kv("pool_in_use", pool::in_use());
    t.write(&mut l);
    l.print();
}

/// Every mode in turn on one virtualization: the delivery checks of scenarios 1-3.
pub fn modes(p: &Params, verbose: bool) {
    let name = if verbose { "demo" } else { "modes" };
    if !virtualize(name, Mode::Passthrough) {
        return;
    }
    if verbose {
        print_features();
    }
    let clock = Vector(interrupts::CLOCK_VECTOR);
    if let Some(policy) = p.clock_policy.and_then(|v| VectorPolicy::try_from(v).ok()) {
        hypervisor::set_policy_all(clock, policy);
    }
    let clock_policy = hypervisor::policy(CpuIndex(0)).map_or("?", |t| t.policy(clock).name());
    for mode in Mode::ALL
        .into_iter()
        .filter(|m| p.modes & (1 << *m as u32) != 0)
    {
        if !set_mode(name, mode) {
            return;
        }
        hypervisor::reset_stats();
        let t = workload_everywhere(p, true);
        if verbose || p.verbose != 0 || t.lost != 0 || t.exit_mismatch != 0 {
            print_all_vectors(mode.name(), true);
        }
        if verbose {
            let mut all = Snapshot::zero();
            for i in 0..online_count() {
                if let Some(s) = hypervisor::cpu_state(CpuIndex(i)) {
                    all.merge(&s.stats);
                }
            }
            print_stats(mode, &all);
        }
        let mut l = Line::new(name);
        l.kv("mode", mode.name())
            .kv("cpus", online_count())
            .kv("clock_policy", clock_policy)
            .kv("virtualized", u8::from(this_snapshot().is_some()))
            .kv("ping", u8::from(ping()));
        t.write(&mut l);
        l.print();
    }
    devirtualize(name);
}

/// Scenario 4: VMCALL from CPL 3 and VMCALL with a wrong key must both reach the guest as #UD.
pub fn vmcall(_p: &Params) {
    let name = "vmcall";
    // Baseline without a hypervisor: both probes fault natively, so the checks below can fail
    // only through the hypervisor.
    let native_ring3 = crate::user::vmcall_from_ring3(Call::Ping as u64, KEY, 0);
    let native_ring0 = crate::user::vmcall_expecting_fault(Call::Ping as u64, KEY, 0);
    if !virtualize(name, Mode::AckReplay) {
        return;
    }
    hypervisor::reset_stats();
    let ping_before = ping();
    let ring3 = crate::user::vmcall_from_ring3(Call::Ping as u64, KEY, 0);
    let wrong_key = crate::user::vmcall_expecting_fault(Call::Ping as u64, KEY ^ 0x5A5A, 0);
    let ping_after = ping();
    let foreign = this_snapshot().map_or(0, |s| s.anomaly(Anomaly::ForeignVmcall));
    devirtualize(name);
    Line::new(name)
        .kv("native_ring3_vector", native_ring3.vector)
        .kv("native_ring0_vector", native_ring0.err().unwrap_or(0))
        .kv("ping", u8::from(ping_before))
        .kv("ring3_vector", ring3.vector)
        .kv("ring3_at_vmcall", u8::from(ring3.at_vmcall))
        .kv("ring3_rax", format_args!("{:#x}", ring3.rax))
        .kv("wrong_key_vector", wrong_key.err().unwrap_or(0))
        .kv(
            "wrong_key_rax",
            format_args!("{:#x}", wrong_key.unwrap_or(0)),
        )
        .kv("ping_after", u8::from(ping_after))
        .kv("foreign_vmcalls", foreign)
        .kv("ud_vector", UD_VECTOR)
        .print();
}

/// Scenario 5: virtualize/devirtualize cycles in one boot; every page comes back and the
/// hypervisor answers after each virtualize (and interrupts still flow through it).
pub fn cycles(p: &Params) {
    let name = "cycles";
    let start = pool::in_use();
    let (refused, refused_reason, refused_pool) = refused_first_entry();
    let (mut virtualized, mut pings, mut devirtualized, mut leaks, mut lost) = (0, 0, 0, 0, 0);
    let mut first_leak = 0;
    for i in 0..p.cycles {
        if !virtualize(name, Mode::AckReplay) {
            break;
        }
        virtualized += 1;
        pings += u32::from(ping());
        workload::reset_counts();
        workload::run(Shape {
            rounds: 10,
            clock_period: p.clock_period,
            stretch: p.stretch,
            team: 1,
            cross: false,
        });
        lost += Tally::of(this_cpu(), None, true).lost;
        if !devirtualize(name) {
            break;
        }
        devirtualized += 1;
        if pool::in_use() != start {
            leaks += 1;
            if first_leak == 0 {
                first_leak = i + 1;
            }
        }
    }
    Line::new(name)
        .kv("cycles", p.cycles)
        .kv("virtualized", virtualized)
        .kv("pings", pings)
        .kv("devirtualized", devirtualized)
        .kv("pool_start", start)
        .kv("pool_end", pool::in_use())
        .kv("pool_peak", pool::peak())
        .kv("leaky_cycles", leaks)
        .kv("refused_entry", refused)
        .kv("refused_reason", refused_reason)
        .kv("refused_pool_back", refused_pool)
        .kv("first_leaky_cycle", first_leak)
        .kv("lost", lost)
        .print();
}

/// A first VM entry that fails its guest-state checks (TSS descriptor not busy) must come back
/// as an error from `virtualize`, with every page returned and VMX left, not as a fatal state.
/// Returns (refused, exit reason reported, pool back to its start value).
fn refused_first_entry() -> (u32, u64, u32) {
    let start = pool::in_use();
    let cpu = this_cpu();
    let result = {
        // IF=0 (and marked so) until the bit is back: nothing may run LTR or take an interrupt
        // through a frame that would need the TSS while the descriptor is off.
        let _irq_off = interrupts::IrqOff::enter();
        // SAFETY: this CPU, interrupts off until the bit is back; nothing runs LTR meanwhile.
        unsafe { cpu.set_tss_busy(false) };
        let config = Config {
            mode: Mode::AckReplay,
        };
        let r = hypervisor::virtualize_current_cpu(&PLATFORM, config);
        // SAFETY: as above.
        unsafe { cpu.set_tss_busy(true) };
        r
    };
    let (refused, reason) = match result {
        Err(ackvisor_vmm::Error::VmxInstruction { error, .. }) => (1, u64::from(error)),
        Ok(()) => {
            let _ = hypervisor::devirtualize_current_cpu();
            (0, 0)
        }
        Err(e) => {
            fail("cycles", "refused_first_entry", format_args!("{e:?}"));
            (0, 0)
        }
    };
    (refused, reason, u32::from(pool::in_use() == start))
}

/// Scenario 6: gates the core must reject (IST≠0, DPL 3): injected, counted, run in the guest.
pub fn rejected(p: &Params) {
    let name = "rejected";
    if !virtualize(name, Mode::AckReplay) {
        return;
    }
    hypervisor::reset_stats();
    workload::reset_counts();
    for _ in 0..p.rounds.min(200) {
        interrupts::raise(IST_GATE_VECTOR);
        arch::spin(u64::from(p.stretch));
        interrupts::raise(DPL3_GATE_VECTOR);
        arch::spin(u64::from(p.stretch));
    }
    let drained = workload::drain();
    let snapshot = this_snapshot();
    let cpu = this_cpu();
    let c = &cpu.counts;
    let injections = |v: u8| {
        snapshot
            .as_ref()
            .map_or(0, |s| s.injections_by_vector[usize::from(v)])
    };
    let replays = |v: u8| {
        snapshot
            .as_ref()
            .map_or(0, |s| s.replays_by_vector[usize::from(v)])
    };
    let t = Tally::of(cpu, snapshot.as_ref(), drained);
    devirtualize(name);
    let mut l = Line::new(name);
    l.kv("drained", u8::from(drained));
    for (tag, v) in [("ist", IST_GATE_VECTOR), ("dpl3", DPL3_GATE_VECTOR)] {
        for (field, value) in [
            ("raised", u64::from(c.raised.get(v))),
            ("ran", u64::from(c.runs.get(v))),
            ("guest", u64::from(c.guest.get(v))),
            ("root", u64::from(c.runs.get(v) - c.guest.get(v))),
            ("injections", injections(v)),
            ("replays", replays(v)),
        ] {
            l.kv(format_args!("{tag}_{field}"), value);
        }
    }
    l.kv("rejected_gates", t.rejected_gates)
        .kv("ctx_violations", t.ctx_violations)
        .kv("canary_broken", t.canary_broken)
        .kv("isr_left", t.isr_left)
        .print();
}

fn print_features() {
    match hypervisor::features() {
        Some(f) => crate::kprintln!("features: {f:?}"),
        None => crate::kprintln!("features: not probed"),
    }
    crate::kprintln!("bytes per CPU: {}", hypervisor::bytes_per_cpu());
}

fn print_stats(mode: Mode, s: &Snapshot) {
    crate::kprintln!("--- hypervisor statistics, mode {} ---", mode.name());
    for (reason, n) in s.exits.iter().enumerate().filter(|(_, n)| **n != 0) {
        crate::kprintln!("  exits reason {reason:>2}: {n}");
    }
    crate::kprintln!(
        "  replays {} injections {} deferrals {} sti_windows {} guest_takes {} anomalies {:?}",
        s.total_replays(),
        s.total_injections(),
        s.deferrals,
        s.sti_windows,
        s.guest_takes,
        s.anomalies
    );
    crate::kprintln!(
        "  root cycles per external-interrupt exit: count {} avg {} max {}",
        s.cycles_count,
        s.cycles_sum.checked_div(s.cycles_count).unwrap_or(0),
        s.cycles_max
    );
}
