//! The report's charts, as SVG: the ratio distributions per cell, and latency around deploys,
//! kills and restarts.

use anyhow::Result;
use plotters::prelude::*;

use std::time::Duration;

use super::{
    datapath::Measured,
    deploys::{Deploys, Run},
};

pub(super) fn ratios(path: &std::path::Path, dp: &[Measured]) -> Result<()> {
    let row = 56u32;
    let root = SVGBackend::new(path, (1000, 90 + row * dp.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let pairs = |m: &Measured| {
        [
            (0.65, BLUE, super::stats::paired_ratios(&m.mode.keepalive, &m.control.keepalive), m.keepalive),
            (0.35, RED, super::stats::paired_ratios(&m.mode.newconn, &m.control.newconn), m.newconn),
        ]
    };
    let all: Vec<f64> = dp.iter().flat_map(|m| pairs(m).into_iter().flat_map(|p| p.2)).collect();
    let medians: Vec<f64> = dp.iter().flat_map(|m| [m.keepalive.median, m.newconn.median]).collect();
    let (lo, hi) = axis(&all, &medians);
    let n = dp.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Each round's ratio to its control (dots), median (bar): blue keep-alive, red new connection per request",
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(lo..hi, 0f64..n as f64)?;
    chart.configure_mesh().disable_y_mesh().y_labels(0).x_desc("mode / control").draw()?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, 0.0), (1.0, n as f64)],
        BLACK.stroke_width(1),
    )))?;
    for (i, m) in dp.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let name = format!(
            "{} vs. {}{}",
            m.mode.label,
            m.control.label,
            if m.cell.pinned { "" } else { " (unpinned)" }
        );
        let (_, py) = chart.backend_coord(&(lo, y + 0.5));
        root.draw(&Text::new(name, (10, py - 6), ("sans-serif", 12)))?;
        for (offset, color, rounds, s) in pairs(m) {
            let (inside, outside): (Vec<f64>, Vec<f64>) = rounds.iter().partition(|r| (lo..=hi).contains(*r));
            chart.draw_series(inside.iter().map(|r| Circle::new((*r, y + offset), 4, color.filled())))?;
            // A round beyond the axis: a hollow dot at its edge, with its value.
            for r in outside {
                let at = r.clamp(lo, hi);
                chart.draw_series(std::iter::once(Circle::new(
                    (at, y + offset),
                    4,
                    color.stroke_width(1),
                )))?;
                let (px, py) = chart.backend_coord(&(at, y + offset));
                let dx = if r < lo { 8 } else { -44 };
                root.draw(&Text::new(format!("{r:.2}"), (px + dx, py - 5), ("sans-serif", 10)))?;
            }
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(s.median, y + offset - 0.15), (s.median, y + offset + 0.15)],
                color.stroke_width(3),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

/// The ratio axis: every median, 0.9–1.1 at least, and the rounds within half the lowest
/// median and 1.5 × the highest (a round beyond, such as one of 0.00 or 25 in a broken cell, is
/// drawn at the edge with its value instead of squeezing every other row to a line).
fn axis(rounds: &[f64], medians: &[f64]) -> (f64, f64) {
    let finite = |v: &[f64]| v.iter().copied().filter(|x| x.is_finite()).collect::<Vec<f64>>();
    let (rounds, medians) = (finite(rounds), finite(medians));
    let m_lo = medians.iter().copied().fold(0.9, f64::min);
    let m_hi = medians.iter().copied().fold(1.1, f64::max);
    let (floor, ceiling) = (m_lo * 0.5, m_hi * 1.5);
    let lo = rounds.iter().copied().filter(|r| *r >= floor).fold(m_lo, f64::min);
    let hi = rounds.iter().copied().filter(|r| *r <= ceiling).fold(m_hi, f64::max);
    (lo - 0.02, hi + 0.02)
}

fn shade(kind: &str) -> RGBColor {
    match kind {
        "deploy" | "reload" => RGBColor(255, 220, 150),
        "kill -9" => RGBColor(255, 180, 180),
        _ => RGBColor(190, 220, 255),
    }
}

