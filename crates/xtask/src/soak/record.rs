//! What the soak's threads share: the clock, the fault timeline (written by the injector,
//! read by the checks) and the invariant violations (each reported once by its key, with a
//! count and the last faults before its first time).

use std::{collections::HashMap, sync::Mutex};

use serde::Serialize;

use super::{
    account::{FaultEvent, Hit, Secs, last_faults},
    faults::Fault,
    load::Clock,
};

/// An invariant that did not hold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    /// When it was first seen.
    pub t: Secs,
    /// Which invariant (`routing`, `leftover`, `request`, …).
    pub invariant: String,
    /// What it is about (`demo band 2`, `scope ipcluster-chat-4.scope`): the same key counts once.
    pub key: String,
    pub detail: String,
    /// How many times it was seen.
    pub count: u64,
    /// The last faults before it was first seen.
    pub last_faults: Vec<String>,
    /// The next times it was seen (up to [`LATER_SHOWN`]): when, what, and the fault before.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub later: Vec<String>,
}

/// How many later sightings of a violation are kept beside its first.
pub const LATER_SHOWN: usize = 9;

/// The violations in order, and where each key's is.
type Violations = (Vec<Violation>, HashMap<(String, String), usize>);

#[derive(Debug)]
pub struct Shared {
    pub clock: Clock,
    timeline: Mutex<Vec<FaultEvent>>,
    violations: Mutex<Violations>,
}

impl Shared {
    pub fn new(clock: Clock) -> Self {
        Shared {
            clock,
            timeline: Mutex::new(Vec::new()),
            violations: Mutex::new((Vec::new(), HashMap::new())),
        }
    }

    pub fn now(&self) -> Secs {
        self.clock.now()
    }

    /// A fault begins now; its id for [`Shared::finish`].
    pub fn begin(&self, fault: Fault) -> usize {
        let mut timeline = self.timeline.lock().expect("not poisoned");
        timeline.push(FaultEvent { fault, start: self.now(), end: None, hit: Hit::default() });
        timeline.len() - 1
    }

    /// Fault `id`'s effect ended now, having done `hit`.
    pub fn finish(&self, id: usize, hit: Hit) {
        let now = self.now();
        let line = {
            let mut timeline = self.timeline.lock().expect("not poisoned");
            let e = &mut timeline[id];
            (e.end, e.hit) = (Some(now), hit);
            e.line()
        };
        eprintln!("soak: {line} ({:.1} s)", now - self.timeline()[id].start);
    }

    /// Every fault so far.
    pub fn timeline(&self) -> Vec<FaultEvent> {
        self.timeline.lock().expect("not poisoned").clone()
    }

    /// Records that `invariant` did not hold at `t` for `key`; printed the first time.
    pub fn violate(&self, t: Secs, invariant: &str, key: impl Into<String>, detail: impl Into<String>) {
        let key = key.into();
        let faults = self.timeline();
        let mut v = self.violations.lock().expect("not poisoned");
        let (list, index) = &mut *v;
        if let Some(&i) = index.get(&(invariant.to_owned(), key.clone())) {
            let v = &mut list[i];
            v.count += 1;
            if v.later.len() < LATER_SHOWN {
                let before = last_faults(t, &faults, 1).pop().unwrap_or_default();
                let line = format!("at {t:.1} s: {} (after {})", detail.into(), before.trim());
                eprintln!("soak: VIOLATION again: {invariant}: {key}: {line}");
                v.later.push(line);
            }
            return;
        }
        let violation = Violation {
            t,
            invariant: invariant.into(),
            key: key.clone(),
            detail: detail.into(),
            count: 1,
            last_faults: last_faults(t, &faults, 3),
            later: Vec::new(),
        };
        eprintln!(
            "soak: VIOLATION at {t:.1} s: {invariant}: {key}: {}\n      after: {}",
            violation.detail,
            violation.last_faults.join("\n             ")
        );
        index.insert((invariant.into(), key), list.len());
        list.push(violation);
    }

    pub fn violations(&self) -> Vec<Violation> {
        self.violations.lock().expect("not poisoned").0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_violation_is_kept_once_per_key_with_its_count_and_the_faults_before_it() {
        let shared = Shared::new(Clock::new());
        let id = shared.begin(Fault::NatFlush);
        shared.finish(id, Hit::ok("repaired"));
        shared.violate(9.0, "routing", "demo band 1", "no live worker");
        shared.violate(10.0, "routing", "demo band 1", "no live worker");
        shared.violate(10.0, "routing", "demo band 2", "no live worker");
        let v = shared.violations();
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].count, v[0].t, v[0].key.as_str()), (2, 9.0, "demo band 1"));
        assert_eq!(v[0].last_faults.len(), 1);
        assert!(v[0].last_faults[0].contains("nat-flush: repaired"), "{:?}", v[0].last_faults);
        assert_eq!(shared.timeline()[0].hit.outcome, "repaired");
    }
}
