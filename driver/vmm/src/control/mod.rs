//! The control protocol: what `ackctl` may ask the hypervisor, and the one dispatcher every
//! platform routes requests to (NT's IRP_MJ_DEVICE_CONTROL, the test machine's COM1 server).
//!
//! - [`wire`]: IOCTL codes, versioned `#[repr(C)]` structs, their codec, status codes.
//! - [`frame`]: framing over a byte stream (the test machine's serial link).
//! - [`serve`]: one step of a frame server: received bytes in, reply frame out.
//! - [`ControlError`]: every refusal, with the numbers needed to correct it.
//!
//! Every check runs before anything changes: a refused request leaves the hypervisor as it was.
//! Nothing here allocates or panics; lengths come from the request's struct, never from the
//! caller's buffer sizes alone.
//!
//! **Runs in:** PASSIVE (the caller's thread; the broadcast in `set_mode_all` waits for CPUs).
#![forbid(unsafe_code)]

mod codec;
mod error;
pub mod frame;
pub mod serve;
pub mod wire;

#[cfg(test)]
mod tests;

pub use error::{ControlError, CoreFailure};

use core::mem::offset_of;

use crate::Error;
use crate::hypervisor::{self, Features};
use crate::intr::Mode;
use crate::intr::policy::Vector;
use crate::intr::vector_policy::{
    FIRST_POLICY_VECTOR, PolicyLookup, PolicyTable, VectorPolicy, configurable,
};
use crate::platform::CpuIndex;
use crate::stats::Counters;
use error::saturate;
use wire::{
    CpuModeEntry, CpuStats, Field, MAX_REQUEST_BYTES, PROTOCOL_VERSION, PolicyReply, PolicyRequest,
    ReplyHeader, RequestHeader, ResetStatsReply, ResetStatsRequest, SetModeReply, SetModeRequest,
    SetPolicyReply, SetPolicyRequest, StatsReply, StatsRequest, StatusReply, StatusRequest,
};

/// What the dispatcher needs from the hypervisor: the core's PASSIVE-level API
/// (`crate::hypervisor`), as a trait so tests and other platforms can stand in for it.
pub trait ControlTarget {
    /// Applies `mode` on every CPU; returns once each has applied it, or the first that failed.
    fn set_mode_all(&self, mode: Mode) -> Result<(), (CpuIndex, Error)>;
    /// One CPU's mode, `None` when it is not virtualized.
    fn cpu_mode(&self, cpu: CpuIndex) -> Option<Mode>;
    /// Calls `f` with one CPU's mode and counters, read in place; `false` (and no call) when it
    /// is not virtualized. Replies are encoded from here one CPU at a time: a whole snapshot
    /// (7 KiB, see [`crate::stats::Counters`]) never sits on the dispatcher's kernel stack.
    fn with_cpu_counters(&self, cpu: CpuIndex, f: &mut dyn FnMut(Mode, &dyn Counters)) -> bool;
    /// Zeroes every CPU's counters.
    fn reset_stats(&self);
    /// CPUs the platform reports.
    fn cpu_count(&self) -> u32;
    /// CPUs virtualized now.
    fn virtualized_count(&self) -> u32;
    /// Bytes of memory one virtualized CPU holds.
    fn bytes_per_cpu(&self) -> usize;
    /// The VMX features found, once a CPU was probed.
    fn features(&self) -> Option<Features>;
    /// Sets `v`'s delivery policy in every virtualized CPU's table; returns how many.
    fn set_policy_all(&self, v: Vector, p: VectorPolicy) -> u32;
    /// One CPU's delivery policy table, `None` when it is not virtualized.
    fn policy(&self, cpu: CpuIndex) -> Option<PolicyTable>;
}

/// The running hypervisor: each method calls its namesake in [`crate::hypervisor`].
pub struct Live;

