//! The control protocol as bytes: IOCTL codes, the protocol version, the `#[repr(C)]` request
//! and reply structs (integers only; enums travel as `u32`), their little-endian codec, the
//! status codes of [`ControlError`](super::ControlError) and the NTSTATUS convention.
//!
//! Layouts (all little-endian, no padding: each struct's size is asserted against the sum of its
//! fields, so `#[repr(C)]` and the codec agree):
//!
//! | code | input | reply |
//! |---|---|---|
//! | [`IOCTL_STATUS`] | [`StatusRequest`] | [`StatusReply`] + `cpu_count` × [`CpuModeEntry`] |
//! | [`IOCTL_SET_MODE`] | [`SetModeRequest`] | [`SetModeReply`] |
//! | [`IOCTL_STATS`] | [`StatsRequest`] | [`StatsReply`] + `entries` × [`CpuStats`] |
//! | [`IOCTL_RESET_STATS`] | [`ResetStatsRequest`] | [`ResetStatsReply`] |
//! | [`IOCTL_POLICY`] | [`PolicyRequest`] | [`PolicyReply`] |
//! | [`IOCTL_SET_POLICY`] | [`SetPolicyRequest`] | [`SetPolicyReply`] |
//!
//! Every input starts with a [`RequestHeader`], every reply with a [`ReplyHeader`] whose `size`
//! is the whole reply's length. A failed request answers with an [`ErrorReply`] instead.
//!
//! **Runs in:** anywhere (pure).
#![forbid(unsafe_code)]

use super::codec::wire_struct;
pub use super::codec::{Field, Reader, Writer};
use crate::hypervisor::Features;
use crate::stats::{
    ANOMALY_KINDS, COUNTER_GROUPS, Counters, EXIT_REASON_SLOTS, HISTOGRAM_BUCKETS, Snapshot,
};

// ---- IOCTL codes ------------------------------------------------------------------------------

/// `FILE_DEVICE_UNKNOWN` (devioctl.h): third-party devices without a type of their own.
pub const FILE_DEVICE_UNKNOWN: u32 = 0x22;
/// `METHOD_BUFFERED`: the I/O manager copies both buffers, so the driver never touches user memory.
pub const METHOD_BUFFERED: u32 = 0;
/// `FILE_READ_ACCESS`: the caller's handle needs read access (queries).
pub const FILE_READ_ACCESS: u32 = 1;
/// `FILE_WRITE_ACCESS`: the caller's handle needs write access (anything that changes state).
pub const FILE_WRITE_ACCESS: u32 = 2;
/// First function number Microsoft leaves to vendors.
pub const FUNCTION_BASE: u32 = 0x800;

/// `CTL_CODE` of devioctl.h: device type, required access, function number and transfer method.
pub const fn ctl_code(device_type: u32, function: u32, method: u32, access: u32) -> u32 {
    (device_type << 16) | (access << 14) | (function << 2) | method
}

/// Version and status: read-only.
pub const IOCTL_STATUS: u32 = ctl_code(
    FILE_DEVICE_UNKNOWN,
    FUNCTION_BASE,
    METHOD_BUFFERED,
    FILE_READ_ACCESS,
);
/// Set the interrupt mode on every CPU: needs write access.
pub const IOCTL_SET_MODE: u32 = ctl_code(
    FILE_DEVICE_UNKNOWN,
    FUNCTION_BASE + 1,
    METHOD_BUFFERED,
    FILE_WRITE_ACCESS,
);
/// Statistics, aggregate and optionally per CPU: read-only.
pub const IOCTL_STATS: u32 = ctl_code(
    FILE_DEVICE_UNKNOWN,
    FUNCTION_BASE + 2,
    METHOD_BUFFERED,
    FILE_READ_ACCESS,
);
/// Zero every CPU's counters: needs write access.
pub const IOCTL_RESET_STATS: u32 = ctl_code(
    FILE_DEVICE_UNKNOWN,
    FUNCTION_BASE + 3,
    METHOD_BUFFERED,
    FILE_WRITE_ACCESS,
);

