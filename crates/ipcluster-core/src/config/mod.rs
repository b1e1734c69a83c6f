//! App files: `/etc/ipcluster/apps/<app>.toml`, parsed and validated into [`AppConfig`].
//!
//! Every error names the file, the line and column, the key, and what is allowed. Parsing is pure:
//! the caller reads the file and passes its text. Defaults live in [`defaults`] alone: a key left
//! out of a file, and a generation adopted without its file, get the same values.

mod checks;
mod daemon;
pub mod defaults;
pub mod health;
mod overrides;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt, net::SocketAddr, ops::Range, path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use checks::{check_command, check_environment, check_listen, check_user, check_workdir, check_workers};
pub use daemon::{DAEMON_KEYS, DaemonConfig};
pub use health::HealthCheck;
pub use overrides::{OVERRIDE_KEYS, Overrides};

use crate::{
    name::AppName,
    units::{Signal, parse_duration, parse_duration_range, parse_port_range, parse_rate, parse_size},
};

/// Most bands an app may have.
pub const MAX_WORKERS: u32 = 1024;
/// Limits on sizes of what callers and files may pass (no unbounded allocations from input).
pub const MAX_ARGS: usize = 256;
pub const MAX_ARG_LEN: usize = 4096;
pub const MAX_ENV: usize = 256;
pub const MAX_LISTEN: usize = 16;

/// How clients reach the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// NAT `REDIRECT` rules send each band to its worker's own port (`$PORT`).
    Nat,
    /// The daemon binds the public sockets and hands each worker its band's; an eBPF program
    /// steers each connection to its band's socket. No NAT, no worker port.
    Socket,
}

impl Routing {
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Nat => "nat",
            Routing::Socket => "socket",
        }
    }
}

/// How a worker tells that it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Ready when `127.0.0.1:<port>` accepts for each of its ports.
    Tcp,
    /// Ready after it sends `READY=1` on `NOTIFY_SOCKET`.
    Notify,
    /// Ready once its first health check answers 2xx, after it holds its ports (NAT mode) or
    /// sent `READY=1` (socket mode).
    Http,
}

impl Ready {
    /// Whether readiness needs the worker's `READY=1` (so it gets `NOTIFY_SOCKET`).
    pub fn notifies(self, routing: Routing) -> bool {
        self == Ready::Notify || (self == Ready::Http && routing == Routing::Socket)
    }

    /// Whether readiness needs the worker to hold its own ports (checked by connecting).
    pub fn holds_ports(self, routing: Routing) -> bool {
        self == Ready::Tcp || (self == Ready::Http && routing == Routing::Nat)
    }
}

/// A validated app.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    pub name: AppName,
    pub command: Vec<String>,
    pub workers: u32,
    pub listen: Vec<SocketAddr>,
    pub routing: Routing,
    pub port_range: (u16, u16),
    pub ready: Ready,
    pub ready_timeout: Duration,
    pub working_directory: PathBuf,
    pub user: Option<String>,
    pub environment: BTreeMap<String, String>,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub retire_signal: Option<Signal>,
    pub retire_nice: i32,
    pub autostart: bool,
    /// A live worker above this RSS (bytes) is retired and replaced.
    pub worker_memory_max: Option<u64>,
    /// Budget (bytes) for the RSS of all the app's workers; watermarks at 80 % and 95 %.
    pub cluster_memory_max: Option<u64>,
    /// At most this many memory/health retirements per window.
    pub retire_rate: (u32, Duration),
    /// Retired workers older than this are stopped.
    pub retire_timeout: Option<Duration>,
    /// Pause between stopping successive retired workers.
    pub reap_interval: Duration,
    /// Pause between spawning successive workers of a generation.
    pub spawn_interval: Duration,
    /// With ready = notify: workers must send WATCHDOG=1 at least this often.
    pub watchdog: Option<Duration>,
    /// Respawn delay of a crashed band: min, doubling, up to max.
    pub restart_backoff: (Duration, Duration),
    /// Sticky across deploys: a client keeps the generation that holds its session until it
    /// opened no connection for this long (whole seconds). `None`: off.
    pub session_affinity: Option<Duration>,
    /// At most this many generations of the app drain (keep their clients) at once.
    pub max_draining: u32,
    /// HTTP health checks of every worker (`health_path`); `None`: none.
    pub health: Option<HealthCheck>,
}

