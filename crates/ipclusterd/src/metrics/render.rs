//! The [`Snapshot`] as metric families, encoded by `prometheus-client` in the Prometheus text
//! format (0.0.4) or OpenMetrics 1.0, whichever the scraper's `Accept` header prefers
//! ([`Format::negotiate`]).
//!
//! Every scrape renders the snapshot afresh (a collector over it, in a registry of its own), so
//! the output is exactly what the supervisor published: nothing here accumulates, and a series
//! ends when its subject leaves the snapshot.
//!
//! Label choices:
//! - A worker is `{app, generation, band, state}`, never its pid: a pid changes on every
//!   respawn and would make a new series each time. Two workers can share those labels (a
//!   worker replaced for memory leaves a retired twin in its band), so their values are summed:
//!   one series per label set, as the format requires. A worker replaced in its band is a
//!   counter reset of `ipcluster_worker_cpu_seconds_total`, which `rate()` handles.
//! - An app's counters are shown while the app exists: it has a valid file, or something of it
//!   runs (a generation starting, live or retired, or a worker). An app whose file was removed
//!   and whose last generation stopped disappears from the output, so its series go stale
//!   instead of being exported until the daemon restarts. The supervisor keeps counting, so an
//!   app that comes back continues from its old values: no false reset.
//! - Per present app, `deploys_total`, `policy_actions_total` and the cutover histogram start at
//!   zero, and `restarts_total` at zero for every band with a worker: a counter that first
//!   appears at 1 would hide that increment from `increase()`.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::{Registry, Unit},
};

use crate::supervisor::{CUTOVER_BUCKETS, Histogram, PolicyAction, Snapshot};

/// The exposition formats served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4: the default.
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

/// Every action the policies count, each shown (at zero if need be) for every present app.
const POLICY_ACTIONS: [PolicyAction; 6] = [
    PolicyAction::MemoryReplacement,
    PolicyAction::WatermarkStop,
    PolicyAction::WatermarkKill,
    PolicyAction::Watchdog,
    PolicyAction::Health,
    PolicyAction::HeldBack,
];

impl Format {
    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The format an `Accept` header prefers: OpenMetrics when it is acceptable (q > 0) and
    /// weighted at least as high as the text format; the text format otherwise, including without
    /// a header or with one that names neither (a human's browser or curl gets text).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text { Format::OpenMetrics } else { Format::Prometheus }
    }
}

/// The snapshot in `format`. Fails only if the encoder does (writing to a `String` cannot).
pub fn render(snapshot: &Arc<Snapshot>, format: Format) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition(snapshot.clone())));
    let mut out = String::new();
    match format {
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?,
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
    }
    Ok(out)
}

/// The collector that turns one snapshot into the metric families.
#[derive(Debug)]
struct Exposition(Arc<Snapshot>);

