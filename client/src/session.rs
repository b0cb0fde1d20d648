//! Typed requests over a [`Transport`]: builds inputs with `control::Request`, answers the size
//! query of variable-length replies, checks every reply's version and size, decodes the structs.

use ackvisor_vmm::Mode;
use ackvisor_vmm::control::wire::{
    self, CpuModeEntry, CpuStats, Field, PROTOCOL_VERSION, PolicyReply, ReplyHeader,
    ResetStatsReply, SetModeReply, SetPolicyReply, StatsReply, StatusReply,
};
use ackvisor_vmm::control::{ControlError, Request};
use ackvisor_vmm::hypervisor::Features;
use ackvisor_vmm::intr::vector_policy::VectorPolicy;

use crate::ClientError;
use crate::transport::Transport;

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The hypervisor's protocol version (equal to this client's, or the call failed).
    pub protocol_version: u32,
    /// Its build version `(major, minor, patch)`.
    pub build_version: (u32, u32, u32),
    /// CPUs the platform reports.
    pub cpu_count: u32,
    /// CPUs virtualized.
    pub virtualized_count: u32,
    /// VMX features, once probed.
    pub features: Option<Features>,
    /// Raw feature bits (for names this client does not know).
    pub feature_bits: u32,
    /// Memory per virtualized CPU.
    pub bytes_per_cpu: u64,
    /// `(cpu, mode)`; `None` = not virtualized, `Err(raw)` = a mode this client does not know.
    pub modes: Vec<(u32, Option<Result<Mode, u32>>)>,
}

/// One statistics sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsSample {
    /// CPUs the platform reports.
    pub cpu_count: u32,
    /// CPUs virtualized when read.
    pub virtualized_count: u32,
    /// Sum over CPUs.
    pub aggregate: CpuStats,
    /// One per CPU, when asked.
    pub per_cpu: Vec<CpuStats>,
}

/// A mode value from the wire: `None` for not virtualized.
pub fn decode_mode(raw: u32) -> Option<Result<Mode, u32>> {
    (raw != wire::MODE_NOT_VIRTUALIZED).then(|| Mode::try_from(raw))
}

/// First guess at a reply's size: enough for the status or stats of a 64-CPU machine without
/// per-CPU entries; bigger replies take one more round trip (the size query).
const FIRST_CAPACITY: usize = 8 * 1024;

/// Requests over one transport.
pub struct Session {
    transport: Box<dyn Transport>,
}

impl Session {
    /// Wraps a transport.
    pub fn new(transport: Box<dyn Transport>) -> Self {
        Self { transport }
    }

