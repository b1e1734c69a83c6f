//! The supervisor's interface to the rest of the daemon: the [`Command`]s it answers (each with
//! its reply channel), the [`Error`]s it answers with, the rows it lists, the [`BusSignal`]s it
//! emits, and the [`Handle`] the adapters hold.

use ipcluster_core::{
    config::Overrides,
    model::{GenState, WorkerState},
};
use tokio::sync::{mpsc, oneshot};

/// Errors the supervisor answers with; the D-Bus adapter maps each to a bus error name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NoSuchApp(String),
    #[error("{0}")]
    NoSuchGeneration(String),
    #[error("{0}")]
    DeployFailed(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{0}")]
    InvalidArgs(String),
    #[error("{0}")]
    StopFailed(String),
    #[error("the supervisor is not running (ipclusterd is stopping)")]
    Gone,
}

/// Where a command's answer goes.
pub type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// A request to the supervisor. Each carries the sender of its reply; the supervisor answers
/// every one itself, at once or when the event that completes it arrives.
#[derive(Debug)]
pub enum Command {
    /// The names of the apps with a valid file.
    Apps(oneshot::Sender<Vec<String>>),
    /// A new generation of `app`; answered with its number once it is live.
    Deploy {
        app: String,
        overrides: Overrides,
        reply: Reply<u64>,
    },
    /// Retire a generation; a live one is replaced first (answered once the replacement is live).
    Retire {
        app: String,
        generation: u64,
        reply: Reply<()>,
    },
    /// Stop the retired workers of `app` ("" = every app); answered with how many.
    KillRetired {
        app: String,
        reply: Reply<u32>,
    },
    ListWorkers {
        app: String,
        reply: Reply<Vec<WorkerInfo>>,
    },
    ListGenerations {
        app: String,
        reply: Reply<Vec<GenerationInfo>>,
    },
    /// Re-read the app files.
    Reload {
        reply: Reply<()>,
    },
    /// Stop every generation of `app` and remove its rules; answered once every scope is gone.
    StopApp {
        app: String,
        reply: Reply<()>,
    },
}

/// One row of ListWorkers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub app: String,
    pub generation: u64,
    pub band: u32,
    pub pid: u32,
    pub state: WorkerState,
    /// (public port, worker port), in `listen` order.
    pub ports: Vec<(u16, u16)>,
    pub rss: u64,
    pub cpu_usec: u64,
    pub start_usec: u64,
    pub nice: i32,
    pub scope: String,
}

/// One row of ListGenerations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationInfo {
    pub app: String,
    pub generation: u64,
    pub state: GenState,
    pub workers: u32,
    pub start_usec: u64,
    pub scope: String,
}

/// Signals for the bus, emitted by the D-Bus adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusSignal {
    GenerationStateChanged {
        app: String,
        generation: u64,
        state: GenState,
    },
    WorkerExited {
        app: String,
        generation: u64,
        band: u32,
        pid: u32,
        reason: String,
    },
    WorkerReady {
        app: String,
        generation: u64,
        band: u32,
        pid: u32,
    },
    /// A memory or health retirement was held back by retire_rate, or live workers alone are
    /// over cluster_memory_max.
    PolicyHeldBack {
        app: String,
        generation: u64,
        band: u32,
        pid: u32,
        reason: String,
    },
}

/// A cheap, clonable handle for sending commands to the supervisor.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    /// Sends a command built around a fresh reply channel and awaits the answer.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Error::Gone)?;
        rx.await.map_err(|_| Error::Gone)
    }

    /// Like [`Handle::ask`] for commands whose answer is itself a `Result`.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        self.ask(make).await?
    }
}

/// Creates the command channel: the handle for the adapters, the receiver for the supervisor.
pub fn channel() -> (Handle, mpsc::Receiver<Command>) {
    let (tx, rx) = mpsc::channel(256);
    (Handle { tx }, rx)
}