/// Label pairs, keys fixed, values borrowed or formatted.
type Labels<'a, const N: usize> = [(&'static str, Cow<'a, str>); N];

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &*self.0;
        let present = present_apps(s);

        let mut m = encoder.encode_descriptor(
            "ipcluster_build",
            "The running ipclusterd's version; always 1.",
            None,
            MetricType::Info,
        )?;
        m.encode_info(&[("version", ipcluster_core::VERSION)])?;

        let mut m = encoder.encode_descriptor(
            "ipcluster_generation",
            "A generation of an app and its state (starting, canary, live, draining, retired, failed, stopped); always 1. \
             Finished generations stay listed for a while, as in ListGenerations.",
            None,
            MetricType::Info,
        )?;
        for g in &s.generations {
            m.encode_info(&[
                ("app", Cow::Borrowed(g.app.as_str())),
                ("generation", g.generation.to_string().into()),
                ("state", g.state.as_str().into()),
            ])?;
        }

        let mut m = encoder.encode_descriptor(
            "ipcluster_generation_sessions",
            "Session records of a generation with session_affinity: clients whose next connection \
             goes to it (a draining generation stops once this and its connections reach 0).",
            None,
            MetricType::Gauge,
        )?;
        for x in &s.sessions {
            let labels: Labels<2> =
                [("app", Cow::Borrowed(x.app.as_str())), ("generation", x.generation.to_string().into())];
            m.encode_family(&labels)?.encode_gauge(&i64::from(x.records))?;
        }

        // One series per label set: workers that share one are summed (see the module's doc).
        let mut workers: BTreeMap<(&str, u64, u32, &str), (u64, u64)> = BTreeMap::new();
        for (w, u) in s.workers() {
            let sums = workers.entry((&w.app, w.generation, w.band, w.state.as_str())).or_default();
            sums.0 = sums.0.saturating_add(u.rss);
            sums.1 = sums.1.saturating_add(u.cpu_usec);
        }
        let mut m = encoder.encode_descriptor(
            "ipcluster_worker_resident_memory",
            "Resident memory of a worker's whole process tree, as last sampled.",
            Some(&Unit::Bytes),
            MetricType::Gauge,
        )?;
        for ((app, g, band, state), (rss, _)) in &workers {
            m.encode_family(&worker_label_set(app, *g, *band, state))?.encode_gauge(rss)?;
        }
        let mut m = encoder.encode_descriptor(
            "ipcluster_worker_cpu",
            "CPU time (user and system) of a worker's whole process tree, as last sampled.",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for ((app, g, band, state), (_, cpu_usec)) in &workers {
            let seconds = *cpu_usec as f64 / 1e6;
            m.encode_family(&worker_label_set(app, *g, *band, state))?
                .encode_counter::<NoLabelSet, _, u64>(&seconds, None)?;
        }

        let mut restarts: BTreeMap<(&str, u32), u64> =
            s.rows.iter().map(|w| ((w.app.as_str(), w.band), 0)).collect();
        for ((app, band), n) in &s.metrics.restarts {
            if present.contains(app.as_str()) {
                restarts.insert((app, *band), *n);
            }
        }
        let mut m = encoder.encode_descriptor(
            "ipcluster_worker_restarts",
            "Workers respawned after a crash, per band, since the daemon started.",
            None,
            MetricType::Counter,
        )?;
        for ((app, band), n) in &restarts {
            let labels: Labels<2> = [("app", Cow::Borrowed(*app)), ("band", band.to_string().into())];
            m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }

        let mut m = encoder.encode_descriptor(
            "ipcluster_deploys",
            "Deploys since the daemon started, by result: ok (the generation went live), failed, \
             promoted (a canary went live) or rolled_back (a canary was rolled back).",
            None,
            MetricType::Counter,
        )?;
        for app in &present {
            let deploys = s.metrics.deploys.get(*app).copied().unwrap_or_default();
            for (result, n) in deploys.by_result() {
                let labels: Labels<2> = [("app", Cow::Borrowed(*app)), ("result", result.into())];
                m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }

        let mut m = encoder.encode_descriptor(
            "ipcluster_cutover_duration",
            "How long a deploy's cutover took: the one routing transaction that points every band at the new generation.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        let empty = Histogram::default();
        for app in &present {
            let h = s.metrics.cutover.get(*app).unwrap_or(&empty);
            let labels: Labels<1> = [("app", Cow::Borrowed(*app))];
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets(h), None)?;
        }

        let mut m = encoder.encode_descriptor(
            "ipcluster_steering_restored",
            "Socket mode: steering programs found detached or replaced through a socket of their \
             group, and attached again, since the daemon started.",
            None,
            MetricType::Counter,
        )?;
        for app in &present {
            let n = s.metrics.steering_restored.get(*app).copied().unwrap_or_default();
            let labels: Labels<1> = [("app", Cow::Borrowed(*app))];
            m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&n, None)?;
        }

        let mut actions: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for app in &present {
            for action in POLICY_ACTIONS {
                actions.insert((app, action.as_str()), 0);
            }
        }
        for ((app, action), n) in &s.metrics.policy_actions {
            if present.contains(app.as_str()) {
                actions.insert((app, action.as_str()), *n);
            }
        }
        let mut m = encoder.encode_descriptor(
            "ipcluster_policy_actions",
            "What the memory and health policies did since the daemon started: memory_replacement, \
             watermark_stop, watermark_kill, watchdog, health (a live worker failing its health \
             checks replaced), held_back (an action held back by retire_rate, \
             or live workers alone over cluster_memory_max).",
            None,
            MetricType::Counter,
        )?;
        for ((app, action), n) in &actions {
            let labels: Labels<2> = [("app", Cow::Borrowed(*app)), ("action", Cow::Borrowed(*action))];
            m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(n, None)?;
        }
        Ok(())
    }
}

fn worker_label_set<'a>(app: &'a str, generation: u64, band: u32, state: &'a str) -> Labels<'a, 4> {
    [
        ("app", Cow::Borrowed(app)),
        ("generation", generation.to_string().into()),
        ("band", band.to_string().into()),
        ("state", Cow::Borrowed(state)),
    ]
}

/// The apps whose series are shown: a valid file, or something running (see the module's doc).
fn present_apps(s: &Snapshot) -> BTreeSet<&str> {
    let mut apps: BTreeSet<&str> = s.valid.iter().map(String::as_str).collect();
    apps.extend(s.rows.iter().map(|w| w.app.as_str()));
    apps.extend(s.generations.iter().filter(|g| g.state.is_running()).map(|g| g.app.as_str()));
    apps
}

/// A cumulative histogram as `prometheus-client` takes it: each bucket's own count (it sums them
/// again), with the `+Inf` bucket, which OpenMetrics requires and which holds the observations
/// above the last bound.
fn buckets(h: &Histogram) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(CUTOVER_BUCKETS.len() + 1);
    let mut below = 0;
    for (i, bound) in CUTOVER_BUCKETS.iter().enumerate() {
        let cumulative = h.cumulative.get(i).copied().unwrap_or(below).max(below);
        out.push((*bound, cumulative - below));
        below = cumulative;
    }
    out.push((f64::INFINITY, h.count.saturating_sub(below)));
    out
}

#[cfg(test)]
mod tests;
