//! [`ClientError`]: what went wrong, said so a person can act on it, and the exit code a script
//! can branch on (one exhaustive `match`, [`ClientError::exit_code`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;

use ackvisor_vmm::control::ControlError;
use ackvisor_vmm::control::frame::FrameError;

/// Everything `ackctl` can fail with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// The device `\\.\Ackvisor` does not exist: the driver is not loaded.
    NotLoaded,
    /// The device exists but this user may not open it (or not for writing).
    AccessDenied,
    /// Client and hypervisor speak different protocol versions.
    VersionMismatch {
        /// This client's version.
        client: u32,
        /// The hypervisor's.
        hypervisor: u32,
    },
    /// The hypervisor refused the request.
    Refused(ControlError),
    /// `--machine` names no address.
    BadMachine,
    /// The test machine's socket could not be reached or dropped the connection.
    Unreachable {
        /// The address tried, when known.
        addr: Option<SocketAddr>,
        /// What the OS said.
        kind: io::ErrorKind,
    },
    /// No reply within the timeout, on every attempt.
    Timeout {
        /// Attempts made.
        attempts: u32,
        /// Milliseconds waited per attempt.
        each_ms: u64,
    },
    /// Every attempt's reply frame was broken (the last error).
    Link(FrameError),
    /// A reply that does not follow the protocol.
    BadReply(&'static str),
    /// No device transport on this OS.
    NoDevice,
    /// Writing output or another local I/O error.
    Io(io::ErrorKind),
    /// Another Windows error code from the device.
    Os(u32),
}

/// Exit codes, stable for scripts.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Command-line error (clap's own code).
    pub const USAGE: u8 = 2;
    /// The driver is not loaded.
    pub const NOT_LOADED: u8 = 3;
    /// Access denied.
    pub const ACCESS_DENIED: u8 = 4;
    /// Protocol versions differ.
    pub const VERSION_MISMATCH: u8 = 5;
    /// The test machine is not reachable (or no transport on this OS).
    pub const UNREACHABLE: u8 = 6;
    /// No reply in time.
    pub const TIMEOUT: u8 = 7;
    /// Nothing is virtualized.
    pub const NOT_VIRTUALIZED: u8 = 8;
    /// A CPU did not apply the new mode.
    pub const MODE_FAILED: u8 = 9;
    /// Requests or replies broken on the way (a client/hypervisor bug or a bad link).
    pub const PROTOCOL: u8 = 10;
    /// A local I/O or OS error.
    pub const IO: u8 = 11;
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NotLoaded => exit::NOT_LOADED,
            Self::AccessDenied => exit::ACCESS_DENIED,
            Self::VersionMismatch { .. } | Self::Refused(ControlError::VersionMismatch { .. }) => {
                exit::VERSION_MISMATCH
            }
            Self::BadMachine | Self::Unreachable { .. } | Self::NoDevice => exit::UNREACHABLE,
            Self::Timeout { .. } => exit::TIMEOUT,
            Self::Refused(ControlError::NotVirtualized) => exit::NOT_VIRTUALIZED,
            Self::Refused(ControlError::SetModeFailed { .. }) => exit::MODE_FAILED,
            // The user named a vector that takes no policy (ackctl cannot know the range a
            // hypervisor accepts, so it lets the hypervisor say it).
            Self::Refused(ControlError::VectorNotConfigurable { .. }) => exit::USAGE,
            // The client builds every request from the shared wire module, so these mean a
            // client/hypervisor mismatch or a corrupted link: a protocol error either way.
            Self::Refused(
                ControlError::WrongInputSize { .. }
                | ControlError::OutputTooSmall { .. }
                | ControlError::UnknownCode { .. }
                | ControlError::ReservedNotZero { .. }
                | ControlError::UnknownMode { .. }
                | ControlError::UnknownFlags { .. }
                | ControlError::UnknownPolicy { .. }
                | ControlError::ReplyTooLarge { .. },
            )
            | Self::Link(_)
            | Self::BadReply(_) => exit::PROTOCOL,
            Self::Io(_) | Self::Os(_) => exit::IO,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLoaded => f.write_str(
                "ackvisor is not loaded (no device \\\\.\\Ackvisor); start it with `sc.exe start ackvisor`",
            ),
            Self::AccessDenied => f.write_str(
                "access denied to \\\\.\\Ackvisor; run ackctl from an elevated (administrator) prompt",
            ),
            Self::VersionMismatch { client, hypervisor } => write!(
                f,
                "protocol version mismatch: ackctl speaks version {client}, the hypervisor {hypervisor}; use the ackctl built with this driver"
            ),
            Self::Refused(e) => write!(f, "the hypervisor refused the request: {e}"),
            Self::BadMachine => f.write_str("--machine must be HOST:PORT (e.g. localhost:5555)"),
            Self::Unreachable { addr, kind } => {
                f.write_str("test machine not reachable")?;
                if let Some(a) = addr {
                    write!(f, " at {a}")?;
                }
                write!(
                    f,
                    " ({kind}); is Bochs running with `com1: mode=socket-server` on that port?"
                )
            }
            Self::Timeout { attempts, each_ms } => write!(
                f,
                "timeout: no reply after {attempts} attempts of {each_ms} ms each; is the test machine's control server running?"
            ),
            Self::Link(e) => write!(f, "broken frames on the serial link: {e}"),
            Self::BadReply(what) => write!(f, "malformed reply from the hypervisor: {what}"),
            Self::NoDevice => f.write_str(
                "no ackvisor device on this OS; use --machine HOST:PORT to reach the test machine",
            ),
            Self::Io(kind) => write!(f, "I/O error: {kind}"),
            Self::Os(code) => write!(f, "Windows error {code} from \\\\.\\Ackvisor"),
        }
    }
}

