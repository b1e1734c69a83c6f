//! The benchmark's statistics, as pure functions: medians, spreads, the ratio of interleaved
//! rounds, a bootstrap interval, percentiles and the coordinated-omission correction.
//!
//! A ratio is never the quotient of two totals: each round of a mode is divided by the round of
//! its control run beside it (control, mode, then mode, control, …), so that whatever the
//! machine does during the run (another build, a neighbour's steal) moves both halves of a
//! pair together; the cell's ratio is the median of those per-round ratios, shown with their
//! minimum and maximum, and its spread — what says how far the median can be trusted, and what
//! the ±3 % bound judges — is the 95 % bootstrap interval of that median (one of the two spreads
//! the benchmark's issue allows; min–max is the other, and with 16 rounds it measures the worst
//! round, not the median).

/// The median (the mean of the two middle values for an even count); 0 for nothing.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Each mode round over the control round paired with it (`mode[i] / control[i]`); pairs with
/// a control of 0 are left out.
pub fn paired_ratios(mode: &[f64], control: &[f64]) -> Vec<f64> {
    mode.iter().zip(control).filter(|(_, c)| **c > 0.0).map(|(m, c)| m / c).collect()
}

/// A measured value and how far its rounds spread.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// 95 % bootstrap interval of the median.
    pub ci: (f64, f64),
    pub rounds: usize,
}

impl Spread {
    /// The widest distance from the median to either end of the rounds, relative to the median
    /// (0.03 = ±3 %).
    pub fn half_range(&self) -> f64 {
        if self.median == 0.0 {
            return f64::INFINITY;
        }
        ((self.max - self.median).max(self.median - self.min) / self.median).abs()
    }

    /// The widest distance from the median to either end of its 95 % bootstrap interval,
    /// relative to the median (0.03 = ±3 %).
    pub fn ci_half_range(&self) -> f64 {
        if self.median == 0.0 {
            return f64::INFINITY;
        }
        ((self.ci.1 - self.median).max(self.median - self.ci.0) / self.median).abs()
    }

    /// Whether the median is known within ±`limit` (its 95 % interval; the issue's ±3 %: wider
    /// is a defect of the measurement to report, never a reason to judge the target
    /// differently). Fewer than 5 rounds are never tight.
    pub fn tight(&self, limit: f64) -> bool {
        self.rounds >= 5 && self.ci_half_range() <= limit
    }

    /// `0.97 [0.95–0.99]`: median and min–max.
    pub fn show(&self) -> String {
        format!("{:.2} [{:.2}–{:.2}]", self.median, self.min, self.max)
    }
}

/// Median, min–max and the bootstrap interval of `samples`.
pub fn spread(samples: &[f64]) -> Spread {
    let v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Spread::default();
    }
    Spread {
        median: median(&v),
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ci: bootstrap_median_ci(&v, 2000, 0x1b7e_5eed),
        rounds: v.len(),
    }
}

/// xorshift64* from `seed`: small, fixed, good enough to draw resampling indexes (the same data
/// gives the same interval).
fn draws(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed.max(1);
    move |len| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) % len.max(1) as u64) as usize
    }
}

/// The 2.5th and 97.5th percentiles of `estimates`.
fn interval95(mut estimates: Vec<f64>) -> (f64, f64) {
    estimates.sort_by(f64::total_cmp);
    let at =
        |q: f64| estimates[((q * (estimates.len() - 1) as f64).round() as usize).min(estimates.len() - 1)];
    (at(0.025), at(0.975))
}

/// A 95 % percentile-bootstrap interval of the median of `v`: `resamples` resamples with
/// replacement from a fixed seed (the same data gives the same interval).
pub fn bootstrap_median_ci(v: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let mut draw = draws(seed);
    interval95(
        (0..resamples.max(1))
            .map(|_| {
                let sample: Vec<f64> = (0..v.len()).map(|_| v[draw(v.len())]).collect();
                median(&sample)
            })
            .collect(),
    )
}

