//! The supervisor with real worker processes (forked and held at their gates by the real `Host`) and
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

/// Nothing runs between the daemon's fork and the worker's own `execve` (an override's
/// `LD_PRELOAD` could act nowhere else): held at its gate, the child is still this program, named
/// as a gate; released, the worker gets its whole environment.
#[test]
fn a_gated_child_runs_nothing_until_released_and_the_worker_gets_its_environment() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gate-env-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("env");
    // The path as an argument, never inside the script: a checkout's path may hold spaces.
    let mut spec = spec_of(&["/bin/sh", "-c", "env > \"$1\"", "sh", &out.display().to_string()], &dir);
    spec.env = vec![("LD_PRELOAD".into(), "/nonexistent/evil.so".into()), ("APP_MODE".into(), "x".into())];
    let gated = ipclusterd::process::spawn_gated(&spec).unwrap();
    let proc = std::path::Path::new("/proc").join(gated.pid.to_string());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        std::fs::read_link(proc.join("exe")).unwrap(),
        std::fs::read_link("/proc/self/exe").unwrap(),
        "nothing executed before the release"
    );
    assert_eq!(std::fs::read_to_string(proc.join("comm")).unwrap().trim(), "ipclusterd-gate");
    assert!(!out.exists(), "the worker's command has not run");
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
    let mut vars: Vec<&str> = worker_env
        .lines()
        .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
        .collect();
    vars.sort_unstable();
    assert_eq!(
        vars,
        [
            "APP_MODE=x",
            "LD_PRELOAD=/nonexistent/evil.so",
            &format!("PATH={}", ipclusterd::process::WORKER_PATH)
        ],
        "the worker's environment and nothing of this process's"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// How a child ends: the exit code, once it has ended (waited through its pidfd).
fn exit_code(pidfd: &std::os::fd::OwnedFd) -> Option<i32> {
    let status = rustix::process::waitid(
        rustix::process::WaitId::PidFd(std::os::fd::AsFd::as_fd(pidfd)),
        rustix::process::WaitIdOptions::EXITED,
    )
    .unwrap()?;
    status.exit_status()
}

/// A child whose gate closes without a release exits without running anything and is reaped;
/// one that cannot prepare itself fails the spawn with the reason; one whose command cannot be
/// executed ends with 127.
#[test]
fn a_closed_gate_runs_nothing_a_bad_directory_fails_the_spawn_and_a_missing_command_ends_127() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gate-ends-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("ran");
    let spec = |argv: Vec<String>, cwd: PathBuf| {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        spec_of(&argv, &cwd)
    };
    let touch = vec!["/usr/bin/touch".to_owned(), out.display().to_string()];
    let gated = ipclusterd::process::spawn_gated(&spec(touch.clone(), dir.clone())).unwrap();
    let pid = gated.pid;
    drop(gated);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "ended and reaped");
    assert!(!out.exists(), "the command never ran");

    let e = ipclusterd::process::spawn_gated(&spec(touch, dir.join("absent"))).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");

    let gated =
        ipclusterd::process::spawn_gated(&spec(vec!["no-such-command-here".into()], dir.clone())).unwrap();
    assert_eq!(exit_code(&gated.release().unwrap()), Some(127));
    let gated = ipclusterd::process::spawn_gated(&spec(vec!["true".into()], dir.clone())).unwrap();
    assert_eq!(exit_code(&gated.release().unwrap()), Some(0), "found on the workers' PATH");

    // Released, a child with a delay waits it out before it runs the command.
    let late = dir.join("late");
    let mut delayed = spec(vec!["/usr/bin/touch".into(), late.display().to_string()], dir.clone());
    delayed.delay = Duration::from_millis(400);
    let gated = ipclusterd::process::spawn_gated(&delayed).unwrap();
    let released = std::time::Instant::now();
    let pidfd = gated.release().unwrap();
    assert_eq!(exit_code(&pidfd), Some(0));
    assert!(late.exists() && released.elapsed() >= Duration::from_millis(400));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Socket mode's hand-over (sd_listen_fds(3)): the sockets arrive at fd 3 on, in order, with
