//! `ipclusterctl top` in a real terminal: tmux inside the sandbox (its server's socket in the
//! sandbox's own /tmp) runs it in a 160×40 pane; the tests act on the cluster over the bus,
//! read the screen with `capture-pane`, type with `send-keys`, and compare the terminal's
//! settings (`stty -a`, the alternate screen, the cursor) before and after it ran.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::LazyLock,
    time::{Duration, Instant},
};

use ipcluster_e2e::{Sandbox, bus::Bus, cluster, fixture::Demo, text, wait_for};

/// Two workers; each takes 1 s to become ready, so a deploy's starting generation stays on the
/// screen long enough to be seen.
static WEB: LazyLock<String> = LazyLock::new(|| Demo::new(2).args(&["--delay-ready", "1000"]).toml());

const SOCKET: &str = "/tmp/top.tmux";
const CONF: &str = "/tmp/top.tmux.conf";

/// A tmux server inside the sandbox.
struct Tmux<'a> {
    sb: &'a Sandbox,
}

impl<'a> Tmux<'a> {
    /// Panes stay after their program exits (to read what it left), and no status line takes a
    /// row from them.
    fn new(sb: &'a Sandbox) -> Self {
        sb.write_file(CONF, "set -g remain-on-exit on\nset -g status off\n", 0o644).unwrap();
        Self { sb }
    }

    fn run(&self, args: &[&str]) -> String {
        let mut argv = vec!["tmux", "-S", SOCKET, "-f", CONF];
        argv.extend_from_slice(args);
        self.sb.check(argv).unwrap()
    }

    /// Starts `ipclusterctl <ctl_args>` in a new 160×40 session `name`. Around it, the shell
    /// records the terminal's settings before and after, and its exit status, in
    /// `/tmp/<name>.{before,after,status}`; then it stays, so the pane's state (the cursor, the
    /// screen) is the program's legacy, not that of a dead pane (whose cursor tmux hides).
    fn start(&self, name: &str, ctl_args: &str) {
        let line = format!(
            "stty -a > /tmp/{name}.before; ipclusterctl {ctl_args}; echo $? > /tmp/{name}.status; stty -a > /tmp/{name}.after; exec sleep 3600"
        );
        self.run(&["new-session", "-d", "-s", name, "-x", "160", "-y", "40", &line]);
    }

    fn screen(&self, name: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", name])
    }

    /// Waits until the screen satisfies `ok`; returns it.
    fn wait(&self, what: &str, name: &str, ok: impl Fn(&Screen) -> bool) -> Screen {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let s = Screen(self.screen(name));
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; the screen:\n{}", s.0);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A tmux format of the session's pane (`#{alternate_on}`, …).
    fn format(&self, name: &str, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", name, format]).trim().to_owned()
    }

    /// Waits for `ipclusterctl` in session `name` to exit; checks the terminal is as it found it:
    /// the same settings (cooked mode, echo), the main screen, the cursor shown, no frame left.
    /// Returns its exit status.
    fn ended_and_restored(&self, name: &str) -> String {
        let status = wait_for("ipclusterctl top to exit", Duration::from_secs(10), || {
            self.sb.read_file(format!("/tmp/{name}.status")).ok().filter(|s| !s.is_empty())
        });
        wait_for("stty after it", Duration::from_secs(5), || {
            self.sb.read_file(format!("/tmp/{name}.after")).ok().filter(|s| !s.is_empty())
        });
        let before = self.sb.read_file(format!("/tmp/{name}.before")).unwrap();
        let after = self.sb.read_file(format!("/tmp/{name}.after")).unwrap();
        assert!(before.contains(" icanon") && before.contains(" echo"), "{before}");
        assert_eq!(before, after, "the terminal's settings were not restored");
        assert_eq!(self.format(name, "#{alternate_on}"), "0", "still on the alternate screen");
        assert_eq!(self.format(name, "#{cursor_flag}"), "1", "the cursor is still hidden");
        let screen = self.screen(name);
        assert!(!screen.contains("ipclusterctl top:"), "a frame was left on the main screen:\n{screen}");
        status.trim().to_owned()
    }
}

/// What a pane shows.
struct Screen(String);

impl Screen {
    /// The state in generation `g`'s row of `app`.
    fn generation(&self, app: &str, g: u64) -> Option<String> {
        let scope = format!("ipcluster-{app}-{g}.scope");
        self.rows().find(|t| t.last() == Some(&scope.as_str()) && t.len() == 6).map(|t| t[2].to_owned())
    }

