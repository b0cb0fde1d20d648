//! What an I/O request to `\Device\Ackvisor` completes with, decided without NT.
//!
//! `irp.rs` reads the major function, control code and buffer lengths from the IRP's current
//! stack location, hands over access to the system buffer, and writes back the
//! [`Completion`]'s status and byte count. Everything in between is here, so the host's unit
//! tests cover it: each malformed request is refused before the buffer is reached, and the
//! reply never claims more bytes than the caller's output buffer holds (METHOD_BUFFERED copies
//! `IoStatus.Information` bytes back to user mode).
//!
//! The status convention is the control protocol's ([`wire::nt_warning`], [`wire::nt_error`]):
//! a refused request whose [`ErrorReply`] fits the output buffer completes with warning
//! severity so the I/O manager copies that reply to the caller; otherwise with error severity
//! and no data.
//!
//! **Runs in:** PASSIVE (the requesting thread; `control::dispatch` may wait for every CPU).
#![forbid(unsafe_code)]

use ackvisor_vmm::control::wire::{self, ErrorReply, Field, MAX_REQUEST_BYTES};
use ackvisor_vmm::control::{self, ControlError, ControlTarget};

/// The NTSTATUS values (ntstatus.h) a request completes with outside the protocol's own. They
/// are declared here so the decision is testable on any host; the driver build asserts each
/// equals wdk-sys's constant.
pub mod ntstatus {
    /// `STATUS_SUCCESS`.
    pub const STATUS_SUCCESS: i32 = 0;
    /// `STATUS_INVALID_DEVICE_REQUEST`: a major function this device does not serve.
    pub const STATUS_INVALID_DEVICE_REQUEST: i32 = 0xC000_0010_u32 as i32;
    /// `STATUS_INVALID_PARAMETER`: the I/O manager gave no system buffer for nonzero lengths.
    pub const STATUS_INVALID_PARAMETER: i32 = 0xC000_000D_u32 as i32;
}

/// IRP major function codes (wdm.h) the device is opened, closed and driven with.
pub mod major {
    /// `IRP_MJ_CREATE`: `CreateFileW(r"\\.\Ackvisor")`.
    pub const CREATE: u8 = 0x00;
    /// `IRP_MJ_CLOSE`: the last handle is closed.
    pub const CLOSE: u8 = 0x02;
    /// `IRP_MJ_DEVICE_CONTROL`: `DeviceIoControl`.
    pub const DEVICE_CONTROL: u8 = 0x0E;
}

/// The parameters of one request, as its current I/O stack location states them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoRequest {
    /// `MajorFunction`.
    pub major: u8,
    /// `Parameters.DeviceIoControl.IoControlCode` (0 for other major functions).
    pub code: u32,
    /// `Parameters.DeviceIoControl.InputBufferLength`.
    pub input_len: u32,
    /// `Parameters.DeviceIoControl.OutputBufferLength`.
    pub output_len: u32,
}

/// The I/O manager's system buffer of a METHOD_BUFFERED request: one buffer of
/// max(input, output) bytes, holding the input at its start, that the reply overwrites.
pub trait SystemBuffer {
    /// The buffer's first `len` bytes, where `len` = max(input length, output length) of this
    /// request; `None` when the IRP carries no buffer. Called at most once per request, and
    /// only after the request's method and lengths were checked.
    fn bytes(&mut self, len: usize) -> Option<&mut [u8]>;
}

/// How a request completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Create, close, or a control request answered with `information` reply bytes.
    Success {
        /// Bytes of reply at the start of the system buffer.
        information: usize,
    },
    /// A control request refused by the protocol.
    Refused {
        /// Why.
        error: ControlError,
        /// An [`ErrorReply`] was written to the start of the output buffer.
        reply_written: bool,
    },
    /// A control request that says it has buffers but came without a system buffer.
    MissingBuffer,
    /// A major function the device does not serve.
    InvalidRequest,
}

impl Completion {
    /// The NTSTATUS for `IoStatus.Status`: the one place a completion becomes a status.
    pub const fn status(&self) -> i32 {
        match *self {
            Self::Success { .. } => ntstatus::STATUS_SUCCESS,
            // Warning severity: METHOD_BUFFERED copies the ErrorReply back to the caller.
            Self::Refused {
                error,
                reply_written: true,
            } => wire::nt_warning(error.as_status()) as i32,
            // Error severity: nothing is copied back, GetLastError still names the status.
            Self::Refused {
                error,
                reply_written: false,
            } => wire::nt_error(error.as_status()) as i32,
            Self::MissingBuffer => ntstatus::STATUS_INVALID_PARAMETER,
            Self::InvalidRequest => ntstatus::STATUS_INVALID_DEVICE_REQUEST,
        }
    }

