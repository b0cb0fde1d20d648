//! Output: aligned tables for people, JSON (one document per command, one line per `--watch`
//! sample) for scripts.

use std::io::Write;

use ackvisor_vmm::Mode;
use ackvisor_vmm::control::wire::{self, CpuStats, FEATURE_NAMES, PolicyReply};
use ackvisor_vmm::intr::vector_policy::VectorPolicy;
use ackvisor_vmm::stats::{ANOMALY_KINDS, Anomaly};
use serde_json::{Value, json};

use crate::ClientError;
use crate::session::{StatsSample, Status, decode_mode};

/// Names of the anomaly counters, by `Anomaly as usize`. The array's length is the core's
/// `ANOMALY_KINDS`, so a new kind fails to compile here until it has a name.
pub const ANOMALY_NAMES: [(Anomaly, &str); ANOMALY_KINDS] = [
    (Anomaly::InvalidIntrInfo, "invalid-intr-info"),
    (Anomaly::UnexpectedIntrType, "unexpected-intr-type"),
    (Anomaly::RejectedGate, "rejected-gate"),
    (Anomaly::DuplicatePending, "duplicate-pending"),
    (Anomaly::ForeignVmcall, "foreign-vmcall"),
];

/// How `stats` is shown.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsView {
    /// A row per CPU.
    pub per_cpu: bool,
    /// Only this vector.
    pub vector: Option<u8>,
    /// JSON instead of tables.
    pub json: bool,
}

fn io(e: std::io::Error) -> ClientError {
    ClientError::Io(e.kind())
}

fn emit(out: &mut dyn Write, text: &str) -> Result<(), ClientError> {
    out.write_all(text.as_bytes()).map_err(io)
}

fn emit_json(out: &mut dyn Write, value: &Value) -> Result<(), ClientError> {
    emit(out, &format!("{value}\n"))
}

/// A wire mode for people: its name, or what the special values mean.
pub fn mode_label(raw: u32) -> String {
    match raw {
        wire::MODE_MIXED => "mixed".to_owned(),
        _ => match decode_mode(raw) {
            None => "not virtualized".to_owned(),
            Some(Ok(m)) => m.name().to_owned(),
            Some(Err(n)) => format!("unknown mode {n}"),
        },
    }
}

fn mode_json(raw: u32) -> Value {
    match raw {
        wire::MODE_MIXED => json!("mixed"),
        _ => match decode_mode(raw) {
            None => Value::Null,
            Some(Ok(m)) => json!(m.name()),
            Some(Err(n)) => json!(n),
        },
    }
}

/// Bytes as people read them (KiB/MiB, exact bytes beside).
pub fn bytes_label(n: u64) -> String {
    const KIB: u64 = 1024;
    if n >= KIB * KIB {
        format!("{:.1} MiB ({n} bytes)", n as f64 / (KIB * KIB) as f64)
    } else if n >= KIB {
        format!("{:.1} KiB ({n} bytes)", n as f64 / KIB as f64)
    } else {
        format!("{n} bytes")
    }
}

/// `ackctl status`.
pub fn status(s: &Status, json: bool, out: &mut dyn Write) -> Result<(), ClientError> {
    let (major, minor, patch) = s.build_version;
    let known: Vec<(&str, bool)> = FEATURE_NAMES
        .iter()
        .map(|(bit, name)| (*name, s.feature_bits & bit != 0))
        .collect();
    if json {
        let features = s.features.map(|_| {
            known
                .iter()
                .map(|(name, on)| ((*name).to_owned(), json!(on)))
                .collect::<serde_json::Map<_, _>>()
        });
        let cpus: Vec<Value> = s
            .modes
            .iter()
            .map(|(cpu, mode)| {
                let mode = match mode {
                    None => Value::Null,
                    Some(Ok(m)) => json!(m.name()),
                    Some(Err(n)) => json!(n),
                };
                json!({ "cpu": cpu, "mode": mode })
            })
            .collect();
        return emit_json(
            out,
            &json!({
                "protocol_version": s.protocol_version,
                "build_version": format!("{major}.{minor}.{patch}"),
                "cpu_count": s.cpu_count,
                "virtualized_count": s.virtualized_count,
                "bytes_per_cpu": s.bytes_per_cpu,
                "features": features,
                "cpus": cpus,
            }),
        );
    }
    let mut t = String::new();
    t += &format!(
        "ackvisor {major}.{minor}.{patch} (protocol {})\n",
        s.protocol_version
    );
    t += &format!(
        "CPUs            {} ({} virtualized)\n",
        s.cpu_count, s.virtualized_count
    );
    t += &format!("memory per CPU  {}\n", bytes_label(s.bytes_per_cpu));
    match s.features {
        None => t += "features        not probed yet\n",
        Some(_) => {
            let list = |want: bool| {
                let names: Vec<&str> = known
                    .iter()
                    .filter(|(_, on)| *on == want)
                    .map(|(n, _)| *n)
                    .collect();
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            };
            t += &format!("features        {}\n", list(true));
            t += &format!("missing         {}\n", list(false));
        }
    }
    if !s.modes.is_empty() {
        t += "\nCPU   MODE\n";
        for (cpu, mode) in &s.modes {
            let label = match mode {
                None => "not virtualized".to_owned(),
                Some(Ok(m)) => m.name().to_owned(),
                Some(Err(n)) => format!("unknown mode {n}"),
            };
            t += &format!("{cpu:<5} {label}\n");
        }
    }
    emit(out, &t)
}

