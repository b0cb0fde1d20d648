//! Handlers of instructions that exit unconditionally or by our controls: CPUID, INVD, XSETBV,
//! VMCALL, MOV CR, RDMSR/WRMSR and the VMX instructions (#UD).
//!
//! **Runs in:** VMX root.

use super::guest_regs::reg;
use super::hypercall::{self, Call, Status, VmcallAction};
use super::{ExitAction, ExitCtx};
use crate::arch::debug::{DR6_BD, Dr7};
use crate::arch::{msr, regs};
use crate::intr::Mode;
use crate::intr::debug::{self, MovDr};
use crate::log_ring::LogKind;
use crate::platform::FatalKind;
use crate::stats::Anomaly;
use crate::vmx::fields::{CrAccessQual, DrAccessQual, Interruptibility, cr_access, exception};
use crate::vmx::vmcs::CR4_VMXE;
use x86::vmx::vmcs::{control, guest, ro};

const RFLAGS_TF: u64 = 1 << 8;
/// CR4.DE: DR4/DR5 #UD instead of aliasing DR6/DR7.
const CR4_DE: u64 = 1 << 3;
/// DR6's number.
const DR6: u8 = 6;
/// Pending debug exceptions: BS (single step) — SDM 3C, "Guest Non-Register State".
const PENDING_DBG_BS: u64 = 1 << 14;
/// CPUID.1:ECX.VMX, hidden from the guest.
const CPUID_1_ECX_VMX: u32 = 1 << 5;

/// DESIGN §5 (KVM's kvm_skip_emulated_instruction): advance RIP, end STI/MOV-SS blocking, and
/// raise the single-step #DB a real CPU would have raised after the instruction.
fn skip(ctx: &mut ExitCtx<'_>) {
    let v = ctx.vmcs;
    let rip = v
        .read(guest::RIP)
        .wrapping_add(v.read(ro::VMEXIT_INSTRUCTION_LEN));
    v.set(guest::RIP, rip);
    let mut irq = Interruptibility::from_raw(v.read32(guest::INTERRUPTIBILITY_STATE));
    if irq.blocking_by_sti() || irq.blocking_by_mov_ss() {
        irq.set_blocking_by_sti(false);
        irq.set_blocking_by_mov_ss(false);
        v.set(guest::INTERRUPTIBILITY_STATE, u64::from(irq.raw()));
    }
    if v.read(guest::RFLAGS) & RFLAGS_TF != 0 {
        let pending = v.read(guest::PENDING_DBG_EXCEPTIONS);
        v.set(guest::PENDING_DBG_EXCEPTIONS, pending | PENDING_DBG_BS);
    }
}

fn inject_ud(ctx: &mut ExitCtx<'_>) -> ExitAction {
    crate::intr::inject::exception(ctx.vmcs, exception::UD, false);
    ExitAction::Resume
}

fn inject_gp(ctx: &mut ExitCtx<'_>) -> ExitAction {
    crate::intr::inject::exception(ctx.vmcs, exception::GP, true);
    ExitAction::Resume
}

fn guest_cpl(ctx: &ExitCtx<'_>) -> u8 {
    crate::vmx::fields::AccessRights::from_raw(ctx.vmcs.read32(guest::SS_ACCESS_RIGHTS)).dpl()
}

/// VMX instructions and GETSEC: a CPU without VMX/SMX raises #UD.
pub(super) fn handle_undefined(ctx: &mut ExitCtx<'_>) -> ExitAction {
    inject_ud(ctx)
}

pub(super) fn handle_cpuid(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let leaf = ctx.regs.get(reg::RAX) as u32;
    let sub = ctx.regs.get(reg::RCX) as u32;
    let mut r = regs::cpuid(leaf, sub);
    if leaf == 1 {
        // Nested VMX is not offered.
        r[2] &= !CPUID_1_ECX_VMX;
    }
    for (n, v) in [reg::RAX, reg::RBX, reg::RCX, reg::RDX].into_iter().zip(r) {
        ctx.regs.set(n, u64::from(v));
    }
    skip(ctx);
    ExitAction::Resume
}

/// INVD would drop dirty cache lines the host also owns: emulate as WBINVD.
pub(super) fn handle_invd(ctx: &mut ExitCtx<'_>) -> ExitAction {
    regs::wbinvd();
    skip(ctx);
    ExitAction::Resume
}

/// XCR0 bits: x87, SSE, AVX, MPX (2 bits), AVX-512 (3 bits).
mod xcr0 {
    pub const X87: u64 = 1 << 0;
    pub const SSE: u64 = 1 << 1;
    pub const AVX: u64 = 1 << 2;
    pub const MPX: u64 = 0b11 << 3;
    pub const AVX512: u64 = 0b111 << 5;
    pub const AMX: u64 = 0b11 << 17;
}

