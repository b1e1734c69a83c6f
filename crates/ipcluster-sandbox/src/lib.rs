//! A throwaway systemd host for end-to-end tests, the demo and benchmarks.
//!
//! [`Sandbox::boot`] starts a real systemd as PID 1 of fresh mount, PID, UTS, network and cgroup
//! namespaces (docs/ARCHITECTURE.md, "The test sandbox"):
//!
//! 1. a cgroup of its own under the host's cgroup2 hierarchy, which becomes the sandbox's root;
//! 2. `unshare --fork` into new namespaces, running `stage2.sh` as PID 1: private mounts, overlays on
//!    /etc /usr /var (upper layers in the work directory), tmpfs on /tmp /run /var/log/journal,
//!    /proc and cgroup2 remounted, loopback up; then `exec systemd`;
//! 3. wait until `systemctl is-system-running` says `running`.
//!
//! The sandbox works from a checkout anywhere (home, /srv, /tmp, a path with spaces): stage2 names
//! the work directory only relatively once its path may be covered, and the build to install
//! ([`Build`]) is bound read-only into the sandbox at [`HOST_VIEW`]`/<host path>` before /tmp is
//! covered ([`Sandbox::inside`] maps a host path to it).
//!
//! Commands run inside with `nsenter --all`. Dropping the [`Sandbox`] (also while a test panics)
//! kills its PID 1, which takes the whole PID namespace with it, removes its cgroups and its work
//! directory. If the owning process dies without unwinding (a test runner's SIGKILL),
//! [`collect_stale`] kills and removes what is left: every boot and `cargo xtask test` call it.
//!
//! Invariant: nothing here changes the host's netfilter rules, /etc, /usr, /var or /tmp.

use std::{
    ffi::OsStr,
    fs,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

mod cleanup;
mod paths;

pub use cleanup::collect_stale;
use cleanup::remove_cgroup;
#[cfg(test)]
use paths::cargo_target_dir;
pub use paths::{TARGET_DIR_VAR, artifact, base_dir, bin_dir, target_dir, workspace_dir};

const STAGE2: &str = include_str!("stage2.sh");
/// Host cgroup2 hierarchy. On this machine the host runs in hybrid mode, so cgroup2 is at
/// `unified/`; on a pure cgroup2 host it is the root itself.
const CGROUP_ROOTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];
/// Prefix of sandbox cgroups and work directories: `ipcsb-<owner pid>-<n>`.
const PREFIX: &str = "ipcsb-";
/// PATH inside the sandbox.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the sandbox sees the host directories it shares (read-only): host path `P` is
/// `HOST_VIEW` + `P` inside. In the sandbox's own /run: never under its /tmp, which
/// systemd-tmpfiles empties at boot.
pub const HOST_VIEW: &str = "/run/ipcluster-sandbox/host";
/// Base of work directories when the workspace is under a directory the sandbox overlays.
const FALLBACK_BASE: &str = "/run/ipcluster-sandboxes";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Why end-to-end work cannot run on this machine, if it cannot: not root, or no systemd/unshare.
pub fn unavailable_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("sandboxes need root (namespaces, cgroups, mounts); run as root".into());
    }
    for tool in ["/lib/systemd/systemd", "/usr/bin/unshare", "/usr/bin/nsenter"] {
        if !Path::new(tool).exists() {
            return Some(format!("{tool} is missing"));
        }
    }
    if cgroup2_root().is_none() {
        return Some("no cgroup2 hierarchy under /sys/fs/cgroup".into());
    }
    None
}

fn cgroup2_root() -> Option<&'static Path> {
    CGROUP_ROOTS
        .iter()
        .map(Path::new)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.subtree_control").exists())
}

/// The build a sandbox installs: the xtask binary (`xtask install` is the one install path) and the
/// directory of the release binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// The `xtask` binary.
    pub xtask: PathBuf,
    /// The directory of `ipclusterd`, `ipclusterctl` and `ipcluster-demo`.
    pub bin_dir: PathBuf,
}

impl Build {
    /// `$IPCLUSTER_XTASK` and `$IPCLUSTER_BIN_DIR`, else `debug/xtask` and `release` in the
    /// [`target_dir`]; fails unless both exist.
    pub fn locate() -> Result<Self> {
        Ok(Build { xtask: artifact("IPCLUSTER_XTASK", "debug/xtask")?, bin_dir: bin_dir()? })
    }
}

/// How to boot a sandbox; [`Options::default`] is what [`Sandbox::boot`] uses.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Where its work directory goes; default [`base_dir`].
    pub base_dir: Option<PathBuf>,
    /// The build [`Sandbox::install`] installs; default [`Build::locate`], if it is built.
    pub build: Option<Build>,
    /// More host directories to show inside, read-only (see [`Sandbox::inside`]).
    pub share: Vec<PathBuf>,
}

