//! All CPUs: virtualize, devirtualize, mode changes and state queries.
//!
//! **Runs in:** PASSIVE (guest side of the blue pill).

use crate::Error;
use crate::arch::msr::{self, FeatureControl};
use crate::arch::regs;
use crate::cpu::{PAGES_PER_CPU, PerCpu, RootState};
use crate::exit::hypercall::{self, Call, Status};
use crate::exit::stub::{self, LaunchResult};
use crate::exit::{ExitAction, ExitCtx};
use crate::intr::Mode;
use crate::intr::pending::PendingSet;
use crate::intr::vector_policy::{PolicyTable, VectorPolicy};
use crate::platform::{CpuIndex, Platform};
use crate::stats::{Snapshot, Stats};
use crate::vmx::{self, VmxError, caps, vmcs::CR4_VMXE};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};
use x86::vmx::vmcs::{guest, ro};

/// What to virtualize with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Interrupt mode every CPU starts in.
    pub mode: Mode,
}

/// The VMX features this machine offers that ackvisor cares about (decoded once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// IA32_VMX_BASIC bit 55: TRUE_* control MSRs exist.
    pub true_controls: bool,
    /// External-interrupt exiting may be set.
    pub external_interrupt_exiting: bool,
    /// VM-exit control "acknowledge interrupt on exit" may be set.
    pub ack_on_exit: bool,
    /// VMX preemption timer.
    pub preemption_timer: bool,
    /// Monitor trap flag.
    pub monitor_trap_flag: bool,
    /// Secondary processor-based controls.
    pub secondary_controls: bool,
    /// Secondary: enable RDTSCP.
    pub rdtscp: bool,
    /// Secondary: enable INVPCID.
    pub invpcid: bool,
    /// Secondary: enable XSAVES/XRSTORS.
    pub xsaves: bool,
    /// Secondary: enable user wait and pause.
    pub user_wait_pause: bool,
    /// Secondary: EPT (not used).
    pub ept: bool,
    /// Secondary: VPID (not used: DESIGN §4).
    pub vpid: bool,
    /// An outer hypervisor answered CPUID 0x4000_0000 (its VMCALLs are forwarded).
    pub outer_hypervisor: bool,
}

/// One CPU as seen from PASSIVE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuState {
    /// The mode this CPU's VMCS has applied.
    pub mode: Mode,
    /// Its counters.
    pub stats: Snapshot,
}

/// Processors the core can track.
pub const MAX_CPUS: usize = 1024;

