//! One CPU's hypervisor state: VMXON region, VMCS, MSR bitmap, root-mode state, statistics,
//! log ring and host stack, in one block of contiguous pages.
//!
//! **Runs in:** PASSIVE (allocation, reading statistics) and VMX root (the root state).

use crate::hypervisor::Features;
use crate::intr::Mode;
use crate::intr::pending::PendingSet;
use crate::intr::vector_policy::SharedPolicy;
use crate::log_ring::LogRing;
use crate::platform::{CpuIndex, FatalState, Platform};
use crate::stats::Stats;
use crate::vmx::caps::Controls;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64};

/// Bytes of host stack per CPU. Exits use a few hundred bytes; a replay at guest CPL 3 runs the
/// OS's interrupt entry on this stack until it switches to its own ISR stack.
pub const HOST_STACK_BYTES: usize = 6 * 4096;
/// Page size.
pub const PAGE_BYTES: usize = 4096;

/// A 4 KiB-aligned page.
#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_BYTES]);

/// The host stack, 16-byte aligned at the top.
#[repr(C, align(4096))]
pub struct HostStack(pub [u8; HOST_STACK_BYTES]);

/// State only this CPU's root mode touches (after setup on the same CPU).
pub struct RootState {
    /// The platform, for `fatal` and the IRQL hooks.
    pub platform: Option<&'static dyn Platform>,
    /// This CPU's index.
    pub cpu: CpuIndex,
    /// Mode this VMCS runs.
    pub mode: Mode,
    /// Base control words.
    pub controls: Controls,
    /// Pin-based controls now in the VMCS.
    pub pin: u32,
    /// Primary processor-based controls now in the VMCS.
    pub proc: u32,
    /// Acknowledged vectors waiting for the guest.
    pub pending: PendingSet,
    /// exit-sti handed a vector to the guest with external-interrupt exiting off; restore it at
    /// the next exit.
    pub exiting_suspended: bool,
    /// Preemption-timer value used to force that next exit (0: use MTF instead).
    pub preemption_ticks: u32,
    /// The guest has run (the first VM entry succeeded). Before that, an entry failure is a
    /// refusal to virtualize, after it a fatal state.
    pub launched: bool,
    /// Exit reason of a failed first VM entry, for the error `virtualize` returns.
    pub launch_failure: Option<u32>,
    /// Cached [`Platform::irql_is_cr8`].
    pub irql_is_cr8: bool,
    /// Cached [`Platform::apic`] (exit-sti reads the IRR), `None` without a platform.
    pub apic: Option<crate::platform::ApicAccess>,
    /// The guest IDTR base last seen on this CPU, and its limit (read again when the base
    /// moves; `intr::guest_idt`).
    pub idt_base: u64,
    /// See `idt_base`.
    pub idt_limit: u16,
    /// Kernel code selector: replay frames push it, gates must use it.
    pub kernel_cs: u16,
    /// The gate bits replayable gates have with `kernel_cs` (`policy::GateExpectation`).
    pub gate_expect: crate::intr::policy::GateExpectation,
    /// Kernel stack selector pushed in replay frames.
    pub kernel_ss: u16,
    /// Features found at virtualization.
    pub features: Features,
    /// The last fatal event, kept for a debugger.
    pub fatal: Option<FatalState>,
    /// The guest's DR7, kept exact by MOV-DR exiting (`intr::debug`): root loads it around
    /// its calls of guest handlers without a VMREAD.
    pub guest_dr7: u64,
    /// The guest's IA32_DEBUGCTL, kept exact by the MSR bitmap's write intercept.
    pub guest_debugctl: u64,
    /// The CPU has IA32_DEBUGCTL (Bochs #GPs on it: root never touches it then).
    pub debugctl_msr: bool,
    /// [`crate::intr::debug::armed`] of the two above: root calls load something. Kept by
    /// [`RootState::set_guest_dr7`] and [`RootState::set_guest_debugctl`], so the common root
    /// call tests one byte.
    pub debug_armed: bool,
    /// CPUID.7.0:EDX.MD_CLEAR: VERW also clears CPU buffers; issued after a CPL-3 replay.
    pub md_clear: bool,
    /// Physical address of the VMXON region.
    pub vmxon_pa: u64,
    /// Physical address of the VMCS.
    pub vmcs_pa: u64,
}

