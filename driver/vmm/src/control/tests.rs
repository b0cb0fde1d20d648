//! Tests of the dispatcher and the frame server against a mock hypervisor.
extern crate std;

use core::cell::{Cell, RefCell};
use std::vec;
use std::vec::Vec;

use super::frame::{self, Decoded, FrameError, Kind};
use super::serve::{MIN_REPLY_BUFFER, ServeEvent, serve};
use super::wire::*;
use super::*;
use crate::intr::vector_policy::{PolicyTable, VectorPolicy};
use crate::stats::{Counters, Snapshot};

/// A hypervisor stand-in: per-CPU mode (`None` = not virtualized) and counters, an optional CPU
/// that refuses mode changes, and a count of every state-changing call.
struct Mock {
    cpus: u32,
    modes: RefCell<Vec<Option<Mode>>>,
    stats: RefCell<Vec<Snapshot>>,
    fail_at: Option<(u32, Error)>,
    features: Option<Features>,
    policies: RefCell<Vec<PolicyTable>>,
    mutations: Cell<u32>,
}

impl Mock {
    fn new(modes: &[Option<Mode>]) -> Self {
        let stats = (0..modes.len())
            .map(|i| {
                let mut s = Snapshot::zero();
                s.exits[1] = 10 + i as u64;
                s.extint_by_vector[0xd1] = 100 * (i as u64 + 1);
                s.replays_by_vector[0x40] = i as u64;
                s.cycles_max = 1000 * (i as u64 + 1);
                s.cycles_sum = 5;
                s
            })
            .collect();
        Self {
            cpus: modes.len() as u32,
            modes: RefCell::new(modes.to_vec()),
            stats: RefCell::new(stats),
            fail_at: None,
            features: Some(Features {
                true_controls: true,
                ack_on_exit: true,
                external_interrupt_exiting: true,
                ..Features::default()
            }),
            policies: RefCell::new(vec![
                PolicyTable::ALL_REPLAY
                    .with(&[0xd1], VectorPolicy::Auto);
                modes.len()
            ]),
            mutations: Cell::new(0),
        }
    }

    /// Four CPUs, CPU 2 not virtualized, all others in exit-sti.
    fn four() -> Self {
        let m = Some(Mode::ExitSti);
        Self::new(&[m, m, None, m])
    }
}

impl ControlTarget for Mock {
    fn set_mode_all(&self, mode: Mode) -> Result<(), (CpuIndex, Error)> {
        self.mutations.set(self.mutations.get() + 1);
        for (cpu, slot) in self.modes.borrow_mut().iter_mut().enumerate() {
            if let Some((bad, e)) = self.fail_at
                && bad == cpu as u32
            {
                return Err((CpuIndex(bad), e));
            }
            if slot.is_some() {
                *slot = Some(mode);
            }
        }
        Ok(())
    }
    fn cpu_mode(&self, cpu: CpuIndex) -> Option<Mode> {
        *self.modes.borrow().get(cpu.0 as usize)?
    }
    fn with_cpu_counters(&self, cpu: CpuIndex, f: &mut dyn FnMut(Mode, &dyn Counters)) -> bool {
        let Some(mode) = self.cpu_mode(cpu) else {
            return false;
        };
        let stats = self.stats.borrow();
        let Some(s) = stats.get(cpu.0 as usize) else {
            return false;
        };
        f(mode, s);
        true
    }
    fn reset_stats(&self) {
        self.mutations.set(self.mutations.get() + 1);
        for s in self.stats.borrow_mut().iter_mut() {
            *s = Snapshot::zero();
        }
    }
    fn cpu_count(&self) -> u32 {
        self.cpus
    }
    fn virtualized_count(&self) -> u32 {
        self.modes.borrow().iter().filter(|m| m.is_some()).count() as u32
    }
    fn bytes_per_cpu(&self) -> usize {
        40960
    }
    fn features(&self) -> Option<Features> {
        self.features
    }
    fn set_policy_all(&self, v: crate::intr::policy::Vector, p: VectorPolicy) -> u32 {
        self.mutations.set(self.mutations.get() + 1);
        let mut applied = 0;
        for (table, mode) in self
            .policies
            .borrow_mut()
            .iter_mut()
            .zip(self.modes.borrow().iter())
        {
            if mode.is_some() {
                table.set(v, p);
                applied += 1;
            }
        }
        applied
    }
    fn policy(&self, cpu: CpuIndex) -> Option<PolicyTable> {
        self.modes.borrow().get(cpu.0 as usize).copied().flatten()?;
        self.policies.borrow().get(cpu.0 as usize).copied()
    }
}