static CPUS: [AtomicPtr<PerCpu>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
static PLATFORM: spin::Once<&'static dyn Platform> = spin::Once::new();
static FEATURES: spin::Once<Features> = spin::Once::new();
static CPU_COUNT: AtomicU32 = AtomicU32::new(0);
/// CR4 fixed bits (FIXED0, FIXED1) for guest CR4 writes; identical on every CPU.
static CR4_FIXED0: AtomicU64 = AtomicU64::new(0);
static CR4_FIXED1: AtomicU64 = AtomicU64::new(u64::MAX);
/// Retries of a hypercall answered [`Status::Busy`] before giving up.
const BUSY_RETRIES: u32 = 1_000_000;

/// CPUID.1:ECX bits.
const CPUID_1_ECX_VMX: u32 = 1 << 5;
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 7 (structured extended features), subleaf 0.
const CPUID_EXTENDED_FEATURES: u32 = 7;
/// CPUID.7.0:EDX.MD_CLEAR: VERW overwrites CPU buffers.
const CPUID_7_EDX_MD_CLEAR: u32 = 1 << 10;
/// CR4.FRED (bit 32).
const CR4_FRED: u64 = 1 << 32;

/// Outer hypervisors whose VMCALLs and synthetic MSRs ackvisor forwards (DESIGN §5).
const FORWARDED_VENDORS: [&[u8; 12]; 2] = [MICROSOFT_HV, b"KVMKVMKVM\0\0\0"];
/// CPUID 0x4000_0000 vendor of Hyper-V.
const MICROSOFT_HV: &[u8; 12] = b"Microsoft Hv";

/// DESIGN §5 / issue 4: may this CPU enter VMX operation, and is there an outer hypervisor to
/// forward to? `vendor` is CPUID 0x4000_0000's EBX:ECX:EDX when the hypervisor bit is set.
pub fn vmx_availability(
    cpuid1_ecx: u32,
    vendor: Option<[u8; 12]>,
    feature_control: u64,
    cr4: u64,
) -> Result<bool, Error> {
    let hypervisor = cpuid1_ecx & CPUID_1_ECX_HYPERVISOR != 0;
    if cpuid1_ecx & CPUID_1_ECX_VMX == 0 {
        // Hyper-V (VBS/HVCI) keeps VT-x for itself and hides it from the root partition. Any
        // other hypervisor (VMware with "Virtualize Intel VT-x" unticked) simply does not expose
        // it: say which one, and not Hyper-V.
        return Err(match vendor {
            _ if !hypervisor => Error::NoVmx,
            Some(v) if v == *MICROSOFT_HV => Error::ForeignHypervisor,
            Some(vendor) => Error::NestedVmxHidden { vendor },
            None => Error::NoVmx,
        });
    }
    let fc = FeatureControl::from_raw(feature_control);
    if fc.locked() && !fc.vmx_outside_smx() {
        return Err(Error::VmxLockedOff);
    }
    if cr4 & CR4_FRED != 0 {
        return Err(Error::FredEnabled);
    }
    Ok(hypervisor && vendor.is_some_and(|v| FORWARDED_VENDORS.iter().any(|f| **f == v)))
}

/// What CPUID advertises to the OS among the instructions that need a secondary control.
fn advertised() -> caps::Advertised {
    let max = regs::cpuid(caps::cpuid::LEAF_MAX_BASIC, 0)[0];
    let max_ext = regs::cpuid(caps::cpuid::LEAF_MAX_EXTENDED, 0)[0];
    let l7 = if max >= caps::cpuid::LEAF_EXTENDED_FEATURES {
        regs::cpuid(caps::cpuid::LEAF_EXTENDED_FEATURES, 0)
    } else {
        [0; 4]
    };
    let ld1 = if max >= caps::cpuid::LEAF_XSAVE {
        regs::cpuid(caps::cpuid::LEAF_XSAVE, 1)
    } else {
        [0; 4]
    };
    let lx1 = if max_ext >= caps::cpuid::LEAF_EXT_FEATURES {
        regs::cpuid(caps::cpuid::LEAF_EXT_FEATURES, 0)
    } else {
        [0; 4]
    };
    caps::Advertised::decode(l7[1], l7[2], ld1[0], lx1[3])
}

fn hypervisor_vendor() -> Option<[u8; 12]> {
    if regs::cpuid(1, 0)[2] & CPUID_1_ECX_HYPERVISOR == 0 {
        return None;
    }
    let r = regs::cpuid(0x4000_0000, 0);
    let mut v = [0u8; 12];
    for (chunk, word) in v.chunks_exact_mut(4).zip([r[1], r[2], r[3]]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    Some(v)
}

pub(crate) fn cr4_fixed() -> (u64, u64) {
    (
        CR4_FIXED0.load(Ordering::Relaxed),
        CR4_FIXED1.load(Ordering::Relaxed),
    )
}

fn slot(cpu: CpuIndex) -> Result<&'static AtomicPtr<PerCpu>, Error> {
    CPUS.get(cpu.0 as usize).ok_or(Error::TooManyCpus)
}

fn vmx_err(instruction: &'static str, e: VmxError) -> Error {
    Error::VmxInstruction {
        instruction,
        error: e.instruction_error(),
    }
}

/// Virtualizes every CPU through [`Platform::for_each_cpu`]; on any failure undoes all.
pub fn virtualize_all(
    platform: &'static dyn Platform,
    config: Config,
) -> Result<(), (CpuIndex, Error)> {
    CPU_COUNT.store(platform.cpu_count(), Ordering::Relaxed);
    let result = platform.for_each_cpu(&|_| virtualize_current_cpu(platform, config));
    if result.is_err() {
        let _ = devirtualize_all();
    }
    result
}

/// Virtualizes the calling CPU; returns `Ok` already running as the guest.
pub fn virtualize_current_cpu(
    platform: &'static dyn Platform,
    config: Config,
) -> Result<(), Error> {
    let platform = *PLATFORM.call_once(|| platform);
    if CPU_COUNT.load(Ordering::Relaxed) == 0 {
        CPU_COUNT.store(platform.cpu_count(), Ordering::Relaxed);
    }
    let cpu = platform.current_cpu();
    let slot = slot(cpu)?;
    if !slot.load(Ordering::Acquire).is_null() {
        return Err(Error::AlreadyVirtualized);
    }
    let ecx = regs::cpuid(1, 0)[2];
    let fc = if ecx & CPUID_1_ECX_VMX != 0 {
        // SAFETY: IA32_FEATURE_CONTROL exists on every CPU with VMX.
        unsafe { regs::rdmsr(msr::IA32_FEATURE_CONTROL) }
    } else {
        0
    };
    let outer = vmx_availability(ecx, hypervisor_vendor(), fc, regs::cr4())?;
    if !FeatureControl::from_raw(fc).locked() {
        // Firmware left it open: enable VMX outside SMX and lock, as firmware normally does.
        // SAFETY: the MSR is unlocked, so the write is accepted; bits 0 and 2 only enable VMX.
        unsafe { regs::wrmsr(msr::IA32_FEATURE_CONTROL, fc | 0b101) };
    }
    let raw = vmx::probe();
    let controls = caps::controls(&raw, &advertised()).map_err(Error::Unsupported)?;
    let cr0 = regs::cr0();
    let cr4 = regs::cr4();
    let vmx_cr0 = vmx::fixed::fixed_cr0(&raw, cr0).map_err(Error::Unsupported)?;
    let vmx_cr4 = vmx::fixed::fixed_cr4(&raw, cr4).map_err(Error::Unsupported)?;
    let features = *FEATURES.call_once(|| caps::features(&raw, outer));
    caps::mode_supported(config.mode, &features).map_err(Error::Unsupported)?;
    CR4_FIXED0.store(raw.cr4_fixed0, Ordering::Relaxed);
    CR4_FIXED1.store(raw.cr4_fixed1, Ordering::Relaxed);

    let pages = platform
        .alloc_pages(PAGES_PER_CPU)
        .map_err(Error::Platform)?;
    let pcpu = pages.as_ptr().cast::<PerCpu>();
    // SAFETY: `pages` is PAGES_PER_CPU zeroed, page-aligned, writable pages, at least
    // size_of::<PerCpu>(); every field but `root` is atomics/bytes for which zero is valid, and
    // `root` is written before any read.
    let this: &PerCpu = unsafe { &*pcpu };
    let revision = msr::VmxBasic::from_raw(raw.basic).revision_id();
    let pa = |p: *const u8| NonNull::new(p.cast_mut()).map_or(0, |nn| platform.virt_to_phys(nn).0);
    let vmxon_pa = pa(core::ptr::addr_of!(this.vmxon).cast());
    let vmcs_pa = pa(core::ptr::addr_of!(this.vmcs).cast());
    let bitmap_pa = pa(core::ptr::addr_of!(this.msr_bitmap).cast());
    let guest_dr7 = regs::dr7();
    let debugctl = platform.debugctl();
    if debugctl.is_some() {
        // intr::debug: guest writes of IA32_DEBUGCTL exit, so root knows the value without a
        // VMREAD per exit. Reads are not intercepted: VM entry loaded the guest's value.
        let (byte, bit) = msr::bitmap_write_bit(msr::IA32_DEBUGCTL);
        let bitmap = core::ptr::addr_of!(this.msr_bitmap).cast_mut().cast::<u8>();
        // SAFETY: our own zeroed MSR-bitmap page, not yet in use by the CPU (before VMLAUNCH);
        // `byte` < 4096 (msr::bitmap_write_bit), so the byte lies inside it.
        unsafe { bitmap.wrapping_add(byte).write(1 << bit) };
    }
    let preemption_ticks = if features.preemption_timer {
        PREEMPTION_TICKS
    } else {
        0
    };
    init_root(
        this,
        platform,
        RootInit {
            cpu,
            mode: config.mode,
            controls,
            preemption_ticks,
            features,
            guest_dr7,
            debugctl,
            vmxon_pa,
            vmcs_pa,
        },
    );
    // SAFETY: both regions are ours and 4 KiB; the revision id goes in the first 31 bits.
    unsafe {
        core::ptr::addr_of!(this.vmxon)
            .cast_mut()
            .cast::<u32>()
            .write(revision);
    }
    // SAFETY: as above, for the VMCS region.
    unsafe {
        core::ptr::addr_of!(this.vmcs)
            .cast_mut()
            .cast::<u32>()
            .write(revision);
    }
    let host_rsp = this.host_rsp();
    // SAFETY: the top slot of our own stack, inside the block: the stub reads &PerCpu from it.
    unsafe { (host_rsp as *mut u64).write(pcpu as u64) };

    let undo = |e: Error| {
        // SAFETY: restores the caller's own CR0/CR4 after a failed attempt (VMX off again).
        unsafe { regs::write_cr4(cr4) };
        // SAFETY: as above.
        unsafe { regs::write_cr0(cr0) };
        // SAFETY: the pages came from alloc_pages above and the CPU no longer uses them.
        unsafe { platform.free_pages(pages, PAGES_PER_CPU) };
        e
    };
    // SAFETY: the fixed bits only add what VMX operation requires (NE, PE/PG already set, VMXE);
    // vmx::fixed::fixed_cr0/fixed_cr4 refused above any OS bit FIXED1 would have cleared.
    unsafe { regs::write_cr0(vmx_cr0) };
    // SAFETY: as above.
    unsafe { regs::write_cr4(vmx_cr4) };
    // SAFETY: the VMXON region is this CPU's, page-aligned, revision id written above; CR0/CR4
    // carry the fixed bits; FEATURE_CONTROL allows VMXON (checked above).
    if let Err(e) = unsafe { vmx::vmxon(vmxon_pa) } {
        return Err(undo(vmx_err("VMXON", e)));
    }
    let fail = |name: &'static str, e: VmxError| {
        // SAFETY: we entered VMX operation above and nothing uses it yet.
        let _ = unsafe { vmx::vmxoff() };
        undo(vmx_err(name, e))
    };
    // SAFETY: our VMCS region, revision id written, in VMX operation.
    if let Err(e) = unsafe { vmx::vmclear(vmcs_pa) } {
        return Err(fail("VMCLEAR", e));
    }
    // SAFETY: just cleared, this CPU's.
    let vmcs = match unsafe { vmx::vmptrld(vmcs_pa) } {
        Ok(v) => v,
        Err(e) => return Err(fail("VMPTRLD", e)),
    };
    let inputs = vmx::vmcs::HostInputs {
        cr3: platform.host_cr3(),
        rsp: host_rsp,
        rip: stub::vm_exit_entry as *const () as u64,
        msr_bitmap: bitmap_pa,
        debugctl: debugctl.unwrap_or(0),
        dr7: guest_dr7,
        cr4_shadow: cr4,
    };
    if let Err(e) = vmx::vmcs::setup(&vmcs, &controls, &inputs) {
        return Err(fail("VMWRITE", e));
    }
    // SAFETY: this CPU, before launch; no other reference exists.
    let root = unsafe { this.root() };
    crate::intr::apply_mode(&vmcs, root, &this.data.applied_mode, config.mode);
    slot.store(pcpu, Ordering::Release);
    // SAFETY: the VMCS is complete (setup above), HOST_RSP/RIP are this CPU's stack and stub.
    match unsafe { stub::launch() } {
        LaunchResult::Guest => {
            // SAFETY: this CPU, now the guest; no exit is in progress, so root holds no reference.
            unsafe { this.root() }.launched = true;
            Ok(())
        }
        LaunchResult::EntryFailed => {
            slot.store(core::ptr::null_mut(), Ordering::Release);
            // SAFETY: VMX is off (root left it); nothing else refers to the root state.
            let reason = unsafe { this.root() }.launch_failure.unwrap_or(0);
            Err(undo(Error::VmxInstruction {
                instruction: "VM entry (guest-state checks)",
                error: reason,
            }))
        }
        failed => {
            slot.store(core::ptr::null_mut(), Ordering::Release);
            let error = if failed == LaunchResult::FailValid {
                vmcs.read32(ro::VM_INSTRUCTION_ERROR)
            } else {
                0
            };
            // SAFETY: the VMCS never ran; leave VMX operation again.
            let _ = unsafe { vmx::vmclear(vmcs_pa) };
            Err(fail("VMLAUNCH", VmxError::VmFailValid(error)))
        }
    }
}

