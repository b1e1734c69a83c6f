//! Logging: to the journal (with structured fields) when started by systemd, to stderr otherwise.

use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Installs the global subscriber. `RUST_LOG` overrides the default level (`info`).
///
/// systemd sets `JOURNAL_STREAM` when stderr is connected to the journal; then the native journal
/// protocol is used so fields (`app`, `generation`, `band`, `pid`) stay searchable
/// (`journalctl -u ipclusterd APP=chat`). See systemd.exec(5), "JOURNAL_STREAM".
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        registry.with(journald.with_syslog_identifier("ipclusterd".into())).init();
        return;
    }
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).init();
}
