//! The benchmarks' closed loop: every client's connection driven by **one thread** through
//! epoll (mio), as wrk drives its connections.
//!
//! On this project's 2-CPU machines the load generator has one CPU and the servers the other.
//! A thread per client (a context switch per request) in `cargo xtask`'s unoptimized build held
//! the client CPU at 96–100 %, half of it the generator's own code, while the servers' CPU idled
//! 10–60 %: the rates measured the load generator, and every front read about the same. One
//! thread that waits for whichever connection is ready, built optimized whatever the profile
//! (`[profile.dev.package]` in the workspace), costs a `write`, a `read` and a share of one
//! `epoll_wait` per request: the client CPU idles 2–19 % and the servers' is the one that
//! saturates, so a front's cost shows in the rate.
//!
//! With keep-alive the connections are made before the window (each with one request, to learn
//! the worker it reached), so the window holds requests only; `balance` spreads them evenly over
//! a plain reuseport group's workers, which the kernel's hash leaves uneven (see
//! [`closed_loop`]).

use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use mio::{Events, Interest, Poll, Token, net::TcpStream};

use crate::{Answer, Cpu, Failure, REQUEST, Stats, bound, classify, connect, pinned, request, response};

/// A connection that does not complete within this counts as failed (a timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A response that does not complete within this of its request counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per client to reach a worker that does not hold its share yet (`balance`).
const BALANCE_TRIES: usize = 2000;

/// A closed-loop load: `clients` clients, each sending requests back to back for `duration`,
/// over one keep-alive connection each or a new connection per request. `targets` are
/// `(source, destination)` pairs (the source decides the band; a control reaches the band's
/// worker directly): with keep-alive client `c` holds one connection from `targets[c]`; with a
/// new connection per request client `c` takes `targets[c]`, `targets[c + 1]`, … in turn.
/// Failed requests are counted (and a keep-alive client reconnects). Runs on one thread inside
/// `sb`'s network namespace, on CPU `cpu` when given.
///
/// With keep-alive and `balance = Some(n)`, the connections are spread over `n` workers before
/// the window: a connection that reaches a worker already holding `clients / n` (rounded up) is
/// made again (a new source port, so a new pick of the kernel's hash). A front that maps clients
/// to bands does this by itself; a plain `SO_REUSEPORT` group leaves some workers several
/// connections and others none, which for single-threaded workers (Node.js) measures how many
/// processes share the CPU rather than the front.
///
/// The window starts once every keep-alive connection is made; a successful request counts in
/// the rate only if it ended within `duration` of that start, so the rate is what the window
/// held (`ok / duration`). A request that ended after the window still gives its latency (a
/// stall at the end is not hidden from the tail), and a failure is counted whenever it ends.
///
/// A keep-alive connection that fails during the window is made again from its client's source
/// without being spread again (failures are counted, and shown in every row of the report).
///
/// Panics when the thread cannot be started or pinned, when a client's keep-alive connection
/// fails 20 times before the window, or when `balance` cannot be met.
pub fn closed_loop(
    sb: &ipcluster_sandbox::Sandbox,
    clients: usize,
    duration: Duration,
    keepalive: bool,
    targets: &[(Ipv4Addr, SocketAddrV4)],
    cpu: Cpu,
    balance: Option<usize>,
) -> Stats {
    let targets = targets.to_vec();
    let run = move || {
        pinned(cpu)?;
        Driver::new(clients, keepalive, targets, balance)?.once(duration)
    };
    let stats = sb
        .spawn_in_netns(run)
        .expect("load thread in the sandbox")
        .join()
        .unwrap_or_else(|_| Err("the load thread panicked".to_owned()));
    stats.unwrap_or_else(|e| panic!("closed loop: {e}"))
}

/// One of the two fronts (arms) of an [`interleaved`] run.
#[derive(Debug, Clone, Copy)]
pub struct Arm<'a> {
    pub sb: &'a ipcluster_sandbox::Sandbox,
    pub targets: &'a [(Ipv4Addr, SocketAddrV4)],
    /// As in [`closed_loop`].
    pub balance: Option<usize>,
}