impl ControlTarget for Live {
    fn set_mode_all(&self, mode: Mode) -> Result<(), (CpuIndex, Error)> {
        hypervisor::set_mode_all(mode)
    }
    fn cpu_mode(&self, cpu: CpuIndex) -> Option<Mode> {
        hypervisor::cpu_mode(cpu)
    }
    fn with_cpu_counters(&self, cpu: CpuIndex, f: &mut dyn FnMut(Mode, &dyn Counters)) -> bool {
        hypervisor::with_cpu_counters(cpu, |mode, stats| f(mode, stats)).is_some()
    }
    fn reset_stats(&self) {
        hypervisor::reset_stats();
    }
    fn cpu_count(&self) -> u32 {
        hypervisor::cpu_count()
    }
    fn virtualized_count(&self) -> u32 {
        hypervisor::virtualized_count()
    }
    fn bytes_per_cpu(&self) -> usize {
        hypervisor::bytes_per_cpu()
    }
    fn features(&self) -> Option<Features> {
        hypervisor::features()
    }
    fn set_policy_all(&self, v: Vector, p: VectorPolicy) -> u32 {
        hypervisor::set_policy_all(v, p)
    }
    fn policy(&self, cpu: CpuIndex) -> Option<PolicyTable> {
        hypervisor::policy(cpu)
    }
}

/// A decoded, validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// [`wire::IOCTL_STATUS`].
    Status,
    /// [`wire::IOCTL_SET_MODE`].
    SetMode(Mode),
    /// [`wire::IOCTL_STATS`].
    Stats {
        /// Append one entry per CPU after the aggregate.
        per_cpu: bool,
    },
    /// [`wire::IOCTL_RESET_STATS`].
    ResetStats,
    /// [`wire::IOCTL_POLICY`].
    Policy,
    /// [`wire::IOCTL_SET_POLICY`]: a vector that takes a policy, and the policy.
    SetPolicy(u8, VectorPolicy),
}

/// Size of the input struct a code takes, `None` for an unknown code.
pub const fn input_size(code: u32) -> Option<usize> {
    match code {
        wire::IOCTL_STATUS => Some(StatusRequest::SIZE),
        wire::IOCTL_SET_MODE => Some(SetModeRequest::SIZE),
        wire::IOCTL_STATS => Some(StatsRequest::SIZE),
        wire::IOCTL_RESET_STATS => Some(ResetStatsRequest::SIZE),
        wire::IOCTL_POLICY => Some(PolicyRequest::SIZE),
        wire::IOCTL_SET_POLICY => Some(SetPolicyRequest::SIZE),
        _ => None,
    }
}

impl Request {
    /// Its IOCTL code.
    pub const fn code(self) -> u32 {
        match self {
            Self::Status => wire::IOCTL_STATUS,
            Self::SetMode(_) => wire::IOCTL_SET_MODE,
            Self::Stats { .. } => wire::IOCTL_STATS,
            Self::ResetStats => wire::IOCTL_RESET_STATS,
            Self::Policy => wire::IOCTL_POLICY,
            Self::SetPolicy(..) => wire::IOCTL_SET_POLICY,
        }
    }

    /// Its input bytes at this protocol version: the buffer and how much of it is used.
    pub fn encode(self) -> ([u8; MAX_REQUEST_BYTES], usize) {
        let header = RequestHeader::CURRENT;
        let mut buf = [0u8; MAX_REQUEST_BYTES];
        let n = match self {
            Self::Status => StatusRequest { header }.encode(&mut buf),
            Self::SetMode(mode) => SetModeRequest {
                header,
                mode: mode as u32,
                reserved: 0,
            }
            .encode(&mut buf),
            Self::Stats { per_cpu } => StatsRequest {
                header,
                flags: if per_cpu { wire::STATS_PER_CPU } else { 0 },
                reserved: 0,
            }
            .encode(&mut buf),
            Self::ResetStats => ResetStatsRequest { header }.encode(&mut buf),
            Self::Policy => PolicyRequest { header }.encode(&mut buf),
            Self::SetPolicy(vector, policy) => SetPolicyRequest {
                header,
                vector: u32::from(vector),
                policy: policy as u32,
            }
            .encode(&mut buf),
        };
        // Every request struct fits MAX_REQUEST_BYTES (asserted in wire's tests).
        (buf, n.unwrap_or(0))
    }

