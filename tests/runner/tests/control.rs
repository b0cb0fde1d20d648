//! The control protocol end to end: the test machine serves `control::serve` on COM1 while
//! every CPU takes interrupts, and the host drives it only through the real `ackctl` binary (or,
//! for malformed input, raw bytes on the same link). Each machine ends with the runner's finish
//! word: the kernel closes its books (raised == handled per vector and CPU, LAPIC ISR empty) and
//! prints them, so every test also judges the machine's own accounting.
//!
//! `ACKVISOR_TEST_MODES=passthrough,ack-replay,...` narrows the modes these tests (and the
//! multi-CPU `modes` tests) flip through; the default is all four.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ackvisor_runner::{Machine, RunOutput, RunSpec, Verdict, ackctl, start};
use ackvisor_vmm::control::frame::{self, Decoded, FrameError, Kind};
use ackvisor_vmm::control::wire::{self, Field, RequestHeader, SetModeRequest, StatusRequest};
use ackvisor_vmm::control::{ControlError, Request};
use serde_json::Value;

/// The modes to exercise (`ACKVISOR_TEST_MODES`, default all four; an unknown name fails).
fn modes() -> Vec<String> {
    ackvisor_runner::modes::from_env()
        .into_iter()
        .map(String::from)
        .collect()
}

fn boot(spec: &RunSpec) -> (Machine, String) {
    let model = spec.model.clone();
    let mut m = start(spec).unwrap_or_else(|e| panic!("model {model}: could not start: {e}"));
    if let Err(e) = m.wait_for_result("serve-ready", Duration::from_secs(120)) {
        panic!("model {model}: machine not ready: {e}");
    }
    let addr = m.machine_arg().expect("serve machines have a link");
    (m, addr)
}

/// Runs ackctl and returns its JSON, or panics naming model, command and output.
fn ackctl_json(model: &str, m: &Machine, addr: &str, args: &[&str]) -> Value {
    let mut full: Vec<&str> = args.to_vec();
    full.push("--json");
    let out = ackctl::run(addr, &full).unwrap_or_else(|e| panic!("model {model}: {e}"));
    out.json().unwrap_or_else(|e| {
        panic!(
            "model {model}: {e}\nmachine console tail:\n{}",
            tail(&m.console())
        )
    })
}

fn tail(text: &str) -> String {
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Collects failures about JSON documents from ackctl, then reports them all.
struct Checks {
    model: String,
    failures: Vec<String>,
}

impl Checks {
    fn new(model: &str) -> Checks {
        Checks {
            model: model.into(),
            failures: Vec::new(),
        }
    }
    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failures
                .push(format!("model {}: {}", self.model, what()));
        }
    }
    fn eq(&mut self, ctx: &str, field: &str, expected: u64, got: u64) {
        self.expect(expected == got, || {
            format!("{ctx}: field {field}: expected {expected}, got {got}")
        });
    }
    fn gt(&mut self, ctx: &str, field: &str, floor: u64, got: u64) {
        self.expect(got > floor, || {
            format!("{ctx}: field {field}: expected more than {floor}, got {got}")
        });
    }
    fn finish(self, m: Machine) {
        if self.failures.is_empty() {
            return;
        }
        let console = m.console();
        panic!(
            "{} failure(s):\n  {}\nrun directory: {}\nconsole tail:\n{}",
            self.failures.len(),
            self.failures.join("\n  "),
            m.out_dir().display(),
            tail(&console)
        );
    }
}

/// `doc[key]` as a number. A missing key or a value of another type fails the test naming the
/// key: reading it as 0 would let a renamed or dropped field pass every "== 0" check.
fn num(doc: &Value, key: &str) -> u64 {
    match doc.get(key) {
        Some(v) => v
            .as_u64()
            .unwrap_or_else(|| panic!("ackctl JSON: field {key} is not a number: {v}")),
        None => panic!("ackctl JSON: field {key} is missing in {doc}"),
    }
}

/// A counter of a sparse map (`exits_by_reason` lists only reasons that occurred): the map must
/// be there; an absent key is a count of 0.
fn sparse(doc: &Value, map: &str, key: &str) -> u64 {
    let Some(m) = doc.get(map).and_then(Value::as_object) else {
        panic!("ackctl JSON: object {map} is missing in {doc}");
    };
    m.get(key).map_or(0, |v| {
        v.as_u64()
            .unwrap_or_else(|| panic!("ackctl JSON: {map}.{key} is not a number: {v}"))
    })
}