fn call(t: &dyn ControlTarget, r: Request, out: &mut [u8]) -> Result<usize, ControlError> {
    let (buf, n) = r.encode();
    dispatch(t, r.code(), &buf[..n], out)
}

fn stats_needed(entries: usize) -> usize {
    StatsReply::SIZE + entries * CpuStats::SIZE
}

// ---- requests that succeed ----------------------------------------------------------------------

#[test]
fn status_reports_versions_counts_features_and_every_cpu_mode() {
    let t = Mock::four();
    let mut out = vec![0u8; 256];
    let n = call(&t, Request::Status, &mut out).unwrap();
    assert_eq!(n, StatusReply::SIZE + 4 * CpuModeEntry::SIZE);
    let (r, rest) = StatusReply::decode_prefix(&out[..n]).unwrap();
    assert_eq!(
        r.header,
        ReplyHeader {
            version: PROTOCOL_VERSION,
            size: n as u32
        }
    );
    assert_eq!(r.build_version, BUILD_VERSION);
    assert_eq!((r.cpu_count, r.virtualized_count), (4, 3));
    assert_eq!(r.bytes_per_cpu, 40960);
    assert_eq!(features_from_bits(r.features), t.features);
    assert_eq!(r.entry_size as usize, CpuModeEntry::SIZE);
    let modes: Vec<_> = rest
        .chunks_exact(CpuModeEntry::SIZE)
        .map(|c| CpuModeEntry::decode(c).unwrap())
        .collect();
    let x = Mode::ExitSti as u32;
    assert_eq!(
        modes,
        [(0, x), (1, x), (2, MODE_NOT_VIRTUALIZED), (3, x)]
            .map(|(cpu, mode)| CpuModeEntry { cpu, mode })
    );
}

#[test]
fn status_works_before_anything_is_virtualized() {
    let mut t = Mock::new(&[None, None]);
    t.features = None;
    let mut out = [0u8; 64];
    let n = call(&t, Request::Status, &mut out).unwrap();
    let (r, _) = StatusReply::decode_prefix(&out[..n]).unwrap();
    assert_eq!((r.virtualized_count, r.features), (0, 0));
}

#[test]
fn set_mode_applies_on_every_virtualized_cpu_and_counts_them() {
    let t = Mock::four();
    let mut out = [0u8; SetModeReply::SIZE];
    let n = call(&t, Request::SetMode(Mode::AckReplay), &mut out).unwrap();
    let r = SetModeReply::decode(&out[..n]).unwrap();
    assert_eq!((r.mode, r.cpus_applied), (Mode::AckReplay as u32, 3));
    let r = Some(Mode::AckReplay);
    assert_eq!(*t.modes.borrow(), [r, r, None, r]);
}

#[test]
fn stats_aggregate_sums_counters_and_keeps_the_largest_max() {
    let t = Mock::four();
    let mut out = vec![0u8; stats_needed(1)];
    let n = call(&t, Request::Stats { per_cpu: false }, &mut out).unwrap();
    assert_eq!(n, stats_needed(1));
    let (r, rest) = StatsReply::decode_prefix(&out).unwrap();
    assert_eq!((r.cpu_count, r.virtualized_count, r.entries), (4, 3, 1));
    let agg = CpuStats::decode(rest).unwrap();
    assert_eq!((agg.cpu, agg.mode), (AGGREGATE_CPU, Mode::ExitSti as u32));
    // CPUs 0, 1 and 3 (CPU 2 is not virtualized and counts nothing).
    assert_eq!(agg.exits[1], 10 + 11 + 13);
    assert_eq!(agg.extint_by_vector[0xd1], 100 + 200 + 400);
    assert_eq!(agg.cycles_max, 4000);
    assert_eq!(agg.cycles_sum, 15);
}

