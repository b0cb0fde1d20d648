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
use crate::cpu::{PerCpu, RootState};
use crate::exit::ExitCtx;
use crate::log_ring::LogKind;
use crate::stats::Anomaly;
use crate::vmx::Vmcs;
use crate::vmx::fields::{AccessRights, ActivityState, ExitIntrInfo, Interruptibility, intr_type};
use policy::{Delivery, GuestView, StiWindow, Vector, Wait};
use x86::vmx::vmcs::{control::ExitControls, guest, ro};

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// Log detail flag of a [`Anomaly::DuplicatePending`] whose acknowledge did not fit the pending
/// set (`pending::MAX_ACKS_PER_VECTOR` already waiting): that one is lost.
pub const SATURATED_DETAIL: u64 = 1 << 63;

/// What the interrupt path touches: the exit stub's fast path builds it without the saved
/// registers (`exit::dispatch_fast`), the handlers through [`IntrCtx::of`].
pub struct IntrCtx<'a> {
    /// The current VMCS.
    pub vmcs: &'a Vmcs,
    /// This CPU.
    pub cpu: &'a PerCpu,
    /// This CPU's root state.
    pub root: &'a mut RootState,
    /// The exit is an external-interrupt exit (the ones `Stats::cycles` times).
    pub timed: bool,
}

impl<'a> IntrCtx<'a> {
    /// The interrupt-path view of a handler's context.
    pub fn of(ctx: &'a mut ExitCtx<'_>) -> IntrCtx<'a> {
        IntrCtx {
            vmcs: ctx.vmcs,
            cpu: ctx.cpu,
            timed: ctx.reason.basic() == crate::vmx::fields::reason::EXTERNAL_INTERRUPT,
            root: ctx.root,
        }
    }

    /// A copy of the context for a call that is not inlined. The exit path passes this, never
    /// `&mut self`, to such calls: a context whose address never escapes stays in registers.
    #[inline(always)]
    pub fn reborrow(&mut self) -> IntrCtx<'_> {
        IntrCtx {
            vmcs: self.vmcs,
            cpu: self.cpu,
            root: &mut *self.root,
            timed: self.timed,
        }
    }

    /// Counts an anomaly and logs it with a detail word.
    pub fn anomaly(&mut self, kind: Anomaly, detail: u64) {
        self.cpu.data.stats.anomaly(kind);
        self.log(LogKind::Anomaly, kind as u64, detail);
    }

    /// Appends a log record.
    pub fn log(&self, kind: LogKind, a: u64, b: u64) {
        self.cpu.data.log.push(regs::rdtsc(), kind, a, b);
    }
}

/// Reads what [`policy::decide`] needs, each field once.
#[inline(always)]
pub fn guest_view(vmcs: &Vmcs) -> GuestView {
    let v = vmcs;
    let ss_ar = AccessRights::from_raw(v.read32_known(guest::SS_ACCESS_RIGHTS));
    GuestView {
        interrupts_enabled: v.read_known(guest::RFLAGS) & RFLAGS_IF != 0,
        interruptibility: Interruptibility::from_raw(v.read32_known(guest::INTERRUPTIBILITY_STATE)),
        cpl: ss_ar.dpl(),
        // No TPR shadow: root runs with the guest's CR8.
        cr8: regs::cr8(),
        rsp: v.read_known(guest::RSP),
        activity: ActivityState::try_from(v.read32_known(guest::ACTIVITY_STATE))
            .unwrap_or(ActivityState::Active),
    }
}