/// `doc[key]` as an array (missing fails, like [`num`]).
fn list<'a>(doc: &'a Value, key: &str) -> &'a Vec<Value> {
    doc.get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("ackctl JSON: array {key} is missing in {doc}"))
}

#[test]
fn a_missing_json_key_fails_instead_of_reading_zero() {
    let doc = serde_json::json!({"sti_windows": 3, "exits_by_reason": {"1": 5}, "mode": "x"});
    assert_eq!(num(&doc, "sti_windows"), 3);
    assert_eq!(sparse(&doc, "exits_by_reason", "1"), 5);
    assert_eq!(sparse(&doc, "exits_by_reason", "52"), 0);
    for bad in [
        std::panic::catch_unwind(|| num(&doc, "deferrals")),
        std::panic::catch_unwind(|| num(&doc, "mode")),
        std::panic::catch_unwind(|| sparse(&doc, "exits", "1")),
        std::panic::catch_unwind(|| list(&doc, "vectors").len() as u64),
    ] {
        assert!(bad.is_err(), "a missing or mistyped key must fail");
    }
}

/// Per-vector sums of a stats entry: (extint, replays, injections, injections of vectors above
/// DISPATCH class whose delivery policy is `replay` in `policy`, the `ackctl --json policy`
/// document).
fn vector_sums(entry: &Value, policy: &Value) -> (u64, u64, u64, u64) {
    let mut sums = (0, 0, 0, 0);
    for v in list(entry, "vectors") {
        sums.0 += num(v, "extint");
        sums.1 += num(v, "replays");
        sums.2 += num(v, "injections");
        let vector = num(v, "vector");
        if vector >> 4 > 2 {
            let key = format!("{vector:#04x}");
            let p = policy["policies"]
                .get(&key)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("ackctl JSON: policies.{key} is missing in {policy}"));
            if p == "replay" {
                sums.3 += num(v, "injections");
            }
        }
    }
    sums
}

/// `ackctl status --json` shows `cpus` CPUs, all virtualized, all in `mode` (if given).
fn check_status(c: &mut Checks, status: &Value, cpus: u64, mode: Option<&str>, ctx: &str) {
    c.eq(ctx, "cpu_count", cpus, num(status, "cpu_count"));
    c.eq(
        ctx,
        "virtualized_count",
        cpus,
        num(status, "virtualized_count"),
    );
    let entries = list(status, "cpus");
    c.eq(ctx, "cpus[] entries", cpus, entries.len() as u64);
    for e in entries {
        let got = e["mode"].as_str().unwrap_or("not virtualized");
        c.expect(
            got != "not virtualized" && mode.is_none_or(|m| m == got),
            || {
                format!(
                    "{ctx}: cpu {} field mode: expected {}, got {got}",
                    e["cpu"],
                    mode.unwrap_or("any mode")
                )
            },
        );
    }
}