#[test]
fn stats_per_cpu_lists_every_cpu_after_the_aggregate() {
    let t = Mock::four();
    t.modes.borrow_mut()[3] = Some(Mode::AckInject);
    let mut out = vec![0u8; stats_needed(5) + 100];
    let n = call(&t, Request::Stats { per_cpu: true }, &mut out).unwrap();
    assert_eq!(n, stats_needed(5));
    let (r, rest) = StatsReply::decode_prefix(&out[..n]).unwrap();
    assert_eq!(r.entries, 5);
    let e: Vec<_> = rest
        .chunks_exact(CpuStats::SIZE)
        .map(|c| CpuStats::decode(c).unwrap())
        .collect();
    assert_eq!(e[0].mode, MODE_MIXED);
    assert_eq!(
        e.iter().map(|s| s.cpu).collect::<Vec<_>>(),
        [AGGREGATE_CPU, 0, 1, 2, 3]
    );
    assert_eq!(e[2].extint_by_vector[0xd1], 200);
    assert_eq!(e[3].mode, MODE_NOT_VIRTUALIZED);
    assert_eq!(e[3].snapshot(), Snapshot::zero());
    assert_eq!(e[4].mode, Mode::AckInject as u32);
    assert_eq!(e[4].snapshot(), t.stats.borrow()[3]);
}

#[test]
fn reset_zeroes_counters_and_reports_the_cpus() {
    let t = Mock::four();
    let mut out = [0u8; 32];
    let n = call(&t, Request::ResetStats, &mut out).unwrap();
    assert_eq!(ResetStatsReply::decode(&out[..n]).unwrap().cpus_reset, 3);
    assert!(t.stats.borrow().iter().all(|s| *s == Snapshot::zero()));
}

// ---- one test per ControlError ----------------------------------------------------------------

#[test]
fn wrong_input_size_names_both_sizes() {
    let t = Mock::four();
    let (mut buf, _) = Request::SetMode(Mode::AckReplay).encode();
    buf[8] = 2;
    for len in [0, 7, 8, 15] {
        assert_eq!(
            dispatch(&t, IOCTL_SET_MODE, &buf[..len], &mut [0; 64]),
            Err(ControlError::WrongInputSize {
                expected: 16,
                got: len as u32
            })
        );
    }
    let long = [PROTOCOL_VERSION as u8, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        dispatch(&t, IOCTL_STATUS, &long, &mut [0; 64]),
        Err(ControlError::WrongInputSize {
            expected: 8,
            got: 9
        })
    );
    assert_eq!(t.mutations.get(), 0);
}

#[test]
fn output_too_small_answers_the_size_query_and_changes_nothing() {
    let t = Mock::four();
    for (request, needed) in [
        (Request::Status, StatusReply::SIZE + 4 * CpuModeEntry::SIZE),
        (Request::Stats { per_cpu: false }, stats_needed(1)),
        (Request::Stats { per_cpu: true }, stats_needed(5)),
        (Request::SetMode(Mode::AckInject), SetModeReply::SIZE),
        (Request::ResetStats, ResetStatsReply::SIZE),
        (Request::Policy, PolicyReply::SIZE),
        (
            Request::SetPolicy(0x41, VectorPolicy::Inject),
            SetPolicyReply::SIZE,
        ),
    ] {
        for got in [0, 1, needed - 1] {
            let mut out = vec![0u8; got];
            assert_eq!(
                call(&t, request, &mut out),
                Err(ControlError::OutputTooSmall {
                    needed: needed as u32,
                    got: got as u32
                }),
                "{request:?} with {got} bytes"
            );
        }
        let mut out = vec![0u8; needed];
        assert_eq!(call(&t, request, &mut out), Ok(needed), "{request:?}");
    }
    // Only the three successful changing requests above changed anything.
    assert_eq!(t.mutations.get(), 3);
}

#[test]
fn unknown_code_is_refused_whatever_the_input() {
    let t = Mock::four();
    let (buf, n) = Request::Status.encode();
    for code in [0, IOCTL_STATUS + 6 * 4, IOCTL_STATUS ^ (3 << 14), u32::MAX] {
        assert_eq!(
            dispatch(&t, code, &buf[..n], &mut [0; 64]),
            Err(ControlError::UnknownCode { code })
        );
    }
}

#[test]
fn version_mismatch_is_reported_before_the_size() {
    let t = Mock::four();
    // A client of the next version sending a longer set-mode request, and one of version 1
    // (which knew no policy requests), are told about the version.
    for (version, len) in [(PROTOCOL_VERSION + 1, 24), (1, 16)] {
        let mut input = [0u8; 24];
        input[..4].copy_from_slice(&version.to_le_bytes());
        assert_eq!(
            dispatch(&t, IOCTL_SET_MODE, &input[..len], &mut [0; 64]),
            Err(ControlError::VersionMismatch {
                supported: PROTOCOL_VERSION,
                got: version
            })
        );
    }
    assert_eq!(t.mutations.get(), 0);
}

