//! The supervisor's rules against fakes of every seam ([`crate::testing`]), under tokio's paused
//! time: deploys and failures, adoption, respawn backoff, the memory and watchdog policies,
//! paced spawning and reaping. No root, no real process; each test runs in milliseconds of real
//! time however many seconds it simulates.

use std::{path::PathBuf, sync::Arc, time::Duration};

use ipcluster_core::{
    config::Overrides,
    model::{GenState, WorkerState},
    name::AppName,
    saved::{SavedGeneration, SavedState},
};
use tokio::sync::mpsc;

use super::{BusSignal, Command, Deps, Error, Handle, Supervisor, WorkerInfo, channel};
use crate::{
    clock::PausedClock,
    notify::{Message, Notification},
    process::Exit,
    testing::{FakeProcesses, FakeRouter, FakeScopes, FakeSteer},
};

mod sockets;

struct Harness {
    handle: Handle,
    scopes: FakeScopes,
    router: FakeRouter,
    procs: FakeProcesses,
    steer: FakeSteer,
    clock: Arc<PausedClock>,
    /// The running supervisor.
    task: Option<tokio::task::JoinHandle<()>>,
    signals: mpsc::UnboundedReceiver<BusSignal>,
    notify: mpsc::Sender<Notification>,
    dir: PathBuf,
}

const BASE: &str = "listen = [\"0.0.0.0:80\"]\nport_range = \"30000-30099\"\nautostart = false\nready_timeout = \"3s\"\nstop_timeout = \"2s\"\n";

fn app(command: &str, extra: &str) -> String {
    format!("command = [{command}]\nworkers = 2\n{BASE}{extra}")
}

/// A supervisor of `apps`, in a world the test prepares first (saved state, running processes,
/// scopes and rules a previous daemon left).
async fn start_with(
    name: &str,
    apps: &[(&str, String)],
    saved: Option<SavedState>,
    world: impl FnOnce(&FakeProcesses, &FakeScopes, &FakeRouter),
) -> Harness {
    let dir = crate::test_dir(&format!("supervisor-{name}"));
    std::fs::create_dir_all(dir.join("apps")).unwrap();
    for (app, text) in apps {
        std::fs::write(dir.join("apps").join(format!("{app}.toml")), text).unwrap();
    }
    if let Some(s) = saved {
        crate::state::save(&dir.join("state.json"), &s).unwrap();
    }
    let clock = Arc::new(PausedClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000)));
    let procs = FakeProcesses::new(clock.clone());
    let scopes = FakeScopes::of(&procs);
    let router = FakeRouter::default();
    world(&procs, &scopes, &router);
    let (handle, _) = channel();
    let (_, signals) = mpsc::unbounded_channel();
    let (notify, _) = mpsc::channel(1);
    let steer = FakeSteer::default();
    let mut h = Harness { handle, scopes, router, procs, steer, clock, task: None, signals, notify, dir };
    h.restart().await;
    h
}

async fn start(name: &str, apps: &[(&str, String)]) -> Harness {
    start_with(name, apps, None, |_, _, _| {}).await
}

