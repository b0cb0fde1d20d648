//! End to end minus Bochs: the real client (`ackctl::run`, the TCP transport, the binary) against
//! an in-process TCP server that runs `control::serve` → `control::dispatch` on a mock hypervisor,
//! exactly as the test machine's COM1 server does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ackctl::ClientError;
use ackctl::cli::Cli;
use ackctl::error::exit;
use ackvisor_vmm::control::frame::{self, Decoded, FrameError, Kind};
use ackvisor_vmm::control::serve::{ServeEvent, serve};
use ackvisor_vmm::control::wire::{self, Field, IOCTL_STATUS};
use ackvisor_vmm::control::{ControlError, ControlTarget, Request};
use ackvisor_vmm::hypervisor::Features;
use ackvisor_vmm::intr::policy::Vector;
use ackvisor_vmm::intr::vector_policy::{PolicyLookup, PolicyTable, VectorPolicy};
use ackvisor_vmm::stats::{Counters, Snapshot};
use ackvisor_vmm::{CpuIndex, Error, Mode};
use clap::Parser;
use serde_json::Value;

/// A hypervisor stand-in shared between the server thread and the test.
#[derive(Default)]
struct State {
    modes: Vec<Option<Mode>>,
    stats: Vec<Snapshot>,
    policies: Vec<PolicyTable>,
    resets: u32,
}

#[derive(Clone)]
struct MockTarget(Arc<Mutex<State>>);

impl MockTarget {
    fn new(modes: &[Option<Mode>]) -> Self {
        let stats = (0..modes.len())
            .map(|i| {
                let mut s = Snapshot::zero();
                s.exits[1] = 1000 * (i as u64 + 1);
                s.extint_by_vector[0xd1] = 1000 * (i as u64 + 1);
                s.replays_by_vector[0xd1] = 900;
                s.injections_by_vector[0x2f] = 100;
                s.cycles_count = 10;
                s.cycles_sum = 10_000;
                s.cycles_max = 5000 + i as u64;
                s
            })
            .collect();
        Self(Arc::new(Mutex::new(State {
            modes: modes.to_vec(),
            stats,
            policies: vec![PolicyTable::ALL_REPLAY.with(&[0xd1], VectorPolicy::Auto); modes.len()],
            resets: 0,
        })))
    }
}

impl ControlTarget for MockTarget {
    fn set_mode_all(&self, mode: Mode) -> Result<(), (CpuIndex, Error)> {
        let mut s = self.0.lock().unwrap();
        for m in s.modes.iter_mut().flatten() {
            *m = mode;
        }
        Ok(())
    }
    fn cpu_mode(&self, cpu: CpuIndex) -> Option<Mode> {
        *self.0.lock().unwrap().modes.get(cpu.0 as usize)?
    }
    fn with_cpu_counters(&self, cpu: CpuIndex, f: &mut dyn FnMut(Mode, &dyn Counters)) -> bool {
        let s = self.0.lock().unwrap();
        let Some(Some(mode)) = s.modes.get(cpu.0 as usize).copied() else {
            return false;
        };
        f(mode, &s.stats[cpu.0 as usize]);
        true
    }
    fn reset_stats(&self) {
        let mut s = self.0.lock().unwrap();
        s.resets += 1;
        for st in s.stats.iter_mut() {
            *st = Snapshot::zero();
        }
    }
    fn cpu_count(&self) -> u32 {
        self.0.lock().unwrap().modes.len() as u32
    }
    fn virtualized_count(&self) -> u32 {
        self.0.lock().unwrap().modes.iter().flatten().count() as u32
    }
    fn bytes_per_cpu(&self) -> usize {
        45056
    }
    fn features(&self) -> Option<Features> {
        Some(Features {
            external_interrupt_exiting: true,
            ack_on_exit: true,
            ..Features::default()
        })
    }
    fn set_policy_all(&self, v: Vector, p: VectorPolicy) -> u32 {
        let mut s = self.0.lock().unwrap();
        let virtualized: Vec<bool> = s.modes.iter().map(Option::is_some).collect();
        let mut applied = 0;
        for (table, on) in s.policies.iter_mut().zip(virtualized) {
            if on {
                table.set(v, p);
                applied += 1;
            }
        }
        applied
    }
    fn policy(&self, cpu: CpuIndex) -> Option<PolicyTable> {
        let s = self.0.lock().unwrap();
        s.modes.get(cpu.0 as usize).copied().flatten()?;
        s.policies.get(cpu.0 as usize).copied()
    }
}

