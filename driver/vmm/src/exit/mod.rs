//! The VM-exit side: the stub, the dispatcher by exit reason and the handlers.
//!
//! Handler contract (as KVM's table states it): a handler runs in root with IF=0 and the
//! guest's CR8, may read and write the current VMCS and the saved GPRs, and returns an
//! [`ExitAction`]. It never allocates, locks, prints or fails: anomalies are counted and put in
//! the log ring, unrecoverable states become [`ExitAction::Fatal`].
//!
//! **Runs in:** VMX root.

pub mod guest_regs;
pub mod hypercall;
mod instr;
pub mod stub;

use crate::arch::regs;
use crate::cpu::{PerCpu, RootState};
use crate::log_ring::LogKind;
use crate::platform::{FatalKind, FatalState};
use crate::stats::Anomaly;
use crate::vmx::Vmcs;
use crate::vmx::fields::{ExitReasonField, reason};
use guest_regs::GuestRegs;
use x86::vmx::vmcs::{guest, ro};

/// What the stub does after a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// VMRESUME.
    Resume,
    /// VMXOFF already ran: continue the former guest.
    Devirtualize,
    /// Stop this CPU with this record.
    Fatal(FatalState),
}

/// Everything a handler may touch.
pub struct ExitCtx<'a> {
    /// The current VMCS.
    pub vmcs: &'a Vmcs,
    /// Saved guest GPRs.
    pub regs: &'a mut GuestRegs,
    /// This CPU.
    pub cpu: &'a PerCpu,
    /// This CPU's root state.
    pub root: &'a mut RootState,
    /// The exit reason.
    pub reason: ExitReasonField,
    /// The guest's saved x87/SSE state.
    pub fx: &'a mut guest_regs::FxArea,
}

impl ExitCtx<'_> {
    /// Counts an anomaly and logs it with a detail word.
    pub fn anomaly(&mut self, kind: Anomaly, detail: u64) {
        self.cpu.data.stats.anomaly(kind);
        self.log(LogKind::Anomaly, kind as u64, detail);
    }

    /// Appends a log record.
    pub fn log(&self, kind: LogKind, a: u64, b: u64) {
        self.cpu.data.log.push(regs::rdtsc(), kind, a, b);
    }

    /// A fatal action for this exit.
    pub fn fatal(&self, kind: FatalKind) -> ExitAction {
        ExitAction::Fatal(self.fatal_state(kind))
    }

    /// The fatal record for this exit (no VM-instruction error).
    pub fn fatal_state(&self, kind: FatalKind) -> FatalState {
        FatalState {
            cpu: self.root.cpu,
            exit_reason: self.reason.raw(),
            qualification: self.vmcs.read(ro::EXIT_QUALIFICATION),
            guest_rip: self.vmcs.read(guest::RIP),
            instr_error: 0,
            kind,
        }
    }
}

