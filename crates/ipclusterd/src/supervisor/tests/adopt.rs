//! Adoption: what a restarted daemon takes over, and what it refuses to believe.

use super::*;

/// Puts a process that was already running in generation `g`'s scope, in a cgroup of its own.
fn in_scope(procs: &FakeProcesses, scopes: &FakeScopes, g: u64, pid: u32) {
    let unit = format!("ipcluster-web-{g}.scope");
    procs.set_cgroup(pid, &format!("/ipcluster.slice/ipcluster-web.slice/{unit}/worker-{pid}"));
    scopes.units.lock().unwrap().entry(unit).or_default().push(pid);
}

fn worker_env(app: &str, g: u64, band: u32, bands: u32, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("IPCLUSTER_APP", app.into()),
        ("IPCLUSTER_GENERATION", g.to_string()),
        ("IPCLUSTER_BAND", band.to_string()),
        ("IPCLUSTER_BANDS", bands.to_string()),
        ("IPCLUSTER_PORTS", format!("80:{port}")),
    ]
}

fn saved_gen(state: GenState) -> SavedGeneration {
    let config = ipcluster_core::config::AppConfig::fallback(
        AppName::new("web").unwrap(),
        2,
        vec!["0.0.0.0:80".parse().unwrap()],
    );
    SavedGeneration {
        started_usec: 1,
        port_range: Some((30000, 30099)),
        ..SavedGeneration::of(state, 1, &config)
    }
}

#[tokio::test(start_paused = true)]
async fn adoption_takes_the_rules_as_the_live_generation_and_resumes_backoff_at_the_apps_own_limits() {
    let web = AppName::new("web").unwrap();
    let mut saved = SavedState::default();
    saved.last_generation.insert(web.clone(), 3);
    let a = saved.apps.entry(web.clone()).or_default();
    a.generations.insert(1, saved_gen(GenState::Live));
    a.generations.insert(2, saved_gen(GenState::Starting));
    a.generations.insert(3, saved_gen(GenState::Starting));
    // Band 0 was crash-looping at 8 s, the app's maximum.
    a.backoff_ms.insert(0, 8000);
    let mut h = start_with(
        "adopt",
        &[("web", app("\"serve\"", "restart_backoff = \"1s-8s\"\n"))],
        Some(saved),
        |procs, scopes, router| {
            let add = |g: u64, band: u32, port: u16| {
                let pid = procs.existing(&["serve"], &worker_env("web", g, band, 2, port));
                in_scope(procs, scopes, g, pid);
            };
            add(1, 0, 30000);
            add(1, 1, 30001);
            // Generation 2 went live (the rules say so) but the daemon died before saving it;
            // its band 1 died while no daemon watched.
            add(2, 0, 30002);
            // Generation 3 was still starting.
            add(3, 0, 30004);
            add(3, 1, 30005);
            let route = ipcluster_core::routing::AppRoute {
                app: AppName::new("web").unwrap(),
                listen: vec!["0.0.0.0:80".parse().unwrap()],
                bands: vec![vec![30002], vec![30002]],
                guarded: Vec::new(),
                sessions: None,
            };
            futures_util::FutureExt::now_or_never(crate::netfilter::Router::apply(router, &[route]))
                .unwrap()
                .unwrap();
        },
    )
    .await;
    let gens = h.handle.snapshot().await.unwrap().generations_of("web").unwrap();
    let states: Vec<(u64, GenState)> = gens.iter().map(|g| (g.generation, g.state)).collect();
    assert_eq!(
        states,
        [(1, GenState::Retired), (2, GenState::Live), (3, GenState::Failed)],
        "generation 3 never went live: it is stopped, and shows as failed"
    );
    h.sleep(Duration::from_millis(1)).await;
    assert_eq!(*h.scopes.stopped.lock().unwrap(), ["ipcluster-web-3.scope"]);
    let old = h.workers("web").await;
    assert!(
        old.iter().filter(|w| w.generation == 1).all(|w| w.nice == 5),
        "its retirement is finished: {old:?}"
    );

    // The band that died unwatched is respawned at the app's minimum backoff.
    h.until("band 1 of generation 2 to be respawned", Duration::from_millis(1100), async |h| {
        h.workers("web")
            .await
            .iter()
            .any(|w| w.generation == 2 && w.band == 1 && w.state == WorkerState::Live)
    })
    .await;
    assert_eq!(h.routed("web").len(), 2);
    // Band 0 crashes again: its delay resumes at 8 s (the app's maximum), not 16 s.
    let band0 = h.worker("web", 2, 0).await;
    let spawned = h.procs.spawned().len();
    h.procs.exit(band0.pid, Exit::Code(1));
    h.sleep(Duration::from_millis(7900)).await;
    assert_eq!(h.procs.spawned().len(), spawned, "not before 8 s");
    h.sleep(Duration::from_millis(200)).await;
    assert_eq!(h.procs.spawned().len(), spawned + 1, "at 8 s");
    assert_eq!(h.deploy("web").await, Ok(4), "numbers never repeat");
    let _ = h.generation_states();
}