/// `LISTEN_PID` naming the worker itself; the gate and nothing else follows them.
#[test]
fn a_worker_is_handed_its_sockets_from_fd_3_with_listen_pid_its_own() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gate-fds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("fds");
    let sockets: Vec<std::net::TcpListener> =
        (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let inode = |l: &std::net::TcpListener| rustix::fs::fstat(l).unwrap().st_ino;
    // The path as an argument, never inside the script: a checkout's path may hold spaces.
    let script = "{ echo \"$LISTEN_PID $$ $LISTEN_FDS $WATCHDOG_PID\"; for f in 3 4 5 6; do readlink /proc/$$/fd/$f || echo none; done; } > \"$1.tmp\"; mv \"$1.tmp\" \"$1\"";
    let mut spec = spec_of(&["/bin/sh", "-c", script, "sh", &out.display().to_string()], &dir);
    spec.env = vec![("LISTEN_FDS".into(), "2".into()), ("WATCHDOG_USEC".into(), "1000000".into())];
    spec.fds = sockets.iter().map(|l| std::os::fd::OwnedFd::from(l.try_clone().unwrap())).collect();
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
    assert_eq!(ids[3], ids[1], "WATCHDOG_PID too: {written}");
    assert_eq!(ids[2], "2");
    assert_eq!(lines[1], format!("socket:[{}]", inode(&sockets[0])), "{written}");
    assert_eq!(lines[2], format!("socket:[{}]", inode(&sockets[1])), "{written}");
    assert_eq!(&lines[3..], ["none", "none"], "the gate is closed before the worker runs: {written}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn spec_of(argv: &[&str], cwd: &std::path::Path) -> ipclusterd::process::SpawnSpec {
    ipclusterd::process::SpawnSpec {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        cwd: cwd.to_owned(),
        user: None,
        identifier: "t".into(),
        unit: "t.scope".into(),
        fds: Vec::new(),
        delay: Duration::ZERO,
    }
}

/// The blocked signals of the calling thread, from /proc.
fn own_blocked() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    status.lines().find(|l| l.starts_with("SigBlk:")).unwrap().to_owned()
}

/// A child at its gate holds nothing of the daemon's: its stdio and its gate alone — so dropping one child while a later one waits ends the first at once (a copy of its
/// gate in the second would keep it waiting forever). The caller's signal mask is as it was; the
/// worker starts with no signal blocked or ignored; a script without `#!` runs through /bin/sh,
/// as execvp(3) runs it.
#[test]
fn a_gated_child_holds_nothing_of_the_daemons_and_the_worker_starts_with_clean_signals() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gate-clean-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Something of this process's open that a child must not keep.
    let held = std::fs::File::open("/proc/self/status").unwrap();
    let mask = own_blocked();
    let first = ipclusterd::process::spawn_gated(&spec_of(&["/bin/true"], &dir)).unwrap();
    let second = ipclusterd::process::spawn_gated(&spec_of(&["/bin/true"], &dir)).unwrap();
    assert_eq!(own_blocked(), mask, "the caller's signal mask is restored");
    let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{}/fd", second.pid))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    fds.sort_unstable();
    // The status pipe (4) is closed just after the child reports ready: it may still be there.
    fds.retain(|fd| *fd != 4);
    assert_eq!(fds, [0, 1, 2, 3], "stdio, the gate (and the status pipe), nothing else");
    drop(held);
    let (tx, rx) = std::sync::mpsc::channel();
    let first_pid = first.pid;
    std::thread::spawn(move || {
        drop(first);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("the first child ended while the second waits");
    assert!(!std::path::Path::new(&format!("/proc/{first_pid}")).exists());
    drop(second);

    let out = dir.join("signals");
    let script = "exec grep -E '^Sig(Blk|Ign)' /proc/self/status > \"$1\"";
    let gated = ipclusterd::process::spawn_gated(&spec_of(
        &["/bin/sh", "-c", script, "sh", &out.display().to_string()],
        &dir,
    ))
    .unwrap();
    assert_eq!(exit_code(&gated.release().unwrap()), Some(0));
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        written.lines().collect::<Vec<_>>(),
        ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"],
        "the worker starts with no signal blocked or ignored"
    );

    let plain = dir.join("plain-script");
    std::fs::write(&plain, "echo ran > \"$1\"\n").unwrap();
    std::fs::set_permissions(&plain, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ran = dir.join("ran");
    let gated = ipclusterd::process::spawn_gated(&spec_of(
        &[&plain.display().to_string(), &ran.display().to_string()],
        &dir,
    ))
    .unwrap();
    assert_eq!(exit_code(&gated.release().unwrap()), Some(0));
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "ran\n", "a script without #! runs through /bin/sh");
    let _ = std::fs::remove_dir_all(&dir);
}
