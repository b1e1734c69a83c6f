//! Fakes of the host's smaller seams: [`FakeFiles`] (app files in memory), [`FakeStore`] (the
//! saved state in memory), [`FakeNotifier`] (what the daemon told systemd) and [`FakeRelay`]
//! (the crashed workers' sockets handed over for relaying).

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use ipcluster_core::{name::AppName, saved::SavedState};

use super::lock;
use crate::{
    files::{AppFile, Files},
    relay::Relay,
    state::Store,
    status::Notifier,
};

/// The apps directory in memory: app name → its text, or why it cannot be read.
#[derive(Debug, Clone)]
pub struct FakeFiles {
    dir: PathBuf,
    files: Arc<Mutex<BTreeMap<String, Result<String, String>>>>,
    ephemeral: Arc<Mutex<Option<(u16, u16)>>>,
}

impl FakeFiles {
    /// An empty apps directory at `dir` (the path only names files in messages).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: Arc::default(), ephemeral: Arc::new(Mutex::new(Some((32768, 60999)))) }
    }

    /// Writes `app`'s file.
    pub fn write(&self, app: &str, text: &str) {
        lock(&self.files).insert(app.to_owned(), Ok(text.to_owned()));
    }

    /// Makes `app`'s file one the daemon refuses to read, for `why`.
    pub fn refuse(&self, app: &str, why: &str) {
        lock(&self.files).insert(app.to_owned(), Err(why.to_owned()));
    }

    /// Removes `app`'s file.
    pub fn remove(&self, app: &str) {
        lock(&self.files).remove(app);
    }

    /// Sets the kernel's ephemeral port range.
    pub fn set_ephemeral(&self, range: Option<(u16, u16)>) {
        *lock(&self.ephemeral) = range;
    }
}

impl Files for FakeFiles {
    fn app_files(&self) -> Result<Vec<AppFile>, String> {
        Ok(lock(&self.files)
            .iter()
            .map(|(app, text)| AppFile { path: self.dir.join(format!("{app}.toml")), text: text.clone() })
            .collect())
    }
    fn ephemeral_ports(&self) -> Option<(u16, u16)> {
        *lock(&self.ephemeral)
    }
}

/// The saved state in memory: what was last saved, and whether saving fails.
#[derive(Debug, Clone, Default)]
pub struct FakeStore {
    saved: Arc<Mutex<Option<SavedState>>>,
    broken: Arc<Mutex<Option<String>>>,
    /// How many saves were asked for, in the background and now.
    pub saves: Arc<Mutex<(u64, u64)>>,
    /// Background saves not written yet, when the store writes lazily.
    pending: Arc<Mutex<Option<SavedState>>>,
    lazy: Arc<Mutex<bool>>,
}

impl FakeStore {
    /// A store holding `state` (what a previous daemon saved).
    pub fn with(state: SavedState) -> Self {
        let s = Self::default();
        *lock(&s.saved) = Some(state);
        s
    }

    /// What is saved now (the empty state when nothing was).
    pub fn get(&self) -> SavedState {
        lock(&self.saved).clone().unwrap_or_default()
    }

    /// Forgets what was saved (a state file removed).
    pub fn clear(&self) {
        *lock(&self.saved) = None;
    }

    /// From now on a background save stays pending (a writer thread that has not run yet) until
    /// a save made now; [`Self::get`] shows only what is written.
    pub fn write_lazily(&self) {
        *lock(&self.lazy) = true;
    }

    /// Makes every save fail with `why` (a full disk); `None` mends it.
    pub fn break_with(&self, why: Option<&str>) {
        *lock(&self.broken) = why.map(str::to_owned);
    }
}

impl Store for FakeStore {
    fn load(&self) -> Result<SavedState, String> {
        Ok(self.get())
    }
    fn save(&self, state: &SavedState) {
        lock(&self.saves).0 += 1;
        if *lock(&self.lazy) {
            *lock(&self.pending) = Some(state.clone());
        } else if lock(&self.broken).is_none() {
            *lock(&self.saved) = Some(state.clone());
        }
    }
    fn save_now(&self, state: &SavedState) -> Result<(), String> {
        lock(&self.saves).1 += 1;
        lock(&self.pending).take();
        if let Some(why) = lock(&self.broken).clone() {
            return Err(why);
        }
        *lock(&self.saved) = Some(state.clone());
        Ok(())
    }
}

/// What the daemon told its service manager.
#[derive(Debug, Clone, Default)]
pub struct FakeNotifier {
    /// `READY=1` sent.
    pub ready: Arc<Mutex<bool>>,
    /// Every `STATUS=` line, in order.
    pub status: Arc<Mutex<Vec<String>>>,
}

impl Notifier for FakeNotifier {
    fn ready(&self) {
        *lock(&self.ready) = true;
    }
    fn watchdog(&self) {}
    fn watchdog_timeout(&self) -> Option<std::time::Duration> {
        None
    }
    fn status(&self, line: &str) {
        lock(&self.status).push(line.to_owned());
    }
}

/// The crashed workers' sockets handed over: (app, port, target), in order, and what the
/// supervisor did with each drain. A drain ends (its socket closed, `done` called) once it was
/// told to finish and [`FakeRelay::settle`] runs, as the real one ends once it took what was
/// queued.
#[derive(Clone, Default)]
pub struct FakeRelay {
    pub drains: Arc<Mutex<Vec<(String, u16, SocketAddrV4)>>>,
    #[allow(clippy::type_complexity, reason = "a test double's bookkeeping")]
    running: Arc<Mutex<Vec<(u16, OwnedFd, tokio::sync::oneshot::Receiver<()>, Box<dyn FnOnce(u32) + Send>)>>>,
}

impl std::fmt::Debug for FakeRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeRelay").field("drains", &self.drains).field("running", &self.running()).finish()
    }
}

impl FakeRelay {
    /// Ends the drains that were told to finish (or whose handle was dropped); returns their ports.
    pub fn settle(&self) -> Vec<u16> {
        let mut running = lock(&self.running);
        let mut ended = Vec::new();
        let mut i = 0;
        while i < running.len() {
            let finished =
                !matches!(running[i].2.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty));
            if finished {
                let (port, _socket, _, done) = running.swap_remove(i);
                done(0);
                ended.push(port);
            } else {
                i += 1;
            }
        }
        ended
    }

    /// The ports of drains still running (their sockets open).
    pub fn running(&self) -> Vec<u16> {
        lock(&self.running).iter().map(|r| r.0).collect()
    }
}

impl Relay for FakeRelay {
    fn drain(
        &self,
        app: &AppName,
        port: u16,
        listener: OwnedFd,
        target: SocketAddrV4,
        done: Box<dyn FnOnce(u32) + Send>,
    ) -> crate::relay::Drain {
        lock(&self.drains).push((app.to_string(), port, target));
        let (drain, finish) = crate::relay::Drain::new();
        lock(&self.running).push((port, listener, finish, done));
        drain
    }
}
