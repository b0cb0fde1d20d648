//! NT's x64 object layouts, taken from `windows-sys`'s `Wdk` bindings (generated from Microsoft's
//! WDK metadata: an independent source from the mingw-derived headers wdk-sys binds for the
//! image), and compile-time asserts of the documented sizes and of the offsets the image uses.
//!
//! One layout the metadata gets wrong: wdm.h declares `DEVICE_OBJECT` with
//! `DECLSPEC_ALIGN(MEMORY_ALLOCATION_ALIGNMENT)` (16 on x64), which makes it 0x150 bytes; the
//! metadata drops the alignment, so windows-sys's struct is 0x148. [`DeviceObject`] restores it.
//!
//! **Runs in:** anywhere (types only).

use core::mem::{offset_of, size_of};

pub use windows_sys::Wdk::Foundation::{
    DEVICE_OBJECT, DRIVER_OBJECT, IO_STACK_LOCATION, IRP, KEVENT, KMUTANT, OBJECT_ATTRIBUTES,
};
pub use windows_sys::Wdk::Storage::FileSystem::KAPC_STATE;
pub use windows_sys::Win32::Foundation::UNICODE_STRING;
pub use windows_sys::Win32::System::Kernel::PROCESSOR_NUMBER;
pub use windows_sys::Win32::System::SystemInformation::GROUP_AFFINITY;

/// wdm.h: `typedef struct _KMUTANT KMUTEX` (named as in the header).
#[allow(clippy::upper_case_acronyms)]
pub type KMUTEX = KMUTANT;

/// `DEVICE_OBJECT` with the header's 16-byte alignment (see the module comment).
#[repr(C, align(16))]
pub struct DeviceObject(pub DEVICE_OBJECT);

// Sizes from the WDK headers (x64).
const _: () = assert!(size_of::<DRIVER_OBJECT>() == 0x150);
const _: () = assert!(offset_of!(DRIVER_OBJECT, DeviceObject) == 0x08);
const _: () = assert!(offset_of!(DRIVER_OBJECT, DriverExtension) == 0x30);
const _: () = assert!(offset_of!(DRIVER_OBJECT, DriverName) == 0x38);
const _: () = assert!(offset_of!(DRIVER_OBJECT, DriverUnload) == 0x68);
const _: () = assert!(offset_of!(DRIVER_OBJECT, MajorFunction) == 0x70);
const _: () = assert!(size_of::<DEVICE_OBJECT>() == 0x148);
const _: () = assert!(size_of::<DeviceObject>() == 0x150);
const _: () = assert!(offset_of!(DEVICE_OBJECT, DriverObject) == 0x08);
const _: () = assert!(offset_of!(DEVICE_OBJECT, Flags) == 0x30);
const _: () = assert!(offset_of!(DEVICE_OBJECT, DeviceExtension) == 0x40);
const _: () = assert!(size_of::<IRP>() == 0xD0);
const _: () = assert!(offset_of!(IRP, AssociatedIrp) == 0x18);
const _: () = assert!(offset_of!(IRP, IoStatus) == 0x30);
const _: () = assert!(offset_of!(IRP, Tail) == 0x78);
const _: () = assert!(size_of::<IO_STACK_LOCATION>() == 0x48);
const _: () = assert!(size_of::<UNICODE_STRING>() == 0x10);
const _: () = assert!(size_of::<KEVENT>() == 0x18);
const _: () = assert!(size_of::<KMUTEX>() == 0x38);
const _: () = assert!(size_of::<OBJECT_ATTRIBUTES>() == 0x30);
const _: () = assert!(size_of::<GROUP_AFFINITY>() == 0x10);
const _: () = assert!(size_of::<PROCESSOR_NUMBER>() == 0x4);
const _: () = assert!(size_of::<KAPC_STATE>() == 0x30);
