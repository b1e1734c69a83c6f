//! The contract of `org.ipcluster1.Manager`, written once and shared by the daemon (which serves
//! it), `ipclusterctl` and the tests (which call it): the names, the error names and what they
//! mean, the keys of Deploy's options, the rows of the list methods as named structs, and a
//! client proxy. docs/dbus.md is its reference for people; a test keeps the two in step.
//!
//! The rows are D-Bus structs: field order is wire order, and a field added or moved changes the
//! method's signature (`ListWorkers` returns `a(stuusa(qq)tttis)`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use zbus::{Type, zvariant::OwnedVariant};

/// The well-known bus name the daemon owns.
pub const BUS_NAME: &str = "org.ipcluster1";
/// The object path of the manager.
pub const OBJECT_PATH: &str = "/org/ipcluster1";
/// The manager's interface.
pub const INTERFACE: &str = "org.ipcluster1.Manager";

/// One row of `ListWorkers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct WorkerRow {
    pub app: String,
    pub generation: u64,
    pub band: u32,
    pub pid: u32,
    /// `starting`, `live`, `retired` or `stopping`.
    pub state: String,
    /// (public port, worker port), in `listen` order.
    pub ports: Vec<(u16, u16)>,
    /// Resident memory of the worker's process tree, bytes.
    pub rss: u64,
    /// CPU time of the worker's process tree, µs.
    pub cpu_usec: u64,
    /// Start time, µs since the epoch.
    pub start_usec: u64,
    pub nice: i32,
    /// `ipcluster-<app>-<generation>.scope`.
    pub scope: String,
}

/// One row of `ListGenerations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct GenerationRow {
    pub app: String,
    pub generation: u64,
    /// `starting`, `canary`, `live`, `draining`, `retired`, `stopped` or `failed`.
    pub state: String,
    /// Workers it has now.
    pub workers: u32,
    /// Start time, µs since the epoch.
    pub start_usec: u64,
    pub scope: String,
}

/// One row of `ListSessions`: a running generation with session affinity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct SessionRow {
    pub app: String,
    pub generation: u64,
    /// Live session records: clients whose next connection goes to this generation.
    pub records: u32,
}

/// One row of `ListHealth`: a worker of a generation with health checks (`health_path`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct HealthRow {
    pub app: String,
    pub generation: u64,
    pub band: u32,
    pub pid: u32,
    /// Failed checks in a row.
    pub failures: u32,
    /// The last check's outcome (`HTTP 200`, `cannot connect: …`), "" before the first.
    pub last: String,
    /// When it came back, µs since the epoch (0 before the first).
    pub last_usec: u64,
    /// What happened to its band before it (a health replacement), or "".
    pub note: String,
}

/// Keys of Deploy's `a{sv}` options, with their D-Bus types.
pub mod option {
    /// `u`: number of workers (a power of two).
    pub const WORKERS: &str = "workers";
    /// `as`: the worker's argv.
    pub const COMMAND: &str = "command";
    /// `as`: extra `K=V` environment.
    pub const ENVIRONMENT: &str = "environment";
    /// `s`: an absolute working directory.
    pub const WORKING_DIRECTORY: &str = "working_directory";
    /// `u`: a canary on this many bands (fewer than the app's); not an override.
    pub const CANARY: &str = "canary";
    /// `t`: seconds after which the canary promotes itself if nothing went wrong (it rolls
    /// itself back at the first trouble); needs `canary`. Not an override.
    pub const CANARY_FOR: &str = "canary_for";
    /// Every key, as listed in errors.
    pub const ALL: [&str; 6] = [WORKERS, COMMAND, ENVIRONMENT, WORKING_DIRECTORY, CANARY, CANARY_FOR];
    /// The keys that say how to deploy rather than what runs: they need
    /// `org.ipcluster1.manage` only (the others are overrides).
    pub const NOT_OVERRIDES: [&str; 2] = [CANARY, CANARY_FOR];
    /// Most options one call may carry.
    pub const MAX: usize = 16;
    /// Longest option name, in bytes (the known ones are far shorter).
    pub const MAX_KEY: usize = 64;
}

/// The errors the interface answers with. ipclusterd's own are `org.ipcluster1.Error.*`; the
/// others are the standard `org.freedesktop.DBus.Error.*`. Never a bare `Failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorName {
    NoSuchApp,
    NoSuchGeneration,
    DeployFailed,
    Busy,
    InvalidConfig,
    StopFailed,
    InvalidArgs,
    AccessDenied,
    InteractiveAuthorizationRequired,
    /// The daemon is stopping.
    NoServer,
}

impl ErrorName {
    /// Every name, for tests and documentation checks.
    pub const ALL: [ErrorName; 10] = [
        ErrorName::NoSuchApp,
        ErrorName::NoSuchGeneration,
        ErrorName::DeployFailed,
        ErrorName::Busy,
        ErrorName::InvalidConfig,
        ErrorName::StopFailed,
        ErrorName::InvalidArgs,
        ErrorName::AccessDenied,
        ErrorName::InteractiveAuthorizationRequired,
        ErrorName::NoServer,
    ];