#[test]
fn reserved_fields_must_be_zero_and_are_located() {
    let t = Mock::four();
    for (request, at) in [
        (Request::Status, 4),
        (Request::SetMode(Mode::Passthrough), 4),
        (Request::SetMode(Mode::Passthrough), 12),
        (Request::Stats { per_cpu: true }, 12),
        (Request::ResetStats, 4),
    ] {
        let (mut buf, n) = request.encode();
        buf[at + 3] = 0x80;
        assert_eq!(
            dispatch(&t, request.code(), &buf[..n], &mut [0; 64]),
            Err(ControlError::ReservedNotZero { offset: at as u32 }),
            "{request:?}"
        );
    }
    assert_eq!(t.mutations.get(), 0);
}

#[test]
fn unknown_mode_changes_nothing() {
    let t = Mock::four();
    let (mut buf, n) = Request::SetMode(Mode::AckReplay).encode();
    for mode in [4u32, 0xFF, u32::MAX] {
        buf[8..12].copy_from_slice(&mode.to_le_bytes());
        assert_eq!(
            dispatch(&t, IOCTL_SET_MODE, &buf[..n], &mut [0; 64]),
            Err(ControlError::UnknownMode { mode })
        );
    }
    assert_eq!(t.mutations.get(), 0);
    assert_eq!(t.modes.borrow()[0], Some(Mode::ExitSti));
}

#[test]
fn unknown_flags_are_reported_alone() {
    let t = Mock::four();
    let (mut buf, n) = Request::Stats { per_cpu: true }.encode();
    buf[8..12].copy_from_slice(&(STATS_PER_CPU | 0x30).to_le_bytes());
    assert_eq!(
        dispatch(&t, IOCTL_STATS, &buf[..n], &mut [0; 64]),
        Err(ControlError::UnknownFlags { flags: 0x30 })
    );
}

#[test]
fn not_virtualized_refuses_changes_and_stats_but_not_status() {
    let t = Mock::new(&[None, None]);
    let mut out = vec![0u8; 1 << 16];
    for r in [
        Request::SetMode(Mode::AckReplay),
        Request::Stats { per_cpu: true },
        Request::ResetStats,
    ] {
        assert_eq!(
            call(&t, r, &mut out),
            Err(ControlError::NotVirtualized),
            "{r:?}"
        );
    }
    assert!(call(&t, Request::Status, &mut out).is_ok());
    assert_eq!(t.mutations.get(), 0);
}

#[test]
fn set_mode_failure_names_the_cpu_and_the_core_error() {
    let mut t = Mock::four();
    t.fail_at = Some((
        1,
        Error::VmxInstruction {
            instruction: "VMWRITE",
            error: 12,
        },
    ));
    assert_eq!(
        call(&t, Request::SetMode(Mode::AckReplay), &mut [0; 64]),
        Err(ControlError::SetModeFailed {
            cpu: 1,
            reason: CoreFailure {
                kind: CoreFailure::VMX_INSTRUCTION,
                detail: 12
            }
        })
    );
}

#[test]
fn reply_too_large_for_absurd_cpu_counts() {
    let mut t = Mock::four();
    t.cpus = u32::MAX;
    assert_eq!(
        call(&t, Request::Status, &mut [0; 64]),
        Err(ControlError::ReplyTooLarge { cpus: u32::MAX })
    );
    t.cpus = 1 << 20;
    assert_eq!(
        call(&t, Request::Stats { per_cpu: true }, &mut [0; 64]),
        Err(ControlError::ReplyTooLarge { cpus: 1 << 20 })
    );
}

#[test]
fn requests_round_trip_through_encode_and_parse() {
    for r in [
        Request::Status,
        Request::ResetStats,
        Request::Stats { per_cpu: false },
        Request::Stats { per_cpu: true },
        Request::Policy,
        Request::SetPolicy(0x30, VectorPolicy::Inject),
        Request::SetPolicy(0xd1, VectorPolicy::Auto),
        Request::SetPolicy(0xff, VectorPolicy::Replay),
    ]
    .into_iter()
    .chain(Mode::ALL.map(Request::SetMode))
    {
        let (buf, n) = r.encode();
        assert_eq!(Some(n), input_size(r.code()));
        assert_eq!(Request::parse(r.code(), &buf[..n]), Ok(r));
    }
}

