//! [`FakeScopes`]: systemd's transient scopes, in memory.

use std::{
    collections::BTreeMap,
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
};

use super::{FakeProcesses, lock};
use crate::{
    process::Exit,
    scopes::{ScopeError, ScopeSpec, Scopes},
};

/// Scopes kept in memory. Stopping one ends its processes, as systemd would; when the scopes
/// hold real processes (pidfds given with [`FakeScopes::with_pidfds`]), they are SIGKILLed.
#[derive(Debug, Clone, Default)]
pub struct FakeScopes {
    pub units: Arc<Mutex<BTreeMap<String, Vec<u32>>>>,
    pub stopped: Arc<Mutex<Vec<String>>>,
    pub cpu_weights: Arc<Mutex<Vec<(String, u64)>>>,
    /// When set, stopping a scope ends its processes through this.
    pub processes: Option<FakeProcesses>,
    real: Arc<Mutex<BTreeMap<String, Vec<OwnedFd>>>>,
    kill_real: bool,
}

impl FakeScopes {
    /// Scopes whose processes are real: their pidfds are taken when they join, and stopping
    /// the scope SIGKILLs them (tests run side by side; a PID may be reused meanwhile).
    pub fn with_pidfds() -> Self {
        Self { kill_real: true, ..Self::default() }
    }

    /// Scopes of fake processes: stopping one makes them exit.
    pub fn of(processes: &FakeProcesses) -> Self {
        Self { processes: Some(processes.clone()), ..Self::default() }
    }

    fn joined(&self, unit: &str, pids: &[u32]) {
        lock(&self.units).entry(unit.to_owned()).or_default().extend(pids);
        if let Some(p) = &self.processes {
            for pid in pids {
                p.set_cgroup(*pid, &format!("/ipcluster.slice/{unit}"));
            }
        }
        if self.kill_real {
            let fds = pids.iter().filter_map(|p| crate::process::adopt(*p).ok());
            lock(&self.real).entry(unit.to_owned()).or_default().extend(fds);
        }
    }

    /// The names of the scopes that exist now.
    pub fn names(&self) -> Vec<String> {
        lock(&self.units).keys().cloned().collect()
    }
}

impl Scopes for FakeScopes {
    async fn start(&self, spec: &ScopeSpec) -> Result<(), ScopeError> {
        self.joined(&spec.unit, &spec.pids);
        Ok(())
    }
    async fn stop(&self, unit: &str) -> Result<(), ScopeError> {
        lock(&self.stopped).push(unit.to_owned());
        let pids = lock(&self.units).remove(unit).unwrap_or_default();
        for fd in lock(&self.real).remove(unit).unwrap_or_default() {
            let _ = crate::process::signal(&fd, libc::SIGKILL);
        }
        if let Some(p) = &self.processes {
            for pid in pids {
                p.exit(pid, Exit::Signal(libc::SIGKILL));
            }
        }
        Ok(())
    }
    async fn list(&self) -> Result<Vec<String>, ScopeError> {
        Ok(self.names())
    }
    async fn processes(&self, unit: &str) -> Result<Vec<(u32, String)>, ScopeError> {
        let pids = lock(&self.units).get(unit).cloned().unwrap_or_default();
        Ok(pids
            .into_iter()
            .map(|pid| (pid, self.processes.as_ref().map_or_else(|| "/fake.scope".into(), |p| p.cgroup(pid))))
            .collect())
    }
    async fn attach(&self, unit: &str, pids: &[u32]) -> Result<(), ScopeError> {
        self.joined(unit, pids);
        Ok(())
    }
    async fn set_cpu_weight(&self, unit: &str, weight: u64) -> Result<(), ScopeError> {
        lock(&self.cpu_weights).push((unit.to_owned(), weight));
        Ok(())
    }
}
