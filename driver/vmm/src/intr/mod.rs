//! Interrupt modes, delivery policy and the external-interrupt exit path (DESIGN §2–§4).
//!
//! **Runs in:** VMX root (IF=0, guest CR8), except `mode` and [`policy`], which are pure.

pub mod debug;
pub mod inject;
mod mode;
pub mod pending;
pub mod policy;
pub mod replay;
pub mod spurious;
pub mod vector_policy;
pub mod wake;

pub use mode::Mode;

use crate::arch::debug::DR7_AFTER_EXIT;
use crate::arch::regs;
use crate::exit::ExitCtx;
use crate::log_ring::LogKind;
use crate::stats::Anomaly;
use crate::vmx::fields::{ActivityState, ExitIntrInfo, Interruptibility, intr_type};
use policy::{Delivery, GuestView, StiWindow, Vector, Wait};
use x86::vmx::vmcs::{control::ExitControls, guest, ro};

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// Log detail flag of a [`Anomaly::DuplicatePending`] whose acknowledge did not fit the pending
/// set (`pending::MAX_ACKS_PER_VECTOR` already waiting): that one is lost.
pub const SATURATED_DETAIL: u64 = 1 << 63;

/// Reads what [`policy::decide`] needs.
#[inline(always)]
pub fn guest_view(ctx: &ExitCtx<'_>) -> GuestView {
    let v = ctx.vmcs;
    let ss_ar = v.read32(guest::SS_ACCESS_RIGHTS);
    GuestView {
        interrupts_enabled: v.read(guest::RFLAGS) & RFLAGS_IF != 0,
        interruptibility: Interruptibility::from_raw(v.read32(guest::INTERRUPTIBILITY_STATE)),
        cpl: ((ss_ar >> 5) & 3) as u8,
        // No TPR shadow: root runs with the guest's CR8.
        cr8: regs::cr8(),
        rsp: v.read(guest::RSP),
        activity: ActivityState::try_from(v.read32(guest::ACTIVITY_STATE))
            .unwrap_or(ActivityState::Active),
    }
}

/// Exit reason 1.
#[inline(always)]
pub fn on_external_interrupt(ctx: &mut ExitCtx<'_>) {
    let info = ExitIntrInfo::from_raw(ctx.vmcs.read32(ro::VMEXIT_INTERRUPTION_INFO));
    if !info.valid() {
        if ctx.root.mode.acks_on_exit() {
            // Ack was on yet nothing was acknowledged: the vector is still in the IRR, so the
            // exit-sti path still delivers it. Counted, never dropped.
            ctx.anomaly(Anomaly::InvalidIntrInfo, u64::from(info.raw()));
        }
        on_unacknowledged(ctx);
        return;
    }
    if info.kind() != intr_type::EXTERNAL {
        ctx.anomaly(Anomaly::UnexpectedIntrType, u64::from(info.raw()));
        return;
    }
    let v = Vector(info.vector());
    ctx.cpu.data.stats.extint(v.0);
    let g = guest_view(ctx);
    if ctx.root.pending.is_empty() {
        match decide(ctx, v, &g) {
            Delivery::Replay => {
                replay_or_inject(ctx, v, &g);
            }
            Delivery::Inject => inject(ctx, v, &g),
            Delivery::Defer(wait) => {
                // The set is empty, so this first acknowledge always fits.
                let _ = ctx.root.pending.insert(v);
                ctx.cpu.data.stats.deferral();
                let (window, cr8) = (wait == Wait::Window, wait == Wait::Priority);
                inject::set_waits(ctx.vmcs, ctx.root, window, cr8);
            }
        }
    } else {
        // Older vectors wait: join them so delivery stays in priority order. The same vector
        // may already wait: the guest's EOI cleared its ISR bit (it was the highest) and the
        // line was sent again. Each acknowledge is delivered once, so each gets its EOI
        // (`pending` module docs); the re-acknowledge is counted.
        match ctx.root.pending.insert(v) {
            Ok(1) => {}
            Ok(_) => ctx.anomaly(Anomaly::DuplicatePending, u64::from(v.0)),
            Err(pending::Saturated) => {
                ctx.anomaly(Anomaly::DuplicatePending, u64::from(v.0) | SATURATED_DETAIL);
            }
        }
        deliver_pending(ctx, &g);
        if ctx.root.pending.contains(v) {
            ctx.cpu.data.stats.deferral();
        }
    }
}

/// Interrupt-window exit, or a CR8 load that may have unblocked a pending vector.
pub fn on_window(ctx: &mut ExitCtx<'_>) {
    let g = guest_view(ctx);
    deliver_pending(ctx, &g);
}