/// A booted systemd host in its own namespaces. Dropping it tears it down.
#[derive(Debug)]
pub struct Sandbox {
    name: String,
    work: PathBuf,
    cgroup: PathBuf,
    unshare: Child,
    init_pid: u32,
    build: Option<Build>,
    /// Canonical host directories bound under [`HOST_VIEW`].
    shared: Vec<PathBuf>,
}

/// Output of a command run inside, with its status.
pub type Outcome = Output;

impl Sandbox {
    /// Boots a sandbox with the build found by [`Build::locate`] (if built) and returns once
    /// `systemctl is-system-running` says `running`.
    pub fn boot() -> Result<Self> {
        Self::boot_with(Options::default())
    }

    /// Boots a sandbox as `options` say and returns once `systemctl is-system-running` says
    /// `running`.
    pub fn boot_with(options: Options) -> Result<Self> {
        if let Some(why) = unavailable_reason() {
            bail!("cannot boot a sandbox: {why}");
        }
        collect_stale();
        let build = match options.build {
            Some(b) => Some(b),
            None => Build::locate().ok(),
        };
        let build_dirs =
            build.iter().flat_map(|b| [b.xtask.parent().map(Path::to_path_buf), Some(b.bin_dir.clone())]);
        let mut canonical = Vec::new();
        for dir in build_dirs.flatten().chain(options.share) {
            let dir = dir.canonicalize().with_context(|| format!("cannot share {}", dir.display()))?;
            if dir.starts_with("/run") {
                bail!("cannot share {}: the sandbox's own /run covers it", dir.display());
            }
            canonical.push(dir);
        }
        let shared = outermost(canonical);
        let name = format!("{PREFIX}{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let work = options.base_dir.unwrap_or_else(base_dir).join(&name);
        fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
        let work = work.canonicalize()?;
        let stage2 = work.join("stage2.sh");
        fs::write(&stage2, STAGE2)?;
        let cgroup_root = cgroup2_root().context("no cgroup2 hierarchy")?;
        let cgroup = cgroup_root.join(&name);
        fs::create_dir(&cgroup).with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
        let procs = cgroup.join("cgroup.procs");

        let mut cmd = Command::new("/usr/bin/unshare");
        cmd.args(["--mount", "--pid", "--fork", "--uts", "--net", "--cgroup", "--kill-child=SIGKILL", "--"])
            .arg("/bin/sh")
            .arg(&stage2)
            .arg(&work)
            .args(&shared)
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(work.join("stage2.log"))?);
        // SAFETY: between fork and exec only async-signal-safe calls: open/write/close on a path
        // prepared before the fork.
        unsafe {
            let procs_c = std::ffi::CString::new(procs.as_os_str().as_encoded_bytes())?;
            cmd.pre_exec(move || {
                // Move this process (and so everything it forks) into the sandbox's cgroup, which
                // becomes the root of the new cgroup namespace.
                let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                // No PR_SET_PDEATHSIG: it fires when the spawning *thread* exits, and sandboxes are
                // often booted from short-lived threads. A killed owner leaves its sandbox to
                // `collect_stale`, which the next boot and `cargo xtask test` run.
                Ok(())
            });
        }
        let unshare = cmd.spawn().context("cannot start unshare")?;
        let mut sandbox = Sandbox { name, work, cgroup, init_pid: 0, unshare, build, shared };
        sandbox.init_pid = sandbox.find_init()?;
        sandbox.wait_running(Duration::from_secs(60))?;
        Ok(sandbox)
    }

