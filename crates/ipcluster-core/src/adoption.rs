//! The adoption decision: what a daemon that starts (after a restart, a crash or an upgrade)
//! makes of each generation it finds running, from three witnesses:
//!
//! 1. reality: which generations have workers in their scope, and whether every band has one;
//! 2. the kernel: which generation's worker ports the rules route to. A cutover is one atomic
//!    transaction, so the rules name either the old or the new generation, never a mix: the
//!    newest routed generation is live;
//! 3. the saved state: which generations were live, retired or still starting.
//!
//! A canary splits the bands: the rules route some to it and the others to the live generation,
//! so two generations are routed; the newer is the canary (its bands are the ones routed to
//! it, its deadline the saved one).
//!
//! Without routed rules (flushed), the saved state says which one is live; with neither (a lost
//! state file and flushed rules), the newest complete generation is. With session affinity the
//! newest routed generation is not necessarily the newest generation: an instant rollback makes
//! an older one live while a newer one still drains. The kernel tells them apart: the live
//! generation is routed for every client of a band, a draining one only for the clients
//! recorded for it (a rule matching its session set in NAT mode; its table in a slot other
//! than the live one in socket mode). A generation saved as
//! `starting` that the rules do not route was never live: it is stopped. A generation saved as
//! `live` that is not live any more was being retired when the daemon stopped: its retirement
//! is finished (renice, retire signal).
//!
//! Before any of that, each process is taken for a worker only if what its environment claims
//! ([`Claim`], which the worker controls: it can re-exec itself) agrees with what the daemon
//! knows ([`Expected`]: the saved state, else the app file): [`check_claim`].

use std::collections::BTreeMap;

use crate::{
    config::{MAX_LISTEN, MAX_WORKERS},
    model::GenState,
    saved::{SavedGeneration, SavedWorker},
};

/// What a process's environment says it is (`IPCLUSTER_BAND`, `IPCLUSTER_BANDS`,
/// `IPCLUSTER_PORTS`, which a socket-mode worker does not have): a hint, never the authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub band: u32,
    pub bands: u32,
    /// (public port, worker port), in `listen` order.
    pub ports: Vec<(u16, u16)>,
}

impl Claim {
    /// Reads a claim from an environment; `None` when it does not make one.
    pub fn from_env(env: &[(String, String)]) -> Option<Claim> {
        let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let ports: Option<Vec<(u16, u16)>> = get("IPCLUSTER_PORTS")
            .unwrap_or_default()
            .split(',')
            .filter(|pair| !pair.is_empty())
            .take(MAX_LISTEN + 1)
            .map(|pair| {
                let (p, w) = pair.split_once(':')?;
                Some((p.parse().ok()?, w.parse().ok()?))
            })
            .collect();
        Some(Claim {
            band: get("IPCLUSTER_BAND")?.parse().ok()?,
            bands: get("IPCLUSTER_BANDS")?.parse().ok()?,
            ports: ports?,
        })
    }
}

/// What the daemon knows about a generation, to check claims against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected<'a> {
    pub bands: u32,
    /// Public ports, in `listen` order; none in socket mode (its workers have no port of
    /// their own, so they claim none).
    pub listen_ports: Vec<u16>,
    pub port_range: (u16, u16),
    /// The saved record of this very process (same PID, same start time), if there is one.
    pub worker: Option<&'a SavedWorker>,
}

