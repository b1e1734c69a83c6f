//! The server on a real listener (127.0.0.1, an ephemeral port), spoken to byte by byte the way
//! clients, good and bad, would.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{Limits, serve};
use crate::supervisor::{Mailbox, Snapshot, channel};

/// A server with `limits` on an ephemeral port; the mailbox publishes its snapshots.
async fn server(limits: Limits) -> (SocketAddr, Mailbox) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (handle, mailbox) = channel();
    tokio::spawn(serve(listener, handle, limits));
    (addr, mailbox)
}

async fn published(limits: Limits) -> (SocketAddr, Mailbox) {
    let (addr, mailbox) = server(limits).await;
    mailbox.publish(Snapshot { valid: vec!["web".into()], ..Snapshot::default() });
    (addr, mailbox)
}

/// Sends `request` and reads until the server closes (it serves one request per connection).
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // A server that answers before reading everything may reset a long write: what it answered
    // is still read below.
    let _ = stream.write_all(request.as_bytes()).await;
    read_all(&mut stream, Duration::from_secs(5)).await.expect("the server answers and closes")
}

/// What the server sends until it closes, or `None` if it has not closed within `limit`.
async fn read_all(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.ok().map(|()| String::from_utf8_lossy(&out).into_owned())
}

fn status(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

const GET: &str = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn get_metrics_answers_the_text_format_or_openmetrics_when_asked() {
    let (addr, _mailbox) = published(Limits::default()).await;
    let r = exchange(addr, GET).await;
    assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
    assert_eq!(header(&r, "content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert!(body(&r).contains("# TYPE ipcluster_deploys_total counter\n"), "{r}");
    assert!(body(&r).contains("ipcluster_deploys_total{app=\"web\",result=\"ok\"} 0\n"), "{r}");
    assert_eq!(header(&r, "content-length"), Some(body(&r).len().to_string().as_str()));
    assert_eq!(header(&r, "connection"), Some("close"), "one request per connection");

    let r = exchange(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
    assert_eq!(
        header(&r, "content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(body(&r).contains("# TYPE ipcluster_deploys counter\n") && body(&r).ends_with("# EOF\n"), "{r}");

    // HTTP/1.0 clients (and HEAD) work too.
    let r = exchange(addr, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert!(status(&r).ends_with("200 OK") && body(&r).contains("ipcluster_build_info"), "{r}");
    let r = exchange(addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
    assert_eq!(body(&r), "", "no body for HEAD");
}

#[tokio::test]
async fn other_paths_are_404_and_other_methods_405() {
    let (addr, _mailbox) = published(Limits::default()).await;
    for path in ["/", "/metrics/", "/metricsx", "/favicon.ico", "/../metrics"] {
        let r = exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        assert_eq!(status(&r), "HTTP/1.1 404 Not Found", "{path}: {r}");
        assert!(!r.contains("ipcluster_"), "{path}: {r}");
    }
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r =
            exchange(addr, &format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"))
                .await;
        assert_eq!(status(&r), "HTTP/1.1 405 Method Not Allowed", "{method}: {r}");
        assert_eq!(header(&r, "allow"), Some("GET, HEAD"), "{method}: {r}");
    }
    // A query string does not change the path.
    let r = exchange(addr, "GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
}

#[tokio::test]
async fn a_request_body_is_never_read_and_an_oversized_head_is_refused() {
    let (addr, _mailbox) = published(Limits::default()).await;
    // A terabyte announced, nothing sent: the answer comes at once.
    let started = Instant::now();
    let r =
        exchange(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\nab").await;
    assert_eq!(status(&r), "HTTP/1.1 405 Method Not Allowed", "{r}");
    let r =
        exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\nab").await;
    assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // A 64 KiB header: refused without being buffered whole.
    let big = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 << 10));
    let r = exchange(addr, &big).await;
    assert!(!r.contains("200 OK") && !r.contains("ipcluster_"), "{r}");
    // The server still serves.
    assert_eq!(status(&exchange(addr, GET).await), "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn a_silent_or_slow_client_is_dropped_and_costs_no_slot_for_long() {
    let limits = Limits {
        connections: 1,
        header_timeout: Duration::from_millis(300),
        connection_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let (addr, _mailbox) = published(limits).await;
    // Says nothing: closed once the head is overdue.
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let r = read_all(&mut silent, Duration::from_secs(5)).await.expect("closed by the server");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "{waited:?}");
    assert!(!r.contains("200 OK"), "{r}");
    // Half a head, then nothing.
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost").await.unwrap();
    assert!(read_all(&mut slow, Duration::from_secs(5)).await.is_some(), "closed by the server");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // With its one slot free again, the server answers.
    assert_eq!(status(&exchange(addr, GET).await), "HTTP/1.1 200 OK");

    // The whole exchange is bounded as well, whatever the head's timeout.
    let limits = Limits {
        connections: 1,
        header_timeout: Duration::from_secs(30),
        connection_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (addr, _mailbox) = published(limits).await;
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
    assert!(read_all(&mut slow, Duration::from_secs(5)).await.is_some(), "closed by the server");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "{waited:?}");
}

#[tokio::test]
async fn connections_past_the_limit_wait_until_a_slot_is_free() {
    let limits = Limits { connections: 2, header_timeout: Duration::from_secs(30), ..Limits::default() };
    let (addr, _mailbox) = published(limits).await;
    let idle1 = TcpStream::connect(addr).await.unwrap();
    let _idle2 = TcpStream::connect(addr).await.unwrap();
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(GET.as_bytes()).await.unwrap();
    let mut first = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut first)).await;
    assert!(early.is_err(), "answered past the limit of 2 connections");
    // One idle client leaves: its slot serves the third.
    drop(idle1);
    let r = read_all(&mut third, Duration::from_secs(5)).await.expect("answered once a slot is free");
    assert_eq!(status(&r), "HTTP/1.1 200 OK", "{r}");
}

#[tokio::test]
async fn a_scrape_waits_for_the_first_snapshot_and_then_gives_up_with_503() {
    let limits = Limits { snapshot_wait: Duration::from_millis(300), ..Limits::default() };
    let (addr, mailbox) = server(limits).await;
    // Nothing published yet (the daemon is adopting): 503 after the wait.
    let started = Instant::now();
    let r = exchange(addr, GET).await;
    assert_eq!(status(&r), "HTTP/1.1 503 Service Unavailable", "{r}");
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    // Published during the wait: answered with it.
    let scrape = tokio::spawn(exchange(addr, GET));
    tokio::time::sleep(Duration::from_millis(100)).await;
    mailbox.publish(Snapshot { valid: vec!["late".into()], ..Snapshot::default() });
    let r = scrape.await.unwrap();
    assert!(status(&r).ends_with("200 OK") && r.contains("app=\"late\""), "{r}");

    // The supervisor gone (the daemon stopping) before its first snapshot: 503 at once.
    let (addr, mailbox) = server(Limits::default()).await;
    drop(mailbox);
    let started = Instant::now();
    let r = exchange(addr, GET).await;
    assert_eq!(status(&r), "HTTP/1.1 503 Service Unavailable", "{r}");
    assert!(r.contains("stopping") && started.elapsed() < Duration::from_secs(2), "{r}");
}
