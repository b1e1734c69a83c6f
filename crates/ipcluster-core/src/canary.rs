//! Canary deploys, the parts without I/O: which bands a canary of `k` takes, and what may be
//! asked of one.
//!
//! A canary generation serves `k` bands; the live generation keeps the others. Routing is by
//! band, so a client is on the canary or off it for the whole rollout (its address decides). The
//! bands are spread over the band space (`i × workers / k`), so a canary's share of clients does
//! not depend on how addresses cluster in one corner of it.

use std::time::Duration;

/// The longest `canary_for`.
pub const MAX_CANARY_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// The bands a canary of `k` of `workers` takes, ascending: `⌊i × workers / k⌋` for `i < k`.
pub fn bands(workers: u32, k: u32) -> Vec<u32> {
    (0..u64::from(k)).map(|i| (i * u64::from(workers) / u64::from(k.max(1))) as u32).collect()
}

/// Checks a canary of `k` bands for an app whose live generation has `live_workers` and whose
/// new one would have `workers`; returns its bands.
pub fn check(k: u32, workers: u32, live_workers: Option<u32>) -> Result<Vec<u32>, String> {
    let Some(live) = live_workers else {
        return Err(
            "a canary needs a live generation to share the bands with; deploy without canary first".into()
        );
    };
    if live != workers {
        return Err(format!(
            "a canary must have the live generation's {live} workers (it would have {workers}): bands are split between the two"
        ));
    }
    if k == 0 || k >= workers {
        return Err(format!("canary must be 1..{workers} (fewer bands than the app's {workers})"));
    }
    Ok(bands(workers, k))
}

/// Checks `canary_for`, in seconds.
pub fn check_for(secs: u64) -> Result<Duration, String> {
    let d = Duration::from_secs(secs);
    if secs == 0 || d > MAX_CANARY_FOR {
        return Err(format!("canary_for must be 1 to {} seconds", MAX_CANARY_FOR.as_secs()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_are_spread_over_the_band_space() {
        assert_eq!(bands(8, 1), [0]);
        assert_eq!(bands(8, 2), [0, 4]);
        assert_eq!(bands(8, 3), [0, 2, 5]);
        assert_eq!(bands(8, 7), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(bands(1024, 4), [0, 256, 512, 768]);
        for w in [2, 4, 8, 64, 1024] {
            for k in 1..w {
                let b = bands(w, k);
                assert_eq!(b.len() as u32, k);
                assert!(b.windows(2).all(|p| p[0] < p[1]) && *b.last().unwrap() < w, "{w} {k}: {b:?}");
            }
        }
    }

    #[test]
    fn a_canary_needs_a_live_generation_of_the_same_size_and_fewer_bands() {
        assert_eq!(check(1, 8, Some(8)), Ok(vec![0]));
        assert!(check(1, 8, None).unwrap_err().contains("needs a live generation"));
        assert!(check(1, 8, Some(4)).unwrap_err().contains("live generation's 4 workers"));
        assert!(check(0, 8, Some(8)).unwrap_err().contains("1..8"));
        assert!(check(8, 8, Some(8)).unwrap_err().contains("1..8"));
        assert!(check(1, 1, Some(1)).is_err(), "one band cannot be split");
        assert_eq!(check_for(600), Ok(Duration::from_secs(600)));
        assert!(check_for(0).is_err() && check_for(u64::MAX).is_err());
    }
}