// ---- delivery policy (protocol version 2) -------------------------------------------------------

fn policy_reply(t: &dyn ControlTarget) -> PolicyReply {
    let mut out = vec![0u8; PolicyReply::SIZE];
    assert_eq!(call(t, Request::Policy, &mut out), Ok(PolicyReply::SIZE));
    PolicyReply::decode(&out).unwrap()
}

#[test]
fn policy_reports_every_vector_of_the_virtualized_cpus() {
    let t = Mock::four();
    let r = policy_reply(&t);
    assert_eq!(r.header.size as usize, PolicyReply::SIZE);
    assert_eq!((r.virtualized_count, r.first_configurable), (3, 0x30));
    for v in 0..=255usize {
        let want = if v == 0xd1 {
            VectorPolicy::Auto
        } else {
            VectorPolicy::Replay
        };
        assert_eq!(r.policies[v], want as u32, "vector {v:#x}");
    }
    // CPU 2 is not virtualized: its table does not count, even if it differs.
    t.policies.borrow_mut()[2].set(crate::intr::policy::Vector(0x41), VectorPolicy::Inject);
    assert_eq!(policy_reply(&t).policies[0x41], VectorPolicy::Replay as u32);
    // Two virtualized CPUs that disagree: that entry says so, the others stay exact.
    t.policies.borrow_mut()[3].set(crate::intr::policy::Vector(0x61), VectorPolicy::Inject);
    let r = policy_reply(&t);
    assert_eq!(r.policies[0x61], POLICY_MIXED);
    assert_eq!(r.policies[0xd1], VectorPolicy::Auto as u32);
}

#[test]
fn set_policy_reaches_every_virtualized_cpu_and_is_what_policy_shows() {
    let t = Mock::four();
    let mut out = [0u8; SetPolicyReply::SIZE];
    let r = Request::SetPolicy(0xd1, VectorPolicy::Replay);
    assert_eq!(call(&t, r, &mut out), Ok(SetPolicyReply::SIZE));
    let reply = SetPolicyReply::decode(&out).unwrap();
    assert_eq!(
        (reply.vector, reply.policy, reply.cpus_applied),
        (0xd1, VectorPolicy::Replay as u32, 3)
    );
    assert_eq!(policy_reply(&t).policies[0xd1], VectorPolicy::Replay as u32);
    call(&t, Request::SetPolicy(0x41, VectorPolicy::Inject), &mut out).unwrap();
    assert_eq!(policy_reply(&t).policies[0x41], VectorPolicy::Inject as u32);
}

#[test]
fn set_policy_refuses_vectors_without_a_policy_and_unknown_policies() {
    let t = Mock::four();
    let input = |vector: u32, policy: u32| {
        let mut b = [0u8; SetPolicyRequest::SIZE];
        SetPolicyRequest {
            header: RequestHeader::CURRENT,
            vector,
            policy,
        }
        .encode(&mut b)
        .unwrap();
        b
    };
    for vector in [0, 0x0e, 0x20, 0x2f, 0x100, u32::MAX] {
        assert_eq!(
            dispatch(&t, IOCTL_SET_POLICY, &input(vector, 1), &mut [0; 64]),
            Err(ControlError::VectorNotConfigurable {
                vector,
                first: 0x30
            })
        );
    }
    for policy in [3, 0xff, u32::MAX] {
        assert_eq!(
            dispatch(&t, IOCTL_SET_POLICY, &input(0xd1, policy), &mut [0; 64]),
            Err(ControlError::UnknownPolicy { policy })
        );
    }
    assert_eq!(t.mutations.get(), 0, "a refused request changed nothing");
    let none = Mock::new(&[None, None]);
    for r in [
        Request::Policy,
        Request::SetPolicy(0xd1, VectorPolicy::Inject),
    ] {
        assert_eq!(
            call(&none, r, &mut [0; 2048]),
            Err(ControlError::NotVirtualized)
        );
    }
    assert_eq!(
        call(&t, Request::Policy, &mut [0; 64]),
        Err(ControlError::OutputTooSmall {
            needed: PolicyReply::SIZE as u32,
            got: 64
        })
    );
}

// ---- generated malformed requests ---------------------------------------------------------------

/// SplitMix64: tiny, seedable, good enough to spread requests over the input space.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

