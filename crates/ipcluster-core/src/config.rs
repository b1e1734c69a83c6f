//! App files: `/etc/ipcluster/apps/<app>.toml`, parsed and validated into [`AppConfig`].
//!
//! Every error names the file, the line and column, the key, and what is allowed. Parsing is pure:
//! the caller reads the file and passes its text.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    ops::Range,
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

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

/// How a worker tells that it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Ready when `127.0.0.1:<port>` accepts for each of its ports.
    Tcp,
    /// Ready after it sends `READY=1` on `NOTIFY_SOCKET`.
    Notify,
}

/// A validated app.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    pub name: AppName,
    pub command: Vec<String>,
    pub workers: u32,
    pub listen: Vec<SocketAddrV4>,
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
}

/// Every key an app file accepts (kept in step with the reference docs by a test).
pub const KEYS: [&str; 22] = [
    "command",
    "workers",
    "listen",
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
            key: Some(key.to_owned()),
            message: message.into(),
        }
    }
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl AppConfig {
    /// Parses the app file `file` (for messages; its stem is the app name) with contents `text`.
    pub fn parse(file: &str, name: &str, text: &str) -> Result<Self, ConfigError> {
        let name = AppName::new(name).map_err(|e| ConfigError {
            file: file.to_owned(),
            location: None,
            key: None,
            message: format!("the file name gives the app name: {e}"),
        })?;
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let location = e.span().map(|s| line_col(text, s.start));
            // The key is the text before '=' on the line the error points at, when there is one.
            let key = location
                .and_then(|(line, _)| text.lines().nth(line - 1))
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim().to_owned())
                .filter(|k| !k.is_empty() && !k.contains(char::is_whitespace));
            ConfigError { file: file.to_owned(), location, key, message: e.message().trim().to_owned() }
        })?;
        let cx = Ctx { file, text };
        let span = |s: &Option<Spanned<_>>| s.as_ref().map(|s: &Spanned<_>| s.span());

        let workers = match &raw.workers {
            None => 4,
            Some(w) => check_workers(*w.get_ref()).map_err(|m| cx.err("workers", Some(w.span()), m))?,
        };
        let command = check_command(raw.command.get_ref())
            .map_err(|m| cx.err("command", Some(raw.command.span()), m))?;
        let listen =
            check_listen(raw.listen.get_ref()).map_err(|m| cx.err("listen", Some(raw.listen.span()), m))?;
        let port_range = match &raw.port_range {
            None => (20000, 39999),
            Some(r) => parse_port_range(r.get_ref()).map_err(|m| cx.err("port_range", Some(r.span()), m))?,
        };
        let ready = match raw.ready.as_ref().map(|r| r.get_ref().as_str()) {
            None | Some("tcp") => Ready::Tcp,
            Some("notify") => Ready::Notify,
            Some(other) => {
                return Err(cx.err(
                    "ready",
                    span(&raw.ready),
                    format!("{other:?}: must be \"tcp\" or \"notify\""),
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
        let ready_timeout =
            duration(&raw.ready_timeout, "ready_timeout", Duration::from_secs(30), Duration::from_millis(1))?;
        let stop_timeout =
            duration(&raw.stop_timeout, "stop_timeout", Duration::from_secs(5), Duration::ZERO)?;
        let working_directory = match &raw.working_directory {
            None => PathBuf::from("/"),
            Some(d) => {
                check_workdir(d.get_ref()).map_err(|m| cx.err("working_directory", Some(d.span()), m))?
            }
        };
        let user = match &raw.user {
            None => None,
            Some(u) => Some(check_user(u.get_ref()).map_err(|m| cx.err("user", Some(u.span()), m))?),
        };
        let environment = match &raw.environment {
            None => BTreeMap::new(),
            Some(e) => {
                check_environment(e.get_ref()).map_err(|m| cx.err("environment", Some(e.span()), m))?;
                e.get_ref().clone()
            }
        };
        let signal = |v: &Option<Spanned<String>>, key: &str| {
            v.as_ref()
                .map(|s| Signal::parse(s.get_ref()).map_err(|m| cx.err(key, Some(s.span()), m)))
                .transpose()
        };
        let stop_signal = signal(&raw.stop_signal, "stop_signal")?.unwrap_or(Signal::Term);
        let retire_signal = signal(&raw.retire_signal, "retire_signal")?;
        let retire_nice = match &raw.retire_nice {
            None => 5,
            Some(n) if (0..=19).contains(n.get_ref()) => *n.get_ref() as i32,
            Some(n) => {
                return Err(cx.err(
                    "retire_nice",
                    Some(n.span()),
                    format!("{}: must be 0..=19", n.get_ref()),
                ));
            }
        };
        let autostart = raw.autostart.as_ref().is_none_or(|a| *a.get_ref());
        let size = |v: &Option<Spanned<String>>, key: &str| {
            v.as_ref()
                .map(|x| match parse_size(x.get_ref()) {
                    Ok(0) => Err(cx.err(key, Some(x.span()), "must be more than 0")),
                    Ok(n) => Ok(n),
                    Err(m) => Err(cx.err(key, Some(x.span()), m)),
                })
                .transpose()
        };
        let worker_memory_max = size(&raw.worker_memory_max, "worker_memory_max")?;
        let cluster_memory_max = size(&raw.cluster_memory_max, "cluster_memory_max")?;
        let retire_rate = match &raw.retire_rate {
            None => (10, Duration::from_secs(120)),
            Some(r) => parse_rate(r.get_ref()).map_err(|m| cx.err("retire_rate", Some(r.span()), m))?,
        };
        let optional = |v: &Option<Spanned<String>>, key: &str| {
            v.as_ref()
                .map(|x| match parse_duration(x.get_ref()) {
                    Ok(d) if d.is_zero() => Err(cx.err(key, Some(x.span()), "must be more than 0")),
                    Ok(d) => Ok(d),
                    Err(m) => Err(cx.err(key, Some(x.span()), m)),
                })
                .transpose()
        };
        let retire_timeout = optional(&raw.retire_timeout, "retire_timeout")?;
        let watchdog = optional(&raw.watchdog, "watchdog")?;
        if let (Some(_), Some(w)) = (watchdog, &raw.watchdog)
            && ready != Ready::Notify
        {
            return Err(cx.err(
                "watchdog",
                Some(w.span()),
                "needs ready = \"notify\" (WATCHDOG=1 is an sd_notify message)",
            ));
        }
        let reap_interval = duration(&raw.reap_interval, "reap_interval", Duration::ZERO, Duration::ZERO)?;
        let spawn_interval = duration(&raw.spawn_interval, "spawn_interval", Duration::ZERO, Duration::ZERO)?;
        let restart_backoff = match &raw.restart_backoff {
            None => (Duration::from_millis(100), Duration::from_secs(30)),
            Some(r) => {
                parse_duration_range(r.get_ref()).map_err(|m| cx.err("restart_backoff", Some(r.span()), m))?
            }
        };

        let config = AppConfig {
            name,
            command,
            workers,
            listen,
            port_range,
            ready,
            ready_timeout,
            working_directory,
            user,
            environment,
            stop_signal,
            stop_timeout,
            retire_signal,
            retire_nice,
            autostart,
            worker_memory_max,
            cluster_memory_max,
            retire_rate,
            retire_timeout,
            reap_interval,
            spawn_interval,
            watchdog,
            restart_backoff,
        };
        config.check_ports().map_err(|(key, m)| {
            let sp = if key == "port_range" { span(&raw.port_range) } else { Some(raw.listen.span()) };
            cx.err(key, sp, m)
        })?;
        Ok(config)
    }

    /// The settings used for workers adopted after a restart when their app file is gone or
    /// invalid: the defaults, with the shape reality tells (bands and public addresses). Such an
    /// app cannot deploy until its file is valid again, but its workers are still managed.
    pub fn fallback(name: AppName, workers: u32, listen: Vec<SocketAddrV4>) -> Self {
        AppConfig {
            name,
            command: Vec::new(),
            workers,
            listen,
            port_range: (20000, 39999),
            ready: Ready::Tcp,
            ready_timeout: Duration::from_secs(30),
            working_directory: PathBuf::from("/"),
            user: None,
            environment: BTreeMap::new(),
            stop_signal: Signal::Term,
            stop_timeout: Duration::from_secs(5),
            retire_signal: None,
            retire_nice: 5,
            autostart: false,
            worker_memory_max: None,
            cluster_memory_max: None,
            retire_rate: (10, Duration::from_secs(120)),
            retire_timeout: None,
            reap_interval: Duration::ZERO,
            spawn_interval: Duration::ZERO,
            watchdog: None,
            restart_backoff: (Duration::from_millis(100), Duration::from_secs(30)),
        }
    }

    /// Cross-key checks: public ports outside the worker port range, and a range wide enough for
    /// two generations (one deploying while the previous still holds its ports).
    fn check_ports(&self) -> Result<(), (&'static str, String)> {
        let (lo, hi) = self.port_range;
        if let Some(l) = self.listen.iter().find(|l| (lo..=hi).contains(&l.port())) {
            return Err(("listen", format!("public port {} lies inside port_range {lo}-{hi}", l.port())));
        }
        let needed = 2 * u64::from(self.workers) * self.listen.len() as u64;
        let have = u64::from(hi - lo) + 1;
        if have < needed {
            return Err((
                "port_range",
                format!(
                    "{lo}-{hi} holds {have} ports; {} workers × {} listen entries need at least {needed} (two generations)",
                    self.workers,
                    self.listen.len()
                ),
            ));
        }
        Ok(())
    }

    /// Applies Deploy overrides (already type-checked by the caller) and validates the result.
    pub fn with_overrides(&self, o: &Overrides) -> Result<Self, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: "Deploy options".into(),
            location: None,
            key: Some(key.into()),
            message,
        };
        let mut c = self.clone();
        if let Some(w) = o.workers {
            c.workers = check_workers(i64::from(w)).map_err(|m| err("workers", m))?;
        }
        if let Some(cmd) = &o.command {
            c.command = check_command(cmd).map_err(|m| err("command", m))?;
        }
        if let Some(env) = &o.environment {
            if env.len() > MAX_ENV {
                return Err(err("environment", format!("at most {MAX_ENV} entries")));
            }
            let mut extra = BTreeMap::new();
            for kv in env {
                let (k, v) =
                    kv.split_once('=').ok_or_else(|| err("environment", format!("{kv:?} is not K=V")))?;
                extra.insert(k.to_owned(), v.to_owned());
            }
            check_environment(&extra).map_err(|m| err("environment", m))?;
            c.environment.extend(extra);
        }
        if let Some(d) = &o.working_directory {
            c.working_directory = check_workdir(d).map_err(|m| err("working_directory", m))?;
        }
        c.check_ports().map_err(|(k, m)| err(k, m))?;
        Ok(c)
    }
}

