//! The sd_notify receiver for workers with `ready = "notify"`.
//!
//! One datagram socket for all workers (`$RUNTIME_DIRECTORY/notify`, kept across daemon restarts
//! by `RuntimeDirectoryPreserve=yes`). `SO_PASSCRED` makes the kernel attach the sender's PID to
//! every datagram, so a worker cannot speak for another: the PID is the kernel's, not the
//! message's. See sd_notify(3) for the protocol: newline-separated `KEY=VALUE` assignments.
//!
//! The socket is writable by every local user (workers may run as any user), so [`forward`]
//! drops a datagram whose sender is in no ipcluster scope after one cheap lookup (its cgroup),
//! logging at most one line per [`DROP_LOG_EVERY`], and passes the others on with the sender's
//! cgroup, by which the supervisor finds the worker.
//!
//! One worker must not be able to starve the others (issue 21, item 5), so the notify thread
//! does the filtering itself and the supervisor sees a bounded stream ([`Gate`]):
//! - a datagram with neither `READY=1` nor `WATCHDOG=1` is dropped before anything else (no
//!   lookup, no queue slot, no supervisor turn);
//! - a sender PID that said the same within the last [`WINDOW`] is dropped before its cgroup is
//!   read (the notification it would make is already on its way);
//! - per sender cgroup, a notification that says something new (`READY=1` first of all) goes
//!   at once; the same again within [`WINDOW`] is merged into one that goes when the window
//!   ends. So each cgroup costs the supervisor at most a few turns a second, however many
//!   processes flood from it, and a notification waiting for room in the queue is kept (merged),
//!   never dropped.

use std::{
    collections::HashMap,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

/// Largest datagram accepted (systemd uses the same bound for its own notify socket).
const MAX_DATAGRAM: usize = 4096;
/// Descriptors read (and closed) from one datagram; more are closed by the kernel.
const MAX_FDS: usize = 8;
/// At most one line about dropped datagrams this often.
pub const DROP_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Notifications waiting for the supervisor (each from another cgroup, or saying something new).
const QUEUE: usize = 1024;
/// Per sender cgroup (and PID), the same notification at most once per window.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Most senders and cgroups remembered; beyond it the oldest are forgotten.
const REMEMBERED: usize = 65_536;
/// How often, at most, the notify thread forgets senders and cgroups whose window has ended
/// (see [`Gate::forget_idle`]): when a datagram comes or a waiting notification falls due, so
/// not while nothing is sent, when nothing is added either.
const FORGET_EVERY: Duration = Duration::from_secs(1);
/// Where every scope of ours lives in the cgroup hierarchy.
const OUR_SLICE: &str = "/ipcluster.slice/";

/// A notification from a process in one of our scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sender, as the kernel says.
    pub pid: u32,
    /// The sender's cgroup (below `ipcluster.slice`).
    pub cgroup: String,
    pub message: Message,
}

/// What a worker said that the daemon acts on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// `READY=1`.
    pub ready: bool,
    /// `WATCHDOG=1`.
    pub watchdog: bool,
}

impl Message {
    /// Whether it says anything the daemon acts on.
    pub fn any(&self) -> bool {
        self.ready || self.watchdog
    }

    /// Whether everything it says, `other` says too.
    fn within(&self, other: &Message) -> bool {
        (!self.ready || other.ready) && (!self.watchdog || other.watchdog)
    }

    fn merge(&mut self, other: &Message) {
        self.ready |= other.ready;
        self.watchdog |= other.watchdog;
    }
}

/// Parses a notification datagram. Other assignments (`STATUS=`, `MAINPID=`, …) are ignored,
/// as are lines that are not assignments.
pub fn parse(datagram: &[u8]) -> Message {
    let mut m = Message::default();
    for line in datagram.split(|b| *b == b'\n') {
        match line {
            b"READY=1" => m.ready = true,
            b"WATCHDOG=1" => m.watchdog = true,
            _ => {}
        }
    }
    m
}

