//! [`ControlError`]: every way a control request can be refused, with the sizes and values a
//! client needs to correct it, and its stable wire form ([`ErrorReply`]).
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use core::fmt;

use super::wire::{ERROR_MAGIC, ErrorReply, Field, status};
use crate::Error;
use crate::platform::PlatformError;

/// Why a control request was refused. One variant per protocol status ([`wire::status`]); a
/// refused request changed nothing, except [`ControlError::SetModeFailed`], which says which CPU
/// stopped the broadcast.
///
/// [`wire::status`]: super::wire::status
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// The input is not the size this request's struct has.
    WrongInputSize {
        /// Size of the request's struct.
        expected: u32,
        /// Size given (saturated at `u32::MAX`).
        got: u32,
    },
    /// The output buffer cannot hold the reply: ask again with `needed` bytes.
    OutputTooSmall {
        /// Bytes the reply needs.
        needed: u32,
        /// Bytes given (saturated at `u32::MAX`).
        got: u32,
    },
    /// No such control code.
    UnknownCode {
        /// The code given.
        code: u32,
    },
    /// The request's header names a protocol version this hypervisor does not speak.
    VersionMismatch {
        /// The version it speaks.
        supported: u32,
        /// The version the request named.
        got: u32,
    },
    /// A reserved field is not zero.
    ReservedNotZero {
        /// Byte offset of that field in the request.
        offset: u32,
    },
    /// The mode value names no mode.
    UnknownMode {
        /// The value given.
        mode: u32,
    },
    /// The request set flags this version does not know.
    UnknownFlags {
        /// The unknown bits only.
        flags: u32,
    },
    /// No CPU is virtualized, so there is nothing to change or count.
    NotVirtualized,
    /// The mode broadcast stopped at a CPU that did not apply it.
    SetModeFailed {
        /// The CPU that failed.
        cpu: u32,
        /// What the core said.
        reason: CoreFailure,
    },
    /// The reply for this many CPUs would not fit a `u32` size.
    ReplyTooLarge {
        /// CPUs the platform reports.
        cpus: u32,
    },
    /// The policy value names no delivery policy.
    UnknownPolicy {
        /// The value given.
        policy: u32,
    },
    /// The vector takes no delivery policy: exceptions and classes ≤ DISPATCH (below
    /// `first`) are always injected, and there is no vector past 0xFF.
    VectorNotConfigurable {
        /// The vector given.
        vector: u32,
        /// The lowest vector that takes a policy.
        first: u32,
    },
}

/// A core [`Error`] as it travels: a stable kind and one number of detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreFailure {
    /// One of the `CoreFailure::*` kinds (other values come from a newer hypervisor).
    pub kind: u32,
    /// Kind-specific: the VM-instruction error, pages asked for, or the unreachable CPU.
    pub detail: u32,
}

impl CoreFailure {
    /// A platform service ran out of contiguous memory (`detail` = pages).
    pub const OUT_OF_MEMORY: u32 = 1;
    /// The platform could not run code on a CPU (`detail` = that CPU).
    pub const CPU_UNREACHABLE: u32 = 2;
    /// CPUID.1:ECX.VMX is clear.
    pub const NO_VMX: u32 = 3;
    /// IA32_FEATURE_CONTROL is locked with VMX off.
    pub const VMX_LOCKED_OFF: u32 = 4;
    /// Another hypervisor owns VT-x.
    pub const FOREIGN_HYPERVISOR: u32 = 5;
    /// CR4.FRED is set.
    pub const FRED_ENABLED: u32 = 6;
    /// The CPU is not virtualized.
    pub const NOT_VIRTUALIZED: u32 = 7;
    /// The CPU is already virtualized.
    pub const ALREADY_VIRTUALIZED: u32 = 8;
    /// A required VMX control is missing.
    pub const UNSUPPORTED: u32 = 9;
    /// A VMX instruction failed (`detail` = VM-instruction error).
    pub const VMX_INSTRUCTION: u32 = 10;
    /// Vectors still pending: retry.
    pub const BUSY: u32 = 11;
    /// More CPUs than the core's table holds.
    pub const TOO_MANY_CPUS: u32 = 12;
    /// An outer hypervisor other than Hyper-V does not expose VT-x (nested VT-x off).
    pub const NESTED_VMX_HIDDEN: u32 = 13;