/// The per-vector delivery policy table of every CPU: read-only (protocol version 2).
pub const IOCTL_POLICY: u32 = ctl_code(
    FILE_DEVICE_UNKNOWN,
    FUNCTION_BASE + 4,
    METHOD_BUFFERED,
    FILE_READ_ACCESS,
);
/// Set one vector's delivery policy on every CPU: needs write access (protocol version 2).
pub const IOCTL_SET_POLICY: u32 = ctl_code(
    FILE_DEVICE_UNKNOWN,
    FUNCTION_BASE + 5,
    METHOD_BUFFERED,
    FILE_WRITE_ACCESS,
);

/// Version of this protocol. Bump it with any change to a layout, a code or a status below.
/// Version 2 added [`IOCTL_POLICY`], [`IOCTL_SET_POLICY`] and their two statuses.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest request input of this version: a platform may copy the input to a fixed buffer of this
/// size first (NT's METHOD_BUFFERED hands input and output in one shared buffer).
pub const MAX_REQUEST_BYTES: usize = 16;

// ---- build version ------------------------------------------------------------------------------

const fn parse_decimal(s: &str) -> u32 {
    let mut bytes = s.as_bytes();
    let mut value: u32 = 0;
    while let [b, rest @ ..] = bytes {
        if b.is_ascii_digit() {
            value = value.saturating_mul(10).saturating_add((*b - b'0') as u32);
        }
        bytes = rest;
    }
    value
}

/// This build's version packed as `major << 24 | minor << 16 | patch` (patch in 16 bits).
pub const BUILD_VERSION: u32 = pack_version(
    parse_decimal(env!("CARGO_PKG_VERSION_MAJOR")),
    parse_decimal(env!("CARGO_PKG_VERSION_MINOR")),
    parse_decimal(env!("CARGO_PKG_VERSION_PATCH")),
);

/// Packs a semantic version the way [`BUILD_VERSION`] is packed (each part truncated to its width).
pub const fn pack_version(major: u32, minor: u32, patch: u32) -> u32 {
    ((major & 0xFF) << 24) | ((minor & 0xFF) << 16) | (patch & 0xFFFF)
}

/// Splits a packed build version into `(major, minor, patch)`.
pub const fn unpack_version(v: u32) -> (u32, u32, u32) {
    (v >> 24, (v >> 16) & 0xFF, v & 0xFFFF)
}

// ---- modes and features -------------------------------------------------------------------------

/// A CPU's mode field when that CPU is not virtualized (modes are `Mode as u32` otherwise).
pub const MODE_NOT_VIRTUALIZED: u32 = u32::MAX;
/// The aggregate entry's mode when the virtualized CPUs disagree (a mode change in flight).
pub const MODE_MIXED: u32 = u32::MAX - 1;
/// The `cpu` field of the aggregate [`CpuStats`] entry.
pub const AGGREGATE_CPU: u32 = u32::MAX;

/// [`StatsRequest::flags`]: append one [`CpuStats`] per CPU after the aggregate.
pub const STATS_PER_CPU: u32 = 1 << 0;
/// Every flag this version knows; other bits are rejected.
pub const STATS_KNOWN_FLAGS: u32 = STATS_PER_CPU;

/// [`StatusReply::features`]: set when a CPU was probed, so an all-zero set means "none" and not
/// "not known yet".
pub const FEATURE_PROBED: u32 = 1 << 31;

/// Bits of [`StatusReply::features`] and the names clients print, in bit order.
pub const FEATURE_NAMES: [(u32, &str); 13] = [
    (1 << 0, "true-controls"),
    (1 << 1, "external-interrupt-exiting"),
    (1 << 2, "ack-on-exit"),
    (1 << 3, "preemption-timer"),
    (1 << 4, "monitor-trap-flag"),
    (1 << 5, "secondary-controls"),
    (1 << 6, "rdtscp"),
    (1 << 7, "invpcid"),
    (1 << 8, "xsaves"),
    (1 << 9, "user-wait-pause"),
    (1 << 10, "ept"),
    (1 << 11, "vpid"),
    (1 << 12, "outer-hypervisor"),
];