/// The bound receiving socket (blocking: [`forward`] reads it on a thread of its own).
#[derive(Debug)]
pub struct Receiver {
    socket: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl Receiver {
    /// Binds `path` (replacing a stale socket file), writable by workers of any user.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let socket = std::os::unix::net::UnixDatagram::bind(path)?;
        rustix::net::sockopt::set_socket_passcred(&socket, true)?;
        // Workers may run as other users; the sender's cgroup, not the file mode, decides who counts.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Self { socket, path: path.to_owned() })
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next datagram and returns it with its sender's PID (datagrams without
    /// credentials are dropped). Descriptors a sender passes are closed at once: sd_notify's
    /// `BARRIER=1` (systemd-notify(1) sends one after `READY=1` and waits for it to close); a
    /// sender passing more than fit is truncated by the kernel, which closes the rest.
    pub fn recv(&self) -> io::Result<(u32, Message)> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut space = [std::mem::MaybeUninit::<u8>::uninit();
            rustix::cmsg_space!(ScmCredentials(1), ScmRights(MAX_FDS))];
        loop {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(&self.socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
            let n = msg.bytes.min(MAX_DATAGRAM);
            let mut pid = None;
            for c in control.drain() {
                match c {
                    RecvAncillaryMessage::ScmCredentials(cred) => {
                        pid = u32::try_from(cred.pid.as_raw_nonzero().get()).ok()
                    }
                    // Dropping the descriptors closes them.
                    RecvAncillaryMessage::ScmRights(fds) => fds.for_each(drop),
                    _ => {}
                }
            }
            if let Some(pid) = pid {
                return Ok((pid, parse(&buf[..n])));
            }
        }
    }
}

/// Reads `receiver` on a thread of its own (so a flood costs that thread, not the daemon's
/// runtime) and forwards what processes in our scopes say, filtered, coalesced and paced per
/// sender cgroup (see the module docs); the rest is dropped.
pub fn forward(receiver: Receiver) -> tokio::sync::mpsc::Receiver<Notification> {
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    let spawned = std::thread::Builder::new().name("notify".into()).spawn(move || {
        let mut dropped = DropLog::default();
        let mut gate = Gate::default();
        let mut timeout = None;
        let mut forgot = Instant::now();
        loop {
            if forgot.elapsed() >= FORGET_EVERY {
                forgot = Instant::now();
                gate.forget_idle(forgot);
            }
            // Wake up for what waits (a merged notification whose window ends), else sleep.
            let wait = gate
                .next_due()
                .map(|due| due.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
            if wait != timeout {
                let _ = receiver.socket.set_read_timeout(wait);
                timeout = wait;
            }
            match receiver.recv() {
                Ok((pid, message)) => {
                    if let Verdict::Foreign =
                        gate.offer(pid, message, Instant::now(), crate::process::cgroup_of)
                    {
                        dropped.note(pid, "not in an ipcluster scope");
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => {
                    tracing::warn!("notify socket: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            for n in gate.due(Instant::now()) {
                match tx.try_send(n) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
                    // Kept, and tried again shortly: a notification is never lost to a full queue.
                    Err(tokio::sync::mpsc::error::TrySendError::Full(n)) => gate.requeue(n, Instant::now()),
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the notify thread: {e}; ready = \"notify\" workers will not be seen");
    }
    rx
}

/// What [`Gate::offer`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Queued (alone, or merged into what waits for its cgroup).
    Taken,
    /// Dropped: it says nothing the daemon uses, or its sender said the same just before.
    Redundant,
    /// Dropped: its sender is in no ipcluster scope.
    Foreign,
}

/// The notify thread's filter (see the module docs): what is due for the supervisor, per sender
/// cgroup, at most once per [`WINDOW`] unless it says something new.
#[derive(Debug, Default)]
pub struct Gate {
    /// Per sender PID: when it last got through, and what it said.
    senders: HashMap<u32, (Instant, Message)>,
    /// Per cgroup: when a notification last went, what it said, and what waits (merged).
    cgroups: HashMap<String, CgroupState>,
}

#[derive(Debug)]
struct CgroupState {
    sent_at: Instant,
    sent: Message,
    waiting: Option<Notification>,
}

impl Gate {
    /// Takes one datagram from `pid`; `cgroup_of` is asked only when it may matter.
    pub fn offer(
        &mut self,
        pid: u32,
        message: Message,
        now: Instant,
        cgroup_of: impl FnOnce(u32) -> Option<String>,
    ) -> Verdict {
        if !message.any() {
            return Verdict::Redundant;
        }
        if let Some((at, said)) = self.senders.get(&pid)
            && now.duration_since(*at) < WINDOW
            && message.within(said)
        {
            return Verdict::Redundant;
        }
        let Some(cgroup) = cgroup_of(pid).filter(|c| c.starts_with(OUR_SLICE)) else {
            return Verdict::Foreign;
        };
        forget_oldest(&mut self.senders, |(at, _)| *at);
        let said = match self.senders.get(&pid) {
            // Within its window: what it said before still stands (an alternating flood of
            // READY=1 and WATCHDOG=1 is as cheap as a flood of either).
            Some((at, said)) if now.duration_since(*at) < WINDOW => {
                let mut both = said.clone();
                both.merge(&message);
                (*at, both)
            }
            _ => (now, message.clone()),
        };
        self.senders.insert(pid, said);
        let n = Notification { pid, cgroup: cgroup.clone(), message };
        match self.cgroups.get_mut(&cgroup) {
            Some(c) => match &mut c.waiting {
                Some(w) => {
                    w.message.merge(&n.message);
                    w.pid = n.pid;
                }
                None => c.waiting = Some(n),
            },
            None => {
                forget_oldest(&mut self.cgroups, |c| c.sent_at);
                self.cgroups.insert(
                    cgroup,
                    CgroupState { sent_at: before(now), sent: Message::default(), waiting: Some(n) },
                );
            }
        }
        Verdict::Taken
    }

    /// The notifications due now: a cgroup's waiting one when it says something its last did
    /// not, or when its window has ended.
    pub fn due(&mut self, now: Instant) -> Vec<Notification> {
        let mut out = Vec::new();
        for c in self.cgroups.values_mut() {
            let Some(w) = &c.waiting else { continue };
            if !w.message.within(&c.sent) || now.duration_since(c.sent_at) >= WINDOW {
                let w = c.waiting.take().expect("checked above");
                c.sent_at = now;
                c.sent = w.message.clone();
                out.push(w);
            }
        }
        out
    }

    /// A due notification the queue had no room for: it waits again (merged with anything new).
    pub fn requeue(&mut self, n: Notification, now: Instant) {
        if let Some(c) = self.cgroups.get_mut(&n.cgroup) {
            c.sent = Message::default();
            c.sent_at = before(now);
            match &mut c.waiting {
                Some(w) => w.message.merge(&n.message),
                None => c.waiting = Some(n),
            }
        }
    }

    /// Forgets every sender and cgroup whose window has ended with nothing waiting: what is
    /// remembered of them decides nothing any more (a sender's next datagram, or a cgroup's next
    /// notification, is treated exactly as a first one). Without this, every worker PID and scope
    /// that ever spoke stayed until [`REMEMBERED`] of them: the daemon's memory grew with every
    /// deploy (the chaos soak saw it) up to tens of MiB.
    pub fn forget_idle(&mut self, now: Instant) {
        keep(&mut self.senders, |(at, _)| now.duration_since(*at) < WINDOW);
        keep(&mut self.cgroups, |c| c.waiting.is_some() || now.duration_since(c.sent_at) < WINDOW);
    }

    /// How many senders and cgroups are remembered.
    #[cfg(test)]
    pub fn remembered(&self) -> (usize, usize) {
        (self.senders.len(), self.cgroups.len())
    }

    /// When the next waiting notification is due, if any waits.
    pub fn next_due(&self) -> Option<Instant> {
        self.cgroups.values().filter(|c| c.waiting.is_some()).map(|c| c.sent_at + WINDOW).min()
    }
}

/// A moment one [`WINDOW`] before `now` (so what comes next is due at once).
fn before(now: Instant) -> Instant {
    now.checked_sub(WINDOW).unwrap_or(now)
}

/// Keeps the entries of `map` that `wanted` says, and gives back the room of a map that
/// shrank to a quarter of it (a flood's thousands of senders gone).
fn keep<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, wanted: impl Fn(&V) -> bool) {
    map.retain(|_, v| wanted(v));
    if map.capacity() > 4 * map.len().max(64) {
        map.shrink_to_fit();
    }
}

/// Keeps `map` under [`REMEMBERED`] entries by forgetting the oldest half when it is full.
fn forget_oldest<K: Clone + Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, at: impl Fn(&V) -> Instant) {
    if map.len() < REMEMBERED {
        return;
    }
    let mut times: Vec<Instant> = map.values().map(&at).collect();
    times.sort_unstable();
    let cut = times[times.len() / 2];
    map.retain(|_, v| at(v) > cut);
}

/// Counts dropped datagrams and says so at most once per [`DROP_LOG_EVERY`].
#[derive(Debug, Default)]
struct DropLog {
    count: u64,
    last_log: Option<std::time::Instant>,
}

impl DropLog {
    fn note(&mut self, pid: u32, why: &str) {
        self.count += 1;
        if self.last_log.is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY) {
            tracing::warn!(
                pid,
                "notify socket: dropped {} datagrams (the last from pid {pid}: {why})",
                self.count
            );
            self.count = 0;
            self.last_log = Some(std::time::Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