    /// Converts a core error; the one place `Error` becomes a number (exhaustive, no `_`, so a
    /// new core variant cannot travel unnamed).
    pub const fn from_error(e: Error) -> Self {
        let (kind, detail) = match e {
            Error::Platform(PlatformError::OutOfMemory { pages }) => {
                (Self::OUT_OF_MEMORY, saturate(pages))
            }
            Error::Platform(PlatformError::CpuUnreachable(cpu)) => (Self::CPU_UNREACHABLE, cpu.0),
            Error::NoVmx => (Self::NO_VMX, 0),
            Error::VmxLockedOff => (Self::VMX_LOCKED_OFF, 0),
            Error::ForeignHypervisor => (Self::FOREIGN_HYPERVISOR, 0),
            Error::FredEnabled => (Self::FRED_ENABLED, 0),
            Error::NestedVmxHidden { .. } => (Self::NESTED_VMX_HIDDEN, 0),
            Error::NotVirtualized => (Self::NOT_VIRTUALIZED, 0),
            Error::AlreadyVirtualized => (Self::ALREADY_VIRTUALIZED, 0),
            Error::Unsupported(_) => (Self::UNSUPPORTED, 0),
            Error::VmxInstruction { error, .. } => (Self::VMX_INSTRUCTION, error),
            Error::Busy => (Self::BUSY, 0),
            Error::TooManyCpus => (Self::TOO_MANY_CPUS, 0),
        };
        Self { kind, detail }
    }

    /// What the kind means, for people.
    pub const fn describe(self) -> &'static str {
        match self.kind {
            Self::OUT_OF_MEMORY => "out of contiguous memory",
            Self::CPU_UNREACHABLE => "the platform could not run code on a CPU",
            Self::NO_VMX => "the CPU has no VMX",
            Self::VMX_LOCKED_OFF => "IA32_FEATURE_CONTROL is locked with VMX disabled",
            Self::FOREIGN_HYPERVISOR => "another hypervisor owns VT-x",
            Self::FRED_ENABLED => "CR4.FRED is set",
            Self::NOT_VIRTUALIZED => "the CPU is not virtualized",
            Self::ALREADY_VIRTUALIZED => "the CPU is already virtualized",
            Self::UNSUPPORTED => "a required VMX control is not supported",
            Self::VMX_INSTRUCTION => "a VMX instruction failed",
            Self::BUSY => "vectors are still pending; retry",
            Self::TOO_MANY_CPUS => "more CPUs than the hypervisor's table holds",
            Self::NESTED_VMX_HIDDEN => "the outer hypervisor does not expose VT-x",
            _ => "unknown core error",
        }
    }
}

impl fmt::Display for CoreFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())?;
        match self.kind {
            Self::OUT_OF_MEMORY => write!(f, " ({} pages requested)", self.detail),
            Self::CPU_UNREACHABLE => write!(f, " (CPU {})", self.detail),
            Self::VMX_INSTRUCTION => write!(f, " (VM-instruction error {})", self.detail),
            _ => Ok(()),
        }
    }
}

/// `usize` → `u32` for sizes in messages: a size past 4 GiB is reported as `u32::MAX`.
pub const fn saturate(n: usize) -> u32 {
    if n > u32::MAX as usize {
        u32::MAX
    } else {
        n as u32
    }
}