/// The features as they travel: one bit per [`Features`] field in [`FEATURE_NAMES`] order, plus
/// [`FEATURE_PROBED`] when known.
pub fn features_to_bits(features: Option<Features>) -> u32 {
    let Some(f) = features else { return 0 };
    let flags = [
        f.true_controls,
        f.external_interrupt_exiting,
        f.ack_on_exit,
        f.preemption_timer,
        f.monitor_trap_flag,
        f.secondary_controls,
        f.rdtscp,
        f.invpcid,
        f.xsaves,
        f.user_wait_pause,
        f.ept,
        f.vpid,
        f.outer_hypervisor,
    ];
    flags
        .iter()
        .zip(FEATURE_NAMES)
        .filter(|(on, _)| **on)
        .fold(FEATURE_PROBED, |bits, (_, (bit, _))| bits | bit)
}

/// The inverse of [`features_to_bits`]: `None` when no CPU was probed. Unknown bits are ignored
/// (a newer hypervisor may report features this client has no field for).
pub fn features_from_bits(bits: u32) -> Option<Features> {
    if bits & FEATURE_PROBED == 0 {
        return None;
    }
    let on = |i: usize| FEATURE_NAMES.get(i).is_some_and(|(bit, _)| bits & bit != 0);
    Some(Features {
        true_controls: on(0),
        external_interrupt_exiting: on(1),
        ack_on_exit: on(2),
        preemption_timer: on(3),
        monitor_trap_flag: on(4),
        secondary_controls: on(5),
        rdtscp: on(6),
        invpcid: on(7),
        xsaves: on(8),
        user_wait_pause: on(9),
        ept: on(10),
        vpid: on(11),
        outer_hypervisor: on(12),
    })
}

// ---- status codes and the NT convention ------------------------------------------------------

/// Stable numeric statuses: one per [`ControlError`](super::ControlError) variant, 0 = success.
/// Never renumber; add new ones at the end and bump [`PROTOCOL_VERSION`].
pub mod status {
    /// The request succeeded.
    pub const OK: u32 = 0;
    /// The input is not the size the request's struct has.
    pub const WRONG_INPUT_SIZE: u32 = 1;
    /// The output buffer cannot hold the reply; `arg0` carries the size needed.
    pub const OUTPUT_TOO_SMALL: u32 = 2;
    /// No such IOCTL code.
    pub const UNKNOWN_CODE: u32 = 3;
    /// The request header names another protocol version.
    pub const VERSION_MISMATCH: u32 = 4;
    /// A reserved field is not zero.
    pub const RESERVED_NOT_ZERO: u32 = 5;
    /// The mode value names no mode.
    pub const UNKNOWN_MODE: u32 = 6;
    /// Flags this version does not know.
    pub const UNKNOWN_FLAGS: u32 = 7;
    /// No CPU is virtualized.
    pub const NOT_VIRTUALIZED: u32 = 8;
    /// A CPU did not apply the new mode.
    pub const SET_MODE_FAILED: u32 = 9;
    /// The reply would exceed what a `u32` size can describe.
    pub const REPLY_TOO_LARGE: u32 = 10;
    /// The policy value names no policy (version 2).
    pub const UNKNOWN_POLICY: u32 = 11;
    /// The vector takes no policy: below 0x30 or past 0xFF (version 2).
    pub const VECTOR_NOT_CONFIGURABLE: u32 = 12;
}

/// Customer-defined NTSTATUS facility of ackvisor (bits 27:16; the customer bit is 29).
pub const NT_FACILITY: u32 = 0x0AC;

/// NTSTATUS for a failed request whose [`ErrorReply`] is in the output buffer: *warning* severity,
/// because METHOD_BUFFERED copies the buffer back for warnings (not for errors), and the customer
/// bit, which `RtlNtStatusToDosError` passes through unchanged, so `GetLastError` returns it.
/// `IoStatus.Information` = [`ErrorReply::SIZE`].
pub const fn nt_warning(status: u32) -> u32 {
    0xA000_0000 | (NT_FACILITY << 16) | (status & 0xFFFF)
}

/// NTSTATUS for a failed request when the output buffer is too small for an [`ErrorReply`]:
/// *error* severity, no data (`IoStatus.Information` = 0).
pub const fn nt_error(status: u32) -> u32 {
    0xE000_0000 | (NT_FACILITY << 16) | (status & 0xFFFF)
}

