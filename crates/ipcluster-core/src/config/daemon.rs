//! The daemon's own file, `/etc/ipcluster/ipclusterd.toml` (optional): settings that are not
//! per app.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx, line_col};
use crate::units::{parse_duration, shown};

/// The daemon's own settings: `/etc/ipcluster/ipclusterd.toml` (optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// How often workers' RSS, CPU and connections are sampled (and memory and watchdog
    /// policies applied).
    pub sample_interval: Duration,
    /// Where `GET /metrics` is served (Prometheus); `None`: no listener.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self { sample_interval: Duration::from_secs(1), metrics_listen: None }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    sample_interval: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
}

/// Keys of the daemon's file (kept in step with the reference docs by a test).
pub const DAEMON_KEYS: [&str; 2] = ["sample_interval", "metrics_listen"];

impl DaemonConfig {
    /// Parses the daemon's file `file` with contents `text`.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let raw: RawDaemon = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            location: e.span().map(|s| line_col(text, s.start)),
            key: None,
            message: super::toml_message(e.message(), &DAEMON_KEYS),
        })?;
        let cx = Ctx { file, text };
        let mut c = DaemonConfig::default();
        if let Some(v) = &raw.sample_interval {
            let d = parse_duration(v.get_ref()).map_err(|m| cx.err("sample_interval", Some(v.span()), m))?;
            if d < Duration::from_millis(100) {
                return Err(cx.err("sample_interval", Some(v.span()), "must be at least 100ms"));
            }
            c.sample_interval = d;
        }
        if let Some(v) = &raw.metrics_listen {
            let a =
                check_metrics_listen(v.get_ref()).map_err(|m| cx.err("metrics_listen", Some(v.span()), m))?;
            c.metrics_listen = Some(a);
        }
        Ok(c)
    }
}

/// An address and a port to listen on: `"127.0.0.1:9464"`, `"[::1]:9464"`, `"0.0.0.0:9464"`.
/// Names are refused: resolving one would make the daemon's start depend on a resolver.
fn check_metrics_listen(s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s.parse().map_err(|_| {
        format!("{} is not \"address:port\" (e.g. \"127.0.0.1:9464\", \"[::1]:9464\")", shown(s))
    })?;
    if a.port() == 0 {
        return Err(format!("{}: port must be 1..=65535", shown(s)));
    }
    Ok(a)
}