/// Accepts a claim only where it agrees with what the daemon knows; returns the worker's band
/// and worker ports, or why the claim is refused.
pub fn check_claim(claim: &Claim, expected: &Expected<'_>) -> Result<(u32, Vec<u16>), String> {
    let n = expected.bands;
    if !(1..=MAX_WORKERS).contains(&n) || !n.is_power_of_two() {
        return Err(format!("the generation's band count {n} is not a power of two up to {MAX_WORKERS}"));
    }
    if claim.bands != n {
        return Err(format!("claims {} bands; the generation has {n}", claim.bands));
    }
    if claim.band >= n {
        return Err(format!("claims band {} of {n}", claim.band));
    }
    let public: Vec<u16> = claim.ports.iter().map(|p| p.0).collect();
    if public != expected.listen_ports {
        return Err(format!(
            "claims public ports {public:?}; the generation listens on {:?}",
            expected.listen_ports
        ));
    }
    let (lo, hi) = expected.port_range;
    let ports: Vec<u16> = claim.ports.iter().map(|p| p.1).collect();
    if let Some(p) = ports.iter().find(|p| !(lo..=hi).contains(*p)) {
        return Err(format!("claims worker port {p}, outside port_range {lo}-{hi}"));
    }
    if let Some(w) = expected.worker
        && (w.band != claim.band || w.ports != ports)
    {
        return Err(format!(
            "claims band {} ports {ports:?}; the daemon started it as band {} ports {:?}",
            claim.band, w.band, w.ports
        ));
    }
    Ok((claim.band, ports))
}

/// A generation found running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub generation: u64,
    /// Every band has a worker.
    pub complete: bool,
    /// The kernel routes every client of a band to one of its workers (NAT: a rule that matches
    /// no session set; socket mode: the table of the live slot).
    pub routed: bool,
    /// The kernel routes only the clients recorded for it to its workers (NAT: a rule that
    /// matches its session set; socket mode: its table in another slot).
    pub draining: bool,
}

/// What becomes of a found generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Live,
    /// Retired; `finish` when its retirement was cut short (it was saved as live).
    Retired {
        finish: bool,
    },
    /// Retired, its recorded clients still reaching it.
    Draining,
    /// A canary: some bands are routed to it, the others to the live generation.
    Canary,
    /// Never went live (or was a canary being rolled back): stop its scope.
    Stop,
}

