//! The root-cycle histogram as text bars: one row per power-of-two bucket of root-mode TSC
//! cycles per external-interrupt exit (`ackvisor_vmm::stats::bucket`), with the count, the rate
//! since the previous sample and a bar. Under `ackctl stats --watch` the bars show that rate,
//! so flipping modes moves the mass between rows as the operator watches; a single sample
//! (no previous one) draws the counts instead.
//!
//! **Runs in:** user mode.

use ackvisor_vmm::stats::HISTOGRAM_BUCKETS;

use crate::render::rate;

/// Width of the longest bar, in characters.
pub const BAR_WIDTH: usize = 40;
/// What bars are drawn with.
pub const BAR_CHAR: char = '#';

/// The cycle range bucket `i` holds: `[2^i, 2^(i+1))`, bucket 0 also holding 0, the last
/// bucket everything from `2^i` up.
pub fn bucket_label(i: usize) -> String {
    match i {
        0 => "0-1".to_owned(),
        _ if i + 1 >= HISTOGRAM_BUCKETS => format!("{}+", 1u64 << i),
        _ => format!("{}-{}", 1u64 << i, (1u64 << (i + 1)) - 1),
    }
}

/// Bar of `value` against the largest value `max`: at least one character for any non-zero
/// value, [`BAR_WIDTH`] for the largest.
pub fn bar(value: f64, max: f64) -> String {
    if value <= 0.0 || max <= 0.0 {
        return String::new();
    }
    let n = ((value / max) * BAR_WIDTH as f64).round() as usize;
    std::iter::repeat_n(BAR_CHAR, n.clamp(1, BAR_WIDTH)).collect()
}

/// The rows: from the lowest to the highest bucket with anything in it (so gaps between show
/// as empty rows). `previous` is the last sample's histogram and the seconds since it.
pub fn lines(
    now: &[u64; HISTOGRAM_BUCKETS],
    previous: Option<(&[u64; HISTOGRAM_BUCKETS], f64)>,
) -> Vec<String> {
    let rates: Option<Vec<f64>> = previous.map(|(prev, secs)| {
        now.iter()
            .zip(prev.iter())
            .map(|(n, p)| rate(*p, *n, secs))
            .collect()
    });
    let weights: Vec<f64> = match &rates {
        Some(r) => r.clone(),
        None => now.iter().map(|n| *n as f64).collect(),
    };
    let used = |i: usize| now.get(i).is_some_and(|n| *n != 0);
    let (Some(first), Some(last)) = (
        (0..HISTOGRAM_BUCKETS).find(|i| used(*i)),
        (0..HISTOGRAM_BUCKETS).rev().find(|i| used(*i)),
    ) else {
        return vec!["  (no timed exits)".to_owned()];
    };
    let max = weights.iter().copied().fold(0.0, f64::max);
    let mut out = vec![format!(
        "  {:<14}{:>12}{:>12}  {}",
        "CYCLES",
        "EXITS",
        "PER-SEC",
        if rates.is_some() {
            "bars: rate since the last sample"
        } else {
            "bars: exits"
        }
    )];
    for i in first..=last {
        let count = now.get(i).copied().unwrap_or(0);
        let per_sec = rates
            .as_ref()
            .and_then(|r| r.get(i))
            .map_or("-".to_owned(), |r| format!("{r:.1}"));
        let weight = weights.get(i).copied().unwrap_or(0.0);
        out.push(format!(
            "  {:<14}{:>12}{:>12}  |{}",
            bucket_label(i),
            count,
            per_sec,
            bar(weight, max)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(pairs: &[(usize, u64)]) -> [u64; HISTOGRAM_BUCKETS] {
        let mut h = [0; HISTOGRAM_BUCKETS];
        for (i, n) in pairs {
            h[*i] = *n;
        }
        h
    }

    fn bar_len(line: &str) -> usize {
        line.split('|')
            .nth(1)
            .unwrap()
            .chars()
            .filter(|c| *c == BAR_CHAR)
            .count()
    }

    #[test]
    fn labels_name_each_power_of_two_range() {
        assert_eq!(bucket_label(0), "0-1");
        assert_eq!(bucket_label(1), "2-3");
        assert_eq!(bucket_label(7), "128-255");
        assert_eq!(bucket_label(HISTOGRAM_BUCKETS - 1), "2147483648+");
    }

    /// Under --watch the bars follow the rate since the last sample, not the totals: the
    /// bucket with the most exits overall but none lately gets no bar.
    #[test]
    fn watch_bars_show_the_rate_since_the_last_sample() {
        let prev = hist(&[(7, 1000), (9, 0)]);
        let now = hist(&[(7, 1000), (8, 50), (9, 200)]);
        let l = lines(&now, Some((&prev, 2.0)));
        let row = |label: &str| {
            l.iter()
                .find(|r| r.trim_start().starts_with(label))
                .unwrap()
        };
        assert!(l[0].contains("rate since the last sample"), "{l:?}");
        assert_eq!(bar_len(row("128-255")), 0, "{l:?}");
        assert_eq!(bar_len(row("512-1023")), BAR_WIDTH, "{l:?}");
        assert_eq!(bar_len(row("256-511")), BAR_WIDTH / 4, "{l:?}");
        let cols: Vec<&str> = row("512-1023").split_whitespace().collect();
        assert_eq!(&cols[..3], ["512-1023", "200", "100.0"]);
        assert_eq!(l.len(), 1 + 3, "header + buckets 7..=9: {l:?}");
    }

    #[test]
    fn a_reset_between_samples_gives_zero_rates_not_huge_ones() {
        let prev = hist(&[(8, 500)]);
        let now = hist(&[(8, 20)]);
        let l = lines(&now, Some((&prev, 1.0)));
        let cols: Vec<&str> = l[1].split_whitespace().collect();
        assert_eq!(&cols[..3], ["256-511", "20", "0.0"]);
        assert_eq!(bar_len(&l[1]), 0);
    }

    #[test]
    fn a_single_sample_draws_counts_and_keeps_empty_buckets_between() {
        let now = hist(&[(4, 10), (6, 40)]);
        let l = lines(&now, None);
        assert!(l[0].contains("bars: exits"));
        assert_eq!(l.len(), 4, "header + buckets 4, 5, 6: {l:?}");
        assert_eq!(bar_len(&l[1]), BAR_WIDTH / 4);
        assert_eq!(bar_len(&l[2]), 0);
        assert_eq!(bar_len(&l[3]), BAR_WIDTH);
        assert!(
            l[1].contains(" - "),
            "no rate without a previous sample: {}",
            l[1]
        );
        assert_eq!(lines(&[0; HISTOGRAM_BUCKETS], None), ["  (no timed exits)"]);
    }

    #[test]
    fn small_nonzero_values_still_get_a_bar() {
        assert_eq!(bar(1.0, 10_000.0).len(), 1);
        assert_eq!(bar(0.0, 10.0), "");
        assert_eq!(bar(10.0, 10.0).len(), BAR_WIDTH);
    }
}