/// What [`init_root`] needs from `virtualize_current_cpu`.
struct RootInit {
    cpu: CpuIndex,
    mode: Mode,
    controls: caps::Controls,
    preemption_ticks: u32,
    features: Features,
    guest_dr7: u64,
    debugctl: Option<u64>,
    vmxon_pa: u64,
    vmcs_pa: u64,
}

/// Writes this CPU's root state and loads the platform's delivery policy into its table. A
/// function of its own so the root state (with its 256-entry pending counts) and the policy
/// table are temporaries of this frame only: in a debug build `virtualize_current_cpu`'s frame
/// would otherwise pass 4 KiB and need `__chkstk`, which a driver image does not link.
#[inline(never)]
fn init_root(this: &PerCpu, platform: &'static dyn Platform, init: RootInit) {
    let root = RootState {
        platform: Some(platform),
        cpu: init.cpu,
        mode: init.mode,
        controls: init.controls,
        pin: init.controls.pin,
        proc: init.controls.proc,
        pending: PendingSet::new(),
        exiting_suspended: false,
        preemption_ticks: init.preemption_ticks,
        launched: false,
        launch_failure: None,
        irql_is_cr8: platform.irql_is_cr8(),
        apic: Some(platform.apic()),
        // No base matches: the first replay reads the limit.
        idt_base: u64::MAX,
        idt_limit: 0,
        kernel_cs: regs::cs(),
        gate_expect: crate::intr::policy::GateExpectation::new(regs::cs()),
        kernel_ss: regs::ss(),
        features: init.features,
        fatal: None,
        guest_dr7: init.guest_dr7,
        guest_debugctl: init.debugctl.unwrap_or(0),
        debugctl_msr: init.debugctl.is_some(),
        debug_armed: crate::intr::debug::armed(
            init.guest_dr7,
            init.debugctl.unwrap_or(0),
            init.debugctl.is_some(),
        ),
        md_clear: regs::cpuid(CPUID_EXTENDED_FEATURES, 0)[3] & CPUID_7_EDX_MD_CLEAR != 0,
        vmxon_pa: init.vmxon_pa,
        vmcs_pa: init.vmcs_pa,
    };
    // SAFETY: nobody else can see this CPU's block yet (the caller has not published it).
    unsafe { this.data.root.get().write(root) };
    this.data.policy.store_all(&platform.delivery_policy());
}

