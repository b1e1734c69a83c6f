//! Netfilter rules in the kernel. [`Router`] is the narrow interface the supervisor uses;
//! [`Iptables`] implements it with `iptables-save` and one `iptables-restore --noflush` input
//! per change, and the same with `ip6tables-save` and `ip6tables-restore` for IPv6 (the rule
//! text, and why each table changes atomically on its own, are
//! [`ipcluster_core::routing`]'s business).
//!
//! The programs are run by absolute path, resolved once, and bounded in time: a held xtables
//! lock or a stuck kernel call must never stall the supervisor, which waits for them. The two
//! families are read at the same time (a change costs the slower of the two reads, not both).
//!
//! **IPv6.** The IPv6 tables are read and written when there is something to route or guard
//! there, or something of ours to remove: always while any app runs (workers listen
//! dual-stack, so their ports are guarded from IPv6 hosts too), and, with no app, until a read
//! showed nothing of ours. A host without IPv6 ([`Ipv6::Absent`]) serves `[::]` as IPv4's
//! wildcard and cannot route a specific IPv6 address. When ip6tables cannot be used (not
//! installed, or its programs fail), an app with an entry IPv6 serves cannot be routed, and
//! the error names the entry and why; IPv4-only apps keep working, without the IPv6 guard of
//! their ports, which the journal says once.
//!
//! **The periodic check without a fork.** [`Router::apply`] is called every few seconds to
//! notice a flush by another tool. Before it reads anything it asks the kernel for the
//! nf_tables generation id ([`crate::nftgen`]): when that has not moved since a read found the
//! same routes already in place, nothing can have changed them, and no `iptables-save` runs.
//! With no route to make, once a read showed nothing of ours in a family (and nothing was
//! written there since), that family is not read again, whatever the iptables backend.
//!
//! **Two families, one change.** Each family's tables change in transactions of their own,
//! written at the same time. When one family's change fails and the other's succeeded, the
//! other's nat table is taken back ([`routing::render_undo`]), so that on an error routing is
//! as it was in both families, as [`Router::apply`] promises.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use ipcluster_core::{
    name::AppName,
    routing::{self, AppRoute, Family},
};

/// A failure changing or reading the rules; the kernel's rules are as they were (see
/// [`Router::apply`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouterError(pub String);

/// What [`Router::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The kernel already had exactly these rules.
    Unchanged,
    /// Our chains were rewritten (one transaction per table that differed).
    Changed,
}

/// The netfilter rules. Implementations: [`Iptables`]; a recording fake in tests.
pub trait Router: Send + Sync + std::fmt::Debug + 'static {
    /// Makes the kernel route exactly `routes` (every app with a live generation) and guard
    /// their workers' ports, in both address families. Each table changes in one atomic
    /// transaction; on an error, the routing (nat) is as it was. Idempotent: applying the same
    /// routes again changes nothing.
    fn apply(
        &self,
        routes: &[AppRoute],
    ) -> impl std::future::Future<Output = Result<Applied, RouterError>> + Send;
    /// What of ours is in the kernel now, in both families (IPv6 when it can be read).
    fn current(&self) -> impl std::future::Future<Output = Result<routing::Existing, RouterError>> + Send;
    /// Whether rules can be changed at all, cheaply and without touching the kernel: `Err`
    /// with the reason (for the status line, the journal and `DeployFailed`) when they cannot,
    /// e.g. the iptables programs are not installed. `Ok` does not promise that the next
    /// [`Router::apply`] succeeds (the kernel may still refuse, or an IPv6 entry may not be
    /// routable on this host); its error says why then.
    fn check(&self) -> Result<(), RouterError>;
    /// The live records of every session set of ours, both families summed, by (app, slot)
    /// (see [`routing::set_name`]). Reads only.
    fn sessions(
        &self,
    ) -> impl std::future::Future<Output = Result<BTreeMap<(AppName, u8), u32>, RouterError>> + Send;
    /// Workers that listened on `ports` are gone and no rule sends clients there: drops the
    /// kernel's connection-tracking entries of connections they reset, which would send a
    /// client's next connection from the same address and port to the dead port for 10 s
    /// ([`conntrack`]). In the background; never fails the caller.
    fn forget(&self, ports: &[u16]);
}

