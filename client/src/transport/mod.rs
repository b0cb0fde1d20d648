//! How requests travel: a [`Transport`] sends one control request and returns the reply bytes.
//!
//! - [`tcp`]: the Bochs test machine's COM1 as a TCP socket, framed by `control::frame`.
//! - `device` (Windows only): `DeviceIoControl` on `\\.\Ackvisor`.

#[cfg(windows)]
pub mod device;
pub mod tcp;

use crate::ClientError;
use crate::cli::Cli;

/// One request, one reply.
pub trait Transport {
    /// Sends `input` under `code`, offering `capacity` bytes for the reply. Returns the reply
    /// bytes, or the hypervisor's refusal as [`ClientError::Refused`].
    fn call(&mut self, code: u32, input: &[u8], capacity: usize) -> Result<Vec<u8>, ClientError>;
}

/// The transport the command line asks for: `--machine` → TCP, otherwise the device.
pub fn open(cli: &Cli) -> Result<Box<dyn Transport>, ClientError> {
    match &cli.machine {
        Some(addr) => {
            let options = tcp::Options {
                reply_timeout: cli.timeout,
                ..tcp::Options::default()
            };
            Ok(Box::new(tcp::TcpTransport::connect(addr, options)?))
        }
        None => open_device(),
    }
}

#[cfg(windows)]
fn open_device() -> Result<Box<dyn Transport>, ClientError> {
    Ok(Box::new(device::DeviceTransport::open()?))
}

#[cfg(not(windows))]
fn open_device() -> Result<Box<dyn Transport>, ClientError> {
    Err(ClientError::NoDevice)
}