impl RootState {
    /// The guest's DR7 changed (MOV DR, a write-back after a root call).
    pub fn set_guest_dr7(&mut self, v: u64) {
        self.guest_dr7 = v;
        self.debug_armed =
            crate::intr::debug::armed(self.guest_dr7, self.guest_debugctl, self.debugctl_msr);
    }

    /// The guest's IA32_DEBUGCTL changed (intercepted WRMSR, a write-back).
    pub fn set_guest_debugctl(&mut self, v: u64) {
        self.guest_debugctl = v;
        self.debug_armed =
            crate::intr::debug::armed(self.guest_dr7, self.guest_debugctl, self.debugctl_msr);
    }
}

/// Everything about one CPU except the pages the hardware owns.
#[repr(C)]
pub struct CpuData {
    /// Target RSP of the devirtualize return: points at [RFLAGS, RIP] on the guest's stack.
    /// Read by the exit stub at a fixed offset.
    pub devirt_rsp: AtomicU64,
    /// The mode this CPU has applied, as `Mode as u32` (read from PASSIVE).
    pub applied_mode: AtomicU32,
    /// Counters.
    pub stats: Stats,
    /// Per-vector delivery policy: read by root at each decision, written at PASSIVE.
    pub policy: SharedPolicy,
    /// Root-mode log records.
    pub log: LogRing,
    /// Root-only state.
    pub root: UnsafeCell<RootState>,
}

/// One virtualized CPU. Hardware-owned pages first (each needs 4 KiB alignment), then state,
/// then the host stack whose top slot holds a pointer back to this structure.
#[repr(C)]
pub struct PerCpu {
    /// VMXON region.
    pub vmxon: Page,
    /// VMCS region.
    pub vmcs: Page,
    /// MSR bitmap: all zero, nothing intercepted.
    pub msr_bitmap: Page,
    /// State.
    pub data: CpuData,
    /// Host stack.
    pub stack: HostStack,
}

/// Pages one CPU takes.
pub const PAGES_PER_CPU: usize = core::mem::size_of::<PerCpu>().div_ceil(PAGE_BYTES);
/// Bytes one CPU takes.
pub const BYTES_PER_CPU: usize = PAGES_PER_CPU * PAGE_BYTES;
const _: () = assert!(BYTES_PER_CPU <= 64 * 1024, "issue target: 64 KiB per CPU");
const _: () = assert!(core::mem::align_of::<PerCpu>() == PAGE_BYTES);

impl PerCpu {
    /// The top of the host stack: HOST_RSP, 16-byte aligned; `[HOST_RSP]` = `&PerCpu`.
    pub fn host_rsp(&self) -> u64 {
        let top = core::ptr::addr_of!(self.stack) as u64 + HOST_STACK_BYTES as u64;
        top - 16
    }

    /// Root state.
    ///
    /// # Safety
    /// Only this CPU, in VMX root (or during its own setup before launch), and never two
    /// live references at once: the exit path is not reentrant (IF=0 outside replayed
    /// handlers, and those never VM-exit).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn root(&self) -> &mut RootState {
        // SAFETY: caller's duty.
        unsafe { &mut *self.data.root.get() }
    }

    /// The mode this CPU has applied.
    pub fn applied_mode(&self) -> Mode {
        Mode::try_from(
            self.data
                .applied_mode
                .load(core::sync::atomic::Ordering::Acquire),
        )
        .unwrap_or(Mode::Passthrough)
    }
}

// SAFETY: `root` is only touched by the owning CPU (see `PerCpu::root`); every other field is
// atomic or hardware-owned.
unsafe impl Sync for CpuData {}
