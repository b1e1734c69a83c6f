//! [`Files`]: what the supervisor reads from the file system and the kernel's settings to know
//! its apps — the app files (only when root alone could have written them and every directory
//! above them: [`crate::trusted`]) and the kernel's ephemeral port range. [`Disk`] reads them;
//! the supervisor's tests use a fake in memory.

use std::{fmt::Debug, path::PathBuf};

use ipcluster_core::ports;

use crate::trusted::{self, Kind};

/// One app file, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppFile {
    /// Its path (the app's name is its stem).
    pub path: PathBuf,
    /// Its text, or why it was not read: unreadable, or writable by someone other than root
    /// (the daemon does not take such a file as root's word).
    pub text: Result<String, String>,
}

/// The files behind the apps. Reads only; each call reads afresh.
pub trait Files: Send + Sync + Debug + 'static {
    /// Every `*.toml` file of the apps directory. `Err` when the directory cannot be listed (the
    /// supervisor then knows no app file).
    fn app_files(&self) -> Result<Vec<AppFile>, String>;
    /// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), when it can be read.
    fn ephemeral_ports(&self) -> Option<(u16, u16)>;
}

/// The real file system: the apps directory given at start, `/proc/sys` for the kernel.
#[derive(Debug, Clone)]
pub struct Disk {
    dir: PathBuf,
}

impl Disk {
    /// Reads app files from `dir` (`/etc/ipcluster/apps`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

impl Files for Disk {
    fn app_files(&self) -> Result<Vec<AppFile>, String> {
        // Files anyone but root could have written are not taken as root's word (StrictModes:
        // the directory and every one above it, then each file as opened; see trusted.rs).
        let dir_unsafe = trusted::check_dir(&self.dir, Kind::AppsDirectory).err();
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| format!("cannot read {}: {e}", self.dir.display()))?;
        let mut files = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = match dir_unsafe.clone().map_or_else(|| trusted::read(&path, Kind::AppFile), Err) {
                Err(why) => Err(why),
                Ok(Some(text)) => Ok(text),
                // Removed since it was listed.
                Ok(None) => continue,
            };
            files.push(AppFile { path, text });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    fn ephemeral_ports(&self) -> Option<(u16, u16)> {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| ports::parse_ephemeral(&t).ok())
    }
}