/// What one mode's counters must show after a reset and a stretch of interrupts.
fn check_mode_counters(c: &mut Checks, stats: &Value, mode: &str, policy: &Value) {
    let ctx = format!("ackctl stats after `mode {mode}`");
    let a = &stats["aggregate"];
    c.expect(a["mode"] == mode, || {
        format!(
            "{ctx}: field aggregate.mode: expected {mode}, got {}",
            a["mode"]
        )
    });
    let extint = sparse(a, "exits_by_reason", "1");
    let (by_vector, replays, injections, injections_hi) = vector_sums(a, policy);
    let sti = num(a, "sti_windows");
    let anomalies: u64 = a
        .get("anomalies")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("ackctl JSON: object anomalies is missing in {a}"))
        .keys()
        .map(|k| num(&a["anomalies"], k))
        .sum();
    c.eq(&ctx, "anomalies", 0, anomalies);
    match mode {
        "passthrough" => {
            c.eq(&ctx, "exits_by_reason.1 (external interrupts)", 0, extint);
            c.eq(&ctx, "replays", 0, replays);
            c.eq(&ctx, "injections", 0, injections);
            c.eq(&ctx, "sti_windows", 0, sti);
        }
        "exit-sti" => {
            c.gt(&ctx, "sti_windows", 0, sti);
            c.gt(&ctx, "exits_by_reason.1", 0, extint);
            c.eq(&ctx, "replays", 0, replays);
            c.eq(&ctx, "injections", 0, injections);
        }
        "ack-replay" => {
            c.gt(&ctx, "replays", 0, replays);
            c.eq(&ctx, "sti_windows", 0, sti);
            // DESIGN §4: only DISPATCH-class vectors (and rejected gates) are injected, and
            // vectors whose delivery policy says so (the clock below DISPATCH, issue 8).
            c.eq(
                &ctx,
                "injections of vectors above DISPATCH class with policy replay",
                0,
                injections_hi,
            );
            c.gt(&ctx, "Σ extint by vector", 0, by_vector);
        }
        "ack-inject" => {
            c.gt(&ctx, "injections", 0, injections);
            c.eq(&ctx, "replays", 0, replays);
            c.eq(&ctx, "sti_windows", 0, sti);
            c.gt(&ctx, "Σ extint by vector", 0, by_vector);
        }
        other => c.expect(false, || {
            format!("unknown mode {other} in ACKVISOR_TEST_MODES")
        }),
    }
    // Interrupts flow on every CPU, not only on the BSP.
    for e in list(stats, "cpus") {
        let ctx = format!("{ctx}, cpu {}", e["cpu"]);
        c.expect(e["mode"] == mode, || {
            format!("{ctx}: field mode: expected {mode}, got {}", e["mode"])
        });
        if mode != "passthrough" {
            c.gt(
                &ctx,
                "exits_by_reason.1",
                0,
                sparse(e, "exits_by_reason", "1"),
            );
        }
    }
}

/// The machine's own books after the finish word.
fn judge_books(out: &RunOutput, cpus: u64, min_interrupts: u64) {
    let mut v = Verdict::new(out);
    if let Some(l) = v.line("serve", None) {
        v.serve_books_hold(l, cpus, min_interrupts);
    }
    for cpu in 0..cpus {
        match out
            .lines("serve-cpu", None)
            .find(|l| l.num("cpu") == Some(cpu))
        {
            Some(l) => {
                v.eq(l, "lost", 0)
                    .eq(l, "isr_left", 0)
                    .eq(l, "undrained", 0)
                    .gt(l, "ran", 0)
                    .eq_field(l, "ran", "raised");
            }
            None => v.fail(format!("no RESULT serve-cpu line for cpu {cpu}")),
        }
    }
    v.finish();
}

fn finish(m: Machine) -> RunOutput {
    let model = m.spec().model.clone();
    m.finish()
        .unwrap_or_else(|e| panic!("model {model}: finish: {e}"));
    m.wait()
        .unwrap_or_else(|e| panic!("model {model}: wait: {e}"))
}

/// Every mode in turn through `ackctl` only: status shows every CPU virtualized in that mode,
/// and each mode's own counters move while the others' stay at zero.
fn ackctl_switches_every_mode_on_every_cpu(model: &str) {
    let cpus = 2;
    let (m, addr) = boot(&RunSpec::serve(model, cpus, 50));
    let mut c = Checks::new(model);
    let status = ackctl_json(model, &m, &addr, &["status"]);
    check_status(&mut c, &status, cpus.into(), None, "ackctl status at boot");
    // The test machine's platform default: its clock (0xd1) is `auto`, everything else replay.
    let policy = ackctl_json(model, &m, &addr, &["policy"]);
    c.eq(
        "ackctl policy",
        "virtualized_cpus",
        cpus.into(),
        num(&policy, "virtualized_cpus"),
    );
    c.expect(
        policy["policies"]["0xd1"] == "auto" && policy["policies"]["0x41"] == "replay",
        || format!("ackctl policy: expected 0xd1 auto and 0x41 replay, got {policy}"),
    );
    for mode in modes() {
        let applied = ackctl_json(model, &m, &addr, &["mode", &mode]);
        c.eq(
            &format!("ackctl mode {mode}"),
            "cpus_applied",
            cpus.into(),
            num(&applied, "cpus_applied"),
        );
        let status = ackctl_json(model, &m, &addr, &["status"]);
        check_status(
            &mut c,
            &status,
            cpus.into(),
            Some(&mode),
            &format!("ackctl status after `mode {mode}`"),
        );
        let reset = ackctl_json(model, &m, &addr, &["stats", "reset"]);
        c.eq(
            "ackctl stats reset",
            "cpus_reset",
            cpus.into(),
            num(&reset, "cpus_reset"),
        );
        std::thread::sleep(Duration::from_millis(1500));
        let stats = ackctl_json(model, &m, &addr, &["stats", "--per-cpu"]);
        check_mode_counters(&mut c, &stats, &mode, &policy);
    }
    if !c.failures.is_empty() {
        c.finish(m);
        return;
    }
    let out = finish(m);
    judge_books(&out, cpus.into(), 1000);
}

