//! The kinds of fault, in one table ([`faults!`]): adding one is a line here (its name, its
//! weight among the extra faults of a window, its injector) and its injector in `inject.rs`.
//! Then the schedule plans it at least once per window, the summary counts it, and the
//! accounting treats failures near it as unexplained unless a by-design cause in `account.rs`
//! says otherwise.
//!
//! [`run`] injects the schedule, one fault after the other at its time. An injector returns
//! when the fault's effect is over (the rules repaired, the daemon back, the worker replaced),
//! so the time it took is the fault's; deploys and rollbacks run in the background instead,
//! so that the next faults can hit them midway.

use std::{
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::Serialize;

use super::{
    account::{Hit, Secs},
    bus::Bus,
    host::Host,
    inject,
    record::Shared,
    schedule::Planned,
};

macro_rules! faults {
    ($( $(#[doc = $doc:literal])+ $variant:ident = $name:literal, weight $weight:literal, $inject:path; )+) => {
        /// A kind of fault the soak injects.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Fault { $( $(#[doc = $doc])+ $variant, )+ }

        impl Fault {
            pub const ALL: [Fault; [$($name),+].len()] = [$(Fault::$variant),+];

            /// Its name in the summary, the JSON and the chart.
            pub fn name(self) -> &'static str {
                match self { $(Fault::$variant => $name,)+ }
            }

            /// Its weight among the extra faults of a window (every kind comes once anyway).
            pub fn weight(self) -> u32 {
                match self { $(Fault::$variant => $weight,)+ }
            }

            /// What it does.
            pub fn about(self) -> &'static str {
                match self { $(Fault::$variant => concat!($($doc),+).trim_ascii(),)+ }
            }

            /// Injects it (`id` in the timeline): the hit when its effect is over, or `None`
            /// when it finishes the event itself (in the background).
            fn inject(self, ctx: &mut Ctx, pick: u64, id: usize) -> Result<Option<Hit>> {
                match self { $(Fault::$variant => $inject(ctx, pick, id),)+ }
            }
        }
    };
}

faults! {
    /// Deploy of an app (in the background).
    Deploy = "deploy", weight 8, inject::deploy;
    /// Rollback(app, 0): the same workers at once, or a redeploy (in the background).
    Rollback = "rollback", weight 4, inject::rollback;
    /// KillRetired of one app or of every app.
    KillRetired = "kill-retired", weight 3, inject::kill_retired;
    /// SIGUSR1 to the daemon (reap retired workers).
    Sigusr1 = "sigusr1", weight 2, inject::sigusr1;
    /// kill -9 of a live worker of any app.
    WorkerKill = "worker-kill-9", weight 4, inject::worker_kill;
    /// SIGSTOP of a live worker of the NAT app, until its watchdog replaces it.
    WorkerStop = "worker-sigstop", weight 2, inject::worker_stop;
    /// systemctl restart ipclusterd.
    DaemonRestart = "daemon-restart", weight 2, inject::daemon_restart;
    /// kill -9 of the daemon, until systemd has started it again.
    DaemonKill = "daemon-kill-9", weight 2, inject::daemon_kill;
    /// iptables -t nat -F (sometimes ip6tables too), until the daemon repaired the rules.
    NatFlush = "nat-flush", weight 2, inject::nat_flush;
    /// An app file changed, then systemctl reload ipclusterd.
    ReloadChanged = "reload-changed", weight 2, inject::reload_changed;
    /// An invalid app file and a reload: Deploy says InvalidConfig, nothing changes; restored.
    InvalidAppFile = "invalid-app-file", weight 1, inject::invalid_app_file;
    /// A notify flood from a worker's cgroup and from outside every scope.
    NotifyFlood = "notify-flood", weight 1, inject::notify_flood;
    /// A live worker of the NAT app grows past worker_memory_max, until it is replaced.
    MemoryGrowth = "memory-growth", weight 2, inject::memory_growth;
    /// Malformed and oversized D-Bus calls: each refused as documented, nothing changes.
    BadDbusInput = "bad-dbus-input", weight 1, inject::bad_dbus_input;
    /// apt-get install --reinstall of the package (the daemon restarts).
    PackageUpgrade = "package-upgrade", weight 1, inject::package_upgrade;
}

impl Fault {
    /// Whether it replaces the daemon's process (restart, `kill -9`, package upgrade).
    pub fn replaces_daemon(self) -> bool {
        matches!(self, Fault::DaemonRestart | Fault::DaemonKill | Fault::PackageUpgrade)
    }
}

impl Serialize for Fault {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What an injector works with.
#[derive(Debug)]
pub struct Ctx {
    pub host: Arc<Host>,
    pub bus: Arc<Bus>,
    pub shared: Arc<Shared>,
    /// Deploys and rollbacks still running.
    pub background: Vec<JoinHandle<()>>,
    /// How many times each app's file was changed (the reload fault).
    pub reloads: [u32; 3],
}

impl Ctx {
    /// Waits for the faults running in the background (before a fault that compares the state
    /// before and after it).
    pub fn settle(&mut self) {
        for h in self.background.drain(..) {
            let _ = h.join();
        }
    }
}

/// Injects `plan` until `until` (a fault not started by then is left out, and says so).
/// Returns the faults left out.
pub fn run(ctx: &mut Ctx, plan: &[Planned], until: Secs) -> Vec<Planned> {
    let mut skipped = Vec::new();
    for p in plan {
        let now = ctx.shared.now();
        if now < p.at {
            std::thread::sleep(Duration::from_secs_f64(p.at - now));
        }
        if ctx.shared.now() >= until {
            skipped.push(*p);
            continue;
        }
        ctx.background.retain(|h| !h.is_finished());
        let id = ctx.shared.begin(p.fault);
        let started = Instant::now();
        match p.fault.inject(ctx, p.pick, id) {
            Ok(Some(hit)) => ctx.shared.finish(id, hit),
            Ok(None) => {}
            Err(e) => ctx.shared.finish(id, Hit::failed(format!("the soak could not inject it: {e:#}"))),
        }
        if started.elapsed() > Duration::from_secs(60) {
            eprintln!("soak: {} took {:?}", p.fault.name(), started.elapsed());
        }
    }
    ctx.settle();
    skipped
}
