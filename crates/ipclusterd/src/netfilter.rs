//! Netfilter rules in the kernel. [`Router`] is the narrow interface the supervisor uses;
//! [`Iptables`] implements it with `iptables-save` and one `iptables-restore --noflush` input
//! per change (the rule text, and why each table changes atomically on its own, are
//! [`ipcluster_core::routing`]'s business).
//!
//! Both programs are run by absolute path, resolved once, and bounded in time: a held xtables
//! lock or a stuck kernel call must never stall the supervisor, which waits for them.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use ipcluster_core::routing::{self, AppRoute};
use tokio::{io::AsyncWriteExt, process::Command};

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
pub trait Router: Send + Sync {
    /// Makes the kernel route exactly `routes` (every app with a live generation) and guard
    /// their workers' ports. Each table changes in one atomic transaction; on an error, the
    /// routing (nat) is as it was. Idempotent: applying the same routes again changes nothing.
    fn apply(
        &self,
        routes: &[AppRoute],
    ) -> impl std::future::Future<Output = Result<Applied, RouterError>> + Send;
    /// What of ours is in the kernel now.
    fn current(&self) -> impl std::future::Future<Output = Result<routing::Existing, RouterError>> + Send;
    /// Whether rules can be changed at all, cheaply and without touching the kernel: `Err`
    /// with the reason (for the status line, the journal and `DeployFailed`) when they cannot,
    /// e.g. the iptables programs are not installed. `Ok` does not promise that the next
    /// [`Router::apply`] succeeds (the kernel may still refuse); its error says why then.
    fn check(&self) -> Result<(), RouterError>;
}

/// How long `iptables-restore` waits for the xtables lock (iptables-legacy; iptables-nft takes
/// no lock and ignores it).
const LOCK_WAIT_SECS: u32 = 5;
/// Longest a run of iptables-save or iptables-restore may take before it is killed.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Where the programs are looked for, in order (Debian 12 has /sbin as a link to /usr/sbin).
const DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

/// The two programs, by absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub save: PathBuf,
    pub restore: PathBuf,
}

impl Tools {
    /// Finds `iptables-save` and `iptables-restore` in `/usr/sbin` or `/sbin`.
    pub fn find() -> Result<Tools, RouterError> {
        let find = |name: &str| {
            DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| executable(p)).ok_or_else(|| {
                RouterError(format!(
                    "iptables is not installed: no executable {name} in {} (apt-get install iptables)",
                    DIRS.join(" or ")
                ))
            })
        };
        Ok(Tools { save: find("iptables-save")?, restore: find("iptables-restore")? })
    }
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// [`Router`] with iptables (iptables-nft on Debian 12).
#[derive(Debug, Clone)]
pub struct Iptables {
    tools: Result<Tools, RouterError>,
    timeout: Duration,
}

impl Default for Iptables {
    fn default() -> Self {
        Self::new()
    }
}

impl Iptables {
    /// The programs in their usual places, resolved now; missing ones are reported by
    /// [`Router::check`] and by every call.
    pub fn new() -> Self {
        Self { tools: Tools::find(), timeout: TIMEOUT }
    }

    /// Given programs and time limit (tests).
    pub fn with_tools(tools: Tools, timeout: Duration) -> Self {
        Self { tools: Ok(tools), timeout }
    }

    fn tools(&self) -> Result<&Tools, RouterError> {
        self.tools.as_ref().map_err(Clone::clone)
    }

    /// Runs `program` with `args` and `input` on its stdin; its stdout on success. Killed (and
    /// reaped by tokio) when it takes longer than the time limit.
    async fn run(&self, program: &Path, args: &[&str], input: Option<&str>) -> Result<Vec<u8>, RouterError> {
        let name =
            program.file_name().map_or_else(|| program.display().to_string(), |n| n.to_string_lossy().into());
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
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
        let out = match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(RouterError(format!("{name}: {e}"))),
            // Dropping the future dropped the child: kill_on_drop sends SIGKILL.
            Err(_) => {
                return Err(RouterError(format!(
                    "{name} did not finish within {:?} and was killed (xtables lock held by another program?)",
                    self.timeout
                )));
            }
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stderr: String = stderr.trim().chars().take(2000).collect();
            return Err(RouterError(format!("{name} failed ({}): {stderr}", out.status)));
        }
        Ok(out.stdout)
    }
}

