//! Generations and workers: their states, the legal transitions, and the names and environment
//! that identify them outside the daemon (unit names, `IPCLUSTER_*` variables).

use std::{fmt, net::SocketAddr};

use crate::{
    config::{AppConfig, Routing},
    name::AppName,
};

/// State of a generation: `starting → live → retired → stopped`, or `starting → failed`; a
/// rollback makes a retired generation live again. With session affinity a generation that
/// leaves `live` is `draining` while clients still stick to it: then `stopped` once drained, or
/// `retired` when its sessions are cut (more than `max_draining`, RetireGeneration). A canary
/// deploy makes it `canary` (serving some bands, the live generation the others) until it is
/// promoted (`live`) or rolled back (`retired`, its workers stopping at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenState {
    Starting,
    Live,
    Retired,
    Failed,
    Stopped,
    Draining,
    Canary,
}

impl GenState {
    /// The name used on the bus.
    pub fn as_str(self) -> &'static str {
        match self {
            GenState::Starting => "starting",
            GenState::Live => "live",
            GenState::Retired => "retired",
            GenState::Failed => "failed",
            GenState::Stopped => "stopped",
            GenState::Draining => "draining",
            GenState::Canary => "canary",
        }
    }

    /// Whether `self → next` is a legal transition.
    pub fn can_become(self, next: GenState) -> bool {
        use GenState::*;
        matches!(
            (self, next),
            (Starting, Live)
                | (Starting, Failed)
                | (Live, Retired)
                | (Retired, Stopped)
                | (Live, Stopped)
                // A rollback makes a retired (or draining) generation live again.
                | (Retired, Live)
                | (Live, Draining)
                | (Draining, Live)
                | (Draining, Retired)
                | (Draining, Stopped)
                | (Starting, Canary)
                | (Canary, Live)
                | (Canary, Retired)
                | (Canary, Stopped)
        )
    }

    /// Whether the generation still has (or may have) processes.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            GenState::Starting | GenState::Live | GenState::Retired | GenState::Draining | GenState::Canary
        )
    }

    /// Whether it left `live` and has not stopped: it serves what it still serves, nothing new
    /// (its workers are retired).
    pub fn is_retired(self) -> bool {
        matches!(self, GenState::Retired | GenState::Draining)
    }
}

impl fmt::Display for GenState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// State of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkerState {
    /// Spawned, not ready yet.
    Starting,
    /// Its band's new connections go to it.
    Live,
    /// No new connections; keeps its established ones; reniced.
    Retired,
    /// Stop signal sent.
    Stopping,
}

impl WorkerState {
    /// The name used on the bus.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Live => "live",
            WorkerState::Retired => "retired",
            WorkerState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transient scope of generation `g` of `app`: `ipcluster-<app>-<g>.scope`.
pub fn scope_name(app: &AppName, generation: u64) -> String {
    format!("ipcluster-{app}-{generation}.scope")
}

/// The slice of an app's scopes: `ipcluster-<app>.slice`, a child of `ipcluster.slice`
/// (systemd derives the hierarchy from the dashes; app names contain none).
pub fn slice_name(app: &AppName) -> String {
    format!("ipcluster-{app}.slice")
}

/// Parses a scope name back into (app, generation).
pub fn parse_scope_name(unit: &str) -> Option<(AppName, u64)> {
    let rest = unit.strip_prefix("ipcluster-")?.strip_suffix(".scope")?;
    let (app, g) = rest.rsplit_once('-')?;
    let g: u64 = g.parse().ok().filter(|g| *g > 0)?;
    Some((AppName::new(app).ok()?, g))
}

/// The name of a `listen` entry's socket in `LISTEN_FDNAMES`: the entry with `:` written `_`,
/// since names are `:`-separated and sd_listen_fds_with_names(3) refuses a name with `:`
/// (`0.0.0.0:80` → `0.0.0.0_80`, `[::]:443` → `[__]_443`).
pub fn fd_name(listen: &SocketAddr) -> String {
    listen.to_string().replace(':', "_")
}

/// Identity of one worker, as given to it in its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    pub app: AppName,
    pub generation: u64,
    pub band: u32,
    pub bands: u32,
    /// (public address, worker port) in `listen` order.
    pub ports: Vec<(SocketAddr, u16)>,
}