type Handler = fn(&mut ExitCtx<'_>) -> ExitAction;

/// Handlers by basic exit reason; `None` goes to [`handle_unexpected`].
const HANDLER_SLOTS: usize = 66;

#[expect(
    clippy::indexing_slicing,
    reason = "evaluated at compile time: a bad index fails the build"
)]
static HANDLERS: [Option<Handler>; HANDLER_SLOTS] = {
    let mut t: [Option<Handler>; HANDLER_SLOTS] = [None; HANDLER_SLOTS];
    t[reason::TRIPLE_FAULT as usize] = Some(handle_triple_fault);
    t[reason::INIT as usize] = Some(handle_init_sipi);
    t[reason::SIPI as usize] = Some(handle_init_sipi);
    t[reason::INTERRUPT_WINDOW as usize] = Some(handle_interrupt_window);
    t[reason::CPUID as usize] = Some(instr::handle_cpuid);
    t[reason::GETSEC as usize] = Some(instr::handle_undefined);
    t[reason::INVD as usize] = Some(instr::handle_invd);
    t[reason::VMCALL as usize] = Some(instr::handle_vmcall);
    t[reason::VMCLEAR as usize] = Some(instr::handle_undefined);
    t[reason::VMLAUNCH as usize] = Some(instr::handle_undefined);
    t[reason::VMPTRLD as usize] = Some(instr::handle_undefined);
    t[reason::VMPTRST as usize] = Some(instr::handle_undefined);
    t[reason::VMREAD as usize] = Some(instr::handle_undefined);
    t[reason::VMRESUME as usize] = Some(instr::handle_undefined);
    t[reason::VMWRITE as usize] = Some(instr::handle_undefined);
    t[reason::VMXOFF as usize] = Some(instr::handle_undefined);
    t[reason::VMXON as usize] = Some(instr::handle_undefined);
    t[reason::INVEPT as usize] = Some(instr::handle_undefined);
    t[reason::INVVPID as usize] = Some(instr::handle_undefined);
    t[reason::VMFUNC as usize] = Some(instr::handle_undefined);
    t[reason::CR_ACCESS as usize] = Some(instr::handle_cr_access);
    t[reason::DR_ACCESS as usize] = Some(instr::handle_dr_access);
    t[reason::RDMSR as usize] = Some(instr::handle_rdmsr);
    t[reason::WRMSR as usize] = Some(instr::handle_wrmsr);
    t[reason::MONITOR_TRAP_FLAG as usize] = Some(handle_forced_exit);
    t[reason::PREEMPTION_TIMER as usize] = Some(handle_forced_exit);
    t[reason::XSETBV as usize] = Some(instr::handle_xsetbv);
    t
};

/// [`dispatch_fast`]: the exit is handled, VMRESUME.
const FAST_HANDLED: u64 = 0;
/// [`dispatch_fast`]: not an external-interrupt exit, take the slow path.
const FAST_DECLINED: u64 = 1;

/// Called by the stub first, with only the volatile GPRs saved and no FXSAVE: handles the
/// common external-interrupt exits in full ([`crate::intr::try_fast`]) and returns
/// [`FAST_HANDLED`]; declines everything else having changed nothing ([`FAST_DECLINED`]), and
/// the stub hands it to [`dispatch`]. Nothing reachable from here may use an XMM register (the
/// runner's `root_code_uses_no_vector_registers`).
pub(crate) extern "sysv64" fn dispatch_fast(cpu: &PerCpu) -> u64 {
    // SAFETY: a VM exit just happened on this CPU, so its VMCS is current.
    let vmcs = unsafe { Vmcs::current() };
    // Exactly reason 1: an entry failure or any flag bit goes the slow way.
    if vmcs.read32_known(ro::EXIT_REASON) != u32::from(reason::EXTERNAL_INTERRUPT) {
        return FAST_DECLINED;
    }
    let t0 = crate::stats::tsc();
    // SAFETY: root mode of the CPU that owns `cpu` (the stub found it in this CPU's host
    // stack); the exit path is not reentrant.
    let root = unsafe { cpu.root() };
    let mut ctx = crate::intr::IntrCtx {
        vmcs: &vmcs,
        cpu,
        root,
        timed: true,
    };
    if !crate::intr::try_fast(&mut ctx) {
        return FAST_DECLINED;
    }
    cpu.data.stats.exit(reason::EXTERNAL_INTERRUPT);
    cpu.data.stats.cycles(t0.elapsed());
    FAST_HANDLED
}

