//! What the daemon remembers across its own restarts, typed: the last generation number of each
//! app (numbers never repeat), the state of every running generation with the effective config
//! it runs with and who its workers are, the backoff of crashing bands, and which apps were
//! stopped. The daemon writes it root-only and atomically (`ipclusterd::state`); it is the
//! authority a restarted daemon trusts, where a worker's environment is only a hint that must
//! agree with it. This module only says what it holds.
//!
//! On disk it is JSON: states are written as the bus names them (`"live"`), addresses as
//! `"ip:port"`.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    config::{AppConfig, Routing},
    model::GenState,
    name::AppName,
};

/// The whole saved state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Last generation number allocated, per app.
    #[serde(default)]
    pub last_generation: BTreeMap<AppName, u64>,
    /// Per app: running generations, crash backoff, stopped.
    #[serde(default)]
    pub apps: BTreeMap<AppName, SavedApp>,
}

/// What is remembered of an app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedApp {
    /// Generations that still run (starting, live, retired).
    #[serde(default)]
    pub generations: BTreeMap<u64, SavedGeneration>,
    /// Last respawn delay (ms) of each band that crashed, so a crash loop stays slow across
    /// daemon restarts.
    #[serde(default)]
    pub backoff_ms: BTreeMap<u32, u64>,
    /// Stopped with StopApp (stays stopped until the next Deploy).
    #[serde(default)]
    pub stopped: bool,
}

/// What is remembered of a running generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGeneration {
    pub state: GenState,
    pub started_usec: u64,
    #[serde(default)]
    pub retired_usec: Option<u64>,
    pub workers: u32,
    /// Public addresses, in `listen` order.
    pub listen: Vec<SocketAddr>,
    /// How its clients reach it (absent in state files from before socket mode: NAT).
    #[serde(default)]
    pub routing: Option<Routing>,
    /// The effective config it runs with (the file's plus Deploy overrides), so what was
    /// deployed keeps running after a restart, not what the file says now. Absent in state
    /// files from before they were saved: the app file's then.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub working_directory: Option<PathBuf>,
    #[serde(default)]
    pub port_range: Option<(u16, u16)>,
    /// Its workers, as the daemon started them.
    #[serde(default)]
    pub processes: Vec<SavedWorker>,
    /// Its `session_affinity` in seconds (absent: off, or a state file from before sessions).
    #[serde(default)]
    pub session_affinity_secs: Option<u64>,
    /// Its `max_draining` (absent: the default).
    #[serde(default)]
    pub max_draining: Option<u32>,
    /// Its slot: among the app's session sets (NAT mode, with session affinity) or its groups'
    /// steering slots (socket mode).
    #[serde(default)]
    pub session_slot: Option<u8>,
    /// A canary: the bands it serves and when it promotes itself.
    #[serde(default)]
    pub canary: Option<SavedCanary>,
}

/// What is remembered of a canary generation (its state is `canary`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCanary {
    /// The bands it serves, ascending; the live generation serves the others.
    pub bands: Vec<u32>,
    /// `canary_for`: when (µs since the epoch, wall clock) it promotes itself if nothing went
    /// wrong. `None`: it waits for Promote or Rollback.
    #[serde(default)]
    pub deadline_usec: Option<u64>,
    /// Its `canary_for`, in seconds (with it, trouble rolls it back by itself).
    #[serde(default)]
    pub canary_for_secs: Option<u64>,
}

/// One worker, as the daemon knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedWorker {
    pub pid: u32,
    /// The kernel's start time (µs since the epoch): with the PID, who it is.
    pub start_usec: u64,
    pub band: u32,
    /// Worker ports, in `listen` order.
    pub ports: Vec<u16>,
}

