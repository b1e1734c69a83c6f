//! The supervisor with real worker processes (forked through the real launcher and `Host`) and
//! fakes of systemd and netfilter: the deploy flow against the kernel's processes, without root.
//! The supervisor's rules are unit-tested against fakes of every seam (`src/supervisor/tests.rs`);
//! the sandboxed end-to-end tests prove the real `Systemd` and `Iptables` implementations.

use std::{path::PathBuf, sync::Arc, time::Duration};

use ipcluster_core::config::Overrides;
use ipclusterd::{
    files::Disk,
    processes::Host,
    state::StateFile,
    supervisor::{self, Authorized, BusSignal, Command, Deps, Error, Handle, Supervisor},
    testing::{FakeNotifier, FakeRelay, FakeRouter, FakeScopes, FakeSteer},
    world::World,
};

/// Real processes, app files and state file; systemd, netfilter and the rest faked.
#[derive(Debug)]
struct RealProcesses;

impl World for RealProcesses {
    type Scopes = FakeScopes;
    type Router = FakeRouter;
    type Spawner = Host;
    type Inspector = Host;
    type Sampler = Host;
    type Steer = FakeSteer;
    type Files = Disk;
    type Store = StateFile;
    type Notifier = FakeNotifier;
    type Relay = FakeRelay;
    type Checker = ipclusterd::checker::Http;
}

struct Harness {
    handle: Handle,
    scopes: FakeScopes,
    router: FakeRouter,
    signals: tokio::sync::mpsc::UnboundedReceiver<BusSignal>,
    dir: PathBuf,
}

/// A Python HTTP server on $PORT: a worker that is ready when it accepts.
const SERVER: &str = "exec python3 -m http.server \"$PORT\" --bind 127.0.0.1";

fn app(ports: &str, command: &str) -> String {
    format!(
        "command = [\"/bin/sh\", \"-c\", {command:?}]\nworkers = 2\nlisten = [\"0.0.0.0:8080\"]\nport_range = \"{ports}\"\nautostart = false\nready_timeout = \"3s\"\nstop_timeout = \"1s\"\n"
    )
}