    /// Validates a request: code, version, exact size, reserved fields, values, in that order
    /// (the version before the size, so a client of another version is told that, not a size).
    pub fn parse(code: u32, input: &[u8]) -> Result<Self, ControlError> {
        let expected = input_size(code).ok_or(ControlError::UnknownCode { code })?;
        let size_error = ControlError::WrongInputSize {
            expected: saturate(expected),
            got: saturate(input.len()),
        };
        let (header, _) = RequestHeader::decode_prefix(input).ok_or(size_error)?;
        if header.version != PROTOCOL_VERSION {
            return Err(ControlError::VersionMismatch {
                supported: PROTOCOL_VERSION,
                got: header.version,
            });
        }
        if input.len() != expected {
            return Err(size_error);
        }
        if header.reserved != 0 {
            return Err(reserved_at(offset_of!(RequestHeader, reserved)));
        }
        match code {
            wire::IOCTL_STATUS => Ok(Self::Status),
            wire::IOCTL_RESET_STATS => Ok(Self::ResetStats),
            wire::IOCTL_POLICY => Ok(Self::Policy),
            wire::IOCTL_SET_POLICY => {
                let r = SetPolicyRequest::decode(input).ok_or(size_error)?;
                let vector = u8::try_from(r.vector)
                    .ok()
                    .filter(|v| configurable(Vector(*v)))
                    .ok_or(ControlError::VectorNotConfigurable {
                        vector: r.vector,
                        first: u32::from(FIRST_POLICY_VECTOR),
                    })?;
                let policy = VectorPolicy::try_from(r.policy)
                    .map_err(|policy| ControlError::UnknownPolicy { policy })?;
                Ok(Self::SetPolicy(vector, policy))
            }
            wire::IOCTL_SET_MODE => {
                let r = SetModeRequest::decode(input).ok_or(size_error)?;
                if r.reserved != 0 {
                    return Err(reserved_at(offset_of!(SetModeRequest, reserved)));
                }
                Mode::try_from(r.mode)
                    .map(Self::SetMode)
                    .map_err(|mode| ControlError::UnknownMode { mode })
            }
            wire::IOCTL_STATS => {
                let r = StatsRequest::decode(input).ok_or(size_error)?;
                if r.reserved != 0 {
                    return Err(reserved_at(offset_of!(StatsRequest, reserved)));
                }
                let unknown = r.flags & !wire::STATS_KNOWN_FLAGS;
                if unknown != 0 {
                    return Err(ControlError::UnknownFlags { flags: unknown });
                }
                Ok(Self::Stats {
                    per_cpu: r.flags & wire::STATS_PER_CPU != 0,
                })
            }
            _ => Err(ControlError::UnknownCode { code }),
        }
    }
}

fn reserved_at(offset: usize) -> ControlError {
    ControlError::ReservedNotZero {
        offset: saturate(offset),
    }
}

/// Handles one control request: `code` with `input`, reply into `output`. Returns the reply's
/// length, or why it was refused; a refused request changed nothing (except a
/// [`ControlError::SetModeFailed`] broadcast, which names the CPU that stopped it).
///
/// `input` and `output` must not overlap: a platform with one shared buffer (NT's
/// METHOD_BUFFERED) copies the input first; it is at most [`wire::MAX_REQUEST_BYTES`].
pub fn dispatch(
    target: &dyn ControlTarget,
    code: u32,
    input: &[u8],
    output: &mut [u8],
) -> Result<usize, ControlError> {
    match Request::parse(code, input)? {
        Request::Status => status(target, output),
        Request::SetMode(mode) => set_mode(target, mode, output),
        Request::Stats { per_cpu } => stats(target, per_cpu, output),
        Request::ResetStats => reset_stats(target, output),
        Request::Policy => policy(target, output),
        Request::SetPolicy(v, p) => set_policy(target, v, p, output),
    }
}

/// `fixed + count * entry` as a reply size, refused past `u32::MAX`.
fn reply_size(fixed: usize, count: u32, entry: usize, cpus: u32) -> Result<usize, ControlError> {
    (count as usize)
        .checked_mul(entry)
        .and_then(|n| n.checked_add(fixed))
        .filter(|&n| n <= u32::MAX as usize)
        .ok_or(ControlError::ReplyTooLarge { cpus })
}

/// The first `needed` bytes of `output`, or the size-query answer.
fn reply_buffer(output: &mut [u8], needed: usize) -> Result<&mut [u8], ControlError> {
    let got = saturate(output.len());
    output
        .get_mut(..needed)
        .ok_or(ControlError::OutputTooSmall {
            needed: saturate(needed),
            got,
        })
}

fn header(size: usize) -> ReplyHeader {
    ReplyHeader {
        version: PROTOCOL_VERSION,
        size: saturate(size),
    }
}

