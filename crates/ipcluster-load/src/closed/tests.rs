//! The closed loop's event loop against small HTTP servers on the host's loopback interface
//! (all of 127.0.0.0/8 is local there, so each client gets its own source address).

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    sync::{Arc, Mutex},
};

use socket2::{Domain, Socket, Type};

use super::*;
use crate::loopback_sources;

/// What the test server does with each request.
#[derive(Clone, Copy)]
enum Serve {
    Answer,
    /// Reads the request and closes the connection without answering.
    Hang,
}

/// (worker "pid" a connection was given, requests it served), one per closed connection.
type Served = Arc<Mutex<Vec<(u32, u32)>>>;

/// A server on 127.0.0.1 that gives each accepted connection a "worker" from a fixed,
/// uneven sequence (mostly worker 0, as a hash can be), as the answer's `pid`.
fn server(serve: Serve) -> (SocketAddrV4, Served) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = match l.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!(),
    };
    let served: Served = Arc::default();
    let log = served.clone();
    std::thread::spawn(move || {
        let mut x: u32 = 7;
        for stream in l.incoming().flatten() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let pid = if (x >> 16).is_multiple_of(3) { (x >> 20) % 4 } else { 0 };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                let mut n = 0;
                let mut line = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if line != "\r\n" {
                        continue;
                    }
                    if let Serve::Hang = serve {
                        break;
                    }
                    let body = format!("app=t generation=1 band=0 pid={pid} peer=x\n");
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    if w.write_all(format!("{head}{body}").as_bytes()).is_err() {
                        break;
                    }
                    n += 1;
                }
                log.lock().unwrap().push((pid, n));
            });
        }
    });
    (addr, served)
}

/// The server's log once it holds at least `n` closed connections (or after 5 s).
fn closed_connections(served: &Served, n: usize) -> Vec<(u32, u32)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = served.lock().unwrap().clone();
        if log.len() >= n || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A local address that refuses connections: bound, never listening (no other test can be
/// given its port while it is held).
fn refusing() -> (Socket, SocketAddrV4) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket_ipv4().unwrap();
    (s, addr)
}

/// [`closed_loop`]'s run, on this thread.
fn run(
    clients: usize,
    duration: Duration,
    keepalive: bool,
    targets: Vec<(Ipv4Addr, SocketAddrV4)>,
    balance: Option<usize>,
) -> Result<Stats, String> {
    Driver::new(clients, keepalive, targets, balance)?.once(duration)
}

fn targets(n: u8, dst: SocketAddrV4) -> Vec<(Ipv4Addr, SocketAddrV4)> {
    loopback_sources(n).into_iter().map(|s| (s, dst)).collect()
}

