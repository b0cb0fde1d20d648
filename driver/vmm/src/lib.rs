//! ackvisor-vmm: the portable VT-x core of ackvisor (placeholder docs, rewritten below).
#![no_std]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod arch;
pub mod control;
pub mod cpu;
pub mod exit;
pub mod hypervisor;
pub mod intr;
pub mod log_ring;
pub mod platform;
pub mod stats;
pub mod vmx;

pub use intr::Mode;
pub use platform::{
    ApicAccess, CpuIndex, FatalKind, FatalState, PhysAddr, Platform, PlatformError,
};

/// Errors of the core, as seen outside root mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A platform service failed.
    Platform(PlatformError),
    /// CPUID.1:ECX.VMX is clear.
    NoVmx,
    /// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled.
    VmxLockedOff,
    /// Another hypervisor owns VT-x (CPUID hypervisor-present bit with a known vendor).
    ForeignHypervisor,
    /// CR4.FRED is set: the IDT is not used for delivery, replay cannot work.
    FredEnabled,
    /// The CPU is not virtualized (or was already devirtualized).
    NotVirtualized,
    /// The CPU is already virtualized.
    AlreadyVirtualized,
    /// A required VMX control is missing; names the MSR that refused it.
    Unsupported(vmx::caps::Missing),
    /// A VMX instruction failed outside root (VMXON, VMCLEAR, VMPTRLD, VMLAUNCH), with the
    /// VM-instruction error when there is one.
    VmxInstruction {
        instruction: &'static str,
        error: u32,
    },
    /// The hypervisor refused the request for now (vectors still pending); retry.
    Busy,
    /// More processors than the core's table holds.
    TooManyCpus,
}

/// Addresses an interrupt frame's RIP holds when a handler was entered from root mode:
/// `[replay trampoline return, exit-sti window]`. Test kernels use them to tell where a handler
/// ran; the driver uses them nowhere.
pub fn root_interrupt_return_sites() -> [usize; 2] {
    intr::replay::return_sites()
}
pub use exit::hypercall;
