//! NT routines wdk-sys 0.5 does not bind, declared by hand, each with the header it comes from,
//! and the one place ntoskrnl's *data* exports are read.
//!
//! **Runs in:** PASSIVE (device creation, mapping), any IRQL for the IRQL pair and the data
//! exports.

use wdk_sys::{
    GUID, KIRQL, LPCGUID, NTSTATUS, PCUNICODE_STRING, PDEVICE_OBJECT, PDRIVER_OBJECT, PEPROCESS,
    PHYSICAL_ADDRESS, POBJECT_TYPE, PUNICODE_STRING, PVOID, SIZE_T, ULONG,
};

// Data exports of ntoskrnl.exe, read through their import slots.
//
// wdk-sys binds wdm.h's `extern PEPROCESS PsInitialSystemProcess;` and friends as plain extern
// statics named `PsInitialSystemProcess`. An import library defines no such symbol for a DATA
// export: it defines only the import slot `__imp_PsInitialSystemProcess`, the image's import
// address table entry that the loader fills with the variable's address (C code reaches it
// through `__declspec(dllimport)`, which rustc does not apply to wdk-sys's statics). Linking the
// plain name fails with "undefined symbol" in link.exe with the WDK's ntoskrnl.lib and in
// lld-link alike (windows-drivers-rs issue 338). So the slots are declared here under their
// real symbol names, and the value is read through them: two loads, slot then variable.
//
// SAFETY: each slot is an import address table entry of this image, filled by the loader with
// the address of the ntoskrnl variable named, before DriverEntry runs, and never written after.
// The types are wdm.h's, one pointer more for the slot.
unsafe extern "C" {
    /// Slot of `PsInitialSystemProcess` (wdm.h: `extern PEPROCESS PsInitialSystemProcess`).
    #[link_name = "__imp_PsInitialSystemProcess"]
    static PS_INITIAL_SYSTEM_PROCESS_SLOT: *const PEPROCESS;
    /// Slot of `PsThreadType` (wdm.h: `extern POBJECT_TYPE *PsThreadType`).
    #[link_name = "__imp_PsThreadType"]
    static PS_THREAD_TYPE_SLOT: *const *const POBJECT_TYPE;
}

/// `PsInitialSystemProcess`: the System process. NT writes it once during boot, long before any
/// driver loads.
pub fn initial_system_process() -> PEPROCESS {
    // SAFETY: reads the import slot, which the loader filled before DriverEntry (see above).
    let variable = unsafe { PS_INITIAL_SYSTEM_PROCESS_SLOT };
    // SAFETY: `variable` is the address of ntoskrnl's PsInitialSystemProcess, a PEPROCESS that
    // stays valid and unchanged for the life of the system.
    unsafe { *variable }
}

/// `*PsThreadType`: the thread object type, for `ObReferenceObjectByHandle`. NT creates it at
/// boot and never changes it.
pub fn thread_object_type() -> POBJECT_TYPE {
    // SAFETY: reads the import slot, which the loader filled before DriverEntry (see above).
    let variable = unsafe { PS_THREAD_TYPE_SLOT };
    // SAFETY: `variable` is the address of ntoskrnl's PsThreadType, which points at the
    // thread type's slot for the life of the system.
    let type_slot = unsafe { *variable };
    // SAFETY: `type_slot` points at the POBJECT_TYPE of threads, written once at boot.
    unsafe { *type_slot }
}

// SAFETY: the signature is wdmsec.h's `IoCreateDeviceSecure`, which that header `#define`s to
// this name; the routine is in wdmsec.lib, which build.rs links. wdk-sys leaves it out because
// bindgen only sees the macro.
unsafe extern "system" {
    /// `WdmlibIoCreateDeviceSecure` (wdmsec.h): `IoCreateDevice` with a default security
    /// descriptor given as SDDL, applied before anyone can open the device.
    pub fn WdmlibIoCreateDeviceSecure(
        DriverObject: PDRIVER_OBJECT,
        DeviceExtensionSize: ULONG,
        DeviceName: PUNICODE_STRING,
        DeviceType: ULONG,
        DeviceCharacteristics: ULONG,
        Exclusive: u8,
        DefaultSDDLString: PCUNICODE_STRING,
        DeviceClassGuid: LPCGUID,
        DeviceObject: *mut PDEVICE_OBJECT,
    ) -> NTSTATUS;
}

// SAFETY: the signatures are wdm.h's; all three are ntoskrnl exports on x64 (KfRaiseIrql and
// KeLowerIrql since the first x64 kernel, MmMapIoSpaceEx since Windows 10). Declared here rather
// than taken from `wdk_sys::ntddk` so that one declaration type-checks against every header set:
// mingw-w64's wdm.h (win-check) makes the IRQL pair FORCEINLINE CR8 writes and lacks
// MmMapIoSpaceEx, so bindgen emits none of them there.
unsafe extern "system" {
    /// `KfRaiseIrql` (wdm.h): raises IRQL, returns the previous one; bugchecks on a lowering.
    pub fn KfRaiseIrql(NewIrql: KIRQL) -> KIRQL;
    /// `KeLowerIrql` (wdm.h): lowers IRQL to a value an earlier raise returned.
    pub fn KeLowerIrql(NewIrql: KIRQL);
    /// `MmMapIoSpaceEx` (wdm.h): maps device memory with page protection flags (`PAGE_*`).
    pub fn MmMapIoSpaceEx(
        PhysicalAddress: PHYSICAL_ADDRESS,
        NumberOfBytes: SIZE_T,
        Protect: ULONG,
    ) -> PVOID;
}

/// The device class of `\Device\Ackvisor` for `WdmlibIoCreateDeviceSecure`: a GUID of our own,
/// as wdmsec.h asks (never a system class), under which an administrator could override the
/// SDDL in the registry.
pub const ACKVISOR_DEVICE_CLASS: GUID = GUID {
    Data1: 0x307a_7ceb,
    Data2: 0xde02,
    Data3: 0x4ba7,
    Data4: [0x97, 0x28, 0xfe, 0x0c, 0x8e, 0x3e, 0x74, 0x56],
};
