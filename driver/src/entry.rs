//! `DriverEntry` and the unload routine: the order things are set up in, and torn down in.
//!
//! Load: lifecycle lock → platform facts (System CR3, APIC) → IRP handlers → device → log
//! worker → power callback → virtualize every CPU (Passthrough) → enable the power callback →
//! unload routine. Any failure tears down what exists and returns a specific NTSTATUS with a
//! DbgPrintEx line saying why (README: "Why ackvisor refused to load").
//!
//! Unload (and a failed load) runs [`teardown`]: power callback off → device gone → worker
//! stopped → last log drain → devirtualize every CPU (the core frees every page) → APIC unmapped.
//!
//! **Runs in:** PASSIVE, in the System process (the I/O manager's driver loader thread).

use ackvisor_vmm::hypervisor::{self, Config};
use ackvisor_vmm::{CpuIndex, Error, Mode, PlatformError};
use wdk_sys::ntddk::KeBugCheckEx;
use wdk_sys::{
    DRIVER_OBJECT, IRP_MJ_CLOSE, IRP_MJ_CREATE, IRP_MJ_DEVICE_CONTROL, NTSTATUS, PCUNICODE_STRING,
    STATUS_ALREADY_REGISTERED, STATUS_DEVICE_FEATURE_NOT_SUPPORTED, STATUS_HV_ACCESS_DENIED,
    STATUS_HV_FEATURE_UNAVAILABLE, STATUS_HV_INACTIVE, STATUS_HV_INVALID_LP_INDEX,
    STATUS_HV_OBJECT_IN_USE, STATUS_HV_OPERATION_FAILED, STATUS_IMPLEMENTATION_LIMIT,
    STATUS_INSUFFICIENT_RESOURCES, STATUS_NOT_SUPPORTED, STATUS_RETRY, STATUS_SUCCESS,
};

use crate::lifecycle::LIFECYCLE;
use crate::nt_platform::{ACKVISOR_BUGCHECK, PLATFORM, dbg_line};
use crate::{device, irp, log_drain, power};

/// Bugcheck parameter 1 when unload cannot devirtualize a CPU (`FatalKind` codes are 1–5):
/// that CPU would take its next VM exit into the unloaded image, so stop here, with the cause.
const UNLOAD_DEVIRTUALIZE_FAILED: u64 = 0x100;

/// The mode every CPU starts in: the baseline that changes nothing (DESIGN §2).
const INITIAL_MODE: Mode = Mode::Passthrough;

/// The driver's entry point.
///
/// # Safety
/// Called once by the I/O manager, at PASSIVE in the System process, with its own
/// DRIVER_OBJECT for this image.
// SAFETY: `DriverEntry` is the entry point the WDM link flags name (/ENTRY:DriverEntry from
// wdk-build); no other symbol in the image has that name.
#[unsafe(export_name = "DriverEntry")]
pub unsafe extern "system" fn driver_entry(
    driver: &mut DRIVER_OBJECT,
    _registry_path: PCUNICODE_STRING,
) -> NTSTATUS {
    // SAFETY: the first statement of DriverEntry: nothing else of this driver runs yet.
    unsafe { LIFECYCLE.init() };
    match load(driver) {
        Ok(()) => {
            dbg_line!(
                Info,
                "loaded: {} of {} processors virtualized, mode {INITIAL_MODE}",
                hypervisor::virtualized_count(),
                hypervisor::cpu_count()
            );
            STATUS_SUCCESS
        }
        Err(status) => {
            teardown();
            status
        }
    }
}

/// Everything DriverEntry sets up; on `Err`, [`teardown`] undoes what exists.
fn load(driver: &mut DRIVER_OBJECT) -> Result<(), NTSTATUS> {
    PLATFORM.prepare().map_err(|e| {
        dbg_line!(Error, "refusing to load: {e}");
        STATUS_INSUFFICIENT_RESOURCES
    })?;
    for major in [IRP_MJ_CREATE, IRP_MJ_CLOSE, IRP_MJ_DEVICE_CONTROL] {
        if let Some(slot) = driver.MajorFunction.get_mut(major as usize) {
            *slot = Some(irp::dispatch);
        }
    }
    device::create(driver).inspect_err(|status| {
        dbg_line!(
            Error,
            "refusing to load: cannot create \\Device\\Ackvisor ({status:#010x})"
        );
    })?;
    log_drain::start().inspect_err(|status| {
        dbg_line!(
            Error,
            "refusing to load: cannot start the log worker ({status:#010x})"
        );
    })?;
    power::register().inspect_err(|status| {
        dbg_line!(
            Error,
            "refusing to load: cannot register for power transitions ({status:#010x})"
        );
    })?;
    let held = LIFECYCLE.lock();
    // The core checks VT-x on each CPU as it goes and, if any CPU fails, undoes the others.
    hypervisor::virtualize_all(&PLATFORM, Config { mode: INITIAL_MODE }).map_err(|(cpu, e)| {
        log_drain::drain_all(&held);
        refuse(cpu, e)
    })?;
    power::enable();
    drop(held);
    driver.DriverUnload = Some(unload);
    Ok(())
}

