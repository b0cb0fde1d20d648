//! Malformed requests through real IRPs: each must be completed once with the precise NTSTATUS
//! and `Information` the control protocol documents (`ackvisor_vmm::control::wire`: warning
//! severity with an ErrorReply when the output holds one, error severity and no data when not).
//!
//! **Runs in:** PASSIVE, BSP, with the image loaded and its device open.

use ackvisor_vmm::control::Request;
use ackvisor_vmm::control::wire::{
    self, CpuModeEntry, ErrorReply, FILE_DEVICE_UNKNOWN, FILE_READ_ACCESS, FUNCTION_BASE, Field,
    IOCTL_STATUS, METHOD_BUFFERED, StatusReply, ctl_code, status,
};

use super::io;
use super::layout::DRIVER_OBJECT;
use crate::report::Line;

/// `METHOD_IN_DIRECT`.
const METHOD_IN_DIRECT: u32 = 1;
/// `METHOD_NEITHER`.
const METHOD_NEITHER: u32 = 3;
/// A function number no protocol version uses.
const UNUSED_FUNCTION: u32 = FUNCTION_BASE + 0x40;
/// Bytes of input past any request of this protocol version.
const OVERSIZED_INPUT: usize = 64;
/// An output buffer that holds an ErrorReply.
const ROOMY_OUTPUT: usize = 256;
/// An output buffer too small for an ErrorReply.
const TINY_OUTPUT: usize = 4;

struct Case {
    name: &'static str,
    code: u32,
    input_len: usize,
    output_len: usize,
    status: u32,
    information: usize,
}

/// Runs every case; prints `malformed_cases`, `malformed_precise` and the first wrong case.
pub fn sweep(driver: *mut DRIVER_OBJECT, line: &mut Line) {
    let (status_input, status_len) = Request::Status.encode();
    let status_with_one_cpu =
        StatusReply::SIZE + crate::percpu::online_count() as usize * CpuModeEntry::SIZE;
    let cases = [
        Case {
            name: "zero_length",
            code: IOCTL_STATUS,
            input_len: 0,
            output_len: 0,
            status: wire::nt_error(status::WRONG_INPUT_SIZE),
            information: 0,
        },
        Case {
            name: "oversized_input",
            code: IOCTL_STATUS,
            input_len: OVERSIZED_INPUT,
            output_len: ROOMY_OUTPUT,
            status: wire::nt_warning(status::WRONG_INPUT_SIZE),
            information: ErrorReply::SIZE,
        },
        Case {
            name: "oversized_output",
            code: IOCTL_STATUS,
            input_len: status_len,
            output_len: io::BUFFER_BYTES,
            status: 0,
            information: status_with_one_cpu,
        },
        Case {
            name: "input_longer_than_output",
            code: IOCTL_STATUS,
            input_len: status_len,
            output_len: TINY_OUTPUT,
            status: wire::nt_error(status::OUTPUT_TOO_SMALL),
            information: 0,
        },
        Case {
            name: "unknown_code",
            code: ctl_code(
                FILE_DEVICE_UNKNOWN,
                UNUSED_FUNCTION,
                METHOD_BUFFERED,
                FILE_READ_ACCESS,
            ),
            input_len: status_len,
            output_len: ROOMY_OUTPUT,
            status: wire::nt_warning(status::UNKNOWN_CODE),
            information: ErrorReply::SIZE,
        },
        Case {
            name: "method_in_direct",
            code: (IOCTL_STATUS & !METHOD_NEITHER) | METHOD_IN_DIRECT,
            input_len: status_len,
            output_len: ROOMY_OUTPUT,
            status: wire::nt_error(status::UNKNOWN_CODE),
            information: 0,
        },
        Case {
            name: "method_neither",
            code: IOCTL_STATUS | METHOD_NEITHER,
            input_len: status_len,
            output_len: ROOMY_OUTPUT,
            status: wire::nt_error(status::UNKNOWN_CODE),
            information: 0,
        },
    ];
    let mut input = [0u8; OVERSIZED_INPUT];
    input[..status_len].copy_from_slice(&status_input[..status_len]);
    let mut output = [0u8; ROOMY_OUTPUT];
    let (mut precise, mut first_wrong) = (0, "-");
    for case in &cases {
        let outcome = if case.output_len > ROOMY_OUTPUT {
            super::driver::ioctl_raw(driver, case.code, &input[..case.input_len], case.output_len)
        } else {
            io::send(
                driver,
                io::IRP_MJ_DEVICE_CONTROL,
                case.code,
                &input[..case.input_len],
                &mut output[..case.output_len],
            )
        };
        match outcome {
            Some(o) if o.status as u32 == case.status && o.information == case.information => {
                precise += 1;
            }
            other => {
                crate::kprintln!(
                    "ntos: malformed {}: got status {:#x} information {}, want {:#x} {}",
                    case.name,
                    other.map_or(0, |o| o.status as u32),
                    other.map_or(0, |o| o.information),
                    case.status,
                    case.information
                );
                if first_wrong == "-" {
                    first_wrong = case.name;
                }
            }
        }
    }
    line.kv("malformed_cases", cases.len())
        .kv("malformed_precise", precise)
        .kv("malformed_first_wrong", first_wrong);
}