    fn find_init(&mut self) -> Result<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let children = format!("/proc/{0}/task/{0}/children", self.unshare.id());
        loop {
            if let Some(status) = self.unshare.try_wait()? {
                bail!("sandbox exited during setup ({status}): {}", self.log_tail());
            }
            if let Some(pid) =
                fs::read_to_string(&children).ok().and_then(|s| s.split_whitespace().next()?.parse().ok())
            {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!("sandbox PID 1 did not appear: {}", self.log_tail());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_running(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.unshare.try_wait()? {
                bail!("sandbox exited while booting ({status}): {}", self.log_tail());
            }
            // systemd must have exec'd (PID 1 is no longer the setup shell) before asking it.
            let comm = fs::read_to_string(format!("/proc/{}/comm", self.init_pid)).unwrap_or_default();
            if comm.trim() == "systemd" {
                let out = self.run(["systemctl", "is-system-running"])?;
                last = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                match last.as_str() {
                    "running" => return Ok(()),
                    "degraded" => {
                        let failed = self.run(["systemctl", "--failed", "--no-legend"])?;
                        bail!("sandbox booted degraded: {}", String::from_utf8_lossy(&failed.stdout));
                    }
                    _ => {}
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("sandbox not running after {timeout:?} (last state {last:?}): {}", self.log_tail())
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["stage2.log", "console.log"] {
            if let Ok(text) = fs::read_to_string(self.work.join(f)) {
                let lines: Vec<&str> = text.lines().collect();
                s.push_str(&lines[lines.len().saturating_sub(20)..].join("\n"));
            }
        }
        s
    }

    /// The sandbox's name (`ipcsb-<pid>-<n>`), unique on the host.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID of the sandbox's systemd, as seen from the host.
    pub fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// A command that runs `argv` inside every namespace of the sandbox (not yet started), with a
    /// clean environment. Use it to stream output or run in the background.
    pub fn command<I, S>(&self, argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("/usr/bin/nsenter");
        cmd.arg("--target")
            .arg(self.init_pid.to_string())
            .args(["--all", "--"])
            .args(argv)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .env("TERM", "dumb")
            .stdin(Stdio::null());
        cmd
    }

    /// Makes this a host without ipclusterd, for tests that install its Debian package:
    /// removes what this machine's install from source shows through (the unit, the slice, the
    /// bus policy, the binaries in /usr/local/bin) and the image's `policy-rc.d` (the package
    /// starts and restarts the daemon).
    pub fn without_source_install(&self) -> Result<()> {
        self.check([
            "rm",
            "-f",
            "/usr/sbin/policy-rc.d",
            "/etc/systemd/system/ipclusterd.service",
            "/etc/systemd/system/ipcluster.slice",
            "/etc/dbus-1/system.d/org.ipcluster1.conf",
            "/usr/local/bin/ipclusterd",
            "/usr/local/bin/ipclusterctl",
        ])
        .map(drop)
    }

    /// Runs `argv` inside and captures its output and status (whatever the status is).
    pub fn run<I, S>(&self, argv: I) -> Result<Outcome>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(argv);
        cmd.output().with_context(|| format!("cannot run {cmd:?} in sandbox {}", self.name))
    }

    /// Runs `argv` inside; fails unless it exits 0. Returns its stdout.
    pub fn check<I, S>(&self, argv: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let argv: Vec<_> = argv.into_iter().map(|s| s.as_ref().to_owned()).collect();
        let out = self.run(&argv)?;
        if !out.status.success() {
            bail!(
                "{:?} failed in sandbox ({}):\nstdout: {}\nstderr: {}",
                argv,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a new thread that has entered the sandbox's network namespace, and returns its
    /// result. Sockets created by `f` stay in the sandbox's namespace wherever they are used
    /// later, so a test can open connections "from inside" and use them from any thread.
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn_in_netns(f)?.join().map_err(|_| anyhow::anyhow!("thread in the sandbox's netns panicked"))
    }

    /// Like [`Sandbox::in_netns`], without waiting: the thread's handle.
    pub fn spawn_in_netns<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<thread::JoinHandle<T>> {
        let ns = fs::File::open(format!("/proc/{}/ns/net", self.init_pid))
            .context("cannot open the sandbox's netns")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = thread::spawn(move || {
            // setns affects only this thread; it exits when `f` returns.
            let entered = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET);
            let _ = tx.send(entered.map_err(|e| e.to_string()));
            drop(ns);
            if entered.is_err() {
                // The caller sees the error below; never run `f` in the host's namespace.
                std::process::abort();
            }
            f()
        });
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => bail!("cannot enter the sandbox's netns: {e}"),
            Err(_) => bail!("cannot enter the sandbox's netns"),
        }
    }

    /// The main PID (inside the sandbox) of a running service, from `systemctl show`.
    pub fn main_pid(&self, unit: &str) -> Result<u32> {
        let out = self.check(["systemctl", "show", "-p", "MainPID", "--value", unit])?;
        out.trim().parse().with_context(|| format!("no main pid for {unit}: {out:?}"))
    }

    /// The address of the sandbox's system bus, reachable from the host (as root).
    pub fn system_bus_address(&self) -> String {
        format!("unix:path=/proc/{}/root/run/dbus/system_bus_socket", self.init_pid)
    }

    /// The host path that reaches `inside` within the sandbox's mount namespace.
    pub fn host_path(&self, inside: impl AsRef<Path>) -> PathBuf {
        let inside = inside.as_ref();
        let rel = inside.strip_prefix("/").unwrap_or(inside);
        PathBuf::from(format!("/proc/{}/root", self.init_pid)).join(rel)
    }

    /// Writes `contents` to `inside` (creating parent directories) with `mode`.
    pub fn write_file(&self, inside: impl AsRef<Path>, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.host_path(&inside);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("cannot write {}", inside.as_ref().display()))?;
        f.write_all(contents.as_ref())?;
        Ok(())
    }

    /// Reads `inside` from the sandbox.
    pub fn read_file(&self, inside: impl AsRef<Path>) -> Result<String> {
        fs::read_to_string(self.host_path(&inside))
            .with_context(|| format!("cannot read {}", inside.as_ref().display()))
    }

    /// Copies a host file to `inside`, keeping its permission bits.
    pub fn copy_in(&self, host: impl AsRef<Path>, inside: impl AsRef<Path>) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data =
            fs::read(host.as_ref()).with_context(|| format!("cannot read {}", host.as_ref().display()))?;
        let mode = fs::metadata(host.as_ref())?.permissions().mode() & 0o7777;
        self.write_file(inside, data, mode)
    }

    /// Installs the build inside with the same command a user runs: `xtask install --no-build
    /// --root /` (binaries must be built on the host first: the sandbox has no network).
    pub fn install(&self) -> Result<()> {
        let build = self.build()?;
        let xtask = self.inside(&build.xtask)?;
        let bin_dir = self.inside(&build.bin_dir)?;
        self.check([
            xtask.as_os_str(),
            OsStr::new("install"),
            OsStr::new("--no-build"),
            OsStr::new("--bin-dir"),
            bin_dir.as_os_str(),
            OsStr::new("--root"),
            OsStr::new("/"),
        ])?;
        Ok(())
    }

    /// The build this sandbox installs.
    pub fn build(&self) -> Result<&Build> {
        self.build.as_ref().context(
            "no build to install: run `cargo build --release --bins && cargo build -p xtask` first, \
             or set IPCLUSTER_XTASK and IPCLUSTER_BIN_DIR",
        )
    }

    /// Where the sandbox sees host path `host` (in a shared directory: the build, or one of
    /// [`Options::share`]), under [`HOST_VIEW`].
    pub fn inside(&self, host: impl AsRef<Path>) -> Result<PathBuf> {
        let host = host.as_ref();
        let canonical = host.canonicalize().with_context(|| format!("{} not found", host.display()))?;
        if !self.shared.iter().any(|dir| canonical.starts_with(dir)) {
            bail!("{} is not in a directory shared with sandbox {}", host.display(), self.name);
        }
        Ok(host_view(&canonical))
    }

    /// Tears the sandbox down now (also done on drop).
    pub fn teardown(mut self) -> Result<()> {
        self.destroy()
    }

    fn destroy(&mut self) -> Result<()> {
        if self.init_pid != 0 {
            // SIGKILL to a PID namespace's init kills every process in the namespace.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.init_pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            self.init_pid = 0;
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
        remove_cgroup(&self.cgroup)?;
        if self.work.exists() {
            fs::remove_dir_all(&self.work)
                .with_context(|| format!("cannot remove {}", self.work.display()))?;
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = self.destroy() {
            eprintln!("ipcluster-sandbox: teardown of {} incomplete: {e:#}", self.name);
        }
    }
}

/// The directories of `dirs` that are not inside another one of them (each bound once).
fn outermost(mut dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    dirs.sort();
    dirs.dedup();
    let mut out: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        // Sorted: a directory comes right after the ones it is inside.
        if !out.last().is_some_and(|outer| dir.starts_with(outer)) {
            out.push(dir);
        }
    }
    out
}

/// `HOST_VIEW` + `host` (an absolute path).
fn host_view(host: &Path) -> PathBuf {
    Path::new(HOST_VIEW).join(host.strip_prefix("/").unwrap_or(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_directory_is_where_cargo_builds() {
        let cargo = || Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        let mut elsewhere = cargo();
        elsewhere.env("CARGO_TARGET_DIR", "/nonexistent/ipcluster target");
        assert_eq!(cargo_target_dir(elsewhere).unwrap(), Path::new("/nonexistent/ipcluster target"));
        let mut default = cargo();
        default.env_remove("CARGO_TARGET_DIR");
        let dir = cargo_target_dir(default).unwrap();
        assert!(dir.is_absolute() && dir.ends_with("target"), "{}", dir.display());
    }

    #[test]
    fn shared_directories_are_bound_once_each_outermost_first() {
        let dirs =
            ["/w/target/release", "/w/target", "/w/target/debug", "/x y/bin", "/w/target", "/w/targets"];
        let out = outermost(dirs.iter().map(PathBuf::from).collect());
        assert_eq!(out, ["/w/target", "/w/targets", "/x y/bin"].map(PathBuf::from));
        assert_eq!(
            host_view(Path::new("/x y/bin/xtask")),
            Path::new("/run/ipcluster-sandbox/host/x y/bin/xtask")
        );
    }
}
