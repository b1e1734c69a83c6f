//! Tests of the rolling deploy's turns against played hosts.

use super::*;

/// Hosts played by a script: what each deploy returns, and what each rollback answers.
#[derive(Debug, Default)]
struct Script {
    turns: Vec<Turn>,
    /// Rollback answers per host (default: the generation asked for).
    rollbacks: BTreeMap<usize, Result<u64, Fault>>,
    /// Every call, in order.
    calls: Vec<String>,
}

impl Hosts for Script {
    async fn deploy(&mut self, i: usize) -> Turn {
        self.calls.push(format!("deploy {i}"));
        self.turns[i].clone()
    }
    async fn rollback(&mut self, i: usize, to: u64) -> Result<u64, Fault> {
        self.calls.push(format!("rollback {i} to {to}"));
        self.rollbacks.get(&i).cloned().unwrap_or(Ok(to))
    }
}

fn run(script: &mut Script, rollback_on_failure: bool) -> Vec<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let n = script.turns.len();
    rt.block_on(roll(script, n, rollback_on_failure))
}

fn live(previous: u64, generation: u64) -> Turn {
    Turn::Live { previous: Some(previous), generation }
}

fn failed(previous: u64) -> Turn {
    Turn::Failed {
        previous: Some(previous),
        error: "deploy failed: band 0".into(),
        after: After::Live(previous),
    }
}

#[test]
fn every_host_in_order_when_all_go_live() {
    let mut s = Script { turns: vec![live(1, 2), live(4, 5), live(2, 3)], ..Default::default() };
    let out = run(&mut s, true);
    assert_eq!(s.calls, ["deploy 0", "deploy 1", "deploy 2"]);
    assert!(out.iter().all(|o| matches!(o, Outcome::Deployed { .. })), "{out:?}");
    let hosts = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
    assert_eq!(summary("web", &hosts, &out), "web: deployed on all 3 hosts");
    assert_eq!(line("web", "b", &out[1]), "b: web generation 5 is live (was 4)");
}

#[test]
fn the_first_failure_stops_the_roll_and_the_rest_is_untouched() {
    let mut s = Script { turns: vec![live(1, 2), failed(7), live(3, 4)], ..Default::default() };
    let out = run(&mut s, false);
    assert_eq!(s.calls, ["deploy 0", "deploy 1"], "no rollback without the flag, host 2 never contacted");
    assert_eq!(out[0], Outcome::Deployed { previous: Some(1), generation: 2 });
    assert_eq!(
        out[1],
        Outcome::Failed {
            previous: Some(7),
            generation: None,
            after: After::Live(7),
            error: "deploy failed: band 0".into()
        }
    );
    assert_eq!(out[2], Outcome::NotReached);
    let hosts = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
    assert_eq!(summary("web", &hosts, &out), "web: failed on b: 1 deployed, 1 failed, 1 not reached");
    assert_eq!(line("web", "b", &out[1]), "b: failed: deploy failed: band 0; generation 7 is live");
    assert_eq!(line("web", "c", &out[2]), "c: not reached, untouched");
}

#[test]
fn with_rollback_on_failure_the_hosts_done_roll_back_last_first() {
    let mut s = Script { turns: vec![live(1, 2), live(5, 6), failed(3), live(0, 1)], ..Default::default() };
    let out = run(&mut s, true);
    assert_eq!(s.calls, ["deploy 0", "deploy 1", "deploy 2", "rollback 1 to 5", "rollback 0 to 1"]);
    assert_eq!(out[0], Outcome::RolledBack { previous: 1, generation: 2, live: 1 });
    assert_eq!(out[1], Outcome::RolledBack { previous: 5, generation: 6, live: 5 });
    assert!(matches!(out[2], Outcome::Failed { after: After::Live(3), .. }));
    assert_eq!(out[3], Outcome::NotReached);
    let hosts: Vec<String> = ["a", "b", "c", "d"].map(str::to_owned).to_vec();
    assert_eq!(summary("web", &hosts, &out), "web: failed on c: 1 failed, 2 rolled back, 1 not reached");
    assert_eq!(line("web", "a", &out[0]), "a: rolled back to web generation 1 (generation 2 retired)");
    let json = result("a", &out[0]);
    assert_eq!(
        json,
        HostResult {
            host: "a",
            result: "rolled-back",
            previous: Some(1),
            generation: Some(2),
            live: Some(1),
            known: true,
            error: None
        }
    );
}

