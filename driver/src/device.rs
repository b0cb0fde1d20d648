//! `\Device\Ackvisor` and its Win32 name `\\.\Ackvisor` (`\DosDevices\Ackvisor`).
//!
//! The device is created with a default security descriptor (IoCreateDeviceSecure) that admits
//! only SYSTEM and Administrators, so an unprivileged process cannot even open it, and with
//! FILE_DEVICE_SECURE_OPEN so the same check covers names below the device (`\\.\Ackvisor\x`).
//!
//! **Runs in:** PASSIVE (DriverEntry and unload).

use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use wdk_sys::ntddk::{IoCreateSymbolicLink, IoDeleteDevice, IoDeleteSymbolicLink};
use wdk_sys::{
    DEVICE_OBJECT, DRIVER_OBJECT, FILE_DEVICE_SECURE_OPEN, FILE_DEVICE_UNKNOWN, NT_SUCCESS,
    NTSTATUS, PDEVICE_OBJECT, UNICODE_STRING,
};

use crate::ntapi::{ACKVISOR_DEVICE_CLASS, WdmlibIoCreateDeviceSecure};

/// Generic-all for LocalSystem and built-in Administrators, nothing for anyone else; `P`
/// protects the DACL from inheritance.
const SDDL_STR: &str = "D:P(A;;GA;;;SY)(A;;GA;;;BA)";
static SDDL: [u16; SDDL_STR.len()] = utf16(SDDL_STR);
/// The device's NT name.
const DEVICE_NAME_STR: &str = "\\Device\\Ackvisor";
static DEVICE_NAME: [u16; DEVICE_NAME_STR.len()] = utf16(DEVICE_NAME_STR);
/// The symbolic link `CreateFileW(r"\\.\Ackvisor")` resolves through.
const LINK_NAME_STR: &str = "\\DosDevices\\Ackvisor";
static LINK_NAME: [u16; LINK_NAME_STR.len()] = utf16(LINK_NAME_STR);

/// An ASCII string as UTF-16 code units, evaluated at compile time (`N` is its length).
#[expect(
    clippy::indexing_slicing,
    reason = "compile-time only, and i < N = bytes.len() (asserted first)"
)]
pub const fn utf16<const N: usize>(s: &str) -> [u16; N] {
    let bytes = s.as_bytes();
    assert!(bytes.len() == N, "length mismatch");
    let mut out = [0u16; N];
    let mut i = 0;
    while i < N {
        assert!(bytes[i].is_ascii(), "ASCII only");
        out[i] = bytes[i] as u16;
        i += 1;
    }
    out
}

/// A counted UNICODE_STRING over a static UTF-16 name (no NUL needed: the length is explicit).
pub fn unicode(s: &'static [u16]) -> UNICODE_STRING {
    // Every name above is far below the 32 KiB limit of a USHORT byte length.
    let bytes = (s.len() * 2) as u16;
    UNICODE_STRING {
        Length: bytes,
        MaximumLength: bytes,
        Buffer: s.as_ptr().cast_mut(),
    }
}

/// The device object, null when it does not exist (its link exists exactly when it does).
static DEVICE: AtomicPtr<DEVICE_OBJECT> = AtomicPtr::new(ptr::null_mut());

/// Creates `\Device\Ackvisor` and `\DosDevices\Ackvisor`.
pub fn create(driver: &mut DRIVER_OBJECT) -> Result<(), NTSTATUS> {
    let mut name = unicode(&DEVICE_NAME);
    let sddl = unicode(&SDDL);
    let mut object: PDEVICE_OBJECT = ptr::null_mut();
    // SAFETY: `driver` is the DRIVER_OBJECT DriverEntry received; the strings outlive the call
    // (NT copies the name and builds the descriptor from the SDDL); `object` is an out-param.
    let status = unsafe {
        WdmlibIoCreateDeviceSecure(
            driver,
            0,
            &mut name,
            FILE_DEVICE_UNKNOWN,
            FILE_DEVICE_SECURE_OPEN,
            0,
            &sddl,
            &ACKVISOR_DEVICE_CLASS,
            &mut object,
        )
    };
    if !NT_SUCCESS(status) {
        return Err(status);
    }
    let mut link = unicode(&LINK_NAME);
    // SAFETY: both strings are valid counted strings for the duration of the call.
    let status = unsafe { IoCreateSymbolicLink(&mut link, &mut name) };
    if !NT_SUCCESS(status) {
        // SAFETY: `object` was created above and nothing else references it yet.
        unsafe { IoDeleteDevice(object) };
        return Err(status);
    }
    DEVICE.store(object, Ordering::Release);
    Ok(())
}

/// Deletes the link, then the device, if they exist. Unload only runs once every handle to
/// the device is closed, so no request is in flight.
pub fn delete() {
    let object = DEVICE.swap(ptr::null_mut(), Ordering::AcqRel);
    if object.is_null() {
        return;
    }
    let mut link = unicode(&LINK_NAME);
    // SAFETY: the link was created with the device; the string is valid for the call. A
    // failure would leave a dangling name that the next load reports; there is nothing to do.
    let _ = unsafe { IoDeleteSymbolicLink(&mut link) };
    // SAFETY: the object came from `create` and is deleted once (swapped out above).
    unsafe { IoDeleteDevice(object) };
}
