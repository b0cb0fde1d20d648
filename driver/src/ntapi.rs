//! NT routines wdk-sys 0.5 does not bind, declared by hand, each with the header it comes from.
//!
//! **Runs in:** PASSIVE (device creation, mapping), any IRQL for the IRQL pair.

use wdk_sys::{
    GUID, KIRQL, LPCGUID, NTSTATUS, PCUNICODE_STRING, PDEVICE_OBJECT, PDRIVER_OBJECT,
    PHYSICAL_ADDRESS, PUNICODE_STRING, PVOID, SIZE_T, ULONG,
};

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