/// SDM "XSETBV" #GP conditions for XCR0: a value the CPU would reject is never written in root.
pub fn xsetbv_valid(index: u32, value: u64, supported: u64) -> bool {
    if index != 0 || value & !supported != 0 || value & xcr0::X87 == 0 {
        return false;
    }
    if value & xcr0::AVX != 0 && value & xcr0::SSE == 0 {
        return false;
    }
    let mpx = value & xcr0::MPX;
    if mpx != 0 && mpx != xcr0::MPX {
        return false;
    }
    let amx = value & xcr0::AMX;
    if amx != 0 && amx != xcr0::AMX {
        return false;
    }
    let avx512 = value & xcr0::AVX512;
    if avx512 != 0 && (avx512 != xcr0::AVX512 || value & xcr0::AVX == 0) {
        return false;
    }
    true
}

pub(super) fn handle_xsetbv(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let index = ctx.regs.get(reg::RCX) as u32;
    let value = ctx.regs.edx_eax();
    let leaf = regs::cpuid(0xD, 0);
    let supported = u64::from(leaf[0]) | (u64::from(leaf[3]) << 32);
    if guest_cpl(ctx) != 0 || !xsetbv_valid(index, value, supported) {
        return inject_gp(ctx);
    }
    // SAFETY: validated above against CPUID.0xD and the SDM's consistency rules.
    unsafe { regs::xsetbv(index, value) };
    skip(ctx);
    ExitAction::Resume
}

pub(super) fn handle_vmcall(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let rcx = ctx.regs.get(reg::RCX);
    match hypercall::classify(guest_cpl(ctx), rcx, ctx.root.features.outer_hypervisor) {
        VmcallAction::Ours => ours(ctx),
        VmcallAction::Forward => {
            ctx.log(
                LogKind::ForeignVmcall,
                ctx.regs.get(reg::RAX),
                VmcallAction::Forward as u64,
            );
            forward(ctx);
            skip(ctx);
            ExitAction::Resume
        }
        VmcallAction::InjectUd => {
            ctx.anomaly(Anomaly::ForeignVmcall, ctx.regs.get(reg::RAX));
            inject_ud(ctx)
        }
    }
}

/// Hyper-V's hypercall ABI (RCX control, RDX/R8 GPAs or fast-call registers, result in RAX):
/// the outer hypervisor sees the guest's registers as if the guest had called it.
fn forward(ctx: &mut ExitCtx<'_>) {
    let (mut rax, mut rcx, mut rdx) = (
        ctx.regs.get(reg::RAX),
        ctx.regs.get(reg::RCX),
        ctx.regs.get(reg::RDX),
    );
    let mut r8 = ctx.regs.get(8);
    let fx = ctx.fx.0.as_mut_ptr();
    // Hyper-V's XMM fast hypercalls take input in XMM0-5 and may return output there: hand it
    // the guest's registers from the FXSAVE area and put what comes back where FXRSTOR reads.
    // SAFETY: the outer hypervisor handles VMCALL from our root as from its guest; it only
    // touches the registers named here and guest-physical memory the OS gave it. `fx` is the
    // stub's 16-byte-aligned 512-byte FXSAVE area, XMM0-5 at bytes 160..256.
    unsafe {
        core::arch::asm!(
            "movdqa xmm0, [{fx} + 160]", "movdqa xmm1, [{fx} + 176]", "movdqa xmm2, [{fx} + 192]",
            "movdqa xmm3, [{fx} + 208]", "movdqa xmm4, [{fx} + 224]", "movdqa xmm5, [{fx} + 240]",
            "vmcall",
            "movdqa [{fx} + 160], xmm0", "movdqa [{fx} + 176], xmm1", "movdqa [{fx} + 192], xmm2",
            "movdqa [{fx} + 208], xmm3", "movdqa [{fx} + 224], xmm4", "movdqa [{fx} + 240], xmm5",
            fx = in(reg) fx,
            inout("rax") rax, inout("rcx") rcx, inout("rdx") rdx, inout("r8") r8,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
            options(nostack)
        )
    };
    ctx.regs.set(reg::RAX, rax);
    ctx.regs.set(reg::RCX, rcx);
    ctx.regs.set(reg::RDX, rdx);
    ctx.regs.set(8, r8);
}