impl SavedGeneration {
    /// The record of a generation running `config`.
    pub fn of(state: GenState, started_usec: u64, config: &AppConfig) -> Self {
        SavedGeneration {
            state,
            started_usec,
            retired_usec: None,
            workers: config.workers,
            listen: config.listen.clone(),
            routing: Some(config.routing),
            command: config.command.clone(),
            environment: config.environment.clone(),
            user: config.user.clone(),
            working_directory: Some(config.working_directory.clone()),
            port_range: Some(config.port_range),
            processes: Vec::new(),
            session_affinity_secs: config.session_affinity.map(|d| d.as_secs()),
            max_draining: Some(config.max_draining),
            session_slot: None,
            canary: None,
        }
    }

    /// `base` (the app file's config, or the fallback) with what this generation ran with.
    pub fn effective(&self, mut base: AppConfig) -> AppConfig {
        base.workers = self.workers;
        base.listen = self.listen.clone();
        base.routing = self.routing.unwrap_or(Routing::Nat);
        if !self.command.is_empty() {
            base.command = self.command.clone();
            base.environment = self.environment.clone();
            base.user = self.user.clone();
        }
        if let Some(d) = &self.working_directory {
            base.working_directory = d.clone();
        }
        if self.session_affinity_secs.is_some() || self.max_draining.is_some() {
            base.session_affinity = self.session_affinity_secs.map(std::time::Duration::from_secs);
        }
        if let Some(n) = self.max_draining {
            base.max_draining = n;
        }
        if let Some(r) = self.port_range {
            base.port_range = r;
        }
        base
    }
}

impl SavedState {
    /// Allocates the next generation number of `app` (one more than any seen).
    pub fn next_generation(&mut self, app: &AppName) -> u64 {
        let g = self.last_generation.get(app).copied().unwrap_or(0).saturating_add(1);
        self.last_generation.insert(app.clone(), g);
        g
    }

    /// Remembers that `app` had a generation `g` (found running): later numbers stay above it.
    pub fn saw_generation(&mut self, app: &AppName, g: u64) {
        let last = self.last_generation.entry(app.clone()).or_insert(0);
        *last = (*last).max(g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_on_disk_is_stable() {
        let text = r#"{"last_generation":{"chat":7},"apps":{"chat":{"generations":{"7":{"state":"live","started_usec":1,"workers":4,"listen":["0.0.0.0:80"]}},"backoff_ms":{"2":400}}}}"#;
        let s: SavedState = serde_json::from_str(text).unwrap();
        let chat = AppName::new("chat").unwrap();
        assert_eq!(s.last_generation[&chat], 7);
        let g = &s.apps[&chat].generations[&7];
        assert_eq!((g.state, g.workers, g.listen[0].port()), (GenState::Live, 4, 80));
        assert_eq!(s.apps[&chat].backoff_ms[&2], 400);
        let again: SavedState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn malformed_names_and_states_are_refused() {
        assert!(serde_json::from_str::<SavedState>(r#"{"last_generation":{"../x":1}}"#).is_err());
        let bad_state = r#"{"apps":{"a":{"generations":{"1":{"state":"dancing","started_usec":1,"workers":1,"listen":[]}}}}}"#;
        assert!(serde_json::from_str::<SavedState>(bad_state).is_err());
    }

    #[test]
    fn a_canary_is_remembered_with_its_bands_and_deadline() {
        let text = r#"{"apps":{"web":{"generations":{"5":{"state":"canary","started_usec":1,"workers":8,"listen":["0.0.0.0:80"],"canary":{"bands":[0,4],"deadline_usec":99}}}}}}"#;
        let s: SavedState = serde_json::from_str(text).unwrap();
        let g = &s.apps[&AppName::new("web").unwrap()].generations[&5];
        assert_eq!(g.state, GenState::Canary);
        assert_eq!(
            g.canary,
            Some(SavedCanary { bands: vec![0, 4], deadline_usec: Some(99), canary_for_secs: None })
        );
        let again: SavedState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn generation_numbers_only_grow() {
        let mut s = SavedState::default();
        let a = AppName::new("a").unwrap();
        assert_eq!(s.next_generation(&a), 1);
        s.saw_generation(&a, 9);
        s.saw_generation(&a, 3);
        assert_eq!(s.next_generation(&a), 10);
    }
}