pub(super) fn cutover(path: &std::path::Path, dl: &Deploys) -> Result<()> {
    let runs: Vec<&Run> =
        [Some(&dl.ipclusterd), Some(&dl.socket), dl.pm2.as_ref()].into_iter().flatten().collect();
    let root = SVGBackend::new(path, (900, 240 * runs.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((runs.len(), 1));
    for (area, run) in areas.iter().zip(runs) {
        let end = run.records.last().map_or(1.0, |r| r.due.as_secs_f64()).max(1.0);
        let max = run
            .records
            .iter()
            .filter(|r| r.outcome.is_ok())
            .map(|r| r.latency.as_secs_f64() * 1000.0)
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}: latency of each request (ms) over time (s); deploys/reloads orange, kill -9 red, restarts blue",
                    run.name
                ),
                ("sans-serif", 14),
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..end, 0f64..max * 1.1)?;
        chart.configure_mesh().draw()?;
        chart.draw_series(run.events.iter().map(|(a, b, kind)| {
            Rectangle::new(
                [(a.as_secs_f64(), 0.0), (b.as_secs_f64().max(a.as_secs_f64() + 0.02), max * 1.1)],
                shade(kind).filled(),
            )
        }))?;
        // Every slow request (above the run's p99) and an even sample of the others: the chart
        // shows the tail without weighing megabytes.
        let mut sorted: Vec<Duration> =
            run.records.iter().filter(|r| r.outcome.is_ok()).map(|r| r.latency).collect();
        sorted.sort_unstable();
        let p99 = sorted.get(sorted.len() * 99 / 100).copied().unwrap_or_default();
        let stride = (sorted.len() / 3000).max(1);
        chart.draw_series(
            run.records
                .iter()
                .enumerate()
                .filter(|(i, r)| r.outcome.is_ok() && (i % stride == 0 || r.latency > p99))
                .map(|(_, r)| {
                    Circle::new((r.due.as_secs_f64(), r.latency.as_secs_f64() * 1000.0), 1, BLUE.filled())
                }),
        )?;
        chart.draw_series(
            run.records
                .iter()
                .filter(|r| r.outcome.is_err())
                .map(|r| Cross::new((r.due.as_secs_f64(), max), 4, RED.stroke_width(2))),
        )?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::bench::{
        datapath::{CELLS, Side},
        stats,
    };

    fn measured(cell: usize, ka: &[f64], nc: &[f64]) -> Measured {
        let c = CELLS[cell];
        let side = |label: &str, k: Vec<f64>, n: Vec<f64>| Side {
            label: label.into(),
            keepalive: k,
            newconn: n,
            ..Side::default()
        };
        let control = side("control", vec![100.0; ka.len()], vec![10.0; nc.len()]);
        let mode =
            side("mode", ka.iter().map(|r| r * 100.0).collect(), nc.iter().map(|r| r * 10.0).collect());
        Measured {
            cell: c,
            keepalive: stats::spread(&stats::paired_ratios(&mode.keepalive, &control.keepalive)),
            newconn: stats::spread(&stats::paired_ratios(&mode.newconn, &control.newconn)),
            control,
            mode,
            rounds: 16,
            program_ns: Some(stats::spread(&[120.0])),
            conntrack_drops: 0,
            turns: [std::time::Duration::from_millis(50); 2],
            load: (1.0, 1.0),
            seconds: 1.0,
        }
    }

    /// The ratio chart draws one row per cell, named, with a dot per round.
    #[test]
    fn the_ratio_chart_names_every_cell_and_draws_every_round() {
        let dp = [
            measured(0, &[0.97, 0.99, 1.01], &[0.95, 0.96, 0.97]),
            measured(2, &[1.0, 1.02, 0.98], &[0.9, 1.1, 1.0]),
        ];
        let dir = crate::root().join("target/bench-test");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("datapath.svg");
        ratios(&path, &dp).unwrap();
        let svg = fs::read_to_string(&path).unwrap();
        assert!(svg.contains("mode vs. control"), "each row is named");
        assert_eq!(svg.matches("<circle").count(), 12, "a dot per round and kind");
        assert_eq!(dp[0].newconn.median, 0.96);
    }

    /// A broken round (0.00, 25.02) does not stretch the axis; it is drawn at the edge with its
    /// value, and every round still has its dot.
    #[test]
    fn a_round_far_from_every_median_is_drawn_at_the_edge_not_in_the_axis() {
        let (lo, hi) = axis(&[0.0, 0.97, 1.03, 25.02], &[0.99, 1.01]);
        assert!((lo - 0.88).abs() < 1e-9 && (hi - 1.12).abs() < 1e-9, "{lo} {hi}");
        let (lo, hi) = axis(&[1.6, 1.8, 3.9, 4.8], &[1.7, 3.8]);
        assert!(lo <= 1.6 && hi >= 4.8, "rounds near the medians stay in: {lo} {hi}");
        let dp = [measured(0, &[0.97, 0.0, 1.01], &[0.95, 25.02, 0.97])];
        let dir = crate::root().join("target/bench-test");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("datapath-outliers.svg");
        ratios(&path, &dp).unwrap();
        let svg = fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("<circle").count(), 6, "a dot per round and kind");
        let texts: Vec<&str> =
            svg.split("<text").skip(1).map(|t| t.split("</text>").next().unwrap()).collect();
        for value in ["0.00", "25.02"] {
            assert!(texts.iter().any(|t| t.trim_end().ends_with(value)), "{value} is written: {texts:?}");
        }
    }
}
