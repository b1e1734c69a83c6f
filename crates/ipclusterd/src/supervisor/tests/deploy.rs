//! Deploys, failed deploys, bad requests, pacing, StopApp, and what a deploy saves.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_deploy_cuts_over_retires_the_previous_generation_and_reaps_it() {
    let mut h = start("cutover", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let first = h.workers("web").await;
    assert_eq!(first.len(), 2);
    assert_eq!(h.scopes.names(), ["ipcluster-web-1.scope"]);
    let by_band = |rows: &[WorkerInfo], g| {
        (0..2)
            .map(|b| rows.iter().find(|w| w.generation == g && w.band == b).unwrap().ports[0].1)
            .collect::<Vec<_>>()
    };
    assert_eq!(h.routed("web"), by_band(&first, 1), "one transaction routes every band to generation 1");

    assert_eq!(h.deploy("web").await, Ok(2));
    let rows = h.workers("web").await;
    assert_eq!(h.routed("web"), by_band(&rows, 2));
    for w in rows.iter().filter(|w| w.generation == 1) {
        assert_eq!((w.state, w.nice), (WorkerState::Retired, 5), "retired and reniced: {w:?}");
    }
    h.sleep(Duration::from_millis(1)).await;
    assert!(h.scopes.cpu_weights.lock().unwrap().contains(&("ipcluster-web-1.scope".into(), 10)));

    let n = h
        .handle
        .call(|reply| Command::KillRetired { app: String::new(), auth: Authorized::test(), reply })
        .await;
    assert_eq!(n, Ok(2));
    h.until("generation 1 to stop", Duration::from_secs(1), async |h| {
        h.workers("web").await.iter().all(|w| w.generation == 2)
    })
    .await;
    let states = h.generation_states();
    let expected =
        [(1, GenState::Starting), (1, GenState::Live), (2, GenState::Starting), (2, GenState::Live)];
    assert_eq!(states[..4], expected);
    assert!(
        states.contains(&(1, GenState::Retired)) && states.ends_with(&[(1, GenState::Stopped)]),
        "{states:?}"
    );
    let metrics = h.handle.snapshot().await.unwrap().metrics.clone();
    assert_eq!((metrics.deploys["web"].ok, metrics.deploys["web"].failed), (2, 0), "two deploys went live");
    assert_eq!(metrics.cutover["web"].count, 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_deploy_stops_its_scope_routes_nothing_and_leaves_no_record() {
    let h = start(
        "failed",
        &[
            ("exits", app("\"exit\", \"3\"", "")),
            ("hangs", app("\"hang\"", "")),
            ("web", app("\"serve\"", "")),
        ],
    )
    .await;
    let e = h.deploy("exits").await.unwrap_err();
    assert!(matches!(&e, Error::DeployFailed(m) if m.contains("exited with status 3")), "{e:?}");
    let started = tokio::time::Instant::now();
    let e = h.deploy("hangs").await.unwrap_err();
    assert!(matches!(&e, Error::DeployFailed(m) if m.contains("band 0: not ready after 3s")), "{e:?}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert_eq!(*h.scopes.stopped.lock().unwrap(), ["ipcluster-exits-1.scope", "ipcluster-hangs-1.scope"]);
    assert!(h.never_routed(), "no route for a failed generation");
    assert!(h.workers("").await.is_empty(), "their workers left the list before DeployFailed");
    h.until("the guard of their ports to go", Duration::from_secs(1), async |h| h.router.last().is_empty())
        .await;
    let saved = h.store.get();
    // Only history: nothing saved as starting or running that a restart would look for.
    assert!(
        saved.apps.values().all(|a| a.generations.values().all(|g| g.state == GenState::Failed)),
        "{saved:?}"
    );

    // A failure leaves the live generation serving, and a retry gets a new number.
    assert_eq!(h.deploy("web").await, Ok(1));
    let routed = h.routed("web");
    let hang = Overrides { command: Some(vec!["hang".into()]), ..Overrides::default() };
    assert!(h.deploy_with("web", hang).await.is_err());
    assert_eq!(h.routed("web"), routed);
    assert_eq!(h.deploy("web").await, Ok(3));
    let metrics = h.handle.snapshot().await.unwrap().metrics.clone();
    let d = |app: &str| (metrics.deploys[app].ok, metrics.deploys[app].failed);
    assert_eq!((d("exits"), d("hangs"), d("web")), ((0, 1), (0, 1), (2, 1)));
}

#[tokio::test(start_paused = true)]
async fn bad_requests_get_their_own_errors_and_change_nothing() {
    let h = start("bad", &[("web", app("\"hang\"", "")), ("broken", "workers = 3\n".into())]).await;
    let err = |r: Result<u64, Error>| r.unwrap_err();
    assert!(matches!(err(h.deploy("nope").await), Error::NoSuchApp(_)));
    assert!(matches!(err(h.deploy("../x").await), Error::InvalidArgs(_)));
    assert!(matches!(err(h.deploy("broken").await), Error::InvalidConfig(_)));
    let three = Overrides { workers: Some(3), ..Overrides::default() };
    assert!(matches!(err(h.deploy_with("web", three).await), Error::InvalidArgs(_)));
    let r = h
        .handle
        .call(|reply| Command::Retire { app: "web".into(), generation: 7, auth: Authorized::test(), reply })
        .await;
    assert!(matches!(r, Err(Error::NoSuchGeneration(_))));
    assert!(h.scopes.names().is_empty() && h.procs.spawned().is_empty(), "nothing was started");
    // A second deploy while one is in progress is Busy.
    let first = h.spawn_deploy("web");
    h.sleep(Duration::from_millis(10)).await;
    assert!(matches!(err(h.deploy("web").await), Error::Busy(_)));
    assert!(first.await.unwrap().is_err(), "the hanging deploy fails at ready_timeout");
}

#[tokio::test(start_paused = true)]
async fn spawn_interval_paces_a_generation_and_reap_interval_paces_retire_timeout() {
    let extra = "spawn_interval = \"300ms\"\nretire_timeout = \"2s\"\nreap_interval = \"500ms\"\n";
    let h = start("paced", &[("web", app("\"serve\"", extra).replace("workers = 2", "workers = 4"))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let at: Vec<tokio::time::Instant> = h.procs.spawned().iter().map(|(_, t)| *t).collect();
    let gaps: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    assert_eq!(gaps, [300, 300, 300]);
    let old: Vec<u32> = h.workers("web").await.iter().map(|w| w.pid).collect();
    assert_eq!(h.deploy("web").await, Ok(2));
    let retired = tokio::time::Instant::now();
    h.until("generation 1 to be reaped", Duration::from_secs(10), async |h| {
        old.iter().all(|p| !h.procs.alive(*p))
    })
    .await;
    // Sampled every 200 ms: the timeout is noticed within a round; then one every 500 ms.
    let elapsed = retired.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2000 + 3 * 500) && elapsed < Duration::from_millis(3800),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn stop_app_answers_once_every_scope_is_gone_and_stays_stopped_until_the_next_deploy() {
    let h = start("stop", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    let r =
        h.handle.call(|reply| Command::StopApp { app: "web".into(), auth: Authorized::test(), reply }).await;
    assert_eq!(r, Ok(()));
    assert!(h.scopes.names().is_empty(), "both scopes stopped before the answer");
    assert!(h.router.last().iter().all(|r| r.bands.is_empty()), "nothing routed");
    h.until("the guard of their ports to go", Duration::from_secs(1), async |h| h.router.last().is_empty())
        .await;
    let saved = h.store.get();
    assert!(saved.apps[&AppName::new("web").unwrap()].stopped);
    assert_eq!(h.deploy("web").await, Ok(3));
    assert_eq!(h.routed("web").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_deploy_override_survives_a_restart_of_the_daemon() {
    let h = start("override", &[("web", app("\"serve\"", ""))]).await;
    let hang =
        Overrides { command: Some(vec!["serve".into(), "--overridden".into()]), ..Overrides::default() };
    assert_eq!(h.deploy_with("web", hang).await, Ok(1));
    let saved = h.store.get();
    let g = &saved.apps[&AppName::new("web").unwrap()].generations[&1];
    assert_eq!(g.command, ["serve", "--overridden"], "the effective command is saved");
    assert_eq!(g.processes.len(), 2, "and who its workers are");
}

/// Issue 21, item 7: the ports of a first generation that is still starting are guarded,
/// though nothing routes to it yet; so are a stopping app's.
#[tokio::test(start_paused = true)]
async fn worker_ports_are_guarded_before_anything_routes_to_them() {
    let h = start("guard_unrouted", &[("web", app("\"hang\"", ""))]).await;
    let deploying = h.spawn_deploy("web");
    h.until("the starting workers' ports to be guarded", Duration::from_secs(1), async |h| {
        h.router.last().iter().any(|r| r.app.as_str() == "web" && r.guarded.len() == 2)
    })
    .await;
    assert!(h.never_routed(), "guarded, not routed: {:?}", h.router.last());
    let ports: Vec<u16> = h.workers("web").await.iter().map(|w| w.ports[0].1).collect();
    let guarded = h.router.last()[0].guarded.clone();
    assert_eq!(ports.len(), 2);
    assert!(ports.iter().all(|p| guarded.contains(p)), "{ports:?} in {guarded:?}");
    deploying.abort();
}

/// Counters of an app that is gone (its file removed, nothing running) leave the daemon's
/// memory, as they leave /metrics: the maps do not grow with every app that ever existed.
#[tokio::test(start_paused = true)]
async fn the_counters_of_an_app_that_is_gone_are_dropped() {
    let h = start("metrics_prune", &[("web", app("\"serve\"", "")), ("api", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.deploy("api").await, Ok(1));
    let apps = async |h: &Harness| -> Vec<String> {
        h.handle.snapshot().await.unwrap().metrics.deploys.keys().cloned().collect()
    };
    assert_eq!(apps(&h).await, ["api", "web"]);
    let stop =
        h.handle.call(|reply| Command::StopApp { app: "api".into(), auth: Authorized::test(), reply }).await;
    assert_eq!(stop, Ok(()));
    h.files.remove("api");
    let reload = h.handle.call(|reply| Command::Reload { auth: Authorized::test(), reply }).await;
    assert_eq!(reload, Ok(()));
    h.until("api's counters to go", Duration::from_secs(1), async |h| apps(h).await == ["web"]).await;
}

/// Issue 21, item 4: in NAT mode, READY=1 is not enough while the worker does not listen on its
/// ports itself (in every family the app routes, which the real probe checks): it is ready once
/// it does.
#[tokio::test(start_paused = true)]
async fn a_notify_worker_is_ready_only_once_it_listens_on_its_ports_itself() {
    let h = start("notify-listens", &[("web", app("\"notify-late\"", "ready = \"notify\"\n"))]).await;
    let deploy = h.spawn_deploy("web");
    h.until("both workers to spawn", Duration::from_secs(1), async |h| h.procs.spawned().len() == 2).await;
    let pids: Vec<u32> = h.procs.spawned().iter().map(|(p, _)| *p).collect();
    for pid in &pids {
        h.notify(*pid, Message { ready: true, watchdog: false }).await;
    }
    h.sleep(Duration::from_secs(1)).await;
    assert!(!deploy.is_finished(), "READY=1 alone, without the worker's own listener, is not ready");
    assert!(h.workers("web").await.iter().all(|w| w.state == WorkerState::Starting));
    for pid in &pids {
        h.procs.listen(*pid);
    }
    assert_eq!(deploy.await.unwrap(), Ok(1));
}

/// A Deploy answers once what its cutover changed is written, not only handed to the writer
/// thread: a daemon killed right after it returned finds on restart what the caller was told.
/// (Before, the file could still say generation 2 was starting and 1 live. The stop had the same
/// gap, which the sessions scenario met: a restart right after a cutover adopted a draining
/// generation with no record left as merely retired.)
#[tokio::test(start_paused = true)]
async fn a_deploy_answers_once_its_cutover_is_written() {
    let h = start("deploy-written", &[("web", app("\"serve\"", ""))]).await;
    h.store.write_lazily();
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    let written = h.store.get();
    let states: Vec<(u64, GenState)> =
        written.apps[&AppName::new("web").unwrap()].generations.iter().map(|(g, x)| (*g, x.state)).collect();
    assert_eq!(states, [(1, GenState::Retired), (2, GenState::Live)]);
}

/// The workers a deploy releases together start a few milliseconds apart (a serving
/// generation's requests otherwise wait behind all their start-ups at once), at most a second in
/// all whatever their number; a respawn starts at once.
#[tokio::test(start_paused = true)]
async fn workers_released_together_start_apart_and_a_respawn_at_once() {
    use super::super::launch::{RELEASE_SPACING, RELEASE_SPREAD_MAX, release_delay};
    assert_eq!(release_delay(0, 8), Duration::ZERO);
    assert_eq!(release_delay(7, 8), RELEASE_SPACING * 7);
    for n in [1, 2, 64, 256, 1024, 5000] {
        assert!(release_delay(n - 1, n) < RELEASE_SPREAD_MAX, "{n} workers");
        assert!((1..n).all(|i| release_delay(i, n) > release_delay(i - 1, n)), "{n}: in order, apart");
    }

    let h = start("stagger", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let mut delays: Vec<Duration> = h.procs.spawned().iter().map(|(pid, _)| h.procs.delay(*pid)).collect();
    delays.sort_unstable();
    assert_eq!(delays, [Duration::ZERO, RELEASE_SPACING]);
    let live = h.workers("web").await;
    let spawned = h.procs.spawned().len();
    h.procs.exit(live[0].pid, Exit::Signal(9));
    h.until("the replacement", Duration::from_secs(1), async |h| h.procs.spawned().len() > spawned).await;
    let (pid, _) = *h.procs.spawned().last().unwrap();
    assert_eq!(h.procs.delay(pid), Duration::ZERO);
}
