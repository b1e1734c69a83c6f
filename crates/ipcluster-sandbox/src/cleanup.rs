//! Taking sandboxes down: their cgroup trees, and what a killed owner left behind.

use std::{
    fs,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{PREFIX, base_dir, cgroup2_root};

/// Removes a cgroup tree once its processes are gone (children first).
pub(crate) fn remove_cgroup(cgroup: &Path) -> Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match remove_tree(cgroup) {
            Ok(()) => return Ok(()),
            // EBUSY while the killed processes are still exiting.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove cgroup {}", cgroup.display()));
            }
        }
    }
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Removes sandboxes whose owning process is gone (a test runner killed without unwinding).
pub fn collect_stale() {
    let Some(root) = cgroup2_root() else { return };
    for dir in [root.to_path_buf(), base_dir()] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(owner) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            let path = entry.path();
            if dir == root {
                // Kill whatever is left in it (cgroup.kill, Linux 5.14), then remove it.
                let _ = fs::write(path.join("cgroup.kill"), "1");
                let _ = remove_cgroup(&path);
            } else {
                let _ = fs::remove_dir_all(&path);
            }
        }
    }
}