/// The protocol status carried by a Win32 error code that is one of [`nt_warning`] or
/// [`nt_error`], `None` for any other error.
pub const fn status_from_win32(code: u32) -> Option<u32> {
    let top = code & 0xFFFF_0000;
    if top == nt_warning(0) || top == nt_error(0) {
        Some(code & 0xFFFF)
    } else {
        None
    }
}

// ---- structs ----------------------------------------------------------------------------------

wire_struct! {
    /// First 8 bytes of every request.
    pub struct RequestHeader {
        /// [`PROTOCOL_VERSION`] of the sender.
        pub version: u32,
        /// Must be 0 (room for flags of a later version).
        pub reserved: u32,
    }
}

impl RequestHeader {
    /// The header this version sends.
    pub const CURRENT: Self = Self {
        version: PROTOCOL_VERSION,
        reserved: 0,
    };
}

wire_struct! {
    /// First 8 bytes of every successful reply.
    pub struct ReplyHeader {
        /// [`PROTOCOL_VERSION`] of the responder.
        pub version: u32,
        /// Length of the whole reply in bytes, header and trailing entries included.
        pub size: u32,
    }
}

wire_struct! {
    /// Input of [`IOCTL_STATUS`].
    pub struct StatusRequest {
        /// Version header.
        pub header: RequestHeader,
    }
}

wire_struct! {
    /// Reply of [`IOCTL_STATUS`]; `cpu_count` [`CpuModeEntry`]s follow.
    pub struct StatusReply {
        /// Version and total size.
        pub header: ReplyHeader,
        /// [`BUILD_VERSION`] of the hypervisor.
        pub build_version: u32,
        /// CPUs the platform reports.
        pub cpu_count: u32,
        /// CPUs virtualized now.
        pub virtualized_count: u32,
        /// [`features_to_bits`].
        pub features: u32,
        /// Bytes of memory one virtualized CPU holds.
        pub bytes_per_cpu: u64,
        /// Size of one trailing entry ([`CpuModeEntry::SIZE`]), so a client can check it.
        pub entry_size: u32,
        /// Zero.
        pub reserved: u32,
    }
}

wire_struct! {
    /// One CPU's mode in a [`StatusReply`].
    pub struct CpuModeEntry {
        /// Platform CPU index.
        pub cpu: u32,
        /// `Mode as u32`, or [`MODE_NOT_VIRTUALIZED`].
        pub mode: u32,
    }
}

wire_struct! {
    /// Input of [`IOCTL_SET_MODE`].
    pub struct SetModeRequest {
        /// Version header.
        pub header: RequestHeader,
        /// `Mode as u32`.
        pub mode: u32,
        /// Must be 0.
        pub reserved: u32,
    }
}

wire_struct! {
    /// Reply of [`IOCTL_SET_MODE`], sent once every virtualized CPU has applied the mode.
    pub struct SetModeReply {
        /// Version and total size.
        pub header: ReplyHeader,
        /// The mode now in force (`Mode as u32`).
        pub mode: u32,
        /// CPUs that applied it.
        pub cpus_applied: u32,
    }
}

wire_struct! {
    /// Input of [`IOCTL_STATS`].
    pub struct StatsRequest {
        /// Version header.
        pub header: RequestHeader,
        /// [`STATS_PER_CPU`] or 0.
        pub flags: u32,
        /// Must be 0.
        pub reserved: u32,
    }
}

wire_struct! {
    /// Reply of [`IOCTL_STATS`]; `entries` [`CpuStats`] follow: the aggregate first
    /// (`cpu` = [`AGGREGATE_CPU`]), then one per CPU in index order if [`STATS_PER_CPU`] was asked.
    pub struct StatsReply {
        /// Version and total size.
        pub header: ReplyHeader,
        /// CPUs the platform reports.
        pub cpu_count: u32,
        /// CPUs virtualized when the counters were read.
        pub virtualized_count: u32,
        /// Number of [`CpuStats`] that follow.
        pub entries: u32,
        /// [`CpuStats::SIZE`], so a client can check it.
        pub entry_size: u32,
    }
}

