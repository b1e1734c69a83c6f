//! `ipcluster-demo`: a small HTTP/1.1 worker that answers every request with who it is:
//!
//! ```text
//! app=demo generation=2 band=3 pid=4711 peer=127.0.0.7
//! ```
//!
//! With `LISTEN_FDS` (socket mode, sd_listen_fds(3)) it accepts on the sockets it was handed
//! from fd 3; otherwise it listens on `[::]:<port>` (dual-stack: IPv4 clients too; `0.0.0.0`
//! where IPv6 is off) for every worker port in `IPCLUSTER_PORTS` (else `$PORT`). It sends
//! `READY=1` when `NOTIFY_SOCKET` is set, and keeps connections alive. Flags make it
//! misbehave on purpose, for tests: `--exit-at-start CODE`, `--never-ready`, `--ignore-sigterm`,
//! `--delay-ready MS`, `--delay-notify MS` (listen at once, send `READY=1` that long after),
//! `--exit-after MS` (exit 1 that long after becoming ready; with
//! `--armed-by PATH`, only once PATH exists, so a test decides when a crash loop begins),
//! `--stop-watchdog-after MS`, `--fork-child` (starts a child process that outlives it and
//! ignores SIGTERM), `--forge-identity` (re-execs itself claiming 2^32-1 bands and a route for
//! port 22, as a hostile worker would); `--log-requests` prints a line per request (to the
//! journal).
//! `GET /alloc/N` makes the worker allocate (and touch) N more MiB, for memory tests.
//! `GET /healthz` answers `200 ok`, or `500` while the file given with `--unhealthy-if PATH`
//! exists, or `PATH.<its pid>` (one worker made sick), for health check tests.