/// TSC cycles (at the timer's rate) an exit-sti hand-over lasts before exiting is back on.
const PREEMPTION_TICKS: u32 = 2000;

/// Root side of [`Call::Devirtualize`]: restore what the exit changed, leave VMX operation and
/// point the stub at the guest's continuation (DESIGN §5).
pub(crate) fn leave_root(ctx: &mut ExitCtx<'_>) -> ExitAction {
    let v = ctx.vmcs;
    let rip = v.read(guest::RIP);
    let rsp = v.read(guest::RSP);
    let rflags = v.read(guest::RFLAGS);
    let target = rsp.wrapping_sub(16);
    // SAFETY: a CPL-0 caller (hypercall::classify) on a kernel stack with no red zone: the 16
    // bytes below its RSP are free, exactly where an interrupt frame could go.
    unsafe {
        (target as *mut [u64; 2]).write([rflags, rip]);
    }
    let gdt = regs::DescriptorTable {
        limit: v.read(guest::GDTR_LIMIT) as u16,
        base: v.read(guest::GDTR_BASE),
    };
    let idt = regs::DescriptorTable {
        limit: v.read(guest::IDTR_LIMIT) as u16,
        base: v.read(guest::IDTR_BASE),
    };
    let (cr0, cr3, cr4) = (v.read(guest::CR0), v.read(guest::CR3), v.read(guest::CR4));
    let (dr7, debugctl) = (v.read(guest::DR7), v.read(guest::IA32_DEBUGCTL_FULL));
    let (fs_base, gs_base) = (v.read(guest::FS_BASE), v.read(guest::GS_BASE));
    let ds = v.read(guest::DS_SELECTOR) as u16;
    let es = v.read(guest::ES_SELECTOR) as u16;
    let fs = v.read(guest::FS_SELECTOR) as u16;
    let vmcs_pa = ctx.root.vmcs_pa;
    // SAFETY: the guest's own tables: exits left their limits at 0xFFFF (PatchGuard checks).
    unsafe { regs::lgdt(&gdt) };
    // SAFETY: as above.
    unsafe { regs::lidt(&idt) };
    // SAFETY: the guest's CR3 maps the kernel, this code and this stack like HOST_CR3 does.
    unsafe { regs::write_cr3(cr3) };
    // SAFETY: the guest's own control registers (CR4 still with VMXE until VMXOFF).
    unsafe { regs::write_cr0(cr0) };
    // SAFETY: as above.
    unsafe { regs::write_cr4(cr4) };
    // SAFETY: the guest's DR7, cleared to 0x400 by the exit.
    unsafe { regs::write_dr7(dr7) };
    if debugctl != 0 {
        // SAFETY: the guest had this value; exits clear it. Written only when non-zero, so a CPU
        // without the MSR (Bochs) is never touched.
        unsafe { regs::wrmsr(msr::IA32_DEBUGCTL, debugctl) };
    }
    // Exits loaded the host selectors (RPL cleared): give the guest its own back, or an IRETQ
    // to CPL 3 nulls them and 32-bit code faults (SimpleVisor does the same). GS stays: loading
    // it would clear the GS base, and an NMI in between would find no KPCR.
    // SAFETY: the guest's own selectors of its own GDT (restored above), loadable at CPL 0.
    unsafe { regs::load_data_selectors(ds, es, fs) };
    // SAFETY: the guest's own FS/GS bases (FS's was reset by the selector load).
    unsafe { regs::wrmsr(x86::msr::IA32_FS_BASE, fs_base) };
    // SAFETY: as above.
    unsafe { regs::wrmsr(x86::msr::IA32_GS_BASE, gs_base) };
    // SAFETY: our current VMCS; nothing runs it again.
    let _ = unsafe { vmx::vmclear(vmcs_pa) };
    // SAFETY: every piece of guest state lives in the registers again (above).
    if let Err(e) = unsafe { vmx::vmxoff() } {
        let mut state = ctx.fatal_state(crate::FatalKind::ResumeFailed);
        state.instr_error = e.instruction_error();
        return ExitAction::Fatal(state);
    }
    // SAFETY: out of VMX operation: VMXE may be cleared.
    unsafe { regs::write_cr4(cr4 & !CR4_VMXE) };
    ctx.cpu.data.devirt_rsp.store(target, Ordering::Release);
    ExitAction::Devirtualize
}

