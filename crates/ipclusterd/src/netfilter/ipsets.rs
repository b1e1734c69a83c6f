//! The ipsets of session affinity (NAT mode), with the `ipset` program: made before the rules
//! that name them, destroyed once no rule does, counted for ListSessions and for telling when a
//! draining generation is drained. What they hold is [`ipcluster_core::routing`]'s business
//! ("Sessions"); this module only runs the program.
//!
//! Only sets named like ours (`ipc4-…`, `ipc6-…`) are ever created or destroyed. Which exist is
//! read once and then followed, so the periodic rule check costs no `ipset` run while nothing
//! changes; a set the kernel will not destroy (a rule still names it) is left for the next
//! change. The kernel allows 256 sets per network namespace: a creation past that fails, and the
//! error (the deploy's or the cutover's) says so.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ipcluster_core::{
    name::AppName,
    routing::{self, Family},
};

use crate::netfilter::RouterError;

/// The `ipset` program and what we know of our sets.
#[derive(Debug, Clone)]
pub struct Ipsets {
    tool: Option<PathBuf>,
    timeout: Duration,
    /// Our sets that exist, as last read or made (`None`: not read yet).
    ours: Arc<Mutex<Option<BTreeSet<String>>>>,
}

impl Ipsets {
    /// `ipset` where Debian puts it, if installed; runs are killed after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let tool = crate::netfilter::program("ipset");
        Self { tool, timeout, ours: Arc::default() }
    }

    fn tool(&self) -> Result<&Path, RouterError> {
        self.tool.as_deref().ok_or_else(|| {
            RouterError(
                "session affinity needs ipset: no ipset in /usr/sbin or /sbin (apt-get install ipset)".into(),
            )
        })
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Option<BTreeSet<String>>> {
        self.ours.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn run(&self, args: &[&str], input: Option<&str>) -> Result<String, RouterError> {
        let label = format!("ipset {}", args.join(" "));
        let out = super::run_tool(self.tool()?, args, input, self.timeout, (Some(&label), "")).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Our sets now, with their records (one `ipset list -t`); remembered as what exists.
    async fn list(&self) -> Result<BTreeMap<String, u32>, RouterError> {
        let list = routing::parse_list(&self.run(&["list", "-t"], None).await?);
        *self.known() = Some(list.keys().cloned().collect());
        Ok(list)
    }

    /// Makes every set of `wanted` (name → family, timeout) that does not exist, in one
    /// `ipset restore -exist`. Nothing to run when they all exist already.
    pub async fn ensure(&self, wanted: &BTreeMap<String, (Family, u32)>) -> Result<(), RouterError> {
        if wanted.is_empty() {
            return Ok(());
        }
        if self.known().is_none() {
            self.list().await?;
        }
        let missing: BTreeMap<String, (Family, u32)> = {
            let known = self.known();
            let known = known.as_ref().expect("listed above");
            wanted.iter().filter(|(n, _)| !known.contains(*n)).map(|(n, v)| (n.clone(), *v)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let made = self.run(&["restore", "-exist"], Some(&routing::create_input(&missing))).await;
        match made {
            Ok(_) => {
                self.known().get_or_insert_with(BTreeSet::new).extend(missing.into_keys());
                Ok(())
            }
            Err(e) => {
                // What exists is unknown now: read again next time.
                *self.known() = None;
                Err(RouterError(format!(
                    "cannot make the session sets (at most 256 sets per network namespace): {e}"
                )))
            }
        }
    }

    /// Destroys our sets not in `keep` (a set a rule still names stays, for the next time).
    pub async fn prune(&self, keep: &BTreeSet<String>) {
        if self.tool.is_none() {
            return;
        }
        if self.known().is_none() && self.list().await.is_err() {
            return;
        }
        let stale: Vec<String> = {
            let known = self.known();
            known.iter().flatten().filter(|n| !keep.contains(*n)).cloned().collect()
        };
        for name in stale {
            match self.run(&["destroy", &name], None).await {
                Ok(_) => {
                    if let Some(k) = self.known().as_mut() {
                        k.remove(&name);
                    }
                }
                Err(e) => tracing::debug!("{e}"),
            }
        }
    }

    /// The live records of each (app, slot), both families summed; none without ipset.
    pub async fn sessions(&self) -> Result<BTreeMap<(AppName, u8), u32>, RouterError> {
        if self.tool.is_none() {
            return Ok(BTreeMap::new());
        }
        Ok(routing::records(&self.list().await?))
    }
}
