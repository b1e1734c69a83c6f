//! The soak's host: one sandboxed systemd host where ipclusterd is installed from its Debian
//! package (so that `apt-get install --reinstall` of it is a fault like any other), with three
//! apps, loopback addresses of both families, and a client network namespace `cli` on a veth
//! link (another host, as far as the daemon can tell).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ipcluster_sandbox::Sandbox;

/// What an app is for in the soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// NAT mode, the Rust demo worker, with `watchdog` and `worker_memory_max`.
    Nat,
    /// Socket mode, a Node.js worker.
    Socket,
    /// NAT mode with `session_affinity`: Socket.IO's server, long-polling clients.
    Sessions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct App {
    pub name: &'static str,
    pub role: Role,
    /// Its public port (`[::]:port`, both families).
    pub port: u16,
    pub workers: u32,
}

pub const APPS: [App; 3] = [
    App { name: "demo", role: Role::Nat, port: 80, workers: 4 },
    App { name: "node", role: Role::Socket, port: 81, workers: 4 },
    App { name: "chat", role: Role::Sessions, port: 82, workers: 4 },
];

/// The HTTP load's apps (the session app gets Socket.IO clients only).
pub fn http_apps() -> impl Iterator<Item = (usize, &'static App)> {
    APPS.iter().enumerate().filter(|(_, a)| a.role != Role::Sessions)
}

/// The soak's `watchdog` of the NAT app: a SIGSTOPped worker is replaced after this.
pub const WATCHDOG: &str = "2s";
/// `worker_memory_max` of the NAT app; the memory fault grows a worker past it.
pub const MEMORY_MAX_MIB: u32 = 48;
/// `session_affinity` of the session app, in seconds.
pub const AFFINITY_SECS: u32 = 8;

/// The daemon's own file: frequent samples, so that the memory and watchdog policies act soon.
const DAEMON_TOML: &str = "sample_interval = \"500ms\"\n";

/// Where a client is: the sandbox's own namespace (loopback) or `cli`, and which family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Loopback,
    Client,
}

/// The sandbox's addresses on the link to `cli`.
const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, 1);

/// The 64 sources of the HTTP load: 16 each of loopback IPv4 and IPv6 and `cli`'s IPv4 and
/// IPv6, whose last bits cover every band.
pub fn http_sources() -> Vec<(Side, IpAddr)> {
    let mut out = Vec::new();
    for i in 10u8..26 {
        out.push((Side::Loopback, IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))));
        out.push((Side::Loopback, IpAddr::V6(Ipv6Addr::new(0xfd07, 0, 0, 0, 0, 0, 0, i.into()))));
        out.push((Side::Client, IpAddr::V4(Ipv4Addr::new(10, 9, 0, i))));
        out.push((Side::Client, IpAddr::V6(Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, i.into()))));
    }
    out
}

/// The session clients' sources: 8 on loopback (IPv4), 8 in `cli` (IPv6).
pub fn session_sources() -> (Vec<IpAddr>, Vec<IpAddr>) {
    let lo = (1u8..=8).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i))).collect();
    let cli = (1u16..=8).map(|i| IpAddr::V6(Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 1, i))).collect();
    (lo, cli)
}

/// Where a client on `side` reaches `port` in the family of `src`.
pub fn destination(side: Side, src: IpAddr, port: u16) -> SocketAddr {
    match (side, src) {
        (Side::Loopback, IpAddr::V4(_)) => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
        (Side::Loopback, IpAddr::V6(_)) => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
        (Side::Client, IpAddr::V4(_)) => SocketAddr::new(SERVER_V4.into(), port),
        (Side::Client, IpAddr::V6(_)) => SocketAddr::new(SERVER_V6.into(), port),
    }
}

/// The band of a source address among `workers` (the last 32 bits of an IPv6 one).
pub fn band_of(src: IpAddr, workers: u32) -> u32 {
    let low = match src {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => u128::from(a) as u32,
    };
    low & (workers - 1)
}

#[derive(Debug)]
pub struct Host {
    pub sb: Sandbox,
    /// The package, as the sandbox sees it.
    pub deb: PathBuf,
    /// Socket.IO's `node_modules` and `tests/node`, as the sandbox sees them.
    pub modules: PathBuf,
    pub scripts: PathBuf,
}

impl Host {
    /// Boots the host, installs the package `deb`, writes the apps and waits until each has a
    /// live generation with every band.
    pub fn setup(deb: &Path, modules: &Path) -> Result<Self> {
        let scripts = crate::root().join("tests/node");
        let share = vec![
            deb.parent().context("the package's directory")?.to_path_buf(),
            modules.into(),
            scripts.clone(),
        ];
        let sb = Sandbox::boot_with(ipcluster_sandbox::Options { share, ..Default::default() })?;
        let host =
            Host { deb: sb.inside(deb)?, modules: sb.inside(modules)?, scripts: sb.inside(&scripts)?, sb };
        let out = host.sb.run(["dpkg-query", "-W", "ipclusterd"])?;
        if out.status.success() {
            bail!(
                "ipclusterd is installed on this machine: the soak installs its own package in the sandbox"
            );
        }
        host.sb.without_source_install()?;
        host.sb.write_file("/etc/ipcluster/ipclusterd.toml", DAEMON_TOML, 0o644)?;
        for app in &APPS {
            host.write_app(app, 0)?;
        }
        host.addresses()?;
        host.apt_install(false)?;
        host.wait_all_live(Duration::from_secs(90))?;
        Ok(host)
    }