    /// The byte count for `IoStatus.Information`: how much of the system buffer the I/O manager
    /// copies back to the caller's output buffer.
    pub const fn information(&self) -> usize {
        match *self {
            Self::Success { information } => information,
            Self::Refused {
                reply_written: true,
                ..
            } => ErrorReply::SIZE,
            Self::Refused {
                reply_written: false,
                ..
            }
            | Self::MissingBuffer
            | Self::InvalidRequest => 0,
        }
    }
}

/// The transfer method of a control code (devioctl.h `METHOD_FROM_CTL_CODE`: bits 1:0).
const fn method_of(code: u32) -> u32 {
    code & 0b11
}

/// Decides how `request` completes, running the control protocol for device-control requests.
///
/// Checks, in this order, before the system buffer is asked for: the major function; for
/// device control, that the code is METHOD_BUFFERED (any other method means the buffers are not
/// the system buffer, so nothing may be read or written). Then the input is copied out of the
/// shared buffer (it is at most [`MAX_REQUEST_BYTES`]) so [`control::dispatch`] gets an input
/// and an output that do not overlap.
pub fn complete(
    target: &dyn ControlTarget,
    request: &IoRequest,
    buffer: &mut dyn SystemBuffer,
) -> Completion {
    match request.major {
        major::CREATE | major::CLOSE => Completion::Success { information: 0 },
        major::DEVICE_CONTROL => device_control(target, request, buffer),
        _ => Completion::InvalidRequest,
    }
}

fn device_control(
    target: &dyn ControlTarget,
    request: &IoRequest,
    buffer: &mut dyn SystemBuffer,
) -> Completion {
    let code = request.code;
    if method_of(code) != wire::METHOD_BUFFERED {
        // Every protocol code is METHOD_BUFFERED, so this one is unknown; its buffers are user
        // addresses or MDLs, which this driver never touches.
        return Completion::Refused {
            error: ControlError::UnknownCode { code },
            reply_written: false,
        };
    }
    let input_len = request.input_len as usize;
    let output_len = request.output_len as usize;
    let len = input_len.max(output_len);
    if len == 0 {
        // No buffer exists; the protocol refuses the empty input without touching anything.
        return finish(control::dispatch(target, code, &[], &mut []), None, 0);
    }
    let Some(buf) = buffer.bytes(len) else {
        return Completion::MissingBuffer;
    };
    let result = if input_len <= MAX_REQUEST_BYTES {
        let mut input = [0u8; MAX_REQUEST_BYTES];
        let (Some(copy), Some(source)) = (input.get_mut(..input_len), buf.get(..input_len)) else {
            return Completion::MissingBuffer;
        };
        copy.copy_from_slice(source);
        let Some(output) = buf.get_mut(..output_len) else {
            return Completion::MissingBuffer;
        };
        control::dispatch(target, code, copy, output)
    } else {
        // Longer than any request of this protocol version: the dispatcher's validation refuses
        // it (naming the version first when the header is another version's) before it looks
        // at the output, so it reads the input in place and gets no output at all.
        let Some(input) = buf.get(..input_len) else {
            return Completion::MissingBuffer;
        };
        control::dispatch(target, code, input, &mut [])
    };
    finish(result, buf.get_mut(..output_len), output_len)
}