/// The daemon's own settings: `/etc/ipcluster/ipclusterd.toml` (optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// How often workers' RSS, CPU and connections are sampled (and memory and watchdog
    /// policies applied).
    pub sample_interval: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self { sample_interval: Duration::from_secs(1) }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    sample_interval: Option<Spanned<String>>,
}

/// Keys of the daemon's file (kept in step with the reference docs by a test).
pub const DAEMON_KEYS: [&str; 1] = ["sample_interval"];

impl DaemonConfig {
    /// Parses the daemon's file `file` with contents `text`.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let raw: RawDaemon = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            location: e.span().map(|s| line_col(text, s.start)),
            key: None,
            message: e.message().trim().to_owned(),
        })?;
        let cx = Ctx { file, text };
        let mut c = DaemonConfig::default();
        if let Some(v) = &raw.sample_interval {
            let d = parse_duration(v.get_ref()).map_err(|m| cx.err("sample_interval", Some(v.span()), m))?;
            if d < Duration::from_millis(100) {
                return Err(cx.err("sample_interval", Some(v.span()), "must be at least 100ms"));
            }
            c.sample_interval = d;
        }
        Ok(c)
    }
}

/// Per-generation overrides of a Deploy call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub workers: Option<u32>,
    pub command: Option<Vec<String>>,
    pub environment: Option<Vec<String>>,
    pub working_directory: Option<String>,
}