    /// The row of the worker `pid`: APP GEN BAND PID STATE RSS CPU% NICE AGE PORTS.
    fn worker(&self, pid: u32) -> Option<Vec<String>> {
        let pid = pid.to_string();
        self.rows().find(|t| t.len() == 10 && t[3] == pid).map(|t| t.into_iter().map(str::to_owned).collect())
    }

    fn worker_state(&self, pid: u32) -> Option<String> {
        self.worker(pid).map(|w| w[4].clone())
    }

    fn rows(&self) -> impl Iterator<Item = Vec<&str>> {
        self.0.lines().map(|l| l.split_whitespace().collect())
    }
}

/// Pids of generation `g`'s workers.
fn pids(bus: &Bus, g: u64) -> Vec<u32> {
    bus.list_workers("web").iter().filter(|w| w.generation == g).map(|w| w.pid).collect()
}

#[test]
fn a_deploy_shows_at_once_from_the_signals_and_q_restores_the_terminal() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let old = pids(&bus, 1);
    let tmux = Tmux::new(&sb);
    // Refreshes a minute apart: whatever changes on the screen within the test came from a signal.
    tmux.start("top", "top -d 60");
    let s = tmux.wait("generation 1 and its workers", "top", |s| {
        s.generation("web", 1).as_deref() == Some("live")
            && old.iter().all(|p| s.worker_state(*p).as_deref() == Some("live"))
    });
    assert!(
        s.0.lines().next().unwrap().starts_with("ipclusterctl top: every app: 1 running generation"),
        "{}",
        s.0
    );
    // The first list's figures: RSS in KiB or MiB, a CPU %, nice 0.
    let row = s.worker(old[0]).unwrap();
    assert!(row[5].ends_with('K') || row[5].ends_with('M'), "{row:?}");
    assert!(row[6].parse::<f64>().is_ok() && row[7] == "0", "{row:?}");

    // A deploy: starting (while its workers take a second to be ready), then live, 1 retired.
    let deploy = {
        let address = sb.system_bus_address();
        std::thread::spawn(move || Bus::connect_to(&address).deploy_plain("web"))
    };
    tmux.wait("generation 2 starting", "top", |s| s.generation("web", 2).as_deref() == Some("starting"));
    assert_eq!(deploy.join().unwrap(), Ok(2));
    let new = pids(&bus, 2);
    let s = tmux.wait("generation 2 live, 1 retired", "top", |s| {
        s.generation("web", 2).as_deref() == Some("live")
            && s.generation("web", 1).as_deref() == Some("retired")
            && new.iter().all(|p| s.worker_state(*p).as_deref() == Some("live"))
            && old.iter().all(|p| s.worker_state(*p).as_deref() == Some("retired"))
    });
    // Live first, as status lists them; the new workers' figures wait for a refresh.
    let order: Vec<u32> = s.rows().filter(|t| t.len() == 10).filter_map(|t| t[3].parse().ok()).collect();
    assert_eq!(order.len(), 4, "{}", s.0);
    assert!(new.contains(&order[0]) && new.contains(&order[1]), "{}", s.0);
    assert_eq!(s.worker(new[0]).unwrap()[5], "-", "{}", s.0);
    assert!(s.0.contains("web: generation 2 live") && s.0.contains("web: generation 1 retired"), "{}", s.0);

    // Reaping: the retired workers leave the screen as they exit.
    assert_eq!(bus.kill_retired("web"), Ok(2));
    let s = tmux.wait("generation 1's workers gone", "top", |s| old.iter().all(|p| s.worker(*p).is_none()));
    assert!(s.0.contains(&format!("pid {} exited", old[0])), "{}", s.0);

    tmux.run(&["send-keys", "-t", "top", "q"]);
    assert_eq!(tmux.ended_and_restored("top"), "0");
}