const CODES: [u32; 6] = [
    IOCTL_STATUS,
    IOCTL_SET_MODE,
    IOCTL_STATS,
    IOCTL_RESET_STATS,
    IOCTL_POLICY,
    IOCTL_SET_POLICY,
];

fn some_set_policy(rng: &mut Rng) -> Request {
    Request::SetPolicy(
        rng.pick(&[0x30, 0x41, 0xd1, 0xfd, 0xff]),
        rng.pick(&VectorPolicy::ALL),
    )
}

fn malformed_input(rng: &mut Rng, code: u32) -> Vec<u8> {
    match rng.below(4) {
        // A well-formed request for this code (so successes are exercised too).
        3 => {
            let request = match code {
                IOCTL_SET_MODE => Request::SetMode(rng.pick(&Mode::ALL)),
                IOCTL_STATS => Request::Stats {
                    per_cpu: rng.below(2) == 0,
                },
                IOCTL_RESET_STATS => Request::ResetStats,
                IOCTL_POLICY => Request::Policy,
                IOCTL_SET_POLICY => some_set_policy(rng),
                _ => Request::Status,
            };
            let (buf, n) = request.encode();
            buf[..n].to_vec()
        }
        // A well-formed request for some code, then damaged: a byte or two changed, cut short,
        // or lengthened.
        0 => {
            let request = match rng.below(6) {
                0 => Request::Status,
                1 => Request::SetMode(rng.pick(&Mode::ALL)),
                2 => Request::Stats {
                    per_cpu: rng.below(2) == 0,
                },
                3 => Request::Policy,
                4 => some_set_policy(rng),
                _ => Request::ResetStats,
            };
            let (buf, n) = request.encode();
            let mut v = buf[..n].to_vec();
            for _ in 0..rng.below(3) {
                if !v.is_empty() {
                    let i = rng.below(v.len() as u64) as usize;
                    let noise = rng.next() as u8;
                    v[i] = rng.pick(&[0, 1, 2, 3, 4, 0x80, 0xFF, noise]);
                }
            }
            match rng.below(4) {
                0 => v.truncate(rng.below(v.len() as u64 + 1) as usize),
                1 => v.extend((0..rng.below(9)).map(|_| rng.next() as u8)),
                _ => {}
            }
            v
        }
        // The right header, then random bytes of a random length around the right one.
        1 => {
            let version = rng.pick(&[PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 1, 3, u32::MAX]);
            let mut v = version.to_le_bytes().to_vec();
            let len = input_size(code).unwrap_or(16) as u64;
            let extra = rng.below(len + 4);
            v.extend((0..extra).map(|_| match rng.below(3) {
                0 => 0,
                _ => rng.next() as u8,
            }));
            v
        }
        // Pure noise.
        _ => (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
    }
}

/// The generated tests' seed: `ACKVISOR_FUZZ_SEED` (decimal or 0x hex), or the fixed default.
fn fuzz_seed() -> u64 {
    const DEFAULT: u64 = 0x00AC_C7E5_7000_0001;
    match std::env::var("ACKVISOR_FUZZ_SEED") {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("ACKVISOR_FUZZ_SEED={s}: {e}"))
        }
        _ => DEFAULT,
    }
}

mod streams;