/// How the server misbehaves, to drive the client's retries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Flip a payload byte of the first N responses.
    CorruptReplies(u32),
    /// Never answer.
    Silent,
    /// Answer every request with a version-mismatch refusal from "version 2".
    NewerVersion,
}

struct Server {
    addr: SocketAddr,
    requests: Arc<AtomicU32>,
    naks: Arc<AtomicU32>,
}

/// The COM1 server's loop, on a TCP socket: read, serve, send, repeat.
fn start(target: MockTarget, fault: Fault) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU32::new(0));
    let naks = Arc::new(AtomicU32::new(0));
    let (req, nak) = (requests.clone(), naks.clone());
    thread::spawn(move || {
        let mut corrupt_left = match fault {
            Fault::CorruptReplies(n) => n,
            _ => 0,
        };
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut rx = Vec::new();
            let mut tx = vec![0u8; 1 << 20];
            let mut buf = [0u8; 4096];
            loop {
                let n = match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                rx.extend_from_slice(&buf[..n]);
                loop {
                    let s = serve(&target, &rx, &mut tx, 64);
                    if s.event == ServeEvent::Idle {
                        break;
                    }
                    let mut reply = tx[..s.reply_len].to_vec();
                    match s.event {
                        ServeEvent::Answered { .. } => {
                            req.fetch_add(1, Ordering::SeqCst);
                            if fault == Fault::NewerVersion {
                                reply = newer_version_refusal(&reply);
                            }
                            if corrupt_left > 0 {
                                corrupt_left -= 1;
                                reply[frame::HEADER_SIZE + 1] ^= 0x40;
                            }
                        }
                        ServeEvent::Nak(_) => {
                            nak.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                    rx.drain(..s.consumed);
                    if fault != Fault::Silent
                        && !reply.is_empty()
                        && conn.write_all(&reply).is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    Server {
        addr,
        requests,
        naks,
    }
}

/// Rewrites a response into the refusal a hypervisor of the next protocol version would send.
fn newer_version_refusal(reply: &[u8]) -> Vec<u8> {
    let Decoded::Frame { frame, .. } = frame::decode(reply, frame::MAX_PAYLOAD) else {
        panic!("server reply is not a frame")
    };
    let e = ControlError::VersionMismatch {
        supported: wire::PROTOCOL_VERSION + 1,
        got: wire::PROTOCOL_VERSION,
    };
    let mut body = [0u8; wire::ErrorReply::SIZE];
    e.write_reply(&mut body).unwrap();
    let mut out = vec![0u8; 128];
    let n = frame::encode(
        Kind::Response,
        frame.seq,
        &[&e.as_status().to_le_bytes(), &body],
        &mut out,
    )
    .unwrap();
    out.truncate(n);
    out
}

fn cli(server: &SocketAddr, args: &[&str]) -> Cli {
    let addr = server.to_string();
    let argv = ["ackctl", "--machine", &addr, "--timeout", "0.5"]
        .into_iter()
        .chain(args.iter().copied());
    Cli::try_parse_from(argv).unwrap()
}

fn run(server: &SocketAddr, args: &[&str]) -> Result<String, ClientError> {
    let mut out = Vec::new();
    ackctl::run(&cli(server, args), &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

fn three_cpus() -> MockTarget {
    let m = Some(Mode::ExitSti);
    MockTarget::new(&[m, m, m])
}

#[test]
fn status_over_tcp_reports_the_mock() {
    let t = three_cpus();
    let s = start(t.clone(), Fault::None);
    let v: Value = serde_json::from_str(&run(&s.addr, &["--json", "status"]).unwrap()).unwrap();
    assert_eq!(v["protocol_version"], wire::PROTOCOL_VERSION);
    assert_eq!(v["build_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        (v["cpu_count"].as_u64(), v["virtualized_count"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(v["bytes_per_cpu"], 45056);
    assert_eq!(v["features"]["ack-on-exit"], true);
    assert_eq!(v["cpus"][2]["mode"], "exit-sti");
    let table = run(&s.addr, &["status"]).unwrap();
    assert!(
        table.contains("CPUs            3 (3 virtualized)"),
        "{table}"
    );
}

#[test]
fn mode_change_reaches_every_cpu() {
    let t = three_cpus();
    let s = start(t.clone(), Fault::None);
    let out = run(&s.addr, &["mode", "ack-replay"]).unwrap();
    assert_eq!(out, "mode ack-replay applied on 3 CPUs\n");
    assert!(
        t.0.lock()
            .unwrap()
            .modes
            .iter()
            .all(|m| *m == Some(Mode::AckReplay))
    );
    let v: Value = serde_json::from_str(&run(&s.addr, &["--json", "status"]).unwrap()).unwrap();
    assert_eq!(v["cpus"][0]["mode"], "ack-replay");
}

#[test]
fn per_cpu_stats_take_the_size_query_and_sum_correctly() {
    let t = three_cpus();
    let s = start(t.clone(), Fault::None);
    let out = run(&s.addr, &["stats", "--per-cpu", "--json"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["aggregate"]["exits_total"], 6000);
    assert_eq!(v["aggregate"]["cycles"]["max"], 5002);
    assert_eq!(v["cpus"].as_array().unwrap().len(), 3);
    assert_eq!(v["cpus"][1]["vectors"][1]["extint"], 2000);
    // The first capacity holds one entry only: per-CPU stats needed a second round trip.
    assert_eq!(s.requests.load(Ordering::SeqCst), 2);
    let table = run(&s.addr, &["stats", "--vector", "0xd1"]).unwrap();
    let row = table.lines().find(|l| l.starts_with("0xd1")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["0xd1", "6000", "2700", "0"]
    );
}

#[test]
fn stats_reset_zeroes_the_counters() {
    let t = three_cpus();
    let s = start(t.clone(), Fault::None);
    assert_eq!(
        run(&s.addr, &["stats", "reset"]).unwrap(),
        "statistics reset on 3 CPUs\n"
    );
    assert_eq!(t.0.lock().unwrap().resets, 1);
    let v: Value = serde_json::from_str(&run(&s.addr, &["--json", "stats"]).unwrap()).unwrap();
    assert_eq!(v["aggregate"]["exits_total"], 0);
}

#[test]
fn policy_shows_the_table_and_sets_one_vector_on_every_cpu() {
    let t = three_cpus();
    let s = start(t.clone(), Fault::None);
    let table = run(&s.addr, &["policy"]).unwrap();
    assert!(table.contains("0xd1    auto"), "{table}");
    assert_eq!(
        run(&s.addr, &["policy", "0xd1", "replay"]).unwrap(),
        "vector 0xd1: replay on 3 CPUs\n"
    );
    assert!(
        t.0.lock()
            .unwrap()
            .policies
            .iter()
            .all(|p| p.policy(Vector(0xd1)) == VectorPolicy::Replay)
    );
    run(&s.addr, &["policy", "0x61", "inject"]).unwrap();
    let v: Value = serde_json::from_str(&run(&s.addr, &["--json", "policy"]).unwrap()).unwrap();
    assert_eq!(v["policies"]["0xd1"], "replay");
    assert_eq!(v["policies"]["0x61"], "inject");
    assert_eq!(v["virtualized_cpus"], 3);
    // A vector that takes no policy is the hypervisor's refusal, a usage error for scripts.
    let e = run(&s.addr, &["policy", "0x2f", "inject"]).unwrap_err();
    assert_eq!(
        e,
        ClientError::Refused(ControlError::VectorNotConfigurable {
            vector: 0x2f,
            first: 0x30
        })
    );
    assert_eq!(e.exit_code(), exit::USAGE);
}

#[test]
fn refusals_come_back_as_control_errors_with_their_exit_codes() {
    let t = MockTarget::new(&[None, None]);
    let s = start(t, Fault::None);
    let e = run(&s.addr, &["mode", "ack-inject"]).unwrap_err();
    assert_eq!(e, ClientError::Refused(ControlError::NotVirtualized));
    assert_eq!(e.exit_code(), exit::NOT_VIRTUALIZED);
    // Status still works with nothing virtualized.
    assert!(
        run(&s.addr, &["status"])
            .unwrap()
            .contains("not virtualized")
    );
}

#[test]
fn a_corrupted_reply_is_retried_and_the_retry_succeeds() {
    let t = three_cpus();
    let s = start(t.clone(), Fault::CorruptReplies(1));
    let out = run(&s.addr, &["mode", "ack-inject"]).unwrap();
    assert_eq!(out, "mode ack-inject applied on 3 CPUs\n");
    assert_eq!(s.requests.load(Ordering::SeqCst), 2);
}

#[test]
fn replies_broken_on_every_attempt_end_in_a_link_error() {
    let s = start(three_cpus(), Fault::CorruptReplies(100));
    let e = run(&s.addr, &["status"]).unwrap_err();
    assert!(
        matches!(e, ClientError::Link(FrameError::PayloadChecksum { .. })),
        "{e:?}"
    );
    assert_eq!(e.exit_code(), exit::PROTOCOL);
    assert_eq!(s.requests.load(Ordering::SeqCst), 3);
}

#[test]
fn a_silent_machine_times_out_after_its_retries() {
    let s = start(three_cpus(), Fault::Silent);
    let e = run(&s.addr, &["status"]).unwrap_err();
    assert_eq!(
        e,
        ClientError::Timeout {
            attempts: 3,
            each_ms: 500
        }
    );
    assert_eq!(e.exit_code(), exit::TIMEOUT);
    assert!(e.to_string().contains("timeout"));
    // Every attempt reached the server (which answered into the void).
    assert_eq!(s.requests.load(Ordering::SeqCst), 3);
}

#[test]
fn a_newer_hypervisor_is_reported_as_a_version_mismatch() {
    let s = start(three_cpus(), Fault::NewerVersion);
    let e = run(&s.addr, &["status"]).unwrap_err();
    assert_eq!(
        e,
        ClientError::VersionMismatch {
            client: wire::PROTOCOL_VERSION,
            hypervisor: wire::PROTOCOL_VERSION + 1
        }
    );
    assert_eq!(e.exit_code(), exit::VERSION_MISMATCH);
}

#[test]
fn an_unreachable_machine_says_so() {
    // Bind then drop a listener: its port is (almost certainly) closed now.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = run(&addr, &["status"]).unwrap_err();
    assert!(
        matches!(e, ClientError::Unreachable { addr: Some(a), .. } if a == addr),
        "{e:?}"
    );
    assert_eq!(e.exit_code(), exit::UNREACHABLE);
    let e = ackctl::run(
        &Cli::try_parse_from(["ackctl", "--machine", "no port here", "status"]).unwrap(),
        &mut Vec::new(),
    )
    .unwrap_err();
    assert_eq!(e, ClientError::BadMachine);
}

/// Reads frames from `conn` until `count` have arrived.
fn read_frames(conn: &mut TcpStream, count: usize) -> Vec<(Kind, u16, Vec<u8>)> {
    let mut rx = Vec::new();
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    while frames.len() < count {
        match frame::decode(&rx, frame::MAX_PAYLOAD) {
            Decoded::Frame { frame, used } => {
                frames.push((frame.kind, frame.seq, frame.payload.to_vec()));
                rx.drain(..used);
            }
            Decoded::Rejected { skip, .. } => {
                rx.drain(..skip);
            }
            Decoded::Incomplete => {
                let n = conn.read(&mut buf).unwrap();
                assert_ne!(n, 0, "server closed the link");
                rx.extend_from_slice(&buf[..n]);
            }
        }
    }
    frames
}

#[test]
fn malformed_frames_get_naks_and_the_server_goes_on() {
    let s = start(three_cpus(), Fault::None);
    let mut conn = TcpStream::connect(s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (input, n) = Request::Status.encode();
    let mut good = vec![0u8; 64];
    let len = frame::encode_request(9, IOCTL_STATUS, 4096, &input[..n], &mut good).unwrap();
    good.truncate(len);
    let mut corrupt = good.clone();
    corrupt[6] = 8; // seq changed without fixing the header CRC (the magic is intact)
    let mut bad_payload = good.clone();
    bad_payload[frame::HEADER_SIZE] ^= 0xFF;
    let mut oversized = vec![0u8; 200];
    let olen = frame::encode_request(11, IOCTL_STATUS, 4096, &[0u8; 100], &mut oversized).unwrap();
    oversized.truncate(olen);

    let mut stream = b"garbage before anything".to_vec();
    stream.extend(&corrupt);
    stream.extend(&bad_payload);
    stream.extend(&oversized);
    stream.extend(&good);
    conn.write_all(&stream).unwrap();

    // NAKs for the header-CRC, payload-CRC and oversized frames, then the good frame's answer.
    let frames = read_frames(&mut conn, 4);
    let naks: Vec<_> = frames
        .iter()
        .filter(|f| f.0 == Kind::Nak)
        .map(|f| frame::nak_error(&f.2).unwrap())
        .collect();
    assert!(naks.contains(&FrameError::HeaderChecksum), "{naks:?}");
    assert!(
        naks.iter()
            .any(|e| matches!(e, FrameError::PayloadChecksum { .. }))
    );
    assert!(
        naks.iter()
            .any(|e| matches!(e, FrameError::Oversized { len: 108, .. }))
    );
    let answer = frames.iter().find(|f| f.0 == Kind::Response).unwrap();
    assert_eq!(answer.1, 9);
    let (status, _) = frame::response_parts(&answer.2).unwrap();
    assert_eq!(status, wire::status::OK);
    assert!(s.naks.load(Ordering::SeqCst) >= 3);

    // A truncated frame followed by silence, then the real client on a new connection.
    conn.write_all(&good[..10]).unwrap();
    drop(conn);
    assert!(run(&s.addr, &["status"]).unwrap().contains("exit-sti"));
}

#[test]
fn the_binary_exits_with_the_documented_codes() {
    let bin = env!("CARGO_BIN_EXE_ackctl");
    let s = start(three_cpus(), Fault::None);
    let addr = s.addr.to_string();
    let ok = Command::new(bin)
        .args(["--machine", &addr, "mode", "passthrough"])
        .output()
        .unwrap();
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        "mode passthrough applied on 3 CPUs\n"
    );

    let usage = Command::new(bin)
        .args(["mode", "fastest"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(i32::from(exit::USAGE)));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("ack-replay"));

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let down = Command::new(bin)
        .args(["--machine", &closed, "status"])
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(i32::from(exit::UNREACHABLE)));
    let msg = String::from_utf8_lossy(&down.stderr);
    assert!(
        msg.starts_with("ackctl: test machine not reachable at"),
        "{msg}"
    );
}
