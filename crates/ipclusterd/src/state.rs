//! Persisted state: what reality (systemd's scopes, /proc) cannot tell a restarted daemon, such
//! as the last generation number of each app, so numbers never go backwards or repeat.
//!
//! Written atomically: temp file, fsync, rename, fsync the directory. A missing file is an empty
//! state; a corrupt one is reported by [`load`] and the caller starts from reality.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    path::Path,
};

use serde::{Deserialize, Serialize};

/// The persisted state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    /// Last generation number allocated, per app.
    #[serde(default)]
    pub last_generation: BTreeMap<String, u64>,
    /// Generations that still run (starting, live, retired), per app.
    #[serde(default)]
    pub apps: BTreeMap<String, AppRecord>,
}

/// What is remembered of an app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    #[serde(default)]
    pub generations: BTreeMap<u64, GenRecord>,
    /// Last respawn delay (ms) of each band that crashed, so a crash loop stays slow across
    /// daemon restarts.
    #[serde(default)]
    pub backoff_ms: BTreeMap<u32, u64>,
    /// Stopped with StopApp (stays stopped until the next Deploy).
    #[serde(default)]
    pub stopped: bool,
}

/// What is remembered of a running generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenRecord {
    /// `starting`, `live` or `retired`.
    pub state: String,
    pub started_usec: u64,
    #[serde(default)]
    pub retired_usec: Option<u64>,
    pub workers: u32,
    /// Public addresses (`ip:port`), in `listen` order.
    pub listen: Vec<String>,
}

/// Loads the state; a missing file is the empty state.
pub fn load(path: &Path) -> Result<PersistedState, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("corrupt ({e})")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PersistedState::default()),
        Err(e) => Err(e.to_string()),
    }
}

/// Saves the state atomically.
pub fn save(path: &Path, state: &PersistedState) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = crate::test_dir("state");
        let path = dir.join("state.json");
        assert_eq!(load(&path).unwrap(), PersistedState::default());
        let mut s = PersistedState::default();
        s.last_generation.insert("chat".into(), 7);
        s.apps.entry("chat".into()).or_default().generations.insert(
            7,
            GenRecord {
                state: "live".into(),
                started_usec: 1,
                retired_usec: None,
                workers: 4,
                listen: vec!["0.0.0.0:80".into()],
            },
        );
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), s);
        assert!(!path.with_extension("tmp").exists());
        fs::write(&path, b"{\"last_gen").unwrap();
        assert!(load(&path).unwrap_err().contains("corrupt"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
