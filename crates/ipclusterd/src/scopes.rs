//! Transient scopes: one per generation, `ipcluster-<app>-<g>.scope` in `ipcluster-<app>.slice`.
//!
//! [`Scopes`] is the narrow interface the supervisor uses; [`Systemd`] implements it over
//! `org.freedesktop.systemd1`. A scope holds processes that systemd did not start: we fork the
//! children, then ask systemd to create the scope around their PIDs (`PIDs`, not `PIDFDs`:
//! systemd 252), and wait for the start job to finish before letting them run.

use std::{future::Future, time::Duration};

use futures_util::StreamExt;
use zbus::wire::{OwnedVariant, Str, Variant};
use zbus_systemd::systemd1::ManagerProxy;

/// A failure talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("systemd refused {what}: {source}")]
    Bus { what: String, source: zbus::Error },
    #[error("systemd job for {unit} ended with {result:?}")]
    Job { unit: String, result: String },
}

/// What a new scope looks like.
#[derive(Debug, Clone)]
pub struct ScopeSpec {
    pub unit: String,
    pub slice: String,
    pub description: String,
    pub pids: Vec<u32>,
    /// Signal and timeout systemd uses when it stops the scope.
    pub kill_signal: i32,
    pub stop_timeout: Duration,
}

/// Transient scopes. Implementations: [`Systemd`]; a recording fake in tests.
pub trait Scopes: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Creates the scope around `spec.pids` and returns once systemd has started it.
    /// On failure no scope is left.
    fn start(&self, spec: &ScopeSpec) -> impl Future<Output = Result<(), ScopeError>> + Send;
    /// Stops the scope (its kill signal, then SIGKILL after its timeout) and returns when it is
    /// gone. Stopping a scope that does not exist succeeds: the result is the same.
    fn stop(&self, unit: &str) -> impl Future<Output = Result<(), ScopeError>> + Send;
    /// Names of loaded `ipcluster-*.scope` units.
    fn list(&self) -> impl Future<Output = Result<Vec<String>, ScopeError>> + Send;
    /// Every process in the scope (its cgroup and those below): PID and cgroup path.
    fn processes(&self, unit: &str) -> impl Future<Output = Result<Vec<(u32, String)>, ScopeError>> + Send;
    /// Moves `pids` into the existing scope `unit` (a respawned worker joins its generation).
    fn attach(&self, unit: &str, pids: &[u32]) -> impl Future<Output = Result<(), ScopeError>> + Send;
    /// Sets the scope's `CPUWeight=` (retired generations get a low one). Accepted, if not
    /// enforced, where the cpu controller is not available.
    fn set_cpu_weight(&self, unit: &str, weight: u64) -> impl Future<Output = Result<(), ScopeError>> + Send;
}

/// [`Scopes`] over systemd's D-Bus API.
#[derive(Debug, Clone)]
pub struct Systemd {
    manager: ManagerProxy<'static>,
}

fn var<'a>(v: impl Into<Variant<'a>>) -> OwnedVariant {
    // Only file-descriptor variants can fail to convert; none are built here.
    v.into().try_to_owned().unwrap_or_else(|_| OwnedVariant::from(0u8))
}

impl Systemd {
    /// Connects to systemd on `conn` (the system bus) and subscribes to job signals.
    pub async fn new(conn: &zbus::Connection) -> Result<Self, ScopeError> {
        let manager = ManagerProxy::new(conn)
            .await
            .map_err(|source| ScopeError::Bus { what: "a manager proxy".into(), source })?;
        // Without Subscribe, systemd does not emit JobRemoved to us.
        manager.subscribe().await.map_err(|source| ScopeError::Bus { what: "Subscribe".into(), source })?;
        Ok(Self { manager })
    }

    /// Runs `call`, which queues a job, and waits for that job's JobRemoved.
    /// The signal stream is opened before the call, so a quick job cannot be missed.
    async fn job<F>(&self, unit: &str, what: &str, call: F) -> Result<String, ScopeError>
    where
        F: std::future::Future<Output = zbus::Result<zbus::OwnedObjectPath>>,
    {
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(|source| ScopeError::Bus { what: "a JobRemoved subscription".into(), source })?;
        let job = call.await.map_err(|source| ScopeError::Bus { what: format!("{what} {unit}"), source })?;
        while let Some(signal) = removed.next().await {
            let Ok(args) = signal.args() else { continue };
            if args.job.as_str() == job.as_str() {
                return Ok(args.result.clone());
            }
        }
        Err(ScopeError::Job { unit: unit.into(), result: "lost connection".into() })
    }
}

impl Scopes for Systemd {
    async fn start(&self, spec: &ScopeSpec) -> Result<(), ScopeError> {
        let props = vec![
            ("Description".to_owned(), var(Str::from(spec.description.clone()))),
            ("Slice".to_owned(), var(Str::from(spec.slice.clone()))),
            ("PIDs".to_owned(), var(spec.pids.clone())),
            // Leave no failed scope behind when workers die.
            ("CollectMode".to_owned(), var(Str::from("inactive-or-failed"))),
            // Lets AttachProcessesToUnit add a respawned worker to its generation's scope later
            // ("Process migration not available on non-delegated units" otherwise).
            ("Delegate".to_owned(), var(true)),
            ("KillSignal".to_owned(), var(spec.kill_signal)),
            ("TimeoutStopUSec".to_owned(), var(spec.stop_timeout.as_micros() as u64)),
        ];
        let call = self.manager.start_transient_unit(spec.unit.clone(), "fail".into(), props, vec![]);
        let result = self.job(&spec.unit, "StartTransientUnit", call).await?;
        if result != "done" {
            return Err(ScopeError::Job { unit: spec.unit.clone(), result });
        }
        Ok(())
    }

    async fn stop(&self, unit: &str) -> Result<(), ScopeError> {
        let call = self.manager.stop_unit(unit.to_owned(), "replace".into());
        match self.job(unit, "StopUnit", call).await {
            Ok(_) => Ok(()),
            Err(ScopeError::Bus { source: zbus::Error::MethodError(name, _, _), .. })
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn list(&self) -> Result<Vec<String>, ScopeError> {
        let units = self
            .manager
            .list_units_by_patterns(vec![], vec!["ipcluster-*.scope".into()])
            .await
            .map_err(|source| ScopeError::Bus { what: "ListUnitsByPatterns".into(), source })?;
        // Only scopes that still run: a dead or failed one has no processes to adopt.
        Ok(units.into_iter().filter(|u| u.3 == "active").map(|u| u.0).collect())
    }

    async fn processes(&self, unit: &str) -> Result<Vec<(u32, String)>, ScopeError> {
        let procs = self
            .manager
            .get_unit_processes(unit.to_owned())
            .await
            .map_err(|source| ScopeError::Bus { what: format!("GetUnitProcesses {unit}"), source })?;
        Ok(procs.into_iter().map(|p| (p.1, p.0)).collect())
    }

    async fn set_cpu_weight(&self, unit: &str, weight: u64) -> Result<(), ScopeError> {
        self.manager
            .set_unit_properties(unit.to_owned(), true, vec![("CPUWeight".to_owned(), var(weight))])
            .await
            .map_err(|source| ScopeError::Bus { what: format!("SetUnitProperties {unit}"), source })
    }

    async fn attach(&self, unit: &str, pids: &[u32]) -> Result<(), ScopeError> {
        self.manager
            .attach_processes_to_unit(unit.to_owned(), String::new(), pids.to_vec())
            .await
            .map_err(|source| ScopeError::Bus { what: format!("AttachProcessesToUnit {unit}"), source })
    }
}
