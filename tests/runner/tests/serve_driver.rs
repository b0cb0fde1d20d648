//! `ackctl` drives the real ackvisor.sys (scenario `nt-serve`): the test machine's miniature NT
//! loads the image, and each request on COM1 reaches it as IRP_MJ_CREATE,
//! IRP_MJ_DEVICE_CONTROL (METHOD_BUFFERED) and IRP_MJ_CLOSE; the reply is built from
//! `IoStatus`. The host uses only the real `ackctl` binary, plus raw frames for requests ackctl
//! cannot make (an unknown mode value, a METHOD_NEITHER code). At the power button the machine
//! closes its books, calls DriverUnload and prints the verifier's; the runner judges both
//! (`ackvisor_runner::serve_driver`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ackvisor_runner::{Machine, RunOutput, Verdict, ackctl, per_model, serve_driver, start};
use ackvisor_vmm::control::ControlError;
use ackvisor_vmm::control::frame::{self, Decoded, Kind};
use ackvisor_vmm::control::wire::{self, Field, RequestHeader, SetModeRequest, StatusRequest};
use serde_json::Value;

/// The mode the session starts in (the kernel's default `start_mode`).
const START_MODE: &str = "ack-replay";
/// How long each mode's interrupts flow between two statistics reads.
const STRETCH: Duration = Duration::from_millis(1500);
/// `ackctl --timeout`: seconds to wait for each reply before sending the request again. Bochs
/// emulating two CPUs on a loaded host can take longer than ackctl's default 3 s to send a
/// 21 KiB per-CPU statistics reply (in ack-inject every interrupt takes two VM exits, each
/// costly to emulate); a reply late past the timeout makes ackctl send again, and the answers
/// pile up behind each other.
const LINK_TIMEOUT: &str = "20";

fn boot(model: &str, cpus: u32) -> (Machine, String) {
    let spec = serve_driver::spec(model, cpus, 50);
    let mut m = start(&spec).unwrap_or_else(|e| panic!("model {model}: could not start: {e}"));
    if let Err(e) = m.wait_for_result("serve-ready", Duration::from_secs(180)) {
        panic!("model {model}: machine not ready: {e}");
    }
    let addr = m.machine_arg().expect("serve machines have a link");
    (m, addr)
}

fn tail(text: &str) -> String {
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Collects failures, then reports them all with the machine's console.
struct Checks {
    model: String,
    /// The machine's CPUs.
    cpus: u64,
    failures: Vec<String>,
}

impl Checks {
    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failures
                .push(format!("model {}: {}", self.model, what()));
        }
    }
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, ctx: &str, expected: T, got: T) {
        self.expect(expected == got, || {
            format!("{ctx}: expected {expected:?}, got {got:?}")
        });
    }
    fn gt(&mut self, ctx: &str, floor: u64, got: u64) {
        self.expect(got > floor, || {
            format!("{ctx}: expected more than {floor}, got {got}")
        });
    }
}

/// Runs ackctl with `--json`; its document, or panics naming the command and the console.
fn json(m: &Machine, addr: &str, args: &[&str]) -> Value {
    let mut full = vec!["--timeout", LINK_TIMEOUT];
    full.extend_from_slice(args);
    full.push("--json");
    let out = ackctl::run(addr, &full).unwrap_or_else(|e| panic!("{e}"));
    out.json()
        .unwrap_or_else(|e| panic!("{e}\nmachine console tail:\n{}", tail(&m.console())))
}

/// `doc[key]` as a number; missing or another type fails (reading it as 0 would pass checks
/// for zero).
fn num(doc: &Value, key: &str) -> u64 {
    doc.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("ackctl JSON: number {key} missing in {doc}"))
}

/// The counters of one mode's stretch that the modes tell apart, from `ackctl stats --json`'s
/// aggregate: external-interrupt exits, replays, injections, exit-sti windows, anomalies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    extint: u64,
    replays: u64,
    injections: u64,
    sti_windows: u64,
    anomalies: u64,
}