/// Rounds each CPU runs at least in the soak. At these shapes 9,000 rounds per CPU on 2 CPUs
/// bring about 119,000 interrupts by themselves (README, "Soak"), so the 100,000 below come
/// from the rounds, however fast or slow the flips go.
const SOAK_MIN_ROUNDS: u32 = 9_000;
/// The interrupts the soak must see.
const SOAK_MIN_INTERRUPTS: u64 = 100_000;
/// Flips in the soak.
const SOAK_FLIPS: usize = 100;
/// The mode a serve machine starts in (the kernel's default `start_mode`).
const SERVE_START_MODE: &str = "ack-replay";

/// The soak's seed: `ACKVISOR_SOAK_SEED` (decimal or 0x hex) or one drawn from the clock.
fn soak_seed() -> u64 {
    match std::env::var("ACKVISOR_SOAK_SEED") {
        Ok(s) if !s.trim().is_empty() => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("ACKVISOR_SOAK_SEED={s}: {e}"))
        }
        _ => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// splitmix64: a small, well-mixed generator whose whole state is the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `flips` modes to set, in an order drawn from `seed`, starting from `start`: each flip goes
/// to another mode, preferring a transition not yet taken, so every ordered pair of distinct
/// modes (12 for four modes) happens. Returns the order and the transitions it takes.
fn flip_order(
    seed: u64,
    modes: &[String],
    start: &str,
    flips: usize,
) -> (Vec<String>, std::collections::BTreeSet<(String, String)>) {
    let mut rng = Rng(seed);
    let mut taken = std::collections::BTreeSet::new();
    let mut order = Vec::with_capacity(flips);
    let mut current = start.to_string();
    for _ in 0..flips {
        let others: Vec<&String> = modes.iter().filter(|m| **m != current).collect();
        if others.is_empty() {
            break;
        }
        let fresh: Vec<&String> = others
            .iter()
            .copied()
            .filter(|m| !taken.contains(&(current.clone(), (*m).clone())))
            .collect();
        let pool = if fresh.is_empty() { &others } else { &fresh };
        let next = pool[rng.below(pool.len())].clone();
        if modes.contains(&current) {
            taken.insert((current.clone(), next.clone()));
        }
        order.push(next.clone());
        current = next;
    }
    (order, taken)
}

#[test]
fn the_soak_order_takes_every_transition_for_any_seed() {
    let modes: Vec<String> = ackvisor_runner::modes::ALL.map(String::from).to_vec();
    for seed in [0, 1, 42, 0xDEAD_BEEF, u64::MAX] {
        let (order, taken) = flip_order(seed, &modes, SERVE_START_MODE, SOAK_FLIPS);
        assert_eq!(order.len(), SOAK_FLIPS);
        assert_eq!(taken.len(), 12, "seed {seed}: {taken:?}");
        let mut prev = SERVE_START_MODE.to_string();
        for m in &order {
            assert_ne!(*m, prev, "seed {seed}: a flip to the same mode");
            prev = m.clone();
        }
    }
    // The same seed gives the same order.
    assert_eq!(
        flip_order(7, &modes, SERVE_START_MODE, SOAK_FLIPS),
        flip_order(7, &modes, SERVE_START_MODE, SOAK_FLIPS)
    );
}