/// How long `iptables-restore` waits for the xtables lock (iptables-legacy; iptables-nft takes
/// no lock and ignores it).
const LOCK_WAIT_SECS: u32 = 5;
/// Longest a run of iptables-save or iptables-restore may take before it is killed.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Where the programs are looked for, in order (Debian 12 has /sbin as a link to /usr/sbin).
const DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];
/// Present exactly when the kernel has IPv6 (it lists the host's IPv6 addresses).
pub const IF_INET6: &str = "/proc/net/if_inet6";

/// One family's two programs, by absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub save: PathBuf,
    pub restore: PathBuf,
}

impl Tools {
    /// Finds `iptables-save` and `iptables-restore` (or the `ip6tables` ones) in `/usr/sbin`
    /// or `/sbin`.
    pub fn find(family: Family) -> Result<Tools, RouterError> {
        let find = |name: &str| {
            program(name).ok_or_else(|| {
                RouterError(format!(
                    "{} is not installed: no executable {name} in {} (apt-get install iptables)",
                    family.program(),
                    DIRS.join(" or ")
                ))
            })
        };
        let program = family.program();
        Ok(Tools { save: find(&format!("{program}-save"))?, restore: find(&format!("{program}-restore"))? })
    }
}

/// The program `name` in `/usr/sbin` or `/sbin`, if installed and executable (iptables,
/// ipset, conntrack: the daemon runs them by absolute path only).
fn program(name: &str) -> Option<PathBuf> {
    DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| executable(p))
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// IPv6 on this host, as routing sees it; decided once, when the router is made (a kernel
/// has IPv6 or not until it reboots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6 {
    /// The host has no IPv6 (the text says how we know): no IPv6 packet can reach it, so
    /// there is nothing to guard, `[::]` is served as IPv4's wildcard, and a specific IPv6
    /// address cannot be routed.
    Absent(String),
    /// The host has IPv6: ip6tables by absolute path, or why it cannot be used.
    Present(Result<Tools, RouterError>),
}

impl Ipv6 {
    /// IPv6 is there when [`IF_INET6`] exists; then ip6tables is looked for.
    pub fn detect() -> Ipv6 {
        if !Path::new(IF_INET6).exists() {
            return Ipv6::Absent(format!(
                "this host has no IPv6 ({IF_INET6} is missing: the kernel is built without IPv6 or booted with ipv6.disable=1)"
            ));
        }
        Ipv6::Present(Tools::find(Family::V6))
    }
}

mod conntrack;
mod ipsets;
mod iptables;

pub use iptables::Iptables;

/// Runs `program` with `args` and `input` on its stdin; its stdout on success. Killed (and
/// reaped by tokio) when it takes longer than `timeout`, with `hint` after the error. A failure
/// names `label` (the program's file name when `None`), with at most 2000 characters of its
/// stderr.
async fn run_tool(
    program: &Path,
    args: &[&str],
    input: Option<&str>,
    timeout: Duration,
    (label, hint): (Option<&str>, &str),
) -> Result<Vec<u8>, RouterError> {
    use tokio::io::AsyncWriteExt;
    let name = label.map_or_else(
        || program.file_name().map_or_else(|| program.display().to_string(), |n| n.to_string_lossy().into()),
        str::to_owned,
    );
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if input.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RouterError(format!("cannot run {}: {e}", program.display())))?;
    let stdin = child.stdin.take();
    let work = async move {
        if let (Some(mut stdin), Some(text)) = (stdin, input) {
            stdin.write_all(text.as_bytes()).await?;
        }
        child.wait_with_output().await
    };
    let out = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(RouterError(format!("{name}: {e}"))),
        // Dropping the future dropped the child: kill_on_drop sends SIGKILL.
        Err(_) => {
            return Err(RouterError(format!(
                "{name} did not finish within {timeout:?} and was killed{hint}"
            )));
        }
    };
    if !out.status.success() {
        let stderr: String = String::from_utf8_lossy(&out.stderr).trim().chars().take(2000).collect();
        return Err(RouterError(format!("{name} failed ({}): {stderr}", out.status)));
    }
    Ok(out.stdout)
}
