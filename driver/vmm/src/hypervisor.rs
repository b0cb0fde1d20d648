//! All CPUs: virtualize, devirtualize, mode changes and state queries.
//!
//! **Runs in:** PASSIVE (guest side of the blue pill).

use crate::intr::Mode;
use crate::platform::{CpuIndex, Platform};
use crate::stats::Snapshot;
use crate::Error;

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

// ---- public entry points (bodies land with the core; signatures are the contract) ----

/// Virtualizes every CPU through [`Platform::for_each_cpu`]; on any failure undoes all.
pub fn virtualize_all(platform: &'static dyn Platform, config: Config) -> Result<(), (CpuIndex, Error)> {
    let _ = (platform, config);
    Err((CpuIndex(0), Error::NoVmx))
}

/// Virtualizes the calling CPU; returns `Ok` already running as the guest.
pub fn virtualize_current_cpu(platform: &'static dyn Platform, config: Config) -> Result<(), Error> {
    let _ = (platform, config);
    Err(Error::NoVmx)
}

/// Devirtualizes every CPU and hands every page back.
pub fn devirtualize_all() -> Result<(), (CpuIndex, Error)> {
    Err((CpuIndex(0), Error::NotVirtualized))
}

/// Devirtualizes the calling CPU (hypercall) and frees its pages.
pub fn devirtualize_current_cpu() -> Result<(), Error> {
    Err(Error::NotVirtualized)
}

/// Applies `mode` on every CPU; returns once each has written its own VMCS.
pub fn set_mode_all(mode: Mode) -> Result<(), (CpuIndex, Error)> {
    let _ = mode;
    Err((CpuIndex(0), Error::NotVirtualized))
}

/// Applies `mode` on the calling CPU (hypercall).
pub fn set_mode_current_cpu(mode: Mode) -> Result<(), Error> {
    let _ = mode;
    Err(Error::NotVirtualized)
}

/// State of one CPU, `None` when it is not virtualized.
pub fn cpu_state(cpu: CpuIndex) -> Option<CpuState> {
    let _ = cpu;
    None
}

/// Zeroes every CPU's counters.
pub fn reset_stats() {}

/// Number of CPUs the platform reports (0 before the first [`virtualize_all`]).
pub fn cpu_count() -> u32 {
    0
}

/// Number of CPUs currently virtualized.
pub fn virtualized_count() -> u32 {
    0
}

/// Bytes of memory one virtualized CPU holds (VMXON, VMCS, MSR bitmap, state, host stack).
pub fn bytes_per_cpu() -> usize {
    0
}

/// The decoded VMX features, once any CPU was probed.
pub fn features() -> Option<Features> {
    None
}
