//! The I/O manager's side of a request: an IRP with one stack location, built as NT builds it
//! for `CreateFile`, `DeviceIoControl` (METHOD_BUFFERED: one SystemBuffer of max(input, output)
//! bytes, the input copied in) and `CloseHandle`, sent to the image's `MajorFunction`, and
//! `IofCompleteRequest`, which books every completion: each IRP must be completed exactly once,
//! with `IoStatus.Information` no larger than the output buffer.
//!
//! **Runs in:** PASSIVE, one CPU.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU32, Ordering};

use super::exports::irql_check;
use super::layout::{DRIVER_OBJECT, DeviceObject, IO_STACK_LOCATION, IRP};

/// `IRP_MJ_CREATE`.
pub const IRP_MJ_CREATE: u8 = 0x00;
/// `IRP_MJ_CLOSE`.
pub const IRP_MJ_CLOSE: u8 = 0x02;
/// `IRP_MJ_DEVICE_CONTROL`.
pub const IRP_MJ_DEVICE_CONTROL: u8 = 0x0E;
/// `IO_TYPE_IRP`.
const IO_TYPE_IRP: i16 = 6;
/// The largest SystemBuffer a request may have here: a per-CPU statistics reply of 4 CPUs
/// (five 7 KiB entries) fits.
pub const BUFFER_BYTES: usize = 64 * 1024;

/// `Parameters.DeviceIoControl` of IO_STACK_LOCATION as wdm.h declares it on x64: each ULONG is
/// `POINTER_ALIGNMENT` (8). windows-sys's `IO_STACK_LOCATION_0_16` drops that alignment (its
/// InputBufferLength is at 4, not 8), so this struct is the header's, asserted below.
#[repr(C)]
struct DeviceIoControl {
    output_buffer_length: u32,
    _pad0: u32,
    input_buffer_length: u32,
    _pad1: u32,
    io_control_code: u32,
    _pad2: u32,
    type3_input_buffer: *mut c_void,
}

/// Offset of `Parameters` in IO_STACK_LOCATION.
const PARAMETERS: usize = 8;
const _: () = assert!(offset_of!(IO_STACK_LOCATION, Parameters) == PARAMETERS);
const _: () = assert!(offset_of!(DeviceIoControl, input_buffer_length) == 8);
const _: () = assert!(offset_of!(DeviceIoControl, io_control_code) == 0x10);
const _: () = assert!(size_of::<DeviceIoControl>() == 0x20);
// The metadata's version, for the record: 4 and 8.
const _: () = assert!(
    offset_of!(
        windows_sys::Wdk::Foundation::IO_STACK_LOCATION_0_16,
        InputBufferLength
    ) == 4
);

#[repr(C, align(16))]
struct Packet {
    irp: IRP,
    stack: IO_STACK_LOCATION,
}

struct Slot(UnsafeCell<Packet>);
// SAFETY: one request at a time, on the BSP.
unsafe impl Sync for Slot {}
static PACKET: Slot = Slot(UnsafeCell::new(
    // SAFETY: IRP and IO_STACK_LOCATION are integers, pointers, unions and options: zero is valid.
    unsafe { core::mem::zeroed() },
));

#[repr(C, align(16))]
struct Buffer(UnsafeCell<[u8; BUFFER_BYTES]>);
// SAFETY: as `Slot`.
unsafe impl Sync for Buffer {}
static SYSTEM_BUFFER: Buffer = Buffer(UnsafeCell::new([0; BUFFER_BYTES]));

/// Completions of the IRP in flight.
static COMPLETIONS: AtomicU32 = AtomicU32::new(0);
/// IRPs completed more than once.
pub static DOUBLE_COMPLETIONS: AtomicU32 = AtomicU32::new(0);
/// IRPs never completed.
pub static UNCOMPLETED: AtomicU32 = AtomicU32::new(0);
/// IRPs whose `Information` exceeded the output buffer.
pub static INFORMATION_OVERFLOWS: AtomicU32 = AtomicU32::new(0);
/// Requests whose dispatch routine returned another status than it completed the IRP with.
pub static STATUS_MISMATCHES: AtomicU32 = AtomicU32::new(0);
/// Completions of an IRP that is not in flight.
pub static STRAY_COMPLETIONS: AtomicU32 = AtomicU32::new(0);

/// `IofCompleteRequest(Irp, PriorityBoost)`: IRQL ≤ DISPATCH.
pub extern "win64" fn iof_complete_request(irp: *mut IRP, _boost: i8) {
    irql_check("IofCompleteRequest", 2);
    if irp != PACKET.0.get().cast::<IRP>() {
        STRAY_COMPLETIONS.fetch_add(1, Ordering::AcqRel);
        return;
    }
    COMPLETIONS.fetch_add(1, Ordering::AcqRel);
}