/// Issues `call` with `arg`, retrying while root answers Busy (vectors still pending).
fn hypercall_until_done(call: Call, arg: u64) -> Result<u64, Error> {
    for _ in 0..BUSY_RETRIES {
        match hypercall::vmcall(call, arg) {
            (Some(Status::Ok), value) => return Ok(value),
            (Some(Status::Busy), _) => relax(),
            (Some(Status::Unsupported), _) => {
                return Err(Error::Unsupported(caps::EXIT_STI_MISSING));
            }
            (Some(Status::BadArgument | Status::UnknownCall) | None, _) => {
                return Err(Error::NotVirtualized);
            }
        }
    }
    Err(Error::Busy)
}

/// Between Busy retries: let the platform lower IRQL if it raised it, so vectors that wait for
/// the guest's CR8 to drop can be delivered.
fn relax() {
    match PLATFORM.get() {
        Some(p) => p.relax(),
        None => core::hint::spin_loop(),
    }
}

fn current() -> Result<(&'static dyn Platform, &'static AtomicPtr<PerCpu>), Error> {
    let platform = *PLATFORM.get().ok_or(Error::NotVirtualized)?;
    Ok((platform, slot(platform.current_cpu())?))
}

/// Devirtualizes every CPU and hands every page back.
pub fn devirtualize_all() -> Result<(), (CpuIndex, Error)> {
    let platform = *PLATFORM.get().ok_or((CpuIndex(0), Error::NotVirtualized))?;
    platform.for_each_cpu(&|_| match devirtualize_current_cpu() {
        Err(Error::NotVirtualized) => Ok(()),
        other => other,
    })
}