impl WorkerIdentity {
    /// The environment of a worker: the app's `environment`, then ours (which wins; the config
    /// parser already refuses app variables with our names).
    pub fn environment(&self, config: &AppConfig, notify_socket: Option<&str>) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> =
            config.environment.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.push(("IPCLUSTER_APP".into(), self.app.to_string()));
        env.push(("IPCLUSTER_GENERATION".into(), self.generation.to_string()));
        env.push(("IPCLUSTER_BAND".into(), self.band.to_string()));
        env.push(("IPCLUSTER_BANDS".into(), self.bands.to_string()));
        match config.routing {
            Routing::Nat => {
                if let Some((_, port)) = self.ports.first() {
                    env.push(("PORT".into(), port.to_string()));
                }
                let pairs: Vec<String> =
                    self.ports.iter().map(|(public, w)| format!("{}:{w}", public.port())).collect();
                env.push(("IPCLUSTER_PORTS".into(), pairs.join(",")));
            }
            // sd_listen_fds(3): one socket per listen entry from fd 3; LISTEN_PID is added by
            // the worker's forked child, which knows its PID.
            Routing::Socket => {
                env.push(("LISTEN_FDS".into(), config.listen.len().to_string()));
                let names: Vec<String> = config.listen.iter().map(fd_name).collect();
                env.push(("LISTEN_FDNAMES".into(), names.join(":")));
            }
        }
        if let Some(sock) = notify_socket {
            env.push(("NOTIFY_SOCKET".into(), sock.to_owned()));
            // WATCHDOG_PID is added by the worker's forked child, which knows its PID.
            if let Some(w) = config.watchdog {
                env.push(("WATCHDOG_USEC".into(), w.as_micros().to_string()));
            }
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_transitions() {
        use GenState::*;
        assert!(Starting.can_become(Live));
        assert!(Starting.can_become(Failed));
        assert!(Live.can_become(Retired));
        assert!(Retired.can_become(Stopped));
        assert!(Retired.can_become(Live), "a rollback");
        assert!(!Stopped.can_become(Live));
        assert!(!Failed.can_become(Live));
        assert!(!Stopped.can_become(Starting));
    }

    #[test]
    fn scope_names_round_trip() {
        let app = AppName::new("chat_2").unwrap();
        assert_eq!(scope_name(&app, 17), "ipcluster-chat_2-17.scope");
        assert_eq!(parse_scope_name("ipcluster-chat_2-17.scope"), Some((app.clone(), 17)));
        assert_eq!(slice_name(&app), "ipcluster-chat_2.slice");
        for bad in
            ["ipcluster-chat.scope", "ipcluster-chat-0.scope", "ipcluster--1.scope", "other-chat-1.scope"]
        {
            assert_eq!(parse_scope_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn worker_environment() {
        let config = AppConfig::parse(
            "a.toml",
            "web",
            "command=[\"/x\"]\nlisten=[\"0.0.0.0:80\",\"0.0.0.0:443\"]\nenvironment={MODE=\"p\"}\n",
        )
        .unwrap();
        let id = WorkerIdentity {
            app: config.name.clone(),
            generation: 3,
            band: 1,
            bands: 4,
            ports: vec![("0.0.0.0:80".parse().unwrap(), 20001), ("0.0.0.0:443".parse().unwrap(), 20002)],
        };
        let socket = AppConfig { routing: Routing::Socket, ..config.clone() };
        let env = id.environment(&socket, Some("/run/ipcluster/notify"));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!((get("LISTEN_FDS"), get("LISTEN_FDNAMES")), (Some("2"), Some("0.0.0.0_80:0.0.0.0_443")));
        assert_eq!((get("PORT"), get("IPCLUSTER_PORTS")), (None, None), "no port of its own");
        assert_eq!(fd_name(&"[::]:443".parse().unwrap()), "[__]_443");
        let env = id.environment(&config, Some("/run/ipcluster/notify"));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("MODE"), Some("p"));
        assert_eq!(get("IPCLUSTER_APP"), Some("web"));
        assert_eq!(get("IPCLUSTER_GENERATION"), Some("3"));
        assert_eq!(get("IPCLUSTER_BAND"), Some("1"));
        assert_eq!(get("IPCLUSTER_BANDS"), Some("4"));
        assert_eq!(get("PORT"), Some("20001"));
        assert_eq!(get("IPCLUSTER_PORTS"), Some("80:20001,443:20002"));
        assert_eq!(get("NOTIFY_SOCKET"), Some("/run/ipcluster/notify"));
    }
}
