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

use super::{
    Authorized, BusSignal, Command, Deps, Error, Handle, RollbackHow, RollbackPlan, Supervisor, WorkerInfo,
    channel,
};
use crate::{
    clock::PausedClock,
    notify::{Message, Notification},
    process::Exit,
    testing::{
        Fake, FakeChecker, FakeFiles, FakeNotifier, FakeProcesses, FakeRelay, FakeRouter, FakeScopes,
        FakeSteer, FakeStore,
    },
};

mod adopt;
mod canary;
mod checks;
mod deploy;
mod health;
mod rollback;
mod sessions;
mod sockets;

struct Harness {
    handle: Handle,
    scopes: FakeScopes,
    router: FakeRouter,
    procs: FakeProcesses,
    steer: FakeSteer,
    files: FakeFiles,
    store: FakeStore,
    notifier: FakeNotifier,
    relay: FakeRelay,
    checker: FakeChecker,
    clock: Arc<PausedClock>,
    /// The running supervisor.
    task: Option<tokio::task::JoinHandle<()>>,
    signals: mpsc::UnboundedReceiver<BusSignal>,
    notify: mpsc::Sender<Notification>,
}

const BASE: &str = "listen = [\"0.0.0.0:80\"]\nport_range = \"30000-30099\"\nautostart = false\nready_timeout = \"3s\"\nstop_timeout = \"2s\"\n";

fn app(command: &str, extra: &str) -> String {
    format!("command = [{command}]\nworkers = 2\n{BASE}{extra}")
}

/// A supervisor of `apps`, in a world the test prepares first (saved state, running processes,
/// scopes and rules a previous daemon left).
async fn start_with(
    _name: &str,
    apps: &[(&str, String)],
    saved: Option<SavedState>,
    world: impl FnOnce(&FakeProcesses, &FakeScopes, &FakeRouter),
) -> Harness {
    let files = FakeFiles::new("/etc/ipcluster/apps");
    for (app, text) in apps {
        files.write(app, text);
    }
    let store = saved.map(FakeStore::with).unwrap_or_default();
    let clock = Arc::new(PausedClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000)));
    let procs = FakeProcesses::new(clock.clone());
    let scopes = FakeScopes::of(&procs);
    let router = FakeRouter::default();
    world(&procs, &scopes, &router);
    let (handle, _) = channel();
    let (_, signals) = mpsc::unbounded_channel();
    let (notify, _) = mpsc::channel(1);
    let steer = FakeSteer::default();
    let mut h = Harness {
        handle,
        scopes,
        router,
        procs,
        checker: FakeChecker::probing(steer.clone()),
        steer,
        files,
        store,
        notifier: FakeNotifier::default(),
        relay: FakeRelay::default(),
        clock,
        task: None,
        signals,
        notify,
    };
    h.restart().await;
    h
}

impl Drop for Harness {
    /// The supervisor never stops while a test holds its handle, so a task that ended panicked:
    /// among other bugs, an illegal generation transition (`enter` asserts in debug builds).
    /// The test fails then, even if what it checked still looked right.
    fn drop(&mut self) {
        if !std::thread::panicking() && self.task.as_ref().is_some_and(tokio::task::JoinHandle::is_finished) {
            panic!("the supervisor task ended during the test: it panicked (its message is above)");
        }
    }
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
        let deps = Deps::<Fake> {
            scopes: self.scopes.clone(),
            router: self.router.clone(),
            spawner: self.procs.clone(),
            inspector: self.procs.clone(),
            sampler: self.procs.clone(),
            steer: self.steer.clone(),
            files: self.files.clone(),
            store: self.store.clone(),
            notifier: self.notifier.clone(),
            relay: self.relay.clone(),
            checker: self.checker.clone(),
            clock: self.clock.clone(),
            config_dir: PathBuf::from("/etc/ipcluster/apps"),
            notify: Some(notify_rx),
            notify_socket: Some(PathBuf::from("/run/ipcluster/notify")),
            signals: signals_tx,
            sample_interval: Duration::from_millis(200),
        };
        self.task = Some(tokio::spawn(Supervisor::new(mailbox, deps).run()));
        (self.signals, self.notify) = (signals, notify);
        self.until("the supervisor's first snapshot", Duration::from_secs(1), async |h| {
            h.handle.snapshot().await.is_ok()
        })
        .await;
    }

    /// A plain Deploy of `app`, started as a task: the test acts while it waits.
    fn spawn_deploy(&self, app: &str) -> tokio::task::JoinHandle<Result<u64, Error>> {
        let (handle, app) = (self.handle.clone(), app.to_owned());
        tokio::spawn(async move {
            handle
                .call(|reply| Command::Deploy {
                    app,
                    overrides: Overrides::default(),
                    auth: Authorized::test(),
                    reply,
                })
                .await
        })
    }

    async fn deploy(&self, app: &str) -> Result<u64, Error> {
        self.deploy_with(app, Overrides::default()).await
    }

    async fn deploy_with(&self, app: &str, overrides: Overrides) -> Result<u64, Error> {
        self.handle
            .call(|reply| Command::Deploy { app: app.into(), overrides, auth: Authorized::test(), reply })
            .await
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

    /// Whether no set of rules ever routed anything (guarding worker ports is not routing).
    fn never_routed(&self) -> bool {
        self.router.applied.lock().unwrap().iter().flatten().all(|r| r.bands.is_empty())
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

impl Harness {
    /// A Rollback as the D-Bus adapter makes it: the plan, then the rollback by that plan.
    async fn rollback(&self, app: &str, generation: u64) -> Result<u64, Error> {
        self.rollback_as(app, generation, Authorized::test()).await
    }

    async fn rollback_as(&self, app: &str, generation: u64, auth: Authorized) -> Result<u64, Error> {
        let plan = self.plan_rollback(app, generation).await?;
        self.handle.call(|reply| Command::Rollback { app: app.into(), generation, plan, auth, reply }).await
    }

    async fn kill_retired(&self, app: &str) -> Result<u32, Error> {
        self.handle
            .call(|reply| Command::KillRetired { app: app.into(), auth: Authorized::test(), reply })
            .await
    }

    async fn plan_rollback(&self, app: &str, generation: u64) -> Result<RollbackPlan, Error> {
        self.handle.call(|reply| Command::PlanRollback { app: app.into(), generation, reply }).await
    }
}