/// An approximate 95 % block-bootstrap interval of `p99.9(windows) / p99.9(steady)`, where
/// `windows` holds the latencies of each operation's window and `steady` blocks of the steady
/// ones: whole windows and whole blocks are drawn with replacement (the samples of one window
/// are not independent: one stall delays many), `resamples` times from a fixed seed. A p99.9
/// rests on its few slowest samples, where a percentile bootstrap is known to cover less than
/// it says: the interval tells how much the ratio could move, not a guarantee. `None` without
/// a sample on either side.
pub fn bootstrap_p999_ratio_ci(
    windows: &[Vec<u64>],
    steady: &[Vec<u64>],
    resamples: usize,
    seed: u64,
) -> Option<(f64, f64)> {
    if windows.iter().all(Vec::is_empty) || steady.iter().all(Vec::is_empty) {
        return None;
    }
    let mut draw = draws(seed);
    let mut p999 = |blocks: &[Vec<u64>]| {
        let mut v: Vec<u64> =
            (0..blocks.len()).flat_map(|_| blocks[draw(blocks.len())].iter().copied()).collect();
        if v.is_empty() {
            return 0.0;
        }
        // The nearest rank, as `percentile`, without sorting the whole resample.
        let rank = ((0.999 * v.len() as f64 - 1e-9).ceil() as usize).clamp(1, v.len());
        *v.select_nth_unstable(rank - 1).1 as f64
    };
    let ratios: Vec<f64> = (0..resamples.max(1))
        .filter_map(|_| {
            let (w, s) = (p999(windows), p999(steady));
            (s > 0.0).then(|| w / s)
        })
        .collect();
    (!ratios.is_empty()).then(|| interval95(ratios))
}

/// The `p`-th percentile (0..=100) of sorted `values`, nearest rank; 0 for nothing.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // (The small step keeps 99.9 % of 1000 at rank 999, not 1000 by rounding.)
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Coordinated-omission correction of a closed loop's latencies, as wrk2 and HdrHistogram's
/// `recordValueWithExpectedInterval` do: a request that took `l` when one was due every
/// `interval` held back the requests that would have been sent meanwhile, so `l - interval`,
/// `l - 2·interval`, … (while above `interval`) are recorded too. Returns the values sorted.
/// (The open-loop runs need none: their latencies count from when each request was due.)
pub fn co_correct(latencies: &[u64], interval: u64) -> Vec<u64> {
    let mut out = Vec::with_capacity(latencies.len());
    for &l in latencies {
        out.push(l);
        if interval == 0 {
            continue;
        }
        let mut missed = l.saturating_sub(interval);
        while missed >= interval {
            out.push(missed);
            missed -= interval;
        }
    }
    out.sort_unstable();
    out
}

/// p50, p99 and p99.9 of `sorted`.
pub fn tail(sorted: &[u64]) -> [u64; 3] {
    [percentile(sorted, 50.0), percentile(sorted, 99.0), percentile(sorted, 99.9)]
}

