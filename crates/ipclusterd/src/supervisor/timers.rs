//! Timers: the one mechanism behind every delay the supervisor waits for.
//!
//! A timer is named by a [`TimerKey`]. Setting a key replaces (cancels) its previous timer;
//! cancelling drops it. When it fires, an [`Event::Timer`] with the key and the timer's token
//! arrives, and the supervisor acts on it only if [`Timers::take`] says it is still the current
//! timer of that key. So a timer whose subject changed meanwhile never acts, even if it fired
//! just before it was cancelled: handlers need not check whether they are stale.

use std::{collections::HashMap, time::Duration};

use ipcluster_core::name::AppName;
use tokio::{sync::mpsc, task::AbortHandle};

use super::{Event, model::WorkerId};

/// What a timer is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TimerKey {
    /// A starting generation that is not ready by then fails.
    ReadyTimeout { app: AppName, generation: u64 },
    /// The next held band of a paced generation starts (`spawn_interval`).
    ReleaseNext { app: AppName, generation: u64 },
    /// A stopping worker still there gets SIGKILL (`stop_timeout`).
    StopTimeout(WorkerId),
    /// A crashed band of a live generation is respawned (its backoff).
    Respawn { app: AppName, generation: u64, band: u32 },
    /// A respawned worker that is not ready by then is killed.
    RespawnTimeout(WorkerId),
    /// The next retired worker in the app's reap queue is stopped (`reap_interval`).
    ReapNext(AppName),
    /// The rules are brought up to date with the workers' ports (changes coalesce).
    SyncRules,
    /// A canary's `canary_for` passed: it promotes itself.
    CanaryDeadline { app: AppName, generation: u64 },
    /// The next round of health checks of a generation's workers (`health_interval`).
    HealthRound { app: AppName, generation: u64 },
    /// A worker with `ready = "http"` is checked again (its last check failed).
    ReadyCheck(WorkerId),
}

/// The running timers.
#[derive(Debug)]
pub struct Timers {
    events: mpsc::UnboundedSender<Event>,
    current: HashMap<TimerKey, (u64, AbortHandle)>,
    next_token: u64,
}

impl Timers {
    pub fn new(events: mpsc::UnboundedSender<Event>) -> Self {
        Self { events, current: HashMap::new(), next_token: 0 }
    }

    /// Fires `key` after `delay`, replacing any timer of the same key.
    pub fn set(&mut self, key: TimerKey, delay: Duration) {
        self.next_token += 1;
        let token = self.next_token;
        let tx = self.events.clone();
        let fired = key.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Timer { key: fired, token });
        });
        if let Some((_, old)) = self.current.insert(key, (token, task.abort_handle())) {
            old.abort();
        }
    }

    /// Cancels `key`'s timer, if any.
    pub fn cancel(&mut self, key: &TimerKey) {
        if let Some((_, task)) = self.current.remove(key) {
            task.abort();
        }
    }

    /// Whether `key` has a timer running.
    pub fn is_set(&self, key: &TimerKey) -> bool {
        self.current.contains_key(key)
    }

    /// A timer fired: true (and forgotten) if it is still `key`'s current timer.
    pub fn take(&mut self, key: &TimerKey, token: u64) -> bool {
        match self.current.get(key) {
            Some((t, _)) if *t == token => {
                self.current.remove(key);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TimerKey {
        TimerKey::ReapNext(AppName::new("a").unwrap())
    }

    async fn fired(rx: &mut mpsc::UnboundedReceiver<Event>) -> (TimerKey, u64) {
        match rx.recv().await {
            Some(Event::Timer { key, token }) => (key, token),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_replaced_or_cancelled_timer_never_acts() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut t = Timers::new(tx);
        t.set(key(), Duration::from_secs(1));
        let (k, first) = fired(&mut rx).await;
        // It fired, then was replaced before the supervisor read the event.
        t.set(key(), Duration::from_secs(5));
        assert!(!t.take(&k, first), "the replaced timer is stale");
        let (k, second) = fired(&mut rx).await;
        assert!(t.take(&k, second));
        assert!(!t.is_set(&key()));
        t.set(key(), Duration::from_secs(1));
        t.cancel(&key());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(rx.try_recv().is_err(), "a cancelled timer does not fire");
    }
}
