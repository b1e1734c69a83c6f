//! The soak's outputs: a summary for people, the same as JSON, and an SVG chart of requests
//! per second, latency and the daemon's RSS over time with the faults marked.

use std::{collections::BTreeMap, fmt::Write};

use anyhow::Result;
use plotters::prelude::*;
use serde::Serialize;

use super::{
    account::{Cause, FaultEvent, Load},
    faults::Fault,
    monitor::{Second, Totals},
    record::Violation,
    schedule::Planned,
};

/// A line of a chart: its name, colour and points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// How one kind of fault went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Kind {
    pub about: &'static str,
    pub planned: u32,
    pub injected: u32,
    /// Injected, and the daemon did not do what it promises (counted as a violation too).
    pub not_ok: u32,
}

/// Failures of one cause.
#[derive(Debug, Clone, Serialize)]
pub struct CauseCount {
    pub count: u64,
    /// Of which, by load: open loop, keep-alive, sessions.
    pub by_load: BTreeMap<Load, u64>,
    pub about: &'static str,
}

/// A statistic with its target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measure {
    pub value: Option<f64>,
    pub unit: &'static str,
    pub target: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub minutes: f64,
    pub open_rate: u32,
    pub keepalive_connections: usize,
    pub session_clients: usize,
    pub passed: bool,
    pub kinds: BTreeMap<&'static str, Kind>,
    pub skipped: Vec<Planned>,
    pub totals: Totals,
    pub failures_by_cause: BTreeMap<Cause, CauseCount>,
    pub violations: Vec<Violation>,
    /// Named measures: latency, ListWorkers, RSS and descriptor slopes, restarts.
    pub measures: BTreeMap<&'static str, Measure>,
    pub faults: Vec<FaultEvent>,
    pub seconds: BTreeMap<u64, Second>,
}

