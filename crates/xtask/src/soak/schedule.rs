//! The fault schedule: a pure function of the seed and the run's length, so that `--seed`
//! replays the same faults at the same times against the same targets.
//!
//! The run is cut into windows of [`WINDOW`] (a last piece shorter than half a window joins the
//! one before). Each window gets every fault kind once, plus extra faults drawn by
//! [`Fault::weight`] until it averages one fault per [`MEAN_INTERVAL`]; the window is then cut
//! into as many equal slots as it has faults, and each fault lands at a random time in the
//! middle 80 % of its own slot (so two faults are never closer than a fifth of a slot). A fault
//! carries a random `pick` from which its target is chosen when it runs (which app, which
//! worker): the targets depend on what runs then, the choice on the seed alone.
//!
//! The faults that replace the daemon's process (restart, `kill -9`, upgrade) fall in the first
//! [`DAEMON_SHARE`] of the slots of a window of half a window or more, among the others there:
//! the daemon then runs the rest of the window and the start of the next one, more than
//! [`super::LONG_PROCESS`], under every other kind of fault, so that its memory and descriptors
//! can be judged within one process (spread over the window, they left none that lived 5
//! minutes in an hour).

use rand::{RngExt, SeedableRng, rngs::Xoshiro256PlusPlus, seq::SliceRandom};
use serde::Serialize;

use super::faults::Fault;

/// Every kind of fault at least once per window.
pub const WINDOW: f64 = 600.0;
/// On average one fault this often (seconds).
pub const MEAN_INTERVAL: f64 = 12.0;
/// The share of a window's slots where the faults that replace the daemon fall.
pub const DAEMON_SHARE: f64 = 0.35;

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Planned {
    /// When, in seconds since the load started.
    pub at: f64,
    pub fault: Fault,
    /// Chooses the fault's target when it runs.
    pub pick: u64,
}

/// The windows of `[from, to)`: `WINDOW` long, a last piece shorter than half a window merged
/// into the one before.
pub fn windows(from: f64, to: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + WINDOW).min(to);
        match out.last_mut() {
            Some((_, last_end)) if end - start < WINDOW / 2.0 => *last_end = end,
            _ => out.push((start, end)),
        }
        start = end;
    }
    out
}

/// The faults of a run whose faults fall in `[from, to)` seconds, from `seed`, in time order.
pub fn schedule(seed: u64, from: f64, to: f64) -> Vec<Planned> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let total_weight: u32 = Fault::ALL.iter().map(|f| f.weight()).sum();
    let mut out = Vec::new();
    for (start, end) in windows(from, to) {
        let mut kinds: Vec<Fault> = Fault::ALL.to_vec();
        let wanted = ((end - start) / MEAN_INTERVAL).round() as usize;
        while kinds.len() < wanted {
            let mut x = rng.random_range(0..total_weight);
            let extra = Fault::ALL
                .iter()
                .copied()
                .find(|f| {
                    let hit = x < f.weight();
                    x = x.saturating_sub(f.weight());
                    hit
                })
                .expect("x < total weight");
            kinds.push(extra);
        }
        kinds.shuffle(&mut rng);
        if end - start >= WINDOW / 2.0 {
            kinds = daemon_first(kinds, &mut rng);
        }
        let slot = (end - start) / kinds.len() as f64;
        for (i, fault) in kinds.into_iter().enumerate() {
            let at = start + slot * (i as f64 + 0.1 + 0.8 * rng.random::<f64>());
            out.push(Planned { at, fault, pick: rng.random() });
        }
    }
    out
}

/// `kinds` (shuffled) reordered so that the faults that replace the daemon are among the first
/// [`DAEMON_SHARE`] of them (or the first as many as they are), in random order with the
/// others that share those places.
fn daemon_first(kinds: Vec<Fault>, rng: &mut Xoshiro256PlusPlus) -> Vec<Fault> {
    let (daemon, others): (Vec<Fault>, Vec<Fault>) = kinds.iter().partition(|f| f.replaces_daemon());
    let head = ((kinds.len() as f64 * DAEMON_SHARE).floor() as usize).max(daemon.len());
    let (early, late) = others.split_at(head - daemon.len());
    let mut out: Vec<Fault> = daemon.into_iter().chain(early.iter().copied()).collect();
    out.shuffle(rng);
    out.extend_from_slice(late);
    out
}