    /// The text of `app`'s file; `reloads` is written into its environment, so that each value
    /// makes a changed file (the reload fault).
    pub fn app_file(&self, app: &App, reloads: u32) -> String {
        let node = |script: &str| {
            format!("[\"/usr/bin/node\", {:?}]", self.scripts.join(script).display().to_string())
        };
        let (command, extra) = match app.role {
            Role::Nat => (
                "[\"/usr/bin/ipcluster-demo\"]".to_owned(),
                format!(
                    "ready = \"notify\"\nwatchdog = \"{WATCHDOG}\"\nworker_memory_max = \"{MEMORY_MAX_MIB}M\"\n"
                ),
            ),
            Role::Socket => (node("soak-worker.js"), "routing = \"socket\"\n".to_owned()),
            Role::Sessions => (
                node("server.js"),
                format!(
                    "session_affinity = \"{AFFINITY_SECS}s\"\nmax_draining = {}\n",
                    super::account::MAX_DRAINING
                ),
            ),
        };
        let modules = self.modules.display().to_string();
        format!(
            "# The soak's {role:?} app.\ncommand = {command}\nworkers = {workers}\nlisten = [\"[::]:{port}\"]\n{extra}\
             ready_timeout = \"60s\"\nstop_timeout = \"2s\"\nenvironment = {{ NODE_PATH = {modules:?}, SOAK_RELOADS = \"{reloads}\" }}\n",
            role = app.role,
            workers = app.workers,
            port = app.port,
        )
    }

    pub fn app_path(app: &App) -> String {
        format!("/etc/ipcluster/apps/{}.toml", app.name)
    }

    pub fn write_app(&self, app: &App, reloads: u32) -> Result<()> {
        self.sb.write_file(Self::app_path(app), self.app_file(app, reloads), 0o644)
    }

    /// `apt-get install` of the package (`--reinstall` with `again`), non-interactively.
    pub fn apt_install(&self, again: bool) -> Result<String> {
        let mut argv = vec!["apt-get", "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confold"];
        if again {
            argv.push("--reinstall");
        }
        let deb = self.deb.display().to_string();
        argv.push(&deb);
        let out = self.sb.command(&argv).env("DEBIAN_FRONTEND", "noninteractive").output()?;
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("apt-get {argv:?} failed ({}): {text}", out.status);
        }
        Ok(text)
    }

    /// Loopback IPv6 sources, and `cli` with its link and its sources.
    fn addresses(&self) -> Result<()> {
        for (side, src) in http_sources() {
            if let (Side::Loopback, IpAddr::V6(a)) = (side, src) {
                self.sb.check(["ip", "-6", "addr", "add", &format!("{a}/128"), "dev", "lo", "nodad"])?;
            }
        }
        for step in [
            &["ip", "netns", "add", "cli"][..],
            &["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", "cli"],
            &["ip", "link", "set", "veth0", "up"],
            &["ip", "netns", "exec", "cli", "ip", "link", "set", "lo", "up"],
            &["ip", "netns", "exec", "cli", "ip", "link", "set", "veth1", "up"],
            &["ip", "addr", "add", "10.9.0.1/24", "dev", "veth0"],
            &["ip", "-6", "addr", "add", "fd09::1/64", "dev", "veth0", "nodad"],
        ] {
            self.sb.check(step)?;
        }
        let clients = http_sources().into_iter().filter(|(s, _)| *s == Side::Client).map(|(_, a)| a);
        for a in clients.chain(session_sources().1) {
            let (family, prefix) = if a.is_ipv4() { ("-4", 24) } else { ("-6", 64) };
            let addr = format!("{a}/{prefix}");
            let mut argv =
                vec!["ip", "netns", "exec", "cli", "ip", family, "addr", "add", &addr, "dev", "veth1"];
            if a.is_ipv6() {
                argv.push("nodad");
            }
            self.sb.check(&argv)?;
        }
        Ok(())
    }

    /// Waits until every app has a live generation whose bands all have a live worker.
    pub fn wait_all_live(&self, timeout: Duration) -> Result<()> {
        let bus = super::bus::Bus::connect(&self.sb.system_bus_address())?;
        let deadline = Instant::now() + timeout;
        loop {
            let rows = bus.list_workers().unwrap_or_default();
            let missing: Vec<&str> = APPS
                .iter()
                .filter(|a| {
                    rows.iter().filter(|w| w.app == a.name && w.state == "live").count() < a.workers as usize
                })
                .map(|a| a.name)
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let journal = self.sb.run(["journalctl", "-u", "ipclusterd", "-n", "40", "--no-pager"])?;
                bail!(
                    "apps {missing:?} not live after {timeout:?}; the daemon's journal:\n{}",
                    String::from_utf8_lossy(&journal.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The daemon's PID as this machine sees it (its unit's process named `ipclusterd`).
    pub fn daemon_host_pid(&self) -> Option<u32> {
        let procs = self.sb.host_path("/sys/fs/cgroup/system.slice/ipclusterd.service/cgroup.procs");
        let text = std::fs::read_to_string(procs).ok()?;
        text.lines().filter_map(|l| l.trim().parse().ok()).find(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "ipclusterd")
        })
    }

    /// The daemon's main PID inside the sandbox, from systemd (0 when it is not running).
    pub fn daemon_pid(&self) -> u32 {
        self.sb.main_pid("ipclusterd").unwrap_or(0)
    }
}
