//! `GET /metrics` for Prometheus: the supervisor's latest [`Snapshot`] rendered in the
//! Prometheus text format or OpenMetrics ([`render`]) and served over HTTP ([`http`]) on
//! `metrics_listen` (`ipclusterd.toml`).
//!
//! Owns nothing but the listener: every scrape reads the snapshot the supervisor published after
//! its last turn ([`Handle::snapshot`]) and never sends it a command, so a scraper, however
//! fast or slow, costs the supervisor nothing. Rendering runs on the blocking pool, off the
//! daemon's one runtime thread.
//!
//! [`Snapshot`]: crate::supervisor::Snapshot
//! [`Handle::snapshot`]: crate::supervisor::Handle::snapshot

pub mod http;
pub mod render;

pub use http::{Limits, serve};
pub use render::{Format, render};