#[test]
fn generated_malformed_requests_never_panic_and_rejections_change_nothing() {
    const REQUESTS: u32 = 120_000;
    let seed = fuzz_seed();
    std::eprintln!("dispatch requests: ACKVISOR_FUZZ_SEED={seed:#x}");
    let mut failing = Mock::four();
    failing.fail_at = Some((3, Error::Busy));
    let targets = [Mock::four(), Mock::new(&[None, None, None]), failing];
    let mut rng = Rng(seed);
    let mut output = vec![0u8; 1 << 16];
    let mut statuses_seen = [0u32; 16];
    let mut accepted = 0u32;
    for i in 0..REQUESTS {
        let target = &targets[rng.below(targets.len() as u64) as usize];
        let code = match rng.below(4) {
            0 | 1 => rng.pick(&CODES),
            2 => rng.pick(&CODES) ^ (1 << rng.below(32)),
            _ => rng.next() as u32,
        };
        let input = malformed_input(&mut rng, code);
        let out_len = rng.pick(&[
            0,
            1,
            8,
            16,
            24,
            StatusReply::SIZE + 4 * CpuModeEntry::SIZE,
            stats_needed(1) - 1,
            stats_needed(1),
            stats_needed(5),
            output.len(),
        ]);
        let before = (
            target.mutations.get(),
            target.modes.borrow().clone(),
            target.policies.borrow().clone(),
        );
        match dispatch(target, code, &input, &mut output[..out_len]) {
            Ok(n) => {
                accepted += 1;
                assert!(n <= out_len, "request {i}: reply {n} > buffer {out_len}");
                let (h, _) = ReplyHeader::decode_prefix(&output[..n]).unwrap();
                assert_eq!(
                    (h.version, h.size as usize),
                    (PROTOCOL_VERSION, n),
                    "request {i}"
                );
            }
            Err(e) => {
                let s = e.as_status() as usize;
                statuses_seen[s] += 1;
                assert_eq!(ControlError::from_reply(&e.to_reply()), Some(e));
                if !matches!(e, ControlError::SetModeFailed { .. }) {
                    let after = (
                        target.mutations.get(),
                        target.modes.borrow().clone(),
                        target.policies.borrow().clone(),
                    );
                    assert_eq!(
                        before, after,
                        "request {i} ({code:#x}, {input:?}) refused with {e} but changed state"
                    );
                }
            }
        }
    }
    // The generator must actually reach every refusal (and some successes), or it proves little.
    for s in (1..=status::SET_MODE_FAILED)
        .chain([status::UNKNOWN_POLICY, status::VECTOR_NOT_CONFIGURABLE])
    {
        assert!(
            statuses_seen[s as usize] > 0,
            "status {s} never produced: {statuses_seen:?}"
        );
    }
    assert!(accepted > 5000, "only {accepted} requests accepted");
}

// ---- the frame server -------------------------------------------------------------------------

const MAX_REQ: usize = 64;

fn request_frame(seq: u16, r: Request, capacity: u32) -> Vec<u8> {
    let (buf, n) = r.encode();
    let mut out = vec![0u8; frame::OVERHEAD + frame::REQUEST_PREFIX + n];
    let len = frame::encode_request(seq, r.code(), capacity, &buf[..n], &mut out).unwrap();
    out.truncate(len);
    out
}

fn response(reply: &[u8]) -> (u16, u32, Vec<u8>) {
    let Decoded::Frame { frame, used } = frame::decode(reply, frame::MAX_PAYLOAD) else {
        panic!("reply is not a frame")
    };
    assert_eq!((frame.kind, used), (Kind::Response, reply.len()));
    let (status, body) = frame::response_parts(frame.payload).unwrap();
    (frame.seq, status, body.to_vec())
}

#[test]
fn serve_answers_a_request_frame_with_the_dispatched_reply() {
    let t = Mock::four();
    let rx = request_frame(42, Request::SetMode(Mode::AckInject), 64);
    let mut tx = vec![0u8; 256];
    let s = serve(&t, &rx, &mut tx, MAX_REQ);
    assert_eq!(s.consumed, rx.len());
    assert_eq!(
        s.event,
        ServeEvent::Answered {
            code: IOCTL_SET_MODE,
            status: 0
        }
    );
    let (seq, status, body) = response(&tx[..s.reply_len]);
    assert_eq!((seq, status), (42, 0));
    assert_eq!(
        SetModeReply::decode(&body).unwrap().mode,
        Mode::AckInject as u32
    );
}

#[test]
fn serve_carries_control_errors_and_the_clients_capacity() {
    let t = Mock::four();
    let rx = request_frame(1, Request::Stats { per_cpu: false }, 100);
    let mut tx = vec![0u8; 1 << 16];
    let s = serve(&t, &rx, &mut tx, MAX_REQ);
    let (_, status, body) = response(&tx[..s.reply_len]);
    assert_eq!(status, status::OUTPUT_TOO_SMALL);
    assert_eq!(
        ControlError::read_reply(&body),
        Some(ControlError::OutputTooSmall {
            needed: stats_needed(1) as u32,
            got: 100
        })
    );
    // A capacity beyond the server's buffer is bounded by it, and `got` says so.
    let rx = request_frame(2, Request::Stats { per_cpu: true }, u32::MAX);
    let mut small = vec![0u8; 9000];
    let s = serve(&t, &rx, &mut small, MAX_REQ);
    let (_, _, body) = response(&small[..s.reply_len]);
    assert_eq!(
        ControlError::read_reply(&body),
        Some(ControlError::OutputTooSmall {
            needed: stats_needed(5) as u32,
            got: (9000 - frame::OVERHEAD - frame::RESPONSE_PREFIX) as u32
        })
    );
}