    /// Sends `request`; if the reply does not fit, asks again once with the size the hypervisor
    /// named. Checks the reply header (version, size) before returning the bytes.
    fn request(&mut self, request: Request, capacity: usize) -> Result<Vec<u8>, ClientError> {
        let (input, len) = request.encode();
        let input = input.get(..len).unwrap_or(&[]);
        let reply = match self.transport.call(request.code(), input, capacity) {
            Err(ClientError::Refused(ControlError::OutputTooSmall { needed, .. }))
                if needed as usize > capacity =>
            {
                self.transport.call(request.code(), input, needed as usize)
            }
            other => other,
        };
        let reply = reply.map_err(|e| match e {
            ClientError::Refused(ControlError::VersionMismatch { supported, .. }) => {
                ClientError::VersionMismatch {
                    client: PROTOCOL_VERSION,
                    hypervisor: supported,
                }
            }
            other => other,
        })?;
        let (header, _) = ReplyHeader::decode_prefix(&reply)
            .ok_or(ClientError::BadReply("reply shorter than its header"))?;
        if header.version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch {
                client: PROTOCOL_VERSION,
                hypervisor: header.version,
            });
        }
        if header.size as usize != reply.len() {
            return Err(ClientError::BadReply("reply size differs from its header"));
        }
        Ok(reply)
    }

    /// `IOCTL_STATUS`.
    pub fn status(&mut self) -> Result<Status, ClientError> {
        let reply = self.request(Request::Status, FIRST_CAPACITY)?;
        let (r, rest) = StatusReply::decode_prefix(&reply)
            .ok_or(ClientError::BadReply("status reply too short"))?;
        let entries = entries::<CpuModeEntry>(rest, r.cpu_count, r.entry_size)?;
        Ok(Status {
            protocol_version: r.header.version,
            build_version: wire::unpack_version(r.build_version),
            cpu_count: r.cpu_count,
            virtualized_count: r.virtualized_count,
            features: wire::features_from_bits(r.features),
            feature_bits: r.features,
            bytes_per_cpu: r.bytes_per_cpu,
            modes: entries
                .into_iter()
                .map(|e| (e.cpu, decode_mode(e.mode)))
                .collect(),
        })
    }

    /// `IOCTL_SET_MODE`: the number of CPUs that applied `mode`.
    pub fn set_mode(&mut self, mode: Mode) -> Result<u32, ClientError> {
        let reply = self.request(Request::SetMode(mode), SetModeReply::SIZE)?;
        let r = SetModeReply::decode(&reply).ok_or(ClientError::BadReply("set-mode reply size"))?;
        if r.mode != mode as u32 {
            return Err(ClientError::BadReply("set-mode reply names another mode"));
        }
        Ok(r.cpus_applied)
    }

    /// `IOCTL_STATS`.
    pub fn stats(&mut self, per_cpu: bool) -> Result<StatsSample, ClientError> {
        let capacity = StatsReply::SIZE + CpuStats::SIZE;
        let reply = self.request(Request::Stats { per_cpu }, capacity)?;
        let (r, rest) = StatsReply::decode_prefix(&reply)
            .ok_or(ClientError::BadReply("stats reply too short"))?;
        let mut all = entries::<CpuStats>(rest, r.entries, r.entry_size)?.into_iter();
        let aggregate = all
            .next()
            .filter(|a| a.cpu == wire::AGGREGATE_CPU)
            .ok_or(ClientError::BadReply("stats reply without its aggregate"))?;
        Ok(StatsSample {
            cpu_count: r.cpu_count,
            virtualized_count: r.virtualized_count,
            aggregate,
            per_cpu: all.collect(),
        })
    }

    /// `IOCTL_POLICY`: every vector's policy.
    pub fn policy(&mut self) -> Result<PolicyReply, ClientError> {
        let reply = self.request(Request::Policy, PolicyReply::SIZE)?;
        PolicyReply::decode(&reply).ok_or(ClientError::BadReply("policy reply size"))
    }

    /// `IOCTL_SET_POLICY`: the number of CPUs whose table now holds `policy` for `vector`.
    pub fn set_policy(&mut self, vector: u8, policy: VectorPolicy) -> Result<u32, ClientError> {
        let reply = self.request(Request::SetPolicy(vector, policy), SetPolicyReply::SIZE)?;
        let r =
            SetPolicyReply::decode(&reply).ok_or(ClientError::BadReply("set-policy reply size"))?;
        if (r.vector, r.policy) != (u32::from(vector), policy as u32) {
            return Err(ClientError::BadReply(
                "set-policy reply names another vector or policy",
            ));
        }
        Ok(r.cpus_applied)
    }

    /// `IOCTL_RESET_STATS`: the number of CPUs reset.
    pub fn reset_stats(&mut self) -> Result<u32, ClientError> {
        let reply = self.request(Request::ResetStats, ResetStatsReply::SIZE)?;
        ResetStatsReply::decode(&reply)
            .map(|r| r.cpus_reset)
            .ok_or(ClientError::BadReply("reset reply size"))
    }
}