/// `ackctl mode M`.
pub fn mode_applied(
    mode: Mode,
    cpus: u32,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    if json {
        return emit_json(out, &json!({ "mode": mode.name(), "cpus_applied": cpus }));
    }
    emit(out, &format!("mode {mode} applied on {cpus} CPUs\n"))
}

/// A wire policy for people.
pub fn policy_label(raw: u32) -> String {
    match raw {
        wire::POLICY_MIXED => "mixed".to_owned(),
        _ => match VectorPolicy::try_from(raw) {
            Ok(p) => p.name().to_owned(),
            Err(n) => format!("unknown policy {n}"),
        },
    }
}

/// `ackctl policy`: the vectors that are not plain replay, one per row, then what the rest do.
/// JSON lists every configurable vector.
pub fn policy(r: &PolicyReply, json: bool, out: &mut dyn Write) -> Result<(), ClientError> {
    let first = usize::try_from(r.first_configurable).unwrap_or(usize::MAX);
    let configurable = || r.policies.iter().enumerate().skip(first);
    if json {
        let table: serde_json::Map<String, Value> = configurable()
            .map(|(v, p)| (format!("{v:#04x}"), Value::from(policy_label(*p))))
            .collect();
        return emit_json(
            out,
            &json!({
                "virtualized_cpus": r.virtualized_count,
                "first_configurable": format!("{:#04x}", r.first_configurable),
                "policies": table,
            }),
        );
    }
    let mut t = format!(
        "delivery policy in ack-replay ({} CPUs)\nvector  policy\n",
        r.virtualized_count
    );
    let replay = VectorPolicy::Replay as u32;
    for (v, p) in configurable().filter(|(_, p)| **p != replay) {
        t.push_str(&format!("{v:#04x}    {}\n", policy_label(*p)));
    }
    t.push_str(&format!(
        "every other vector from {:#04x} to 0xff: replay\nbelow {:#04x}: always injected (class <= DISPATCH) or exceptions\n",
        r.first_configurable, r.first_configurable
    ));
    emit(out, &t)
}

/// `ackctl policy VECTOR POLICY`.
pub fn policy_applied(
    vector: u8,
    policy: VectorPolicy,
    cpus: u32,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    if json {
        return emit_json(
            out,
            &json!({ "vector": format!("{vector:#04x}"), "policy": policy.name(), "cpus_applied": cpus }),
        );
    }
    emit(
        out,
        &format!("vector {vector:#04x}: {policy} on {cpus} CPUs\n"),
    )
}

/// `ackctl stats reset`.
pub fn reset(cpus: u32, json: bool, out: &mut dyn Write) -> Result<(), ClientError> {
    if json {
        return emit_json(out, &json!({ "cpus_reset": cpus }));
    }
    emit(out, &format!("statistics reset on {cpus} CPUs\n"))
}

fn sum(values: &[u64]) -> u64 {
    values.iter().fold(0, |a, b| a.wrapping_add(*b))
}

fn get(values: &[u64; 256], v: u8) -> u64 {
    values.get(usize::from(v)).copied().unwrap_or(0)
}

