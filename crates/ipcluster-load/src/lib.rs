//! HTTP clients with a chosen source address (which decides the band), IPv4 or IPv6, for the
//! end-to-end tests, the demo and the benchmarks. Their sockets live in a sandbox's network
//! namespace when created on a thread from [`ipcluster_sandbox::Sandbox::in_netns`].

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use socket2::{Domain, Socket, Type};

mod closed;
pub use closed::{Arm, closed_loop, interleaved};

/// What a demo worker answered: `app=… generation=… band=… pid=… peer=…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub app: String,
    pub generation: u64,
    pub band: u32,
    pub pid: u32,
    pub peer: String,
}

impl Answer {
    fn parse(body: &str) -> Option<Self> {
        let get = |k: &str| {
            body.split_whitespace().find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')).map(str::to_owned)
        };
        Some(Self {
            app: get("app")?,
            generation: get("generation")?.parse().ok()?,
            band: get("band")?.parse().ok()?,
            pid: get("pid")?.parse().ok()?,
            peer: get("peer")?,
        })
    }
}

/// How a request went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Refused,
    Reset,
    Timeout,
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused => f.write_str("refused"),
            Failure::Reset => f.write_str("reset"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Other(e) => f.write_str(e),
        }
    }
}

pub(crate) fn classify(e: std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Refused,
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => Failure::Reset,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::Timeout,
        _ => Failure::Other(e.to_string()),
    }
}

/// Connects from `src` (port chosen by the kernel) to `dst`, both of one family. Must run in
/// the sandbox's netns.
pub fn connect(src: impl Into<IpAddr>, dst: impl Into<SocketAddr>) -> Result<TcpStream, Failure> {
    let (src, dst) = (src.into(), dst.into());
    let s = bound(src, dst).map_err(classify)?;
    s.connect_timeout(&dst.into(), Duration::from_secs(3)).map_err(classify)?;
    let stream: TcpStream = s.into();
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(classify)?;
    stream.set_nodelay(true).map_err(classify)?;
    Ok(stream)
}

/// The request every client sends (HTTP/1.1, so the connection stays open).
pub(crate) const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";

/// A TCP socket for `dst`'s family, bound to `src` (port chosen by the kernel), not yet
/// connected.
pub(crate) fn bound(src: IpAddr, dst: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    Ok(s)
}

/// Sends one keep-alive GET on `stream` and reads one response.
pub fn request(stream: &mut TcpStream) -> Result<Answer, Failure> {
    stream.write_all(REQUEST).map_err(classify)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).map_err(classify)?;
        if n == 0 {
            return Err(Failure::Reset);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(answer) = response(&buf) {
            return answer;
        }
    }
}

/// The response in `buf`, once it is whole (its head and `Content-Length` bytes of body).
pub(crate) fn response(buf: &[u8]) -> Option<Result<Answer, Failure>> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Some(Err(Failure::Other(format!("status: {}", head.lines().next().unwrap_or("")))));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().ok()))
        .flatten()
        .unwrap_or(0);
    (body.len() >= len)
        .then(|| Answer::parse(body).ok_or_else(|| Failure::Other(format!("unexpected body {body:?}"))))
}

/// One request on a new connection from `src`.
pub fn get(src: impl Into<IpAddr>, dst: impl Into<SocketAddr>) -> Result<Answer, Failure> {
    let mut s = connect(src, dst)?;
    request(&mut s)
}

/// Every request's source address (IPv4 unless said otherwise) and outcome.
pub type Outcomes<A = Ipv4Addr> = Vec<(A, Result<Answer, Failure>)>;

/// A client that keeps sending requests over new connections, cycling through its sources
/// (of type `A`: [`Ipv4Addr`], or [`IpAddr`] for a load of both families), until stopped.
/// Records every answer and failure.
#[derive(Debug)]
pub struct Load<A = Ipv4Addr> {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Outcomes<A>>>,
}

