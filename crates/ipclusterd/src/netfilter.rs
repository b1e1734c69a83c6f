//! NAT rules in the kernel. [`Router`] is the narrow interface the supervisor uses;
//! [`Iptables`] implements it with one `iptables-restore --noflush` transaction per change
//! (the rule text comes from [`ipcluster_core::routing`]).

use std::process::Stdio;

use ipcluster_core::routing::{self, AppRoute};
use tokio::{io::AsyncWriteExt, process::Command};

/// A failure changing the rules; the kernel's rules are as they were (the transaction is atomic).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RouterError(pub String);

/// What [`Router::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The kernel already had exactly these rules.
    Unchanged,
    /// One transaction replaced our chains.
    Changed,
}

/// The NAT rules. Implementations: [`Iptables`]; a recording fake in tests.
pub trait Router: Send + Sync {
    /// Makes the kernel route exactly `routes` (every app with a live generation), in one atomic
    /// transaction. Idempotent: applying the same routes again changes nothing.
    fn apply(
        &self,
        routes: &[AppRoute],
    ) -> impl std::future::Future<Output = Result<Applied, RouterError>> + Send;
    /// What of ours is in the kernel now.
    fn current(&self) -> impl std::future::Future<Output = Result<routing::Existing, RouterError>> + Send;
}

/// [`Router`] with iptables (iptables-nft on Debian 12).
#[derive(Debug, Clone, Default)]
pub struct Iptables;

impl Router for Iptables {
    async fn current(&self) -> Result<routing::Existing, RouterError> {
        let save = Command::new("iptables-save")
            .args(["-t", "nat"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| RouterError(format!("cannot run iptables-save: {e}")))?;
        if !save.status.success() {
            return Err(RouterError(format!(
                "iptables-save failed ({}): {}",
                save.status,
                String::from_utf8_lossy(&save.stderr).trim()
            )));
        }
        Ok(routing::parse_existing(&String::from_utf8_lossy(&save.stdout)))
    }

    async fn apply(&self, routes: &[AppRoute]) -> Result<Applied, RouterError> {
        let existing = self.current().await?;
        if routing::up_to_date(&existing, routes) {
            return Ok(Applied::Unchanged);
        }
        let text = routing::render(&existing, routes);
        let mut child = Command::new("iptables-restore")
            .args(["--noflush", "--wait", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| RouterError(format!("cannot run iptables-restore: {e}")))?;
        let mut stdin =
            child.stdin.take().ok_or_else(|| RouterError("iptables-restore has no stdin".into()))?;
        stdin.write_all(text.as_bytes()).await.map_err(|e| RouterError(format!("iptables-restore: {e}")))?;
        drop(stdin);
        let out =
            child.wait_with_output().await.map_err(|e| RouterError(format!("iptables-restore: {e}")))?;
        if !out.status.success() {
            return Err(RouterError(format!(
                "iptables-restore failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(Applied::Changed)
    }
}