/// Encoding into a buffer already checked to be large enough cannot fail; if it ever did, say
/// the buffer was too small rather than panic.
fn encoded(n: Option<usize>, needed: usize, output_len: usize) -> Result<(), ControlError> {
    n.map(|_| ()).ok_or(ControlError::OutputTooSmall {
        needed: saturate(needed),
        got: saturate(output_len),
    })
}

fn mode_of(mode: Option<Mode>) -> u32 {
    mode.map_or(wire::MODE_NOT_VIRTUALIZED, |m| m as u32)
}

fn status(target: &dyn ControlTarget, output: &mut [u8]) -> Result<usize, ControlError> {
    let cpus = target.cpu_count();
    let needed = reply_size(StatusReply::SIZE, cpus, CpuModeEntry::SIZE, cpus)?;
    let len = output.len();
    let out = reply_buffer(output, needed)?;
    let (head, entries) = out.split_at_mut(StatusReply::SIZE);
    let reply = StatusReply {
        header: header(needed),
        build_version: wire::BUILD_VERSION,
        cpu_count: cpus,
        virtualized_count: target.virtualized_count(),
        features: wire::features_to_bits(target.features()),
        bytes_per_cpu: target.bytes_per_cpu() as u64,
        entry_size: saturate(CpuModeEntry::SIZE),
        reserved: 0,
    };
    encoded(reply.encode(head), needed, len)?;
    for (cpu, slot) in (0..cpus).zip(entries.chunks_exact_mut(CpuModeEntry::SIZE)) {
        let entry = CpuModeEntry {
            cpu,
            mode: mode_of(target.cpu_mode(CpuIndex(cpu))),
        };
        encoded(entry.encode(slot), needed, len)?;
    }
    Ok(needed)
}

fn set_mode(
    target: &dyn ControlTarget,
    mode: Mode,
    output: &mut [u8],
) -> Result<usize, ControlError> {
    if target.virtualized_count() == 0 {
        return Err(ControlError::NotVirtualized);
    }
    let needed = SetModeReply::SIZE;
    let len = output.len();
    let out = reply_buffer(output, needed)?;
    target
        .set_mode_all(mode)
        .map_err(|(cpu, e)| ControlError::SetModeFailed {
            cpu: cpu.0,
            reason: CoreFailure::from_error(e),
        })?;
    let reply = SetModeReply {
        header: header(needed),
        mode: mode as u32,
        cpus_applied: target.virtualized_count(),
    };
    encoded(reply.encode(out), needed, len)?;
    Ok(needed)
}

fn reset_stats(target: &dyn ControlTarget, output: &mut [u8]) -> Result<usize, ControlError> {
    if target.virtualized_count() == 0 {
        return Err(ControlError::NotVirtualized);
    }
    let needed = ResetStatsReply::SIZE;
    let len = output.len();
    let out = reply_buffer(output, needed)?;
    target.reset_stats();
    let reply = ResetStatsReply {
        header: header(needed),
        cpus_reset: target.virtualized_count(),
        reserved: 0,
    };
    encoded(reply.encode(out), needed, len)?;
    Ok(needed)
}