fn counters(stats: &Value) -> Counters {
    let a = stats
        .get("aggregate")
        .unwrap_or_else(|| panic!("ackctl JSON: aggregate missing in {stats}"));
    let reasons = a
        .get("exits_by_reason")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("ackctl JSON: exits_by_reason missing in {a}"));
    let mut c = Counters {
        // A sparse map: an absent reason occurred 0 times.
        extint: reasons.get("1").and_then(Value::as_u64).unwrap_or(0),
        sti_windows: num(a, "sti_windows"),
        ..Counters::default()
    };
    for v in a
        .get("vectors")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("ackctl JSON: vectors missing in {a}"))
    {
        c.replays += num(v, "replays");
        c.injections += num(v, "injections");
    }
    let anomalies = a
        .get("anomalies")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("ackctl JSON: anomalies missing in {a}"));
    c.anomalies = anomalies.values().filter_map(Value::as_u64).sum();
    c
}

fn delta(after: Counters, before: Counters) -> Counters {
    Counters {
        extint: after.extint.saturating_sub(before.extint),
        replays: after.replays.saturating_sub(before.replays),
        injections: after.injections.saturating_sub(before.injections),
        sti_windows: after.sti_windows.saturating_sub(before.sti_windows),
        anomalies: after.anomalies.saturating_sub(before.anomalies),
    }
}

/// What one mode's stretch must show (DESIGN §4): passthrough exits for nothing; exit-sti opens
/// windows and neither replays nor injects; ack-replay replays and opens no window; ack-inject
/// injects and neither replays nor opens a window.
fn check_mode(c: &mut Checks, mode: &str, d: Counters) {
    let ctx = format!("ackctl stats over a stretch in {mode}");
    c.eq(&format!("{ctx}: anomalies"), 0, d.anomalies);
    match mode {
        "passthrough" => {
            c.eq(&format!("{ctx}: external-interrupt exits"), 0, d.extint);
            c.eq(&format!("{ctx}: replays"), 0, d.replays);
            c.eq(&format!("{ctx}: injections"), 0, d.injections);
            c.eq(&format!("{ctx}: sti windows"), 0, d.sti_windows);
        }
        "exit-sti" => {
            c.gt(&format!("{ctx}: external-interrupt exits"), 0, d.extint);
            c.gt(&format!("{ctx}: sti windows"), 0, d.sti_windows);
            c.eq(&format!("{ctx}: replays"), 0, d.replays);
            c.eq(&format!("{ctx}: injections"), 0, d.injections);
        }
        "ack-replay" => {
            c.gt(&format!("{ctx}: external-interrupt exits"), 0, d.extint);
            c.gt(&format!("{ctx}: replays"), 0, d.replays);
            c.eq(&format!("{ctx}: sti windows"), 0, d.sti_windows);
        }
        "ack-inject" => {
            c.gt(&format!("{ctx}: external-interrupt exits"), 0, d.extint);
            c.gt(&format!("{ctx}: injections"), 0, d.injections);
            c.eq(&format!("{ctx}: replays"), 0, d.replays);
            c.eq(&format!("{ctx}: sti windows"), 0, d.sti_windows);
        }
        other => c.expect(false, || format!("unknown mode {other}")),
    }
}

/// `ackctl status --json`: every CPU virtualized, all in `mode`.
fn check_status(c: &mut Checks, status: &Value, mode: &str, ctx: &str) {
    let n = c.cpus;
    c.eq(&format!("{ctx}: cpu_count"), n, num(status, "cpu_count"));
    c.eq(
        &format!("{ctx}: virtualized_count"),
        n,
        num(status, "virtualized_count"),
    );
    let cpus = status
        .get("cpus")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("ackctl JSON: cpus missing in {status}"));
    c.eq(&format!("{ctx}: cpus[] entries"), n as usize, cpus.len());
    for e in cpus {
        c.eq(
            &format!("{ctx}: cpu {} mode", e["cpu"]),
            Some(mode),
            e["mode"].as_str(),
        );
    }
}