fn ours(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let arg = ctx.regs.get(reg::RDX);
    let status = match Call::try_from(ctx.regs.get(reg::RAX)) {
        Ok(Call::Ping) => {
            ctx.regs.set(reg::RDX, hypercall::PING_REPLY);
            Status::Ok
        }
        Ok(Call::SetMode) => match u32::try_from(arg).ok().and_then(|m| Mode::try_from(m).ok()) {
            None => Status::BadArgument,
            Some(mode) if crate::vmx::caps::mode_supported(mode, &ctx.root.features).is_err() => {
                Status::Unsupported
            }
            // DESIGN §2: drain the pending set before a mode change.
            Some(_) if !ctx.root.pending.is_empty() => Status::Busy,
            Some(mode) => {
                crate::intr::apply_mode(ctx.vmcs, ctx.root, &ctx.cpu.data.applied_mode, mode);
                ctx.log(LogKind::ModeApplied, mode as u64, 0);
                Status::Ok
            }
        },
        Ok(Call::Devirtualize) if !ctx.root.pending.is_empty() => Status::Busy,
        Ok(Call::Devirtualize) => {
            skip(ctx);
            ctx.regs.set(reg::RAX, Status::Ok as u64);
            return crate::hypervisor::leave_root(ctx);
        }
        Err(_) => Status::UnknownCall,
    };
    ctx.regs.set(reg::RAX, status as u64);
    skip(ctx);
    ExitAction::Resume
}

/// The source operand of an exiting MOV: RSP comes from the VMCS.
fn operand(ctx: &ExitCtx<'_>, gpr: usize) -> u64 {
    let vmcs = ctx.vmcs;
    ctx.regs.operand(gpr, || vmcs.read(guest::RSP))
}

/// Stores a MOV's result into its destination register (RSP: GUEST_RSP).
fn set_operand(ctx: &mut ExitCtx<'_>, gpr: usize, v: u64) {
    if let Some(rsp) = ctx.regs.set_operand(gpr, v) {
        ctx.vmcs.set(guest::RSP, rsp);
    }
}

pub(super) fn handle_cr_access(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let q = CrAccessQual::from_raw(ctx.vmcs.read(ro::EXIT_QUALIFICATION));
    let gpr = usize::from(q.gpr());
    match (q.cr(), q.access_type()) {
        (8, cr_access::MOV_TO) => {
            let value = operand(ctx, gpr);
            if value > 0xF {
                // SDM "MOV—Move to/from Control Registers": reserved CR8 bits set is #GP.
                return inject_gp(ctx);
            }
            let level = value as u8;
            // SAFETY: root runs with the guest's CR8 (no TPR shadow); this is the guest's own
            // write, done on its behalf. IF=0 in root, so nothing is delivered here.
            unsafe { regs::set_cr8(level) };
            skip(ctx);
            // A lower CR8 may unblock a pending vector.
            crate::intr::on_window(ctx);
            ExitAction::Resume
        }
        (4, cr_access::MOV_TO) => {
            let value = operand(ctx, gpr);
            let fixed = crate::hypervisor::cr4_fixed();
            // The guest never sees VMXE (nested VMX is not offered): setting it #GPs, as on a
            // CPU without VMX; other fixed-bit violations #GP as they would in VMX operation.
            let must_be_one = fixed.0 & !CR4_VMXE;
            if value & CR4_VMXE != 0 || value & must_be_one != must_be_one || value & !fixed.1 != 0
            {
                return inject_gp(ctx);
            }
            ctx.vmcs.set(guest::CR4, value | CR4_VMXE);
            ctx.vmcs.set(control::CR4_READ_SHADOW, value);
            skip(ctx);
            ExitAction::Resume
        }
        // Only without TRUE controls, where CR3-load/store exiting is default-1.
        (3, cr_access::MOV_TO) => {
            ctx.vmcs.set(guest::CR3, operand(ctx, gpr) & !(1 << 63));
            skip(ctx);
            ExitAction::Resume
        }
        (3, cr_access::MOV_FROM) => {
            let cr3 = ctx.vmcs.read(guest::CR3);
            set_operand(ctx, gpr, cr3);
            skip(ctx);
            ExitAction::Resume
        }
        _ => ctx.fatal(FatalKind::UnexpectedExit),
    }
}