impl Harness {
    /// A new supervisor in the same world, once the previous one (if any) has stopped and
    /// dropped everything it held: a daemon restart.
    async fn restart(&mut self) {
        let (handle, mailbox) = channel();
        drop(std::mem::replace(&mut self.handle, handle.clone()));
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the old supervisor stops")
                .unwrap();
        }
        let (signals_tx, signals) = mpsc::unbounded_channel();
        let (notify, notify_rx) = mpsc::channel(64);
        let deps = Deps {
            scopes: self.scopes.clone(),
            router: self.router.clone(),
            processes: self.procs.clone(),
            steer: self.steer.clone(),
            clock: self.clock.clone(),
            config_dir: self.dir.join("apps"),
            state_file: self.dir.join("state.json"),
            notify: Some(notify_rx),
            notify_socket: Some(PathBuf::from("/run/ipcluster/notify")),
            signals: signals_tx,
            sample_interval: Duration::from_millis(200),
            launcher: PathBuf::from("/proc/self/exe"),
        };
        self.task = Some(tokio::spawn(Supervisor::new(mailbox, deps).run()));
        (self.signals, self.notify) = (signals, notify);
        self.until("the supervisor's first snapshot", Duration::from_secs(1), async |h| {
            h.handle.snapshot().await.is_ok()
        })
        .await;
    }

    async fn deploy(&self, app: &str) -> Result<u64, Error> {
        self.deploy_with(app, Overrides::default()).await
    }

    async fn deploy_with(&self, app: &str, overrides: Overrides) -> Result<u64, Error> {
        self.handle.call(|reply| Command::Deploy { app: app.into(), overrides, reply }).await
    }

    async fn workers(&self, app: &str) -> Vec<WorkerInfo> {
        self.handle.snapshot().await.unwrap().workers_of(app).unwrap()
    }

    async fn worker(&self, app: &str, generation: u64, band: u32) -> WorkerInfo {
        let rows = self.workers(app).await;
        rows.into_iter()
            .find(|w| w.generation == generation && w.band == band && w.state != WorkerState::Retired)
            .unwrap_or_else(|| panic!("no worker of generation {generation} band {band}"))
    }

    /// Lets simulated time pass (every timer due meanwhile fires).
    async fn sleep(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// Waits (in simulated time) until `f` holds, for at most `limit`.
    async fn until<F: AsyncFnMut(&Self) -> bool>(&self, what: &str, limit: Duration, mut f: F) {
        let deadline = tokio::time::Instant::now() + limit;
        while !f(self).await {
            assert!(tokio::time::Instant::now() < deadline, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A notification from `pid`, from its own cgroup, as the notify socket passes it on.
    async fn notify(&self, pid: u32, message: Message) {
        let cgroup = self.procs.cgroup(pid);
        self.notify.send(Notification { pid, cgroup, message }).await.unwrap();
    }

    fn generation_states(&mut self) -> Vec<(u64, GenState)> {
        let mut out = Vec::new();
        while let Ok(s) = self.signals.try_recv() {
            if let BusSignal::GenerationStateChanged { generation, state, .. } = s {
                out.push((generation, state));
            }
        }
        out
    }

    fn held_back(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(s) = self.signals.try_recv() {
            if let BusSignal::PolicyHeldBack { reason, .. } = s {
                out.push(reason);
            }
        }
        out
    }

    /// The worker ports each band of `app` is routed to now.
    fn routed(&self, app: &str) -> Vec<u16> {
        let routes = self.router.last();
        routes
            .iter()
            .find(|r| r.app.as_str() == app)
            .map(|r| r.bands.iter().map(|b| b[0]).collect())
            .unwrap_or_default()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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

    let n = h.handle.call(|reply| Command::KillRetired { app: String::new(), reply }).await;
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
    assert_eq!(metrics.deploys["web"], (2, 0), "two deploys went live");
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
    assert!(h.router.last().is_empty(), "no route for a failed generation");
    assert!(h.workers("").await.is_empty(), "their workers left the list before DeployFailed");
    let saved = crate::state::load(&h.dir.join("state.json")).unwrap();
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
    assert_eq!(
        (metrics.deploys["exits"], metrics.deploys["hangs"], metrics.deploys["web"]),
        ((0, 1), (0, 1), (2, 1))
    );
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
    let r = h.handle.call(|reply| Command::Retire { app: "web".into(), generation: 7, reply }).await;
    assert!(matches!(r, Err(Error::NoSuchGeneration(_))));
    assert!(h.scopes.names().is_empty() && h.procs.spawned().is_empty(), "nothing was started");
    // A second deploy while one is in progress is Busy.
    let first = {
        let handle = h.handle.clone();
        tokio::spawn(async move {
            handle
                .call(|reply| Command::Deploy { app: "web".into(), overrides: Overrides::default(), reply })
                .await
        })
    };
    h.sleep(Duration::from_millis(10)).await;
    assert!(matches!(err(h.deploy("web").await), Error::Busy(_)));
    assert!(first.await.unwrap().is_err(), "the hanging deploy fails at ready_timeout");
}

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
async fn a_crashing_band_is_respawned_with_doubling_delays_and_served_by_a_neighbour_meanwhile() {
    let h = start("backoff", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let mut delays = Vec::new();
    for _ in 0..4 {
        let victim = h.worker("web", 1, 1).await;
        let neighbour = h.worker("web", 1, 0).await;
        h.procs.exit(victim.pid, Exit::Signal(9));
        let crashed = tokio::time::Instant::now();
        h.until("band 1 to fall back to band 0", Duration::from_millis(50), async |h| {
            h.routed("web") == [neighbour.ports[0].1, neighbour.ports[0].1]
        })
        .await;
        h.until("band 1's replacement", Duration::from_secs(5), async |h| {
            h.workers("web")
                .await
                .iter()
                .any(|w| w.band == 1 && w.pid != victim.pid && w.state == WorkerState::Live)
        })
        .await;
        let (pid, at) = *h.procs.spawned().last().unwrap();
        assert_ne!(pid, victim.pid);
        delays.push((at - crashed).as_millis());
    }
    assert_eq!(delays, [100, 200, 400, 800]);
    let metrics = h.handle.snapshot().await.unwrap().metrics.clone();
    assert_eq!(metrics.restarts[&("web".to_owned(), 1)], 4);
}

#[tokio::test(start_paused = true)]
async fn a_worker_over_worker_memory_max_is_replaced_then_retired_and_the_rate_limit_holds_the_next() {
    let mut h = start(
        "memory",
        &[("web", app("\"serve\"", "worker_memory_max = \"40M\"\nretire_rate = \"1/1h\"\n"))],
    )
    .await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let old = h.worker("web", 1, 0).await;
    h.procs.set_rss(old.pid, 64 << 20);
    h.until("band 0's replacement to take over", Duration::from_secs(2), async |h| {
        h.worker("web", 1, 0).await.pid != old.pid
    })
    .await;
    let new = h.worker("web", 1, 0).await;
    assert_eq!(h.routed("web")[0], new.ports[0].1, "band 0 moved to the replacement");
    let rows = h.workers("web").await;
    let retired = rows.iter().find(|w| w.pid == old.pid).unwrap();
    assert_eq!((retired.state, retired.nice), (WorkerState::Retired, 5));
    // A second offender inside the hour is held back, and said so.
    let band1 = h.worker("web", 1, 1).await;
    h.procs.set_rss(band1.pid, 64 << 20);
    h.sleep(Duration::from_secs(1)).await;
    assert_eq!(h.worker("web", 1, 1).await.pid, band1.pid, "not replaced");
    let held = h.held_back();
    assert!(held.iter().any(|r| r.contains("held back by retire_rate")), "{held:?}");
    let metrics = h.handle.snapshot().await.unwrap().metrics.clone();
    assert_eq!(metrics.policy_actions[&("web".to_owned(), super::PolicyAction::MemoryReplacement)], 1);
    assert!(metrics.policy_actions[&("web".to_owned(), super::PolicyAction::HeldBack)] >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_stops_sending_watchdog_is_replaced_and_then_stopped() {
    let h = start("watchdog", &[("web", app("\"notify\"", "ready = \"notify\"\nwatchdog = \"1s\"\n"))]).await;
    let deploy = {
        let handle = h.handle.clone();
        tokio::spawn(async move {
            handle
                .call(|reply| Command::Deploy { app: "web".into(), overrides: Overrides::default(), reply })
                .await
        })
    };
    h.until("both workers to spawn", Duration::from_secs(1), async |h| h.procs.spawned().len() == 2).await;
    let pids: Vec<u32> = h.procs.spawned().iter().map(|(p, _)| *p).collect();
    let ready = Message { ready: true, watchdog: false };
    for pid in &pids {
        h.notify(*pid, ready.clone()).await;
    }
    assert_eq!(deploy.await.unwrap(), Ok(1));
    let (band0, band1) = (h.worker("web", 1, 0).await, h.worker("web", 1, 1).await);
    // Band 1 keeps pinging; band 0 falls silent.
    let ping = Message { ready: false, watchdog: true };
    for _ in 0..8 {
        h.sleep(Duration::from_millis(250)).await;
        h.notify(band1.pid, ping.clone()).await;
    }
    let spawned = h.procs.spawned();
    assert_eq!(spawned.len(), 3, "one replacement, for band 0 only");
    h.notify(spawned[2].0, ready).await;
    h.until("band 0's replacement to take over", Duration::from_secs(1), async |h| {
        h.worker("web", 1, 0).await.pid == spawned[2].0
    })
    .await;
    assert_eq!(h.worker("web", 1, 1).await.pid, band1.pid);
    // Still silent, now retired: stopped.
    h.until("the hung worker to be stopped", Duration::from_secs(3), async |h| !h.procs.alive(band0.pid))
        .await;
    assert!(h.procs.signals().contains(&(band0.pid, libc::SIGTERM)));
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
async fn cluster_watermarks_stop_then_kill_retired_workers_most_killable_first() {
    const MIB: u64 = 1 << 20;
    let h = start("cluster", &[("web", app("\"serve\"", "cluster_memory_max = \"1000M\"\n"))]).await;
    for g in 1..=3 {
        assert_eq!(h.deploy("web").await, Ok(g));
    }
    let rows = h.workers("web").await;
    let pid = |g: u64, band: u32| rows.iter().find(|w| w.generation == g && w.band == band).unwrap().pid;
    // Budget 1000 MiB: stop retired workers over 800, kill them over 950. Live: 2 × 60 MiB.
    // Retired: big 500 and mid 250 without connections, held 450 with one, small 10.
    let (big, held, mid, small) = (pid(1, 0), pid(1, 1), pid(2, 0), pid(2, 1));
    for band in 0..2 {
        h.procs.set_rss(pid(3, band), 60 * MIB);
    }
    h.procs.set_rss(big, 500 * MIB);
    h.procs.set_rss(held, 450 * MIB);
    h.procs.set_connections(held, 1);
    h.procs.set_rss(mid, 250 * MIB);
    h.procs.set_rss(small, 10 * MIB);
    // 1330 > 950: kill big (fewest connections, largest) → 830 > 800: stop mid → 580. Held is
    // larger than mid but has a connection: it stays, and so does small (no more is needed).
    h.until("the watermarks to act", Duration::from_secs(2), async |h| {
        !h.procs.alive(big) && !h.procs.alive(mid)
    })
    .await;
    assert!(h.procs.signals().contains(&(big, libc::SIGKILL)));
    assert!(
        h.procs.signals().contains(&(mid, libc::SIGTERM))
            && !h.procs.signals().contains(&(mid, libc::SIGKILL))
    );
    h.sleep(Duration::from_secs(1)).await;
    assert!(h.procs.alive(held) && h.procs.alive(small), "no more than needed, connections last");
    assert!(h.procs.alive(pid(3, 0)) && h.procs.alive(pid(3, 1)), "live workers untouched");
}

#[tokio::test(start_paused = true)]
async fn stop_app_answers_once_every_scope_is_gone_and_stays_stopped_until_the_next_deploy() {
    let h = start("stop", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    let r = h.handle.call(|reply| Command::StopApp { app: "web".into(), reply }).await;
    assert_eq!(r, Ok(()));
    assert!(h.scopes.names().is_empty(), "both scopes stopped before the answer");
    assert!(h.router.last().is_empty(), "no rules");
    let saved = crate::state::load(&h.dir.join("state.json")).unwrap();
    assert!(saved.apps[&AppName::new("web").unwrap()].stopped);
    assert_eq!(h.deploy("web").await, Ok(3));
    assert_eq!(h.routed("web").len(), 2);
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
    let n = h.handle.call(|reply| Command::KillRetired { app: "web".into(), reply }).await;
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

#[tokio::test(start_paused = true)]
async fn a_deploy_override_survives_a_restart_of_the_daemon() {
    let h = start("override", &[("web", app("\"serve\"", ""))]).await;
    let hang =
        Overrides { command: Some(vec!["serve".into(), "--overridden".into()]), ..Overrides::default() };
    assert_eq!(h.deploy_with("web", hang).await, Ok(1));
    let saved = crate::state::load(&h.dir.join("state.json")).unwrap();
    let g = &saved.apps[&AppName::new("web").unwrap()].generations[&1];
    assert_eq!(g.command, ["serve", "--overridden"], "the effective command is saved");
    assert_eq!(g.processes.len(), 2, "and who its workers are");
}

impl Harness {
    async fn rollback(&self, app: &str, generation: u64) -> Result<u64, Error> {
        self.handle.call(|reply| Command::Rollback { app: app.into(), generation, reply }).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_rollback_to_a_retired_generation_is_one_transaction_with_the_same_workers() {
    let mut h = start("rollback", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(
        h.rollback("web", 0).await,
        Err(Error::NoSuchGeneration("web has no earlier generation to roll back to".into()))
    );
    assert_eq!(h.deploy("web").await, Ok(1));
    let first: Vec<(u32, u16)> = h.workers("web").await.iter().map(|w| (w.pid, w.ports[0].1)).collect();
    assert_eq!(h.deploy("web").await, Ok(2));
    let applied = h.router.applied.lock().unwrap().len();
    assert_eq!(h.rollback("web", 0).await, Ok(1), "the newest generation that was live before");
    assert_eq!(h.router.applied.lock().unwrap().len(), applied + 1, "one transaction");
    let rows = h.workers("web").await;
    let live: Vec<(u32, u16)> =
        rows.iter().filter(|w| w.state == WorkerState::Live).map(|w| (w.pid, w.ports[0].1)).collect();
    assert_eq!(live, first, "the same workers serve again");
    assert!(
        rows.iter().filter(|w| w.generation == 1).all(|w| w.nice == 0 && h.procs.nice(w.pid) == 0),
        "renice undone"
    );
    assert!(
        rows.iter().filter(|w| w.generation == 2).all(|w| w.state == WorkerState::Retired && w.nice == 5)
    );
    assert_eq!(h.routed("web"), first.iter().map(|w| w.1).collect::<Vec<_>>());
    h.sleep(Duration::from_millis(1)).await;
    assert!(h.scopes.cpu_weights.lock().unwrap().contains(&("ipcluster-web-1.scope".into(), 100)));
    let states = h.generation_states();
    assert!(states.ends_with(&[(1, GenState::Live), (2, GenState::Retired)]), "{states:?}");
    // Rolling back to the live one changes nothing; unknown and failed generations are refused.
    assert_eq!(h.rollback("web", 1).await, Ok(1));
    assert!(matches!(h.rollback("web", 9).await, Err(Error::NoSuchGeneration(_))));
    assert!(matches!(h.rollback("nope", 0).await, Err(Error::NoSuchApp(_))));
}

#[tokio::test(start_paused = true)]
async fn a_rollback_to_a_reaped_generation_redeploys_what_it_ran() {
    let h = start(
        "rollback_reaped",
        &[("web", app("\"serve\"", "")), ("signals", app("\"serve\"", "retire_signal = \"USR2\"\n"))],
    )
    .await;
    let v1 = Overrides { command: Some(vec!["serve".into(), "--v1".into()]), ..Overrides::default() };
    assert_eq!(h.deploy_with("web", v1).await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    assert_eq!(h.handle.call(|reply| Command::KillRetired { app: "web".into(), reply }).await, Ok(2));
    h.until("generation 1 to stop", Duration::from_secs(1), async |h| {
        h.workers("web").await.iter().all(|w| w.generation == 2)
    })
    .await;
    assert_eq!(h.rollback("web", 0).await, Ok(3), "a new generation");
    for w in h.workers("web").await.iter().filter(|w| w.generation == 3) {
        assert_eq!(h.procs.argv(w.pid), ["serve", "--v1"], "generation 1's command, override included");
    }
    // A generation told to wind down (retire_signal) is not brought back: it is redeployed.
    assert_eq!(h.deploy("signals").await, Ok(1));
    assert_eq!(h.deploy("signals").await, Ok(2));
    let old: Vec<u32> =
        h.workers("signals").await.iter().filter(|w| w.generation == 1).map(|w| w.pid).collect();
    assert_eq!(h.rollback("signals", 1).await, Ok(3));
    assert!(
        h.workers("signals")
            .await
            .iter()
            .filter(|w| w.state == WorkerState::Live)
            .all(|w| !old.contains(&w.pid))
    );
}

#[tokio::test(start_paused = true)]
async fn a_rollback_during_a_deploy_is_busy() {
    let h = start("rollback_busy", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let hang = Overrides { command: Some(vec!["hang".into()]), ..Overrides::default() };
    let deploying = {
        let handle = h.handle.clone();
        tokio::spawn(async move {
            handle.call(|reply| Command::Deploy { app: "web".into(), overrides: hang, reply }).await
        })
    };
    h.sleep(Duration::from_millis(10)).await;
    assert!(matches!(h.rollback("web", 0).await, Err(Error::Busy(_))));
    assert!(deploying.await.unwrap().is_err());
}