/// Turns the dispatcher's answer into a completion, writing the [`ErrorReply`] of a refusal
/// into `output` when it fits.
fn finish(
    result: Result<usize, ControlError>,
    output: Option<&mut [u8]>,
    output_len: usize,
) -> Completion {
    let error = match result {
        Ok(information) if information <= output_len => {
            return Completion::Success { information };
        }
        // The dispatcher writes only into the slice it was given, so this cannot happen; if it
        // did, claiming the bytes would copy kernel memory past the caller's buffer.
        Ok(needed) => ControlError::OutputTooSmall {
            needed: u32::try_from(needed).unwrap_or(u32::MAX),
            got: u32::try_from(output_len).unwrap_or(u32::MAX),
        },
        Err(error) => error,
    };
    let reply_written = output.and_then(|out| error.write_reply(out)).is_some();
    Completion::Refused {
        error,
        reply_written,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ackvisor_vmm::control::Request;
    use ackvisor_vmm::control::wire::{
        FILE_DEVICE_UNKNOWN, FILE_READ_ACCESS, IOCTL_SET_MODE, IOCTL_STATS, IOCTL_STATUS,
        RequestHeader, StatusReply, ctl_code,
    };
    use ackvisor_vmm::hypervisor::Features;
    use ackvisor_vmm::intr::policy::Vector;
    use ackvisor_vmm::intr::vector_policy::{PolicyTable, VectorPolicy};
    use ackvisor_vmm::stats::{Counters, Snapshot};
    use ackvisor_vmm::{CpuIndex, Error, Mode};
    use std::cell::Cell;

    /// A hypervisor with `cpus` CPUs, all virtualized, that counts mode changes.
    struct FakeTarget {
        cpus: u32,
        set_mode_calls: Cell<u32>,
    }

    impl FakeTarget {
        fn new(cpus: u32) -> Self {
            Self {
                cpus,
                set_mode_calls: Cell::new(0),
            }
        }
    }

    // The dispatcher only needs `&dyn ControlTarget`; `Cell` is fine in a single-threaded test.
    impl ControlTarget for FakeTarget {
        fn set_mode_all(&self, _mode: Mode) -> Result<(), (CpuIndex, Error)> {
            self.set_mode_calls.set(self.set_mode_calls.get() + 1);
            Ok(())
        }
        fn cpu_mode(&self, cpu: CpuIndex) -> Option<Mode> {
            (cpu.0 < self.cpus).then_some(Mode::Passthrough)
        }
        fn with_cpu_counters(&self, cpu: CpuIndex, f: &mut dyn FnMut(Mode, &dyn Counters)) -> bool {
            let present = cpu.0 < self.cpus;
            if present {
                f(Mode::Passthrough, &Snapshot::zero());
            }
            present
        }
        fn reset_stats(&self) {}
        fn cpu_count(&self) -> u32 {
            self.cpus
        }
        fn virtualized_count(&self) -> u32 {
            self.cpus
        }
        fn bytes_per_cpu(&self) -> usize {
            0x1_0000
        }
        fn features(&self) -> Option<Features> {
            None
        }
        fn set_policy_all(&self, _v: Vector, _p: VectorPolicy) -> u32 {
            self.cpus
        }
        fn policy(&self, cpu: CpuIndex) -> Option<PolicyTable> {
            (cpu.0 < self.cpus).then_some(PolicyTable::ALL_REPLAY)
        }
    }

    /// A system buffer that records whether the request reached it.
    struct Recorder {
        bytes: Vec<u8>,
        touched: bool,
        present: bool,
    }

    impl Recorder {
        fn with(contents: &[u8], len: usize) -> Self {
            let mut bytes = vec![0xEE; len.max(contents.len())];
            bytes[..contents.len()].copy_from_slice(contents);
            Self {
                bytes,
                touched: false,
                present: true,
            }
        }

        fn untouchable() -> Self {
            Self {
                bytes: Vec::new(),
                touched: false,
                present: true,
            }
        }
    }

    impl SystemBuffer for Recorder {
        fn bytes(&mut self, len: usize) -> Option<&mut [u8]> {
            self.touched = true;
            if !self.present {
                return None;
            }
            assert!(
                len <= self.bytes.len(),
                "asked for {len} of {} bytes",
                self.bytes.len()
            );
            self.bytes.get_mut(..len)
        }
    }

    fn control(code: u32, input_len: u32, output_len: u32) -> IoRequest {
        IoRequest {
            major: major::DEVICE_CONTROL,
            code,
            input_len,
            output_len,
        }
    }

    fn status_input() -> Vec<u8> {
        let (buf, n) = Request::Status.encode();
        buf[..n].to_vec()
    }

    fn refused(c: Completion) -> ControlError {
        match c {
            Completion::Refused { error, .. } => error,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn create_and_close_succeed_without_touching_the_buffer() {
        let target = FakeTarget::new(2);
        for major in [major::CREATE, major::CLOSE] {
            let mut buf = Recorder::untouchable();
            let request = IoRequest {
                major,
                code: 0,
                input_len: 0,
                output_len: 0,
            };
            let c = complete(&target, &request, &mut buf);
            assert_eq!(c, Completion::Success { information: 0 });
            assert_eq!((c.status(), c.information()), (ntstatus::STATUS_SUCCESS, 0));
            assert!(!buf.touched);
        }
    }

    #[test]
    fn other_major_functions_are_invalid_device_requests_without_touching_the_buffer() {
        let target = FakeTarget::new(1);
        // IRP_MJ_READ, IRP_MJ_WRITE, IRP_MJ_CLEANUP, IRP_MJ_INTERNAL_DEVICE_CONTROL, IRP_MJ_PNP.
        for major in [0x03, 0x04, 0x12, 0x0F, 0x1B, 0xFF] {
            let mut buf = Recorder::untouchable();
            let request = IoRequest {
                major,
                code: IOCTL_STATUS,
                input_len: 8,
                output_len: 64,
            };
            let c = complete(&target, &request, &mut buf);
            assert_eq!(c, Completion::InvalidRequest);
            assert_eq!(c.status(), ntstatus::STATUS_INVALID_DEVICE_REQUEST);
            assert_eq!(c.information(), 0);
            assert!(!buf.touched, "major {major:#x}");
        }
    }

    #[test]
    fn non_buffered_methods_are_unknown_codes_without_touching_the_buffer() {
        let target = FakeTarget::new(1);
        for method in 1..=3 {
            // The STATUS function number with METHOD_IN_DIRECT, OUT_DIRECT, NEITHER.
            let code = ctl_code(FILE_DEVICE_UNKNOWN, 0x800, method, FILE_READ_ACCESS);
            let mut buf = Recorder::untouchable();
            let c = complete(&target, &control(code, 8, 4096), &mut buf);
            assert_eq!(refused(c), ControlError::UnknownCode { code });
            assert_eq!(
                c.status() as u32,
                wire::nt_error(wire::status::UNKNOWN_CODE)
            );
            assert_eq!(c.information(), 0);
            assert!(!buf.touched, "method {method}");
        }
    }

    #[test]
    fn missing_system_buffer_is_an_invalid_parameter() {
        let target = FakeTarget::new(1);
        let mut buf = Recorder::untouchable();
        buf.present = false;
        let input = status_input();
        let c = complete(
            &target,
            &control(IOCTL_STATUS, input.len() as u32, 256),
            &mut buf,
        );
        assert_eq!(c, Completion::MissingBuffer);
        assert_eq!(c.status(), ntstatus::STATUS_INVALID_PARAMETER);
        assert_eq!(c.information(), 0);
    }

    #[test]
    fn no_buffers_at_all_is_refused_without_touching_anything() {
        let target = FakeTarget::new(1);
        let mut buf = Recorder::untouchable();
        let c = complete(&target, &control(IOCTL_STATUS, 0, 0), &mut buf);
        assert!(matches!(
            refused(c),
            ControlError::WrongInputSize { got: 0, .. }
        ));
        // No room for an ErrorReply: error severity, nothing copied back.
        assert_eq!(
            c.status() as u32,
            wire::nt_error(wire::status::WRONG_INPUT_SIZE)
        );
        assert_eq!(c.information(), 0);
        assert!(!buf.touched);
    }

    #[test]
    fn status_request_is_answered_in_the_system_buffer() {
        let target = FakeTarget::new(3);
        let input = status_input();
        let mut buf = Recorder::with(&input, 4096);
        let c = complete(
            &target,
            &control(IOCTL_STATUS, input.len() as u32, 4096),
            &mut buf,
        );
        let Completion::Success { information } = c else {
            panic!("status refused: {c:?}");
        };
        assert_eq!(c.status(), ntstatus::STATUS_SUCCESS);
        assert_eq!(c.information(), information);
        let reply = StatusReply::decode(&buf.bytes[..StatusReply::SIZE]).expect("reply");
        assert_eq!(reply.cpu_count, 3);
        assert_eq!(reply.header.size as usize, information);
    }

    #[test]
    fn short_output_gets_the_error_reply_with_warning_severity() {
        let target = FakeTarget::new(2);
        let input = status_input();
        let out = ErrorReply::SIZE as u32;
        let mut buf = Recorder::with(&input, ErrorReply::SIZE);
        let c = complete(
            &target,
            &control(IOCTL_STATUS, input.len() as u32, out),
            &mut buf,
        );
        let error = refused(c);
        assert!(matches!(error, ControlError::OutputTooSmall { got, .. } if got == out));
        assert_eq!(
            c.status() as u32,
            wire::nt_warning(wire::status::OUTPUT_TOO_SMALL)
        );
        assert_eq!(c.information(), ErrorReply::SIZE);
        assert_eq!(
            ControlError::read_reply(&buf.bytes[..ErrorReply::SIZE]),
            Some(error)
        );
    }

    #[test]
    fn output_smaller_than_an_error_reply_gets_error_severity_and_no_data() {
        let target = FakeTarget::new(2);
        let input = status_input();
        let mut buf = Recorder::with(&input, input.len());
        let c = complete(
            &target,
            &control(IOCTL_STATUS, input.len() as u32, 4),
            &mut buf,
        );
        assert!(matches!(
            refused(c),
            ControlError::OutputTooSmall { got: 4, .. }
        ));
        assert_eq!(
            c.status() as u32,
            wire::nt_error(wire::status::OUTPUT_TOO_SMALL)
        );
        assert_eq!(c.information(), 0);
    }

    #[test]
    fn oversized_input_is_refused_and_changes_nothing() {
        let target = FakeTarget::new(2);
        let (bytes, n) = Request::SetMode(Mode::AckReplay).encode();
        let mut input = bytes[..n].to_vec();
        input.resize(MAX_REQUEST_BYTES + 9, 0);
        let mut buf = Recorder::with(&input, 256);
        let c = complete(
            &target,
            &control(IOCTL_SET_MODE, input.len() as u32, 256),
            &mut buf,
        );
        assert!(matches!(
            refused(c),
            ControlError::WrongInputSize { got, .. } if got as usize == input.len()
        ));
        assert_eq!(
            c.status() as u32,
            wire::nt_warning(wire::status::WRONG_INPUT_SIZE)
        );
        assert_eq!(target.set_mode_calls.get(), 0);
    }

    #[test]
    fn oversized_input_of_another_version_is_told_the_version() {
        let target = FakeTarget::new(1);
        let header = RequestHeader {
            version: wire::PROTOCOL_VERSION + 1,
            ..RequestHeader::CURRENT
        };
        let mut input = vec![0u8; MAX_REQUEST_BYTES * 2];
        header.encode(&mut input).expect("header fits");
        let mut buf = Recorder::with(&input, 64);
        let c = complete(
            &target,
            &control(IOCTL_STATS, input.len() as u32, 64),
            &mut buf,
        );
        assert!(matches!(refused(c), ControlError::VersionMismatch { .. }));
        assert_eq!(
            c.status() as u32,
            wire::nt_warning(wire::status::VERSION_MISMATCH)
        );
    }

    #[test]
    fn unknown_buffered_code_is_answered_with_an_error_reply() {
        let target = FakeTarget::new(1);
        let code = ctl_code(
            FILE_DEVICE_UNKNOWN,
            0x9FF,
            wire::METHOD_BUFFERED,
            FILE_READ_ACCESS,
        );
        let input = status_input();
        let mut buf = Recorder::with(&input, 64);
        let c = complete(&target, &control(code, input.len() as u32, 64), &mut buf);
        assert_eq!(refused(c), ControlError::UnknownCode { code });
        assert_eq!(c.information(), ErrorReply::SIZE);
    }

    #[test]
    fn information_never_exceeds_the_output_length() {
        // Every length pair up to a little past the largest status reply for 4 CPUs.
        let target = FakeTarget::new(4);
        let input = status_input();
        for in_len in 0..=(MAX_REQUEST_BYTES + 4) as u32 {
            for out_len in (0..=96u32).chain([StatusReply::SIZE as u32 + 32, 4096]) {
                let mut contents = input.clone();
                contents.resize(in_len as usize, 0);
                let mut buf = Recorder::with(&contents, in_len.max(out_len) as usize);
                let c = complete(&target, &control(IOCTL_STATUS, in_len, out_len), &mut buf);
                assert!(
                    c.information() <= out_len as usize,
                    "in {in_len} out {out_len}: {c:?}"
                );
                let ok = c.status() >= 0;
                assert_eq!(ok, matches!(c, Completion::Success { .. }));
            }
        }
    }

    #[test]
    fn every_protocol_code_is_method_buffered() {
        for code in [
            wire::IOCTL_STATUS,
            wire::IOCTL_SET_MODE,
            wire::IOCTL_STATS,
            wire::IOCTL_RESET_STATS,
            wire::IOCTL_POLICY,
            wire::IOCTL_SET_POLICY,
        ] {
            assert_eq!(method_of(code), wire::METHOD_BUFFERED, "{code:#x}");
            assert!(control::input_size(code).is_some_and(|n| n <= MAX_REQUEST_BYTES));
        }
    }
}