wire_struct! {
    /// One CPU's counters (or the sum over CPUs), field for field a [`Snapshot`].
    pub struct CpuStats {
        /// Platform CPU index, or [`AGGREGATE_CPU`].
        pub cpu: u32,
        /// `Mode as u32`, [`MODE_NOT_VIRTUALIZED`] or (aggregate only) [`MODE_MIXED`].
        pub mode: u32,
        /// Exits by basic reason (the last slot holds every higher reason).
        pub exits: [u64; EXIT_REASON_SLOTS],
        /// External-interrupt exits by vector.
        pub extint_by_vector: [u64; 256],
        /// Replays by vector.
        pub replays_by_vector: [u64; 256],
        /// Injections by vector.
        pub injections_by_vector: [u64; 256],
        /// Deferrals into the pending set.
        pub deferrals: u64,
        /// Root-mode interrupt windows (exit-sti).
        pub sti_windows: u64,
        /// Vectors exit-sti let the guest take itself.
        pub guest_takes: u64,
        /// Anomalies by `stats::Anomaly`.
        pub anomalies: [u64; ANOMALY_KINDS],
        /// External-interrupt exits timed.
        pub cycles_count: u64,
        /// Sum of their root-mode TSC cycles.
        pub cycles_sum: u64,
        /// Largest one (the aggregate holds the maximum over CPUs).
        pub cycles_max: u64,
        /// Part of `cycles_sum` spent inside replayed handlers (the OS's code, not ours).
        pub handler_cycles_sum: u64,
        /// Power-of-two histogram of the same.
        pub histogram: [u64; HISTOGRAM_BUCKETS],
    }
}

// The counters' table sizes come from `stats`: changing one of them changes this layout, which
// must come with a new PROTOCOL_VERSION. This pins the size protocol versions 1 and 2 have.
const _: () = assert!(
    CpuStats::SIZE == 7144,
    "CpuStats layout changed: bump PROTOCOL_VERSION"
);

impl CpuStats {
    /// The counters as a [`Snapshot`].
    // Inline: compiled only into crates that call it. Its frame holds a 7 KiB value, over the
    // 4 KiB a kernel frame may have; an unused copy in the core's object files would still have
    // to link in the driver (lld-link resolves every symbol of an object it pulls in).
    #[inline]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            exits: self.exits,
            extint_by_vector: self.extint_by_vector,
            replays_by_vector: self.replays_by_vector,
            injections_by_vector: self.injections_by_vector,
            deferrals: self.deferrals,
            sti_windows: self.sti_windows,
            guest_takes: self.guest_takes,
            anomalies: self.anomalies,
            cycles_count: self.cycles_count,
            cycles_sum: self.cycles_sum,
            cycles_max: self.cycles_max,
            handler_cycles_sum: self.handler_cycles_sum,
            histogram: self.histogram,
        }
    }
}

/// How one counter group of a [`CpuStats`] combines across CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combine {
    /// Sum (wrapping, as the counters themselves wrap).
    Add,
    /// Maximum.
    Max,
}

/// How each counter group ([`Snapshot`] field order, see [`Counters`]) combines across CPUs:
/// everything adds except `cycles_max`.
pub const GROUP_COMBINE: [Combine; COUNTER_GROUPS] = {
    let mut c = [Combine::Add; COUNTER_GROUPS];
    c[CYCLES_MAX_GROUP] = Combine::Max;
    c
};

/// The group of `cycles_max` in [`Snapshot`] field order.
const CYCLES_MAX_GROUP: usize = 10;

/// The counter groups of a [`Snapshot`] in [`CpuStats`] wire order (after `cpu` and `mode`), and
/// how each combines. The order is [`Snapshot::groups`]'s, the one place it is written down.
pub fn counter_groups(s: &Snapshot) -> [(&[u64], Combine); COUNTER_GROUPS] {
    let mut out: [(&[u64], Combine); COUNTER_GROUPS] = [(&[], Combine::Add); COUNTER_GROUPS];
    for ((slot, group), combine) in out.iter_mut().zip(s.groups()).zip(GROUP_COMBINE) {
        *slot = (group, combine);
    }
    out
}

/// Byte offset of the first counter in a [`CpuStats`] (after `cpu` and `mode`).
pub const CPU_STATS_COUNTERS_OFFSET: usize = 8;

