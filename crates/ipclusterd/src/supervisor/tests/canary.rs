//! Canary deploys against the fakes: the split, promotion, rollback by hand and by itself,
//! canary_for, a canary replacing a canary, refusals, sessions, and adoption of a split.

use ipcluster_core::checks::Outcome;

use super::*;
use crate::supervisor::CanaryRequest;

fn eight(extra: &str) -> String {
    format!("command = [\"serve\"]\nworkers = 8\n{BASE}{extra}")
}

impl Harness {
    async fn canary(&self, app: &str, bands: u32, canary_for: Option<Duration>) -> Result<u64, Error> {
        let canary = CanaryRequest { bands, canary_for };
        self.handle
            .call(|reply| Command::DeployCanary {
                app: app.into(),
                overrides: Overrides::default(),
                canary,
                auth: Authorized::test(),
                reply,
            })
            .await
    }

    async fn promote(&self, app: &str) -> Result<u64, Error> {
        self.handle.call(|reply| Command::Promote { app: app.into(), auth: Authorized::test(), reply }).await
    }

    async fn state_of(&self, app: &str, g: u64) -> Option<GenState> {
        let snap = self.handle.snapshot().await.unwrap();
        snap.generations.iter().find(|x| x.app == app && x.generation == g).map(|x| x.state)
    }

    /// Which generation's worker each band is routed to now.
    async fn routed_generations(&self, app: &str) -> Vec<u64> {
        let workers = self.workers(app).await;
        self.routed(app)
            .iter()
            .map(|port| {
                workers.iter().find(|w| w.ports.iter().any(|p| p.1 == *port)).map_or(0, |w| w.generation)
            })
            .collect()
    }

    fn canary_ended(&mut self) -> Vec<(u64, &'static str, String)> {
        let mut out = Vec::new();
        while let Ok(s) = self.signals.try_recv() {
            if let BusSignal::CanaryEnded { generation, result, reason, .. } = s {
                out.push((generation, result, reason));
            }
        }
        out
    }
}