    /// The D-Bus error name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorName::NoSuchApp => "org.ipcluster1.Error.NoSuchApp",
            ErrorName::NoSuchGeneration => "org.ipcluster1.Error.NoSuchGeneration",
            ErrorName::DeployFailed => "org.ipcluster1.Error.DeployFailed",
            ErrorName::Busy => "org.ipcluster1.Error.Busy",
            ErrorName::InvalidConfig => "org.ipcluster1.Error.InvalidConfig",
            ErrorName::StopFailed => "org.ipcluster1.Error.StopFailed",
            ErrorName::InvalidArgs => "org.freedesktop.DBus.Error.InvalidArgs",
            ErrorName::AccessDenied => "org.freedesktop.DBus.Error.AccessDenied",
            ErrorName::InteractiveAuthorizationRequired => {
                "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
            }
            ErrorName::NoServer => "org.freedesktop.DBus.Error.NoServer",
        }
    }

    /// The error called `name`, if it is one of the interface's.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }

    /// What it means, in a few words for people (ipclusterctl prints it before the message).
    pub const fn meaning(self) -> &'static str {
        match self {
            ErrorName::NoSuchApp => "no such app",
            ErrorName::NoSuchGeneration => "no such generation",
            ErrorName::DeployFailed => "deploy failed",
            ErrorName::Busy => "busy",
            ErrorName::InvalidConfig => "invalid app configuration",
            ErrorName::StopFailed => "stop failed",
            ErrorName::InvalidArgs => "invalid arguments",
            ErrorName::AccessDenied => "access denied",
            ErrorName::InteractiveAuthorizationRequired => "access denied (authentication required)",
            ErrorName::NoServer => "ipclusterd is stopping",
        }
    }
}

impl std::fmt::Display for ErrorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client of the interface (`ManagerProxy`), for ipclusterctl and the tests.
#[zbus::proxy(
    interface = "org.ipcluster1.Manager",
    default_service = "org.ipcluster1",
    default_path = "/org/ipcluster1"
)]
pub trait Manager {
    /// Starts a new generation; returns its number once it is live.
    fn deploy(&self, app: &str, options: HashMap<&str, OwnedVariant>) -> zbus::Result<u64>;
    /// Retires a generation (a live one after its replacement is live).
    fn retire_generation(&self, app: &str, generation: u64) -> zbus::Result<()>;
    /// Goes back to an earlier generation (0: the newest that was live before the live one);
    /// returns the generation now live (the same one, or a new one running its config).
    fn rollback(&self, app: &str, generation: u64) -> zbus::Result<u64>;
    /// Stops retired workers of `app` ("" = every app); returns how many.
    fn kill_retired(&self, app: &str) -> zbus::Result<u32>;
    /// Promotes `app`'s canary: its other bands start and every band moves to it; returns its
    /// number once it is live.
    fn promote(&self, app: &str) -> zbus::Result<u64>;
    fn list_workers(&self, app: &str) -> zbus::Result<Vec<WorkerRow>>;
    fn list_generations(&self, app: &str) -> zbus::Result<Vec<GenerationRow>>;
    /// Live session records per generation of `app` ("" = every app).
    fn list_sessions(&self, app: &str) -> zbus::Result<Vec<SessionRow>>;
    /// The health checks of `app`'s workers ("" = every app).
    fn list_health(&self, app: &str) -> zbus::Result<Vec<HealthRow>>;
    fn reload(&self) -> zbus::Result<()>;
    fn stop_app(&self, app: &str) -> zbus::Result<()>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn apps(&self) -> zbus::Result<Vec<String>>;
    #[zbus(signal)]
    fn generation_state_changed(&self, app: String, generation: u64, state: String) -> zbus::Result<()>;
    #[zbus(signal)]
    fn worker_ready(&self, app: String, generation: u64, band: u32, pid: u32) -> zbus::Result<()>;
    #[zbus(signal)]
    fn worker_exited(
        &self,
        app: String,
        generation: u64,
        band: u32,
        pid: u32,
        reason: String,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn policy_held_back(
        &self,
        app: String,
        generation: u64,
        band: u32,
        pid: u32,
        reason: String,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn canary_ended(&self, app: String, generation: u64, result: String, reason: String) -> zbus::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_the_documented_signatures() {
        assert_eq!(WorkerRow::SIGNATURE.to_string(), "(stuusa(qq)tttis)");
        assert_eq!(GenerationRow::SIGNATURE.to_string(), "(stsuts)");
        assert_eq!(SessionRow::SIGNATURE.to_string(), "(stu)");
        assert_eq!(HealthRow::SIGNATURE.to_string(), "(stuuusts)");
    }

    #[test]
    fn error_names_round_trip_and_none_is_bare_failed() {
        for e in ErrorName::ALL {
            assert_eq!(ErrorName::parse(e.as_str()), Some(e));
            assert!(!e.as_str().ends_with(".Failed"));
        }
        assert_eq!(ErrorName::parse("org.freedesktop.DBus.Error.Failed"), None);
    }
}