#[test]
fn figures_refresh_and_a_stopped_daemon_is_not_started_again_and_ctrl_c_or_sigterm_quit() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let worker = bus.list_workers("web")[0].clone();
    let tmux = Tmux::new(&sb);
    tmux.start("top", "top web --interval 500ms");
    tmux.wait("the worker", "top", |s| s.worker(worker.pid).is_some());

    // Memory only ListWorkers tells: the worker grows by 64 MiB, and the screen follows.
    let port = worker.ports[0].1;
    let grown = sb
        .in_netns(move || {
            use std::io::{Read, Write};
            let mut s = ipcluster_e2e::client::connect(
                Ipv4Addr::LOCALHOST,
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            )
            .map_err(|e| format!("{e:?}"))?;
            s.write_all(b"GET /alloc/64 HTTP/1.1\r\nHost: t\r\n\r\n").map_err(|e| e.to_string())?;
            s.read(&mut [0u8; 512]).map_err(|e| e.to_string())
        })
        .unwrap();
    assert!(grown.is_ok(), "{grown:?}");
    tmux.wait("RSS above 64 MiB", "top", |s| {
        s.worker(worker.pid)
            .is_some_and(|w| w[5].strip_suffix('M').and_then(|m| m.parse::<f64>().ok()) >= Some(64.0))
    });

    // The daemon stops: the view says so and keeps what it had; its refreshes (every 0.5 s) do
    // not start the daemon again by D-Bus activation.
    sb.check(["systemctl", "stop", "ipclusterd"]).unwrap();
    let s = tmux.wait("the daemon is not running", "top", |s| s.0.contains("ipclusterd is not running"));
    assert!(s.worker(worker.pid).is_some(), "{}", s.0);
    std::thread::sleep(Duration::from_secs(2));
    let active = sb.run(["systemctl", "is-active", "ipclusterd"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&active.stdout).trim(), "inactive", "top started the daemon");
    // Started again: it adopts the workers, and the view carries on.
    sb.check(["systemctl", "start", "ipclusterd"]).unwrap();
    tmux.wait("the daemon back", "top", |s| {
        !s.0.contains("not running") && s.worker_state(worker.pid).as_deref() == Some("live")
    });

    // Ctrl-C quits (in raw mode it is a key); so does SIGTERM, both restoring the terminal.
    tmux.run(&["send-keys", "-t", "top", "C-c"]);
    assert_eq!(tmux.ended_and_restored("top"), "0");
    tmux.start("term", "top");
    tmux.wait("the second view", "term", |s| s.worker(worker.pid).is_some());
    sb.check(["pkill", "-TERM", "-x", "ipclusterctl"]).unwrap();
    assert_eq!(tmux.ended_and_restored("term"), "0");
}

#[test]
fn without_a_terminal_it_prints_one_snapshot_and_errors_exit_as_elsewhere() {
    let (sb, bus) = cluster(&[("web", WEB.as_str())]);
    assert_eq!(bus.deploy_plain("web"), Ok(1));
    let workers = bus.list_workers("web");

    // stdout is a pipe here: the tables once, no escape sequences, and it exits.
    let started = Instant::now();
    let out = sb.run(["ipclusterctl", "top"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(5));
    let snapshot = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!snapshot.contains('\x1b'), "{snapshot:?}");
    let s = Screen(snapshot.clone());
    assert_eq!(s.generation("web", 1).as_deref(), Some("live"), "{snapshot}");
    for w in &workers {
        let row = s.worker(w.pid).unwrap_or_else(|| panic!("{} missing:\n{snapshot}", w.pid));
        assert_eq!((row[4].as_str(), row[9].as_str()), ("live", &*format!("80->{}", w.ports[0].1)));
    }

    // --json: status --json's fields, and each worker's CPU %.
    let out = sb.run(["ipclusterctl", "--json", "top", "web"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("top --json is JSON");
    assert_eq!(v["generations"][0]["state"], "live");
    let rows = v["workers"].as_array().unwrap();
    assert_eq!(rows.len(), workers.len());
    for row in rows {
        assert!(row["cpu_percent"].as_f64().is_some_and(|c| c >= 0.0), "{row}");
        assert!(workers.iter().any(|w| row["pid"] == w.pid && row["rss_bytes"].as_u64().is_some()), "{row}");
    }

    // Refused: 1, before the screen changes; usage: 2; no daemon: 3.
    let out = sb.run(["ipclusterctl", "top", "nope"]).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no such app"), "{}", text(&out));
    let tmux = Tmux::new(&sb);
    tmux.start("nope", "top nope");
    assert_eq!(tmux.ended_and_restored("nope"), "1");
    let out = sb.run(["ipclusterctl", "top", "-d", "0"]).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // Stopped, and no D-Bus activation to start it again.
    sb.check(["systemctl", "stop", "ipclusterd"]).unwrap();
    sb.check(["rm", "/usr/share/dbus-1/system-services/org.ipcluster1.service"]).unwrap();
    sb.check([
        "busctl",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "ReloadConfig",
    ])
    .unwrap();
    let out = sb.run(["ipclusterctl", "top"]).unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("ipclusterd is not running"), "{}", text(&out));

    // The man page and the completions know the command.
    let man = sb.check(["ipclusterctl", "__man"]).unwrap();
    assert!(man.contains("ipclusterctl\\-top"), "{man}");
    let bash = sb.check(["ipclusterctl", "__completions", "bash"]).unwrap();
    assert!(bash.contains("top") && bash.contains("--interval"), "{bash}");
}