/// An invalid app file or override, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `Deploy options` for overrides).
    pub file: String,
    /// 1-based line and column, when known.
    pub location: Option<(usize, usize)>,
    /// The key, when known.
    pub key: Option<String>,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.location {
            write!(f, ":{line}:{col}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    command: Spanned<Vec<String>>,
    workers: Option<Spanned<i64>>,
    listen: Spanned<Vec<String>>,
    routing: Option<Spanned<String>>,
    port_range: Option<Spanned<String>>,
    ready: Option<Spanned<String>>,
    ready_timeout: Option<Spanned<String>>,
    working_directory: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    environment: Option<Spanned<BTreeMap<String, String>>>,
    stop_signal: Option<Spanned<String>>,
    stop_timeout: Option<Spanned<String>>,
    retire_signal: Option<Spanned<String>>,
    retire_nice: Option<Spanned<i64>>,
    autostart: Option<Spanned<bool>>,
    worker_memory_max: Option<Spanned<String>>,
    cluster_memory_max: Option<Spanned<String>>,
    retire_rate: Option<Spanned<String>>,
    retire_timeout: Option<Spanned<String>>,
    reap_interval: Option<Spanned<String>>,
    spawn_interval: Option<Spanned<String>>,
    watchdog: Option<Spanned<String>>,
    restart_backoff: Option<Spanned<String>>,
    session_affinity: Option<Spanned<String>>,
    max_draining: Option<Spanned<i64>>,
    health_path: Option<Spanned<String>>,
    health_interval: Option<Spanned<String>>,
    health_timeout: Option<Spanned<String>>,
    health_failures: Option<Spanned<i64>>,
}

/// Every key an app file accepts (kept in step with the reference docs by a test).
pub const KEYS: [&str; 29] = [
    "command",
    "workers",
    "listen",
    "routing",
    "port_range",
    "ready",
    "ready_timeout",
    "working_directory",
    "user",
    "environment",
    "stop_signal",
    "stop_timeout",
    "retire_signal",
    "retire_nice",
    "autostart",
    "worker_memory_max",
    "cluster_memory_max",
    "retire_rate",
    "retire_timeout",
    "reap_interval",
    "spawn_interval",
    "watchdog",
    "restart_backoff",
    "session_affinity",
    "max_draining",
    "health_path",
    "health_interval",
    "health_timeout",
    "health_failures",
];

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, key: &str, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            location: span.map(|s| line_col(self.text, s.start)),
            key: Some(clean(key, 64)),
            message: clean(&message.into(), MAX_MESSAGE),
        }
    }
}

/// Longest message of a [`ConfigError`], in characters (an unknown key's lists every key).
pub const MAX_MESSAGE: usize = 600;

/// `text` safe to print: control characters escaped (`\u{7}`), at most `max` characters of it
/// (escapes counted as printed), then `…` when something was cut. The TOML parser's messages
/// quote keys and values of the file as they are.
fn clean(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut n = 0;
    for c in text.chars() {
        let shown: Vec<char> = if c.is_control() { c.escape_debug().collect() } else { vec![c] };
        if n + shown.len() > max {
            out.push('…');
            break;
        }
        n += shown.len();
        out.extend(shown);
    }
    out
}