/// [`policy::decide`], with the LAPIC's spurious vector exempt from CR8 ([`spurious`]). The SVR
/// is read only when CR8 would hold a vector back, so the common path reads nothing more.
#[inline(always)]
fn decide(ctx: &ExitCtx<'_>, v: Vector, g: &GuestView) -> Delivery {
    let mode = ctx.root.mode;
    match policy::decide(mode, v, g, &ctx.cpu.data.policy) {
        Delivery::Defer(Wait::Priority) => {
            let svr = ctx
                .root
                .platform
                .map(|p| Vector(crate::arch::apic::spurious_vector(p.apic())));
            spurious::decide(mode, v, svr, g, &ctx.cpu.data.policy)
        }
        d => d,
    }
}

/// Delivers pending vectors, highest first, while the guest can take them; re-arms the exit
/// that brings the rest back.
fn deliver_pending(ctx: &mut ExitCtx<'_>, g: &GuestView) {
    let mut wait = None;
    let mut injected = false;
    while let Some(v) = ctx.root.pending.highest() {
        match decide(ctx, v, g) {
            Delivery::Replay => {
                ctx.root.pending.remove(v);
                injected = replay_or_inject(ctx, v, g);
                if injected {
                    break;
                }
            }
            Delivery::Inject => {
                ctx.root.pending.remove(v);
                inject(ctx, v, g);
                injected = true;
                break;
            }
            Delivery::Defer(w) => {
                wait = Some(w);
                break;
            }
        }
    }
    let arm = policy::exits_to_arm(!ctx.root.pending.is_empty(), injected, wait);
    inject::set_waits(ctx.vmcs, ctx.root, arm.window, arm.cr8_load);
}

/// Replays `v`; a rejected gate is counted and the vector injected. True if injected.
#[inline(always)]
fn replay_or_inject(ctx: &mut ExitCtx<'_>, v: Vector, g: &GuestView) -> bool {
    let base = ctx.vmcs.read(guest::IDTR_BASE);
    let limit = ctx.vmcs.read(guest::IDTR_LIMIT) as u16;
    let gate = replay::read_gate(base, limit, v);
    let frame = policy::frame_stack(g.cpl, g.rsp);
    let (kcs, kss) = (ctx.root.kernel_cs, ctx.root.kernel_ss);
    let old = raise_to_dispatch(ctx.root, g.cr8);
    if ctx.root.debug_armed {
        enter_guest_debug(ctx.root);
    }
    let result = replay::call_gate(gate, v, limit, kcs, kss, frame);
    // Armed or not, a DR7 other than the exit's means there is something to write back or
    // put back (`debug::plan` never loads the exit's value).
    let dr7 = regs::dr7();
    if dr7 != DR7_AFTER_EXIT {
        leave_guest_debug(ctx, dr7);
    }
    restore_irql(ctx.root, old);
    if policy::clears_buffers_after_replay(g.cpl, ctx.root.md_clear) {
        // The handler ran kernel code for an interrupt from user mode; NT's own return to user
        // mode would clear CPU buffers (MDS) there, and the guest now resumes at CPL 3.
        regs::verw(ctx.root.kernel_ss);
    }
    match result {
        Ok(cycles) => {
            ctx.cpu.data.stats.replay(v.0);
            // Only reason-1 exits are timed (`Stats::cycles`); a replay from a window or CR8
            // exit would otherwise inflate the handler share beyond the total.
            if ctx.reason.basic() == crate::vmx::fields::reason::EXTERNAL_INTERRUPT {
                ctx.cpu.data.stats.handler_cycles(cycles);
            }
            // A halted guest that got an interrupt would have woken (kvm-unit-tests too).
            wake::after_delivery(ctx.vmcs, g.activity);
            false
        }
        Err(why) => {
            ctx.cpu.data.stats.anomaly(Anomaly::RejectedGate);
            ctx.log(LogKind::GateRejected, u64::from(v.0), why as u64);
            inject(ctx, v, g);
            true
        }
    }
}

#[inline(always)]
fn inject(ctx: &mut ExitCtx<'_>, v: Vector, g: &GuestView) {
    wake::inject_external(ctx.vmcs, v.0, g.activity);
    ctx.cpu.data.stats.injection(v.0);
}

/// Raises IRQL to ≥ DISPATCH before root runs OS handlers (DESIGN §4: below it NT's interrupt
/// epilogue may drain DPCs and switch threads on our stack); returns the guest's IRQL.
/// `guest_cr8` is the CR8 root runs with (the guest's, no TPR shadow).
#[inline(always)]
fn raise_to_dispatch(root: &crate::cpu::RootState, guest_cr8: u8) -> u8 {
    match root.platform {
        Some(p) if !root.irql_is_cr8 => p.raise_irql(policy::DISPATCH_LEVEL),
        _ => {
            if guest_cr8 < policy::DISPATCH_LEVEL {
                // SAFETY: raising the task priority only masks interrupts (IF=0 here anyway).
                unsafe { regs::set_cr8(policy::DISPATCH_LEVEL) };
            }
            guest_cr8
        }
    }
}

