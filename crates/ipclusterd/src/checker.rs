//! [`Checker`]: the HTTP health check of one worker (issue 24), and [`Http`], the real one.
//!
//! A check is one TCP connection: from `source` when it is set (socket mode's probe path: a
//! reserved loopback address the steering program sends to a named generation's band), a plain
//! HTTP/1.1 `GET` with `Connection: close`, and the status line of the answer
//! ([`ipcluster_core::checks::status`]), read up to a few hundred bytes. Everything — connect,
//! write, read — happens within `timeout`. No TLS, no redirects, no body. Checks run on the
//! daemon's runtime, never on the supervisor's turn: the answer comes back as an event.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipcluster_core::checks::{MAX_STATUS_LINE, Outcome, request, status};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
};

/// Where a check goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// The worker's own port (NAT mode), or the public address (socket mode).
    pub addr: SocketAddr,
    /// The source address to connect from (socket mode's probe path), or any.
    pub source: Option<IpAddr>,
}

/// Runs health checks. Cheap to clone; a check never blocks the caller.
pub trait Checker: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// One check of `path` at `target`, within `timeout`.
    fn check(
        &self,
        target: Target,
        path: String,
        timeout: Duration,
    ) -> impl Future<Output = Outcome> + Send + 'static;
}

/// The real checks, over TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct Http;

impl Checker for Http {
    #[allow(clippy::manual_async_fn, reason = "the future must not borrow self: it runs on its own task")]
    fn check(
        &self,
        target: Target,
        path: String,
        timeout: Duration,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        async move {
            match tokio::time::timeout(timeout, once(target, &path)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Failed(format!("no answer within {timeout:?}")),
            }
        }
    }
}

async fn once(target: Target, path: &str) -> Outcome {
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let socket = match socket {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("cannot make a socket: {e}")),
    };
    if let Some(ip) = target.source
        && let Err(e) = socket.bind(SocketAddr::new(ip, 0))
    {
        return Outcome::Failed(format!("cannot bind the probe address {ip}: {e}"));
    }
    let mut stream = match socket.connect(target.addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("cannot connect: {e}")),
    };
    if let Err(e) = stream.write_all(request(path).as_bytes()).await {
        return Outcome::Failed(format!("cannot send the request: {e}"));
    }
    let mut head = Vec::with_capacity(MAX_STATUS_LINE);
    let mut buf = [0u8; MAX_STATUS_LINE];
    while head.len() < MAX_STATUS_LINE && !head.contains(&b'\n') {
        match stream.read(&mut buf[..MAX_STATUS_LINE - head.len()]).await {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Outcome::Failed(format!("cannot read the answer: {e}")),
        }
    }
    match status(&head) {
        Some(code) => Outcome::Status(code),
        None if head.is_empty() => Outcome::Failed("closed without an answer".into()),
        None => Outcome::Failed("not an HTTP/1.x answer".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;

    /// A server that answers each connection with `answer` (after reading the request), or
    /// closes it at once, or never answers.
    async fn server(answer: Option<&'static [u8]>) -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { return };
                tokio::spawn(async move {
                    let mut req = vec![0u8; 1024];
                    let n = s.read(&mut req).await.unwrap_or(0);
                    assert!(req[..n].starts_with(b"GET /healthz HTTP/1.1\r\n"));
                    match answer {
                        Some(a) => {
                            let _ = s.write_all(a).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(60)).await,
                    }
                });
            }
        });
        addr
    }

    fn at(addr: SocketAddr) -> Target {
        Target { addr, source: None }
    }

    #[tokio::test]
    async fn a_check_reads_the_status_line_and_nothing_else() {
        let t = Duration::from_secs(2);
        let ok = server(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")).await;
        assert_eq!(Http.check(at(ok), "/healthz".into(), t).await, Outcome::Status(200));
        let bad = server(Some(b"HTTP/1.0 503 Service Unavailable\r\n\r\n")).await;
        assert_eq!(Http.check(at(bad), "/healthz".into(), t).await, Outcome::Status(503));
        // The status line in pieces, byte by byte, is still read.
        let junk = server(Some(b"SSH-2.0-OpenSSH\r\n")).await;
        assert_eq!(
            Http.check(at(junk), "/healthz".into(), t).await,
            Outcome::Failed("not an HTTP/1.x answer".into())
        );
        let closed = server(Some(b"")).await;
        assert_eq!(
            Http.check(at(closed), "/healthz".into(), t).await,
            Outcome::Failed("closed without an answer".into())
        );
    }

    #[tokio::test]
    async fn a_check_fails_on_refusal_and_on_time() {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let refused = l.local_addr().unwrap();
        drop(l);
        let out = Http.check(at(refused), "/healthz".into(), Duration::from_secs(2)).await;
        assert!(matches!(&out, Outcome::Failed(m) if m.starts_with("cannot connect")), "{out:?}");
        let silent = server(None).await;
        let started = std::time::Instant::now();
        let out = Http.check(at(silent), "/healthz".into(), Duration::from_millis(200)).await;
        assert_eq!(out, Outcome::Failed("no answer within 200ms".into()));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_check_goes_from_the_source_it_is_given() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (mut s, peer) = l.accept().await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            peer.ip()
        });
        let source: IpAddr = Ipv4Addr::new(127, 253, 1, 2).into();
        let out = Http
            .check(Target { addr, source: Some(source) }, "/healthz".into(), Duration::from_secs(2))
            .await;
        assert_eq!(out, Outcome::Status(204));
        assert_eq!(accept.await.unwrap(), source);
    }
}