#[tokio::test(start_paused = true)]
async fn adoption_believes_the_saved_state_not_a_forged_environment_nor_a_workers_child() {
    const ORIGIN_USEC: u64 = 1_800_000_000 * 1_000_000;
    // The fake numbers processes from 1000: the honest worker, the forger, the honest one's child.
    let (honest, forger) = (1000, 1001);
    let web = AppName::new("web").unwrap();
    let mut saved = SavedState::default();
    saved.last_generation.insert(web.clone(), 1);
    let mut live = saved_gen(GenState::Live);
    live.processes = vec![
        ipcluster_core::saved::SavedWorker {
            pid: honest,
            start_usec: ORIGIN_USEC,
            band: 0,
            ports: vec![30000],
        },
        ipcluster_core::saved::SavedWorker {
            pid: forger,
            start_usec: ORIGIN_USEC,
            band: 1,
            ports: vec![30001],
        },
    ];
    saved.apps.entry(web).or_default().generations.insert(1, live);
    let child = std::sync::Mutex::new(0);
    let h = start_with("forged", &[("web", app("\"serve\"", ""))], Some(saved), |procs, scopes, router| {
        let a = procs.existing(&["serve"], &worker_env("web", 1, 0, 2, 30000));
        in_scope(procs, scopes, 1, a);
        // The worker of band 1 re-exec'd itself claiming 2^32-1 bands and a route for port 22.
        let b = procs.existing(&["serve"], &worker_env("web", 1, 1, 2, 30001));
        let mut forged = worker_env("web", 1, 1, 2, 30001);
        forged[3].1 = "4294967295".into();
        forged[4].1 = "80:30001,22:30001".into();
        procs.set_env(b, &forged);
        in_scope(procs, scopes, 1, b);
        let c = procs.fork(a);
        scopes.units.lock().unwrap().get_mut("ipcluster-web-1.scope").unwrap().push(c);
        *child.lock().unwrap() = c;
        let route = ipcluster_core::routing::AppRoute {
            app: AppName::new("web").unwrap(),
            listen: vec!["0.0.0.0:80".parse().unwrap()],
            bands: vec![vec![30000], vec![30001]],
            guarded: vec![30000, 30001],
            sessions: None,
        };
        futures_util::FutureExt::now_or_never(crate::netfilter::Router::apply(router, &[route]))
            .unwrap()
            .unwrap();
    })
    .await;
    let child = *child.lock().unwrap();
    assert_eq!((honest, forger, child), (1000, 1001, 1002));
    let rows = h.workers("web").await;
    let pids: Vec<u32> = rows.iter().map(|w| w.pid).collect();
    assert_eq!(pids, [honest], "neither the forger nor the child is a worker");
    // The refused band is respawned; no route ever names another public port.
    h.until("band 1 to be respawned", Duration::from_secs(1), async |h| {
        h.workers("web").await.iter().any(|w| w.band == 1 && w.state == WorkerState::Live)
    })
    .await;
    for routes in h.router.applied.lock().unwrap().iter() {
        assert!(routes.iter().all(|r| r.listen.iter().all(|l| l.port() == 80)), "{routes:?}");
        assert!(routes.iter().all(|r| r.bands.len() == 2));
    }
    let band1 = h.worker("web", 1, 1).await;
    assert!(band1.pid != forger && !h.procs.alive(forger), "the forger was stopped, not adopted");
    assert_eq!(h.routed("web")[1], band1.ports[0].1, "band 1 routes to its respawned worker");

    // Stopping the honest worker stops what it forked (which ignores SIGTERM) with it, and a
    // generation that reaches stopped has its scope stopped.
    assert_eq!(h.deploy("web").await, Ok(2));
    let n = h
        .handle
        .call(|reply| Command::KillRetired { app: "web".into(), auth: Authorized::test(), reply })
        .await;
    assert_eq!(n, Ok(2));
    h.until("the honest worker and its child to be gone", Duration::from_secs(1), async |h| {
        !h.procs.alive(honest) && !h.procs.alive(child)
    })
    .await;
    h.until("generation 1's scope to be stopped", Duration::from_secs(1), async |h| {
        h.scopes.stopped.lock().unwrap().contains(&"ipcluster-web-1.scope".to_owned())
    })
    .await;
}