#[test]
fn an_unhealthy_host_returns_to_its_previous_generation_even_without_the_flag() {
    let unhealthy = Turn::Unhealthy { previous: Some(4), generation: 5, error: "band 1 exited".into() };
    let mut s = Script { turns: vec![live(1, 2), unhealthy, live(1, 2)], ..Default::default() };
    let out = run(&mut s, false);
    assert_eq!(s.calls, ["deploy 0", "deploy 1", "rollback 1 to 4"]);
    assert_eq!(
        out[1],
        Outcome::Failed {
            previous: Some(4),
            generation: Some(5),
            after: After::Live(4),
            error: "band 1 exited".into()
        }
    );
    assert_eq!(result("b", &out[1]).result, "failed");
}

#[test]
fn rollbacks_that_cannot_happen_or_fail_are_failures() {
    let first_ever = Turn::Live { previous: None, generation: 1 };
    let mut s = Script { turns: vec![first_ever, live(2, 3), failed(1)], ..Default::default() };
    s.rollbacks.insert(1, Err(Fault { error: "busy: deploying".into(), lost: false }));
    let out = run(&mut s, true);
    assert_eq!(s.calls, ["deploy 0", "deploy 1", "deploy 2", "rollback 1 to 2"], "nothing to return to on 0");
    assert_eq!(
        out[0],
        Outcome::RollbackFailed {
            previous: None,
            generation: 1,
            error: "no previous generation to return to".into(),
            lost: false
        }
    );
    assert_eq!(line("web", "b", &out[1]), "b: rollback failed: busy: deploying; generation 3 is still live");
    let hosts: Vec<String> = ["a", "b", "c"].map(str::to_owned).to_vec();
    assert_eq!(summary("web", &hosts, &out), "web: failed on c: 1 failed, 2 rollback failed");
}

#[test]
fn what_a_failed_host_serves_is_said_as_far_as_it_is_known() {
    let unreachable = Turn::Failed {
        previous: None,
        error: "cannot reach ipclusterd on b: ssh: refused".into(),
        after: After::Untouched,
    };
    let lost = Turn::Failed { previous: Some(3), error: "lost the connection".into(), after: After::Unknown };
    let unknown = "its state is unknown (ipclusterctl -H b generations web)";
    for (turn, text, now, known) in [
        (
            unreachable,
            "b: failed: cannot reach ipclusterd on b: ssh: refused; untouched".to_owned(),
            None,
            false,
        ),
        (lost, format!("b: failed: lost the connection; {unknown}"), None, false),
        (failed(3), "b: failed: deploy failed: band 0; generation 3 is live".to_owned(), Some(3), true),
    ] {
        let mut s = Script { turns: vec![live(1, 2), turn], ..Default::default() };
        let out = run(&mut s, false);
        assert_eq!(line("web", "b", &out[1]), text);
        let r = result("b", &out[1]);
        assert_eq!((r.result, r.live, r.known), ("failed", now, known), "{text}");
    }
    // Rollbacks whose connection broke: of a host done, and of the unhealthy host itself.
    let unhealthy = Turn::Unhealthy { previous: Some(3), generation: 4, error: "band 0 exited".into() };
    let mut s = Script { turns: vec![live(1, 2), unhealthy], ..Default::default() };
    let broke = Fault { error: "lost the connection".into(), lost: true };
    s.rollbacks.insert(0, Err(broke.clone()));
    s.rollbacks.insert(1, Err(broke));
    let out = run(&mut s, true);
    assert_eq!(line("web", "b", &out[0]), format!("b: rollback failed: lost the connection; {unknown}"));
    assert_eq!((result("a", &out[0]).live, result("a", &out[0]).known), (None, false));
    assert_eq!(
        line("web", "b", &out[1]),
        format!("b: failed: band 0 exited; rolling back failed: lost the connection; {unknown}")
    );
}