fn stats(
    target: &dyn ControlTarget,
    per_cpu: bool,
    output: &mut [u8],
) -> Result<usize, ControlError> {
    if target.virtualized_count() == 0 {
        return Err(ControlError::NotVirtualized);
    }
    let cpus = target.cpu_count();
    let entries = if per_cpu {
        cpus.checked_add(1)
            .ok_or(ControlError::ReplyTooLarge { cpus })?
    } else {
        1
    };
    let needed = reply_size(StatsReply::SIZE, entries, CpuStats::SIZE, cpus)?;
    let len = output.len();
    let out = reply_buffer(output, needed)?;
    let (head, body) = out.split_at_mut(StatsReply::SIZE);
    let (aggregate, per_cpu_entries) = body.split_at_mut(CpuStats::SIZE);
    // The aggregate is summed in place in the reply and every entry is encoded from the live
    // counters, one CPU at a time: no snapshot (7 KiB) is ever on the stack, which is NT's 24 KiB
    // kernel stack here.
    aggregate.fill(0);
    let too_small = ControlError::OutputTooSmall {
        needed: saturate(needed),
        got: saturate(len),
    };
    let mut slots = per_cpu_entries.chunks_exact_mut(CpuStats::SIZE);
    let mut virtualized = 0u32;
    let mut common_mode = wire::MODE_NOT_VIRTUALIZED;
    for cpu in 0..cpus {
        let mut slot = if per_cpu {
            Some(slots.next().ok_or(too_small)?)
        } else {
            None
        };
        let mut written = Some(());
        let present = target.with_cpu_counters(CpuIndex(cpu), &mut |mode, counters| {
            virtualized = virtualized.wrapping_add(1);
            common_mode = match common_mode {
                wire::MODE_NOT_VIRTUALIZED => mode as u32,
                m if m == mode as u32 => m,
                _ => wire::MODE_MIXED,
            };
            written = wire::accumulate_cpu_stats(aggregate, counters)
                .and_then(|()| {
                    slot.as_deref_mut().map_or(Some(0), |slot| {
                        wire::encode_cpu_stats(cpu, mode as u32, counters, slot)
                    })
                })
                .map(|_| ());
        });
        written.ok_or(too_small)?;
        if let (false, Some(slot)) = (present, slot) {
            slot.fill(0);
            encoded(cpu.encode(slot), needed, len)?;
            encoded(
                wire::MODE_NOT_VIRTUALIZED.encode(slot.get_mut(4..).unwrap_or(&mut [])),
                needed,
                len,
            )?;
        }
    }
    encoded(wire::AGGREGATE_CPU.encode(aggregate), needed, len)?;
    encoded(
        common_mode.encode(aggregate.get_mut(4..).unwrap_or(&mut [])),
        needed,
        len,
    )?;
    let reply = StatsReply {
        header: header(needed),
        cpu_count: cpus,
        virtualized_count: virtualized,
        entries,
        entry_size: saturate(CpuStats::SIZE),
    };
    encoded(reply.encode(head), needed, len)?;
    Ok(needed)
}

fn set_policy(
    target: &dyn ControlTarget,
    vector: u8,
    policy: VectorPolicy,
    output: &mut [u8],
) -> Result<usize, ControlError> {
    if target.virtualized_count() == 0 {
        return Err(ControlError::NotVirtualized);
    }
    let needed = SetPolicyReply::SIZE;
    let len = output.len();
    let out = reply_buffer(output, needed)?;
    let applied = target.set_policy_all(Vector(vector), policy);
    let reply = SetPolicyReply {
        header: header(needed),
        vector: u32::from(vector),
        policy: policy as u32,
        cpus_applied: applied,
        reserved: 0,
    };
    encoded(reply.encode(out), needed, len)?;
    Ok(needed)
}

/// The table of every virtualized CPU, entry by entry: one policy, or [`wire::POLICY_MIXED`].
/// Merged in place in the reply, one CPU's table (256 bytes) on the stack at a time: a
/// [`PolicyReply`] value (1 KiB) and its copies would take most of a debug build's 4 KiB frame.
fn policy(target: &dyn ControlTarget, output: &mut [u8]) -> Result<usize, ControlError> {
    if target.virtualized_count() == 0 {
        return Err(ControlError::NotVirtualized);
    }
    let needed = PolicyReply::SIZE;
    let len = output.len();
    let out = reply_buffer(output, needed)?;
    let (head, entries) = out.split_at_mut(offset_of!(PolicyReply, policies));
    // A CPU gone between the count above and its read leaves its entries at `replay`, not at
    // whatever the caller's buffer held.
    entries.fill(0);
    let mut virtualized = 0u32;
    for cpu in 0..target.cpu_count() {
        let Some(table) = target.policy(CpuIndex(cpu)) else {
            continue;
        };
        for (v, slot) in (0..=255u8).zip(entries.chunks_exact_mut(u32::SIZE)) {
            let p = table.policy(Vector(v)) as u32;
            let merged = match u32::decode(slot) {
                Some(old) if virtualized > 0 && old != p => wire::POLICY_MIXED,
                _ => p,
            };
            encoded(merged.encode(slot), needed, len)?;
        }
        virtualized = virtualized.wrapping_add(1);
    }
    let mut w = wire::Writer::new(head);
    header(needed).put(&mut w);
    w.u32(virtualized);
    w.u32(u32::from(FIRST_POLICY_VECTOR));
    encoded(w.finish(), needed, len)?;
    Ok(needed)
}
