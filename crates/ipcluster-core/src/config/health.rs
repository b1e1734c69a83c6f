//! HTTP health checks (`health_path`, `health_interval`, `health_timeout`, `health_failures`)
//! and `ready = "http"`: what an app file may say about them, checked.
//!
//! A check is a plain HTTP/1.1 `GET <health_path>` to one worker (its own port in NAT mode, its
//! band's socket through the steering program's probe path in socket mode); a 2xx status line
//! within `health_timeout` passes, anything else fails. How the daemon runs them is
//! `ipclusterd`'s business; this module only validates the settings.

use std::{net::SocketAddr, time::Duration};

use toml::Spanned;

use super::{AppConfig, ConfigError, Ctx, Ready, Routing, defaults};
use crate::units::parse_duration;

/// Longest `health_path`, in bytes.
pub const MAX_PATH: usize = 256;
/// Most `health_failures`.
pub const MAX_FAILURES: u32 = 100;
/// Shortest `health_interval`.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The health check of an app's workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The path of the request (`/healthz`): `/` then visible ASCII, no space.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that make a live worker unhealthy.
    pub failures: u32,
}

/// A `health_path` as it may be put in a request line: starts with `/`, visible ASCII only (no
/// space, no control character: nothing that could end the line or add a header), at most
/// [`MAX_PATH`] bytes.
pub fn check_path(path: &str) -> Result<String, String> {
    if !path.starts_with('/') {
        return Err(format!("{}: must start with /", crate::units::shown(path)));
    }
    if path.len() > MAX_PATH {
        return Err(format!("must be at most {MAX_PATH} bytes"));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!("{}: only visible ASCII characters, no {:?}", crate::units::shown(path), c));
    }
    Ok(path.to_owned())
}

/// The four keys as the file has them.
pub(super) struct RawHealth<'a> {
    pub path: &'a Option<Spanned<String>>,
    pub interval: &'a Option<Spanned<String>>,
    pub timeout: &'a Option<Spanned<String>>,
    pub failures: &'a Option<Spanned<i64>>,
}

/// Sets `c.health` from the file's keys, and checks `ready = "http"` against them.
pub(super) fn parse(
    cx: &Ctx<'_>,
    raw: RawHealth<'_>,
    ready: Option<&Spanned<String>>,
    c: &mut AppConfig,
) -> Result<(), ConfigError> {
    let Some(path) = raw.path else {
        let other = [
            ("health_interval", raw.interval.as_ref().map(Spanned::span)),
            ("health_timeout", raw.timeout.as_ref().map(Spanned::span)),
            ("health_failures", raw.failures.as_ref().map(Spanned::span)),
        ];
        if let Some((key, span)) = other.into_iter().find(|(_, s)| s.is_some()) {
            return Err(cx.err(key, span, "needs health_path (the path the checks request)"));
        }
        if c.ready == Ready::Http {
            return Err(cx.err(
                "ready",
                ready.map(Spanned::span),
                "\"http\" needs health_path (the path the checks request)",
            ));
        }
        return Ok(());
    };
    let checked = check_path(path.get_ref()).map_err(|m| cx.err("health_path", Some(path.span()), m))?;
    let duration = |v: &Option<Spanned<String>>, key: &str, default: Duration| {
        let Some(v) = v else { return Ok(default) };
        let d = parse_duration(v.get_ref()).map_err(|m| cx.err(key, Some(v.span()), m))?;
        if d < MIN_INTERVAL {
            return Err(cx.err(key, Some(v.span()), format!("must be at least {MIN_INTERVAL:?}")));
        }
        Ok(d)
    };
    let interval = duration(raw.interval, "health_interval", defaults::HEALTH_INTERVAL)?;
    // Left out, the timeout is the default or the interval, whichever is shorter.
    let timeout = duration(raw.timeout, "health_timeout", defaults::HEALTH_TIMEOUT.min(interval))?;
    if timeout > interval {
        let span = raw.timeout.as_ref().or(raw.interval.as_ref()).map(Spanned::span);
        let key = if raw.timeout.is_some() { "health_timeout" } else { "health_interval" };
        return Err(cx.err(
            key,
            span,
            format!("health_timeout ({timeout:?}) must not be longer than health_interval ({interval:?})"),
        ));
    }
    let failures = match raw.failures {
        None => defaults::HEALTH_FAILURES,
        Some(n) if (1..=i64::from(MAX_FAILURES)).contains(n.get_ref()) => *n.get_ref() as u32,
        Some(n) => {
            return Err(cx.err(
                "health_failures",
                Some(n.span()),
                format!("{}: must be 1..={MAX_FAILURES}", n.get_ref()),
            ));
        }
    };
    if c.routing == Routing::Socket && !reaches_ipv4(c.listen[0]) {
        return Err(cx.err(
            "health_path",
            Some(path.span()),
            "in socket mode a check goes through the public socket from a reserved IPv4 loopback address: the first listen entry must take IPv4 (an IPv4 address, or [::])",
        ));
    }
    c.health = Some(HealthCheck { path: checked, interval, timeout, failures });
    Ok(())
}

/// Whether a socket bound to `addr` takes IPv4 connections (IPv4, or the dual-stack `[::]`).
fn reaches_ipv4(addr: SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().is_unspecified(),
    }
}

/// Property tests of `health_path`: what [`check_path`] accepts is the path as given, within
/// its bounds, and can never end the request line of a check or add a header to it; what it
/// refuses gets a brief, printable reason.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        checks::request,
        prop_config::{config, mutated},
    };

    fn path() -> impl Strategy<Value = String> {
        prop_oneof!["/[!-~]{0,40}", "/[!-~]{250,260}", Just("/healthz".to_owned())]
    }

    proptest! {
        #![proptest_config(config(1024))]

        #[test]
        fn an_accepted_path_cannot_end_the_request_line(p in prop_oneof![path(), mutated(path()), any::<String>()]) {
            match check_path(&p) {
                Ok(checked) => {
                    prop_assert_eq!(&checked, &p);
                    prop_assert!(p.starts_with('/') && p.len() <= MAX_PATH);
                    prop_assert!(p.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{p:?}");
                    // The request is exactly its fixed lines, the first with the path as its
                    // second word.
                    let r = request(&p);
                    let lines: Vec<&str> = r.split("\r\n").collect();
                    prop_assert_eq!(lines.len(), 7, "{:?}", r);
                    prop_assert_eq!(lines[0].split(' ').collect::<Vec<_>>(), vec!["GET", p.as_str(), "HTTP/1.1"]);
                    prop_assert!(!r.contains('\0') && r.matches('\n').count() == 6);
                    prop_assert_eq!(check_path(&checked), Ok(checked.clone()));
                }
                Err(e) => {
                    prop_assert!(e.chars().count() < 300, "{e}");
                    prop_assert!(!e.chars().any(char::is_control), "{e:?}");
                }
            }
        }
    }
}