fn check_workers(w: i64) -> Result<u32, String> {
    match u32::try_from(w) {
        Ok(w) if (1..=MAX_WORKERS).contains(&w) && w.is_power_of_two() => Ok(w),
        _ => Err(format!("{w}: must be a power of two (1, 2, 4, …, {MAX_WORKERS})")),
    }
}

fn check_command(cmd: &[String]) -> Result<Vec<String>, String> {
    if cmd.is_empty() || cmd[0].is_empty() {
        return Err("must name a program: [\"/usr/bin/prog\", \"arg\", …]".into());
    }
    if cmd.len() > MAX_ARGS {
        return Err(format!("at most {MAX_ARGS} arguments"));
    }
    if let Some(a) = cmd.iter().find(|a| a.len() > MAX_ARG_LEN || a.contains('\0')) {
        return Err(format!(
            "argument {:?}…: arguments must be at most {MAX_ARG_LEN} bytes, without NUL",
            a.chars().take(32).collect::<String>()
        ));
    }
    Ok(cmd.to_vec())
}

fn check_listen(list: &[String]) -> Result<Vec<SocketAddrV4>, String> {
    if list.is_empty() || list.len() > MAX_LISTEN {
        return Err(format!("needs 1 to {MAX_LISTEN} addresses like \"0.0.0.0:80\""));
    }
    let mut out: Vec<SocketAddrV4> = Vec::new();
    for l in list {
        let a: SocketAddrV4 = l
            .parse()
            .map_err(|_| format!("{l:?} is not \"ipv4:port\" (e.g. \"0.0.0.0:80\", \"192.0.2.1:443\")"))?;
        if a.port() == 0 {
            return Err(format!("{l:?}: port must be 1..=65535"));
        }
        if let Some(prev) = out.iter().find(|p| {
            p.port() == a.port()
                && (p.ip() == a.ip() || *p.ip() == Ipv4Addr::UNSPECIFIED || *a.ip() == Ipv4Addr::UNSPECIFIED)
        }) {
            return Err(format!("{l:?} overlaps {prev}"));
        }
        out.push(a);
    }
    Ok(out)
}

