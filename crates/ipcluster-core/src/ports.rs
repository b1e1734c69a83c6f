//! Worker port allocation: distinct per worker, never reused while any worker (live or retired)
//! holds a port, and handed out round-robin so a just-freed port (with connections in TIME_WAIT
//! and conntrack entries still pointing at it) is the last to be reused. And whether a port
//! range overlaps the kernel's ephemeral ports (where it picks source ports of outgoing
//! connections: such a port can be taken before a worker binds it).

use std::collections::BTreeSet;

/// Hands out ports from `lo..=hi`, remembering where it stopped.
#[derive(Debug, Clone, Default)]
pub struct PortAllocator {
    cursor: u16,
}

impl PortAllocator {
    /// Allocates `count` ports in `range`, skipping `held` and ports for which `free` says no
    /// (held by other software). Returns `None`, allocating nothing, if there are not enough.
    pub fn allocate(
        &mut self,
        range: (u16, u16),
        count: usize,
        held: &BTreeSet<u16>,
        mut free: impl FnMut(u16) -> bool,
    ) -> Option<Vec<u16>> {
        let (lo, hi) = range;
        let size = usize::from(hi - lo) + 1;
        let start = if (lo..=hi).contains(&self.cursor) { self.cursor } else { lo };
        let mut out = Vec::with_capacity(count);
        let mut p = start;
        for _ in 0..size {
            if out.len() == count {
                break;
            }
            if !held.contains(&p) && free(p) {
                out.push(p);
            }
            p = if p == hi { lo } else { p + 1 };
        }
        if out.len() < count {
            return None;
        }
        self.cursor = p;
        Some(out)
    }
}

/// Linux's default `net.ipv4.ip_local_port_range`.
pub const LINUX_EPHEMERAL: (u16, u16) = (32768, 60999);

/// The part of `range` inside the ephemeral range `ephemeral` (both inclusive), if any.
pub fn ephemeral_overlap(range: (u16, u16), ephemeral: (u16, u16)) -> Option<(u16, u16)> {
    let (lo, hi) = (range.0.max(ephemeral.0), range.1.min(ephemeral.1));
    (lo <= hi).then_some((lo, hi))
}

/// Parses `/proc/sys/net/ipv4/ip_local_port_range` (`"32768\t60999\n"`).
pub fn parse_ephemeral(text: &str) -> Result<(u16, u16), String> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Ok((lo, hi)),
        _ => Err(format!("{} is not \"LOW HIGH\"", crate::units::shown(text.trim()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_round_robin_and_skips_held() {
        let mut a = PortAllocator::default();
        let held: BTreeSet<u16> = [30001].into();
        let first = a.allocate((30000, 30009), 4, &held, |_| true).unwrap();
        assert_eq!(first, [30000, 30002, 30003, 30004]);
        // Next allocation continues after the last one, even though 30000 is not held any more.
        let second = a.allocate((30000, 30009), 4, &BTreeSet::new(), |_| true).unwrap();
        assert_eq!(second, [30005, 30006, 30007, 30008]);
        // Wraps around.
        let third = a.allocate((30000, 30009), 3, &second.iter().copied().collect(), |p| p != 30000).unwrap();
        assert_eq!(third, [30009, 30001, 30002]);
    }

    #[test]
    fn not_enough_allocates_nothing() {
        let mut a = PortAllocator::default();
        assert!(a.allocate((30000, 30003), 5, &BTreeSet::new(), |_| true).is_none());
        assert_eq!(a.allocate((30000, 30003), 1, &BTreeSet::new(), |_| true).unwrap(), [30000]);
    }

    #[test]
    fn overlap_with_the_ephemeral_range() {
        assert_eq!(ephemeral_overlap((20000, 39999), LINUX_EPHEMERAL), Some((32768, 39999)));
        assert_eq!(ephemeral_overlap(crate::config::defaults::PORT_RANGE, LINUX_EPHEMERAL), None);
        assert_eq!(ephemeral_overlap((20000, 32767), LINUX_EPHEMERAL), None);
        assert_eq!(ephemeral_overlap((20000, 32768), LINUX_EPHEMERAL), Some((32768, 32768)));
        assert_eq!(ephemeral_overlap((61000, 65535), LINUX_EPHEMERAL), None);
        assert_eq!(ephemeral_overlap((1024, 65535), LINUX_EPHEMERAL), Some(LINUX_EPHEMERAL));
        assert_eq!(ephemeral_overlap((40000, 40010), LINUX_EPHEMERAL), Some((40000, 40010)));
        // Exhaustive against a brute-force count, on a small universe.
        for a in 0..20u16 {
            for b in a..20 {
                for (c, d) in [(5, 9), (0, 0), (19, 19), (3, 15)] {
                    let both = (a..=b).filter(|p| (c..=d).contains(p)).count();
                    let got = ephemeral_overlap((a, b), (c, d)).map_or(0, |(l, h)| usize::from(h - l) + 1);
                    assert_eq!(got, both, "{a}-{b} vs {c}-{d}");
                }
            }
        }
    }

    #[test]
    fn the_kernels_file_is_parsed() {
        assert_eq!(parse_ephemeral("32768\t60999\n"), Ok(LINUX_EPHEMERAL));
        assert_eq!(parse_ephemeral("1024 65535"), Ok((1024, 65535)));
        for bad in ["", "32768", "60999 32768", "a b", "1 2 3", "70000 80000"] {
            assert!(parse_ephemeral(bad).is_err(), "{bad:?}");
        }
    }
}
