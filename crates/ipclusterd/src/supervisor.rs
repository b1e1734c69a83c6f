//! The one task that owns all state. Everything else sends it a [`Command`] with a reply channel
//! and awaits the answer; no other code reads or writes apps, generations or workers.

use std::path::PathBuf;

use tokio::sync::{mpsc, oneshot};

/// A request to the supervisor. Each carries the sender of its reply.
#[derive(Debug)]
pub enum Command {
    /// The one-line summary used for `STATUS=`.
    StatusLine(oneshot::Sender<String>),
}

/// The supervisor went away (the daemon is stopping).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the supervisor is not running (ipclusterd is stopping)")]
pub struct Gone;

/// A cheap, clonable handle for sending commands to the supervisor.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Gone> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Gone)?;
        rx.await.map_err(|_| Gone)
    }

    /// The summary line for `STATUS=`.
    pub async fn status_line(&self) -> Result<String, Gone> {
        self.ask(Command::StatusLine).await
    }
}

/// Owner of all state.
#[derive(Debug)]
pub struct Supervisor {
    #[allow(dead_code, reason = "read by the deploy work that follows")]
    config_dir: PathBuf,
    rx: mpsc::Receiver<Command>,
}

impl Supervisor {
    /// A supervisor and the handle to reach it.
    pub fn new(config_dir: PathBuf) -> (Self, Handle) {
        let (tx, rx) = mpsc::channel(64);
        (Self { config_dir, rx }, Handle { tx })
    }

    /// Serves commands until every handle is dropped.
    pub async fn run(mut self) {
        while let Some(cmd) = self.rx.recv().await {
            match cmd {
                Command::StatusLine(reply) => {
                    let _ = reply.send("0 apps, 0 live workers, 0 retired workers".to_owned());
                }
            }
        }
    }
}