/// Two fronts measured in turns of `slice`, `slices` turns each, in the order A B B A A B B A …
/// (`first` is A): [`closed_loop`]'s load on one front at a time, by one thread that enters each
/// front's network namespace for its turns. Returns each front's [`Stats`] over its turns (its
/// `elapsed` is `slices × slice`).
///
/// Why short turns (the benchmarks' are 50–200 ms) rather than one run per front: the machines
/// this runs on change speed by themselves — a compute loop alone on an idle CPU ran at 0.77 ×
/// its median for seconds, then 1.45 × — so two runs of 2 s one after the other measured the
/// machine as much as the fronts (their ratio read 0.85–1.36 for the same front). Turns much
/// shorter than those phases fall mostly within one, and A B B A cancels a steady drift.
///
/// With keep-alive, each front's connections are made (and spread) once, before the first turn,
/// and stay open between its turns. A turn's requests still in flight at its end finish before
/// the other front's turn begins (their latency counts, not in the rate).
#[allow(clippy::too_many_arguments, reason = "each is a knob of the run")]
pub fn interleaved(
    fronts: [Arm<'_>; 2],
    clients: usize,
    keepalive: bool,
    slice: Duration,
    slices: usize,
    first: usize,
    cpu: Cpu,
) -> [Stats; 2] {
    let ns = fronts.map(|f| format!("/proc/{}/ns/net", f.sb.init_pid()));
    let setup = fronts.map(|f| (f.targets.to_vec(), f.balance));
    let run = move || -> Result<[Stats; 2], String> {
        pinned(cpu)?;
        let ns = ns
            .iter()
            .map(|p| std::fs::File::open(p).map_err(|e| format!("{p}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let enter = |i: usize| {
            nix::sched::setns(&ns[i], nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns into the front's network namespace: {e}"))
        };
        take_turns(setup, clients, keepalive, slice, slices, first, enter)
    };
    // A thread of its own: it moves between network namespaces, which no other code shares.
    std::thread::spawn(run)
        .join()
        .unwrap_or_else(|_| Err("the load thread panicked".to_owned()))
        .unwrap_or_else(|e| panic!("interleaved closed loop: {e}"))
}

/// A front's targets and `balance`, as [`Driver::new`] takes them.
type Setup = (Vec<(Ipv4Addr, SocketAddrV4)>, Option<usize>);

/// [`interleaved`]'s work on the calling thread: `enter(i)` puts it where front `i`'s sockets
/// belong (its network namespace), before any of them is made.
fn take_turns(
    fronts: [Setup; 2],
    clients: usize,
    keepalive: bool,
    slice: Duration,
    slices: usize,
    first: usize,
    mut enter: impl FnMut(usize) -> Result<(), String>,
) -> Result<[Stats; 2], String> {
    let mut drivers = Vec::new();
    for (i, (targets, balance)) in fronts.into_iter().enumerate() {
        let mut d = Driver::new(clients, keepalive, targets, balance)?;
        enter(i)?;
        d.connect_all()?;
        drivers.push(d);
    }
    let mut inside = usize::MAX;
    // An odd number of turns ends a round on an unpaired A B; `first` alternates between rounds,
    // so that falls on each front as often.
    for k in 0..2 * slices {
        let i = turn(first, k);
        if i != inside {
            enter(i)?;
            inside = i;
        }
        drivers[i].window(slice)?;
    }
    let mut out = drivers.into_iter().map(Driver::finish);
    Ok([out.next().expect("two"), out.next().expect("two")])
}

/// Whose turn the `k`-th is: A B B A A B B A …, A being `first`.
fn turn(first: usize, k: usize) -> usize {
    (first + k.div_ceil(2)) % 2
}

/// Failed attempts to make one client's keep-alive connection before the run gives up.
const SETUP_FAILURES: usize = 20;

/// One keep-alive connection per client, each with one answered request; spread so that no
/// worker holds more than its share when `balance` is given. A failed connect or first request
/// is counted (the second value) and tried again, up to [`SETUP_FAILURES`] per client.
fn establish(
    clients: usize,
    targets: &[(Ipv4Addr, SocketAddrV4)],
    balance: Option<usize>,
) -> Result<(Vec<std::net::TcpStream>, u64), String> {
    let share = balance.map(|n| clients.div_ceil(n.max(1)));
    let mut held: BTreeMap<u32, usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(clients);
    let mut failed = 0;
    for c in 0..clients {
        let (src, dst) = targets[c % targets.len()];
        let (mut tries, mut failures) = (0, 0);
        loop {
            tries += 1;
            let made = connect(src, dst).and_then(|mut s| request(&mut s).map(|a| (s, a.pid)));
            let (s, pid) = match made {
                Ok(made) => made,
                Err(e) => {
                    failed += 1;
                    failures += 1;
                    if failures >= SETUP_FAILURES {
                        return Err(format!(
                            "connect {src} → {dst} and a first request: {e:?}, {failures} times"
                        ));
                    }
                    continue;
                }
            };
            let n = held.entry(pid).or_default();
            if share.is_some_and(|k| *n >= k) {
                if tries >= BALANCE_TRIES {
                    return Err(format!(
                        "keep-alive connections not spread over {balance:?} workers after {tries} tries \
                         (client {c}; workers reached: {held:?})"
                    ));
                }
                continue;
            }
            *n += 1;
            out.push(s);
            break;
        }
    }
    Ok((out, failed))
}

enum Phase {
    /// A keep-alive connection between windows.
    Idle,
    /// A non-blocking connect in progress.
    Connecting,
    /// This many bytes of the request are written.
    Sending(usize),
    Receiving,
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    buf: Vec<u8>,
    /// When this client's current request began (its connect, for a new connection).
    began: Instant,
    timeout: Instant,
}

impl Conn {
    fn busy(&self) -> bool {
        !matches!(self.phase, Phase::Idle)
    }
}

/// One thread's event loop over every client's connection to one front; client `c` is
/// `Token(c)`. Its windows add up in its [`Stats`].
struct Driver {
    poll: Poll,
    keepalive: bool,
    balance: Option<usize>,
    targets: Vec<(Ipv4Addr, SocketAddrV4)>,
    conns: Vec<Option<Conn>>,
    /// The target each client takes next (new connections).
    next: Vec<usize>,
    /// Clients to start again (a connection that failed at once, before any event).
    restart: Vec<usize>,
    stats: Stats,
    deadline: Instant,
}

impl Driver {
    fn new(
        clients: usize,
        keepalive: bool,
        targets: Vec<(Ipv4Addr, SocketAddrV4)>,
        balance: Option<usize>,
    ) -> Result<Self, String> {
        if targets.is_empty() || clients == 0 {
            return Err("no client or no target".to_owned());
        }
        Ok(Driver {
            poll: Poll::new().map_err(|e| format!("epoll: {e}"))?,
            keepalive,
            balance,
            targets,
            conns: (0..clients).map(|_| None).collect(),
            next: (0..clients).collect(),
            restart: Vec::new(),
            stats: Stats::default(),
            deadline: Instant::now(),
        })
    }

    /// With keep-alive, every client's connection, made now (in the calling thread's network
    /// namespace) and spread as asked; nothing without.
    fn connect_all(&mut self) -> Result<(), String> {
        if !self.keepalive {
            return Ok(());
        }
        let (held, failed) = establish(self.conns.len(), &self.targets, self.balance)?;
        self.stats.failed += failed;
        let now = Instant::now();
        for (c, s) in held.into_iter().enumerate() {
            s.set_nonblocking(true).map_err(|e| format!("non-blocking: {e}"))?;
            let mut stream = TcpStream::from_std(s);
            let both = Interest::READABLE.add(Interest::WRITABLE);
            self.poll.registry().register(&mut stream, Token(c), both).map_err(|e| format!("epoll: {e}"))?;
            self.conns[c] =
                Some(Conn { stream, phase: Phase::Idle, buf: Vec::new(), began: now, timeout: now });
        }
        Ok(())
    }

    /// Every client sends requests back to back for `duration`; then the requests in flight
    /// finish (or fail) and keep-alive connections wait for the next window.
    fn window(&mut self, duration: Duration) -> Result<(), String> {
        let start = Instant::now();
        self.deadline = start + duration;
        self.restart.clear();
        for c in 0..self.conns.len() {
            match self.conns[c].as_mut() {
                Some(conn) => {
                    conn.phase = Phase::Sending(0);
                    conn.buf.clear();
                    conn.began = start;
                    conn.timeout = start + RESPONSE_TIMEOUT;
                    self.drive(c);
                }
                None => {
                    // A keep-alive client whose connection failed: again from its own source.
                    if self.keepalive {
                        self.next[c] = c;
                    }
                    self.open(c, start);
                }
            }
        }
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if now < self.deadline {
                for c in std::mem::take(&mut self.restart) {
                    self.open(c, now);
                }
            }
            let busy = self.conns.iter().flatten().filter(|c| c.busy());
            let wake = busy.map(|c| c.timeout).min();
            let wake = match wake {
                None if now >= self.deadline => break,
                None => self.deadline,
                Some(t) if now < self.deadline => t.min(self.deadline),
                Some(t) => t,
            };
            let wait = wake.saturating_duration_since(now).min(Duration::from_millis(100));
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("epoll_wait: {e}")),
            }
            for ev in &events {
                self.drive(ev.token().0);
            }
            let now = Instant::now();
            for c in 0..self.conns.len() {
                if self.conns[c].as_ref().is_some_and(|k| k.busy() && k.timeout <= now) {
                    self.done(c, Err(Failure::Timeout), now);
                }
            }
        }
        self.stats.elapsed += duration;
        Ok(())
    }

    /// One window: [`closed_loop`]'s run on the calling thread, in its network namespace.
    fn once(mut self, duration: Duration) -> Result<Stats, String> {
        self.connect_all()?;
        self.window(duration)?;
        Ok(self.finish())
    }

    /// The windows' statistics (connections closed).
    fn finish(self) -> Stats {
        let mut stats = self.stats;
        stats.latencies_us.sort_unstable();
        stats
    }

    /// A new connection for client `c` to its next target.
    fn open(&mut self, c: usize, now: Instant) {
        let (src, dst) = self.targets[self.next[c] % self.targets.len()];
        self.next[c] += 1;
        let opened = (|| {
            let s = bound(src.into(), dst.into())?;
            s.set_tcp_nodelay(true)?;
            s.set_nonblocking(true)?;
            match s.connect(&SocketAddr::from(dst).into()) {
                Err(e) if e.raw_os_error() != Some(nix::libc::EINPROGRESS) => return Err(e),
                _ => {}
            }
            let mut stream = TcpStream::from_std(s.into());
            let both = Interest::READABLE.add(Interest::WRITABLE);
            self.poll.registry().register(&mut stream, Token(c), both)?;
            Ok(stream)
        })();
        match opened {
            Ok(stream) => {
                let conn = Conn {
                    stream,
                    phase: Phase::Connecting,
                    buf: Vec::new(),
                    began: now,
                    timeout: now + CONNECT_TIMEOUT,
                };
                self.conns[c] = Some(conn);
            }
            Err(_) => {
                self.stats.failed += 1;
                self.restart.push(c);
            }
        }
    }

    /// Moves client `c`'s requests on as far as its socket allows.
    fn drive(&mut self, c: usize) {
        loop {
            let Some(outcome) = self.progress(c) else { return };
            self.done(c, outcome, Instant::now());
            // A keep-alive client goes on with its next request at once; a new connection
            // waits for its connect to complete.
            if !matches!(self.conns[c], Some(Conn { phase: Phase::Sending(_), .. })) {
                return;
            }
        }
    }

    /// Client `c`'s request, moved on until its socket would block (`None`) or it ends.
    fn progress(&mut self, c: usize) -> Option<Result<Answer, Failure>> {
        let conn = self.conns.get_mut(c)?.as_mut()?;
        loop {
            match conn.phase {
                Phase::Idle => return None,
                Phase::Connecting => match conn.stream.take_error() {
                    Ok(Some(e)) | Err(e) => return Some(Err(classify(e))),
                    Ok(None) => match conn.stream.peer_addr() {
                        Ok(_) => {
                            conn.phase = Phase::Sending(0);
                            conn.timeout = conn.began + RESPONSE_TIMEOUT;
                        }
                        Err(e) if e.kind() == ErrorKind::NotConnected => return None,
                        Err(e) => return Some(Err(classify(e))),
                    },
                },
                Phase::Sending(off) => match conn.stream.write(&REQUEST[off..]) {
                    Ok(0) => return Some(Err(Failure::Reset)),
                    Ok(n) if off + n == REQUEST.len() => conn.phase = Phase::Receiving,
                    Ok(n) => conn.phase = Phase::Sending(off + n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Some(Err(classify(e))),
                },
                Phase::Receiving => {
                    let mut chunk = [0u8; 1024];
                    match conn.stream.read(&mut chunk) {
                        Ok(0) => return Some(Err(Failure::Reset)),
                        Ok(n) => {
                            conn.buf.extend_from_slice(&chunk[..n]);
                            if let Some(answer) = response(&conn.buf) {
                                return Some(answer);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Some(Err(classify(e))),
                    }
                }
            }
        }
    }

    /// Client `c`'s request ended with `outcome` at `now`: counted, then the next one begins
    /// while the window lasts; after it, a keep-alive connection waits for the next window.
    fn done(&mut self, c: usize, outcome: Result<Answer, Failure>, now: Instant) {
        let Some(mut conn) = self.conns[c].take() else { return };
        let us = now.saturating_duration_since(conn.began).as_micros().min(u32::MAX as u128) as u32;
        let ok = outcome.is_ok();
        match outcome {
            // Outside the window: its latency counts, not in the rate.
            Ok(_) if now > self.deadline => self.stats.latencies_us.push(us),
            Ok(answer) => {
                self.stats.ok += 1;
                self.stats.latencies_us.push(us);
                *self.stats.served_by.entry(answer.pid).or_default() += 1;
            }
            Err(_) => self.stats.failed += 1,
        }
        if self.keepalive && ok {
            conn.buf.clear();
            if now >= self.deadline {
                conn.phase = Phase::Idle;
            } else {
                conn.phase = Phase::Sending(0);
                conn.began = now;
                conn.timeout = now + RESPONSE_TIMEOUT;
            }
            self.conns[c] = Some(conn);
            return;
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        drop(conn);
        if now < self.deadline {
            if self.keepalive {
                // A failed keep-alive connection is made again from the client's own source.
                self.next[c] = c;
            }
            self.open(c, now);
        }
    }
}

#[cfg(test)]
mod tests;