#[tokio::test(start_paused = true)]
async fn a_canary_takes_its_bands_only_and_promote_moves_the_rest() {
    let mut h = start("canary-promote", &[("web", eight(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.canary("web", 2, None).await, Ok(2));
    assert_eq!(h.state_of("web", 2).await, Some(GenState::Canary));
    assert_eq!(h.state_of("web", 1).await, Some(GenState::Live), "the live generation keeps the other bands");
    // Bands 0 and 4 (spread over the band space) go to the canary, in one transaction.
    assert_eq!(h.routed_generations("web").await, [2, 1, 1, 1, 2, 1, 1, 1]);
    let canary_workers: Vec<u32> =
        h.workers("web").await.iter().filter(|w| w.generation == 2).map(|w| w.band).collect();
    assert_eq!(canary_workers, [0, 4], "only the canary's bands started");
    // Promote: the other six start, then every band moves; generation 1 is retired.
    assert_eq!(h.promote("web").await, Ok(2));
    assert_eq!(h.state_of("web", 2).await, Some(GenState::Live));
    assert_eq!(h.state_of("web", 1).await, Some(GenState::Retired));
    assert_eq!(h.routed_generations("web").await, [2; 8]);
    let ended = h.canary_ended();
    assert_eq!(ended.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(), [(2, "promoted")], "{ended:?}");
    let metrics = h.handle.snapshot().await.unwrap().metrics.clone();
    assert_eq!((metrics.deploys["web"].ok, metrics.deploys["web"].promoted), (1, 1));
    // Nothing to promote any more.
    assert!(matches!(h.promote("web").await, Err(Error::NoSuchGeneration(m)) if m.contains("no canary")));
}

#[tokio::test(start_paused = true)]
async fn rollback_during_a_canary_puts_its_bands_back_and_stops_it_at_once() {
    let mut h = start("canary-rollback", &[("web", eight(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let before = h.routed("web");
    assert_eq!(h.canary("web", 1, None).await, Ok(2));
    assert_eq!(h.rollback("web", 0).await, Ok(1));
    assert_eq!(
        h.routed("web"),
        before,
        "the live generation's own workers, in the rules before the call returned"
    );
    h.until("the canary to stop", Duration::from_secs(5), async |h| {
        h.state_of("web", 2).await == Some(GenState::Stopped)
    })
    .await;
    let ended = h.canary_ended();
    assert!(matches!(ended.as_slice(), [(2, "rolled_back", why)] if why.contains("Rollback")), "{ended:?}");
    assert_eq!(h.handle.snapshot().await.unwrap().metrics.deploys["web"].rolled_back, 1);
}

#[tokio::test(start_paused = true)]
async fn a_canary_for_promotes_a_healthy_canary_and_rolls_back_one_that_crashes() {
    let mut h = start("canary-for", &[("web", eight(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.canary("web", 1, Some(Duration::from_secs(60))).await, Ok(2));
    h.sleep(Duration::from_secs(59)).await;
    assert_eq!(h.state_of("web", 2).await, Some(GenState::Canary));
    h.until("the canary to promote itself", Duration::from_secs(5), async |h| {
        h.state_of("web", 2).await == Some(GenState::Live)
    })
    .await;
    assert!(h.canary_ended().iter().any(|e| e.1 == "promoted" && e.2.contains("canary_for")));
    // The next canary crashes: it is rolled back by itself, long before its time is up.
    assert_eq!(h.canary("web", 1, Some(Duration::from_secs(3600))).await, Ok(3));
    let pid = h.worker("web", 3, 0).await.pid;
    h.procs.exit(pid, Exit::Code(1));
    h.until("the crashed canary to roll back", Duration::from_secs(5), async |h| {
        h.state_of("web", 3).await.is_some_and(|s| s != GenState::Canary)
    })
    .await;
    assert_eq!(h.routed_generations("web").await, [2; 8]);
    let ended = h.canary_ended();
    assert!(
        matches!(ended.as_slice(), [(3, "rolled_back", why)] if why.contains("band 0") && why.contains("exited")),
        "{ended:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_canary_failing_a_health_check_rolls_back_by_itself() {
    let mut h =
        start("canary-health", &[("web", eight("health_path = \"/healthz\"\nhealth_interval = \"1s\"\n"))])
            .await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.canary("web", 1, Some(Duration::from_secs(600))).await, Ok(2));
    let port = h.worker("web", 2, 0).await.ports[0].1;
    h.checker.answer(port, Outcome::Status(500));
    h.until("the canary to roll back", Duration::from_secs(5), async |h| {
        h.state_of("web", 2).await != Some(GenState::Canary)
    })
    .await;
    let ended = h.canary_ended();
    assert!(matches!(ended.as_slice(), [(2, "rolled_back", why)] if why.contains("HTTP 500")), "{ended:?}");
    assert_eq!(h.routed_generations("web").await, [1; 8]);
}

#[tokio::test(start_paused = true)]
async fn deploys_during_a_canary_are_refused_unless_a_canary_replaces_it() {
    let mut h = start("canary-replace", &[("web", eight(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.canary("web", 1, None).await, Ok(2));
    let e = h.deploy("web").await.unwrap_err();
    assert!(matches!(&e, Error::Busy(m) if m.contains("is a canary") && m.contains("promote")), "{e:?}");
    // A new canary of 2 bands replaces it: bands 0 and 4 on 3; 2 stops.
    assert_eq!(h.canary("web", 2, None).await, Ok(3));
    assert_eq!(h.routed_generations("web").await, [3, 1, 1, 1, 3, 1, 1, 1]);
    h.until("the replaced canary to stop", Duration::from_secs(5), async |h| {
        h.state_of("web", 2).await == Some(GenState::Stopped)
    })
    .await;
    assert!(h.canary_ended().iter().any(|e| e.0 == 2 && e.2.contains("replaced by canary generation 3")));
    // What a canary cannot be.
    for (bands, why) in [(0, "1..8"), (8, "1..8")] {
        let e = h.canary("web", bands, None).await.unwrap_err();
        assert!(matches!(&e, Error::InvalidArgs(m) if m.contains(why)), "{bands}: {e:?}");
    }
    let e = h
        .handle
        .call(|reply| Command::DeployCanary {
            app: "web".into(),
            overrides: Overrides { workers: Some(4), ..Overrides::default() },
            canary: CanaryRequest { bands: 1, canary_for: None },
            auth: Authorized::test(),
            reply,
        })
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::InvalidArgs(m) if m.contains("live generation's 8 workers")), "{e:?}");
    let e = h.canary("nothing", 1, None).await.unwrap_err();
    assert!(matches!(e, Error::NoSuchApp(_) | Error::InvalidArgs(_)), "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn a_canary_needs_a_live_generation() {
    let h = start("canary-first", &[("web", eight(""))]).await;
    let e = h.canary("web", 1, None).await.unwrap_err();
    assert!(matches!(&e, Error::InvalidArgs(m) if m.contains("needs a live generation")), "{e:?}");
    assert!(h.never_routed());
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_keeps_the_split_and_the_deadline() {
    let mut h = start("canary-adopt", &[("web", eight(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.canary("web", 2, Some(Duration::from_secs(120))).await, Ok(2));
    h.sleep(Duration::from_secs(60)).await;
    h.restart().await;
    assert_eq!(h.state_of("web", 2).await, Some(GenState::Canary));
    assert_eq!(h.state_of("web", 1).await, Some(GenState::Live));
    assert_eq!(h.routed_generations("web").await, [2, 1, 1, 1, 2, 1, 1, 1]);
    // About 60 s of the 120 are left: not promoted at 50 s, promoted by 70 s.
    h.sleep(Duration::from_secs(50)).await;
    assert_eq!(h.state_of("web", 2).await, Some(GenState::Canary));
    h.until("the deadline kept across the restart", Duration::from_secs(20), async |h| {
        h.state_of("web", 2).await == Some(GenState::Live)
    })
    .await;
    assert_eq!(h.routed_generations("web").await, [2; 8]);
}

#[tokio::test(start_paused = true)]
async fn with_sessions_a_canary_records_its_bands_new_clients_and_the_live_one_keeps_its_own() {
    let h = start("canary-sessions", &[("web", eight("session_affinity = \"60s\"\n"))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.canary("web", 1, None).await, Ok(2));
    let s = h.router.last().into_iter().find(|r| r.app.as_str() == "web").and_then(|r| r.sessions).unwrap();
    assert_eq!(s.record, [1, 0, 0, 0, 0, 0, 0, 0], "band 0's new clients are recorded in the canary's set");
    assert_eq!(s.draining.len(), 1);
    assert_eq!(s.draining[0].slot, 0, "the live generation's recorded clients of band 0 stay on it");
    let kept: Vec<bool> = s.draining[0].bands.iter().map(Option::is_some).collect();
    assert_eq!(kept, [true, false, false, false, false, false, false, false]);
    // A rollback sends the canary's clients back: no trace of it in the rules.
    assert_eq!(h.rollback("web", 0).await, Ok(1));
    let s = h.router.last().into_iter().find(|r| r.app.as_str() == "web").and_then(|r| r.sessions).unwrap();
    assert_eq!((s.record, s.draining.len()), (vec![0; 8], 0));
}