use std::{
    env,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

#[derive(Debug, Default)]
struct Flags {
    exit_at_start: Option<u8>,
    never_ready: bool,
    ignore_sigterm: bool,
    delay_ready_ms: u64,
    delay_notify_ms: u64,
    log_requests: bool,
    exit_after_ms: Option<u64>,
    armed_by: Option<std::path::PathBuf>,
    fork_child: bool,
    forge_identity: bool,
    stop_watchdog_after_ms: Option<u64>,
    unhealthy_if: Option<std::path::PathBuf>,
}

fn parse_flags() -> Result<Flags, String> {
    let mut f = Flags::default();
    let mut args = env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--exit-at-start" => {
                f.exit_at_start = Some(value("--exit-at-start")?.parse().map_err(|e| format!("{e}"))?)
            }
            "--never-ready" => f.never_ready = true,
            "--ignore-sigterm" => f.ignore_sigterm = true,
            "--log-requests" => f.log_requests = true,
            "--exit-after" => {
                f.exit_after_ms = Some(value("--exit-after")?.parse().map_err(|e| format!("{e}"))?)
            }
            "--armed-by" => f.armed_by = Some(value("--armed-by")?.into()),
            "--unhealthy-if" => f.unhealthy_if = Some(value("--unhealthy-if")?.into()),
            "--fork-child" => f.fork_child = true,
            "--forge-identity" => f.forge_identity = true,
            "--stop-watchdog-after" => {
                f.stop_watchdog_after_ms =
                    Some(value("--stop-watchdog-after")?.parse().map_err(|e| format!("{e}"))?)
            }
            "--delay-ready" => {
                f.delay_ready_ms = value("--delay-ready")?.parse().map_err(|e| format!("{e}"))?
            }
            "--delay-notify" => {
                f.delay_notify_ms = value("--delay-notify")?.parse().map_err(|e| format!("{e}"))?
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(f)
}

fn main() -> ExitCode {
    let flags = match parse_flags() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ipcluster-demo: {e}");
            return ExitCode::from(2);
        }
    };
    let app = env::var("IPCLUSTER_APP").unwrap_or_else(|_| "demo".into());
    let generation = env::var("IPCLUSTER_GENERATION").unwrap_or_else(|_| "0".into());
    let band = env::var("IPCLUSTER_BAND").unwrap_or_else(|_| "0".into());
    println!(
        "ipcluster-demo pid={} app={app} generation={generation} band={band} starting",
        std::process::id()
    );
    if flags.forge_identity && env::var_os("IPCLUSTER_FORGED").is_none() {
        use std::os::unix::process::CommandExt;
        let ports = env::var("IPCLUSTER_PORTS").unwrap_or_default();
        let first = ports.split(',').next().and_then(|p| p.split_once(':')).map_or("1", |p| p.1).to_owned();
        let err = std::process::Command::new("/proc/self/exe")
            .args(env::args_os().skip(1))
            .env("IPCLUSTER_FORGED", "1")
            .env("IPCLUSTER_BANDS", "4294967295")
            .env("IPCLUSTER_PORTS", format!("{ports},22:{first}"))
            .exec();
        eprintln!("ipcluster-demo: cannot re-exec: {err}");
        return ExitCode::from(1);
    }
    if flags.fork_child {
        // A helper that outlives the worker unless its whole cgroup is stopped.
        match std::process::Command::new("/bin/sh").args(["-c", "trap '' TERM; exec sleep 100000"]).spawn() {
            Ok(c) => println!("ipcluster-demo: forked child pid {}", c.id()),
            Err(e) => eprintln!("ipcluster-demo: cannot fork a child: {e}"),
        }
    }
    if let Some(code) = flags.exit_at_start {
        eprintln!("ipcluster-demo: exiting with {code} as asked (--exit-at-start)");
        return ExitCode::from(code);
    }
    if flags.ignore_sigterm {
        // SAFETY: installing SIG_IGN is async-signal-safe and done before any thread starts.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    if flags.never_ready {
        loop {
            thread::sleep(Duration::from_secs(3600));
        }
    }
    thread::sleep(Duration::from_millis(flags.delay_ready_ms));

    let identity = format!("app={app} generation={generation} band={band} pid={}", std::process::id());
    let listeners = match handed_sockets() {
        Some(l) => l,
        None => match bind_ports() {
            Ok(l) => l,
            Err((code, why)) => {
                eprintln!("ipcluster-demo: {why}");
                return ExitCode::from(code);
            }
        },
    };
    let ports: Vec<String> =
        listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect();
    println!("ipcluster-demo {identity} listening on {ports:?}");
    if flags.delay_notify_ms > 0 {
        let ms = flags.delay_notify_ms;
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(ms));
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        });
    } else {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let stop_after = flags.stop_watchdog_after_ms.map(Duration::from_millis);
        thread::spawn(move || {
            let start = std::time::Instant::now();
            while stop_after.is_none_or(|s| start.elapsed() < s) {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                thread::sleep(interval / 3);
            }
            println!("ipcluster-demo: no more WATCHDOG=1 (as asked)");
        });
    }
    if let Some(ms) = flags.exit_after_ms {
        let armed_by = flags.armed_by.clone();
        thread::spawn(move || {
            while armed_by.as_ref().is_some_and(|p| !p.exists()) {
                thread::sleep(Duration::from_millis(20));
            }
            thread::sleep(Duration::from_millis(ms));
            eprintln!("ipcluster-demo: exiting with 1 as asked (--exit-after)");
            std::process::exit(1);
        });
    }
    let mut handles = Vec::new();
    let log = flags.log_requests;
    let sick: Option<std::sync::Arc<[std::path::PathBuf; 2]>> = flags.unhealthy_if.map(|p| {
        let mine = std::path::PathBuf::from(format!("{}.{}", p.display(), std::process::id()));
        std::sync::Arc::new([p, mine])
    });
    for l in listeners {
        let identity = identity.clone();
        let sick = sick.clone();
        handles.push(thread::spawn(move || {
            for stream in l.incoming().flatten() {
                let identity = identity.clone();
                let sick = sick.clone();
                thread::spawn(move || serve(stream, &identity, log, sick.as_deref()));
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

/// The sockets handed over by socket activation (sd_listen_fds(3)): `LISTEN_FDS` of them from
/// fd 3, if `LISTEN_PID` is this process.
fn handed_sockets() -> Option<Vec<TcpListener>> {
    use std::os::fd::FromRawFd;
    let pid: u32 = env::var("LISTEN_PID").ok()?.parse().ok()?;
    let n: i32 = env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || !(1..=64).contains(&n) {
        return None;
    }
    // SAFETY: sd_listen_fds(3): fds 3..3+LISTEN_FDS are listening sockets handed to this process
    // (LISTEN_PID says so), owned by nobody else in it.
    Some((3..3 + n).map(|fd| unsafe { TcpListener::from_raw_fd(fd) }).collect())
}

/// Listens on every worker port of `IPCLUSTER_PORTS` (else `$PORT`): `[::]`, dual-stack, or
/// `0.0.0.0` where IPv6 is unavailable.
fn bind_ports() -> Result<Vec<TcpListener>, (u8, String)> {
    let mut ports: Vec<u16> = match env::var("IPCLUSTER_PORTS") {
        Ok(pairs) if !pairs.is_empty() => {
            pairs.split(',').filter_map(|p| p.split_once(':')?.1.parse().ok()).collect()
        }
        _ => env::var("PORT").ok().and_then(|p| p.parse().ok()).into_iter().collect(),
    };
    ports.dedup();
    if ports.is_empty() {
        return Err((2, "no port (set PORT or IPCLUSTER_PORTS)".into()));
    }
    ports
        .iter()
        .map(|port| {
            TcpListener::bind(("::", *port))
                .or_else(|_| TcpListener::bind(("0.0.0.0", *port)))
                .map_err(|e| (1, format!("cannot listen on port {port}: {e}")))
        })
        .collect()
}

/// Serves HTTP/1.1 requests on one connection until the client closes it.
fn serve(stream: TcpStream, identity: &str, log: bool, sick: Option<&[std::path::PathBuf; 2]>) {
    let _ = stream.set_nodelay(true);
    // An IPv4 client of a dual-stack socket shows as itself, not as ::ffff:a.b.c.d.
    let peer = stream.peer_addr().map(|a| a.ip().to_canonical().to_string()).unwrap_or_default();
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let body = format!("{identity} peer={peer}\n");
    let mut line = String::new();
    loop {
        line.clear();
        // Request line.
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut close = line.starts_with("GET") && line.contains("HTTP/1.0");
        let health = line.starts_with("GET /healthz ");
        if let Some(mb) = line
            .strip_prefix("GET /alloc/")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
        {
            // Touch every page so it counts in RSS; keep it for the process's life.
            let block = vec![1u8; mb.min(4096) << 20];
            Box::leak(block.into_boxed_slice());
        }
        let mut content_length = 0usize;
        // Headers.
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if lower == "connection: close" {
                close = true;
            } else if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
        if content_length > 0 {
            let mut discard = vec![0u8; content_length.min(1 << 20)];
            if std::io::Read::read_exact(&mut reader, &mut discard).is_err() {
                return;
            }
        }
        if log {
            println!("request from {peer}");
        }
        let unhealthy = health && sick.is_some_and(|paths| paths.iter().any(|p| p.exists()));
        let (status, text) = match (health, unhealthy) {
            (true, true) => ("500 Internal Server Error", "sick\n".to_owned()),
            (true, false) => ("200 OK", "ok\n".to_owned()),
            _ => ("200 OK", body.clone()),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}