/// Encodes a [`CpuStats`] straight from counters: a [`Snapshot`], or a CPU's live
/// [`crate::stats::Stats`] read in place (no 7 KiB temporary on a kernel stack).
pub fn encode_cpu_stats<C: Counters + ?Sized>(
    cpu: u32,
    mode: u32,
    counters: &C,
    out: &mut [u8],
) -> Option<usize> {
    let mut w = Writer::new(out);
    w.u32(cpu);
    w.u32(mode);
    counters.each(&mut |_, v| w.u64(v));
    w.finish()
}

/// Adds `counters` into an encoded [`CpuStats`] in place (sum, or max for `cycles_max`), so the
/// aggregate needs no second snapshot in memory. `None` if `entry` is not [`CpuStats::SIZE`].
pub fn accumulate_cpu_stats<C: Counters + ?Sized>(entry: &mut [u8], counters: &C) -> Option<()> {
    if entry.len() != CpuStats::SIZE {
        return None;
    }
    let mut slots = entry
        .get_mut(CPU_STATS_COUNTERS_OFFSET..)?
        .chunks_exact_mut(8);
    let mut fits = true;
    counters.each(&mut |group, v| {
        let Some(slot) = slots.next() else {
            fits = false;
            return;
        };
        let Ok(bytes) = <[u8; 8]>::try_from(&*slot) else {
            fits = false;
            return;
        };
        let old = u64::from_le_bytes(bytes);
        let new = match GROUP_COMBINE.get(group) {
            Some(Combine::Max) => old.max(v),
            _ => old.wrapping_add(v),
        };
        slot.copy_from_slice(&new.to_le_bytes());
    });
    fits.then_some(())
}

wire_struct! {
    /// Input of [`IOCTL_RESET_STATS`].
    pub struct ResetStatsRequest {
        /// Version header.
        pub header: RequestHeader,
    }
}

wire_struct! {
    /// Reply of [`IOCTL_RESET_STATS`].
    pub struct ResetStatsReply {
        /// Version and total size.
        pub header: ReplyHeader,
        /// CPUs whose counters were zeroed.
        pub cpus_reset: u32,
        /// Zero.
        pub reserved: u32,
    }
}

/// A [`PolicyReply::policies`] entry when the virtualized CPUs disagree (a change in flight, or
/// a CPU virtualized since with its platform's defaults).
pub const POLICY_MIXED: u32 = u32::MAX - 1;
/// Number of entries in [`PolicyReply::policies`]: one per vector.
pub const POLICY_ENTRIES: usize = 256;

wire_struct! {
    /// Input of [`IOCTL_POLICY`].
    pub struct PolicyRequest {
        /// Version header.
        pub header: RequestHeader,
    }
}

wire_struct! {
    /// Reply of [`IOCTL_POLICY`]: the policy of every vector, the same on every virtualized CPU
    /// unless an entry says [`POLICY_MIXED`].
    pub struct PolicyReply {
        /// Version and total size.
        pub header: ReplyHeader,
        /// CPUs virtualized when the tables were read.
        pub virtualized_count: u32,
        /// Lowest vector a policy applies to; lower vectors are always injected or exceptions.
        pub first_configurable: u32,
        /// By vector: `VectorPolicy as u32`, or [`POLICY_MIXED`].
        pub policies: [u32; POLICY_ENTRIES],
    }
}

wire_struct! {
    /// Input of [`IOCTL_SET_POLICY`].
    pub struct SetPolicyRequest {
        /// Version header.
        pub header: RequestHeader,
        /// The vector, `first_configurable..=0xFF`.
        pub vector: u32,
        /// `VectorPolicy as u32`.
        pub policy: u32,
    }
}

wire_struct! {
    /// Reply of [`IOCTL_SET_POLICY`], sent once every virtualized CPU's table holds the policy.
    pub struct SetPolicyReply {
        /// Version and total size.
        pub header: ReplyHeader,
        /// The vector.
        pub vector: u32,
        /// The policy now in force (`VectorPolicy as u32`).
        pub policy: u32,
        /// CPUs whose table was set.
        pub cpus_applied: u32,
        /// Zero.
        pub reserved: u32,
    }
}