/// The TOML parser's message, printable and bounded; an unknown key's (which quotes the key
/// as it is, however long) says which key, cut, and lists the keys there are.
pub(crate) fn toml_message(message: &str, keys: &[&str]) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((key, _)) = rest.split_once('`')
    {
        return clean(
            &format!("unknown key `{}`; the keys are {}", clean(key, 64), keys.join(", ")),
            MAX_MESSAGE,
        );
    }
    clean(message, MAX_MESSAGE)
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl AppConfig {
    /// An app with `command`, `workers` and `listen`, and every other key at its default.
    pub fn with_defaults(name: AppName, command: Vec<String>, workers: u32, listen: Vec<SocketAddr>) -> Self {
        AppConfig {
            name,
            command,
            workers,
            listen,
            routing: Routing::Nat,
            port_range: defaults::PORT_RANGE,
            ready: Ready::Tcp,
            ready_timeout: defaults::READY_TIMEOUT,
            working_directory: PathBuf::from(defaults::WORKING_DIRECTORY),
            user: None,
            environment: BTreeMap::new(),
            stop_signal: defaults::STOP_SIGNAL,
            stop_timeout: defaults::STOP_TIMEOUT,
            retire_signal: None,
            retire_nice: defaults::RETIRE_NICE,
            autostart: true,
            worker_memory_max: None,
            cluster_memory_max: None,
            retire_rate: defaults::RETIRE_RATE,
            retire_timeout: None,
            reap_interval: Duration::ZERO,
            spawn_interval: Duration::ZERO,
            watchdog: None,
            restart_backoff: defaults::RESTART_BACKOFF,
            session_affinity: None,
            max_draining: defaults::MAX_DRAINING,
            health: None,
        }
    }

    /// The settings used for workers adopted after a restart when their app file is gone or
    /// invalid: the defaults, with the shape reality tells (bands and public addresses), and no
    /// autostart. Such an app cannot deploy until its file is valid again, but its workers are
    /// still managed.
    pub fn fallback(name: AppName, workers: u32, listen: Vec<SocketAddr>) -> Self {
        AppConfig { autostart: false, ..Self::with_defaults(name, Vec::new(), workers, listen) }
    }

    /// Parses the app file `file` (for messages; its stem is the app name) with contents `text`.
    pub fn parse(file: &str, name: &str, text: &str) -> Result<Self, ConfigError> {
        let name = AppName::new(name).map_err(|e| ConfigError {
            file: file.to_owned(),
            location: None,
            key: None,
            message: format!("the file name gives the app name: {e}"),
        })?;
        let raw: Raw = toml::from_str(text).map_err(|e| {
            // A key the file lacks is on no line: the error names it, not the key on line 1.
            if let Some((missing, _)) =
                e.message().strip_prefix("missing field `").and_then(|r| r.split_once('`'))
            {
                let (key, message) = (Some(clean(missing, 64)), toml_message(e.message(), &KEYS));
                return ConfigError { file: file.to_owned(), location: None, key, message };
            }
            let location = e.span().map(|s| line_col(text, s.start));
            // The key is the text before '=' on the line the error points at, when there is one.
            let key = location
                .and_then(|(line, _)| text.lines().nth(line - 1))
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| clean(k.trim(), 64))
                .filter(|k| !k.is_empty() && !k.contains(char::is_whitespace));
            ConfigError { file: file.to_owned(), location, key, message: toml_message(e.message(), &KEYS) }
        })?;
        let cx = Ctx { file, text };
        let span = |s: &Option<Spanned<_>>| s.as_ref().map(|s: &Spanned<_>| s.span());

        let workers = match &raw.workers {
            None => defaults::WORKERS,
            Some(w) => check_workers(*w.get_ref()).map_err(|m| cx.err("workers", Some(w.span()), m))?,
        };
        let command = check_command(raw.command.get_ref())
            .map_err(|m| cx.err("command", Some(raw.command.span()), m))?;
        let listen =
            check_listen(raw.listen.get_ref()).map_err(|m| cx.err("listen", Some(raw.listen.span()), m))?;
        let mut c = AppConfig::with_defaults(name, command, workers, listen);

        if let Some(r) = &raw.port_range {
            c.port_range =
                parse_port_range(r.get_ref()).map_err(|m| cx.err("port_range", Some(r.span()), m))?;
        }
        c.routing = match raw.routing.as_ref().map(|r| r.get_ref().as_str()) {
            None | Some("nat") => Routing::Nat,
            Some("socket") => Routing::Socket,
            Some(other) => {
                return Err(cx.err(
                    "routing",
                    span(&raw.routing),
                    format!("{}: must be \"nat\" or \"socket\"", crate::units::shown(other)),
                ));
            }
        };
        c.ready = match (raw.ready.as_ref().map(|r| r.get_ref().as_str()), c.routing) {
            (None, Routing::Socket) | (Some("notify"), _) => Ready::Notify,
            (Some("http"), _) => Ready::Http,
            (None | Some("tcp"), Routing::Nat) => Ready::Tcp,
            (Some("tcp"), Routing::Socket) => {
                return Err(cx.err(
                    "ready",
                    span(&raw.ready),
                    "\"tcp\" cannot tell when a worker of routing = \"socket\" is ready: it listens on the sockets the daemon hands it, not on a port of its own; use ready = \"notify\" (send READY=1 to $NOTIFY_SOCKET)",
                ));
            }
            (Some(other), _) => {
                return Err(cx.err(
                    "ready",
                    span(&raw.ready),
                    format!("{}: must be \"tcp\", \"notify\" or \"http\"", crate::units::shown(other)),
                ));
            }
        };
        let duration = |v: &Option<Spanned<String>>, key: &str, default: Duration, min: Duration| {
            let Some(v) = v else { return Ok(default) };
            let d = parse_duration(v.get_ref()).map_err(|m| cx.err(key, Some(v.span()), m))?;
            if d < min {
                return Err(cx.err(key, Some(v.span()), format!("must be at least {min:?}")));
            }
            Ok(d)
        };
        c.ready_timeout =
            duration(&raw.ready_timeout, "ready_timeout", c.ready_timeout, Duration::from_millis(1))?;
        c.stop_timeout = duration(&raw.stop_timeout, "stop_timeout", c.stop_timeout, Duration::ZERO)?;
        if let Some(d) = &raw.working_directory {
            c.working_directory =
                check_workdir(d.get_ref()).map_err(|m| cx.err("working_directory", Some(d.span()), m))?;
        }
        if let Some(u) = &raw.user {
            c.user = Some(check_user(u.get_ref()).map_err(|m| cx.err("user", Some(u.span()), m))?);
        }
        if let Some(e) = &raw.environment {
            check_environment(e.get_ref()).map_err(|m| cx.err("environment", Some(e.span()), m))?;
            c.environment = e.get_ref().clone();
        }
        let signal = |v: &Option<Spanned<String>>, key: &str| {
            v.as_ref()
                .map(|s| Signal::parse(s.get_ref()).map_err(|m| cx.err(key, Some(s.span()), m)))
                .transpose()
        };
        if let Some(s) = signal(&raw.stop_signal, "stop_signal")? {
            c.stop_signal = s;
        }
        c.retire_signal = signal(&raw.retire_signal, "retire_signal")?;
        if let Some(n) = &raw.retire_nice {
            if !(0..=19).contains(n.get_ref()) {
                return Err(cx.err(
                    "retire_nice",
                    Some(n.span()),
                    format!("{}: must be 0..=19", n.get_ref()),
                ));
            }
            c.retire_nice = *n.get_ref() as i32;
        }
        if let Some(a) = &raw.autostart {
            c.autostart = *a.get_ref();
        }
        let size = |v: &Option<Spanned<String>>, key: &str| {
            v.as_ref()
                .map(|x| match parse_size(x.get_ref()) {
                    Ok(0) => Err(cx.err(key, Some(x.span()), "must be more than 0")),
                    Ok(n) => Ok(n),
                    Err(m) => Err(cx.err(key, Some(x.span()), m)),
                })
                .transpose()
        };
        c.worker_memory_max = size(&raw.worker_memory_max, "worker_memory_max")?;
        c.cluster_memory_max = size(&raw.cluster_memory_max, "cluster_memory_max")?;
        if let Some(r) = &raw.retire_rate {
            c.retire_rate = parse_rate(r.get_ref()).map_err(|m| cx.err("retire_rate", Some(r.span()), m))?;
        }
        let optional = |v: &Option<Spanned<String>>, key: &str| {
            v.as_ref()
                .map(|x| match parse_duration(x.get_ref()) {
                    Ok(d) if d.is_zero() => Err(cx.err(key, Some(x.span()), "must be more than 0")),
                    Ok(d) => Ok(d),
                    Err(m) => Err(cx.err(key, Some(x.span()), m)),
                })
                .transpose()
        };
        c.retire_timeout = optional(&raw.retire_timeout, "retire_timeout")?;
        c.watchdog = optional(&raw.watchdog, "watchdog")?;
        if let (Some(_), Some(w)) = (c.watchdog, &raw.watchdog)
            && !c.ready.notifies(c.routing)
        {
            return Err(cx.err(
                "watchdog",
                Some(w.span()),
                "needs ready = \"notify\" (WATCHDOG=1 is an sd_notify message)",
            ));
        }
        c.reap_interval = duration(&raw.reap_interval, "reap_interval", c.reap_interval, Duration::ZERO)?;
        c.spawn_interval = duration(&raw.spawn_interval, "spawn_interval", c.spawn_interval, Duration::ZERO)?;
        if let Some(r) = &raw.restart_backoff {
            c.restart_backoff = parse_duration_range(r.get_ref())
                .map_err(|m| cx.err("restart_backoff", Some(r.span()), m))?;
        }
        if let Some(s) = &raw.session_affinity {
            let d = parse_duration(s.get_ref()).map_err(|m| cx.err("session_affinity", Some(s.span()), m))?;
            let max = defaults::MAX_SESSION_AFFINITY;
            c.session_affinity = match d {
                d if d.is_zero() => None,
                d if d > max => {
                    return Err(cx.err(
                        "session_affinity",
                        Some(s.span()),
                        format!("must be at most {}h", max.as_secs() / 3600),
                    ));
                }
                d if d < Duration::from_secs(1) => {
                    return Err(cx.err(
                        "session_affinity",
                        Some(s.span()),
                        "must be at least 1s (or \"0\": off)",
                    ));
                }
                // Records expire in whole seconds (ipset's timeouts): a fraction counts as a second.
                d => Some(Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0))),
            };
        }
        if let Some(n) = &raw.max_draining {
            let limit = i64::from(defaults::MAX_DRAINING_LIMIT);
            if !(1..=limit).contains(n.get_ref()) {
                return Err(cx.err(
                    "max_draining",
                    Some(n.span()),
                    format!("{}: must be 1..={limit}", n.get_ref()),
                ));
            }
            c.max_draining = *n.get_ref() as u32;
        }
        let raw_health = health::RawHealth {
            path: &raw.health_path,
            interval: &raw.health_interval,
            timeout: &raw.health_timeout,
            failures: &raw.health_failures,
        };
        health::parse(&cx, raw_health, raw.ready.as_ref(), &mut c)?;
        c.check_ports().map_err(|(key, m)| {
            let sp = if key == "port_range" { span(&raw.port_range) } else { Some(raw.listen.span()) };
            cx.err(key, sp, m)
        })?;
        Ok(c)
    }

    /// How many generations may hold worker ports at once: one deploying while the live one
    /// serves, and with session affinity up to `max_draining` more that still keep clients.
    pub fn generations_held(&self) -> u32 {
        2 + if self.session_affinity.is_some() { self.max_draining } else { 0 }
    }

    /// Cross-key checks: public ports outside the worker port range, and a range wide enough for
    /// every generation that may hold ports at once ([`Self::generations_held`]).
    fn check_ports(&self) -> Result<(), (&'static str, String)> {
        let (lo, hi) = self.port_range;
        if let Some(l) = self.listen.iter().find(|l| (lo..=hi).contains(&l.port())) {
            return Err(("listen", format!("public port {} lies inside port_range {lo}-{hi}", l.port())));
        }
        if self.routing == Routing::Socket {
            return Ok(());
        }
        let generations = self.generations_held();
        let needed = u64::from(generations) * u64::from(self.workers) * self.listen.len() as u64;
        let have = u64::from(hi - lo) + 1;
        if have < needed {
            let why = if self.session_affinity.is_some() {
                format!(
                    "{generations} generations: one deploying, the live one and max_draining = {} draining",
                    self.max_draining
                )
            } else {
                "two generations".to_owned()
            };
            return Err((
                "port_range",
                format!(
                    "{lo}-{hi} holds {have} ports; {} workers × {} listen entries need at least {needed} ({why})",
                    self.workers,
                    self.listen.len()
                ),
            ));
        }
        Ok(())
    }
}