fn row(generation: u64, band: u32, pid: u32, state: &str) -> WorkerRow {
    WorkerRow {
        app: "web".into(),
        generation,
        band,
        pid,
        state: state.into(),
        ports: vec![(80, 20000)],
        rss: 0,
        cpu_usec: 0,
        start_usec: 0,
        nice: 0,
        scope: format!("ipcluster-web-{generation}.scope"),
    }
}

#[test]
fn a_pause_fails_when_a_live_worker_changed_or_the_generation_left() {
    let before = live_pids(&[row(3, 0, 10, "live"), row(3, 1, 11, "live"), row(2, 0, 5, "retired")], 3);
    assert_eq!(before, BTreeMap::from([(0, 10), (1, 11)]));
    let same = [row(3, 0, 10, "live"), row(3, 1, 11, "live")];
    assert_eq!(still_healthy(3, &before, &same), Ok(()));
    let respawned = [row(3, 0, 10, "live"), row(3, 1, 12, "live")];
    assert_eq!(
        still_healthy(3, &before, &respawned),
        Err("band 1's worker (pid 11) was replaced by pid 12".into())
    );
    let starting = [row(3, 0, 10, "live"), row(3, 1, 12, "starting")];
    assert_eq!(still_healthy(3, &before, &starting), Err("band 1's worker (pid 11) is gone".into()));
    let retired = [row(3, 0, 10, "retired"), row(3, 1, 11, "retired"), row(4, 0, 20, "live")];
    assert_eq!(still_healthy(3, &before, &retired), Err("generation 3 is no longer live".into()));
}

#[test]
fn options_are_deploys_and_pauses_read_like_config_durations() {
    let o = DeployOptions {
        workers: Some(8),
        command: Some(vec!["/bin/srv".into(), "--fast".into()]),
        env: vec!["A=1".into()],
        workdir: None,
        canary: None,
        canary_for: None,
    };
    let bus = o.to_bus().unwrap();
    let mut keys: Vec<&str> = bus.keys().copied().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["command", "environment", "workers"]);
    let c = DeployOptions { canary: Some(1), canary_for: Some(600), ..DeployOptions::default() };
    let mut keys: Vec<&str> = c.to_bus().unwrap().keys().copied().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["canary", "canary_for"]);
    assert_eq!(super::canary_for("10min"), Ok(600));
    assert_eq!(super::canary_for("1500ms"), Ok(2), "whole seconds, rounded up");
    assert!(super::canary_for("0").is_err() && super::canary_for("soon").is_err());
    assert!(DeployOptions::default().to_bus().unwrap().is_empty());
    assert_eq!(parse_pause("1min 30s"), Ok(Duration::from_secs(90)));
    assert!(parse_pause("soon").is_err());
    assert_eq!(shown(Duration::from_secs(90)), "90s");
    assert_eq!(shown(Duration::from_millis(1500)), "1500ms");
}

/// Property tests of `deploy --hosts H1,H2,…`: the list is taken exactly when every host in it
/// is one `-H` would take, and a list of hosts shown and joined with commas reads back as
/// itself.
mod props {
    use clap::Parser;
    use ipcluster_core::prop_config::{config, mutated};
    use proptest::prelude::*;

    use crate::remote::{Destination, props::destination};

    fn hosts_of(list: &str) -> Result<Vec<Destination>, clap::Error> {
        match crate::Args::try_parse_from(["ipclusterctl", "deploy", "web", "--hosts", list])?.command {
            crate::Cmd::Deploy { roll, .. } => Ok(roll.hosts),
            other => panic!("not a deploy: {other:?}"),
        }
    }

    fn list() -> impl Strategy<Value = String> {
        prop::collection::vec(destination(), 1..5).prop_map(|h| h.join(","))
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn a_host_list_is_taken_exactly_when_each_host_is(s in prop_oneof![list(), mutated(list()), any::<String>()]) {
            let each: Result<Vec<Destination>, _> = s.split(',').map(str::parse::<Destination>).collect();
            match (hosts_of(&s), each) {
                (Ok(got), Ok(want)) => {
                    prop_assert_eq!(&got, &want);
                    let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
                    prop_assert_eq!(hosts_of(&shown.join(",")).ok(), Some(got));
                }
                (Err(_), Err(_)) => {}
                (got, want) => prop_assert!(false, "{:?}: clap {:?}, each {:?}", s, got, want),
            }
        }
    }
}