impl ControlError {
    /// The stable status code of this error ([`wire::status`](super::wire::status)); never
    /// [`status::OK`].
    pub const fn as_status(&self) -> u32 {
        match self {
            Self::WrongInputSize { .. } => status::WRONG_INPUT_SIZE,
            Self::OutputTooSmall { .. } => status::OUTPUT_TOO_SMALL,
            Self::UnknownCode { .. } => status::UNKNOWN_CODE,
            Self::VersionMismatch { .. } => status::VERSION_MISMATCH,
            Self::ReservedNotZero { .. } => status::RESERVED_NOT_ZERO,
            Self::UnknownMode { .. } => status::UNKNOWN_MODE,
            Self::UnknownFlags { .. } => status::UNKNOWN_FLAGS,
            Self::NotVirtualized => status::NOT_VIRTUALIZED,
            Self::SetModeFailed { .. } => status::SET_MODE_FAILED,
            Self::ReplyTooLarge { .. } => status::REPLY_TOO_LARGE,
            Self::UnknownPolicy { .. } => status::UNKNOWN_POLICY,
            Self::VectorNotConfigurable { .. } => status::VECTOR_NOT_CONFIGURABLE,
        }
    }

    /// The wire form: status and arguments.
    pub const fn to_reply(&self) -> ErrorReply {
        let (arg0, arg1, arg2) = match *self {
            Self::WrongInputSize { expected, got } => (expected, got, 0),
            Self::OutputTooSmall { needed, got } => (needed, got, 0),
            Self::UnknownCode { code } => (code, 0, 0),
            Self::VersionMismatch { supported, got } => (supported, got, 0),
            Self::ReservedNotZero { offset } => (offset, 0, 0),
            Self::UnknownMode { mode } => (mode, 0, 0),
            Self::UnknownFlags { flags } => (flags, 0, 0),
            Self::NotVirtualized => (0, 0, 0),
            Self::SetModeFailed { cpu, reason } => (cpu, reason.kind, reason.detail),
            Self::ReplyTooLarge { cpus } => (cpus, 0, 0),
            Self::UnknownPolicy { policy } => (policy, 0, 0),
            Self::VectorNotConfigurable { vector, first } => (vector, first, 0),
        };
        ErrorReply {
            magic: ERROR_MAGIC,
            status: self.as_status(),
            arg0,
            arg1,
            arg2,
            reserved: 0,
        }
    }

    /// Reads an [`ErrorReply`] back; `None` for a wrong magic, [`status::OK`] or a status this
    /// version does not know.
    pub const fn from_reply(r: &ErrorReply) -> Option<Self> {
        if r.magic != ERROR_MAGIC {
            return None;
        }
        let (a, b, c) = (r.arg0, r.arg1, r.arg2);
        Some(match r.status {
            status::WRONG_INPUT_SIZE => Self::WrongInputSize {
                expected: a,
                got: b,
            },
            status::OUTPUT_TOO_SMALL => Self::OutputTooSmall { needed: a, got: b },
            status::UNKNOWN_CODE => Self::UnknownCode { code: a },
            status::VERSION_MISMATCH => Self::VersionMismatch {
                supported: a,
                got: b,
            },
            status::RESERVED_NOT_ZERO => Self::ReservedNotZero { offset: a },
            status::UNKNOWN_MODE => Self::UnknownMode { mode: a },
            status::UNKNOWN_FLAGS => Self::UnknownFlags { flags: a },
            status::NOT_VIRTUALIZED => Self::NotVirtualized,
            status::SET_MODE_FAILED => Self::SetModeFailed {
                cpu: a,
                reason: CoreFailure { kind: b, detail: c },
            },
            status::REPLY_TOO_LARGE => Self::ReplyTooLarge { cpus: a },
            status::UNKNOWN_POLICY => Self::UnknownPolicy { policy: a },
            status::VECTOR_NOT_CONFIGURABLE => Self::VectorNotConfigurable {
                vector: a,
                first: b,
            },
            _ => return None,
        })
    }

    /// Writes the [`ErrorReply`] to the start of `out`; its size, or `None` if it does not fit.
    pub fn write_reply(&self, out: &mut [u8]) -> Option<usize> {
        self.to_reply().encode(out)
    }