/// Devirtualizes the calling CPU (hypercall) and frees its pages.
pub fn devirtualize_current_cpu() -> Result<(), Error> {
    let (platform, slot) = current()?;
    let p = NonNull::new(slot.load(Ordering::Acquire)).ok_or(Error::NotVirtualized)?;
    hypercall_until_done(Call::Devirtualize, 0)?;
    slot.store(core::ptr::null_mut(), Ordering::Release);
    // SAFETY: VMX is off on this CPU, so nothing uses its block any more; it came from
    // alloc_pages(PAGES_PER_CPU) in virtualize_current_cpu.
    unsafe { platform.free_pages(p.cast(), PAGES_PER_CPU) };
    Ok(())
}

/// Applies `mode` on every CPU; returns once each has written its own VMCS.
pub fn set_mode_all(mode: Mode) -> Result<(), (CpuIndex, Error)> {
    let platform = *PLATFORM.get().ok_or((CpuIndex(0), Error::NotVirtualized))?;
    platform.for_each_cpu(&|_| set_mode_current_cpu(mode))
}

/// Applies `mode` on the calling CPU (hypercall).
pub fn set_mode_current_cpu(mode: Mode) -> Result<(), Error> {
    let (_, slot) = current()?;
    if slot.load(Ordering::Acquire).is_null() {
        return Err(Error::NotVirtualized);
    }
    hypercall_until_done(Call::SetMode, mode as u64).map(|_| ())
}

fn with_cpu<T>(cpu: CpuIndex, f: impl FnOnce(&PerCpu) -> T) -> Option<T> {
    let p = CPUS.get(cpu.0 as usize)?.load(Ordering::Acquire);
    // SAFETY: a registered block stays allocated until its own CPU devirtualizes, which first
    // clears the slot. A reader racing with that window is the one unsynchronized case; the
    // platforms serialize state queries with devirtualization (driver unload, test scenarios).
    NonNull::new(p).map(|p| f(unsafe { p.as_ref() }))
}