impl Report {
    /// Counts per kind from the plan and the timeline.
    pub fn kinds(plan: &[Planned], faults: &[FaultEvent]) -> BTreeMap<&'static str, Kind> {
        let mut kinds: BTreeMap<&'static str, Kind> =
            Fault::ALL.iter().map(|f| (f.name(), Kind { about: f.about(), ..Kind::default() })).collect();
        for p in plan {
            kinds.entry(p.fault.name()).or_default().planned += 1;
        }
        for e in faults {
            let k = kinds.entry(e.fault.name()).or_default();
            k.injected += 1;
            k.not_ok += u32::from(!e.hit.ok);
        }
        kinds
    }

    /// The summary for people.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let _ = writeln!(
            s,
            "soak {verdict}: seed {}, {:.1} minutes (replay: cargo xtask soak --minutes {} --seed {})",
            self.seed,
            self.minutes,
            self.minutes.round(),
            self.seed
        );
        let _ = writeln!(
            s,
            "load: {} requests/s open loop over new connections from 64 sources, {} keep-alive connections, {} Socket.IO sessions",
            self.open_rate, self.keepalive_connections, self.session_clients
        );
        let _ = writeln!(s, "\nfaults injected (planned / injected / not as promised):");
        for (name, k) in &self.kinds {
            let _ = writeln!(s, "  {name:<18} {:>4} {:>4} {:>4}", k.planned, k.injected, k.not_ok);
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "  ({} planned faults did not start before the end)", self.skipped.len());
        }
        let t = &self.totals;
        let _ = writeln!(s, "\nrequests:");
        let _ = writeln!(
            s,
            "  open loop    {:>9} ok {:>6} failed ({} answers checked against their band's live worker)",
            t.open_ok, t.open_failed, t.routed_checked
        );
        let _ = writeln!(s, "  keep-alive   {:>9} ok {:>6} failed", t.keepalive_ok, t.keepalive_failed);
        let _ = writeln!(
            s,
            "  sessions     {:>9} started, {} ended as planned, {} lost; {} ticks acknowledged",
            t.sessions_started, t.sessions_ended, t.sessions_lost, t.session_ticks
        );
        let _ = writeln!(s, "\nfailures by cause:");
        if self.failures_by_cause.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for c in self.failures_by_cause.values() {
            let loads: Vec<String> = c.by_load.iter().map(|(l, n)| format!("{} {n}", l.name())).collect();
            let _ = writeln!(s, "  {:>6}  {} ({})", c.count, c.about, loads.join(", "));
        }
        let _ = writeln!(s, "\nmeasures:");
        for (name, m) in &self.measures {
            let value = m.value.map_or("n/a".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(s, "  {name:<28} {value:>10} {:<10} target {}", m.unit, m.target);
        }
        let _ = writeln!(s, "\ninvariant violations: {}", self.violations.len());
        for v in &self.violations {
            let _ = writeln!(
                s,
                "  at {:.1} s, {}: {}: {} (seen {} times)",
                v.t, v.invariant, v.key, v.detail, v.count
            );
            for f in &v.last_faults {
                let _ = writeln!(s, "      after {f}");
            }
            for l in &v.later {
                let _ = writeln!(s, "    again {l}");
            }
        }
        s
    }

    /// The chart: requests/s, latency and the daemon's RSS over time, one panel each, faults
    /// as vertical lines coloured by kind.
    pub fn chart(&self) -> Result<String> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (1200, 900)).into_drawing_area();
            root.fill(&WHITE)?;
            let end = self.seconds.keys().last().copied().unwrap_or(1).max(1) as f64;
            let areas = root.split_evenly((3, 1));
            let series = |f: &dyn Fn(&Second) -> Option<f64>| -> Vec<(f64, f64)> {
                self.seconds.iter().filter_map(|(t, s)| Some((*t as f64, f(s)?))).collect()
            };
            let panels: [(&str, Vec<Line>); 3] = [
                (
                    "requests per second",
                    vec![
                        ("open loop ok", BLUE, series(&|s| Some(f64::from(s.ok)))),
                        ("keep-alive ok", GREEN, series(&|s| Some(f64::from(s.keepalive_ok)))),
                        ("session ticks", MAGENTA, series(&|s| Some(s.ticks as f64))),
                        (
                            "failed",
                            RED,
                            series(&|s| Some(f64::from(s.failed + s.keepalive_failed + s.sessions_lost))),
                        ),
                    ],
                ),
                (
                    "open-loop latency (ms)",
                    vec![
                        ("p50", BLUE, series(&|s| (s.ok > 0).then_some(s.p50_ms))),
                        ("p99", RED, series(&|s| (s.ok > 0).then_some(s.p99_ms))),
                    ],
                ),
                ("daemon RSS (MiB)", vec![("RSS", BLACK, series(&|s| s.rss_mib))]),
            ];
            for (area, (title, lines)) in areas.iter().zip(panels) {
                let top = lines.iter().flat_map(|l| l.2.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.1;
                let mut chart = ChartBuilder::on(area)
                    .caption(
                        format!("{title}, by second of the run (seed {})", self.seed),
                        ("sans-serif", 15),
                    )
                    .margin(8)
                    .x_label_area_size(38)
                    .y_label_area_size(55)
                    // Room on the right for the legend.
                    .build_cartesian_2d(0f64..end * 1.15, 0f64..top)?;
                chart.configure_mesh().disable_x_mesh().x_desc("seconds since the load started").draw()?;
                for (i, f) in Fault::ALL.iter().enumerate() {
                    let color = Palette99::pick(i).to_rgba();
                    let at: Vec<f64> =
                        self.faults.iter().filter(|e| e.fault == *f).map(|e| e.start).collect();
                    let drawn =
                        chart
                            .draw_series(at.iter().map(|x| {
                                PathElement::new(vec![(*x, 0.0), (*x, top)], color.stroke_width(1))
                            }))?;
                    if !at.is_empty() && title.starts_with("requests") {
                        drawn.label(f.name()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 12, y)], color.stroke_width(3))
                        });
                    }
                }
                for (name, color, points) in lines {
                    chart.draw_series(LineSeries::new(points, color.stroke_width(1)))?.label(name).legend(
                        move |(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], color.stroke_width(2)),
                    );
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 10))
                    .draw()?;
            }
            root.present()?;
        }
        Ok(svg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soak::account::Hit;

    fn report() -> Report {
        let faults = vec![
            FaultEvent {
                fault: Fault::Deploy,
                start: 3.0,
                end: Some(4.0),
                hit: Hit::ok("generation 2 is live"),
            },
            FaultEvent {
                fault: Fault::NatFlush,
                start: 6.0,
                end: Some(7.5),
                hit: Hit::failed("not repaired"),
            },
        ];
        let plan = vec![
            Planned { at: 3.0, fault: Fault::Deploy, pick: 1 },
            Planned { at: 6.0, fault: Fault::NatFlush, pick: 2 },
            Planned { at: 9.0, fault: Fault::Rollback, pick: 3 },
        ];
        let seconds = (0..10u64)
            .map(|t| {
                (t, Second { ok: 100, p50_ms: 1.0, p99_ms: 4.0, rss_mib: Some(9.5), ..Second::default() })
            })
            .collect();
        Report {
            seed: 7,
            minutes: 0.2,
            open_rate: 100,
            keepalive_connections: 16,
            session_clients: 16,
            passed: false,
            kinds: Report::kinds(&plan, &faults),
            skipped: plan[2..].to_vec(),
            totals: Totals { open_ok: 1000, open_failed: 3, ..Totals::default() },
            failures_by_cause: [(
                Cause::NatFlush,
                CauseCount {
                    count: 3,
                    by_load: [(Load::Open, 2), (Load::Session, 1)].into(),
                    about: Cause::NatFlush.about(),
                },
            )]
            .into(),
            violations: vec![Violation {
                t: 7.0,
                invariant: "bound".into(),
                key: "nat-flush at 6.0 s".into(),
                detail: "repaired after 9 s".into(),
                count: 1,
                last_faults: vec![faults[1].line()],
                later: vec![],
            }],
            measures: [(
                "ListWorkers p99",
                Measure { value: Some(3.2), unit: "ms", target: "< 50 ms".into() },
            )]
            .into(),
            faults,
            seconds,
        }
    }

    #[test]
    fn the_summary_counts_faults_by_kind_failures_by_cause_and_shows_each_violation_with_the_faults_before() {
        let r = report();
        let s = r.summary();
        assert!(s.starts_with("soak FAILED: seed 7"), "{s}");
        assert!(s.contains("cargo xtask soak --minutes 0 --seed 7"), "{s}");
        assert!(s.contains("  deploy                1    1    0\n"), "{s}");
        assert!(s.contains("  nat-flush             1    1    1\n"), "{s}");
        assert!(s.contains("  rollback              1    0    0\n"), "{s}");
        assert!(s.contains("(1 planned faults did not start before the end)"), "{s}");
        assert!(s.contains("       3  new NAT connections between iptables -t nat -F and the repair (<= 5 s) (open loop 2, sessions 1)\n"), "{s}");
        assert!(s.contains("at 7.0 s, bound: nat-flush at 6.0 s: repaired after 9 s (seen 1 times)\n      after     6.0 s  nat-flush: not repaired"), "{s}");
        assert_eq!(r.kinds.len(), Fault::ALL.len(), "every kind, injected or not");
    }

    #[test]
    fn the_json_names_faults_and_causes_by_their_names() {
        let json = serde_json::to_value(report()).unwrap();
        assert_eq!(json["faults"][1]["fault"], "nat-flush");
        assert_eq!(json["faults"][1]["ok"], false);
        assert_eq!(json["failures_by_cause"]["nat-flush"]["count"], 3);
        assert_eq!(json["failures_by_cause"]["nat-flush"]["by_load"]["session"], 1);
        assert_eq!(json["seconds"]["3"]["ok"], 100);
        assert_eq!(json["skipped"][0]["fault"], "rollback");
    }

    #[test]
    fn the_chart_has_three_panels_and_marks_the_faults() {
        let svg = report().chart().unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for text in [
            "requests per second",
            "open-loop latency (ms)",
            "daemon RSS (MiB)",
            "deploy",
            "nat-flush",
            "p99",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
    }
}