impl Router for Iptables {
    async fn current(&self) -> Result<routing::Existing, RouterError> {
        let tools = self.tools()?;
        // Every table at once (one process); only nat and filter are read.
        let save = self.run(&tools.save, &[], None).await?;
        Ok(routing::parse_existing(&String::from_utf8_lossy(&save)))
    }

    async fn apply(&self, routes: &[AppRoute]) -> Result<Applied, RouterError> {
        let tools = self.tools()?;
        let existing = self.current().await?;
        if routing::up_to_date(&existing, routes) {
            return Ok(Applied::Unchanged);
        }
        let text = routing::render(&existing, routes).map_err(|e| RouterError(e.to_string()))?;
        let wait = LOCK_WAIT_SECS.to_string();
        self.run(&tools.restore, &["--noflush", "--wait", &wait], Some(&text)).await?;
        Ok(Applied::Changed)
    }

    fn check(&self) -> Result<(), RouterError> {
        self.tools().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn route() -> AppRoute {
        AppRoute {
            app: ipcluster_core::name::AppName::new("web").unwrap(),
            listen: vec!["0.0.0.0:80".parse().unwrap()],
            bands: vec![vec![20000]],
            guarded: vec![20000],
        }
    }

    /// A program that hangs (as iptables-restore waiting on a lock another program holds) is
    /// killed at the time limit, and the caller gets an error saying so.
    #[tokio::test]
    async fn a_hanging_program_is_killed_at_the_time_limit() {
        let dir = crate::test_dir("netfilter-timeout");
        let pidfile = dir.join("pid");
        let save = script(&dir, "save", "");
        let restore = script(&dir, "restore", &format!("echo $$ > {}\nexec sleep 30", pidfile.display()));
        let ipt = Iptables::with_tools(Tools { save, restore }, Duration::from_millis(300));
        let started = std::time::Instant::now();
        let e = ipt.apply(&[route()]).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(e.0.contains("did not finish") && e.0.contains("killed"), "{e}");
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
        // Killed: gone, or a zombie until tokio reaps it.
        let gone = (0..100).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            let alive = state.is_some_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| !r.starts_with('Z')));
            if alive {
                std::thread::sleep(Duration::from_millis(20));
            }
            !alive
        });
        assert!(gone, "process {pid} still runs");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn failures_carry_the_programs_message_and_missing_programs_are_named() {
        let dir = crate::test_dir("netfilter-fail");
        let save = script(&dir, "save", "echo '*nat' ; echo COMMIT");
        let restore =
            script(&dir, "restore", "cat > /dev/null; echo 'iptables-restore: line 3 failed' >&2; exit 2");
        let ipt = Iptables::with_tools(Tools { save, restore: restore.clone() }, TIMEOUT);
        assert_eq!(ipt.check(), Ok(()));
        let e = ipt.apply(&[route()]).await.unwrap_err();
        assert!(e.0.contains("restore failed") && e.0.contains("line 3 failed"), "{e}");
        // Nothing to change: restore is not even run.
        assert_eq!(ipt.apply(&[]).await, Ok(Applied::Unchanged));

        let missing =
            Iptables { tools: Err(RouterError("iptables is not installed".into())), timeout: TIMEOUT };
        assert!(missing.check().unwrap_err().0.contains("not installed"));
        assert!(missing.apply(&[route()]).await.unwrap_err().0.contains("not installed"));
        let gone = Iptables::with_tools(Tools { save: dir.join("nope"), restore }, TIMEOUT);
        assert!(gone.current().await.unwrap_err().0.contains("cannot run"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn programs_are_found_by_absolute_path() {
        // On a machine with iptables (CI installs it) both are found where Debian puts them.
        match Tools::find() {
            Ok(t) => assert!(t.save.is_absolute() && t.restore.is_absolute(), "{t:?}"),
            Err(e) => assert!(e.0.contains("apt-get install iptables"), "{e}"),
        }
    }
}