/// Called by the stub for every exit [`dispatch_fast`] declined. Returns 0 to resume, 1 after
/// VMXOFF.
pub(crate) extern "sysv64" fn dispatch(
    regs: &mut GuestRegs,
    cpu: &PerCpu,
    fx: &mut guest_regs::FxArea,
) -> u64 {
    // SAFETY: a VM exit just happened on this CPU, so its VMCS is current.
    let vmcs = unsafe { Vmcs::current() };
    // SAFETY: root mode of the CPU that owns `cpu` (the stub found it in this CPU's host
    // stack); the exit path is not reentrant.
    let root = unsafe { cpu.root() };
    let reason = ExitReasonField::from_raw(vmcs.read32(ro::EXIT_REASON));
    cpu.data.stats.exit(reason.basic());
    if root.exiting_suspended {
        crate::intr::inject::resume_exiting(&vmcs, root);
        cpu.data.stats.exiting_resumed();
    }
    let mut ctx = ExitCtx {
        vmcs: &vmcs,
        regs,
        cpu,
        root,
        reason,
        fx,
    };
    let action = if reason.entry_failure() && !ctx.root.launched {
        // The first VMLAUNCH failed its guest-state checks: a load-time refusal, not a crash.
        ctx.root.launch_failure = Some(reason.raw());
        ctx.vmcs.set(guest::RIP, stub::launch_failed_resume_point());
        crate::hypervisor::leave_root(&mut ctx)
    } else if reason.entry_failure() {
        ctx.fatal(FatalKind::EntryFailure)
    } else if reason.basic() == reason::EXTERNAL_INTERRUPT {
        // Reason 1 the fast path declined (see `intr::try_fast`): the full handling.
        let t0 = crate::stats::tsc();
        crate::intr::on_external_interrupt(&mut crate::intr::IntrCtx::of(&mut ctx));
        cpu.data.stats.cycles(t0.elapsed());
        ExitAction::Resume
    } else {
        let handler = HANDLERS.get(usize::from(reason.basic())).copied().flatten();
        handler.unwrap_or(handle_unexpected)(&mut ctx)
    };
    match action {
        ExitAction::Resume => 0,
        ExitAction::Devirtualize => 1,
        ExitAction::Fatal(state) => stop(&mut ctx, state),
    }
}

fn stop(ctx: &mut ExitCtx<'_>, state: FatalState) -> ! {
    ctx.log(
        LogKind::Fatal,
        u64::from(state.exit_reason),
        state.guest_rip,
    );
    ctx.root.fatal = Some(state);
    match ctx.root.platform {
        Some(p) => p.fatal(&state),
        None => loop {
            core::hint::spin_loop();
        },
    }
}

/// VMRESUME failed (called by the stub with RFLAGS after VMRESUME).
pub(crate) fn resume_failed(cpu: &PerCpu, _rflags: u64) -> ! {
    // SAFETY: still root mode on the owning CPU; no other reference is live.
    let root = unsafe { cpu.root() };
    // SAFETY: the VMCS that failed to resume is still current.
    let vmcs = unsafe { Vmcs::current() };
    let state = FatalState {
        cpu: root.cpu,
        exit_reason: FatalState::NO_EXIT,
        qualification: 0,
        guest_rip: vmcs.read(guest::RIP),
        instr_error: vmcs.read32(ro::VM_INSTRUCTION_ERROR),
        kind: FatalKind::ResumeFailed,
    };
    root.fatal = Some(state);
    cpu.data.log.push(
        regs::rdtsc(),
        LogKind::Fatal,
        u64::from(state.instr_error),
        state.guest_rip,
    );
    match root.platform {
        Some(p) => p.fatal(&state),
        None => loop {
            core::hint::spin_loop();
        },
    }
}

fn handle_triple_fault(ctx: &mut ExitCtx<'_>) -> ExitAction {
    ctx.fatal(FatalKind::TripleFault)
}

/// A blue pill cannot emulate a processor reset without unrestricted guest; the OS sends INIT
/// only at boot, shutdown and hot-add, when ackvisor is not loaded (DESIGN §5).
fn handle_init_sipi(ctx: &mut ExitCtx<'_>) -> ExitAction {
    ctx.fatal(FatalKind::InitSignal)
}

fn handle_interrupt_window(ctx: &mut ExitCtx<'_>) -> ExitAction {
    crate::intr::on_window(ctx);
    ExitAction::Resume
}

/// Preemption timer or MTF: only used to end an exit-sti hand-over, already undone in
/// [`dispatch`].
fn handle_forced_exit(_ctx: &mut ExitCtx<'_>) -> ExitAction {
    ExitAction::Resume
}

fn handle_unexpected(ctx: &mut ExitCtx<'_>) -> ExitAction {
    ctx.fatal(FatalKind::UnexpectedExit)
}
