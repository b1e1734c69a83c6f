//! The saved state's file (`/var/lib/ipcluster/state.json`): what it holds is
//! [`ipcluster_core::saved`]'s business; this module reads and writes it.
//!
//! Written atomically and root-only: temp file (mode 0600), fsync, rename, fsync the directory.
//! A missing file is an empty state; a corrupt one is reported by [`load`] and the caller starts
//! from reality.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use ipcluster_core::saved::SavedState;

/// Loads the state; a missing file is the empty state.
pub fn load(path: &Path) -> Result<SavedState, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("corrupt ({e})")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(SavedState::default()),
        Err(e) => Err(e.to_string()),
    }
}

/// Saves the state atomically.
pub fn save(path: &Path, state: &SavedState) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    // A temp file left by a crash may predate the mode above.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use ipcluster_core::{model::GenState, name::AppName, saved::SavedGeneration};

    use super::*;

    #[test]
    fn round_trip_missing_corrupt_and_root_only() {
        let dir = crate::test_dir("state");
        let path = dir.join("state.json");
        assert_eq!(load(&path).unwrap(), SavedState::default());
        let mut s = SavedState::default();
        let chat = AppName::new("chat").unwrap();
        s.last_generation.insert(chat.clone(), 7);
        s.apps.entry(chat).or_default().generations.insert(
            7,
            SavedGeneration::of(
                GenState::Live,
                1,
                &ipcluster_core::config::AppConfig::fallback(
                    AppName::new("chat").unwrap(),
                    4,
                    vec!["0.0.0.0:80".parse().unwrap()],
                ),
            ),
        );
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), s);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!path.with_extension("tmp").exists());
        fs::write(&path, b"{\"last_gen").unwrap();
        assert!(load(&path).unwrap_err().contains("corrupt"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