/// Exit reason 1 on the exit stub's fast path (no FXSAVE): handles the common cases in full
/// and returns true, or returns false having changed nothing, and the slow path
/// ([`on_external_interrupt`], with the vector state saved) takes the exit from the start.
/// Common: an acknowledged vector with nothing pending that the guest can take now (replay
/// through a valid gate, or injection), and exit-sti's root window. Declined: deferrals,
/// vectors joining pending ones, rejected gates, anomalies, exit-sti hand-overs and the exit
/// after one. So only this much code must be free of XMM (the runner's
/// `root_code_uses_no_vector_registers` proves it of the build).
#[inline(always)]
pub fn try_fast(ctx: &mut IntrCtx<'_>) -> bool {
    if ctx.root.exiting_suspended {
        return false;
    }
    let info = ExitIntrInfo::from_raw(ctx.vmcs.read32_known(ro::VMEXIT_INTERRUPTION_INFO));
    if !info.valid() {
        if ctx.root.mode.acks_on_exit() {
            return false;
        }
        let g = guest_view(ctx.vmcs);
        let highest = ctx
            .root
            .apic
            .and_then(crate::arch::apic::highest_irr)
            .map(Vector);
        if policy::sti_window(highest, &g, &ctx.cpu.data.policy) != StiWindow::Open {
            return false;
        }
        open_sti_window(ctx, &g);
        return true;
    }
    if info.kind() != intr_type::EXTERNAL || !ctx.root.pending.is_empty() {
        return false;
    }
    let v = Vector(info.vector());
    let g = guest_view(ctx.vmcs);
    // The per-vector policy as `decide` applies it; every deferral is declined, so the
    // spurious vector's exemption from CR8 (`decide`, a priority wait only) stays the slow
    // path's.
    match policy::decide(ctx.root.mode, v, &g, &ctx.cpu.data.policy) {
        Delivery::Replay => {
            let Ok(handler) = gate_handler(ctx, v) else {
                return false;
            };
            ctx.cpu.data.stats.extint(v.0);
            replay(ctx, v, &g, handler);
        }
        Delivery::Inject => {
            ctx.cpu.data.stats.extint(v.0);
            inject(ctx, v, &g);
        }
        Delivery::Defer(_) => return false,
    }
    true
}

/// Exit reason 1.
#[inline(always)]
pub fn on_external_interrupt(ctx: &mut IntrCtx<'_>) {
    let info = ExitIntrInfo::from_raw(ctx.vmcs.read32_known(ro::VMEXIT_INTERRUPTION_INFO));
    if !info.valid() || info.kind() != intr_type::EXTERNAL {
        return on_unusual_info(ctx.reborrow(), info);
    }
    let v = Vector(info.vector());
    ctx.cpu.data.stats.extint(v.0);
    let g = guest_view(ctx.vmcs);
    if !ctx.root.pending.is_empty() {
        return join_pending(ctx.reborrow(), v, g);
    }
    match decide(ctx, v, &g) {
        Delivery::Replay => {
            replay_or_inject(ctx, v, &g);
        }
        Delivery::Inject => inject(ctx, v, &g),
        Delivery::Defer(wait) => defer(ctx.reborrow(), v, wait),
    }
}

/// Exit reason 1 without an acknowledged external interrupt: exit-sti, or an anomaly.
#[inline(never)]
fn on_unusual_info(mut ctx: IntrCtx<'_>, info: ExitIntrInfo) {
    if !info.valid() {
        if ctx.root.mode.acks_on_exit() {
            // Ack was on yet nothing was acknowledged: the vector is still in the IRR, so the
            // exit-sti path still delivers it. Counted, never dropped.
            ctx.anomaly(Anomaly::InvalidIntrInfo, u64::from(info.raw()));
        }
        on_unacknowledged(&mut ctx);
    } else {
        ctx.anomaly(Anomaly::UnexpectedIntrType, u64::from(info.raw()));
    }
}

/// `v` must wait: into the pending set, with the exit that brings it back.
#[inline(never)]
fn defer(ctx: IntrCtx<'_>, v: Vector, wait: Wait) {
    // The set is empty, so this first acknowledge always fits.
    let _ = ctx.root.pending.insert(v);
    ctx.cpu.data.stats.deferral();
    let (window, cr8) = (wait == Wait::Window, wait == Wait::Priority);
    inject::set_waits(ctx.vmcs, ctx.root, window, cr8);
}