/// The four totals rates are shown for: exits, external-interrupt exits, replays, injections.
fn totals(s: &CpuStats) -> [u64; 4] {
    [
        sum(&s.exits),
        sum(&s.extint_by_vector),
        sum(&s.replays_by_vector),
        sum(&s.injections_by_vector),
    ]
}

/// Per-second rate between two counter values (0 when the counters were reset in between).
pub fn rate(before: u64, after: u64, secs: f64) -> f64 {
    if secs <= 0.0 || after < before {
        0.0
    } else {
        (after - before) as f64 / secs
    }
}

fn average(sum: u64, count: u64) -> u64 {
    sum.checked_div(count).unwrap_or(0)
}

fn entry_json(s: &CpuStats, vector: Option<u8>) -> Value {
    let exits: serde_json::Map<String, Value> = s
        .exits
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != 0)
        .map(|(reason, n)| (reason.to_string(), json!(n)))
        .collect();
    let vectors: Vec<Value> = (0..=u8::MAX)
        .filter(|v| vector.is_none_or(|want| want == *v))
        .map(|v| {
            (
                v,
                get(&s.extint_by_vector, v),
                get(&s.replays_by_vector, v),
                get(&s.injections_by_vector, v),
            )
        })
        .filter(|(v, e, r, i)| vector == Some(*v) || *e != 0 || *r != 0 || *i != 0)
        .map(|(v, e, r, i)| json!({"vector": v, "extint": e, "replays": r, "injections": i}))
        .collect();
    let anomalies: serde_json::Map<String, Value> = ANOMALY_NAMES
        .iter()
        .map(|(kind, name)| {
            let n = s.anomalies.get(*kind as usize).copied().unwrap_or(0);
            ((*name).to_owned(), json!(n))
        })
        .collect();
    let cpu = if s.cpu == wire::AGGREGATE_CPU {
        Value::Null
    } else {
        json!(s.cpu)
    };
    json!({
        "cpu": cpu,
        "mode": mode_json(s.mode),
        "exits_total": sum(&s.exits),
        "exits_by_reason": exits,
        "vectors": vectors,
        "deferrals": s.deferrals,
        "sti_windows": s.sti_windows,
        "guest_takes": s.guest_takes,
        "anomalies": anomalies,
        "cycles": {
            "count": s.cycles_count,
            "sum": s.cycles_sum,
            "max": s.cycles_max,
            "handler_sum": s.handler_cycles_sum,
            "histogram": s.histogram.to_vec(),
        },
    })
}

