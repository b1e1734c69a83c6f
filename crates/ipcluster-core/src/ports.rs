//! Worker port allocation: distinct per worker, never reused while any worker (live or retired)
//! holds a port, and handed out round-robin so a just-freed port (with connections in TIME_WAIT
//! and conntrack entries still pointing at it) is the last to be reused.

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
}