/// Older vectors wait: `v` joins them so delivery stays in priority order.
#[inline(never)]
fn join_pending(mut ctx: IntrCtx<'_>, v: Vector, g: GuestView) {
    // The same vector may already wait: the guest's EOI cleared its ISR bit (it was the
    // highest) and the line was sent again. Each acknowledge is delivered once, so each gets
    // its EOI (`pending` module docs); the re-acknowledge is counted.
    match ctx.root.pending.insert(v) {
        Ok(1) => {}
        Ok(_) => ctx.anomaly(Anomaly::DuplicatePending, u64::from(v.0)),
        Err(pending::Saturated) => {
            ctx.anomaly(Anomaly::DuplicatePending, u64::from(v.0) | SATURATED_DETAIL);
        }
    }
    deliver_pending(&mut ctx, &g);
    if ctx.root.pending.contains(v) {
        ctx.cpu.data.stats.deferral();
    }
}

/// Interrupt-window exit, or a CR8 load that may have unblocked a pending vector.
pub fn on_window(ctx: &mut ExitCtx<'_>) {
    let mut ctx = IntrCtx::of(ctx);
    let g = guest_view(ctx.vmcs);
    deliver_pending(&mut ctx, &g);
}

/// [`policy::decide`], with the LAPIC's spurious vector exempt from CR8 ([`spurious`]). The SVR
/// is read only when CR8 would hold a vector back, so the common path reads nothing more.
#[inline(always)]
fn decide(ctx: &IntrCtx<'_>, v: Vector, g: &GuestView) -> Delivery {
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
fn deliver_pending(ctx: &mut IntrCtx<'_>, g: &GuestView) {
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
fn replay_or_inject(ctx: &mut IntrCtx<'_>, v: Vector, g: &GuestView) -> bool {
    match gate_handler(ctx, v) {
        Ok(handler) => {
            replay(ctx, v, g, handler);
            false
        }
        Err(why) => {
            rejected(ctx.reborrow(), v, why as u64);
            inject(ctx, v, g);
            true
        }
    }
}

/// `v`'s handler in this CPU's IDT, if root may call it (DESIGN §3.4).
#[inline(always)]
fn gate_handler(ctx: &mut IntrCtx<'_>, v: Vector) -> Result<u64, policy::GateRejection> {
    let (base, limit) = guest_idt(ctx.vmcs, ctx.root);
    let gate = replay::read_gate(base, limit, v);
    policy::validate_gate_expecting(v, gate, limit, &ctx.root.gate_expect)
}

/// Calls `handler` for `v` at IRQL ≥ DISPATCH, counts the replay, wakes a halted guest.
#[inline(always)]
fn replay(ctx: &mut IntrCtx<'_>, v: Vector, g: &GuestView, handler: u64) {
    let what = RootRun::Gate {
        handler,
        kcs: ctx.root.kernel_cs,
        kss: ctx.root.kernel_ss,
    };
    let cycles = run_with_guest_debug(ctx, what, policy::frame_stack(g.cpl, g.rsp), g.cr8);
    if policy::clears_buffers_after_replay(g.cpl, ctx.root.md_clear) {
        // The handler ran kernel code for an interrupt from user mode; NT's own return to user
        // mode would clear CPU buffers (MDS) there, and the guest now resumes at CPL 3.
        regs::verw(ctx.root.kernel_ss);
    }
    ctx.cpu.data.stats.replay(v.0);
    // Only reason-1 exits are timed (`Stats::cycles`); a replay from a window or CR8 exit
    // would otherwise inflate the handler share beyond the total.
    if ctx.timed {
        ctx.cpu.data.stats.handler_cycles(cycles);
    }
    // A halted guest that got an interrupt would have woken (kvm-unit-tests too).
    wake::after_delivery(ctx.vmcs, g.activity);
}

/// [`run_at_dispatch`] with the guest's debug registers given to the handlers root runs
/// ([`debug`]): loaded only when `RootState::debug_armed`, and whatever the call left in DR7
/// other than the exit's value written back. The common call costs a byte test before, one
/// MOV from DR7 and a compare after. On a platform with its own IRQL calls (NT) they bracket
/// the raise and the lower too.
#[inline(always)]
fn run_with_guest_debug(
    ctx: &mut IntrCtx<'_>,
    what: RootRun,
    frame: policy::FrameStack,
    guest_cr8: u8,
) -> u64 {
    if ctx.root.debug_armed {
        enter_guest_debug(ctx.root);
    }
    let cycles = run_at_dispatch(ctx.root, what, frame, guest_cr8);
    // Armed or not, a DR7 other than the exit's means there is something to write back or
    // put back (`debug::plan` never loads the exit's value).
    let dr7 = regs::dr7();
    if dr7 != DR7_AFTER_EXIT {
        leave_guest_debug(ctx.reborrow(), dr7);
    }
    cycles
}

/// Gives the guest's handlers that root is about to run the guest's DR7 and DEBUGCTL
/// ([`debug`]). Only when `RootState::debug_armed`: the common root call skips it.
#[cold]
#[inline(never)]
fn enter_guest_debug(root: &RootState) {
    replay::load_guest_debug(&debug::plan(
        root.guest_dr7,
        root.guest_debugctl,
        root.debugctl_msr,
    ));
}

/// Writes back to the VMCS what the root call changed in DR7/DEBUGCTL (a debugger's thaw, a
/// `ba` set or removed inside the handler), so the guest keeps it after VM entry. `dr7` is
/// what the call left in DR7, never the exit's 0x400.
#[cold]
#[inline(never)]
fn leave_guest_debug(ctx: IntrCtx<'_>, dr7: u64) {
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

/// A gate failed validation: counted and logged (the caller injects the vector).
#[inline(never)]
fn rejected(ctx: IntrCtx<'_>, v: Vector, why: u64) {
    ctx.cpu.data.stats.anomaly(Anomaly::RejectedGate);
    ctx.log(LogKind::GateRejected, u64::from(v.0), why);
}

/// This CPU's IDT as the guest has it loaded. The limit is re-read only when the base moved:
/// NT loads each CPU's IDT once at boot. A guest that reloads the same base with another limit
/// keeps the cached one; a larger limit then only makes root inject vectors beyond the old one
/// (the guest delivers them itself), a smaller one lets root call a valid gate the CPU would
/// have refused with #GP. Issue 11: one VMREAD per exit instead of two.
#[inline(always)]
fn guest_idt(vmcs: &Vmcs, root: &mut RootState) -> (u64, u16) {
    let base = vmcs.read_known(guest::IDTR_BASE);
    if base != root.idt_base {
        root.idt_base = base;
        root.idt_limit = vmcs.read_known(guest::IDTR_LIMIT) as u16;
    }
    (base, root.idt_limit)
}

/// What root runs at IRQL ≥ DISPATCH (DESIGN §4): an OS handler, called through its gate or
/// delivered by the CPU in an exit-sti window.
#[derive(Clone, Copy)]
enum RootRun {
    /// Call a validated gate's handler with a hand-built frame.
    Gate { handler: u64, kcs: u16, kss: u16 },
    /// `sti; nop; cli`: the CPU delivers the pending IRR vector through the host IDT.
    StiWindow,
}

/// Runs `what` at IRQL ≥ DISPATCH on `frame` and returns the TSC cycles it took (0 without
/// `stats`). With raw CR8 (the test machine) nothing but our own code and the OS handler runs
/// here; a platform with its own IRQL functions (NT) has them called inside
/// [`crate::exit::stub::with_fx_saved`], because their code is not ours to prove free of XMM.
#[inline(always)]
fn run_at_dispatch(
    root: &RootState,
    what: RootRun,
    frame: policy::FrameStack,
    guest_cr8: u8,
) -> u64 {
    // `irql_is_cr8` first: the common case decides on one byte.
    if !root.irql_is_cr8
        && let Some(platform) = root.platform
    {
        let call = PlatformRun {
            platform,
            what,
            frame,
            cycles: core::cell::Cell::new(0),
        };
        crate::exit::stub::with_fx_saved(platform_run, &call);
        return call.cycles.get();
    }
    if guest_cr8 < policy::DISPATCH_LEVEL {
        // SAFETY: raising the task priority only masks interrupts (IF=0 here anyway).
        unsafe { regs::set_cr8(policy::DISPATCH_LEVEL) };
    }
    let cycles = run(what, frame);
    // SAFETY: back to the guest's own CR8 (written even when equal, so a handler that left
    // CR8 elsewhere is corrected); IF=0 in root, nothing is delivered here.
    unsafe { regs::set_cr8(guest_cr8) };
    cycles
}

#[inline(always)]
fn run(what: RootRun, frame: policy::FrameStack) -> u64 {
    let t0 = crate::stats::tsc();
    match what {
        RootRun::Gate { handler, kcs, kss } => replay::call_handler(handler, kcs, kss, frame),
        RootRun::StiWindow => replay::sti_window(frame),
    }
    t0.elapsed()
}

/// A [`RootRun`] through the platform's IRQL functions, run by [`platform_run`].
struct PlatformRun {
    platform: &'static dyn crate::platform::Platform,
    what: RootRun,
    frame: policy::FrameStack,
    cycles: core::cell::Cell<u64>,
}

/// DESIGN §4 with the platform's own IRQL calls (NT: KfRaiseIrql/KeLowerIrql semantics);
/// KeLowerIrql only lowers.
extern "sysv64" fn platform_run(call: &PlatformRun) {
    let old = call.platform.raise_irql(policy::DISPATCH_LEVEL);
    call.cycles.set(run(call.what, call.frame));
    call.platform.lower_irql(old);
}

#[inline(always)]
fn inject(ctx: &mut IntrCtx<'_>, v: Vector, g: &GuestView) {
    wake::inject_external(ctx.vmcs, v.0, g.activity);
    ctx.cpu.data.stats.injection(v.0);
}

/// exit-sti (ack off): the vector is still in the IRR. DESIGN §2 policy.
fn on_unacknowledged(ctx: &mut IntrCtx<'_>) {
    let g = guest_view(ctx.vmcs);
    let highest = ctx
        .root
        .apic
        .and_then(crate::arch::apic::highest_irr)
        .map(Vector);
    match policy::sti_window(highest, &g, &ctx.cpu.data.policy) {
        StiWindow::Open => open_sti_window(ctx, &g),
        StiWindow::GuestTakes => {
            ctx.cpu.data.stats.guest_take();
            inject::suspend_exiting(ctx.vmcs, ctx.root);
        }
    }
}

/// exit-sti's root window on the stack a real interrupt's frame would use.
#[inline(always)]
fn open_sti_window(ctx: &mut IntrCtx<'_>, g: &GuestView) {
    ctx.cpu.data.stats.sti_window();
    // DESIGN §4: NT's epilogue must not find an IRQL below DISPATCH, and a class ≤ 2 vector
    // raised by the handler (a DPC request) must wait for the guest instead of slipping in
    // between the handler's IRETQ and our CLI. `policy::sti_window` gave class ≤ 2 IRR vectors
    // to the guest, so the highest one stays deliverable.
    let frame = policy::frame_stack(g.cpl, g.rsp);
    let cycles = run_with_guest_debug(ctx, RootRun::StiWindow, frame, g.cr8);
    ctx.cpu.data.stats.handler_cycles(cycles);
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