impl<A: Into<IpAddr> + Copy + Send + 'static> Load<A> {
    /// Starts the load from `sources` to `dst` inside `sb`'s network namespace.
    pub fn start(sb: &ipcluster_sandbox::Sandbox, sources: Vec<A>, dst: impl Into<SocketAddr>) -> Self {
        let dst = dst.into();
        Self::start_to(sb, sources.into_iter().map(|s| (s, dst)).collect())
    }

    /// Starts a load that cycles through `(source, destination)` pairs (of either family,
    /// pair by pair) inside `sb`'s network namespace.
    pub fn start_to(sb: &ipcluster_sandbox::Sandbox, targets: Vec<(A, SocketAddr)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = sb
            .spawn_in_netns(move || {
                let mut out = Vec::new();
                let mut i = 0;
                while !flag.load(Ordering::Relaxed) {
                    let (src, dst) = targets[i % targets.len()];
                    out.push((src, get(src, dst)));
                    i += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                out
            })
            .unwrap();
        Self { stop, handle: Some(handle) }
    }

    /// Stops and returns every outcome.
    pub fn finish(mut self) -> Outcomes<A> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl<A> Drop for Load<A> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// 127.0.0.1 ..= 127.0.0.n
pub fn loopback_sources(n: u8) -> Vec<Ipv4Addr> {
    (1..=n).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
}

/// `prefix::1 ..= prefix::n`: IPv6 sources whose last 32 bits are `1..=n` (band `i & (N-1)`,
/// as `127.0.0.i`). Unlike 127.0.0.0/8, only `::1` is on the loopback interface by itself:
/// the others must be added first (`ip -6 addr add ADDR/128 dev lo nodad`).
pub fn ipv6_sources(prefix: Ipv6Addr, n: u16) -> Vec<Ipv6Addr> {
    (1..=n).map(|i| Ipv6Addr::from(u128::from(prefix) | u128::from(i))).collect()
}

/// Throughput and latency of a closed-loop run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Latencies of successful requests, in µs, sorted.
    pub latencies_us: Vec<u32>,
    /// Successful requests by the PID of the worker that answered: how the front spread the
    /// clients (with keep-alive, one connection per client for the whole run).
    pub served_by: std::collections::BTreeMap<u32, u64>,
}

impl Stats {
    /// Requests per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th percentile latency (0..=100), in µs.
    pub fn percentile(&self, p: f64) -> u32 {
        percentile(&self.latencies_us, p)
    }
}

/// The `p`-th percentile of sorted `values`.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Pins the calling thread to CPU `cpu` (`sched_setaffinity`); threads it starts later
/// inherit it.
pub fn pin_thread(cpu: usize) -> std::io::Result<()> {
    pin_thread_to(&[cpu])
}

/// Pins the calling thread to the CPUs `cpus`.
pub fn pin_thread_to(cpus: &[usize]) -> std::io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(std::io::Error::other)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(std::io::Error::other)
}

/// Where a load's threads run: `Some(cpu)` pins them there, `None` leaves them to the scheduler.
pub type Cpu = Option<usize>;

/// Pins the calling thread to `cpu`, when given.
pub(crate) fn pinned(cpu: Cpu) -> Result<(), String> {
    cpu.map_or(Ok(()), pin_thread).map_err(|e| format!("sched_setaffinity of a load thread: {e}"))
}

/// One request of an open-loop run.
#[derive(Debug, Clone)]
pub struct Record {
    /// When it was due, since the start of the run.
    pub due: Duration,
    /// From when it was due to the end of the response (so a stalled server cannot hide
    /// latency by slowing the generator down: no coordinated omission).
    pub latency: Duration,
    pub outcome: Result<u32, Failure>,
    /// The handshake completed (the kernel had queued the connection, whether or not a worker
    /// then accepted it); a failure with `false` came from the connect itself.
    pub connected: bool,
}

/// An open-loop load: requests due at a fixed `rate` per second over new connections, taking
/// `targets` (`(source, destination)` pairs) in turn, for `duration` from `start`. As in wrk2,
/// each of the `workers` threads keeps a schedule of its own (request `n` is thread
/// `n % workers`'s), sends each request when it is due or, when it is late, at once, and counts
/// its latency from when it was due: a stall is charged to every request it delayed (no
/// coordinated omission), and no queue is shared between threads. Runs inside `sb`'s network
/// namespace, on CPU `cpu` when given. Returns one record per request.
#[allow(clippy::too_many_arguments, reason = "each is a knob of the run")]
pub fn open_loop(
    sb: &ipcluster_sandbox::Sandbox,
    start: std::time::Instant,
    rate: u32,
    duration: Duration,
    targets: &[(Ipv4Addr, SocketAddrV4)],
    workers: usize,
    cpu: Cpu,
) -> Vec<Record> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let total = (duration.as_secs_f64() * f64::from(rate)) as usize;
    let workers = workers.max(1);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let targets = targets.to_vec();
            sb.spawn_in_netns(move || {
                pinned(cpu).expect("a load thread on its CPU");
                let mut out = Vec::new();
                for n in (w..total).step_by(workers) {
                    let due = interval.mul_f64(n as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    let (src, dst) = targets[n % targets.len()];
                    let (outcome, connected) = match connect(src, dst) {
                        Ok(mut s) => (request(&mut s).map(|a| a.pid), true),
                        Err(e) => (Err(e), false),
                    };
                    let latency = start.elapsed().saturating_sub(due);
                    out.push(Record { due, latency, outcome, connected });
                }
                out
            })
            .expect("client thread in the sandbox")
        })
        .collect();
    let mut records: Vec<Record> = handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect();
    records.sort_by_key(|r| r.due);
    records
}
