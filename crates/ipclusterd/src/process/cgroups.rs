//! Cgroups of workers: where the cgroup2 hierarchy is, a worker's own cgroup below its scope's,
//! and signalling or killing everything in one.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use super::{adopt, signal};

/// Where the cgroup2 hierarchy is mounted: `/sys/fs/cgroup` on a unified host (and in the
/// sandbox), `/sys/fs/cgroup/unified` on a hybrid one; read once from /proc/self/mountinfo.
pub fn cgroup_fs() -> &'static Path {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| cgroup2_mount(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()))
}

/// The cgroup2 mount point in `mountinfo`: among mounts of the hierarchy's root as this process
/// sees it (a mount of an ancestor, root `/..`, belongs to another cgroup namespace), the one at
/// `/sys/fs/cgroup` if there is one, else the last.
fn cgroup2_mount(mountinfo: &str) -> PathBuf {
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            let f: Vec<&str> = before.split_whitespace().collect();
            (after.starts_with("cgroup2 ") && f.get(3) == Some(&"/")).then_some(*f.get(4)?)
        })
        .collect();
    let best = mounts.iter().find(|m| **m == "/sys/fs/cgroup").or(mounts.last());
    PathBuf::from(best.copied().unwrap_or("/sys/fs/cgroup"))
}

/// The cgroup2 path of `pid` (`/ipcluster.slice/…/ipcluster-web-1.scope`), from /proc.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// The directory of a cgroup2 path.
pub fn cgroup_dir(cgroup: &str) -> PathBuf {
    cgroup_fs().join(cgroup.trim_start_matches('/'))
}

/// The name of a worker's own cgroup inside its scope: `worker-<pid>`.
pub fn worker_cgroup_name(pid: u32) -> String {
    format!("worker-{pid}")
}

/// Moves `pid` (a child held at its gate, already in its scope) into a cgroup of its own
/// below the scope's (the scope is delegated to us): the worker and everything it forks stay
/// together, so stopping the worker can stop its whole tree. Returns the new cgroup's path.
pub fn isolate(pid: u32) -> io::Result<String> {
    let scope = cgroup_of(pid).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    // Only ever below a scope of ours: never a cgroup anywhere else on the host.
    let ours = scope.starts_with("/ipcluster.slice/")
        && scope.rsplit('/').next().is_some_and(|s| s.starts_with("ipcluster-") && s.ends_with(".scope"));
    if !ours {
        return Err(io::Error::other(format!("pid {pid} is in {scope}, not in an ipcluster scope")));
    }
    let cgroup = format!("{}/{}", scope.trim_end_matches('/'), worker_cgroup_name(pid));
    let dir = cgroup_dir(&cgroup);
    match fs::create_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    fs::write(dir.join("cgroup.procs"), pid.to_string())?;
    Ok(cgroup)
}

/// PIDs in `cgroup` (not its children).
pub fn cgroup_procs(cgroup: &str) -> Vec<u32> {
    fs::read_to_string(cgroup_dir(cgroup).join("cgroup.procs"))
        .map(|t| t.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Sends `sig` to every process in `cgroup`, each through a pidfd opened just before.
pub fn signal_cgroup(cgroup: &str, sig: i32) {
    for pid in cgroup_procs(cgroup) {
        if let Ok(fd) = adopt(pid) {
            let _ = signal(&fd, sig);
        }
    }
}

/// SIGKILLs everything in `cgroup` at once (`cgroup.kill`, Linux 5.14), then removes it once
/// empty (a cgroup whose processes are still dying stays; the scope's stop removes it).
pub fn kill_cgroup(cgroup: &str) {
    let dir = cgroup_dir(cgroup);
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let _ = fs::remove_dir(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_the_one_this_namespace_sees() {
        let sandbox = "57 47 0:38 /.. /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                       76 47 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(sandbox), Path::new("/sys/fs/cgroup"));
        let hybrid = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      42 31 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount(hybrid), Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(cgroup2_mount(""), Path::new("/sys/fs/cgroup"));
    }
}
