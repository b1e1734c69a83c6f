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
//! **Two families, one change.** Each family's tables change in transactions of their own,
//! written at the same time. When one family's change fails and the other's succeeded, the
//! other's nat table is taken back ([`routing::render_undo`]), so that on an error routing is
//! as it was in both families, as [`Router::apply`] promises.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ipcluster_core::routing::{self, AppRoute, Family, Tables};
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
            DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| executable(p)).ok_or_else(|| {
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

/// [`Router`] with iptables and ip6tables (iptables-nft on Debian 12).
#[derive(Debug, Clone)]
pub struct Iptables {
    tools: Result<Tools, RouterError>,
    ipv6: Ipv6,
    timeout: Duration,
    /// Set when the IPv6 tables were last read with nothing of ours in them, and nothing was
    /// written there since: with no app to route, they need not be read again.
    v6_clean: Arc<AtomicBool>,
    /// The last IPv6 problem logged for IPv4-only apps (each is logged once, not every 2 s).
    v6_warned: Arc<Mutex<Option<String>>>,
}

impl Default for Iptables {
    fn default() -> Self {
        Self::new()
    }
}

impl Iptables {
    /// The programs in their usual places and IPv6 as this host has it, resolved now;
    /// missing ones are reported by [`Router::check`] and by every call.
    pub fn new() -> Self {
        Self::with(Tools::find(Family::V4), Ipv6::detect(), TIMEOUT)
    }

    /// Given IPv4 programs, IPv6 and time limit (tests).
    pub fn with_tools(tools: Tools, ipv6: Ipv6, timeout: Duration) -> Self {
        Self::with(Ok(tools), ipv6, timeout)
    }

    fn with(tools: Result<Tools, RouterError>, ipv6: Ipv6, timeout: Duration) -> Self {
        Self { tools, ipv6, timeout, v6_clean: Arc::default(), v6_warned: Arc::default() }
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

    /// What of ours is in one family's tables (every table at once, one process; only nat and
    /// filter are read).
    async fn read(&self, family: Family, tools: &Tools) -> Result<Tables, RouterError> {
        let save = self.run(&tools.save, &[], None).await?;
        let tables = Tables::parse(family, &String::from_utf8_lossy(&save));
        if family == Family::V6 && tables.is_empty() {
            self.v6_clean.store(true, Ordering::Relaxed);
        }
        Ok(tables)
    }

    /// One `--noflush` transaction per table in `text`.
    async fn restore(&self, family: Family, tools: &Tools, text: &str) -> Result<(), RouterError> {
        if family == Family::V6 {
            self.v6_clean.store(false, Ordering::Relaxed);
        }
        let wait = LOCK_WAIT_SECS.to_string();
        self.run(&tools.restore, &["--noflush", "--wait", &wait], Some(text)).await.map(drop)
    }

    /// The IPv6 programs to read and write with for `routes`, `None` when the IPv6 tables are
    /// left alone; an error when `routes` need IPv6 and this host cannot give it.
    fn ipv6_for(&self, routes: &[AppRoute]) -> Result<Option<&Tools>, RouterError> {
        match &self.ipv6 {
            Ipv6::Absent(why) => match routing::first_entry(routes, Family::V6, true) {
                Some((app, entry)) => Err(RouterError(format!("cannot route {entry} of app {app}: {why}"))),
                None => Ok(None),
            },
            Ipv6::Present(Err(e)) => self.ipv6_failed(routes, e).map(|()| None),
            Ipv6::Present(Ok(tools)) => {
                Ok((!routes.is_empty() || !self.v6_clean.load(Ordering::Relaxed)).then_some(tools))
            }
        }
    }

    /// ip6tables failed (or is missing) with `e`: an error for routes with an entry IPv6
    /// serves; for IPv4-only routes, the journal says once that their ports are not guarded
    /// from IPv6 hosts, and IPv4 goes on.
    fn ipv6_failed(&self, routes: &[AppRoute], e: &RouterError) -> Result<(), RouterError> {
        if let Some((app, entry)) = routing::first_entry(routes, Family::V6, false) {
            let hint = if routing::served_by(Family::V4, &entry).is_some() {
                format!("; listen on 0.0.0.0:{} to serve IPv4 clients only", entry.port())
            } else {
                String::new()
            };
            return Err(RouterError(format!("cannot route {entry} of app {app} over IPv6: {e}{hint}")));
        }
        if !routes.is_empty() {
            let warning = format!("worker ports are not guarded from IPv6 hosts: {e}");
            let mut last = self.v6_warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.as_deref() != Some(warning.as_str()) {
                tracing::warn!("{warning}");
                *last = Some(warning);
            }
        }
        Ok(())
    }
}

fn conflict(e: routing::Conflict) -> RouterError {
    RouterError(e.to_string())
}

impl Router for Iptables {
    async fn current(&self) -> Result<routing::Existing, RouterError> {
        let tools = self.tools()?;
        let six = match &self.ipv6 {
            Ipv6::Present(Ok(t)) => Some(t),
            _ => None,
        };
        let (v4, v6) = tokio::join!(self.read(Family::V4, tools), async {
            match six {
                Some(t) => Some(self.read(Family::V6, t).await),
                None => None,
            }
        });
        // Unreadable IPv6 tables are reported and left out: what IPv4 says still counts (an
        // adoption learns from it which generations are live).
        let v6 = v6.and_then(|r| r.map_err(|e| tracing::warn!("cannot read the IPv6 rules: {e}")).ok());
        Ok(routing::Existing { v4: v4?, v6 })
    }

    async fn apply(&self, routes: &[AppRoute]) -> Result<Applied, RouterError> {
        let tools = self.tools()?;
        let six = self.ipv6_for(routes)?;
        let (v4, v6) = tokio::join!(self.read(Family::V4, tools), async {
            match six {
                Some(t) => Some(self.read(Family::V6, t).await),
                None => None,
            }
        });
        let v4 = v4?;
        let v6 = match v6 {
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                self.ipv6_failed(routes, &e)?;
                None
            }
            None => None,
        };
        let text = |family: Family, t: &Tables| {
            (!routing::family_up_to_date(family, t, routes))
                .then(|| routing::render(family, t, routes).map_err(conflict))
                .transpose()
        };
        let text4 = text(Family::V4, &v4)?;
        let text6 = match (six, &v6) {
            (Some(t6), Some(before)) => text(Family::V6, before)?.map(|text| (t6, before, text)),
            _ => None,
        };
        // Both families at once: a dual-stack cutover costs the slower of the two, and the
        // moment in which they disagree is as short as it can be.
        let (r6, r4) = tokio::join!(
            async {
                match &text6 {
                    Some((t6, _, text)) => Some(self.restore(Family::V6, t6, text).await),
                    None => None,
                }
            },
            async {
                match &text4 {
                    Some(text) => Some(self.restore(Family::V4, tools, text).await),
                    None => None,
                }
            }
        );
        let (ok6, ok4) = (matches!(r6, Some(Ok(()))), matches!(r4, Some(Ok(()))));
        if v6.is_some() && !matches!(r6, Some(Err(_))) {
            // IPv6 works again: its next failure is worth a line in the journal.
            *self.v6_warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        let mut errors = Vec::new();
        if let Some(Err(e)) = r4 {
            errors.push(e.0);
        }
        if let Some(Err(e)) = r6 {
            // For IPv4-only routes only the IPv6 guard failed: logged, and IPv4's change stands.
            if let Err(e) = self.ipv6_failed(routes, &e) {
                errors.push(e.0);
            }
        }
        if errors.is_empty() {
            return Ok(if ok6 || ok4 { Applied::Changed } else { Applied::Unchanged });
        }
        // One family failed: the other's nat table is taken back, so that routing is as it
        // was in both (its filter keeps the guard of the ports workers hold: right either way).
        let undo = [
            (ok6, Family::V6, text6.as_ref().map(|(t6, before, _)| (*t6, *before))),
            (ok4, Family::V4, Some((tools, &v4))),
        ];
        for (family, tools, before) in
            undo.into_iter().filter(|(ok, ..)| *ok).filter_map(|(_, f, tb)| tb.map(|(t, b)| (f, t, b)))
        {
            if let Some(text) = routing::render_undo(family, before, routes)
                && let Err(u) = self.restore(family, tools, &text).await
            {
                errors.push(format!("the {family} nat rules, already changed, could not be taken back: {u}"));
            }
        }
        Err(RouterError(errors.join("; ")))
    }

    fn check(&self) -> Result<(), RouterError> {
        self.tools().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// `p` as one shell word (a checkout's path may hold spaces).
    fn quoted(p: &Path) -> String {
        format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn route() -> AppRoute {
        route_on("web", &["0.0.0.0:80"])
    }

    fn route_on(app: &str, listen: &[&str]) -> AppRoute {
        AppRoute {
            app: ipcluster_core::name::AppName::new(app).unwrap(),
            listen: listen.iter().map(|l| l.parse().unwrap()).collect(),
            bands: vec![(20000..).take(listen.len()).collect()],
            guarded: (20000..).take(listen.len()).collect(),
        }
    }

    fn no_ipv6() -> Ipv6 {
        Ipv6::Absent("this host has no IPv6 (test)".into())
    }

    /// A program that hangs (as iptables-restore waiting on a lock another program holds) is
    /// killed at the time limit, and the caller gets an error saying so.
    #[tokio::test]
    async fn a_hanging_program_is_killed_at_the_time_limit() {
        let dir = crate::test_dir("netfilter-timeout");
        let pidfile = dir.join("pid");
        let save = script(&dir, "save", "");
        let restore = script(&dir, "restore", &format!("echo $$ > {}\nexec sleep 30", quoted(&pidfile)));
        let ipt = Iptables::with_tools(Tools { save, restore }, no_ipv6(), Duration::from_millis(300));
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
        let ipt = Iptables::with_tools(Tools { save, restore: restore.clone() }, no_ipv6(), TIMEOUT);
        assert_eq!(ipt.check(), Ok(()));
        let e = ipt.apply(&[route()]).await.unwrap_err();
        assert!(e.0.contains("restore failed") && e.0.contains("line 3 failed"), "{e}");
        // Nothing to change: restore is not even run.
        assert_eq!(ipt.apply(&[]).await, Ok(Applied::Unchanged));

        let missing =
            Iptables::with(Err(RouterError("iptables is not installed".into())), no_ipv6(), TIMEOUT);
        assert!(missing.check().unwrap_err().0.contains("not installed"));
        assert!(missing.apply(&[route()]).await.unwrap_err().0.contains("not installed"));
        let gone = Iptables::with_tools(Tools { save: dir.join("nope"), restore }, no_ipv6(), TIMEOUT);
        assert!(gone.current().await.unwrap_err().0.contains("cannot run"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn programs_are_found_by_absolute_path() {
        // On a machine with iptables (CI installs it) all four are found where Debian puts them.
        for family in Family::ALL {
            match Tools::find(family) {
                Ok(t) => {
                    assert!(t.save.is_absolute() && t.restore.is_absolute(), "{t:?}");
                    let name = t.restore.file_name().unwrap().to_string_lossy().into_owned();
                    assert_eq!(name, format!("{}-restore", family.program()));
                }
                Err(e) => assert!(e.0.contains("apt-get install iptables"), "{e}"),
            }
        }
        // This host's IPv6 as the router sees it, and the kernel agree.
        match Ipv6::detect() {
            Ipv6::Absent(why) => {
                assert!(!Path::new(IF_INET6).exists());
                assert!(why.contains("no IPv6"), "{why}");
            }
            Ipv6::Present(_) => assert!(Path::new(IF_INET6).exists()),
        }
    }

    /// What the code under test logged (a `tracing` writer).
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
        type Writer = Logs;
        fn make_writer(&'a self) -> Logs {
            self.clone()
        }
    }

    /// Programs that log every run (name, arguments and stdin) to a log of their family (the
    /// two families run at the same time); the saves print `*nat` (IPv4) and `save6`; a
    /// restore whose family is in `failing` fails.
    struct Fake {
        dir: PathBuf,
    }

    impl Fake {
        fn new(test: &str, save6: &str, failing: &[Family]) -> Fake {
            let dir = crate::test_dir(test);
            for (family, save) in [(Family::V4, "*nat\nCOMMIT\n"), (Family::V6, save6)] {
                let p = family.program();
                let log = dir.join(format!("{p}.log"));
                std::fs::write(dir.join(format!("{p}.out")), save).unwrap();
                let out = dir.join(format!("{p}.out"));
                script(
                    &dir,
                    &format!("{p}-save"),
                    &format!("echo {p}-save >> {}\ncat {}", quoted(&log), quoted(&out)),
                );
                let fail = if failing.contains(&family) { "echo 'line 2 failed' >&2; exit 1" } else { "" };
                script(
                    &dir,
                    &format!("{p}-restore"),
                    &format!("echo \"{p}-restore $*\" >> {0}\ncat >> {0}\n{fail}", quoted(&log)),
                );
            }
            Fake { dir }
        }

        fn tools(&self, family: Family) -> Tools {
            let p = family.program();
            Tools { save: self.dir.join(format!("{p}-save")), restore: self.dir.join(format!("{p}-restore")) }
        }

        fn router(&self, ipv6: Option<Ipv6>) -> Iptables {
            let ipv6 = ipv6.unwrap_or_else(|| Ipv6::Present(Ok(self.tools(Family::V6))));
            Iptables::with_tools(self.tools(Family::V4), ipv6, TIMEOUT)
        }

        /// One family's log since the last call.
        fn take_of(&self, family: Family) -> String {
            let log = self.dir.join(format!("{}.log", family.program()));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            text
        }

        /// Both logs since the last call, IPv4's first.
        fn take(&self) -> String {
            self.take_of(Family::V4) + &self.take_of(Family::V6)
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Without IPv6, `[::]` is IPv4's wildcard and nothing of ip6tables runs; a specific IPv6
    /// address cannot be routed, the error says why, and nothing changes.
    #[tokio::test]
    async fn without_ipv6_the_wildcard_is_ipv4s_and_an_ipv6_address_is_refused_with_why() {
        let fake = Fake::new("netfilter-no-ipv6", "", &[]);
        let ipt = fake.router(Some(no_ipv6()));
        assert_eq!(ipt.apply(&[route_on("web", &["[::]:80"])]).await, Ok(Applied::Changed));
        let log = fake.take();
        assert!(log.contains("-A IPC-web -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 20000"), "{log}");
        assert!(!log.contains("ip6tables"), "{log}");
        let e = ipt.apply(&[route_on("web", &["[::]:80"]), route_on("api", &["[2001:db8::1]:443"])]).await;
        assert_eq!(
            e,
            Err(RouterError(
                "cannot route [2001:db8::1]:443 of app api: this host has no IPv6 (test)".into()
            ))
        );
        assert_eq!(fake.take(), "", "nothing ran");
        assert_eq!(ipt.check(), Ok(()), "IPv4 is usable");
    }

    /// With IPv6 but no usable ip6tables, IPv4-only apps are routed (their IPv6 guard is
    /// missing, and the journal says so); an entry IPv6 serves is refused with the reason and
    /// the way to serve IPv4 alone, and nothing changes.
    #[tokio::test]
    async fn without_ip6tables_ipv4_apps_still_work_and_ipv6_entries_are_refused_with_why() {
        let fake = Fake::new("netfilter-no-ip6tables", "", &[]);
        let missing = Ipv6::Present(Err(RouterError(
            "ip6tables is not installed: no executable ip6tables-save".into(),
        )));
        let ipt = fake.router(Some(missing));
        assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
        let log = fake.take();
        assert!(log.starts_with("iptables-save\niptables-restore --noflush --wait 5\n"), "{log}");
        assert!(!log.contains("ip6tables"), "{log}");
        for (listen, hint) in [("[::]:80", true), ("[2001:db8::1]:80", false)] {
            let e = ipt.apply(&[route(), route_on("six", &[listen])]).await.unwrap_err();
            assert!(
                e.0.starts_with(&format!(
                    "cannot route {listen} of app six over IPv6: ip6tables is not installed"
                )),
                "{e}"
            );
            assert_eq!(e.0.contains("listen on 0.0.0.0:80 to serve IPv4 clients only"), hint, "{e}");
        }
        assert_eq!(fake.take(), "", "nothing ran");

        // ip6tables-save fails at run time (say, a kernel without IPv6 netfilter): the same.
        let fake = Fake::new("netfilter-ip6tables-fails", "", &[]);
        script(&fake.dir, "ip6tables-save", "echo 'ip6tables-save: table nat does not exist' >&2; exit 1");
        let ipt = fake.router(None);
        assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
        assert!(fake.take().contains("iptables-restore"));
        let e = ipt.apply(&[route(), route_on("six", &["[::]:81"])]).await.unwrap_err();
        assert!(
            e.0.contains("[::]:81 of app six over IPv6: ip6tables-save failed")
                && e.0.contains("does not exist"),
            "{e}"
        );
        assert!(!fake.take().contains("restore"), "nothing was written for the refused routes");
    }

    /// The IPv6 tables are read while an app runs (its ports are guarded there too), and, with
    /// no app, only until a read showed nothing of ours.
    #[tokio::test]
    async fn the_ipv6_tables_are_read_only_when_needed_or_ours_are_there() {
        let fake = Fake::new("netfilter-v6-reads", "*nat\nCOMMIT\n", &[]);
        let ipt = fake.router(None);
        assert_eq!(ipt.apply(&[]).await, Ok(Applied::Unchanged));
        // Both at once: in either order.
        let mut runs: Vec<String> = fake.take().lines().map(str::to_owned).collect();
        runs.sort();
        assert_eq!(runs, ["ip6tables-save", "iptables-save"], "the first time: is anything of ours there?");
        assert_eq!(ipt.apply(&[]).await, Ok(Applied::Unchanged));
        assert_eq!(fake.take(), "iptables-save\n", "nothing was: not read again");
        // An IPv4-only app: the guard of its ports goes into both families.
        assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
        let log = fake.take();
        let v6 = log.split("ip6tables-restore --noflush --wait 5\n").nth(1).unwrap();
        let v6 = v6.split("iptables-restore").next().unwrap();
        assert!(v6.starts_with("*filter\n") && !v6.contains("*nat") && v6.contains("! -i lo"), "{log}");
        // Ours is there now (the fake's save still says otherwise, so make it say so).
        let ours = "*filter\n:IPCLUSTER - [0:0]\n-A INPUT ! -i lo -p tcp -m conntrack --ctstate NEW -m conntrack ! --ctstate DNAT -j IPCLUSTER\nCOMMIT\n";
        std::fs::write(fake.dir.join("ip6tables.out"), ours).unwrap();
        for _ in 0..2 {
            let _ = ipt.apply(&[]).await;
            assert!(fake.take().contains("ip6tables-save"), "ours may be there: read every time");
        }
    }

    /// Both families are written at once; when one fails, the other's nat table is taken
    /// back, so that routing is as it was in both families.
    #[tokio::test]
    async fn when_one_family_fails_the_other_nat_change_is_undone() {
        let restores = |log: &str| log.lines().filter(|l| l.contains("-restore ")).count();
        let fake = Fake::new("netfilter-undo", "*nat\nCOMMIT\n", &[Family::V4]);
        let ipt = fake.router(None);
        let e = ipt.apply(&[route_on("web", &["[::]:80"])]).await.unwrap_err();
        assert!(e.0.contains("iptables-restore failed") && e.0.contains("line 2 failed"), "{e}");
        let (v4, v6) = (fake.take_of(Family::V4), fake.take_of(Family::V6));
        assert_eq!((restores(&v4), restores(&v6)), (1, 2), "{v4}\n{v6}");
        let undo = v6.rsplit("ip6tables-restore --noflush --wait 5\n").next().unwrap();
        assert!(
            undo.starts_with("*nat\n") && undo.contains("-D PREROUTING ") && undo.contains("-X IPC-web\n"),
            "{undo}"
        );
        // Only the guard changed in IPv6 (an IPv4-only app): nothing to undo.
        let _ = ipt.apply(&[route()]).await.unwrap_err();
        assert_eq!(restores(&fake.take_of(Family::V6)), 1);
        // The undo fails too: the error says both.
        script(
            &fake.dir,
            "ip6tables-restore",
            "if grep -q '^-D ' ; then echo 'undo refused' >&2; exit 1; fi",
        );
        let e = ipt.apply(&[route_on("web", &["[::]:80"])]).await.unwrap_err();
        assert!(
            e.0.contains("line 2 failed") && e.0.contains("IPv6 nat rules") && e.0.contains("undo refused"),
            "{e}"
        );

        // IPv6 fails for an app it serves: IPv4's change is taken back.
        let fake = Fake::new("netfilter-undo-4", "*nat\nCOMMIT\n", &[Family::V6]);
        let ipt = fake.router(None);
        let e = ipt.apply(&[route_on("web", &["[::]:80"])]).await.unwrap_err();
        assert!(
            e.0.starts_with("cannot route [::]:80 of app web over IPv6: ip6tables-restore failed"),
            "{e}"
        );
        let v4 = fake.take_of(Family::V4);
        assert_eq!(restores(&v4), 2, "{v4}");
        let undo = v4.rsplit("iptables-restore --noflush --wait 5\n").next().unwrap();
        assert!(undo.starts_with("*nat\n") && undo.contains("-X IPC-web\n"), "{undo}");
        // For an IPv4-only app IPv6 carries only the guard: logged, and IPv4's change stands.
        let logs = Logs::default();
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt().with_writer(logs.clone()).with_ansi(false).finish(),
        );
        assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
        assert_eq!(restores(&fake.take_of(Family::V4)), 1);
        let warning = "worker ports are not guarded from IPv6 hosts: ip6tables-restore failed";
        assert_eq!(logs.text().matches(warning).count(), 1, "{}", logs.text());
        // Once, not at every comparison: reading the IPv6 tables works, writing them still not.
        for _ in 0..3 {
            // (The fake's IPv4 save never shows what was written: IPv4 is written again.)
            assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
        }
        assert_eq!(logs.text().matches(warning).count(), 1, "{}", logs.text());
        // IPv6 works again; its next failure is news again.
        script(&fake.dir, "ip6tables-restore", "cat > /dev/null");
        assert_eq!(ipt.apply(&[route()]).await, Ok(Applied::Changed));
        script(&fake.dir, "ip6tables-restore", "cat > /dev/null; exit 1");
        let _ = ipt.apply(&[route_on("web", &["0.0.0.0:81"])]).await;
        assert_eq!(logs.text().matches("worker ports are not guarded").count(), 2, "{}", logs.text());
    }
}