/// The share of the machine's time stolen by the hypervisor between two readings of
/// /proc/stat's first line (`cpu  user nice system idle iowait irq softirq steal …`).
pub fn steal_share(before: &str, after: &str) -> Option<f64> {
    let fields = |s: &str| -> Option<Vec<u64>> {
        let line = s.lines().find(|l| l.starts_with("cpu "))?;
        line.split_whitespace().skip(1).take(8).map(|x| x.parse().ok()).collect()
    };
    let (a, b) = (fields(before)?, fields(after)?);
    let total: u64 = b.iter().zip(&a).map(|(x, y)| x.saturating_sub(*y)).sum();
    let steal = b.get(7)?.saturating_sub(*a.get(7)?);
    (total > 0).then(|| steal as f64 / total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts_ignores_order_and_non_numbers() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn ratios_pair_each_mode_round_with_its_own_control() {
        // A machine that slows down across the run: the totals' quotient would still be 0.9,
        // and each pair says the same.
        let control = [100.0, 80.0, 60.0, 0.0];
        let mode = [90.0, 72.0, 54.0, 10.0];
        let r = paired_ratios(&mode, &control);
        assert_eq!(r.len(), 3, "a control of 0 gives no ratio");
        assert!(r.iter().all(|x| (x - 0.9).abs() < 1e-12), "{r:?}");
        // Unequal lengths: only the complete pairs.
        assert_eq!(paired_ratios(&[1.0, 2.0, 3.0], &[1.0, 1.0]).len(), 2);
    }

    #[test]
    fn the_spread_is_the_medians_interval_judged_at_3_percent_and_min_max_is_shown() {
        let s = spread(&[0.97, 1.00, 0.99, 0.98, 1.01]);
        assert_eq!((s.median, s.min, s.max, s.rounds), (0.99, 0.97, 1.01, 5));
        assert!((s.half_range() - 0.02 / 0.99).abs() < 1e-12);
        assert!(s.ci_half_range() <= s.half_range(), "the interval lies within the rounds");
        assert!(s.tight(0.03));
        assert!(!spread(&[0.90, 1.00, 1.10, 0.95, 1.05]).tight(0.03), "±5 % or more is a defect");
        assert!(!spread(&[0.99, 1.00, 1.01]).tight(0.03), "3 rounds are too few to trust");
        assert!(spread(&[0.99, 1.00, 1.01, 1.00, 0.99]).tight(0.03), "5 are enough");
        assert!(!Spread::default().tight(0.03), "no rounds: nothing to trust");
        assert_eq!(s.show(), "0.99 [0.97–1.01]");
        // One wild round among nine moves min–max, not the median's interval.
        let one_off = spread(&[1.00, 0.99, 1.01, 1.00, 0.72, 1.00, 0.99, 1.01, 1.00]);
        assert!(one_off.half_range() > 0.25 && one_off.tight(0.03), "{one_off:?}");
    }

    #[test]
    fn the_bootstrap_interval_holds_the_median_and_is_repeatable() {
        let v = [0.95, 0.97, 0.99, 1.00, 1.02, 0.98, 0.96];
        let (lo, hi) = bootstrap_median_ci(&v, 2000, 7);
        assert!(lo <= median(&v) && median(&v) <= hi, "{lo} {hi}");
        assert!(lo >= 0.95 && hi <= 1.02);
        assert_eq!(bootstrap_median_ci(&v, 2000, 7), (lo, hi), "same seed, same interval");
        assert_eq!(bootstrap_median_ci(&[1.0; 5], 100, 1), (1.0, 1.0), "no variation, no width");
        assert_eq!(bootstrap_median_ci(&[], 100, 1), (0.0, 0.0));
    }

    /// Windows like the steady stretches give an interval around 1; one window's stall among
    /// twenty gives a wide interval reaching 1 (the tail rests on that window alone), twenty
    /// windows that each stall give a narrow one far above 1.
    #[test]
    fn the_p999_interval_resamples_whole_windows() {
        let calm = |n: u64| -> Vec<u64> { (0..1000).map(|i| 100 + (i * 7 + n) % 50).collect() };
        let steady: Vec<Vec<u64>> = (0..21).map(calm).collect();
        let same: Vec<Vec<u64>> = (0..20).map(calm).collect();
        let (lo, hi) = bootstrap_p999_ratio_ci(&same, &steady, 400, 3).unwrap();
        assert!(lo >= 0.95 && hi <= 1.05, "{lo} {hi}");

        // 100 stalls in one window: drawing samples one by one would keep about 100 of them in
        // every resample (the interval's low end near 33); drawing whole windows leaves that
        // window out of about a third of the resamples (the low end near 1).
        let mut one = same.clone();
        one[7].extend([5_000; 100]);
        let (lo, hi) = bootstrap_p999_ratio_ci(&one, &steady, 400, 3).unwrap();
        assert!(lo < 1.05 && hi > 20.0, "one stalled window: {lo} {hi}");

        let every: Vec<Vec<u64>> =
            same.iter().map(|w| w.iter().copied().chain([5_000; 30]).collect()).collect();
        let (lo, hi) = bootstrap_p999_ratio_ci(&every, &steady, 400, 3).unwrap();
        assert!(lo > 20.0 && hi < 40.0, "every window stalled: {lo} {hi}");

        let again = bootstrap_p999_ratio_ci(&one, &steady, 400, 3);
        assert_eq!(again, bootstrap_p999_ratio_ci(&one, &steady, 400, 3), "same seed, same interval");
        assert_eq!(bootstrap_p999_ratio_ci(&[], &steady, 400, 3), None);
        assert_eq!(bootstrap_p999_ratio_ci(&same, &[], 400, 3), None);
        assert_eq!(
            bootstrap_p999_ratio_ci(&[vec![], vec![]], &steady, 400, 3),
            None,
            "windows without a sample"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 99.0), 0);
        assert_eq!(tail(&[7]), [7, 7, 7]);
    }

    #[test]
    fn coordinated_omission_adds_the_requests_a_stall_held_back() {
        // One request a ms was due; one took 5 ms: the 4, 3, 2 and 1 ms the held-back requests
        // would have waited are recorded too (HdrHistogram's recordValueWithExpectedInterval).
        assert_eq!(co_correct(&[1, 5, 1], 1), vec![1, 1, 1, 2, 3, 4, 5]);
        // Nothing longer than the interval: nothing added.
        assert_eq!(co_correct(&[3, 2, 1], 10), vec![1, 2, 3]);
        assert_eq!(co_correct(&[25], 10), vec![15, 25]);
        assert_eq!(co_correct(&[5], 0), vec![5]);
        // It moves the tail: a 1 % stall of 100 intervals is most of the p99 once corrected.
        let mut v = vec![1u64; 990];
        v.extend([100; 10]);
        assert!(percentile(&co_correct(&v, 1), 99.0) > 50);
        let mut raw = v.clone();
        raw.sort_unstable();
        assert_eq!(percentile(&raw, 99.0), 1);
    }

    #[test]
    fn steal_is_its_share_of_all_time() {
        let a = "cpu  100 0 100 700 0 0 0 100 0 0\ncpu0 1 2 3\n";
        let b = "cpu  200 0 200 1400 0 0 0 200 0 0\n";
        assert_eq!(steal_share(a, b), Some(0.1));
        assert_eq!(steal_share(a, a), None);
        assert_eq!(steal_share("", b), None);
    }
}