/// Decides the fate of every found generation of one app.
pub fn decide(found: &[Found], saved: &BTreeMap<u64, SavedGeneration>) -> BTreeMap<u64, Verdict> {
    let newest = |pred: &dyn Fn(&Found) -> bool| found.iter().filter(|f| pred(f)).map(|f| f.generation).max();
    let saved_as = |g: u64, state: GenState| saved.get(&g).is_some_and(|s| s.state == state);
    let any_routed = found.iter().any(|f| f.routed || f.draining);
    // A canary shares the bands with the live generation: the rules route some bands to each, so
    // two generations are routed (nothing else makes two: a cutover is one transaction). With
    // nothing of ours in the kernel (flushed rules), the saved state says which is a canary.
    let mut routed: Vec<u64> = found.iter().filter(|f| f.routed).map(|f| f.generation).collect();
    routed.sort_unstable_by(|a, b| b.cmp(a));
    let canary = if routed.len() >= 2 {
        Some(routed[0])
    } else if !any_routed {
        newest(&|f| saved_as(f.generation, GenState::Canary))
    } else {
        None
    };
    let not_canary = |g: &u64| Some(*g) != canary;
    let routed_live = routed.iter().copied().find(not_canary);
    let saved_live = newest(&|f| not_canary(&f.generation) && saved_as(f.generation, GenState::Live));
    let complete = if saved.is_empty() { newest(&|f| f.complete && not_canary(&f.generation)) } else { None };
    let live = routed_live.or(saved_live).or(complete);
    found
        .iter()
        .map(|f| {
            let g = f.generation;
            let record = saved.get(&g);
            let never_live = match record {
                Some(r) => r.state == GenState::Starting && Some(g) != live,
                // No record (a lost state file): newer than the live one means never live,
                // unless clients still stick to it (it was live, then rolled back from).
                None => !f.draining && live.is_some_and(|l| g > l),
            };
            let saved_state = record.map(|r| r.state);
            // Whether clients still stick to it: the kernel says so; with nothing of ours in the
            // kernel (flushed rules), the saved state does (the rules are written again).
            let draining = if any_routed { f.draining } else { saved_state == Some(GenState::Draining) };
            let verdict = if Some(g) == canary && live.is_some() {
                Verdict::Canary
            } else if never_live || (saved_state == Some(GenState::Canary) && Some(g) != live) {
                // A canary no rule routes any more was being rolled back: its workers stop.
                Verdict::Stop
            } else if Some(g) == live {
                Verdict::Live
            } else if draining {
                Verdict::Draining
            } else {
                Verdict::Retired { finish: saved_state == Some(GenState::Live) }
            };
            (g, verdict)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn claims_are_checked_against_what_the_daemon_knows() {
        let honest =
            env(&[("IPCLUSTER_BAND", "1"), ("IPCLUSTER_BANDS", "4"), ("IPCLUSTER_PORTS", "80:20001")]);
        let claim = Claim::from_env(&honest).unwrap();
        let saved = SavedWorker { pid: 7, start_usec: 1, band: 1, ports: vec![20001] };
        let expected =
            Expected { bands: 4, listen_ports: vec![80], port_range: (20000, 32767), worker: Some(&saved) };
        assert_eq!(check_claim(&claim, &expected), Ok((1, vec![20001])));
        let refused = |pairs: &[(&str, &str)]| check_claim(&Claim::from_env(&env(pairs)).unwrap(), &expected);
        let forged_bands = refused(&[
            ("IPCLUSTER_BAND", "1"),
            ("IPCLUSTER_BANDS", "4294967295"),
            ("IPCLUSTER_PORTS", "80:20001"),
        ]);
        assert!(forged_bands.unwrap_err().contains("4294967295 bands"));
        let extra_port = refused(&[
            ("IPCLUSTER_BAND", "1"),
            ("IPCLUSTER_BANDS", "4"),
            ("IPCLUSTER_PORTS", "80:20001,22:20001"),
        ]);
        assert!(extra_port.unwrap_err().contains("public ports [80, 22]"));
        let other_band =
            refused(&[("IPCLUSTER_BAND", "2"), ("IPCLUSTER_BANDS", "4"), ("IPCLUSTER_PORTS", "80:20001")]);
        assert!(other_band.unwrap_err().contains("started it as band 1"));
        let outside =
            refused(&[("IPCLUSTER_BAND", "1"), ("IPCLUSTER_BANDS", "4"), ("IPCLUSTER_PORTS", "80:22")]);
        assert!(outside.unwrap_err().contains("outside port_range"));
        let beyond =
            refused(&[("IPCLUSTER_BAND", "9"), ("IPCLUSTER_BANDS", "4"), ("IPCLUSTER_PORTS", "80:20001")]);
        assert!(beyond.is_err());
        assert_eq!(Claim::from_env(&env(&[("IPCLUSTER_BAND", "x")])), None);
        let many: String = (0..100).map(|i| format!("{i}:{i}")).collect::<Vec<_>>().join(",");
        let long = Claim::from_env(&env(&[
            ("IPCLUSTER_BAND", "0"),
            ("IPCLUSTER_BANDS", "1"),
            ("IPCLUSTER_PORTS", &many),
        ]));
        assert!(long.unwrap().ports.len() <= MAX_LISTEN + 1, "a forged list is not read past the limit");
        // A NAT worker that claims no ports is refused.
        let portless = refused(&[("IPCLUSTER_BAND", "1"), ("IPCLUSTER_BANDS", "4")]);
        assert!(portless.unwrap_err().contains("public ports []"));
    }

    #[test]
    fn socket_mode_workers_claim_a_band_and_no_port() {
        let claim =
            Claim::from_env(&env(&[("IPCLUSTER_BAND", "3"), ("IPCLUSTER_BANDS", "4"), ("LISTEN_FDS", "1")]))
                .unwrap();
        let saved = SavedWorker { pid: 7, start_usec: 1, band: 3, ports: vec![] };
        let expected =
            Expected { bands: 4, listen_ports: vec![], port_range: (20000, 29999), worker: Some(&saved) };
        assert_eq!(check_claim(&claim, &expected), Ok((3, vec![])));
        let other = SavedWorker { band: 2, ..saved.clone() };
        let refused = check_claim(&claim, &Expected { worker: Some(&other), ..expected.clone() });
        assert!(refused.unwrap_err().contains("started it as band 2"));
        // A port claimed where the generation has none is refused.
        let ported = Claim { ports: vec![(80, 20001)], ..claim };
        assert!(check_claim(&ported, &expected).unwrap_err().contains("public ports [80]"));
    }

    fn found(generation: u64, complete: bool, routed: bool) -> Found {
        Found { generation, complete, routed, draining: false }
    }

    fn draining(generation: u64) -> Found {
        Found { generation, complete: true, routed: false, draining: true }
    }

    fn saved(states: &[(u64, GenState)]) -> BTreeMap<u64, SavedGeneration> {
        states
            .iter()
            .map(|(g, state)| {
                (
                    *g,
                    SavedGeneration::of(
                        *state,
                        0,
                        &crate::config::AppConfig::fallback(
                            crate::name::AppName::new("a").unwrap(),
                            2,
                            vec!["0.0.0.0:80".parse().unwrap()],
                        ),
                    ),
                )
            })
            .collect()
    }

    use GenState::{Canary as C, Draining as D, Live as L, Retired as R, Starting as S};

    /// Issue 23: a draining generation is told from the live one by how the kernel routes to it
    /// (only its recorded clients), whatever their order: after an instant rollback the live one
    /// is older than one that drains.
    #[test]
    fn the_kernel_tells_draining_generations_from_the_live_one() {
        let v = decide(&[draining(1), draining(2), found(3, true, true)], &saved(&[(1, D), (2, D), (3, L)]));
        assert_eq!((v[&1], v[&2], v[&3]), (Verdict::Draining, Verdict::Draining, Verdict::Live));
        // Rolled back instantly to 2 while 3 drains; the state file is lost.
        let v = decide(&[found(2, true, true), draining(3)], &BTreeMap::new());
        assert_eq!((v[&2], v[&3]), (Verdict::Live, Verdict::Draining), "3 was live: it drains, not stopped");
        // The state said draining, but the kernel routes nothing to it any more (its sessions were
        // cut just before the daemon stopped): retired.
        let v = decide(&[found(1, true, false), found(2, true, true)], &saved(&[(1, D), (2, L)]));
        assert_eq!(v[&1], Verdict::Retired { finish: false });
        // Flushed rules: the saved state says who drains (the rules and sets are written again).
        let v = decide(&[found(1, true, false), found(2, true, false)], &saved(&[(1, D), (2, L)]));
        assert_eq!((v[&1], v[&2]), (Verdict::Draining, Verdict::Live));
    }

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

    /// Issue 24: a canary is the newer of the two generations the rules route to, whatever the
    /// state file says (a cutover of the canary's bands the previous daemon did not live to
    /// save); with flushed rules the state file says which is a canary.
    #[test]
    fn a_canary_is_the_newer_of_two_routed_generations() {
        let v = decide(&[found(1, true, true), found(2, true, true)], &saved(&[(1, L), (2, C)]));
        assert_eq!((v[&1], v[&2]), (Verdict::Live, Verdict::Canary));
        let v = decide(&[found(1, true, true), found(2, true, true)], &saved(&[(1, L), (2, S)]));
        assert_eq!((v[&1], v[&2]), (Verdict::Live, Verdict::Canary), "its cutover was not saved");
        let v = decide(&[found(1, true, true), found(2, true, true)], &BTreeMap::new());
        assert_eq!((v[&1], v[&2]), (Verdict::Live, Verdict::Canary), "no state file");
        // Flushed rules: the saved state.
        let v = decide(&[found(1, true, false), found(2, true, false)], &saved(&[(1, L), (2, C)]));
        assert_eq!((v[&1], v[&2]), (Verdict::Live, Verdict::Canary));
        // Saved as a canary, but no rule routes to it while the live one is: it was being rolled
        // back; its workers stop.
        let v = decide(&[found(1, true, true), found(2, true, false)], &saved(&[(1, L), (2, C)]));
        assert_eq!((v[&1], v[&2]), (Verdict::Live, Verdict::Stop));
        // With draining generations beside it.
        let v = decide(
            &[draining(1), found(2, true, true), found(3, true, true)],
            &saved(&[(1, D), (2, L), (3, C)]),
        );
        assert_eq!((v[&1], v[&2], v[&3]), (Verdict::Draining, Verdict::Live, Verdict::Canary));
    }
}