/// What the image made of one request.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// The dispatch routine's return value.
    pub status: i32,
    /// `IoStatus.Information`.
    pub information: usize,
}

type Dispatch = unsafe extern "win64" fn(*mut DeviceObject, *mut IRP) -> i32;

/// Sends one request to the image's `MajorFunction[major]`; the reply (METHOD_BUFFERED) is
/// copied to `output` up to `Information` bytes. None when the image set no such routine.
pub fn send(
    driver: *mut DRIVER_OBJECT,
    major: u8,
    code: u32,
    input: &[u8],
    output: &mut [u8],
) -> Option<Outcome> {
    let len = input.len().max(output.len());
    if len > BUFFER_BYTES {
        return None;
    }
    // SAFETY: DriverEntry has returned; the object is read on this CPU only.
    let routine = unsafe { (*driver).MajorFunction }
        .get(usize::from(major))
        .copied()
        .flatten()?;
    // SAFETY: DRIVER_DISPATCH and `Dispatch` are the same win64 function type.
    let routine = unsafe {
        core::mem::transmute::<
            unsafe extern "system" fn(
                *const windows_sys::Wdk::Foundation::DEVICE_OBJECT,
                *mut IRP,
            ) -> i32,
            Dispatch,
        >(routine)
    };
    // SAFETY: the device the image created (DriverEntry succeeded).
    let device = unsafe { (*driver).DeviceObject }.cast::<DeviceObject>();
    let packet = PACKET.0.get();
    let buffer = SYSTEM_BUFFER.0.get().cast::<u8>();
    // SAFETY: IRP and IO_STACK_LOCATION are integers, pointers, unions and options: zero is
    // valid.
    let zero: Packet = unsafe { core::mem::zeroed() };
    // SAFETY: no request is in flight; the packet and buffer are ours until `routine` runs.
    unsafe { packet.write(zero) };
    // SAFETY: `input.len() <= BUFFER_BYTES` (checked through `len`).
    unsafe { core::ptr::copy_nonoverlapping(input.as_ptr(), buffer, input.len()) };
    // SAFETY: as above.
    let p = unsafe { &mut *packet };
    p.irp.Type = IO_TYPE_IRP;
    p.irp.Size = size_of::<Packet>() as u16;
    p.irp.StackCount = 1;
    p.irp.CurrentLocation = 1;
    p.irp.AssociatedIrp.SystemBuffer = if len == 0 {
        core::ptr::null_mut()
    } else {
        buffer.cast()
    };
    p.irp.Tail.Overlay.Anonymous2.Anonymous.CurrentStackLocation = &raw mut p.stack;
    p.stack.MajorFunction = major;
    p.stack.DeviceObject = device.cast();
    if major == IRP_MJ_DEVICE_CONTROL {
        let params = DeviceIoControl {
            output_buffer_length: output.len() as u32,
            _pad0: 0,
            input_buffer_length: input.len() as u32,
            _pad1: 0,
            io_control_code: code,
            _pad2: 0,
            type3_input_buffer: core::ptr::null_mut(),
        };
        let at = (&raw mut p.stack)
            .cast::<u8>()
            .wrapping_add(PARAMETERS)
            .cast::<DeviceIoControl>();
        // SAFETY: `Parameters` is a 0x20-byte union at offset 8 (asserted above).
        unsafe { at.write(params) };
    }
    COMPLETIONS.store(0, Ordering::Release);
    // SAFETY: the image's dispatch routine for `major`, at PASSIVE, with its own device and an
    // IRP laid out as NT's.
    let status = unsafe { routine(device, packet.cast()) };
    match COMPLETIONS.load(Ordering::Acquire) {
        0 => {
            UNCOMPLETED.fetch_add(1, Ordering::AcqRel);
        }
        1 => {}
        _ => {
            DOUBLE_COMPLETIONS.fetch_add(1, Ordering::AcqRel);
        }
    }
    // SAFETY: the request is complete; the image no longer touches the packet.
    let io_status = unsafe { p.irp.IoStatus.Anonymous.Status };
    let information = p.irp.IoStatus.Information;
    if io_status != status {
        STATUS_MISMATCHES.fetch_add(1, Ordering::AcqRel);
    }
    if information > output.len() {
        INFORMATION_OVERFLOWS.fetch_add(1, Ordering::AcqRel);
    }
    let n = information.min(output.len());
    // SAFETY: `n` ≤ the output length ≤ BUFFER_BYTES.
    unsafe { core::ptr::copy_nonoverlapping(buffer, output.as_mut_ptr(), n) };
    Some(Outcome {
        status,
        information,
    })
}