// Protocol version 2's layouts.
const _: () = assert!(PolicyRequest::SIZE == 8);
const _: () = assert!(PolicyReply::SIZE == 16 + 4 * POLICY_ENTRIES);
const _: () = assert!(SetPolicyRequest::SIZE == 16);
const _: () = assert!(SetPolicyReply::SIZE == 24);

/// [`ErrorReply::magic`]: tells an error reply from a short success reply.
pub const ERROR_MAGIC: u32 = u32::from_le_bytes(*b"AkEr");

wire_struct! {
    /// What a failed request answers: a status from [`status`] and its arguments (meaning per
    /// status, see [`ControlError`](super::ControlError)'s `to_reply`).
    pub struct ErrorReply {
        /// [`ERROR_MAGIC`].
        pub magic: u32,
        /// One of [`status`], never [`status::OK`].
        pub status: u32,
        /// First argument (e.g. the size needed).
        pub arg0: u32,
        /// Second argument (e.g. the size given).
        pub arg1: u32,
        /// Third argument (e.g. a VM-instruction error).
        pub arg2: u32,
        /// Zero.
        pub reserved: u32,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn ioctl_codes_match_ctl_code_of_devioctl_h() {
        // Values computed by hand from CTL_CODE(0x22, fn, METHOD_BUFFERED, access).
        assert_eq!(IOCTL_STATUS, 0x0022_6000);
        assert_eq!(IOCTL_SET_MODE, 0x0022_A004);
        assert_eq!(IOCTL_STATS, 0x0022_6008);
        assert_eq!(IOCTL_RESET_STATS, 0x0022_A00C);
        assert_eq!(IOCTL_POLICY, 0x0022_6010);
        assert_eq!(IOCTL_SET_POLICY, 0x0022_A014);
        // Access bits: queries need read, changes need write.
        for (code, access) in [
            (IOCTL_STATUS, FILE_READ_ACCESS),
            (IOCTL_STATS, FILE_READ_ACCESS),
            (IOCTL_SET_MODE, FILE_WRITE_ACCESS),
            (IOCTL_RESET_STATS, FILE_WRITE_ACCESS),
            (IOCTL_POLICY, FILE_READ_ACCESS),
            (IOCTL_SET_POLICY, FILE_WRITE_ACCESS),
        ] {
            assert_eq!((code >> 14) & 3, access);
            assert_eq!(code & 3, METHOD_BUFFERED);
            assert_eq!(code >> 16, FILE_DEVICE_UNKNOWN);
        }
    }

    #[test]
    fn struct_sizes_are_what_the_protocol_documents() {
        assert_eq!(RequestHeader::SIZE, 8);
        assert_eq!(ReplyHeader::SIZE, 8);
        assert_eq!(StatusRequest::SIZE, 8);
        assert_eq!(StatusReply::SIZE, 40);
        assert_eq!(CpuModeEntry::SIZE, 8);
        assert_eq!(SetModeRequest::SIZE, 16);
        assert_eq!(SetModeReply::SIZE, 16);
        assert_eq!(StatsRequest::SIZE, 16);
        assert_eq!(StatsReply::SIZE, 24);
        assert_eq!(ResetStatsRequest::SIZE, 8);
        assert_eq!(ResetStatsReply::SIZE, 16);
        assert_eq!(ErrorReply::SIZE, 24);
        assert_eq!(PolicyRequest::SIZE, 8);
        assert_eq!(PolicyReply::SIZE, 1040);
        assert_eq!(SetPolicyRequest::SIZE, 16);
        assert_eq!(SetPolicyReply::SIZE, 24);
        let largest = [
            StatusRequest::SIZE,
            SetModeRequest::SIZE,
            StatsRequest::SIZE,
            ResetStatsRequest::SIZE,
            PolicyRequest::SIZE,
            SetPolicyRequest::SIZE,
        ];
        assert_eq!(largest.into_iter().max(), Some(MAX_REQUEST_BYTES));
    }

    #[test]
    fn encoding_is_little_endian_in_field_order() {
        let r = SetModeRequest {
            header: RequestHeader::CURRENT,
            mode: 0x0102_0304,
            reserved: 0,
        };
        let mut b = [0u8; 16];
        assert_eq!(r.encode(&mut b), Some(16));
        assert_eq!(b, [2, 0, 0, 0, 0, 0, 0, 0, 4, 3, 2, 1, 0, 0, 0, 0]);
        assert_eq!(SetModeRequest::decode(&b), Some(r));
    }

    #[test]
    fn decode_rejects_wrong_lengths_and_encode_short_buffers() {
        let b = [0u8; 17];
        assert_eq!(SetModeRequest::decode(&b), None);
        assert_eq!(SetModeRequest::decode(&b[..15]), None);
        assert!(SetModeRequest::decode(&b[..16]).is_some());
        let mut short = [0u8; 15];
        assert_eq!(RequestHeader::CURRENT.encode(&mut short[..7]), None);
        let (h, rest) = RequestHeader::decode_prefix(&b).unwrap();
        assert_eq!((h.version, rest.len()), (0, 9));
    }

    #[test]
    fn cpu_stats_round_trip_through_snapshot_and_accumulate() {
        let mut s = Snapshot::zero();
        s.exits[1] = 5;
        s.extint_by_vector[0xd1] = 7;
        s.replays_by_vector[0x40] = 3;
        s.injections_by_vector[0x2f] = 2;
        s.deferrals = 11;
        s.sti_windows = 12;
        s.guest_takes = 13;
        s.anomalies[2] = 1;
        s.cycles_count = 4;
        s.cycles_sum = 400;
        s.cycles_max = 300;
        s.handler_cycles_sum = 250;
        s.histogram[8] = 4;
        let mut buf = std::vec![0u8; CpuStats::SIZE];
        assert_eq!(encode_cpu_stats(3, 2, &s, &mut buf), Some(CpuStats::SIZE));
        let decoded = CpuStats::decode(&buf).unwrap();
        assert_eq!((decoded.cpu, decoded.mode), (3, 2));
        assert_eq!(decoded.snapshot(), s);

        let mut other = Snapshot::zero();
        other.extint_by_vector[0xd1] = 1;
        other.cycles_max = 900;
        other.cycles_sum = 900;
        accumulate_cpu_stats(&mut buf, &other).unwrap();
        let sum = CpuStats::decode(&buf).unwrap().snapshot();
        let mut expected = s.clone();
        expected.merge(&other);
        assert_eq!(sum, expected);
        assert_eq!(accumulate_cpu_stats(&mut buf[1..], &other), None);
    }

    #[test]
    fn feature_bits_round_trip_one_field_at_a_time() {
        assert_eq!(features_to_bits(None), 0);
        assert_eq!(features_from_bits(0), None);
        let none = Features::default();
        assert_eq!(features_to_bits(Some(none)), FEATURE_PROBED);
        assert_eq!(features_from_bits(FEATURE_PROBED), Some(none));
        for (bit, name) in FEATURE_NAMES {
            let f = features_from_bits(FEATURE_PROBED | bit).unwrap();
            assert_ne!(f, none, "{name} maps to no field");
            assert_eq!(features_to_bits(Some(f)), FEATURE_PROBED | bit, "{name}");
        }
        let all = FEATURE_NAMES.iter().fold(FEATURE_PROBED, |a, (b, _)| a | b);
        assert_eq!(features_to_bits(features_from_bits(all)), all);
    }

    #[test]
    fn nt_statuses_carry_the_protocol_status_both_ways() {
        assert_eq!(nt_warning(status::OUTPUT_TOO_SMALL), 0xA0AC_0002);
        assert_eq!(nt_error(status::UNKNOWN_CODE), 0xE0AC_0003);
        assert_eq!(status_from_win32(nt_warning(9)), Some(9));
        assert_eq!(status_from_win32(nt_error(1)), Some(1));
        assert_eq!(status_from_win32(5), None);
        assert_eq!(status_from_win32(0xC000_0022), None);
    }

    #[test]
    fn build_version_packs_the_crate_version() {
        let (major, minor, patch) = unpack_version(BUILD_VERSION);
        let text = std::format!("{major}.{minor}.{patch}");
        assert_eq!(text, env!("CARGO_PKG_VERSION"));
        assert_eq!(unpack_version(pack_version(1, 2, 300)), (1, 2, 300));
    }
}