impl std::error::Error for ClientError {}

#[cfg(test)]
mod tests {
    use super::*;
    use ackvisor_vmm::control::CoreFailure;

    #[test]
    fn each_failure_class_has_its_own_exit_code() {
        let cases = [
            (ClientError::NotLoaded, exit::NOT_LOADED),
            (ClientError::AccessDenied, exit::ACCESS_DENIED),
            (
                ClientError::VersionMismatch {
                    client: 1,
                    hypervisor: 2,
                },
                exit::VERSION_MISMATCH,
            ),
            (
                ClientError::Refused(ControlError::VersionMismatch {
                    supported: 2,
                    got: 1,
                }),
                exit::VERSION_MISMATCH,
            ),
            (
                ClientError::Unreachable {
                    addr: None,
                    kind: io::ErrorKind::ConnectionRefused,
                },
                exit::UNREACHABLE,
            ),
            (
                ClientError::Timeout {
                    attempts: 3,
                    each_ms: 100,
                },
                exit::TIMEOUT,
            ),
            (
                ClientError::Refused(ControlError::NotVirtualized),
                exit::NOT_VIRTUALIZED,
            ),
            (
                ClientError::Refused(ControlError::SetModeFailed {
                    cpu: 1,
                    reason: CoreFailure {
                        kind: 11,
                        detail: 0,
                    },
                }),
                exit::MODE_FAILED,
            ),
            (
                ClientError::Refused(ControlError::UnknownMode { mode: 9 }),
                exit::PROTOCOL,
            ),
            (ClientError::BadReply("x"), exit::PROTOCOL),
            (ClientError::Io(io::ErrorKind::BrokenPipe), exit::IO),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e:?}");
            assert_ne!(e.exit_code(), exit::OK);
            assert_ne!(e.exit_code(), exit::USAGE);
        }
    }

    #[test]
    fn messages_say_what_to_do() {
        assert!(
            ClientError::NotLoaded
                .to_string()
                .contains("sc.exe start ackvisor")
        );
        assert!(ClientError::AccessDenied.to_string().contains("elevated"));
        let addr: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let e = ClientError::Unreachable {
            addr: Some(addr),
            kind: io::ErrorKind::ConnectionRefused,
        };
        assert!(e.to_string().contains("127.0.0.1:5555"), "{e}");
        let e = ClientError::VersionMismatch {
            client: 1,
            hypervisor: 2,
        };
        assert!(e.to_string().contains("version 1") && e.to_string().contains("2"));
    }
}