/// 100 mode flips through `ackctl`, in an order drawn from a printed seed that takes every
/// transition between two modes, while the clock, self-IPIs and cross-CPU IPIs run at a high
/// rate on 2 CPUs. Then: at least 100,000 interrupts from the rounds alone, none lost or
/// duplicated, ISR empty, every CPU still virtualized and in the last mode, and the core's
/// books (exits, replays, injections per vector, hand-overs) exact against the machine's.
fn soak_hundred_flips_lose_nothing(model: &str) {
    let cpus = 2;
    let seed = soak_seed();
    let list = modes();
    let (order, taken) = flip_order(seed, &list, SERVE_START_MODE, SOAK_FLIPS);
    let k = list.len();
    eprintln!(
        "soak on {model}: ACKVISOR_SOAK_SEED={seed:#x} ({} of {} transitions)",
        taken.len(),
        k * (k - 1)
    );
    assert_eq!(
        taken.len(),
        k * (k - 1),
        "seed {seed:#x} does not take every transition: {taken:?}"
    );
    let spec = RunSpec::serve(model, cpus, SOAK_MIN_ROUNDS)
        .param("clock_period", 2500)
        .param("stretch", 1500);
    let (m, addr) = boot(&spec);
    let mut c = Checks::new(model);
    let started = Instant::now();
    for (flip, mode) in order.iter().enumerate() {
        let out = ackctl::run(&addr, &["mode", mode]).unwrap_or_else(|e| panic!("{e}"));
        c.expect(out.ok(), || {
            format!(
                "seed {seed:#x} flip {flip}: `{}` failed: {}",
                out.command,
                out.stderr.trim()
            )
        });
        if !out.ok() {
            break;
        }
        if flip % 10 == 9 {
            let status = ackctl_json(model, &m, &addr, &["status"]);
            check_status(
                &mut c,
                &status,
                cpus.into(),
                Some(mode),
                &format!("ackctl status after flip {flip} (seed {seed:#x})"),
            );
        }
    }
    let flips_wall = started.elapsed();
    if !c.failures.is_empty() {
        c.finish(m);
        return;
    }
    let out = finish(m);
    eprintln!(
        "soak on {model}: {SOAK_FLIPS} flips in {:.1}s, machine {:.1}s",
        flips_wall.as_secs_f64(),
        out.wall.as_secs_f64()
    );
    let mut v = Verdict::new(&out);
    if let Some(l) = v.line("serve", None) {
        eprintln!(
            "soak on {model}: {} interrupts in {} rounds per CPU (at least)",
            l.get("ran").unwrap_or("?"),
            l.get("rounds_min").unwrap_or("?")
        );
        v.eq(l, "set_modes", SOAK_FLIPS as u64)
            .gt(l, "rounds_min", u64::from(SOAK_MIN_ROUNDS) - 1)
            .eq(l, "exit_mismatch", 0)
            .eq(l, "replay_mismatch", 0)
            .eq(l, "inject_mismatch", 0)
            .eq(l, "anomalies", 0)
            .eq(l, "sti_window_info_valid", 0)
            .eq_field(l, "exiting_resumes", "guest_takes")
            .eq(l, "unraised", 0)
            .eq(l, "clock_dups", 0)
            .gt(l, "cross_sent", 0)
            .eq_field(l, "cross_handled", "cross_sent");
    }
    if let Some(l) = v.line("serve", None) {
        // Every mode flipped to did its own work.
        let has = |m: &str| list.iter().any(|x| x == m);
        if has("ack-replay") {
            v.gt(l, "core_replays", 0);
        }
        if has("ack-inject") {
            v.gt(l, "core_injections", 0);
        }
        if has("exit-sti") {
            v.gt(l, "sti_windows", 0).gt(l, "exiting_resumes", 0);
        }
    }
    for l in out.lines("serve-cpu", None) {
        v.eq(l, "exit_mismatch", 0)
            .eq(l, "replay_mismatch", 0)
            .eq(l, "inject_mismatch", 0);
    }
    v.finish();
    judge_books(&out, cpus.into(), SOAK_MIN_INTERRUPTS);
}

// ---- malformed input on the link -----------------------------------------------------------

/// A raw client of the link (through the runner's relay), speaking `control::frame` by hand.
struct Raw {
    stream: TcpStream,
    rx: Vec<u8>,
    seq: u16,
}

/// What came back for one frame.
#[derive(Debug)]
enum Reply {
    Response(u32, Vec<u8>),
    Nak(Option<FrameError>),
}

impl Raw {
    fn connect(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect to the relay");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            rx: Vec::new(),
            seq: 100,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the link");
    }