/// `ackctl stats`: the aggregate, then per CPU if asked; `rates` = the previous aggregate and
/// the seconds since it (under `--watch`), which the histogram's bars then show.
pub fn stats(
    sample: &StatsSample,
    rates: Option<(&CpuStats, f64)>,
    view: &StatsView,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let a = &sample.aggregate;
    if view.json {
        let mut doc = json!({
            "cpu_count": sample.cpu_count,
            "virtualized_count": sample.virtualized_count,
            "aggregate": entry_json(a, view.vector),
        });
        if view.per_cpu {
            doc["cpus"] = sample
                .per_cpu
                .iter()
                .map(|e| entry_json(e, view.vector))
                .collect();
        }
        if let Some((prev, secs)) = rates {
            let [e, x, r, i] = totals(a);
            let [pe, px, pr, pi] = totals(prev);
            doc["rates_per_second"] = json!({
                "exits": rate(pe, e, secs),
                "extint": rate(px, x, secs),
                "replays": rate(pr, r, secs),
                "injections": rate(pi, i, secs),
                "histogram": a
                    .histogram
                    .iter()
                    .zip(prev.histogram.iter())
                    .map(|(n, p)| rate(*p, *n, secs))
                    .collect::<Vec<f64>>(),
            });
        }
        return emit_json(out, &doc);
    }

    let mut t = String::new();
    t += &format!(
        "CPUs {} ({} virtualized), mode {}\n",
        sample.cpu_count,
        sample.virtualized_count,
        mode_label(a.mode)
    );
    let [exits, extint, replays, injections] = totals(a);
    let per_sec = |i: usize, now: u64| match rates {
        Some((prev, secs)) => format!("  ({:.1}/s)", rate(totals(prev)[i], now, secs)),
        None => String::new(),
    };
    t += &format!("exits             {exits}{}\n", per_sec(0, exits));
    let reasons: Vec<String> = a
        .exits
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != 0)
        .map(|(r, n)| format!("{r}: {n}"))
        .collect();
    if !reasons.is_empty() {
        t += &format!("  by reason       {}\n", reasons.join(", "));
    }
    t += &format!("external ints     {extint}{}\n", per_sec(1, extint));
    t += &format!("replays           {replays}{}\n", per_sec(2, replays));
    t += &format!("injections        {injections}{}\n", per_sec(3, injections));
    t += &format!("deferrals         {}\n", a.deferrals);
    t += &format!("sti windows       {}\n", a.sti_windows);
    t += &format!("guest takes       {}\n", a.guest_takes);
    let anomalies: Vec<String> = ANOMALY_NAMES
        .iter()
        .filter_map(|(kind, name)| {
            let n = a.anomalies.get(*kind as usize).copied().unwrap_or(0);
            (n != 0).then(|| format!("{name} {n}"))
        })
        .collect();
    t += &format!(
        "anomalies         {}\n",
        if anomalies.is_empty() {
            "none".to_owned()
        } else {
            anomalies.join(", ")
        }
    );
    t += &format!(
        "root cycles/exit  avg {}, max {} over {} exits (handlers avg {})\n",
        average(a.cycles_sum, a.cycles_count),
        a.cycles_max,
        a.cycles_count,
        average(a.handler_cycles_sum, a.cycles_count),
    );
    for line in crate::histogram::lines(
        &a.histogram,
        rates.map(|(prev, secs)| (&prev.histogram, secs)),
    ) {
        t += &line;
        t.push('\n');
    }

    let rows: Vec<u8> = (0..=u8::MAX)
        .filter(|v| match view.vector {
            Some(want) => want == *v,
            None => {
                get(&a.extint_by_vector, *v) != 0
                    || get(&a.replays_by_vector, *v) != 0
                    || get(&a.injections_by_vector, *v) != 0
            }
        })
        .collect();
    if !rows.is_empty() {
        t += &format!(
            "\n{:<8}{:>14}{:>14}{:>14}\n",
            "VECTOR", "EXTINT", "REPLAYS", "INJECTIONS"
        );
        for v in rows {
            t += &format!(
                "{:<8}{:>14}{:>14}{:>14}\n",
                format!("{v:#04x}"),
                get(&a.extint_by_vector, v),
                get(&a.replays_by_vector, v),
                get(&a.injections_by_vector, v)
            );
        }
    }

    if view.per_cpu {
        let vector_note = view
            .vector
            .map_or(String::new(), |v| format!(" (vector {v:#04x})"));
        t += &format!(
            "\n{:<5}{:<17}{:>12}{:>12}{:>12}{:>12}{:>10}{:>10}{:>10}{:>12}{}\n",
            "CPU",
            "MODE",
            "EXITS",
            "EXTINT",
            "REPLAYS",
            "INJECT",
            "DEFER",
            "ANOMALY",
            "AVG-CYC",
            "MAX-CYC",
            vector_note
        );
        for e in &sample.per_cpu {
            let [ex, x, r, i] = match view.vector {
                Some(v) => [
                    sum(&e.exits),
                    get(&e.extint_by_vector, v),
                    get(&e.replays_by_vector, v),
                    get(&e.injections_by_vector, v),
                ],
                None => totals(e),
            };
            t += &format!(
                "{:<5}{:<17}{:>12}{:>12}{:>12}{:>12}{:>10}{:>10}{:>10}{:>12}\n",
                e.cpu,
                mode_label(e.mode),
                ex,
                x,
                r,
                i,
                e.deferrals,
                sum(&e.anomalies),
                average(e.cycles_sum, e.cycles_count),
                e.cycles_max
            );
        }
    }
    emit(out, &t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ackvisor_vmm::control::wire::Field;
    use ackvisor_vmm::stats::Snapshot;

    fn entry(cpu: u32, mode: u32) -> CpuStats {
        let mut s = Snapshot::zero();
        s.exits[1] = 300;
        s.exits[10] = 5;
        s.extint_by_vector[0xd1] = 200;
        s.extint_by_vector[0x2f] = 100;
        s.replays_by_vector[0xd1] = 200;
        s.injections_by_vector[0x2f] = 100;
        s.anomalies[Anomaly::RejectedGate as usize] = 2;
        s.cycles_count = 300;
        s.cycles_sum = 300_000;
        s.cycles_max = 9000;
        let mut b = vec![0u8; CpuStats::SIZE];
        wire::encode_cpu_stats(cpu, mode, &s, &mut b).unwrap();
        CpuStats::decode(&b).unwrap()
    }

    fn sample() -> StatsSample {
        StatsSample {
            cpu_count: 2,
            virtualized_count: 2,
            aggregate: entry(wire::AGGREGATE_CPU, Mode::AckReplay as u32),
            per_cpu: vec![
                entry(0, Mode::AckReplay as u32),
                entry(1, wire::MODE_NOT_VIRTUALIZED),
            ],
        }
    }

    fn text(f: impl FnOnce(&mut Vec<u8>) -> Result<(), ClientError>) -> String {
        let mut out = Vec::new();
        f(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn anomaly_names_are_in_discriminant_order_and_distinct() {
        for (i, (kind, name)) in ANOMALY_NAMES.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{name}");
            assert_eq!(ANOMALY_NAMES.iter().filter(|(_, n)| n == name).count(), 1);
        }
    }

    #[test]
    fn stats_table_lists_totals_vectors_and_anomalies() {
        let t = text(|o| stats(&sample(), None, &StatsView::default(), o));
        assert!(t.contains("mode ack-replay"), "{t}");
        assert!(t.contains("exits             305"), "{t}");
        assert!(t.contains("1: 300, 10: 5"), "{t}");
        assert!(t.contains("rejected-gate 2"), "{t}");
        assert!(t.contains("avg 1000, max 9000 over 300 exits"), "{t}");
        let row = t.lines().find(|l| l.starts_with("0xd1")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["0xd1", "200", "200", "0"]
        );
        assert!(t.lines().any(|l| l.starts_with("0x2f")));
        assert!(!t.lines().any(|l| l.starts_with("0x40")));
    }

    #[test]
    fn stats_vector_filter_keeps_one_row_even_when_zero() {
        let view = StatsView {
            vector: Some(0x40),
            per_cpu: true,
            ..StatsView::default()
        };
        let t = text(|o| stats(&sample(), None, &view, o));
        let rows: Vec<_> = t.lines().filter(|l| l.starts_with("0x")).collect();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].starts_with("0x40"));
        assert!(t.contains("(vector 0x40)"));
        let cpu1 = t.lines().find(|l| l.starts_with("1 ")).unwrap();
        assert!(cpu1.contains("not virtualized"), "{cpu1}");
    }

    #[test]
    fn stats_json_is_one_parsable_document_with_rates_under_watch() {
        let s = sample();
        let mut prev = s.aggregate;
        prev.exits[1] -= 100;
        let view = StatsView {
            json: true,
            per_cpu: true,
            vector: Some(0xd1),
        };
        let t = text(|o| stats(&s, Some((&prev, 2.0)), &view, o));
        assert_eq!(t.lines().count(), 1);
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["aggregate"]["cpu"], Value::Null);
        assert_eq!(v["aggregate"]["mode"], "ack-replay");
        assert_eq!(v["aggregate"]["vectors"][0]["vector"], 0xd1);
        assert_eq!(v["aggregate"]["vectors"].as_array().unwrap().len(), 1);
        assert_eq!(v["aggregate"]["anomalies"]["rejected-gate"], 2);
        assert_eq!(v["cpus"][1]["mode"], Value::Null);
        assert_eq!(v["rates_per_second"]["exits"], 50.0);
        assert_eq!(
            v["rates_per_second"]["histogram"].as_array().unwrap().len(),
            ackvisor_vmm::stats::HISTOGRAM_BUCKETS
        );
    }

    /// `--watch` text: the histogram follows the counters, bars for the rate since the last
    /// sample (the bucket that gained exits has the full bar).
    #[test]
    fn stats_watch_table_draws_the_cycle_histogram_with_rates() {
        let mut s = sample();
        s.aggregate.histogram[9] = 300;
        let mut prev = s.aggregate;
        prev.histogram[9] = 100;
        let t = text(|o| stats(&s, Some((&prev, 2.0)), &StatsView::default(), o));
        let row = t
            .lines()
            .find(|l| l.trim_start().starts_with("512-1023"))
            .unwrap_or_else(|| panic!("no histogram row: {t}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[..3], ["512-1023", "300", "100.0"], "{row}");
        assert!(
            row.ends_with(&"#".repeat(crate::histogram::BAR_WIDTH)),
            "{row}"
        );
        assert!(t.contains("rate since the last sample"), "{t}");
    }

    #[test]
    fn rates_survive_a_reset_between_samples() {
        assert_eq!(rate(100, 300, 2.0), 100.0);
        assert_eq!(rate(300, 100, 2.0), 0.0);
        assert_eq!(rate(1, 2, 0.0), 0.0);
    }

    #[test]
    fn status_table_and_json_show_modes_and_features() {
        let s = Status {
            protocol_version: 1,
            build_version: (0, 1, 0),
            cpu_count: 2,
            virtualized_count: 1,
            features: wire::features_from_bits(wire::FEATURE_PROBED | 0b100),
            feature_bits: wire::FEATURE_PROBED | 0b100,
            bytes_per_cpu: 40960,
            modes: vec![(0, Some(Ok(Mode::ExitSti))), (1, None)],
        };
        let t = text(|o| status(&s, false, o));
        assert!(t.contains("ackvisor 0.1.0 (protocol 1)"), "{t}");
        assert!(t.contains("40.0 KiB (40960 bytes)"), "{t}");
        assert!(t.contains("features        ack-on-exit\n"), "{t}");
        assert!(t.contains("0     exit-sti"), "{t}");
        assert!(t.contains("1     not virtualized"), "{t}");
        let v: Value = serde_json::from_str(&text(|o| status(&s, true, o))).unwrap();
        assert_eq!(v["features"]["ack-on-exit"], true);
        assert_eq!(v["features"]["vpid"], false);
        assert_eq!(v["cpus"][1]["mode"], Value::Null);
        assert_eq!(v["build_version"], "0.1.0");
    }

    #[test]
    fn labels_for_special_modes_and_sizes() {
        assert_eq!(mode_label(wire::MODE_MIXED), "mixed");
        assert_eq!(mode_label(wire::MODE_NOT_VIRTUALIZED), "not virtualized");
        assert_eq!(mode_label(7), "unknown mode 7");
        assert_eq!(bytes_label(512), "512 bytes");
        assert_eq!(bytes_label(3 << 20), "3.0 MiB (3145728 bytes)");
    }

    fn policy_sample() -> PolicyReply {
        let mut policies = [VectorPolicy::Replay as u32; wire::POLICY_ENTRIES];
        policies[0xd1] = VectorPolicy::Auto as u32;
        policies[0x61] = VectorPolicy::Inject as u32;
        policies[0xfd] = wire::POLICY_MIXED;
        policies[0x2f] = VectorPolicy::Inject as u32;
        PolicyReply {
            header: wire::ReplyHeader {
                version: wire::PROTOCOL_VERSION,
                size: PolicyReply::SIZE as u32,
            },
            virtualized_count: 2,
            first_configurable: 0x30,
            policies,
        }
    }

    #[test]
    fn policy_table_lists_the_marked_vectors_and_json_every_configurable_one() {
        let r = policy_sample();
        let t = text(|o| policy(&r, false, o));
        assert!(t.contains("0x61    inject"), "{t}");
        assert!(t.contains("0xd1    auto"), "{t}");
        assert!(t.contains("0xfd    mixed"), "{t}");
        assert!(t.contains("2 CPUs"), "{t}");
        assert!(
            !t.contains("0x2f"),
            "below the first configurable vector: {t}"
        );
        assert!(!t.contains("0x41"), "replay vectors are summarised: {t}");
        let j: Value = serde_json::from_str(&text(|o| policy(&r, true, o))).unwrap();
        let p = j["policies"].as_object().unwrap();
        assert_eq!(p.len(), 0x100 - 0x30);
        assert_eq!(p["0xd1"], "auto");
        assert_eq!(p["0x41"], "replay");
        assert_eq!(j["virtualized_cpus"], 2);
        let applied = text(|o| policy_applied(0xd1, VectorPolicy::Replay, 2, false, o));
        assert_eq!(applied, "vector 0xd1: replay on 2 CPUs\n");
        assert_eq!(policy_label(7), "unknown policy 7");
    }
}