/// One raw request frame on the link (for values ackctl never sends); the response's status
/// and body.
fn raw_request(addr: &str, code: u32, capacity: u32, input: &[u8]) -> (u32, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let mut out = vec![0u8; frame::OVERHEAD + frame::REQUEST_PREFIX + input.len()];
    let n = frame::encode_request(0x5151, code, capacity, input, &mut out).expect("encode");
    s.write_all(&out[..n]).expect("send");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rx = Vec::new();
    while Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => rx.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if let Decoded::Frame { frame, .. } = frame::decode(&rx, 1 << 16) {
            assert_eq!(
                frame.kind,
                Kind::Response,
                "a response, not {:?}",
                frame.kind
            );
            let (status, body) = frame::response_parts(frame.payload).expect("status word");
            return (status, body.to_vec());
        }
    }
    panic!("no response to the raw request {code:#x} within 20 s");
}

/// Runs the session; returns the machine's output after the power button.
fn session(model: &str, c: &mut Checks) -> RunOutput {
    let (m, addr) = boot(model, c.cpus as u32);
    let status = json(&m, &addr, &["status"]);
    check_status(c, &status, START_MODE, "ackctl status at boot");

    // The image's delivery policy: its platform's default for the clock is `auto`, the rest
    // replay; every CPU reports it.
    let policy = json(&m, &addr, &["policy"]);
    c.eq(
        "ackctl policy: virtualized_cpus",
        c.cpus,
        num(&policy, "virtualized_cpus"),
    );
    c.eq(
        "ackctl policy: 0x41",
        Some("replay"),
        policy["policies"]["0x41"].as_str(),
    );

    // A vector below 0x30 takes no policy: the image refuses with its NTSTATUS (warning
    // severity, the ErrorReply in the buffer), and ackctl prints the precise error.
    let refused = ackctl::run(
        &addr,
        &["--timeout", LINK_TIMEOUT, "policy", "0x20", "inject"],
    )
    .expect("ackctl runs");
    let expected = ControlError::VectorNotConfigurable {
        vector: 0x20,
        first: 0x30,
    }
    .to_string();
    c.expect(!refused.ok() && refused.stderr.contains(&expected), || {
        format!(
            "ackctl policy 0x20 inject: expected a failure printing {expected:?}, got exit {:?}, \
             stderr {:?}",
            refused.code,
            refused.stderr.trim()
        )
    });

    // An unknown mode value (ackctl parses names, so a raw frame): the capacity is below an
    // ErrorReply, but the output buffer is what ackctl's Windows side passes (always room for
    // one), so the refusal keeps its argument.
    let mut input = [0u8; SetModeRequest::SIZE];
    SetModeRequest {
        header: RequestHeader::CURRENT,
        mode: 9,
        reserved: 0,
    }
    .encode(&mut input)
    .expect("encode");
    let (status, body) = raw_request(&addr, wire::IOCTL_SET_MODE, 16, &input);
    c.eq("raw set-mode 9: status", wire::status::UNKNOWN_MODE, status);
    c.eq(
        "raw set-mode 9: error",
        Some(ControlError::UnknownMode { mode: 9 }),
        ControlError::read_reply(&body),
    );
    // A METHOD_NEITHER code: the image completes it with error severity and no data, so the
    // client knows only the status (as GetLastError tells it on Windows): no arguments.
    let mut input = [0u8; StatusRequest::SIZE];
    StatusRequest {
        header: RequestHeader::CURRENT,
    }
    .encode(&mut input)
    .expect("encode");
    let neither = wire::IOCTL_STATUS | 3;
    let (status, body) = raw_request(&addr, neither, 64, &input);
    c.eq(
        "raw METHOD_NEITHER: status",
        wire::status::UNKNOWN_CODE,
        status,
    );
    c.eq(
        "raw METHOD_NEITHER: error",
        Some(ControlError::UnknownCode { code: 0 }),
        ControlError::read_reply(&body),
    );

    // Every mode, set on every CPU, each one's counters over a stretch.
    for mode in ackvisor_runner::modes::ALL {
        let applied = json(&m, &addr, &["mode", mode]);
        c.eq(
            &format!("ackctl mode {mode}: cpus_applied"),
            c.cpus,
            num(&applied, "cpus_applied"),
        );
        let status = json(&m, &addr, &["status"]);
        check_status(
            c,
            &status,
            mode,
            &format!("ackctl status after mode {mode}"),
        );
        let before = counters(&json(&m, &addr, &["stats"]));
        std::thread::sleep(STRETCH);
        let after = counters(&json(&m, &addr, &["stats"]));
        check_mode(c, mode, delta(after, before));
    }
    // ack-inject is the last mode: restart the books on both sides (the machine's and the
    // image's) and let it run, so at the end the image's counters can be compared with the
    // machine's runs vector by vector.
    c.eq("modes end in", "ack-inject", ackvisor_runner::modes::ALL[3]);
    let reset = json(&m, &addr, &["stats", "reset"]);
    c.eq(
        "ackctl stats reset: cpus_reset",
        c.cpus,
        num(&reset, "cpus_reset"),
    );
    std::thread::sleep(STRETCH);
    let s = counters(&json(&m, &addr, &["stats", "--per-cpu"]));
    c.gt("ackctl stats after the reset: injections", 0, s.injections);
    // No equality here: interrupts keep arriving while the image encodes its reply, so counters
    // later in the reply (injections) include events the earlier ones (exits) missed. The
    // exact comparison is the machine's, after it drained (judged on its books below).
    c.gt("ackctl stats after the reset: exits", 0, s.extint);
    if !c.failures.is_empty() {
        panic!(
            "{} failure(s):\n  {}\nrun directory: {}\nconsole tail:\n{}",
            c.failures.len(),
            c.failures.join("\n  "),
            m.out_dir().display(),
            tail(&m.console())
        );
    }
    m.finish()
        .unwrap_or_else(|e| panic!("model {model}: finish: {e}"));
    m.wait()
        .unwrap_or_else(|e| panic!("model {model}: wait: {e}"))
}