/// Gives the guest its IRQL back before VM entry. On the raw-CR8 path it is written even when
/// equal (one instruction), so a handler that left CR8 elsewhere is corrected; on NT,
/// KeLowerIrql only lowers.
#[inline(always)]
fn restore_irql(root: &crate::cpu::RootState, old: u8) {
    match root.platform {
        Some(p) if !root.irql_is_cr8 => p.lower_irql(old),
        // SAFETY: back to the guest's own CR8; IF=0 in root, nothing is delivered here.
        _ => unsafe { regs::set_cr8(old) },
    }
}

/// Gives the guest's handlers that root is about to run the guest's DR7 and DEBUGCTL
/// ([`debug`]). Only when `RootState::debug_armed`: the common root call skips it.
#[cold]
#[inline(never)]
fn enter_guest_debug(root: &crate::cpu::RootState) {
    replay::load_guest_debug(&debug::plan(
        root.guest_dr7,
        root.guest_debugctl,
        root.debugctl_msr,
    ));
}

/// Writes back to the VMCS what the root call changed in DR7/DEBUGCTL (a debugger's thaw, a
/// `ba` set or removed inside the handler), so the guest keeps it after VM entry. `dr7` is
/// what the call left in DR7, never the exit's 0x400: the common root call costs a byte test
/// before, one MOV from DR7 and a compare after.
#[cold]
#[inline(never)]
fn leave_guest_debug(ctx: &mut ExitCtx<'_>, dr7: u64) {
    // Nothing changes the shadows during a root call (no exit can nest), so this is the plan
    // `enter_guest_debug` loaded.
    let plan = debug::plan(
        ctx.root.guest_dr7,
        ctx.root.guest_debugctl,
        ctx.root.debugctl_msr,
    );
    let debugctl = replay::take_guest_debug(&plan, dr7);
    if let Some(v) = debug::changed(plan.dr7, dr7) {
        ctx.vmcs.set(guest::DR7, v);
        ctx.root.set_guest_dr7(v);
    }
    if let (Some(during), Some(after)) = (plan.debugctl, debugctl)
        && let Some(v) = debug::changed(during, after)
    {
        ctx.vmcs.set(guest::IA32_DEBUGCTL_FULL, v);
        ctx.root.set_guest_debugctl(v);
    }
}

/// exit-sti (ack off): the vector is still in the IRR. DESIGN §2 policy.
fn on_unacknowledged(ctx: &mut ExitCtx<'_>) {
    let g = guest_view(ctx);
    let apic = ctx.root.platform.map(|p| p.apic());
    let highest = apic.and_then(crate::arch::apic::highest_irr).map(Vector);
    match policy::sti_window(highest, &g, &ctx.cpu.data.policy) {
        StiWindow::Open => {
            ctx.cpu.data.stats.sti_window();
            // DESIGN §4: NT's epilogue must not find an IRQL below DISPATCH, and a class ≤ 2
            // vector raised by the handler (a DPC request) must wait for the guest instead of
            // slipping in between the handler's IRETQ and our CLI. `policy::sti_window` gave
            // class ≤ 2 IRR vectors to the guest, so the highest one stays deliverable.
            let old = raise_to_dispatch(ctx.root, g.cr8);
            if ctx.root.debug_armed {
                enter_guest_debug(ctx.root);
            }
            let t0 = regs::rdtsc();
            replay::sti_window(policy::frame_stack(g.cpl, g.rsp));
            ctx.cpu
                .data
                .stats
                .handler_cycles(regs::rdtsc().wrapping_sub(t0));
            let dr7 = regs::dr7();
            if dr7 != DR7_AFTER_EXIT {
                leave_guest_debug(ctx, dr7);
            }
            restore_irql(ctx.root, old);
        }
        StiWindow::GuestTakes => {
            ctx.cpu.data.stats.guest_take();
            inject::suspend_exiting(ctx.vmcs, ctx.root);
        }
    }
}

/// Writes `mode`'s controls into the current VMCS.
/// `applied` is the CPU's `CpuData::applied_mode`, which PASSIVE readers see.
pub fn apply_mode(
    ctx_vmcs: &crate::vmx::Vmcs,
    root: &mut crate::cpu::RootState,
    applied: &core::sync::atomic::AtomicU32,
    mode: Mode,
) {
    root.mode = mode;
    if root.exiting_suspended {
        inject::resume_exiting(ctx_vmcs, root);
    }
    let pin = inject::mode_pin(root);
    root.pin = pin;
    ctx_vmcs.set(
        x86::vmx::vmcs::control::PINBASED_EXEC_CONTROLS,
        u64::from(pin),
    );
    let mut exit = root.controls.exit;
    if mode.acks_on_exit() {
        exit |= ExitControls::ACK_INTERRUPT_ON_EXIT.bits();
    }
    ctx_vmcs.set(x86::vmx::vmcs::control::VMEXIT_CONTROLS, u64::from(exit));
    applied.store(mode as u32, core::sync::atomic::Ordering::Release);
}
