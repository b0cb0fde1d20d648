//! Application processors: INIT-SIPI-SIPI bring-up, their idle loop (also the scheduler context
//! of the miniature NT's threads on that CPU, `ntos::sched`), and the mailbox behind
//! `Platform::for_each_cpu` (post work, wake the AP with an IPI, wait until it is done).
//!
//! **Runs in:** PASSIVE.

use core::sync::atomic::Ordering;

use ackvisor_vmm::{CpuIndex, Error};

use crate::interrupts::{self, WAKE_VECTOR};
use crate::percpu::{CPUS, MAX_CPUS, WorkFn, mailbox, this_cpu};
use crate::{apic, arch};

/// Starts the APs and waits until `expected` CPUs are online (or a timeout). Returns the count.
pub fn start_aps(expected: u32) -> u32 {
    let tramp = &raw const crate::boot::ap_trampoline as u64;
    apic::start_aps((tramp >> 12) as u8, arch::spin);
    let t0 = arch::rdtsc();
    while crate::percpu::online_count() < expected && arch::rdtsc() - t0 < 50_000_000 {
        core::hint::spin_loop();
    }
    crate::percpu::online_count()
}

/// Entry of every AP (boot.rs), on its own stack, IF=0.
#[unsafe(no_mangle)]
extern "C" fn ap_main(index: u32) -> ! {
    if index as usize >= MAX_CPUS {
        loop {
            arch::cli();
            arch::hlt();
        }
    }
    let cpu = &CPUS[index as usize];
    // SAFETY: once, on this AP, IF=0, before interrupts are enabled.
    unsafe { cpu.init(index, interrupts::install_gates) };
    apic::enable();
    loop {
        arch::cli();
        poll_mailbox(cpu);
        if crate::control::take_serve_request(index) {
            // The serve scenario's workload: rounds with IF=1, the mailbox polled between them,
            // until the BSP says stop. Back here (IF=0) afterwards.
            crate::control::serve_ap();
            continue;
        }
        // The miniature NT's threads ready on this CPU (moved here by group affinity): this
        // loop is the AP's scheduler context (`ntos::sched`).
        if crate::ntos::sched::run_ready() {
            continue;
        }
        crate::ntos::sched::halt_idle();
    }
}

/// Runs the work posted to this CPU's mailbox, if any, with the caller's IF (0 in the idle
/// loop, 1 in the serve scenario's workload, where interrupts keep arriving during a mode
/// change).
pub fn poll_mailbox(cpu: &crate::percpu::Cpu) {
    if cpu.mailbox.state.load(Ordering::Acquire) != mailbox::POSTED {
        return;
    }
    // SAFETY: POSTED means the poster wrote `work` before the Release store and waits for DONE,
    // so the closure outlives this call.
    let work = unsafe { *cpu.mailbox.work.get() };
    let index = cpu.index.load(Ordering::Relaxed);
    let result = match work {
        // SAFETY: see above.
        Some(f) => unsafe { (*f)(CpuIndex(index)) },
        None => Ok(()),
    };
    // SAFETY: only this AP writes `result` between POSTED and DONE.
    unsafe { *cpu.mailbox.result.get() = result };
    cpu.mailbox.state.store(mailbox::DONE, Ordering::Release);
}

/// Wakes an AP halted in its idle loop.
pub fn wake(cpu: &crate::percpu::Cpu) {
    apic::ipi(cpu.apic_id.load(Ordering::Relaxed), WAKE_VECTOR);
}

fn post(cpu: &crate::percpu::Cpu, f: &'static WorkFn<'static>) {
    // SAFETY: the AP reads `work` only after seeing POSTED (Release below), and the poster
    // waits for DONE before the closure can go away.
    unsafe { *cpu.mailbox.work.get() = Some(f as *const WorkFn<'static>) };
    cpu.mailbox.state.store(mailbox::POSTED, Ordering::Release);
    apic::ipi(cpu.apic_id.load(Ordering::Relaxed), WAKE_VECTOR);
}

fn wait(cpu: &crate::percpu::Cpu, index: u32) -> Result<(), (CpuIndex, Error)> {
    let t0 = arch::rdtsc();
    while cpu.mailbox.state.load(Ordering::Acquire) != mailbox::DONE {
        core::hint::spin_loop();
        if arch::rdtsc() - t0 > 4_000_000_000 {
            return Err((CpuIndex(index), Error::Busy));
        }
    }
    // SAFETY: DONE: the AP finished writing `result` (Acquire above).
    let result = unsafe { *cpu.mailbox.result.get() };
    cpu.mailbox.state.store(mailbox::IDLE, Ordering::Relaxed);
    result.map_err(|e| (CpuIndex(index), e))
}

fn others(me: u32) -> impl Iterator<Item = (u32, &'static crate::percpu::Cpu)> {
    CPUS.iter()
        .enumerate()
        .map(|(i, c)| (i as u32, c))
        .filter(move |(i, c)| *i != me && c.online.load(Ordering::Acquire))
}

/// Extends the closure's lifetime for the mailbox slot.
///
/// # Safety
/// The caller waits for every AP it posts the result to before returning.
unsafe fn erase(f: &WorkFn<'_>) -> &'static WorkFn<'static> {
    // SAFETY: caller's duty (only the lifetime changes).
    unsafe { core::mem::transmute::<&WorkFn<'_>, &'static WorkFn<'static>>(f) }
}

/// Runs `f` on every online CPU, one after the other (APs first, then the caller), and waits.
pub fn run_on_each_cpu(f: &WorkFn<'_>) -> Result<(), (CpuIndex, Error)> {
    let me = this_cpu().index.load(Ordering::Relaxed);
    // SAFETY: each post is waited for below before the next one and before returning.
    let f_static = unsafe { erase(f) };
    for (i, cpu) in others(me) {
        post(cpu, f_static);
        wait(cpu, i)?;
    }
    f(CpuIndex(me)).map_err(|e| (CpuIndex(me), e))
}

/// Runs `f` on every online CPU at the same time (the caller included) and waits for all.
pub fn run_concurrently(f: &WorkFn<'_>) -> Result<(), (CpuIndex, Error)> {
    let me = this_cpu().index.load(Ordering::Relaxed);
    // SAFETY: every post is waited for below before returning.
    let f_static = unsafe { erase(f) };
    for (_, cpu) in others(me) {
        post(cpu, f_static);
    }
    let mine = f(CpuIndex(me)).map_err(|e| (CpuIndex(me), e));
    let mut first_error = mine.err();
    for (i, cpu) in others(me) {
        if let Err(e) = wait(cpu, i) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