fn start(name: &str, apps: &[(&str, String)]) -> Harness {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("supervisor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("apps")).unwrap();
    for (app, text) in apps {
        std::fs::write(dir.join("apps").join(format!("{app}.toml")), text).unwrap();
    }
    let (handle, mailbox) = supervisor::channel();
    let (signals_tx, signals) = tokio::sync::mpsc::unbounded_channel();
    let scopes = FakeScopes::with_pidfds();
    let router = FakeRouter::default();
    let deps = Deps::<RealProcesses> {
        scopes: scopes.clone(),
        router: router.clone(),
        spawner: Host,
        inspector: Host,
        sampler: Host,
        steer: FakeSteer::default(),
        files: Disk::new(dir.join("apps")),
        store: StateFile::new(dir.join("state.json")),
        notifier: FakeNotifier::default(),
        relay: FakeRelay::default(),
        checker: ipclusterd::checker::Http,
        clock: Arc::new(ipclusterd::clock::SystemClock),
        config_dir: dir.join("apps"),
        notify: None,
        notify_socket: None,
        signals: signals_tx,
        sample_interval: Duration::from_secs(1),
        launcher: PathBuf::from(env!("CARGO_BIN_EXE_ipclusterd")),
    };
    tokio::spawn(Supervisor::new(mailbox, deps).run());
    Harness { handle, scopes, router, signals, dir }
}

async fn deploy(h: &Handle, app: &str, overrides: Overrides) -> Result<u64, Error> {
    h.call(|reply| Command::Deploy { app: app.into(), overrides, auth: Authorized::test(), reply }).await
}

async fn workers(h: &Handle, app: &str) -> Vec<supervisor::WorkerInfo> {
    h.snapshot().await.unwrap().workers_of(app).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_cutover_and_retirement_through_the_traits() {
    let mut h = start("cutover", &[("web", app("41000-41049", SERVER))]);
    assert_eq!(deploy(&h.handle, "web", Overrides::default()).await, Ok(1));
    let first = workers(&h.handle, "web").await;
    assert_eq!(first.len(), 2);
    assert!(h.scopes.units.lock().unwrap().contains_key("ipcluster-web-1.scope"));
    // One transaction made generation 1's ports the route of bands 0 and 1.
    let routes = h.router.applied.lock().unwrap().last().cloned().unwrap();
    let by_band: Vec<u16> = (0..2).map(|b| first.iter().find(|w| w.band == b).unwrap().ports[0].1).collect();
    assert_eq!(routes[0].bands, vec![vec![by_band[0]], vec![by_band[1]]]);

    assert_eq!(deploy(&h.handle, "web", Overrides::default()).await, Ok(2));
    let rows = workers(&h.handle, "web").await;
    let retired: Vec<_> = rows.iter().filter(|w| w.generation == 1).collect();
    assert!(retired.iter().all(|w| w.state.as_str() == "retired" && w.nice >= 5), "{retired:?}");
    let routes = h.router.applied.lock().unwrap().last().cloned().unwrap();
    let new_ports: Vec<u16> = rows.iter().filter(|w| w.generation == 2).map(|w| w.ports[0].1).collect();
    assert!(routes[0].bands.iter().all(|b| new_ports.contains(&b[0])), "routes point at generation 2");

    let n = h
        .handle
        .call(|reply| Command::KillRetired { app: String::new(), auth: Authorized::test(), reply })
        .await
        .unwrap();
    assert_eq!(n, 2);
    tokio::time::timeout(Duration::from_secs(5), async {
        while workers(&h.handle, "web").await.iter().any(|w| w.generation == 1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("retired workers stop");
    let mut states = Vec::new();
    while let Ok(s) = h.signals.try_recv() {
        if let BusSignal::GenerationStateChanged { generation, state, .. } = s {
            states.push((generation, state.as_str()));
        }
    }
    assert!(states.contains(&(1, "stopped")) && states.contains(&(2, "live")), "{states:?}");
    let _ =
        h.handle.call(|reply| Command::StopApp { app: "web".into(), auth: Authorized::test(), reply }).await;
    let _ = std::fs::remove_dir_all(&h.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deploys_stop_their_scope_and_route_nothing() {
    let h = start(
        "failed",
        &[("exits", app("41100-41149", "exit 3")), ("hangs", app("41150-41199", "exec sleep 30"))],
    );
    let e = deploy(&h.handle, "exits", Overrides::default()).await.unwrap_err();
    assert!(matches!(&e, Error::DeployFailed(m) if m.contains("exited with status 3")), "{e:?}");
    let e = deploy(&h.handle, "hangs", Overrides::default()).await.unwrap_err();
    assert!(matches!(&e, Error::DeployFailed(m) if m.contains("band 0: not ready after 3s")), "{e:?}");
    let stopped = h.scopes.stopped.lock().unwrap().clone();
    assert_eq!(stopped, ["ipcluster-exits-1.scope", "ipcluster-hangs-1.scope"]);
    let applied = h.router.applied.lock().unwrap().clone();
    assert!(applied.iter().flatten().all(|r| r.bands.is_empty()), "no route for a failed generation");
    assert!(workers(&h.handle, "").await.is_empty());
    let _ = std::fs::remove_dir_all(&h.dir);
}

/// The launcher never runs with the worker's environment (an override's `LD_PRELOAD` would act
/// before privileges are dropped); the worker's own `execve` gets all of it.
#[test]
fn a_gated_launcher_runs_with_path_alone_and_the_worker_gets_its_environment() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("launcher-env-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("env");
    let spec = ipclusterd::process::SpawnSpec {
        // The path as an argument, never inside the script: a checkout's path may hold spaces.
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "env > \"$1\"".into(),
            "sh".into(),
            out.display().to_string(),
        ],
        env: vec![("LD_PRELOAD".into(), "/nonexistent/evil.so".into()), ("APP_MODE".into(), "x".into())],
        cwd: dir.clone(),
        user: None,
        identifier: "t".into(),
        unit: "t.scope".into(),
        launcher: PathBuf::from(env!("CARGO_BIN_EXE_ipclusterd")),
        fds: Vec::new(),
    };
    let gated = ipclusterd::process::spawn_gated(&spec).unwrap();
    // Held at its gate: exec'd (no longer the fork of this test), and without the worker's env.
    // `exe` changes before the kernel has laid out the new environment, so an `environ` read in
    // between is empty: wait for both (the launcher always has a PATH).
    let environ = std::path::Path::new("/proc").join(gated.pid.to_string()).join("environ");
    let mut launcher_env = String::new();
    for _ in 0..200 {
        let execd =
            std::fs::read_link(format!("/proc/{}/exe", gated.pid)).is_ok_and(|e| e.ends_with("ipclusterd"));
        launcher_env = std::fs::read(&environ)
            .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
            .unwrap_or_default();
        if execd && !launcher_env.trim().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        launcher_env.trim(),
        format!("PATH={}", ipclusterd::process::WORKER_PATH),
        "the launcher's environment"
    );
    let _pidfd = gated.release().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let worker_env = loop {
        let written = std::fs::read_to_string(&out).unwrap_or_default();
        if written.contains("PATH=") {
            break written;
        }
        assert!(std::time::Instant::now() < deadline, "the worker did not run");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        worker_env.contains("APP_MODE=x") && worker_env.contains("LD_PRELOAD=/nonexistent/evil.so"),
        "{worker_env}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Socket mode's hand-over (sd_listen_fds(3)): the sockets arrive at fd 3 on, in order, with
/// `LISTEN_PID` naming the worker itself; the gate and nothing else follows them.
#[test]
fn a_worker_is_handed_its_sockets_from_fd_3_with_listen_pid_its_own() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("launcher-fds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("fds");
    let sockets: Vec<std::net::TcpListener> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let inode = |l: &std::net::TcpListener| rustix::fs::fstat(l).unwrap().st_ino;
    // The path as an argument, never inside the script: a checkout's path may hold spaces.
    let script = "{ echo \"$LISTEN_PID $$ $LISTEN_FDS\"; for f in 3 4 5 6; do readlink /proc/$$/fd/$f || echo none; done; } > \"$1.tmp\"; mv \"$1.tmp\" \"$1\"";
    let spec = ipclusterd::process::SpawnSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into(), out.display().to_string()],
        env: vec![("LISTEN_FDS".into(), "2".into())],
        cwd: dir.clone(),
        user: None,
        identifier: "t".into(),
        unit: "t.scope".into(),
        launcher: PathBuf::from(env!("CARGO_BIN_EXE_ipclusterd")),
        fds: sockets.iter().map(|l| std::os::fd::OwnedFd::from(l.try_clone().unwrap())).collect(),
    };
    let gated = ipclusterd::process::spawn_gated(&spec).unwrap();
    let _pidfd = gated.release().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let written = loop {
        if let Ok(w) = std::fs::read_to_string(&out) {
            break w;
        }
        assert!(std::time::Instant::now() < deadline, "the worker did not run");
        std::thread::sleep(Duration::from_millis(10));
    };
    let lines: Vec<&str> = written.lines().collect();
    let ids: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(ids[0], ids[1], "LISTEN_PID is the worker's own PID: {written}");
    assert_eq!(ids[2], "2");
    assert_eq!(lines[1], format!("socket:[{}]", inode(&sockets[0])), "{written}");
    assert_eq!(lines[2], format!("socket:[{}]", inode(&sockets[1])), "{written}");
    assert_eq!(&lines[3..], ["none", "none"], "the gate is closed before the worker runs: {written}");
    let _ = std::fs::remove_dir_all(&dir);
}