/// State of one CPU, `None` when it is not virtualized. Its 7 KiB do not fit a kernel frame: NT
/// paths use [`cpu_mode`] and [`with_cpu_counters`].
// Inline: compiled only into crates that call it. Its frame holds a 7 KiB value, over the
// 4 KiB a kernel frame may have; an unused copy in the core's object files would still have
// to link in the driver (lld-link resolves every symbol of an object it pulls in).
#[inline]
pub fn cpu_state(cpu: CpuIndex) -> Option<CpuState> {
    with_cpu(cpu, |p| CpuState {
        mode: p.applied_mode(),
        stats: p.data.stats.snapshot(),
    })
}

/// Sets vector `v`'s delivery policy on every virtualized CPU; returns how many CPUs now have it.
/// Each CPU's root mode reads its own table at its next decision, so no broadcast is needed.
/// Vectors below [`FIRST_POLICY_VECTOR`](crate::intr::vector_policy::FIRST_POLICY_VECTOR) take
/// no policy and are left as they are (the control protocol refuses them first).
pub fn set_policy_all(v: crate::intr::policy::Vector, p: VectorPolicy) -> u32 {
    let mut applied = 0u32;
    for i in 0..CPUS.len() {
        if with_cpu(CpuIndex(i as u32), |c| c.data.policy.set(v, p)).is_some() {
            applied = applied.wrapping_add(1);
        }
    }
    applied
}

/// One CPU's delivery policy table, `None` when it is not virtualized.
pub fn policy(cpu: CpuIndex) -> Option<PolicyTable> {
    with_cpu(cpu, |p| p.data.policy.snapshot())
}

/// The mode one CPU has applied, `None` when it is not virtualized. Reads no counter: where only
/// the mode is wanted, this keeps a 7 KiB [`CpuState`] off the caller's (kernel) stack.
pub fn cpu_mode(cpu: CpuIndex) -> Option<Mode> {
    with_cpu(cpu, |p| p.applied_mode())
}

/// Runs `f` with one CPU's mode and its live counters, read in place; `None` when it is not
/// virtualized. The control dispatcher encodes replies this way, one CPU at a time, straight
/// into the output buffer (a [`Snapshot`] is more than a kernel function may hold on NT's stack).
pub fn with_cpu_counters<T>(cpu: CpuIndex, f: impl FnOnce(Mode, &Stats) -> T) -> Option<T> {
    with_cpu(cpu, |p| f(p.applied_mode(), &p.data.stats))
}

/// Takes the root-mode log records of one CPU, oldest first.
pub fn drain_log(cpu: CpuIndex, f: impl FnMut(crate::log_ring::Record)) -> Option<u64> {
    with_cpu(cpu, |p| {
        p.data.log.drain(f);
        p.data.log.lost()
    })
}

/// Zeroes every CPU's counters.
pub fn reset_stats() {
    for i in 0..CPUS.len() {
        let _ = with_cpu(CpuIndex(i as u32), |p| p.data.stats.reset());
    }
}

/// The platform the core was first virtualized with.
pub fn platform() -> Option<&'static dyn Platform> {
    PLATFORM.get().copied()
}

/// The mode of the first CPU still virtualized (every CPU runs the same one).
pub fn first_virtualized_mode() -> Option<Mode> {
    (0..CPUS.len()).find_map(|i| cpu_mode(CpuIndex(i as u32)))
}

/// After S3/S4 (`sleep`): every CPU whose slot still holds a block is dead, because no CPU
/// comes back from sleep in VMX operation. Clears its slot, frees its block, tells `on_reaped`.
/// Returns how many. Call only once the system is back in S0 and before virtualizing again.
pub fn reap_dead(platform: &dyn Platform, mut on_reaped: impl FnMut(CpuIndex)) -> u32 {
    let mut reaped = 0;
    for (i, slot) in CPUS.iter().enumerate() {
        let Some(block) = NonNull::new(slot.swap(core::ptr::null_mut(), Ordering::AcqRel)) else {
            continue;
        };
        // SAFETY: the block came from alloc_pages(PAGES_PER_CPU) in virtualize_current_cpu;
        // its CPU was reset by the sleep, so no VMXON/VMCS or exit uses it any more, and the
        // slot was cleared above so no reader can reach it.
        unsafe { platform.free_pages(block.cast(), PAGES_PER_CPU) };
        reaped += 1;
        on_reaped(CpuIndex(i as u32));
    }
    reaped
}