    fn request_bytes(&mut self, code: u32, input: &[u8]) -> (u16, Vec<u8>) {
        self.seq += 1;
        let mut out = vec![0u8; frame::OVERHEAD + frame::REQUEST_PREFIX + input.len()];
        let n = frame::encode_request(self.seq, code, 64 * 1024, input, &mut out)
            .expect("encode request");
        out.truncate(n);
        (self.seq, out)
    }

    /// The next response or NAK, within `wait`.
    fn reply(&mut self, wait: Duration) -> Option<Reply> {
        let deadline = Instant::now() + wait;
        loop {
            match frame::decode(&self.rx, 1 << 20) {
                Decoded::Frame { frame, used } => {
                    let reply = match frame.kind {
                        Kind::Response => {
                            let (status, body) =
                                frame::response_parts(frame.payload).expect("response parts");
                            Some(Reply::Response(status, body.to_vec()))
                        }
                        Kind::Nak => Some(Reply::Nak(frame::nak_error(frame.payload))),
                        Kind::Request => None,
                    };
                    self.rx.drain(..used);
                    if reply.is_some() {
                        return reply;
                    }
                }
                Decoded::Rejected { skip, .. } => {
                    self.rx.drain(..skip);
                }
                Decoded::Incomplete => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.stream
                        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                        .expect("timeout");
                    let mut buf = [0u8; 65536];
                    match self.stream.read(&mut buf) {
                        Ok(0) => return None,
                        Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// A good status request answered with status 0.
    fn status_ok(&mut self) -> Result<(), String> {
        let (input, len) = Request::Status.encode();
        let (_, bytes) = self.request_bytes(wire::IOCTL_STATUS, &input[..len]);
        self.send(&bytes);
        match self.reply(Duration::from_secs(20)) {
            Some(Reply::Response(0, _)) => Ok(()),
            other => Err(format!("a good status request got {other:?}")),
        }
    }
}

/// Broken frames get NAKs, malformed requests get error statuses naming the problem, and a good
/// request after each still succeeds.
fn malformed_input_gets_errors_and_the_link_keeps_serving(model: &str) {
    let (m, addr) = boot(&RunSpec::serve(model, 2, 20));
    let mut raw = Raw::connect(&addr);
    let mut c = Checks::new(model);
    let wait = Duration::from_secs(20);
    let check = |c: &mut Checks,
                 case: &str,
                 got: Option<Reply>,
                 ok: &dyn Fn(&Reply) -> bool,
                 expected: &str,
                 raw: &mut Raw| {
        c.expect(got.as_ref().is_some_and(ok), || {
            format!("{case}: expected {expected}, got {got:?}")
        });
        if let Err(e) = raw.status_ok() {
            c.expect(false, || format!("after {case}: {e}"));
        }
    };
    let refused = |want: fn(&ControlError) -> bool| {
        move |r: &Reply| match r {
            Reply::Response(status, body) if *status != 0 => {
                ControlError::read_reply(body).is_some_and(|e| want(&e))
            }
            _ => false,
        }
    };

    // Garbage before a good frame is skipped silently: the frame after it is answered.
    raw.send(b"line noise \x00\xff\x13 AckX");
    let got = if raw.status_ok().is_ok() {
        Some(Reply::Response(0, Vec::new()))
    } else {
        None
    };
    check(
        &mut c,
        "garbage then a good request",
        got,
        &|r| matches!(r, Reply::Response(0, _)),
        "status 0",
        &mut raw,
    );

    // Bad payload CRC.
    let (input, len) = Request::Status.encode();
    let (_, mut bytes) = raw.request_bytes(wire::IOCTL_STATUS, &input[..len]);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5A;
    raw.send(&bytes);
    let got = raw.reply(wait);
    check(
        &mut c,
        "bad payload CRC",
        got,
        &|r| matches!(r, Reply::Nak(Some(FrameError::PayloadChecksum { .. }))),
        "NAK PayloadChecksum",
        &mut raw,
    );

    // Bad header CRC.
    let (_, mut bytes) = raw.request_bytes(wire::IOCTL_STATUS, &input[..len]);
    bytes[12] ^= 0xFF;
    raw.send(&bytes);
    let got = raw.reply(wait);
    check(
        &mut c,
        "bad header CRC",
        got,
        &|r| matches!(r, Reply::Nak(Some(FrameError::HeaderChecksum))),
        "NAK HeaderChecksum",
        &mut raw,
    );

    // Oversized: a valid header announcing more payload than the server accepts.
    let mut header = [0u8; frame::HEADER_SIZE];
    header[..4].copy_from_slice(&frame::MAGIC);
    header[4..6].copy_from_slice(&(Kind::Request as u16).to_le_bytes());
    header[6..8].copy_from_slice(&7u16.to_le_bytes());
    header[8..12].copy_from_slice(&100_000u32.to_le_bytes());
    let crc = frame::crc32(&header[..12]);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    raw.send(&header);
    let got = raw.reply(wait);
    check(
        &mut c,
        "oversized frame",
        got,
        &|r| matches!(r, Reply::Nak(Some(FrameError::Oversized { .. }))),
        "NAK Oversized",
        &mut raw,
    );

    // Truncated: half a frame, then silence.
    let (_, bytes) = raw.request_bytes(wire::IOCTL_STATUS, &input[..len]);
    raw.send(&bytes[..bytes.len() / 2]);
    let got = raw.reply(Duration::from_secs(60));
    check(
        &mut c,
        "truncated frame",
        got,
        &|r| matches!(r, Reply::Nak(Some(FrameError::Truncated { .. }))),
        "NAK Truncated",
        &mut raw,
    );

    // Wrong input size.
    let (_, bytes) = raw.request_bytes(wire::IOCTL_STATUS, &input[..len - 4]);
    raw.send(&bytes);
    let got = raw.reply(wait);
    check(
        &mut c,
        "request of the wrong size",
        got,
        &refused(|e| matches!(e, ControlError::WrongInputSize { .. })),
        "WrongInputSize",
        &mut raw,
    );

    // Unknown code.
    let (_, bytes) = raw.request_bytes(0x0022_7FFC, &input[..len]);
    raw.send(&bytes);
    let got = raw.reply(wait);
    check(
        &mut c,
        "unknown code",
        got,
        &refused(|e| matches!(e, ControlError::UnknownCode { .. })),
        "UnknownCode",
        &mut raw,
    );

    // Another protocol version.
    let mut buf = [0u8; StatusRequest::SIZE];
    let old = StatusRequest {
        header: RequestHeader {
            version: wire::PROTOCOL_VERSION + 41,
            ..RequestHeader::CURRENT
        },
    };
    old.encode(&mut buf).expect("encode");
    let (_, bytes) = raw.request_bytes(wire::IOCTL_STATUS, &buf);
    raw.send(&bytes);
    let got = raw.reply(wait);
    check(
        &mut c,
        "bad version",
        got,
        &refused(|e| matches!(e, ControlError::VersionMismatch { .. })),
        "VersionMismatch",
        &mut raw,
    );

    // Unknown mode.
    let mut buf = [0u8; SetModeRequest::SIZE];
    SetModeRequest {
        header: RequestHeader::CURRENT,
        mode: 9,
        reserved: 0,
    }
    .encode(&mut buf)
    .expect("encode");
    let (_, bytes) = raw.request_bytes(wire::IOCTL_SET_MODE, &buf);
    raw.send(&bytes);
    let got = raw.reply(wait);
    check(
        &mut c,
        "unknown mode",
        got,
        &refused(|e| matches!(e, ControlError::UnknownMode { .. })),
        "UnknownMode",
        &mut raw,
    );
    drop(raw);

    // ackctl still works on the same link.
    let status = ackctl_json(model, &m, &addr, &["status"]);
    check_status(
        &mut c,
        &status,
        2,
        None,
        "ackctl status after the malformed input",
    );
    if !c.failures.is_empty() {
        c.finish(m);
        return;
    }
    let out = finish(m);
    let mut v = Verdict::new(&out);
    if let Some(l) = v.line("serve", None) {
        v.gt(l, "naks", 3)
            .gt(l, "truncated", 0)
            .gt(l, "refused", 3)
            .gt(l, "discarded", 0);
    }
    v.finish();
    judge_books(&out, 2, 1000);
}

ackvisor_runner::per_model!(
    ackctl_switches_every_mode_on_every_cpu,
    soak_hundred_flips_lose_nothing,
    malformed_input_gets_errors_and_the_link_keeps_serving,
);