    /// Decodes an error from reply bytes (exactly one [`ErrorReply`]).
    pub fn read_reply(bytes: &[u8]) -> Option<Self> {
        Self::from_reply(&ErrorReply::decode(bytes)?)
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::WrongInputSize { expected, got } => {
                write!(
                    f,
                    "request input is {got} bytes; this request takes {expected}"
                )
            }
            Self::OutputTooSmall { needed, got } => write!(
                f,
                "output buffer of {got} bytes is too small; the reply needs {needed}"
            ),
            Self::UnknownCode { code } => write!(f, "unknown control code {code:#010x}"),
            Self::VersionMismatch { supported, got } => write!(
                f,
                "protocol version {got} is not supported; the hypervisor speaks version {supported}"
            ),
            Self::ReservedNotZero { offset } => {
                write!(
                    f,
                    "reserved field at byte {offset} of the request is not zero"
                )
            }
            Self::UnknownMode { mode } => write!(f, "unknown interrupt mode {mode}"),
            Self::UnknownFlags { flags } => write!(f, "unknown request flags {flags:#x}"),
            Self::NotVirtualized => f.write_str("no CPU is virtualized"),
            Self::SetModeFailed { cpu, reason } => {
                write!(f, "CPU {cpu} did not apply the new mode: {reason}")
            }
            Self::ReplyTooLarge { cpus } => {
                write!(f, "the reply for {cpus} CPUs would exceed 4 GiB")
            }
            Self::UnknownPolicy { policy } => write!(
                f,
                "unknown delivery policy {policy} (0 replay, 1 inject, 2 auto)"
            ),
            Self::VectorNotConfigurable { vector, first } => write!(
                f,
                "vector {vector:#x} takes no delivery policy: only {first:#x}..=0xff do \
                 (lower vectors are exceptions or class <= DISPATCH, always injected)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;

    use super::*;
    use crate::platform::CpuIndex;

    /// One of each variant, with distinct argument values.
    pub(crate) const ALL: [ControlError; 12] = [
        ControlError::WrongInputSize {
            expected: 16,
            got: 3,
        },
        ControlError::OutputTooSmall {
            needed: 7160,
            got: 8,
        },
        ControlError::UnknownCode { code: 0x0022_6FFC },
        ControlError::VersionMismatch {
            supported: 1,
            got: 9,
        },
        ControlError::ReservedNotZero { offset: 12 },
        ControlError::UnknownMode { mode: 4 },
        ControlError::UnknownFlags { flags: 0x80 },
        ControlError::NotVirtualized,
        ControlError::SetModeFailed {
            cpu: 3,
            reason: CoreFailure {
                kind: CoreFailure::VMX_INSTRUCTION,
                detail: 12,
            },
        },
        ControlError::ReplyTooLarge { cpus: 700_000 },
        ControlError::UnknownPolicy { policy: 7 },
        ControlError::VectorNotConfigurable {
            vector: 0x2f,
            first: 0x30,
        },
    ];

    #[test]
    fn every_error_has_a_distinct_nonzero_status() {
        let mut seen = std::vec::Vec::new();
        for e in ALL {
            let s = e.as_status();
            assert_ne!(s, status::OK, "{e:?}");
            assert!(!seen.contains(&s), "{e:?} reuses status {s}");
            seen.push(s);
        }
    }

    #[test]
    fn every_error_round_trips_through_its_reply_bytes() {
        for e in ALL {
            let mut buf = [0u8; ErrorReply::SIZE];
            assert_eq!(e.write_reply(&mut buf), Some(ErrorReply::SIZE));
            assert_eq!(ControlError::read_reply(&buf), Some(e), "{e:?}");
            assert_eq!(e.write_reply(&mut buf[..ErrorReply::SIZE - 1]), None);
        }
    }

    #[test]
    fn replies_with_wrong_magic_or_unknown_status_are_not_errors() {
        let mut r = ControlError::NotVirtualized.to_reply();
        r.magic = 0;
        assert_eq!(ControlError::from_reply(&r), None);
        r.magic = ERROR_MAGIC;
        for s in [status::OK, 13, 0xFFFF, u32::MAX] {
            r.status = s;
            assert_eq!(ControlError::from_reply(&r), None, "status {s}");
        }
    }

    #[test]
    fn every_error_message_names_its_numbers() {
        let cases: [(ControlError, &[&str]); 12] = [
            (ALL[0], &["3 bytes", "takes 16"]),
            (ALL[1], &["8 bytes", "needs 7160"]),
            (ALL[2], &["0x00226ffc"]),
            (ALL[3], &["version 9", "version 1"]),
            (ALL[4], &["byte 12"]),
            (ALL[5], &["mode 4"]),
            (ALL[6], &["0x80"]),
            (ALL[7], &["no CPU is virtualized"]),
            (ALL[8], &["CPU 3", "VM-instruction error 12"]),
            (ALL[9], &["700000 CPUs"]),
            (ALL[10], &["policy 7"]),
            (ALL[11], &["vector 0x2f", "0x30..=0xff"]),
        ];
        for (e, parts) in cases {
            let text = e.to_string();
            for p in parts {
                assert!(text.contains(p), "{text:?} lacks {p:?}");
            }
        }
    }

    #[test]
    fn core_errors_map_to_stable_kinds() {
        let cases = [
            (
                Error::Platform(PlatformError::OutOfMemory { pages: 5 }),
                CoreFailure::OUT_OF_MEMORY,
                5,
            ),
            (
                Error::Platform(PlatformError::CpuUnreachable(CpuIndex(7))),
                CoreFailure::CPU_UNREACHABLE,
                7,
            ),
            (Error::NoVmx, CoreFailure::NO_VMX, 0),
            (Error::VmxLockedOff, CoreFailure::VMX_LOCKED_OFF, 0),
            (Error::ForeignHypervisor, CoreFailure::FOREIGN_HYPERVISOR, 0),
            (Error::FredEnabled, CoreFailure::FRED_ENABLED, 0),
            (Error::NotVirtualized, CoreFailure::NOT_VIRTUALIZED, 0),
            (
                Error::AlreadyVirtualized,
                CoreFailure::ALREADY_VIRTUALIZED,
                0,
            ),
            (
                Error::Unsupported(crate::vmx::caps::Missing {
                    control: "acknowledge interrupt on exit",
                    msr: "IA32_VMX_TRUE_EXIT_CTLS",
                }),
                CoreFailure::UNSUPPORTED,
                0,
            ),
            (
                Error::VmxInstruction {
                    instruction: "VMPTRLD",
                    error: 9,
                },
                CoreFailure::VMX_INSTRUCTION,
                9,
            ),
            (Error::Busy, CoreFailure::BUSY, 0),
            (Error::TooManyCpus, CoreFailure::TOO_MANY_CPUS, 0),
            (
                Error::NestedVmxHidden {
                    vendor: *b"VMwareVMware",
                },
                CoreFailure::NESTED_VMX_HIDDEN,
                0,
            ),
        ];
        let mut kinds = std::vec::Vec::new();
        for (e, kind, detail) in cases {
            let f = CoreFailure::from_error(e);
            assert_eq!((f.kind, f.detail), (kind, detail), "{e:?}");
            assert_ne!(f.describe(), "unknown core error", "{e:?}");
            assert!(!kinds.contains(&kind));
            kinds.push(kind);
        }
        let unknown = CoreFailure {
            kind: 999,
            detail: 0,
        };
        assert_eq!(unknown.to_string(), "unknown core error");
        assert_eq!(
            CoreFailure::from_error(Error::Platform(PlatformError::OutOfMemory {
                pages: usize::MAX
            }))
            .detail,
            u32::MAX
        );
    }
}