fn check_workdir(d: &str) -> Result<PathBuf, String> {
    if !d.starts_with('/') || d.contains('\0') || d.len() > MAX_ARG_LEN {
        return Err(format!("{:?}: must be an absolute path", d.chars().take(64).collect::<String>()));
    }
    Ok(PathBuf::from(d))
}

fn check_user(u: &str) -> Result<String, String> {
    let ok = !u.is_empty()
        && u.len() <= 32
        && u.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && u.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok { Ok(u.to_owned()) } else { Err(format!("{u:?} is not a user name ([a-z_][a-z0-9_-]*, ≤ 32)")) }
}

/// Variables ipclusterd sets itself; an app may not override them.
fn reserved(k: &str) -> bool {
    k.starts_with("IPCLUSTER_")
        || k.starts_with("WATCHDOG_")
        || k.starts_with("LISTEN_")
        || matches!(k, "PORT" | "NOTIFY_SOCKET" | "INVOCATION_ID")
}

fn check_environment(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV {
        return Err(format!("at most {MAX_ENV} entries"));
    }
    let mut seen = HashSet::new();
    for (k, v) in env {
        let valid = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && k.len() <= 128;
        if !valid {
            return Err(format!(
                "{:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)",
                k.chars().take(64).collect::<String>()
            ));
        }
        if reserved(k) {
            return Err(format!("{k} is set by ipclusterd and cannot be overridden"));
        }
        if v.contains('\0') || v.len() > MAX_ARG_LEN {
            return Err(format!("{k}: value must be at most {MAX_ARG_LEN} bytes, without NUL"));
        }
        seen.insert(k);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AppConfig, ConfigError> {
        AppConfig::parse("/etc/ipcluster/apps/chat.toml", "chat", text)
    }

    const MIN: &str = "command = [\"/usr/bin/srv\"]\nlisten = [\"0.0.0.0:80\"]\n";

    #[test]
    fn defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.name.as_str(), "chat");
        assert_eq!(c.workers, 4);
        assert_eq!(c.port_range, (20000, 39999));
        assert_eq!(c.ready, Ready::Tcp);
        assert_eq!(c.ready_timeout, Duration::from_secs(30));
        assert_eq!(c.working_directory, PathBuf::from("/"));
        assert_eq!(c.user, None);
        assert_eq!(c.stop_signal, Signal::Term);
        assert_eq!(c.stop_timeout, Duration::from_secs(5));
        assert_eq!(c.retire_signal, None);
        assert_eq!(c.retire_nice, 5);
        assert!(c.autostart);
        assert_eq!(
            (c.worker_memory_max, c.cluster_memory_max, c.retire_timeout, c.watchdog),
            (None, None, None, None)
        );
        assert_eq!(c.retire_rate, (10, Duration::from_secs(120)));
        assert_eq!((c.reap_interval, c.spawn_interval), (Duration::ZERO, Duration::ZERO));
        assert_eq!(c.restart_backoff, (Duration::from_millis(100), Duration::from_secs(30)));
    }

    #[test]
    fn every_key() {
        let c = parse(
            r#"
command = ["/usr/bin/srv", "--flag"]
workers = 8
listen = ["0.0.0.0:80", "127.0.0.1:8443"]
port_range = "30000-30100"
ready = "notify"
ready_timeout = "2min"
working_directory = "/srv"
user = "www-data"
environment = { MODE = "prod" }
stop_signal = "SIGINT"
stop_timeout = "10s"
retire_signal = "USR2"
retire_nice = 10
autostart = false
worker_memory_max = "448M"
cluster_memory_max = "2G"
retire_rate = "5/1min"
retire_timeout = "1h"
reap_interval = "500ms"
spawn_interval = "100ms"
watchdog = "10s"
restart_backoff = "1s-1min"
"#,
        )
        .unwrap();
        assert_eq!(c.workers, 8);
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.ready, Ready::Notify);
        assert_eq!(c.user.as_deref(), Some("www-data"));
        assert_eq!(c.environment["MODE"], "prod");
        assert_eq!(c.stop_signal, Signal::Int);
        assert_eq!(c.retire_signal, Some(Signal::Usr2));
        assert_eq!(c.retire_nice, 10);
        assert!(!c.autostart);
        assert_eq!(c.worker_memory_max, Some(448 << 20));
        assert_eq!(c.cluster_memory_max, Some(2 << 30));
        assert_eq!(c.retire_rate, (5, Duration::from_secs(60)));
        assert_eq!(c.retire_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(
            (c.reap_interval, c.spawn_interval),
            (Duration::from_millis(500), Duration::from_millis(100))
        );
        assert_eq!(c.watchdog, Some(Duration::from_secs(10)));
        assert_eq!(c.restart_backoff, (Duration::from_secs(1), Duration::from_secs(60)));
    }

    /// KEYS (which the docs test checks against the reference) is exactly what the parser takes.
    #[test]
    fn keys_lists_every_accepted_key() {
        for key in KEYS {
            let text = format!("{MIN}{key} = 0\n");
            if key == "command" || key == "listen" {
                continue;
            }
            if let Err(e) = parse(&text) {
                assert!(!e.message.contains("unknown field"), "{key} is in KEYS but not accepted: {e}");
            }
        }
        let e = parse(&format!("{MIN}nonsense = 0\n")).unwrap_err();
        for key in KEYS {
            assert!(e.message.contains(&format!("`{key}`")), "parser knows a key KEYS lacks? {e}");
        }
    }

    /// Each bad file is rejected with the key, its line, and what is allowed.
    #[test]
    fn errors_name_file_line_key_and_allowed_values() {
        let cases: &[(&str, &str, (usize, usize), &str)] = &[
            ("workers = 6\n", "workers", (3, 11), "power of two"),
            ("workers = 0\n", "workers", (3, 11), "power of two"),
            ("workers = 2048\n", "workers", (3, 11), "1024"),
            ("workers = \"4\"\n", "workers", (3, 11), "invalid type"),
            ("ready = \"http\"\n", "ready", (3, 9), "\"tcp\" or \"notify\""),
            ("ready_timeout = \"soon\"\n", "ready_timeout", (3, 17), "not a duration"),
            ("port_range = \"10-20\"\n", "port_range", (3, 14), "lo-hi"),
            ("port_range = \"20000-20001\"\n", "port_range", (3, 14), "need at least 8"),
            ("stop_signal = \"SIGFOO\"\n", "stop_signal", (3, 15), "SIGTERM"),
            ("retire_nice = 20\n", "retire_nice", (3, 15), "0..=19"),
            ("user = \"root;rm\"\n", "user", (3, 8), "not a user name"),
            ("working_directory = \"srv\"\n", "working_directory", (3, 21), "absolute"),
            ("environment = { PORT = \"1\" }\n", "environment", (3, 15), "set by ipclusterd"),
            ("environment = { \"A-B\" = \"1\" }\n", "environment", (3, 15), "variable name"),
            ("colour = \"blue\"\n", "colour", (3, 1), "unknown field"),
            ("autostart = \"yes\"\n", "autostart", (3, 13), "invalid type"),
            ("worker_memory_max = \"lots\"\n", "worker_memory_max", (3, 21), "M = MiB"),
            ("cluster_memory_max = \"0\"\n", "cluster_memory_max", (3, 22), "more than 0"),
            ("retire_rate = \"10\"\n", "retire_rate", (3, 15), "N/duration"),
            ("retire_timeout = \"0\"\n", "retire_timeout", (3, 18), "more than 0"),
            ("reap_interval = \"x\"\n", "reap_interval", (3, 17), "not a duration"),
            ("watchdog = \"10s\"\n", "watchdog", (3, 12), "needs ready = \"notify\""),
            ("restart_backoff = \"30s-1s\"\n", "restart_backoff", (3, 19), "min-max"),
        ];
        for (extra, key, loc, allowed) in cases {
            let e = parse(&format!("{MIN}{extra}")).expect_err(extra);
            assert_eq!(e.key.as_deref(), Some(*key), "{extra}: {e}");
            assert_eq!(e.location, Some(*loc), "{extra}: {e}");
            assert!(e.message.contains(allowed), "{extra}: {e}");
            assert!(e.to_string().starts_with("/etc/ipcluster/apps/chat.toml:3:"), "{e}");
        }
    }

    #[test]
    fn listen_and_command_errors() {
        let bad = [
            ("command = []\nlisten = [\"0.0.0.0:80\"]\n", "command"),
            ("command = [\"/x\"]\nlisten = []\n", "listen"),
            ("command = [\"/x\"]\nlisten = [\"localhost:80\"]\n", "listen"),
            ("command = [\"/x\"]\nlisten = [\"0.0.0.0:0\"]\n", "listen"),
            ("command = [\"/x\"]\nlisten = [\"0.0.0.0:80\", \"127.0.0.1:80\"]\n", "listen"),
            ("command = [\"/x\"]\nlisten = [\"0.0.0.0:20001\"]\n", "listen"),
            ("command = [\"/x\"]\n", "listen"),
        ];
        for (text, key) in bad {
            let e = parse(text).expect_err(text);
            assert!(e.key.as_deref() == Some(key) || e.message.contains(key), "{text}: {e}");
        }
        let e = AppConfig::parse("x/../A.toml", "../A", MIN).unwrap_err();
        assert!(e.message.contains("app name"), "{e}");
    }

    #[test]
    fn daemon_file() {
        assert_eq!(DaemonConfig::parse("d", "").unwrap(), DaemonConfig::default());
        assert_eq!(
            DaemonConfig::parse("d", "sample_interval = \"250ms\"\n").unwrap().sample_interval,
            Duration::from_millis(250)
        );
        let e = DaemonConfig::parse("/etc/ipcluster/ipclusterd.toml", "sample_interval = \"10ms\"\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/ipcluster/ipclusterd.toml:1:19: sample_interval: must be at least 100ms"
        );
        assert!(DaemonConfig::parse("d", "samples = 1\n").unwrap_err().message.contains("unknown field"));
    }

    #[test]
    fn overrides() {
        let c = parse(MIN).unwrap();
        let o = Overrides {
            workers: Some(2),
            command: Some(vec!["/bin/other".into()]),
            environment: Some(vec!["A=1".into(), "B=x=y".into()]),
            working_directory: Some("/tmp".into()),
        };
        let d = c.with_overrides(&o).unwrap();
        assert_eq!(d.workers, 2);
        assert_eq!(d.command, ["/bin/other"]);
        assert_eq!(d.environment["B"], "x=y");
        assert_eq!(d.working_directory, PathBuf::from("/tmp"));
        for bad in [
            Overrides { workers: Some(3), ..Default::default() },
            Overrides { command: Some(vec![]), ..Default::default() },
            Overrides { environment: Some(vec!["NOEQUALS".into()]), ..Default::default() },
            Overrides { environment: Some(vec!["IPCLUSTER_BAND=1".into()]), ..Default::default() },
            Overrides { working_directory: Some("relative".into()), ..Default::default() },
            Overrides { command: Some(vec!["a\0b".into()]), ..Default::default() },
        ] {
            let e = c.with_overrides(&bad).unwrap_err();
            assert_eq!(e.file, "Deploy options", "{e}");
        }
    }
}
