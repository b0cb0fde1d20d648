//! The Windows device `\\.\Ackvisor`: one `DeviceIoControl` per request (METHOD_BUFFERED).
//!
//! Errors follow the convention in `ackvisor_vmm::control::wire` (`nt_warning`): a refused
//! request completes with a customer warning NTSTATUS and an `ErrorReply` in the output buffer,
//! which `DeviceIoControl` hands back with FALSE and the bytes returned; with no reply readable,
//! the status alone comes back through `GetLastError` (customer codes pass through unchanged).

use std::ffi::c_void;
use std::ptr;

use ackvisor_vmm::control::ControlError;
use ackvisor_vmm::control::wire::{self, ERROR_MAGIC, ErrorReply, Field};
use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_ACCESS_DENIED, ERROR_FILE_NOT_FOUND, ERROR_PATH_NOT_FOUND, GENERIC_READ,
    GENERIC_WRITE, GetLastError, HANDLE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, FILE_ATTRIBUTE_NORMAL, FILE_SHARE_READ, FILE_SHARE_WRITE, OPEN_EXISTING,
};
use windows_sys::Win32::System::IO::DeviceIoControl;

use super::Transport;
use crate::ClientError;

/// The device's DOS name.
pub const DEVICE_PATH: &str = r"\\.\Ackvisor";

/// An open handle to `\\.\Ackvisor`.
pub struct DeviceTransport {
    handle: HANDLE,
}

fn win32_error(code: u32) -> ClientError {
    match code {
        ERROR_FILE_NOT_FOUND | ERROR_PATH_NOT_FOUND => ClientError::NotLoaded,
        ERROR_ACCESS_DENIED => ClientError::AccessDenied,
        other => match wire::status_from_win32(other) {
            // The status without its arguments (the reply did not fit): still the right error.
            Some(status) => ControlError::from_reply(&ErrorReply {
                magic: ERROR_MAGIC,
                status,
                arg0: 0,
                arg1: 0,
                arg2: 0,
                reserved: 0,
            })
            .map_or(ClientError::Os(other), ClientError::Refused),
            None => ClientError::Os(other),
        },
    }
}

fn open_with(path: &[u16], access: u32) -> Result<HANDLE, u32> {
    // SAFETY: `path` is a NUL-terminated UTF-16 string that outlives the call; the security
    // attributes and template handle are documented as optional (null).
    let handle = unsafe {
        CreateFileW(
            path.as_ptr(),
            access,
            FILE_SHARE_READ | FILE_SHARE_WRITE,
            ptr::null(),
            OPEN_EXISTING,
            FILE_ATTRIBUTE_NORMAL,
            ptr::null_mut(),
        )
    };
    if handle == INVALID_HANDLE_VALUE {
        // SAFETY: reads this thread's last-error value; no preconditions.
        Err(unsafe { GetLastError() })
    } else {
        Ok(handle)
    }
}

impl DeviceTransport {
    /// Opens the device for reading and writing, or for reading only when this user may not
    /// write (status and stats still work; mode changes then report access denied).
    pub fn open() -> Result<Self, ClientError> {
        let path: Vec<u16> = DEVICE_PATH.encode_utf16().chain([0]).collect();
        let handle = match open_with(&path, GENERIC_READ | GENERIC_WRITE) {
            Ok(h) => h,
            Err(ERROR_ACCESS_DENIED) => open_with(&path, GENERIC_READ).map_err(win32_error)?,
            Err(e) => return Err(win32_error(e)),
        };
        Ok(Self { handle })
    }
}

impl Drop for DeviceTransport {
    fn drop(&mut self) {
        // SAFETY: `handle` came from CreateFileW in `open` and is closed only here, once.
        unsafe { CloseHandle(self.handle) };
    }
}

impl Transport for DeviceTransport {
    fn call(&mut self, code: u32, input: &[u8], capacity: usize) -> Result<Vec<u8>, ClientError> {
        // Room for an ErrorReply always, so a refusal arrives with its arguments.
        let mut out = vec![0u8; capacity.max(ErrorReply::SIZE)];
        let in_len =
            u32::try_from(input.len()).map_err(|_| ClientError::BadReply("input too large"))?;
        let out_len = u32::try_from(out.len()).unwrap_or(u32::MAX);
        let mut returned: u32 = 0;
        // SAFETY: the buffers are valid for the lengths passed and outlive this synchronous call
        // (the handle is not overlapped); the driver only reads `input` and writes `out`.
        let ok = unsafe {
            DeviceIoControl(
                self.handle,
                code,
                input.as_ptr().cast::<c_void>(),
                in_len,
                out.as_mut_ptr().cast::<c_void>(),
                out_len,
                &mut returned,
                ptr::null_mut(),
            )
        };
        let returned = usize::try_from(returned)
            .unwrap_or(usize::MAX)
            .min(out.len());
        if ok != 0 {
            out.truncate(returned);
            return Ok(out);
        }
        // SAFETY: reads this thread's last-error value, set by the failed DeviceIoControl.
        let error = unsafe { GetLastError() };
        if returned == ErrorReply::SIZE
            && let Some(e) = out.get(..returned).and_then(ControlError::read_reply)
        {
            return Err(ClientError::Refused(e));
        }
        Err(win32_error(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn win32_errors_map_to_what_the_user_can_fix() {
        assert_eq!(win32_error(ERROR_FILE_NOT_FOUND), ClientError::NotLoaded);
        assert_eq!(win32_error(ERROR_ACCESS_DENIED), ClientError::AccessDenied);
        assert_eq!(
            win32_error(wire::nt_error(wire::status::NOT_VIRTUALIZED)),
            ClientError::Refused(ControlError::NotVirtualized)
        );
        assert_eq!(win32_error(87), ClientError::Os(87));
    }

    #[test]
    fn error_reply_field_is_in_sync() {
        // A sanity check that the wire import is the one the driver encodes with.
        let e = ControlError::NotVirtualized;
        let mut b = [0u8; ErrorReply::SIZE];
        assert_eq!(e.write_reply(&mut b), Some(ErrorReply::SIZE));
        assert_eq!(ErrorReply::decode(&b).map(|r| r.magic), Some(ERROR_MAGIC));
    }
}