/// MOV DR (MOV-DR exiting, `intr::debug`): DR7 lives in the VMCS and in root's shadow of it,
/// DR0-3 and DR6 are the CPU's own and shared with root.
pub(super) fn handle_dr_access(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let q = DrAccessQual::from_raw(ctx.vmcs.read(ro::EXIT_QUALIFICATION));
    let gpr = usize::from(q.gpr());
    let value = if q.from_dr() { 0 } else { operand(ctx, gpr) };
    let cr4_de = ctx.vmcs.read(guest::CR4) & CR4_DE != 0;
    match debug::mov_dr(q.dr(), !q.from_dr(), value, cr4_de, ctx.root.guest_dr7) {
        MovDr::GeneralDetect => {
            // SDM 3B, "Debug Control Register (DR7)": the #DB clears GD and reports BD.
            let mut dr7 = Dr7::from_raw(ctx.root.guest_dr7);
            dr7.set_general_detect(false);
            ctx.root.set_guest_dr7(dr7.raw());
            ctx.vmcs.set(guest::DR7, dr7.raw());
            let dr6 = regs::read_dr(DR6);
            // SAFETY: DR6 with BD added to what the CPU holds (upper half already 0).
            unsafe { regs::write_dr(DR6, dr6 | DR6_BD) };
            crate::intr::inject::exception(ctx.vmcs, exception::DB, false);
            return ExitAction::Resume;
        }
        MovDr::Undefined => return inject_ud(ctx),
        MovDr::GeneralProtection => return inject_gp(ctx),
        MovDr::ReadDr7 => {
            let dr7 = ctx.root.guest_dr7;
            set_operand(ctx, gpr, dr7);
        }
        MovDr::WriteDr7(v) => {
            ctx.root.set_guest_dr7(v);
            ctx.vmcs.set(guest::DR7, v);
        }
        MovDr::Read(n) => {
            let v = regs::read_dr(n);
            set_operand(ctx, gpr, v);
        }
        // SAFETY: the guest's own write to its own debug register, which root shares; a DR6
        // value with its upper half set was refused (#GP) by `mov_dr`. Breakpoint addresses
        // take effect only under the guest's DR7, which root loads only around its handlers.
        MovDr::Write(n, v) => unsafe { regs::write_dr(n, v) },
    }
    skip(ctx);
    ExitAction::Resume
}

/// MSRs outside the bitmap's ranges always exit. Only the synthetic range is passed through,
/// and only to an outer hypervisor that owns it; anything else gets #GP in the guest rather
/// than a possible #GP in root.
fn passes_through(ctx: &ExitCtx<'_>, index: u32) -> bool {
    ctx.root.features.outer_hypervisor
        && (msr::SYNTHETIC_MSR_FIRST..=msr::SYNTHETIC_MSR_LAST).contains(&index)
}

pub(super) fn handle_rdmsr(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let index = ctx.regs.get(reg::RCX) as u32;
    if !passes_through(ctx, index) {
        return inject_gp(ctx);
    }
    // SAFETY: a synthetic MSR of the outer hypervisor, which answers it.
    let v = unsafe { regs::rdmsr(index) };
    ctx.regs.set(reg::RAX, v & 0xFFFF_FFFF);
    ctx.regs.set(reg::RDX, v >> 32);
    skip(ctx);
    ExitAction::Resume
}

pub(super) fn handle_wrmsr(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let index = ctx.regs.get(reg::RCX) as u32;
    if index == msr::IA32_DEBUGCTL && ctx.root.debugctl_msr {
        // The MSR bitmap intercepts this write (`intr::debug`): root keeps the value.
        let Some(v) = debug::debugctl_write(ctx.regs.edx_eax()) else {
            return inject_gp(ctx);
        };
        ctx.root.set_guest_debugctl(v);
        ctx.vmcs.set(guest::IA32_DEBUGCTL_FULL, v);
        skip(ctx);
        return ExitAction::Resume;
    }
    if !passes_through(ctx, index) {
        return inject_gp(ctx);
    }
    // SAFETY: a synthetic MSR of the outer hypervisor, which validates the value itself.
    unsafe { regs::wrmsr(index, ctx.regs.edx_eax()) };
    skip(ctx);
    ExitAction::Resume
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUPPORTED: u64 = 0b1110_0111; // x87 SSE AVX AVX-512

    #[test]
    fn xsetbv_accepts_consistent_values() {
        assert!(xsetbv_valid(0, 0b11, SUPPORTED));
        assert!(xsetbv_valid(0, 0b111, SUPPORTED));
        assert!(xsetbv_valid(0, 0b1110_0111, SUPPORTED));
    }

    #[test]
    fn xsetbv_rejects_what_the_cpu_would_gp_on() {
        assert!(!xsetbv_valid(1, 0b11, SUPPORTED), "XCR index 1");
        assert!(!xsetbv_valid(0, 0b10, SUPPORTED), "x87 clear");
        assert!(!xsetbv_valid(0, 0b101, SUPPORTED), "AVX without SSE");
        assert!(!xsetbv_valid(0, 0b1000_0011, SUPPORTED), "partial AVX-512");
        assert!(
            !xsetbv_valid(0, 0b1110_0011, SUPPORTED),
            "AVX-512 without AVX"
        );
        assert!(
            !xsetbv_valid(0, 0b1_0000_0011, SUPPORTED),
            "unsupported bit"
        );
        assert!(!xsetbv_valid(0, 0b00_1011, 0b11_1111), "half of MPX");
        let amx = SUPPORTED | (0b11 << 17);
        assert!(xsetbv_valid(0, 0b11 | (0b11 << 17), amx), "both AMX bits");
        assert!(
            !xsetbv_valid(0, 0b11 | (1 << 17), amx),
            "AMX tile config without data"
        );
    }
}
