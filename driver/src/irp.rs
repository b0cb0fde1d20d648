//! IRP_MJ_CREATE, IRP_MJ_CLOSE and IRP_MJ_DEVICE_CONTROL for `\Device\Ackvisor`.
//!
//! Reads the request's parameters from its current stack location, lets [`request::complete`]
//! decide (and run the control protocol), writes the status and byte count back and completes
//! the IRP. The only buffer it ever hands out is the METHOD_BUFFERED system buffer, and only
//! when [`request`] asks for it.
//!
//! **Runs in:** PASSIVE (the thread that called CreateFile, CloseHandle or DeviceIoControl).

use core::slice;

use ackvisor_vmm::control::Live;
use wdk_sys::ntddk::IofCompleteRequest;
use wdk_sys::{
    DEVICE_OBJECT, IO_NO_INCREMENT, IRP, IRP_MJ_CLOSE, IRP_MJ_CREATE, IRP_MJ_DEVICE_CONTROL,
    NTSTATUS, STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
};

use crate::lifecycle::LIFECYCLE;
use crate::request::{self, IoRequest, SystemBuffer, major, ntstatus};

// request.rs restates these NT values so it can be tested off Windows; they must agree.
const _: () = {
    assert!(major::CREATE as u32 == IRP_MJ_CREATE);
    assert!(major::CLOSE as u32 == IRP_MJ_CLOSE);
    assert!(major::DEVICE_CONTROL as u32 == IRP_MJ_DEVICE_CONTROL);
    assert!(ntstatus::STATUS_SUCCESS == STATUS_SUCCESS);
    assert!(ntstatus::STATUS_INVALID_DEVICE_REQUEST == STATUS_INVALID_DEVICE_REQUEST);
    assert!(ntstatus::STATUS_INVALID_PARAMETER == STATUS_INVALID_PARAMETER);
};

/// The system buffer of one METHOD_BUFFERED IRP.
struct IrpBuffer {
    /// `Irp->AssociatedIrp.SystemBuffer`: max(input, output) bytes, or null when both are 0.
    base: *mut u8,
    /// max(InputBufferLength, OutputBufferLength) as the I/O manager allocated it.
    len: usize,
}

impl SystemBuffer for IrpBuffer {
    fn bytes(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.base.is_null() || len > self.len {
            return None;
        }
        // SAFETY: for a METHOD_BUFFERED request the I/O manager allocates SystemBuffer from
        // nonpaged pool with max(input, output) = `self.len` bytes, owned by this IRP until it
        // is completed (after the returned borrow ends, in `dispatch`); `len` ≤ that size.
        Some(unsafe { slice::from_raw_parts_mut(self.base, len) })
    }
}

/// The dispatch routine of every major function the driver registers.
///
/// # Safety
/// Called by the I/O manager with a valid IRP whose current stack location belongs to this
/// driver's device, at PASSIVE_LEVEL.
pub unsafe extern "C" fn dispatch(_device: *mut DEVICE_OBJECT, irp: *mut IRP) -> NTSTATUS {
    // SAFETY: the I/O manager passes a valid IRP that this driver owns until it completes it.
    let irp_ref = unsafe { &mut *irp };
    // SAFETY: an IRP that reached a driver's dispatch routine uses the `Overlay` member of
    // `Tail`; IoGetCurrentIrpStackLocation (a wdm.h macro) reads the same field.
    let overlay = unsafe { &irp_ref.Tail.Overlay };
    // SAFETY: `CurrentStackLocation` is the member of that union the I/O manager keeps current.
    let stack_ptr = unsafe {
        overlay
            .__bindgen_anon_2
            .__bindgen_anon_1
            .CurrentStackLocation
    };
    // SAFETY: it points into the IRP's stack locations, valid until completion.
    let stack = unsafe { &*stack_ptr };
    let major = stack.MajorFunction;
    let (code, input_len, output_len) = if major == major::DEVICE_CONTROL {
        // SAFETY: for IRP_MJ_DEVICE_CONTROL the I/O manager filled in the DeviceIoControl
        // member of the parameters union.
        let p = unsafe { stack.Parameters.DeviceIoControl };
        (p.IoControlCode, p.InputBufferLength, p.OutputBufferLength)
    } else {
        (0, 0, 0)
    };
    let request = IoRequest {
        major,
        code,
        input_len,
        output_len,
    };
    let mut buffer = IrpBuffer {
        // SAFETY: reads the union's pointer member; `request` uses it only for METHOD_BUFFERED
        // device-control requests, where it is the system buffer (or null).
        base: unsafe { irp_ref.AssociatedIrp.SystemBuffer }.cast(),
        len: input_len.max(output_len) as usize,
    };
    let completion = if major == major::DEVICE_CONTROL {
        // The dispatcher reads per-CPU state that devirtualization frees (lifecycle.rs).
        let _held = LIFECYCLE.lock();
        request::complete(&Live, &request, &mut buffer)
    } else {
        request::complete(&Live, &request, &mut buffer)
    };
    let status = completion.status();
    irp_ref.IoStatus.__bindgen_anon_1.Status = status;
    // Information ≤ the output length (request.rs guarantees it), so the I/O manager never
    // copies more than the caller's buffer holds.
    irp_ref.IoStatus.Information = completion.information() as u64;
    // SAFETY: completes an IRP this driver owns, once; neither `irp` nor `irp_ref` is used
    // afterwards.
    unsafe { IofCompleteRequest(irp, IO_NO_INCREMENT as i8) };
    status
}