/// The seed of a run when none is given: from the clock and the process id.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // A few decimal digits are easier to type back than 20.
    (nanos ^ u64::from(std::process::id()).rotate_left(32)) % 1_000_000_000
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = schedule(42, 20.0, 3600.0);
        assert_eq!(a, schedule(42, 20.0, 3600.0));
        assert_ne!(a, schedule(43, 20.0, 3600.0));
        assert!(a.windows(2).all(|w| w[0].at < w[1].at), "in time order");
        assert!(a.iter().all(|p| (20.0..3600.0).contains(&p.at)));
    }

    #[test]
    fn every_kind_comes_at_least_once_in_every_window_of_ten_minutes() {
        for (seed, to) in [(1, 3600.0), (2, 620.0), (3, 165.0), (4, 1234.0), (5, 900.0)] {
            let plan = schedule(seed, 20.0, to);
            for (start, end) in windows(20.0, to) {
                assert!(end - start <= WINDOW * 1.5, "{start}..{end}");
                let mut count: BTreeMap<&str, u32> = BTreeMap::new();
                for p in plan.iter().filter(|p| (start..end).contains(&p.at)) {
                    *count.entry(p.fault.name()).or_default() += 1;
                }
                for f in Fault::ALL {
                    assert!(
                        count.get(f.name()) >= Some(&1),
                        "seed {seed}: no {} in {start}..{end}",
                        f.name()
                    );
                }
            }
        }
    }

    #[test]
    fn faults_average_one_per_mean_interval_and_keep_apart() {
        let plan = schedule(7, 20.0, 3620.0);
        let n = plan.len() as f64;
        assert!((n - 3600.0 / MEAN_INTERVAL).abs() <= 6.0, "{n} faults in an hour");
        let closest = plan.windows(2).map(|w| w[1].at - w[0].at).fold(f64::MAX, f64::min);
        assert!(closest >= 0.2 * MEAN_INTERVAL * 0.9, "two faults {closest} s apart");
        // A short run still has every kind, packed closer.
        let short = schedule(7, 20.0, 165.0);
        assert_eq!(short.len(), Fault::ALL.len());
    }

    /// Every window of half a window or more leaves the daemon's last process of the window
    /// running long enough to judge its growth: no daemon-replacing fault after the first
    /// DAEMON_SHARE of the window, so more than LONG_PROCESS to the next one or to the end.
    #[test]
    fn the_daemon_replacing_faults_leave_a_long_quiet_stretch_in_every_window() {
        for (seed, to) in [(1, 3585.0), (2, 585.0), (3, 1234.0), (4, 900.0), (507847877, 3585.0)] {
            let plan = schedule(seed, 20.0, to);
            let times: Vec<f64> = plan.iter().filter(|p| p.fault.replaces_daemon()).map(|p| p.at).collect();
            for (start, end) in windows(20.0, to) {
                let inside: Vec<f64> = times.iter().copied().filter(|t| (start..end).contains(t)).collect();
                assert!(inside.len() >= 3, "seed {seed}: {inside:?}");
                let last = inside.iter().copied().fold(f64::MIN, f64::max);
                assert!(
                    last <= start + (end - start) * (DAEMON_SHARE + 0.05),
                    "seed {seed}: {last} in {start}..{end}"
                );
                let next = times.iter().copied().find(|t| *t >= end).unwrap_or(to + 15.0);
                assert!(next - last >= crate::soak::LONG_PROCESS, "seed {seed}: {last} then {next}");
            }
        }
        // The CI soak's one short window keeps its faults spread.
        let short = schedule(26, 20.0, 165.0);
        assert_eq!(short, {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(26);
            let mut kinds = Fault::ALL.to_vec();
            kinds.shuffle(&mut rng);
            let slot = 145.0 / kinds.len() as f64;
            kinds
                .into_iter()
                .enumerate()
                .map(|(i, fault)| Planned {
                    at: 20.0 + slot * (i as f64 + 0.1 + 0.8 * rng.random::<f64>()),
                    fault,
                    pick: rng.random(),
                })
                .collect::<Vec<_>>()
        });
    }

    #[test]
    fn a_short_last_piece_joins_the_window_before() {
        assert_eq!(windows(0.0, 1400.0), [(0.0, 600.0), (600.0, 1400.0)]);
        assert_eq!(windows(0.0, 1600.0), [(0.0, 600.0), (600.0, 1200.0), (1200.0, 1600.0)]);
        assert_eq!(windows(20.0, 180.0), [(20.0, 180.0)]);
    }

    #[test]
    fn frequent_kinds_come_more_often() {
        let plan = schedule(11, 0.0, 36_000.0);
        let n = |f: Fault| plan.iter().filter(|p| p.fault == f).count();
        assert!(
            n(Fault::Deploy) > n(Fault::PackageUpgrade),
            "{} vs {}",
            n(Fault::Deploy),
            n(Fault::PackageUpgrade)
        );
    }
}
