//! Scenario `nt-driver`: the real ackvisor.sys through its life as NT drives it: DriverEntry
//! with a DRIVER_OBJECT and a registry path, then DriverUnload, with the verifier's books
//! (`routines::BOOKS`) read after each.
//!
//! **Runs in:** PASSIVE, BSP, one CPU.

use core::cell::UnsafeCell;
use core::sync::atomic::Ordering;

use super::exports;
use super::layout::{DRIVER_OBJECT, UNICODE_STRING};
use super::routines::BOOKS;
use crate::params::Params;
use crate::report::Line;

const NAME: &str = "nt-driver";
/// DRIVER_OBJECT's `Type` (IO_TYPE_DRIVER).
const IO_TYPE_DRIVER: i16 = 4;

struct Driver(UnsafeCell<DRIVER_OBJECT>);
// SAFETY: only the BSP's scenario and the image (called from it) touch the object.
unsafe impl Sync for Driver {}

static DRIVER: Driver = Driver(UnsafeCell::new(
    // SAFETY: DRIVER_OBJECT is integers, pointers and options of fn pointers: zero is valid.
    unsafe { core::mem::zeroed() },
));

/// The registry path NT passes: the service key.
const REGISTRY_PATH: &str = "\\Registry\\Machine\\System\\CurrentControlSet\\Services\\ackvisor";
static REGISTRY_PATH_UTF16: [u16; REGISTRY_PATH.len()] = {
    let mut out = [0u16; REGISTRY_PATH.len()];
    let bytes = REGISTRY_PATH.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        out[i] = bytes[i] as u16;
        i += 1;
    }
    out
};

type DriverEntry = extern "win64" fn(*mut DRIVER_OBJECT, *const UNICODE_STRING) -> i32;

/// The scenario.
pub fn scenario(_p: &Params) {
    let Some((_, image)) = super::load_image(NAME) else {
        return;
    };
    let driver = DRIVER.0.get();
    // SAFETY: nothing else references the object before DriverEntry.
    unsafe {
        (*driver).Type = IO_TYPE_DRIVER;
    }
    // SAFETY: as above.
    unsafe {
        (*driver).Size = size_of::<DRIVER_OBJECT>() as i16;
    }
    // SAFETY: as above.
    unsafe {
        (*driver).DriverStart = image.base as *mut core::ffi::c_void;
    }
    // SAFETY: as above.
    unsafe {
        (*driver).DriverSize = image.size;
    }
    let path = UNICODE_STRING {
        Length: (REGISTRY_PATH.len() * 2) as u16,
        MaximumLength: (REGISTRY_PATH.len() * 2) as u16,
        Buffer: REGISTRY_PATH_UTF16.as_ptr().cast_mut(),
    };
    // SAFETY: `entry` is the image's AddressOfEntryPoint, DriverEntry (/ENTRY:DriverEntry),
    // with the DRIVER_INITIALIZE signature, relocated and bound by the loader.
    let entry = unsafe { core::mem::transmute::<usize, DriverEntry>(image.entry) };
    crate::kprintln!(
        "ntos: ackvisor.sys at {:#x}..{:#x}, calling DriverEntry",
        image.base,
        image.base + image.size as usize
    );
    let status = entry(driver, &path);
    // SAFETY: DriverEntry has returned; the object is read on this CPU only.
    let unload = unsafe { (*driver).DriverUnload };
    let mut line = Line::new(NAME);
    line.kv("loaded", u32::from(status >= 0))
        .kv("entry_status", format_args!("{:#010x}", status as u32))
        .kv("devices", BOOKS.devices.load(Ordering::Acquire))
        .kv("links", BOOKS.links.load(Ordering::Acquire))
        .kv("callbacks", BOOKS.callbacks.load(Ordering::Acquire))
        .kv("threads", BOOKS.threads.load(Ordering::Acquire))
        .kv(
            "contiguous_pages",
            BOOKS.contiguous_pages.load(Ordering::Acquire),
        )
        .kv("unload_set", u32::from(unload.is_some()));
    line.print();
    if let Some(unload) = unload {
        // SAFETY: DriverUnload of the image, set by DriverEntry, called once at PASSIVE.
        unsafe { unload(driver) };
    }
    Line::new(NAME)
        .kv("unloaded", u32::from(unload.is_some()))
        .kv("leaks", BOOKS.leaks())
        .kv("misuses", BOOKS.misuses.load(Ordering::Acquire))
        .kv(
            "irql_violations",
            exports::IRQL_VIOLATIONS.load(Ordering::Acquire),
        )
        .kv("first_violation", exports::first_violation())
        .print();
}
