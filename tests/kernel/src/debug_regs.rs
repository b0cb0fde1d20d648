//! Scenario `debug-regs` (issue 8, item 3): hardware breakpoints follow the guest into root.
//!
//! The guest arms a DR0 execute breakpoint on [`bp_target`], which the handler of
//! [`DEBUG_VECTOR`] calls; its #DB handler ([`on_debug_exception`]) counts the hits. In ack-replay
//! and exit-sti that handler runs in root, where a VM exit left DR7 = 0x400: the breakpoint
//! fires there only if the core loads the guest's DR7 around the call (`hw_bp_in_root`). Then a
//! replayed handler rewrites DR7 itself (L0 off, L1 on an address never executed), as WinDbg's
//! thaw after a break-in does: the guest must read that value back afterwards (`dr7_kept`), and
//! the removed breakpoint must not fire again (`hits_after_removal`).
//!
//! A native pass first (no hypervisor) shows that Bochs raises the breakpoint at all.
//!
//! **Runs in:** PASSIVE on the BSP (the guest side once virtualized); [`on_handler`] and
//! [`on_debug_exception`] in interrupt context, in the guest or in root.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use ackvisor_vmm::Mode;
use ackvisor_vmm::hypervisor;

use crate::interrupts::{self, ExceptionFrame};
use crate::percpu::this_cpu;
use crate::report::Line;
use crate::{apic, arch, scenarios};

/// The vector whose handler calls [`bp_target`] (a self-IPI of class 6: replayed in root).
pub const DEBUG_VECTOR: u8 = 0x61;
/// #DB.
pub const DB_VECTOR: u64 = 1;
/// DR7 L0 (local enable of breakpoint 0) and L1; R/W and LEN 0 = execute, 1 byte.
const DR7_L0: u64 = 1 << 0;
const DR7_L1: u64 = 1 << 2;
/// DR7's always-one bit.
const DR7_FIXED1: u64 = 1 << 10;
/// What the replayed handler writes: breakpoint 0 removed, breakpoint 1 on [`never_called`].
const DR7_REWRITTEN: u64 = DR7_FIXED1 | DR7_L1;
/// DR6.B0: breakpoint 0 matched.
const DR6_B0: u64 = 1 << 0;
/// DR6 cleared (its reserved bits read as 1).
const DR6_CLEAR: u64 = 0xFFFF_0FF0;
/// RFLAGS.RF: the IRETQ back to the breakpointed instruction must not fault again.
const RFLAGS_RF: u64 = 1 << 16;
/// Interrupts per phase.
const ROUNDS: u32 = 20;

/// The scenario is running: the hooks below do nothing otherwise.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The #DB handler saw breakpoint 0 since the handler last looked.
static DB_SEEN: AtomicBool = AtomicBool::new(false);
static HITS_ROOT: AtomicU32 = AtomicU32::new(0);
static HITS_GUEST: AtomicU32 = AtomicU32::new(0);
/// The next handler run in root rewrites DR7 to [`DR7_REWRITTEN`].
static REWRITE: AtomicBool = AtomicBool::new(false);
static REWRITTEN_IN_ROOT: AtomicU32 = AtomicU32::new(0);
static TARGET_CALLS: AtomicU32 = AtomicU32::new(0);