/// Number of CPUs the platform reports (0 before the first virtualization).
pub fn cpu_count() -> u32 {
    CPU_COUNT.load(Ordering::Relaxed)
}

/// Number of CPUs currently virtualized.
pub fn virtualized_count() -> u32 {
    CPUS.iter()
        .filter(|s| !s.load(Ordering::Relaxed).is_null())
        .count() as u32
}

/// Bytes of memory one virtualized CPU holds (VMXON, VMCS, MSR bitmap, state, host stack).
pub const fn bytes_per_cpu() -> usize {
    crate::cpu::BYTES_PER_CPU
}

/// The decoded VMX features, once any CPU was probed.
pub fn features() -> Option<Features> {
    FEATURES.get().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: u32 = 1 << 5;
    const HV: u32 = 1 << 31;
    const FC_OK: u64 = 0b101;

    #[test]
    fn no_vmx_bit_means_no_vmx_or_a_hypervisor_that_owns_it() {
        assert_eq!(vmx_availability(0, None, 0, 0), Err(Error::NoVmx));
        assert_eq!(
            vmx_availability(HV, Some(*b"Microsoft Hv"), 0, 0),
            Err(Error::ForeignHypervisor)
        );
    }

    #[test]
    fn a_hypervisor_other_than_hyperv_that_hides_vmx_is_named() {
        let err = vmx_availability(HV, Some(*b"VMwareVMware"), 0, 0).expect_err("hidden");
        assert_eq!(
            err,
            Error::NestedVmxHidden {
                vendor: *b"VMwareVMware"
            }
        );
        extern crate std;
        use std::string::ToString;
        let text = err.to_string();
        assert!(text.contains("\"VMwareVMware\""), "{text}");
        assert!(text.contains("expose VT-x"), "{text}");
        assert!(!text.contains("Hyper-V") && !text.contains("VBS"), "{text}");
        // A vendor string with NULs prints without them.
        let kvm = vmx_availability(HV, Some(*b"KVMKVMKVM\0\0\0"), 0, 0).expect_err("hidden");
        assert!(kvm.to_string().contains("\"KVMKVMKVM\""), "{kvm}");
    }

    #[test]
    fn feature_control_locked_off_is_refused() {
        assert_eq!(
            vmx_availability(VMX, None, 0b001, 0),
            Err(Error::VmxLockedOff)
        );
        assert_eq!(
            vmx_availability(VMX, None, 0b000, 0),
            Ok(false),
            "unlocked: we enable it"
        );
    }

    #[test]
    fn fred_is_refused() {
        assert_eq!(
            vmx_availability(VMX, None, FC_OK, CR4_FRED),
            Err(Error::FredEnabled)
        );
    }

    #[test]
    fn nested_under_hyperv_or_kvm_forwards_but_not_under_vmware() {
        assert_eq!(
            vmx_availability(VMX | HV, Some(*b"Microsoft Hv"), FC_OK, 0),
            Ok(true)
        );
        assert_eq!(
            vmx_availability(VMX | HV, Some(*b"KVMKVMKVM\0\0\0"), FC_OK, 0),
            Ok(true)
        );
        assert_eq!(
            vmx_availability(VMX | HV, Some(*b"VMwareVMware"), FC_OK, 0),
            Ok(false)
        );
        assert_eq!(vmx_availability(VMX, None, FC_OK, 0), Ok(false));
    }

    #[test]
    fn cpus_still_marked_after_wake_are_reaped_and_status_is_exact() {
        // Two CPUs failed to leave VMX before sleep: their slots still hold (fake) blocks.
        let (a, b) = (0x1000_0000usize, 0x2000_0000usize);
        CPUS[1000].store(a as *mut PerCpu, Ordering::Release);
        CPUS[1001].store(b as *mut PerCpu, Ordering::Release);
        assert_eq!(virtualized_count(), 2);
        let platform = crate::platform::fake::FakeCpus::new(0);
        let mut logged = crate::platform::fake::Log::new();
        let reaped = reap_dead(&platform, |cpu| logged.push(cpu.0));
        assert_eq!(reaped, 2);
        assert_eq!(logged, [1000, 1001]);
        assert_eq!(
            *platform.freed.lock().unwrap(),
            [(a, PAGES_PER_CPU), (b, PAGES_PER_CPU)]
        );
        assert_eq!(virtualized_count(), 0, "status counts only live CPUs");
        assert_eq!(reap_dead(&platform, |_| {}), 0, "nothing left to reap");
    }
}