#[test]
fn keepalive_connections_are_spread_evenly_when_asked() {
    let (dst, served) = server(Serve::Answer);
    let stats = run(8, Duration::from_millis(300), true, targets(8, dst), Some(4)).unwrap();
    assert_eq!(stats.failed, 0);
    assert!(stats.ok > 8, "{stats:?}");
    assert_eq!(stats.served_by.len(), 4, "every worker answered: {:?}", stats.served_by);
    // The eight connections that carried the window's requests: two per worker. (The ones
    // dropped while spreading served one request each.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let held = loop {
        let held: Vec<u32> = served.lock().unwrap().iter().filter(|(_, n)| *n > 1).map(|(p, _)| *p).collect();
        if held.len() == 8 || Instant::now() > deadline {
            break held;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut per: BTreeMap<u32, usize> = BTreeMap::new();
    held.iter().for_each(|p| *per.entry(*p).or_default() += 1);
    assert_eq!(per, (0..4).map(|p| (p, 2)).collect::<BTreeMap<_, _>>());
    assert!(served.lock().unwrap().len() > 8, "the uneven sequence made the spreading reconnect");
}

#[test]
fn without_balance_the_connections_stay_where_they_land() {
    let (dst, _) = server(Serve::Answer);
    let stats = run(8, Duration::from_millis(200), true, targets(8, dst), None).unwrap();
    assert_eq!(stats.failed, 0);
    assert!(stats.served_by.len() < 4, "the sequence is uneven: {:?}", stats.served_by);
}

#[test]
fn new_connections_count_every_request_in_the_window() {
    let (dst, served) = server(Serve::Answer);
    let started = Instant::now();
    let stats = run(4, Duration::from_millis(300), false, targets(4, dst), None).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(stats.failed, 0);
    assert!(stats.ok > 20, "{stats:?}");
    assert!(stats.latencies_us.is_sorted());
    assert_eq!(stats.elapsed, Duration::from_millis(300));
    // The server answered every request counted, and at most one more per client (the one that
    // ended after the window: its latency counts, not in the rate); one request per connection.
    let log = closed_connections(&served, stats.latencies_us.len());
    assert!(log.iter().all(|(_, n)| *n == 1), "one request per connection: {log:?}");
    let answered = log.len() as u64;
    assert!((stats.ok..=stats.ok + 4).contains(&answered), "{answered} answered, {} counted", stats.ok);
    assert_eq!(stats.latencies_us.len() as u64, answered, "a latency for every answer");
    assert_eq!(stats.served_by.values().sum::<u64>(), stats.ok);
}

#[test]
fn failures_are_counted_never_in_the_rate() {
    let (dst, _) = server(Serve::Hang);
    let stats = run(4, Duration::from_millis(200), false, targets(4, dst), None).unwrap();
    assert_eq!(stats.ok, 0);
    assert!(stats.failed > 4, "{stats:?}");
    // Nothing listens: refused, counted, and the run still ends with its window.
    let (_held, gone) = refusing();
    let started = Instant::now();
    let stats = run(2, Duration::from_millis(100), false, targets(2, gone), None).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(stats.ok, 0);
    assert!(stats.failed > 0);
    // A keep-alive connection that cannot be made before the window: tried again, then an error
    // that says why.
    let err = run(2, Duration::from_millis(100), true, targets(2, gone), None).unwrap_err();
    assert!(err.contains("Refused") && err.contains("20 times"), "{err}");
}

#[test]
fn two_fronts_take_equal_turns_a_b_b_a() {
    let (a, served_a) = server(Serve::Answer);
    let (b, served_b) = server(Serve::Answer);
    let mut entered = Vec::new();
    let fronts = [(targets(4, a), None), (targets(4, b), None)];
    let slice = Duration::from_millis(20);
    let [sa, sb] = take_turns(fronts, 4, true, slice, 3, 1, |i| {
        entered.push(i);
        Ok(())
    })
    .unwrap();
    // Each front's connections made in its own place, then B A A B B A: a move at each change.
    assert_eq!(entered, [0, 1, 1, 0, 1, 0]);
    assert_eq!((sa.elapsed, sb.elapsed), (3 * slice, 3 * slice));
    assert!(sa.ok > 0 && sb.ok > 0 && sa.failed == 0 && sb.failed == 0, "{sa:?} {sb:?}");
    // Each front's requests went to its own server, over its own 4 connections.
    let (la, lb) = (closed_connections(&served_a, 4), closed_connections(&served_b, 4));
    let sum = |l: &[(u32, u32)]| l.iter().map(|(_, n)| u64::from(*n)).sum::<u64>();
    assert_eq!((la.len(), lb.len()), (4, 4));
    assert!(sum(&la) >= sa.ok + 4 && sum(&lb) >= sb.ok + 4);
}

#[test]
fn turns_go_a_b_b_a() {
    let order: String = (0..8).map(|k| if turn(0, k) == 0 { 'A' } else { 'B' }).collect();
    assert_eq!(order, "ABBAABBA");
    assert!((0..8).all(|k| turn(1, k) != turn(0, k)));
}

#[test]
fn keepalive_connections_stay_open_between_windows() {
    let (dst, served) = server(Serve::Answer);
    let mut d = Driver::new(8, true, targets(8, dst), None).unwrap();
    d.connect_all().unwrap();
    let mut oks = Vec::new();
    for _ in 0..3 {
        d.window(Duration::from_millis(50)).unwrap();
        oks.push(d.stats.ok);
        assert!(d.conns.iter().all(|c| c.as_ref().is_some_and(|c| !c.busy())), "idle between windows");
    }
    let stats = d.finish();
    assert!(oks[0] > 0 && oks[1] > oks[0] && oks[2] > oks[1], "{oks:?}");
    assert_eq!(stats.elapsed, Duration::from_millis(150));
    let closed = closed_connections(&served, 8);
    assert_eq!(closed.len(), 8, "each client's one connection, closed once at the end: {closed:?}");
    // Each connection's first request (made before the windows), the windows' requests, and
    // at most one per client and window that ended after its window.
    let answered = closed.iter().map(|(_, n)| u64::from(*n)).sum::<u64>();
    assert!((stats.ok + 8..=stats.ok + 8 + 24).contains(&answered), "{answered} vs {}", stats.ok);
}

#[test]
fn a_response_is_whole_only_with_its_body() {
    let head = "HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n";
    let body = "app=a generation=3 band=1 pid=42 peer=127.0.0.2:5555\n";
    let body = format!("{body:<60}");
    assert!(response(head.as_bytes()).is_none());
    let whole = format!("{head}{body}");
    assert!(response(&whole.as_bytes()[..whole.len() - 1]).is_none());
    let answer = response(whole.as_bytes()).unwrap().unwrap();
    assert_eq!((answer.generation, answer.band, answer.pid), (3, 1, 42));
    let err = response(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert_eq!(err.unwrap_err(), Failure::Other("status: HTTP/1.1 503 Busy".into()));
}