/// ackctl against the image on `cpus` CPUs: status, policy, two refusals with their precise
/// errors, every mode on every CPU with its own counters moving, a reset; then the machine's
/// books, the image's statistics against the machine's tallies, and the verifier's books after
/// DriverUnload.
fn ackctl_drives_the_image_on(model: &str, cpus: u32) {
    let mut c = Checks {
        model: model.into(),
        cpus: cpus.into(),
        failures: Vec::new(),
    };
    let out = session(model, &mut c);
    let mut v = Verdict::new(&out);
    serve_driver::judge(&mut v, &out, cpus.into(), 1000);
    serve_driver::judge_agreement(&mut v, &out);
    // The one `ackctl stats reset` restarted both books.
    match out
        .lines(serve_driver::SCENARIO, None)
        .find(|l| l.get("client_resets").is_some())
    {
        Some(l) => {
            v.eq(l, "client_resets", 1);
        }
        None => v.fail("no client_resets in the unload line".into()),
    }
    // Every request above went through the image: the 23 of ackctl and the raw frames (more if
    // ackctl had to send one again or grow its buffer after an output-too-small refusal), at
    // least the three refusals above, and the four mode changes.
    if let Some(l) = v.line("serve", None) {
        v.gt(l, "requests", 22)
            .gt(l, "refused", 2)
            .eq(l, "set_modes", 4);
    }
    v.finish();
}

/// On the CPUs the driver mode runs by default (2: the image moves the serving thread to the
/// AP and back for every mode change).
fn ackctl_drives_the_image(model: &str) {
    ackctl_drives_the_image_on(model, serve_driver::CPUS);
}

per_model!(ackctl_drives_the_image);

/// One CPU, where no thread moves: the first model only (the mode setting through every CPU is
/// the 2-CPU tests' part).
#[test]
fn ackctl_drives_the_image_on_one_cpu() {
    ackctl_drives_the_image_on(ackvisor_runner::MODELS[0], 1);
}