/// Decodes exactly `count` entries of `entry_size` bytes (which must be `T::SIZE`).
fn entries<T: Field>(bytes: &[u8], count: u32, entry_size: u32) -> Result<Vec<T>, ClientError> {
    if entry_size as usize != T::SIZE {
        return Err(ClientError::BadReply(
            "entry size differs from this client's",
        ));
    }
    if (count as usize).checked_mul(T::SIZE) != Some(bytes.len()) {
        return Err(ClientError::BadReply(
            "entry count does not match the reply size",
        ));
    }
    bytes
        .chunks_exact(T::SIZE)
        .map(|c| T::decode(c).ok_or(ClientError::BadReply("entry")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// Replays canned answers and records the capacities asked for.
    struct Canned {
        answers: Vec<Result<Vec<u8>, ClientError>>,
        capacities: Rc<RefCell<Vec<usize>>>,
    }

    impl Transport for Canned {
        fn call(&mut self, _: u32, _: &[u8], capacity: usize) -> Result<Vec<u8>, ClientError> {
            self.capacities.borrow_mut().push(capacity);
            self.answers.remove(0)
        }
    }

    fn session(answers: Vec<Result<Vec<u8>, ClientError>>) -> (Session, Rc<RefCell<Vec<usize>>>) {
        let capacities = Rc::new(RefCell::new(Vec::new()));
        let t = Canned {
            answers,
            capacities: capacities.clone(),
        };
        (Session::new(Box::new(t)), capacities)
    }

    fn set_mode_reply(version: u32, size: u32, mode: u32) -> Vec<u8> {
        let r = SetModeReply {
            header: ReplyHeader { version, size },
            mode,
            cpus_applied: 2,
        };
        let mut b = vec![0u8; SetModeReply::SIZE];
        r.encode(&mut b).unwrap();
        b
    }

    #[test]
    fn a_too_small_buffer_is_retried_once_with_the_size_named() {
        let (mut s, caps) = session(vec![
            Err(ClientError::Refused(ControlError::OutputTooSmall {
                needed: 16,
                got: 8,
            })),
            Ok(set_mode_reply(PROTOCOL_VERSION, 16, Mode::AckReplay as u32)),
        ]);
        // (set_mode asks for the exact size; force the path through the generic request.)
        let reply = s.request(Request::SetMode(Mode::AckReplay), 8).unwrap();
        assert_eq!(reply.len(), 16);
        assert_eq!(*caps.borrow(), [8, 16]);
    }

    #[test]
    fn a_reply_of_another_version_is_a_version_mismatch() {
        let (mut s, _) = session(vec![Ok(set_mode_reply(7, 16, 2))]);
        assert_eq!(
            s.set_mode(Mode::AckReplay),
            Err(ClientError::VersionMismatch {
                client: PROTOCOL_VERSION,
                hypervisor: 7
            })
        );
        let (mut s, _) = session(vec![Err(ClientError::Refused(
            ControlError::VersionMismatch {
                supported: 3,
                got: PROTOCOL_VERSION,
            },
        ))]);
        assert_eq!(
            s.status(),
            Err(ClientError::VersionMismatch {
                client: PROTOCOL_VERSION,
                hypervisor: 3
            })
        );
    }

    #[test]
    fn replies_that_lie_about_their_size_or_mode_are_rejected() {
        let (mut s, _) = session(vec![Ok(set_mode_reply(PROTOCOL_VERSION, 17, 2))]);
        assert!(matches!(
            s.set_mode(Mode::AckReplay),
            Err(ClientError::BadReply(_))
        ));
        let (mut s, _) = session(vec![Ok(set_mode_reply(PROTOCOL_VERSION, 16, 1))]);
        assert!(matches!(
            s.set_mode(Mode::AckReplay),
            Err(ClientError::BadReply(_))
        ));
        let (mut s, _) = session(vec![Ok(vec![1, 0, 0])]);
        assert!(matches!(s.reset_stats(), Err(ClientError::BadReply(_))));
    }

    #[test]
    fn entries_must_match_count_and_size() {
        let bytes = [0u8; 16];
        assert_eq!(entries::<CpuModeEntry>(&bytes, 2, 8).unwrap().len(), 2);
        assert!(entries::<CpuModeEntry>(&bytes, 3, 8).is_err());
        assert!(entries::<CpuModeEntry>(&bytes, 1, 16).is_err());
        assert!(entries::<CpuModeEntry>(&bytes, u32::MAX, 8).is_err());
    }

    #[test]
    fn wire_modes_decode_with_not_virtualized_and_unknown() {
        assert_eq!(decode_mode(wire::MODE_NOT_VIRTUALIZED), None);
        assert_eq!(decode_mode(2), Some(Ok(Mode::AckReplay)));
        assert_eq!(decode_mode(9), Some(Err(9)));
    }
}