/// The breakpoint's address (DR0).
#[inline(never)]
extern "sysv64" fn bp_target() {
    TARGET_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Breakpoint 1's address after the rewrite; never executed.
#[inline(never)]
extern "sysv64" fn never_called() {
    TARGET_CALLS.fetch_add(1000, Ordering::Relaxed);
}

fn dr7() -> u64 {
    let v: u64;
    // SAFETY: reading DR7 has no side effects at CPL 0 (in the guest it exits to the core).
    unsafe {
        core::arch::asm!("mov {}, dr7", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// # Safety
/// The breakpoints `v` enables must point at code whose #DB this module handles.
unsafe fn set_dr7(v: u64) {
    // SAFETY: caller's duty.
    unsafe { core::arch::asm!("mov dr7, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
}

fn dr6() -> u64 {
    let v: u64;
    // SAFETY: reading DR6 has no side effects.
    unsafe {
        core::arch::asm!("mov {}, dr6", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

fn clear_dr6() {
    // SAFETY: DR6's architectural cleared value (upper half 0).
    unsafe {
        core::arch::asm!("mov dr6, {}", in(reg) DR6_CLEAR, options(nomem, nostack, preserves_flags))
    };
}

fn arm() {
    let (b0, b1) = (
        bp_target as *const () as u64,
        never_called as *const () as u64,
    );
    // SAFETY: DR0/DR1 hold addresses only; they arm nothing until DR7 enables them.
    unsafe {
        core::arch::asm!("mov dr0, {}", "mov dr1, {}", in(reg) b0, in(reg) b1,
            options(nomem, nostack, preserves_flags))
    };
    clear_dr6();
    // SAFETY: breakpoint 0 is on `bp_target`, whose #DB `on_debug_exception` handles.
    unsafe { set_dr7(DR7_FIXED1 | DR7_L0) };
}

fn disarm() {
    // SAFETY: no breakpoint enabled.
    unsafe { set_dr7(DR7_FIXED1) };
}

/// Device-handler hook (interrupts::device_dispatch), at the vector's CR8 with IF=1.
pub fn on_handler(vector: u8, in_root: bool) {
    if vector != DEBUG_VECTOR || !ACTIVE.load(Ordering::Relaxed) {
        return;
    }
    DB_SEEN.store(false, Ordering::Relaxed);
    bp_target();
    if DB_SEEN.swap(false, Ordering::Relaxed) {
        let hits = if in_root { &HITS_ROOT } else { &HITS_GUEST };
        hits.fetch_add(1, Ordering::Relaxed);
    }
    if in_root && REWRITE.swap(false, Ordering::Relaxed) {
        // What a debugger does in a break-in taken inside this handler.
        // SAFETY: breakpoint 1 is on `never_called`, never executed.
        unsafe { set_dr7(DR7_REWRITTEN) };
        REWRITTEN_IN_ROOT.fetch_add(1, Ordering::Relaxed);
    }
}

/// #DB hook (interrupts::exception_dispatch): handles breakpoint 0 of this scenario and returns
/// true; anything else is not ours (false).
pub fn on_debug_exception(frame: &mut ExceptionFrame) -> bool {
    if !ACTIVE.load(Ordering::Relaxed) || dr6() & DR6_B0 == 0 {
        return false;
    }
    DB_SEEN.store(true, Ordering::Relaxed);
    clear_dr6();
    frame.rflags |= RFLAGS_RF;
    true
}

/// Raises [`DEBUG_VECTOR`] `n` times, each time waiting until its handler ran. The self-IPI is
/// sent with IF=1 so that it exits while the guest is interruptible: exit-sti then opens its
/// root window instead of handing the vector to the guest (`interrupts::raise` sends with
/// IF=0, and Bochs delivers that exit only after the guest's STI, with IF=0 in the VMCS).
fn fire(n: u32) {
    let cpu = this_cpu();
    let runs = &cpu.counts.runs;
    for _ in 0..n {
        let before = runs.get(DEBUG_VECTOR);
        {
            let _off = interrupts::IrqOff::enter();
            cpu.counts.raised.bump(DEBUG_VECTOR);
        }
        apic::self_ipi(DEBUG_VECTOR);
        for _ in 0..10_000 {
            if runs.get(DEBUG_VECTOR) != before {
                break;
            }
            arch::spin(100);
        }
    }
}

fn hits() -> (u32, u32) {
    (
        HITS_ROOT.load(Ordering::Relaxed),
        HITS_GUEST.load(Ordering::Relaxed),
    )
}

fn reset() {
    for c in [&HITS_ROOT, &HITS_GUEST, &REWRITTEN_IN_ROOT] {
        c.store(0, Ordering::Relaxed);
    }
}

fn set_mode(mode: Mode) -> bool {
    for _ in 0..1000 {
        match hypervisor::set_mode_all(mode) {
            Ok(()) => return true,
            Err((_, ackvisor_vmm::Error::Busy)) => arch::spin(10_000),
            Err(_) => return false,
        }
    }
    false
}

/// The scenario: a native pass, then each root-running mode.
pub fn run() {
    let name = "debug-regs";
    ACTIVE.store(true, Ordering::Relaxed);
    arm();
    fire(ROUNDS);
    disarm();
    let (_, native) = hits();
    if !scenarios::virtualize(name, Mode::Passthrough) {
        return;
    }
    for mode in [Mode::AckReplay, Mode::ExitSti] {
        if !set_mode(mode) {
            Line::new(name)
                .kv("fatal", 1)
                .kv("set_mode", mode.name())
                .print();
            break;
        }
        reset();
        arm();
        let armed = dr7();
        fire(ROUNDS);
        let (in_root, in_guest) = hits();
        REWRITE.store(true, Ordering::Relaxed);
        for _ in 0..ROUNDS {
            if !REWRITE.load(Ordering::Relaxed) {
                break;
            }
            fire(1);
        }
        let after = dr7();
        let (root_before, guest_before) = hits();
        fire(ROUNDS);
        let (root_after, guest_after) = hits();
        disarm();
        Line::new(name)
            .kv("mode", mode.name())
            .kv("native_hits", native)
            .kv("hw_bp_in_root", in_root)
            .kv("hw_bp_in_guest", in_guest)
            .kv("dr7_armed", format_args!("{armed:#x}"))
            .kv(
                "rewritten_in_root",
                REWRITTEN_IN_ROOT.load(Ordering::Relaxed),
            )
            .kv("dr7_after", format_args!("{after:#x}"))
            .kv("dr7_kept", u8::from(after == DR7_REWRITTEN))
            .kv(
                "hits_after_removal",
                (root_after - root_before) + (guest_after - guest_before),
            )
            .kv("rounds", ROUNDS)
            .print();
    }
    ACTIVE.store(false, Ordering::Relaxed);
    scenarios::devirtualize(name);
}
