//! ackvisor-vmm: the portable VT-x core of ackvisor. It virtualizes the running OS on each
//! processor ("blue pill"), takes external interrupts as VM exits with *acknowledge interrupt on
//! exit* set, and delivers each vector through the OS's own IDT with a hand-built frame.
//! No OS calls: it reaches its host only through [`Platform`].
//!
//! # One external interrupt through the code (`ack-replay`)
//! 1. Vector V arrives in the guest: exit reason 1, ack-on-exit moves V from IRR to ISR.
//!    HOST_RIP is [`exit::stub::vm_exit_entry`], HOST_RSP this CPU's stack with `&PerCpu`
//!    ([`cpu::PerCpu`]) in its top slot.
//! 2. The stub saves the volatile GPRs into [`exit::guest_regs::GuestRegs`] and calls the fast
//!    dispatcher, which reads the reason through [`vmx::Vmcs`]. Exit reason 1 in its common
//!    cases is handled there in full ([`intr::try_fast`]), without FXSAVE: that code uses no
//!    XMM register. Everything else is declined untouched; the stub then saves the other
//!    GPRs and XMM0–15 and calls the dispatcher, which counts the reason in [`stats`] and goes
//!    to [`intr::on_external_interrupt`] or through the handler table.
//! 4. It decodes [`vmx::fields::ExitIntrInfo`] (invalid or not type 0: an anomaly in [`stats`]
//!    and [`log_ring`]) and calls [`intr::policy::decide`] with the guest's IF, blocking, CPL,
//!    CR8 and activity state ([`intr::spurious`] exempts the LAPIC's spurious vector from CR8).
//! 5. Defer: [`intr::pending::PendingSet`] keeps V (one count per acknowledge); interrupt-window
//!    or CR8-load exiting ([`intr::inject::set_waits`]) brings it back to [`intr::on_window`].
//! 6. Inject (class ≤ DISPATCH, rejected gate, NMI blocking, a vector whose
//!    [`intr::vector_policy`] says inject now, or mode `ack-inject`):
//!    [`intr::wake::inject_external`] writes [`vmx::fields::EntryIntrInfo`] and wakes a halted
//!    guest, through [`vmx::access::VmcsAccess`] so unit tests can watch it.
//! 7. Replay: the gate from *this* CPU's IDT ([`intr::replay::read_gate`]) is checked by
//!    [`intr::policy::validate_gate`]; [`intr::policy::frame_stack`] picks the stack;
//!    IRQL goes to ≥ 2 (raw CR8, or [`Platform::raise_irql`] under FXSAVE);
//!    [`intr::replay::call_handler`] builds the frame and calls the handler, whose IRETQ returns
//!    into the trampoline. IRQL is restored, a halted guest marked active, the replay counted.
//! 8. With `stats`, the dispatcher adds the TSC delta to the histogram; the stub restores
//!    registers and runs VMRESUME (a VMfail ends in [`Platform::fatal`]).
//! 9. At PASSIVE, [`hypervisor::cpu_state`] and [`control`] serve `ackctl`;
//!    [`hypervisor::drain_log`] empties [`log_ring`].
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
pub mod sleep;
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
    /// A hypervisor other than Hyper-V runs the OS and does not expose VT-x to it (nested VT-x
    /// off); `vendor` is its CPUID 0x4000_0000 signature.
    NestedVmxHidden {
        /// EBX:ECX:EDX of CPUID 0x4000_0000.
        vendor: [u8; 12],
    },
    /// The CPU is not virtualized (or was already devirtualized).
    NotVirtualized,
    /// The CPU is already virtualized.
    AlreadyVirtualized,
    /// A required VMX control is missing; names the MSR that refused it.
    Unsupported(vmx::caps::Missing),
    /// A VMX instruction failed outside root (VMXON, VMCLEAR, VMPTRLD, VMLAUNCH), with the
    /// VM-instruction error when there is one.
    VmxInstruction {
        /// The instruction (or "VM entry (guest-state checks)").
        instruction: &'static str,
        /// VM-instruction error, or the exit reason of a failed first VM entry; 0 if none.
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
/// Address of the VM-exit stub (HOST_RIP): where every VM exit's root-mode path begins. The
/// test kernel's benchmark hands it to the runner, which counts instructions from there.
pub fn exit_stub_address() -> usize {
    let stub: extern "sysv64" fn() -> ! = exit::stub::vm_exit_entry;
    stub as usize
}
pub use exit::hypercall;

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Platform(e) => write!(f, "platform: {e}"),
            Error::NoVmx => f.write_str("VT-x not present (CPUID.1:ECX.VMX = 0)"),
            Error::VmxLockedOff => f.write_str(
                "VT-x disabled and locked in IA32_FEATURE_CONTROL (enable it in firmware)",
            ),
            Error::ForeignHypervisor => {
                f.write_str("VT-x is owned by another hypervisor (Hyper-V/VBS/HVCI)")
            }
            Error::FredEnabled => {
                f.write_str("CR4.FRED is set: interrupts bypass the IDT, replay cannot work")
            }
            Error::NestedVmxHidden { vendor } => {
                f.write_str("VT-x is not exposed by the outer hypervisor \"")?;
                for &b in vendor.iter().filter(|b| **b != 0) {
                    let c = if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '?'
                    };
                    write!(f, "{c}")?;
                }
                f.write_str("\": expose VT-x to this VM (nested virtualization) in its settings")
            }
            Error::NotVirtualized => f.write_str("processor is not virtualized"),
            Error::AlreadyVirtualized => f.write_str("processor is already virtualized"),
            Error::Unsupported(m) => write!(f, "{m}"),
            Error::VmxInstruction { instruction, error } => {
                write!(f, "{instruction} failed (VM-instruction error {error})")
            }
            Error::Busy => f.write_str("vectors still pending on this processor; retry"),
            Error::TooManyCpus => f.write_str("more processors than ackvisor supports"),
        }
    }
}
