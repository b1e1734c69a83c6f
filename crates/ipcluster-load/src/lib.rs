//! HTTP clients with a chosen source address (which decides the band), for the end-to-end
//! tests, the demo and the benchmarks. Their sockets live in a sandbox's network namespace when
//! created on a thread from [`ipcluster_sandbox::Sandbox::in_netns`].

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use socket2::{Domain, Socket, Type};

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

fn classify(e: std::io::Error) -> Failure {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => Failure::Refused,
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::ConnectionAborted
        | std::io::ErrorKind::BrokenPipe => Failure::Reset,
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Failure::Timeout,
        _ => Failure::Other(e.to_string()),
    }
}

/// Connects from `src` (port chosen by the kernel) to `dst`. Must run in the sandbox's netns.
pub fn connect(src: Ipv4Addr, dst: SocketAddrV4) -> Result<TcpStream, Failure> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(classify)?;
    s.bind(&SocketAddr::from(SocketAddrV4::new(src, 0)).into()).map_err(classify)?;
    s.connect_timeout(&SocketAddr::from(dst).into(), Duration::from_secs(3)).map_err(classify)?;
    let stream: TcpStream = s.into();
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(classify)?;
    stream.set_nodelay(true).map_err(classify)?;
    Ok(stream)
}

/// Sends one keep-alive GET on `stream` and reads one response.
pub fn request(stream: &mut TcpStream) -> Result<Answer, Failure> {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n").map_err(classify)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).map_err(classify)?;
        if n == 0 {
            return Err(Failure::Reset);
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            if !head.starts_with("HTTP/1.1 200") {
                return Err(Failure::Other(format!("status: {}", head.lines().next().unwrap_or(""))));
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().ok())
                })
                .flatten()
                .unwrap_or(0);
            if body.len() >= len {
                return Answer::parse(body)
                    .ok_or_else(|| Failure::Other(format!("unexpected body {body:?}")));
            }
        }
    }
}

/// One request on a new connection from `src`.
pub fn get(src: Ipv4Addr, dst: SocketAddrV4) -> Result<Answer, Failure> {
    let mut s = connect(src, dst)?;
    request(&mut s)
}

/// Every request's source address and outcome.
pub type Outcomes = Vec<(Ipv4Addr, Result<Answer, Failure>)>;

/// A client that keeps sending requests over new connections, cycling through `sources`,
/// until stopped. Records every answer and failure.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Outcomes>>,
}

impl Load {
    /// Starts the load inside `sb`'s network namespace.
    pub fn start(sb: &ipcluster_sandbox::Sandbox, sources: Vec<Ipv4Addr>, dst: SocketAddrV4) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = sb
            .spawn_in_netns(move || {
                let mut out = Vec::new();
                let mut i = 0;
                while !flag.load(Ordering::Relaxed) {
                    let src = sources[i % sources.len()];
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
    pub fn finish(mut self) -> Outcomes {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// 127.0.0.1 ..= 127.0.0.n
pub fn loopback_sources(n: u8) -> Vec<Ipv4Addr> {
    (1..=n).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
}
