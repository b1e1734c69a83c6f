//! The benchmark report: docs/bench/REPORT.md with SVG charts, and the README's headline table.

use std::{fmt::Write as _, fs, time::Duration};

use anyhow::Result;
use plotters::prelude::*;

use super::{Plan, datapath::DataPath, deploys::Deploys, footprint::Footprint};

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:").and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {} GiB, Linux {kernel}", mem >> 20)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

pub fn write(plan: &Plan, dp: &DataPath, dl: &Deploys, fp: &Footprint, took: Duration) -> Result<()> {
    let dir =
        if plan.quick { crate::root().join("docs/bench/quick") } else { crate::root().join("docs/bench") };
    fs::create_dir_all(&dir)?;
    let ratio = |name: &str, keepalive: bool| -> f64 {
        let (Some(m), Some(base)) = (dp.get(name), dp.get(dp.get(name).map_or("direct", |m| m.baseline)))
        else {
            return 0.0;
        };
        let (a, b) = if keepalive {
            (m.keepalive.rate(), base.keepalive.rate())
        } else {
            (m.newconn.rate(), base.newconn.rate())
        };
        a / b.max(1e-9)
    };
    let rate = |name: &str, keepalive: bool| {
        dp.get(name).map_or(0.0, |m| if keepalive { m.keepalive.rate() } else { m.newconn.rate() })
    };

    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark report{}\n", if plan.quick { " (quick run)" } else { "" });
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench{}` in {:.0} s. Machine: {}.",
        if plan.quick { " --quick" } else { "" },
        took.as_secs_f64(),
        machine()
    );
    let _ = writeln!(
        md,
        "Every mode ran in a fresh sandbox (own network namespace) in this same run; compare ratios, not absolute numbers, across runs. The load generator (`ipcluster-load`) shares the 2 cores with the servers.\n"
    );

    let _ = writeln!(md, "## Targets\n\n| target | measured | |\n|---|---|---|");
    let t = |md: &mut String, what: &str, measured: String, ok: bool| {
        let _ = writeln!(md, "| {what} | {measured} | {} |", verdict(ok));
    };
    let (ka64, nc64) = (ratio("ipclusterd 64 bands", true), ratio("ipclusterd 64 bands", false));
    t(&mut md, "NAT keep-alive, 64 bands ≥ 0.95 × direct 64 workers", format!("{ka64:.2}"), ka64 >= 0.95);
    t(
        &mut md,
        "NAT new connections, 64 bands ≥ 0.80 × direct 64 workers",
        format!("{nc64:.2}"),
        nc64 >= 0.80,
    );
    // Socket mode, against direct access to as many processes of the same program.
    let mut socket_ok = Vec::new();
    for (prefix, program) in [("socket", "Rust demo"), ("node socket", "Node.js")] {
        for bands in [8, 64] {
            let name = format!("{prefix} {bands} bands");
            let (ka, nc) = (ratio(&name, true), ratio(&name, false));
            t(
                &mut md,
                &format!("socket mode keep-alive, {bands} bands ({program}) ≥ 0.98 × direct {bands} workers"),
                format!("{ka:.2}"),
                ka >= 0.98,
            );
            t(
                &mut md,
                &format!(
                    "socket mode new connections, {bands} bands ({program}) ≥ 0.95 × direct {bands} workers"
                ),
                format!("{nc:.2}"),
                nc >= 0.95,
            );
            socket_ok.push((name, ka, nc));
        }
    }
    let vs_haproxy = rate("ipclusterd 8 bands", false) / rate("haproxy 8 workers", false).max(1e-9);
    t(
        &mut md,
        "new connections ≥ 1.5 × HAProxy (8 workers each)",
        format!("{vs_haproxy:.2} ×"),
        vs_haproxy >= 1.5,
    );
    let vs_pm2 = rate("node ipclusterd 8 bands", false) / rate("node pm2 cluster 8", false).max(1e-9);
    t(
        &mut md,
        "new connections ≥ 1.5 × PM2 cluster (Node worker, 8 each)",
        format!("{vs_pm2:.2} ×"),
        vs_pm2 >= 1.5,
    );
    let s = dl.ipclusterd.summary();
    let failures = dl.ipclusterd.failures();
    let socket_failures = dl.socket.failures();
    for (mode, n) in [("NAT", failures), ("socket mode", socket_failures)] {
        t(
            &mut md,
            &format!(
                "{mode}: zero failures over {} deploys, {} worker kill -9 and {} restarts under load",
                plan.deploys, plan.kills, plan.restarts
            ),
            format!("{n}"),
            n == 0,
        );
    }
    let p999 = f64::from(s.cutover_p999_us) / f64::from(s.steady_p999_us.max(1));
    t(&mut md, "p99.9 latency at cutover ≤ 2 × steady", format!("{p999:.2} ×"), p999 <= 2.0);
    if let Some(big) = fp.idle.iter().max_by_key(|i| i.workers) {
        t(
            &mut md,
            &format!("daemon RSS < 20 MiB at {} workers", big.workers),
            format!("{:.1} MiB", big.rss_kib as f64 / 1024.0),
            big.rss_kib < 20 * 1024,
        );
        t(
            &mut md,
            &format!("daemon CPU < 2 % of a core at {} workers (idle, 1 s sampling)", big.workers),
            format!("{:.2} %", big.cpu_percent),
            big.cpu_percent < 2.0,
        );
        t(
            &mut md,
            &format!("ListWorkers < 10 ms at {} workers", big.workers),
            format!("{:.1} ms", big.list_ms.0),
            big.list_ms.0 < 10.0,
        );
    }
    if let Some(d) = fp.deploys.iter().find(|d| d.bands == 256 && d.routing == "nat") {
        t(&mut md, "cutover < 50 ms at 256 bands", format!("{:.0} ms", d.cutover_ms), d.cutover_ms < 50.0);
        t(&mut md, "rollback < 50 ms at 256 bands", format!("{:.0} ms", d.rollback_ms), d.rollback_ms < 50.0);
    }
    if let Some(d) = fp.deploys.iter().find(|d| d.bands == 256 && d.routing == "socket") {
        t(
            &mut md,
            "socket mode cutover (map update) < 1 ms at 256 bands",
            format!("{:.3} ms", d.cutover_ms),
            d.cutover_ms < 1.0,
        );
    }
    // Why a target is missed, from this run's own numbers.
    let ceiling = rate("direct 8 workers", false);
    if vs_haproxy < 1.5 && ceiling > 0.0 {
        let _ = writeln!(
            md,
            "\n**New connections vs. HAProxy.** HAProxy makes two TCP connections per request (client → HAProxy → worker) where ipclusterd's NAT makes one, yet on this 2-core machine the ratio stays at {vs_haproxy:.2}: the load generator's own connects and the workers' accepts (a thread started per connection in `ipcluster-demo`) take most of the CPU both fronts share. The same 8 workers reached directly, with no front at all, do {ceiling:.0} new connections/s: ipclusterd reaches {:.0} % of that ceiling, HAProxy {:.0} %. More cores (a load generator on another host) widen the gap; the ratio to the no-front ceiling is the part a front controls.",
            rate("ipclusterd 8 bands", false) / ceiling * 100.0,
            rate("haproxy 8 workers", false) / ceiling * 100.0
        );
    }
    if vs_pm2 < 1.5 {
        let _ = writeln!(
            md,
            "\n**New connections vs. PM2.** Both run the same 8 single-threaded Node.js processes; PM2's master accepts every connection and hands it to a worker over IPC, where ipclusterd's workers accept their own. Here the 8 Node processes, the load generator and PM2's master share 2 cores: one Node process alone (node direct) does {:.0} new connections/s, more than 8 behind either front ({:.0} with ipclusterd, {:.0} with PM2), so the cores, not the front, set the pace at 8 processes, and the ratio ({vs_pm2:.2}) moves by about ±10 % between runs on this machine.",
            rate("node direct", false),
            rate("node ipclusterd 8 bands", false),
            rate("node pm2 cluster 8", false)
        );
    }
    if ka64 < 0.95 {
        let _ = writeln!(
            md,
            "\n**Keep-alive vs. direct.** See \"Where the keep-alive cost goes\" below: connection tracking and the per-packet NAT rewrite of redirected connections account for it."
        );
    }
    if plan.quick {
        let _ = writeln!(
            md,
            "\nA quick run stops at {} workers; the 1024-worker targets need the full run.",
            plan.scales.last().unwrap_or(&0)
        );
    }

    let _ = writeln!(
        md,
        "\n## 1. Data path\n\nSame worker program behind every front: `ipcluster-demo` (Rust, a thread per connection) and a minimal Node.js `http` server for the PM2 comparison. {} clients, {:.1} s per measurement, keep-alive and a new connection per request. Each ratio is to the same program reached directly on as many workers' own ports (the control named in the mode's row: on 2 cores, 64 processes cost throughput by themselves).\n",
        plan.clients,
        plan.run.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| mode | keep-alive req/s | ratio | p50 µs | p99 µs | new conn req/s | ratio | p50 µs | p99 µs |\n|---|---|---|---|---|---|---|---|---|"
    );
    for m in &dp.modes {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} | {} | {} | {:.0} | {:.2} | {} | {} |",
            m.name,
            m.keepalive.rate(),
            ratio(&m.name, true),
            m.keepalive.percentile(50.0),
            m.keepalive.percentile(99.0),
            m.newconn.rate(),
            ratio(&m.name, false),
            m.newconn.percentile(50.0),
            m.newconn.percentile(99.0)
        );
    }
    // The NAT + conntrack cost per new connection: the same 8 workers with and without the rules.
    let (d, i) = (rate("direct 8 workers", false), rate("ipclusterd 8 bands", false));
    if d > 0.0 && i > 0.0 {
        let per_direct = 1e6 / d;
        let per_ipc = 1e6 / i;
        let _ = writeln!(
            md,
            "\nThe kernel's conntrack + NAT work per new connection (8 workers with and without ipclusterd's rules): {:.1} µs of the machine's time per request over {:.1} µs without ({:.0} % of a trivial request's whole cost here, client side included). With keep-alive only the first packet of a connection meets the rules; the rest pay conntrack and the address rewrite (below).",
            per_ipc - per_direct,
            per_direct,
            (per_ipc - per_direct) / per_direct * 100.0
        );
    }
    // Where the keep-alive time goes, by elimination: each step adds one ingredient.
    let steps = [
        ("direct", "one worker, no connection tracking in the namespace"),
        (
            "direct + conntrack",
            "+ connection tracking and a NAT table (every packet is looked up in conntrack)",
        ),
        ("direct 8 workers", "the same load spread over 8 worker processes, no NAT"),
        (
            "ipclusterd 1 bands",
            "+ REDIRECT: every packet of a redirected connection is rewritten (address, port, checksums)",
        ),
        ("ipclusterd 8 bands", "+ 8 workers behind the rules"),
        (
            "ipclusterd 64 bands",
            "+ 64 workers: 64 processes on 2 cores, 64 rules per public port (first packet only)",
        ),
    ];
    if steps.iter().all(|(n, _)| dp.get(n).is_some()) {
        let _ = writeln!(
            md,
            "\n### Where the keep-alive cost goes\n\nEach row adds one ingredient; the last column is the change from the row above (keep-alive requests/s).\n\n| mode | what it adds | keep-alive req/s | vs. direct | step |\n|---|---|---|---|---|"
        );
        let mut prev = rate("direct", true);
        let base = prev;
        for (name, what) in steps {
            let r = rate(name, true);
            let _ = writeln!(
                md,
                "| {name} | {what} | {r:.0} | {:.2} | {:+.0} % |",
                r / base,
                (r / prev - 1.0) * 100.0
            );
            prev = if name == "direct 8 workers" { rate("direct + conntrack", true) } else { r };
        }
        let _ = writeln!(
            md,
            "\nOn loopback, with requests this small, a request costs only a few microseconds of CPU, so the kernel's per-packet work for a NATed connection (conntrack lookup, then rewriting each packet back and forth) is a visible share of it; any real work per request (a template, a database call) makes it vanish into the noise. The keep-alive target of 0.95 is therefore not met by kernel NAT on this 2-core machine where the load generator shares the cores; the new-connection targets, where a userspace proxy pays per connection what NAT pays per packet, are the comparison that matters for sticky routing."
        );
    }
    let _ = writeln!(md, "\n![data path](datapath.svg)\n");

    let _ = writeln!(
        md,
        "## 2. Deploys under load\n\nOpen-loop load: {} new connections per second from 64 source addresses (latency counted from when each request was due), plus 8 long-lived keep-alive connections sending every 50 ms. Cutover windows: 0.5 s around each operation.\n",
        plan.rate
    );
    let _ = writeln!(
        md,
        "| system | operations | requests | refused | reset | timeout | other | long-lived failures | p99 steady | p99 cutover | p99.9 steady | p99.9 cutover |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for run in [&dl.ipclusterd, &dl.socket, &dl.pm2] {
        let s = run.summary();
        let count = |what: &str| run.events.iter().filter(|e| e.2 == what).count();
        let ops = if count("restart") > 0 {
            format!(
                "{} deploys, {} kill -9, {} restarts",
                count("deploy"),
                count("kill -9"),
                count("restart")
            )
        } else {
            format!("{} reloads", count("reload"))
        };
        let _ = writeln!(
            md,
            "| {} | {ops} | {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            run.name,
            s.requests,
            s.refused,
            s.reset,
            s.timeout,
            s.other,
            run.long_lived_failed,
            f64::from(s.steady_p99_us) / 1000.0,
            f64::from(s.cutover_p99_us) / 1000.0,
            f64::from(s.steady_p999_us) / 1000.0,
            f64::from(s.cutover_p999_us) / 1000.0
        );
    }
    let _ = writeln!(md, "\n![latency during deploys](cutover.svg)\n");

    let _ = writeln!(
        md,
        "## 3. Footprint and scale\n\n| workers | daemon RSS | daemon CPU (idle, 1 s sampling) | ListWorkers (median / max) | restart + adoption (until READY=1) |\n|---|---|---|---|---|"
    );
    for i in &fp.idle {
        let _ = writeln!(
            md,
            "| {} | {:.1} MiB | {:.2} % | {:.1} / {:.1} ms | {:.0} ms |",
            i.workers,
            i.rss_kib as f64 / 1024.0,
            i.cpu_percent,
            i.list_ms.0,
            i.list_ms.1,
            i.adopt_ms
        );
    }
    let _ = writeln!(
        md,
        "\nListWorkers times subtract busctl's own start-up (measured with a property read). Restart + adoption is `systemctl restart ipclusterd` returning, which waits for READY=1.\n"
    );
    let _ = writeln!(
        md,
        "| routing | bands | Deploy (call → return, ready at once) | cutover (NAT: the rule transaction; socket: the map update) | rollback (same workers) |\n|---|---|---|---|---|"
    );
    for d in &fp.deploys {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} ms | {:.3} ms | {:.3} ms |",
            d.routing, d.bands, d.deploy_ms, d.cutover_ms, d.rollback_ms
        );
    }
    fs::write(dir.join("REPORT.md"), &md)?;
    chart_datapath(&dir.join("datapath.svg"), dp, &ratio)?;
    chart_cutover(&dir.join("cutover.svg"), dl)?;
    eprintln!("wrote {}", dir.join("REPORT.md").display());
    if !plan.quick {
        readme_table(ka64, nc64, &socket_ok, vs_haproxy, vs_pm2, (failures, socket_failures), p999, fp)?;
    }
    Ok(())
}

fn chart_datapath(path: &std::path::Path, dp: &DataPath, ratio: &dyn Fn(&str, bool) -> f64) -> Result<()> {
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = dp.modes.len();
    let mut chart = ChartBuilder::on(&root)
        .caption("Requests/s relative to the same worker reached directly", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(90)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n as f64, 0f64..1.3f64)?;
    let names: Vec<String> = dp.modes.iter().map(|m| m.name.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("ratio to direct")
        .draw()?;
    for (i, m) in dp.modes.iter().enumerate() {
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.1, 0.0), (x + 0.45, ratio(&m.name, true))],
            BLUE.filled(),
        )))?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x + 0.5, 0.0), (x + 0.85, ratio(&m.name, false))],
            RED.filled(),
        )))?;
    }
    chart
        .draw_series(std::iter::once(Rectangle::new([(0.0, 0.0), (0.0, 0.0)], BLUE.filled())))?
        .label("keep-alive")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], BLUE.filled()));
    chart
        .draw_series(std::iter::once(Rectangle::new([(0.0, 0.0), (0.0, 0.0)], RED.filled())))?
        .label("new connection per request")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], RED.filled()));
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

fn chart_cutover(path: &std::path::Path, dl: &Deploys) -> Result<()> {
    let root = SVGBackend::new(path, (900, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((3, 1));
    for (area, run) in areas.iter().zip([&dl.ipclusterd, &dl.socket, &dl.pm2]) {
        let end = run.records.last().map_or(1.0, |r| r.due.as_secs_f64()).max(1.0);
        let max = run
            .records
            .iter()
            .filter(|r| r.outcome.is_ok())
            .map(|r| r.latency.as_secs_f64() * 1000.0)
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{}: latency of each request (ms) over time (s); operations shaded", run.name),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..end, 0f64..max * 1.1)?;
        chart.configure_mesh().draw()?;
        chart.draw_series(run.events.iter().map(|(a, b, _)| {
            Rectangle::new(
                [(a.as_secs_f64(), 0.0), (b.as_secs_f64().max(a.as_secs_f64() + 0.02), max * 1.1)],
                RGBColor(255, 220, 150).filled(),
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

/// Rewrites the README's headline table between its bench markers.
#[allow(clippy::too_many_arguments, reason = "one argument per row of the table")]
fn readme_table(
    ka64: f64,
    nc64: f64,
    socket: &[(String, f64, f64)],
    vs_haproxy: f64,
    vs_pm2: f64,
    (failures, socket_failures): (usize, usize),
    p999: f64,
    fp: &Footprint,
) -> Result<()> {
    let path = crate::root().join("README.md");
    let readme = fs::read_to_string(&path)?;
    let (Some(a), Some(b)) = (readme.find("<!-- bench:start -->"), readme.find("<!-- bench:end -->")) else {
        return Ok(());
    };
    let mut t = String::from("<!-- bench:start -->\n| | measured | target |\n|---|---|---|\n");
    let _ = writeln!(t, "| NAT: keep-alive through 64 bands, vs. 64 workers direct | {ka64:.2} | ≥ 0.95 |");
    let _ = writeln!(
        t,
        "| NAT: new connection per request through 64 bands, vs. 64 workers direct | {nc64:.2} | ≥ 0.80 |"
    );
    for (name, ka, nc) in socket {
        let _ = writeln!(
            t,
            "| {name}: keep-alive / new connection, vs. as many workers direct | {ka:.2} / {nc:.2} | ≥ 0.98 / ≥ 0.95 |"
        );
    }
    let _ = writeln!(t, "| new connections vs. HAProxy (8 workers) | {vs_haproxy:.2} × | ≥ 1.5 × |");
    let _ = writeln!(t, "| new connections vs. PM2 cluster (Node, 8) | {vs_pm2:.2} × | ≥ 1.5 × |");
    let _ = writeln!(
        t,
        "| failed requests during deploys, worker kill -9 and restarts under load (NAT / socket) | {failures} / {socket_failures} | 0 |"
    );
    let _ = writeln!(t, "| p99.9 latency at cutover vs. steady | {p999:.2} × | ≤ 2 × |");
    if let Some(big) = fp.idle.iter().max_by_key(|i| i.workers) {
        let _ = writeln!(
            t,
            "| daemon RSS / CPU at {} workers | {:.1} MiB / {:.2} % | < 20 MiB / < 2 % |",
            big.workers,
            big.rss_kib as f64 / 1024.0,
            big.cpu_percent
        );
        let _ = writeln!(t, "| ListWorkers at {} workers | {:.1} ms | < 10 ms |", big.workers, big.list_ms.0);
    }
    if let Some(d) = fp.deploys.iter().find(|d| d.bands == 256 && d.routing == "nat") {
        let _ = writeln!(t, "| cutover at 256 bands | {:.0} ms | < 50 ms |", d.cutover_ms);
        let _ = writeln!(t, "| rollback (same workers) at 256 bands | {:.0} ms | < 50 ms |", d.rollback_ms);
    }
    if let Some(d) = fp.deploys.iter().find(|d| d.bands == 256 && d.routing == "socket") {
        let _ = writeln!(
            t,
            "| socket mode cutover (map update) at 256 bands | {:.3} ms | < 1 ms |",
            d.cutover_ms
        );
    }
    let updated = format!("{}{}{}", &readme[..a], t, &readme[b..]);
    fs::write(&path, updated)?;
    Ok(())
}
