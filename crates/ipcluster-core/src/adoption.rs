//! The adoption decision: what a daemon that starts (after a restart, a crash or an upgrade)
//! makes of each generation it finds running, from three witnesses:
//!
//! 1. reality: which generations have workers in their scope, and whether every band has one;
//! 2. the kernel: which generation's worker ports the rules route to. A cutover is one atomic
//!    transaction, so the rules name either the old or the new generation, never a mix: the
//!    newest routed generation is live;
//! 3. the saved state: which generations were live, retired or still starting.
//!
//! Without routed rules (flushed), the saved state says which one is live; with neither (a lost
//! state file and flushed rules), the newest complete generation is. A generation saved as
//! `starting` that the rules do not route was never live: it is stopped. A generation saved as
//! `live` that is not live any more was being retired when the daemon stopped: its retirement
//! is finished (renice, retire signal).

use std::collections::BTreeMap;

use crate::{model::GenState, saved::SavedGeneration};

/// A generation found running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub generation: u64,
    /// Every band has a worker.
    pub complete: bool,
    /// The kernel's rules route to one of its workers.
    pub routed: bool,
}

/// What becomes of a found generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Live,
    /// Retired; `finish` when its retirement was cut short (it was saved as live).
    Retired {
        finish: bool,
    },
    /// Never went live: stop its scope.
    Stop,
}

/// Decides the fate of every found generation of one app.
pub fn decide(found: &[Found], saved: &BTreeMap<u64, SavedGeneration>) -> BTreeMap<u64, Verdict> {
    let newest = |pred: &dyn Fn(&Found) -> bool| found.iter().filter(|f| pred(f)).map(|f| f.generation).max();
    let routed = newest(&|f| f.routed);
    let saved_live = newest(&|f| saved.get(&f.generation).is_some_and(|s| s.state == GenState::Live));
    let complete = if saved.is_empty() { newest(&|f| f.complete) } else { None };
    let live = routed.or(saved_live).or(complete);
    found
        .iter()
        .map(|f| {
            let g = f.generation;
            let record = saved.get(&g);
            let never_live = match record {
                Some(r) => r.state == GenState::Starting && Some(g) != live,
                // No record (a lost state file): newer than the live one means never live.
                None => live.is_some_and(|l| g > l),
            };
            let verdict = if never_live {
                Verdict::Stop
            } else if Some(g) == live {
                Verdict::Live
            } else {
                Verdict::Retired { finish: record.is_some_and(|r| r.state == GenState::Live) }
            };
            (g, verdict)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(generation: u64, complete: bool, routed: bool) -> Found {
        Found { generation, complete, routed }
    }

    fn saved(states: &[(u64, GenState)]) -> BTreeMap<u64, SavedGeneration> {
        states
            .iter()
            .map(|(g, state)| {
                (
                    *g,
                    SavedGeneration {
                        state: *state,
                        started_usec: 0,
                        retired_usec: None,
                        workers: 2,
                        listen: vec![],
                    },
                )
            })
            .collect()
    }

    use GenState::{Live as L, Retired as R, Starting as S};

    #[test]
    fn the_rules_name_the_live_generation() {
        let v = decide(&[found(1, true, false), found(2, true, true)], &saved(&[(1, R), (2, L)]));
        assert_eq!(v[&2], Verdict::Live);
        assert_eq!(v[&1], Verdict::Retired { finish: false });
        // A cutover the previous daemon did not live to save: the rules win over the state.
        let v = decide(&[found(1, true, false), found(2, true, true)], &saved(&[(1, L), (2, S)]));
        assert_eq!(v[&2], Verdict::Live);
        assert_eq!(v[&1], Verdict::Retired { finish: true }, "its retirement is finished");
    }

    #[test]
    fn a_deploy_cut_short_is_stopped() {
        let v = decide(&[found(1, true, true), found(2, false, false)], &saved(&[(1, L), (2, S)]));
        assert_eq!((v[&1], v[&2]), (Verdict::Live, Verdict::Stop));
    }

    #[test]
    fn flushed_rules_fall_back_to_the_saved_state() {
        let v = decide(&[found(1, true, false), found(2, true, false)], &saved(&[(1, L), (2, R)]));
        assert_eq!((v[&1], v[&2]), (Verdict::Live, Verdict::Retired { finish: false }));
    }

    #[test]
    fn a_lost_state_file_falls_back_to_the_rules_then_the_newest_complete() {
        let none = BTreeMap::new();
        let v = decide(&[found(1, true, true), found(2, true, false)], &none);
        assert_eq!((v[&1], v[&2]), (Verdict::Live, Verdict::Stop), "newer than the live one: never live");
        let v = decide(&[found(1, true, false), found(2, true, false), found(3, false, false)], &none);
        assert_eq!(v[&2], Verdict::Live);
        assert_eq!(v[&1], Verdict::Retired { finish: false });
        assert_eq!(v[&3], Verdict::Stop);
    }
}