#[test]
fn serve_naks_broken_frames_and_discards_garbage_then_goes_on() {
    let t = Mock::four();
    let good = request_frame(7, Request::Status, 4096);
    let mut corrupt = request_frame(6, Request::Status, 4096);
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let mut rx = b"line noise".to_vec();
    rx.extend(&corrupt);
    rx.extend(&good);
    let mut tx = vec![0u8; 4096];
    let mut events = Vec::new();
    let mut answered = Vec::new();
    while !rx.is_empty() {
        let s = serve(&t, &rx, &mut tx, MAX_REQ);
        if s.event == ServeEvent::Idle {
            break;
        }
        if let ServeEvent::Answered { .. } = s.event {
            answered.push(response(&tx[..s.reply_len]).0);
        }
        if let ServeEvent::Nak(_) = s.event {
            let Decoded::Frame { frame, .. } = frame::decode(&tx[..s.reply_len], 64) else {
                panic!()
            };
            assert_eq!((frame.kind, frame.seq), (Kind::Nak, 6));
            assert!(matches!(
                frame::nak_error(frame.payload),
                Some(FrameError::PayloadChecksum { .. })
            ));
        }
        events.push(s.event);
        rx.drain(..s.consumed);
    }
    assert_eq!(answered, [7]);
    assert!(matches!(
        events[0],
        ServeEvent::Discarded(FrameError::Garbage { bytes: 10 })
    ));
    assert!(events.iter().any(|e| matches!(e, ServeEvent::Nak(_))));
}

#[test]
fn serve_naks_frames_a_server_does_not_take() {
    let t = Mock::four();
    let mut tx = vec![0u8; 256];
    // A response frame sent to the server.
    let mut rx = vec![0u8; 64];
    let n = frame::encode(Kind::Response, 3, &[&[0, 0, 0, 0]], &mut rx).unwrap();
    let s = serve(&t, &rx[..n], &mut tx, MAX_REQ);
    assert_eq!(
        s.event,
        ServeEvent::Nak(FrameError::UnexpectedKind { kind: 2 })
    );
    assert_eq!(s.consumed, n);
    // A request too short to hold code and capacity.
    let n = frame::encode(Kind::Request, 4, &[&[1, 2, 3]], &mut rx).unwrap();
    let s = serve(&t, &rx[..n], &mut tx, MAX_REQ);
    assert_eq!(
        s.event,
        ServeEvent::Nak(FrameError::ShortPayload { len: 3, needed: 8 })
    );
    // A request larger than the server takes.
    let big = vec![0u8; 100];
    let mut rx = vec![0u8; 200];
    let n = frame::encode_request(5, IOCTL_STATUS, 64, &big, &mut rx).unwrap();
    let s = serve(&t, &rx[..n], &mut tx, MAX_REQ);
    assert!(matches!(
        s.event,
        ServeEvent::Nak(FrameError::Oversized { len: 108, .. })
    ));
    assert_eq!(t.mutations.get(), 0);
}

#[test]
fn serve_with_a_tiny_reply_buffer_sends_nothing_and_does_not_panic() {
    let t = Mock::four();
    let rx = request_frame(1, Request::Status, 4096);
    for len in [0, 5, MIN_REPLY_BUFFER - 1] {
        let mut tx = vec![0u8; len];
        let s = serve(&t, &rx, &mut tx, MAX_REQ);
        assert_eq!(s.reply_len, 0);
        assert_eq!(s.consumed, rx.len());
        assert!(
            matches!(s.event, ServeEvent::ReplyBufferTooSmall(_)),
            "{len}"
        );
    }
    let mut tx = vec![0u8; MIN_REPLY_BUFFER];
    let s = serve(&t, &rx, &mut tx, MAX_REQ);
    let (_, status, _) = response(&tx[..s.reply_len]);
    assert_eq!(status, status::OUTPUT_TOO_SMALL);
}

#[test]
fn serve_waits_on_a_partial_frame() {
    let t = Mock::four();
    let rx = request_frame(1, Request::Status, 4096);
    let s = serve(&t, &rx[..rx.len() - 1], &mut [0u8; 256], MAX_REQ);
    assert_eq!((s.event, s.consumed, s.reply_len), (ServeEvent::Idle, 0, 0));
}
