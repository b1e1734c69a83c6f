//! The saved state's file (`/var/lib/ipcluster/state.json`): what it holds is
//! [`ipcluster_core::saved`]'s business; this module reads and writes it, behind the
//! [`Store`] seam ([`StateFile`]; the supervisor's tests keep it in memory).
//!
//! Written atomically and root-only: temp file (mode 0600), fsync, rename, fsync the directory.
//! A missing file is an empty state; a corrupt one is reported by [`load`] and the caller starts
//! from reality.
//!
//! **Off the supervisor's loop.** Two fsyncs cost milliseconds, and a state change happens on
//! every generation transition and every respawn (which a worker can cause by crashing), so
//! [`Store::save`] hands the state to a writer thread and returns: the latest state wins, one
//! not yet written is replaced, never written after a newer one. Only what must be on disk
//! before it is used waits ([`Store::save_now`]: a new generation number). A daemon killed in
//! the moment between a change and its write loses that change's record; adoption trusts
//! reality first (scopes, processes, rules) and the record is a witness, so what is lost is at
//! most a worker's identity in the record, which its claim is then checked without.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
};

use ipcluster_core::saved::SavedState;

/// Where the saved state lives. The daemon's: [`StateFile`].
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// The saved state; a missing file is the empty state; a corrupt or unreadable one is an
    /// error (the caller starts from reality).
    fn load(&self) -> Result<SavedState, String>;
    /// Saves `state` in the background and returns at once; a later save replaces one not yet
    /// written. A failure is logged.
    fn save(&self, state: &SavedState);
    /// Saves `state` and returns once it is on disk, or why it is not (nothing else is then
    /// written in its place: the previous file stays).
    fn save_now(&self, state: &SavedState) -> Result<(), String>;
}

/// [`Store`] on a file, with a writer thread for background saves.
#[derive(Debug, Clone)]
pub struct StateFile {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    path: PathBuf,
    /// The newest state not yet written (serialized).
    pending: Mutex<Option<Vec<u8>>>,
    wake: Condvar,
    /// Held while the file is written: a background write never lands after a newer one.
    writing: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl StateFile {
    /// The state at `path`; its writer thread starts now.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let shared = Arc::new(Shared {
            path: path.into(),
            pending: Mutex::new(None),
            wake: Condvar::new(),
            writing: Mutex::new(()),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer(&weak))
            .expect("cannot start the state writer thread");
        Self { shared }
    }

    /// Writes what was saved and is not on disk yet, now. A daemon that stops calls it once its
    /// supervisor is gone: the writer thread holds the state while it waits, so dropping the
    /// last handle does not reliably write it, and the process may end before that thread runs.
    pub fn flush(&self) {
        let _writing = lock(&self.shared.writing);
        if let Some(bytes) = lock(&self.shared.pending).take()
            && let Err(e) = write(&self.shared.path, &bytes)
        {
            tracing::error!("cannot write {}: {e}", self.shared.path.display());
        }
    }
}

/// The writer thread: writes the newest pending state, until the [`StateFile`] is gone.
fn writer(shared: &std::sync::Weak<Shared>) {
    loop {
        let Some(shared) = shared.upgrade() else { return };
        {
            let pending = lock(&shared.pending);
            if pending.is_none() {
                // Woken by a save, or after a while to see whether the file is still wanted.
                let _ = shared.wake.wait_timeout(pending, std::time::Duration::from_secs(1));
            }
        }
        let _writing = lock(&shared.writing);
        let next = lock(&shared.pending).take();
        if let Some(bytes) = next
            && let Err(e) = write(&shared.path, &bytes)
        {
            tracing::error!("cannot write {}: {e}", shared.path.display());
        }
    }
}

impl Store for StateFile {
    fn load(&self) -> Result<SavedState, String> {
        load(&self.shared.path).map_err(|e| format!("{}: {e}", self.shared.path.display()))
    }

    fn save(&self, state: &SavedState) {
        match serde_json::to_vec_pretty(state) {
            Ok(bytes) => {
                *lock(&self.shared.pending) = Some(bytes);
                self.shared.wake.notify_one();
            }
            Err(e) => tracing::error!("cannot serialize the state: {e}"),
        }
    }

    fn save_now(&self, state: &SavedState) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
        let _writing = lock(&self.shared.writing);
        // What was pending is older than this: it is never written now.
        lock(&self.shared.pending).take();
        write(&self.shared.path, &bytes).map_err(|e| format!("{}: {e}", self.shared.path.display()))
    }
}

impl Drop for Shared {
    /// The last reference is gone with a save not yet written: it is written now. (The writer
    /// thread keeps only a weak reference between rounds, but a strong one while it waits for
    /// the next save, so this may run on that thread, late: a stopping daemon calls
    /// [`StateFile::flush`] rather than count on it.)
    fn drop(&mut self) {
        let pending = self.pending.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(bytes) = pending
            && let Err(e) = write(&self.path, &bytes)
        {
            tracing::error!("cannot write {}: {e}", self.path.display());
        }
    }
}

/// Loads the state; a missing file is the empty state.
pub fn load(path: &Path) -> Result<SavedState, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("corrupt ({e})")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(SavedState::default()),
        Err(e) => Err(e.to_string()),
    }
}

/// Saves the state atomically, now.
pub fn save(path: &Path, state: &SavedState) -> io::Result<()> {
    write(path, &serde_json::to_vec_pretty(state).map_err(io::Error::other)?)
}

/// Writes serialized state atomically: temp file, fsync, rename, fsync the directory.
fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    // A temp file left by a crash may predate the mode above.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
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
