//! The HTTP side of `/metrics` (hyper, HTTP/1.1 only), small and bounded: it answers
//! `GET /metrics` (and `HEAD`), 405 to another method on that path, 404 to any other path.
//!
//! Bounds ([`Limits`]), so that no client can make the daemon hold more than a few buffers:
//! - at most 16 connections at once; more wait in the kernel's backlog;
//! - one request per connection (no keep-alive), a request's head within 5 s and at most
//!   8 KiB, the whole exchange within 10 s (a client that stops reading its response is
//!   dropped);
//! - a request body is never read;
//! - a scrape waits at most 5 s for the supervisor's first snapshot (a daemon still adopting
//!   what runs answers 503 after that).

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::{debug, warn};

use super::render::{Format, render};
use crate::supervisor::Handle;

/// How much a client may take; [`Limits::default`] is what the daemon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// Time for a client to send its request's head.
    pub header_timeout: Duration,
    /// Time for a whole exchange, the response's transfer included.
    pub connection_timeout: Duration,
    /// Longest wait for the supervisor's first snapshot.
    pub snapshot_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 16,
            header_timeout: Duration::from_secs(5),
            // Prometheus' default scrape_timeout is 10 s too.
            connection_timeout: Duration::from_secs(10),
            snapshot_wait: Duration::from_secs(5),
        }
    }
}

/// Largest request head read: hyper's smallest buffer (a scrape's head is a few hundred bytes).
const MAX_HEAD: usize = 8192;

/// Serves `/metrics` on `listener` from `handle`'s snapshots, for as long as the runtime runs.
pub async fn serve(listener: TcpListener, handle: Handle, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false);
    loop {
        // A slot first: past the limit, connections wait in the backlog, not in our memory.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning.
                warn!("metrics: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (http, handle) = (http.clone(), handle.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| respond(req, handle.clone(), limits));
            let connection = http.serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(limits.connection_timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("metrics: connection ended: {e}"),
                Err(_) => debug!("metrics: connection dropped after {:?}", limits.connection_timeout),
            }
            drop(slot);
        });
    }
}

/// One request's answer.
async fn respond(
    req: Request<Incoming>,
    handle: Handle,
    limits: Limits,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(plain(StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET (or HEAD) /metrics\n");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let snapshot = match tokio::time::timeout(limits.snapshot_wait, handle.snapshot()).await {
        Ok(Ok(snapshot)) => snapshot,
        Ok(Err(_)) => return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "ipclusterd is stopping\n")),
        Err(_) => {
            return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "ipclusterd is still adopting what runs\n"));
        }
    };
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    // Rendering 1024 workers takes about a millisecond of CPU: on the blocking pool, not on the
    // thread the supervisor shares with every other task.
    let Ok(Ok(body)) = tokio::task::spawn_blocking(move || render(&snapshot, format)).await else {
        return Ok(plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot render the metrics\n"));
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(format.content_type()));
    Ok(response)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests;