/// Says why virtualization failed and picks the NTSTATUS DriverEntry returns: the one place a
/// core [`Error`] becomes an NTSTATUS, distinct for each reason a user can act on.
fn refuse(cpu: CpuIndex, e: Error) -> NTSTATUS {
    let (status, hint) = match e {
        Error::NoVmx => (
            STATUS_NOT_SUPPORTED,
            "this processor has no VT-x (or the outer hypervisor does not expose nested VT-x)",
        ),
        Error::VmxLockedOff => (
            STATUS_HV_ACCESS_DENIED,
            "enable Intel Virtualization Technology in the firmware setup",
        ),
        Error::ForeignHypervisor => (
            STATUS_HV_OBJECT_IN_USE,
            "turn off Hyper-V, VBS and Memory integrity (bcdedit /set hypervisorlaunchtype off) and reboot",
        ),
        Error::NestedVmxHidden { .. } => (
            STATUS_NOT_SUPPORTED,
            "turn on nested VT-x for this VM in the outer hypervisor (VMware: Processors, Virtualize Intel VT-x/EPT)",
        ),
        Error::FredEnabled => (
            STATUS_DEVICE_FEATURE_NOT_SUPPORTED,
            "FRED delivers interrupts without the IDT; ackvisor needs it off",
        ),
        Error::Unsupported(_) => (
            STATUS_HV_FEATURE_UNAVAILABLE,
            "this processor (or the outer hypervisor) lacks a VMX control ackvisor needs",
        ),
        Error::Platform(PlatformError::OutOfMemory { .. }) => (
            STATUS_INSUFFICIENT_RESOURCES,
            "not enough physically contiguous memory",
        ),
        Error::Platform(PlatformError::CpuUnreachable(_)) => (
            STATUS_HV_INVALID_LP_INDEX,
            "NT could not run code on that processor",
        ),
        Error::TooManyCpus => (
            STATUS_IMPLEMENTATION_LIMIT,
            "more processors than ackvisor's table holds",
        ),
        Error::AlreadyVirtualized => (
            STATUS_ALREADY_REGISTERED,
            "a previous ackvisor still runs on that processor",
        ),
        Error::NotVirtualized => (
            STATUS_HV_INACTIVE,
            "the processor left VMX operation during setup",
        ),
        Error::VmxInstruction { .. } => (
            STATUS_HV_OPERATION_FAILED,
            "a VMX instruction failed; see the VM-instruction error",
        ),
        Error::Busy => (STATUS_RETRY, "the processor was busy; try again"),
    };
    dbg_line!(
        Error,
        "refusing to load: cpu {}: {e}: {hint} (status {status:#010x})",
        cpu.0
    );
    status
}

/// The unload routine (set only after a successful load).
///
/// # Safety
/// Called once by the I/O manager at PASSIVE when no handle to the device remains.
unsafe extern "C" fn unload(_driver: *mut DRIVER_OBJECT) {
    teardown();
    dbg_line!(Info, "unloaded");
}

/// Undoes whatever [`load`] set up, in reverse; every step is a no-op if its part is absent.
fn teardown() {
    // The power callback must not virtualize again behind our back; it checks this flag under
    // the lock, so after this no callback acts.
    with_lock(power::disable);
    // Neither of these two may hold the lock: each waits for a thread that may want it.
    power::unregister();
    device::delete();
    log_drain::stop();
    let held = LIFECYCLE.lock();
    log_drain::drain_all(&held);
    match hypervisor::devirtualize_all() {
        Ok(()) | Err((_, Error::NotVirtualized)) => {}
        Err((cpu, e)) => {
            dbg_line!(
                Error,
                "cpu {}: cannot devirtualize: {e}; stopping the system",
                cpu.0
            );
            // SAFETY: KeBugCheckEx has no preconditions; the alternative is that CPU taking its
            // next VM exit into code that is about to be unloaded.
            unsafe {
                KeBugCheckEx(
                    ACKVISOR_BUGCHECK,
                    UNLOAD_DEVIRTUALIZE_FAILED | (u64::from(cpu.0) << 32),
                    0,
                    0,
                    0,
                )
            }
        }
    }
    drop(held);
    PLATFORM.release();
}

/// Runs `f` under the lifecycle lock.
fn with_lock(f: fn()) {
    let _held = LIFECYCLE.lock();
    f();
}
