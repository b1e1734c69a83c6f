//! The benchmark report: docs/bench/REPORT.md with SVG charts, and the README's headline table.
//!
//! Every target is one [`Row`]: what is measured, its median and spread, the target, and the
//! verdict, judged on the median; a spread wider than ±3 % is flagged as a defect of the
//! measurement, never used to judge the target differently.

use std::{fmt::Write as _, fs, time::Duration};

use anyhow::Result;

use super::{
    Plan, charts,
    datapath::{Measured, Metric, Program},
    deploys::Deploys,
    footprint::Footprint,
    stats::Spread,
    system::Machine,
};

/// Where and how the run ran.
#[derive(Debug, Clone)]
pub struct Env {
    pub machine: Machine,
    /// Share of the machine's time stolen by the hypervisor over the run.
    pub steal: Option<f64>,
    /// 1-minute load average at the start and the end.
    pub load: (f64, f64),
    pub took: Duration,
    /// (clients' CPU, servers' CPU), or `None` when nothing was pinned.
    pub pinned: Option<(usize, usize)>,
}

/// The widest spread of a ratio that the issue accepts (±3 %).
pub const SPREAD_LIMIT: f64 = 0.03;

/// One target of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    pub measured: String,
    pub target: String,
    pub met: bool,
    /// The ratio's spread, for targets measured in rounds.
    pub spread: Option<Spread>,
}

impl Row {
    fn verdict(&self) -> String {
        let v = if self.met { "met" } else { "**missed**" };
        match &self.spread {
            Some(s) if s.rounds < 5 => format!("{v} ({} rounds: too few to judge the spread)", s.rounds),
            Some(s) if !s.tight(SPREAD_LIMIT) => {
                format!("{v} (median's 95 % interval ±{:.1} % > ±3 %)", s.ci_half_range() * 100.0)
            }
            // A miss by less than the shown digits: the median and its interval to three.
            Some(s) if !self.met => {
                format!("{v} (median {:.3}, its 95 % interval {:.3}–{:.3})", s.median, s.ci.0, s.ci.1)
            }
            _ => v.to_owned(),
        }
    }
}

fn program_name(p: Program) -> &'static str {
    match p {
        Program::Demo => "Rust demo",
        Program::Node => "Node.js",
    }
}

fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::KeepAlive => "keep-alive",
        Metric::NewConn => "new connections",
    }
}

/// Every target, in the report's order.
pub fn rows(dp: &[Measured], dl: &Deploys, fp: &Footprint) -> Vec<Row> {
    let mut rows = Vec::new();
    for m in dp {
        for t in m.cell.targets {
            let s = *m.ratio(t.metric);
            rows.push(Row {
                what: format!(
                    "{}: {} ({}), vs. {}",
                    m.mode.label,
                    metric_name(t.metric),
                    program_name(m.cell.program),
                    m.control.label
                ),
                measured: format!("{} ×", s.show()),
                target: format!("≥ {:.2} ×", t.min),
                met: s.rounds > 0 && s.median >= t.min,
                spread: Some(s),
            });
        }
    }
    let what =
        "socket mode: the steering program's own run time per connection (kernel BPF statistics, worst cell)";
    if let Some(worst) =
        dp.iter().filter_map(|m| m.program_ns).reduce(|a, b| if b.median > a.median { b } else { a })
    {
        rows.push(Row {
            what: what.into(),
            measured: format!(
                "{:.0} ns [{:.0}–{:.0}] over {} window{}",
                worst.median,
                worst.min,
                worst.max,
                worst.rounds,
                if worst.rounds == 1 { "" } else { "s" }
            ),
            target: "< 1 µs".into(),
            met: worst.median < 1000.0,
            spread: None,
        });
    } else if dp
        .iter()
        .any(|m| matches!(m.cell.mode, super::datapath::Front::Ipclusterd { routing: "socket", .. }))
    {
        // Measured in no cell: said, never left out.
        rows.push(Row {
            what: what.into(),
            measured: "not measured (see the run's log)".into(),
            target: "< 1 µs".into(),
            met: false,
            spread: None,
        });
    }
    for (mode, run) in [("NAT", &dl.ipclusterd), ("socket mode", &dl.socket)] {
        let s = run.summary();
        let kinds: Vec<String> = s.kinds.iter().map(|k| format!("{} {}", k.1, k.0)).collect();
        let failures = run.failures();
        rows.push(Row {
            what: format!("{mode}: failed requests over {} under load", kinds.join(", ")),
            measured: match s.failed_in.as_slice() {
                [] => failures.to_string(),
                by => {
                    let by: Vec<String> = by.iter().map(|(k, n)| format!("{n} in {k}")).collect();
                    format!("{failures} ({})", by.join(", "))
                }
            },
            target: "0".into(),
            met: failures == 0,
            spread: None,
        });
        for (kind, _, samples, tail) in &s.kinds {
            let ratio = s.p999_ratio(kind).unwrap_or(f64::INFINITY);
            rows.push(Row {
                what: format!("{mode}: p99.9 during {kind} vs. steady ({samples} samples)"),
                measured: format!(
                    "{ratio:.2} × ({:.1} / {:.1} ms; 95 % interval {})",
                    tail[2] as f64 / 1000.0,
                    s.steady_us[2] as f64 / 1000.0,
                    s.p999_ci_text(kind)
                ),
                target: "≤ 1.5 ×".into(),
                met: ratio <= 1.5,
                spread: None,
            });
        }
    }
    let largest = fp.idle.iter().map(|i| i.workers).max().unwrap_or(0);
    for i in fp.idle.iter().filter(|i| i.workers == largest) {
        rows.push(Row {
            what: format!(
                "daemon CPU with its children, idle, {} workers, {} (1 s sampling)",
                i.workers, i.routing
            ),
            measured: format!("{:.2} %", i.service_cpu_percent),
            target: "< 0.5 % of a core".into(),
            met: i.service_cpu_percent < 0.5,
            spread: None,
        });
        if i.routing == "nat" {
            rows.push(Row {
                what: format!("daemon RSS at {} workers", i.workers),
                measured: format!("{:.1} MiB", i.rss_kib as f64 / 1024.0),
                target: "< 20 MiB".into(),
                met: i.rss_kib < 20 * 1024,
                spread: None,
            });
            rows.push(Row {
                what: format!("ListWorkers at {} workers", i.workers),
                measured: format!(
                    "{:.1} ms (a client in the benchmark's process; with busctl's parse and print: {:.1} ms)",
                    i.list_ms.0, i.list_busctl_ms.0
                ),
                target: "< 10 ms".into(),
                met: i.list_ms.0 < 10.0,
                spread: None,
            });
        }
    }
    if let Some(f) = fp.flush_repaired_ms {
        rows.push(Row {
            what: format!("a flush of the nat table noticed and repaired ({largest} workers)"),
            measured: format!("{:.1} s", f / 1000.0),
            target: "≤ 5 s".into(),
            met: f <= 5000.0,
            spread: None,
        });
    }
    for (routing, what, limit) in
        [("nat", "cutover", 50.0), ("nat", "rollback", 50.0), ("socket", "cutover", 1.0)]
    {
        if let Some(d) = fp.deploys.iter().find(|d| d.bands == 256 && d.routing == routing) {
            let v = if what == "cutover" { d.cutover_ms } else { d.rollback_ms };
            rows.push(Row {
                what: format!("{routing} {what} at 256 bands"),
                measured: format!("{v:.3} ms"),
                target: format!("< {limit} ms"),
                met: v < limit,
                spread: None,
            });
        }
    }
    rows
}

fn side_rates(v: &[f64]) -> String {
    format!("{:.0}", super::stats::median(v))
}

pub fn write(plan: &Plan, env: &Env, dp: &[Measured], dl: &Deploys, fp: &Footprint) -> Result<()> {
    let dir =
        if plan.quick { crate::root().join("docs/bench/quick") } else { crate::root().join("docs/bench") };
    fs::create_dir_all(&dir)?;
    let rows = rows(dp, dl, fp);
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark report{}\n", if plan.quick { " (quick run)" } else { "" });
    let m = &env.machine;
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench{}` in {:.0} s ({:.1} min). Machine: {} cores ({}), {} GiB, Linux {}.",
        if plan.quick { " --quick" } else { "" },
        env.took.as_secs_f64(),
        env.took.as_secs_f64() / 60.0,
        m.cores,
        m.cpu,
        m.mem_gib,
        m.kernel
    );
    let pinning = match env.pinned {
        Some((c, s)) => format!(
            "Load generator pinned to CPU {c}, servers, workers and daemon to CPU {s} (`sched_setaffinity`; the sandboxes' cgroups have no cpu controller), except the one row marked unpinned."
        ),
        None => "Nothing pinned: this machine has one CPU.".into(),
    };
    let _ = writeln!(
        md,
        "{pinning} Steal time over the run: {}. Load average (1 min): {:.2} at the start, {:.2} at the end (other work on the machine shows here).\n",
        env.steal.map_or("unknown".into(), |s| format!("{:.2} %", s * 100.0)),
        env.load.0,
        env.load.1
    );
    let _ = writeln!(
        md,
        "**Method.** Each data-path cell sets up a mode and its control side by side and measures them in {} rounds{}; in each round the two take turns (control, mode, mode, control, …: the side that goes first alternates between rounds) until each has had {:.1} s per kind (keep-alive, then a new connection per request). The load is {} closed-loop clients from 64 source addresses, driven by one thread through epoll (as wrk does) so that the servers' CPU, not the load generator's, is the one that saturates, after a warm-up of each front. With keep-alive each client's connection is made before the turns and stays open between them; in a plain reuseport group the connections are spread evenly over the workers first (a front that maps clients to bands does that by itself). Only requests that ended within a turn count, so a rate is what the turns held. Turns rather than one run per front: this machine's CPUs change speed by themselves for seconds at a time, and turns much shorter than that compare the fronts at the same speed. A turn is long enough for each client to make about 10 requests at the slower front's rate (a short run after the warm-up), {:.0}–{:.0} ms (in the table below). A ratio is a round's mode rate over its control rate; a cell shows the median of those ratios with their min–max, and its spread is the 95 % bootstrap interval of that median (in the tables below): a target is judged on the median, and a spread wider than ±3 % is flagged as a defect of the measurement. The closed loop's latencies are corrected for coordinated omission as wrk2 does (for the interval each client's requests were due at, at the measured rate). Failed requests are counted in every row and never in the rates, and so are conntrack's drops (every sandbox keeps a closed connection's conntrack entry 2 s instead of 120, or a table of 262 144 entries fills within 15 s at these rates).\n",
        plan.rounds,
        if plan.max_rounds > plan.rounds {
            format!(
                " (a cell whose ratio's median is then known less well than ±3 % runs more, up to {}: as many as narrowing its interval to ±3 % takes at 1/√rounds, plus a fifth, decided once after the planned rounds, not by looking again after each; each cell's count is in its table)",
                plan.max_rounds
            )
        } else {
            String::new()
        },
        plan.run.as_secs_f64(),
        plan.clients,
        plan.slice.as_secs_f64() * 1000.0,
        plan.slice.as_secs_f64() * 4000.0
    );
    let _ =
        writeln!(md, "## Targets\n\n| target | measured: median [min–max] | target | |\n|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(md, "| {} | {} | {} | {} |", r.what, r.measured, r.target, r.verdict());
    }
    if plan.quick {
        let _ = writeln!(
            md,
            "\nA quick run: {} rounds of the headline cells, {} events of each kind, {} workers at most; its targets are indicative.",
            plan.rounds,
            plan.events,
            plan.scales.iter().max().unwrap_or(&0)
        );
    }

    let _ = writeln!(
        md,
        "\n## 1. Data path\n\nThe controls: NAT mode against its own physical limit, the same sandbox and workers reached through conntrack and one REDIRECT rule per worker (each client on its band's worker, as NAT maps it); socket mode against the same workers, launched and confined by ipclusterd the same way, in a plain `SO_REUSEPORT` group whose steering program was detached (the kernel's hash picks); HAProxy and PM2 with as many workers. With keep-alive each of the 64 clients holds one connection for a run; \"workers answering\" is how many workers those connections landed on (the median over the rounds): NAT and socket mode give each client address its band, so 64 clients reach all of 64 bands, where the kernel's hash leaves some workers several connections and others none. \"program ns/conn\" is the steering program's own run time per new connection from the kernel's BPF statistics (`run_time_ns / run_cnt`), measured in a quarter-length window of new connections of its own after half the rounds (after rounds 1, 2, 5, 6, …, so that a window precedes a control-first and a mode-first round as often; never during a turn: the statistics add clock reads to every run of the program): the median [min–max] of those windows.\n"
    );
    let _ = writeln!(
        md,
        "| mode | control | pinned | rounds | turn ms (ka / new) | keep-alive ratio | 95 % CI | new conn ratio | 95 % CI | mode req/s (ka / new) | control req/s (ka / new) | failed (mode / control) | keep-alive: workers answering (mode / control) | conntrack drops | new conn p50 / p99 µs, mode / control | program ns/conn | load avg | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in dp {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} / {} | {} | {:.3}–{:.3} | {} | {:.3}–{:.3} | {} / {} | {} / {} | {} / {} | {} / {} | {} | {} / {} — {} / {} | {} | {:.1}–{:.1} | {:.0} |",
            c.mode.label,
            c.control.label,
            if c.cell.pinned { "yes" } else { "**no**" },
            c.rounds,
            c.turns[0].as_millis(),
            c.turns[1].as_millis(),
            c.keepalive.show(),
            c.keepalive.ci.0,
            c.keepalive.ci.1,
            c.newconn.show(),
            c.newconn.ci.0,
            c.newconn.ci.1,
            side_rates(&c.mode.keepalive),
            side_rates(&c.mode.newconn),
            side_rates(&c.control.keepalive),
            side_rates(&c.control.newconn),
            c.mode.failed_keepalive + c.mode.failed_newconn,
            c.control.failed_keepalive + c.control.failed_newconn,
            workers_answering(&c.mode),
            workers_answering(&c.control),
            c.conntrack_drops,
            c.mode.closed_tail_us[0],
            c.mode.closed_tail_us[1],
            c.control.closed_tail_us[0],
            c.control.closed_tail_us[1],
            c.program_ns.map_or("–".into(), |n| format!("{:.0} [{:.0}–{:.0}]", n.median, n.min, n.max)),
            c.load.0,
            c.load.1,
            c.seconds
        );
    }
    let _ = writeln!(
        md,
        "\n**Latency at a constant rate** (new connection per request, open loop: each request is due at a fixed time and its latency counts from then, so a stall is charged to every request it delayed — the coordinated-omission correction wrk2 makes), at 50 % and 80 % of each front's median new-connection capacity above, {:.0} s each:\n",
        plan.latency_run.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| front | cell | load | rate/s | requests | failed | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|---|---|---|---|---|"
    );
    for c in dp {
        for side in [&c.control, &c.mode] {
            for o in &side.open {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} % | {} | {} | {} | {} | {} | {} |",
                    side.label,
                    c.mode.label,
                    o.load * 100.0,
                    o.rate,
                    o.requests,
                    o.failed,
                    o.tail_us[0],
                    o.tail_us[1],
                    o.tail_us[2]
                );
            }
        }
    }
    let _ = writeln!(md, "\n![ratio of each round, per cell](datapath.svg)\n");

    let _ = writeln!(
        md,
        "## 2. Deploys, worker kill -9 and restarts under load\n\nOpen-loop load: {} new connections per second from 64 source addresses (latency counted from when each request was due), plus 8 long-lived keep-alive connections sending every 50 ms. Each kind of operation has its own window of the run ({} of each, one after another, never overlapping); a request belongs to an operation when it was due from 0.5 s before its start to 0.5 s after its end, else it is steady. A p99.9 rests on a few of the slowest requests, and one stall delays many at once: its ratio's approximate 95 % interval comes from resampling whole operation windows and blocks of consecutive steady samples as large as a window (1000 block-bootstrap resamples; a percentile bootstrap of a p99.9 covers less than it says); a target is judged on the ratio itself. The load's first second (its client threads starting) counts failures but no latency.\n",
        plan.rate, plan.events
    );
    let _ = writeln!(
        md,
        "| system | window | operations | samples | p50 ms | p99 ms | p99.9 ms | p99.9 vs. steady | its 95 % interval |\n|---|---|---|---|---|---|---|---|---|"
    );
    for run in dl.runs() {
        let s = run.summary();
        let ms = |us: u64| us as f64 / 1000.0;
        let _ = writeln!(
            md,
            "| {} | steady | – | {} | {:.1} | {:.1} | {:.1} | 1.00 | – |",
            run.name,
            s.steady_samples,
            ms(s.steady_us[0]),
            ms(s.steady_us[1]),
            ms(s.steady_us[2])
        );
        for (kind, ops, n, t) in &s.kinds {
            let _ = writeln!(
                md,
                "| {} | {kind} | {ops} | {n} | {:.1} | {:.1} | {:.1} | {:.2} | {} |",
                run.name,
                ms(t[0]),
                ms(t[1]),
                ms(t[2]),
                s.p999_ratio(kind).unwrap_or(0.0),
                s.p999_ci_text(kind)
            );
        }
    }
    let _ = writeln!(
        md,
        "\n| system | requests | refused | reset | timeout | other | long-lived ok / failed |\n|---|---|---|---|---|---|---|"
    );
    for run in dl.runs() {
        let s = run.summary();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} / {} |",
            run.name,
            s.requests,
            s.refused,
            s.reset,
            s.timeout,
            s.other,
            run.long_lived_ok,
            run.long_lived_failed
        );
    }
    for run in dl.runs() {
        let failed = run.failure_times();
        if !failed.is_empty() {
            let _ = writeln!(md, "\nThe failed requests of {} (when each failed):\n", run.name);
            for f in failed {
                let _ = writeln!(md, "- {f}");
            }
        }
    }
    let _ = writeln!(md, "\n![latency during deploys, kills and restarts](cutover.svg)\n");

    let _ = writeln!(
        md,
        "## 3. Footprint and scale\n\nIdle, after start-up, over {:.0} s. \"With its children\" is the whole `ipclusterd.service` cgroup's `usage_usec` (the daemon and every program it runs, such as iptables); \"alone\" is the daemon process's own time.\n\n| routing | workers | daemon RSS | CPU alone | CPU with its children | ListWorkers (median / max) | ListWorkers with busctl | restart + adoption (until READY=1) |\n|---|---|---|---|---|---|---|---|",
        plan.idle.as_secs_f64()
    );
    for i in &fp.idle {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} MiB | {:.2} % | {:.2} % | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.0} ms |",
            i.routing,
            i.workers,
            i.rss_kib as f64 / 1024.0,
            i.cpu_percent,
            i.service_cpu_percent,
            i.list_ms.0,
            i.list_ms.1,
            i.list_busctl_ms.0,
            i.list_busctl_ms.1,
            i.adopt_ms
        );
    }
    if let Some(f) = fp.flush_repaired_ms {
        let _ = writeln!(
            md,
            "\n`iptables -t nat -F` by another tool: the rules were back {:.1} s later.",
            f / 1000.0
        );
    }
    let _ = writeln!(
        md,
        "\nListWorkers is timed from a client in the benchmark's process, connected to the sandbox's system bus: the call out, the daemon's answer, the whole reply in (not decoded). \"With busctl\" is what a user of `busctl call` waits, its start-up (a property read) subtracted: it also parses and prints every row. Restart + adoption is `systemctl restart ipclusterd` returning, which waits for READY=1.\n"
    );
    if !fp.sessions.is_empty() {
        let _ = writeln!(
            md,
            "A restart with session affinity (`session_affinity = \"1h\"`) and a full set of live records (NAT: ipset entries of the live generation's set; socket mode: records in the steering program's map, written as the program writes them):\n\n| routing | workers | live records | restart + adoption (until READY=1) | until ListSessions counts them all |\n|---|---|---|---|---|"
        );
        for a in &fp.sessions {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.0} ms | {:.0} ms |",
                a.routing, a.workers, a.records, a.ready_ms, a.counted_ms
            );
        }
        let _ = writeln!(md);
    }
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
    artefacts(&mut md, dp, dl);
    fs::write(dir.join("REPORT.md"), &md)?;
    charts::ratios(&dir.join("datapath.svg"), dp)?;
    charts::cutover(&dir.join("cutover.svg"), dl)?;
    eprintln!("wrote {}", dir.join("REPORT.md").display());
    if !plan.quick {
        readme_table(&rows)?;
    }
    Ok(())
}

/// The numbers of the earlier method that were artefacts of it, with this run's beside them.
fn artefacts(md: &mut String, dp: &[Measured], dl: &Deploys) {
    let find = |mode: &str, control: &str| {
        dp.iter().find(|m| m.mode.label == mode && m.control.label.contains(control))
    };
    let show = |m: Option<&Measured>| {
        m.map_or("not measured in this run".to_owned(), |m| {
            format!("{} / {}", m.keepalive.show(), m.newconn.show())
        })
    };
    let _ = writeln!(md, "## Earlier numbers that were artefacts of the method\n");
    // Each with this run's numbers of the cell it was about, in place of `{}`.
    let earlier = [
        (
            "- **Socket mode at 8 bands: 0.83 / 0.73, 0.93 / 0.84, 0.68 / 0.62 and 1.16 / 1.49** (keep-alive / new connections) in four runs of the same code. Each was one 5-second run of the mode against one of its control, minutes apart, unpinned, on a machine shared with builds: the control was measured, not the front. Now (paired rounds, pinned, against the same workers in a plain reuseport group): {}.",
            find("socket 8 bands", "reuseport"),
        ),
        (
            "- **\"direct + conntrack\" at 1.51 × \"direct\"** (a quick run): the same kind of drift between two single runs; conntrack cannot speed a connection up. NAT is now compared with its own physical limit in the same sandbox: {} at 64 bands.",
            find("NAT 64 bands", "REDIRECT"),
        ),
        (
            "- **Node.js socket mode at 64 bands: 0.91 in one run, 1.20 in another**: the control sent each client to one fixed worker and, at 64 workers with 32 clients, used workers 0–31 only, while socket mode spread clients over all 64 bands; its workers did not share ipclusterd's confinement. Now: {}.",
            find("node socket 64 bands", "reuseport"),
        ),
        (
            "- **Node.js socket mode at 64 bands, keep-alive: 0.60 in two full runs**: the plain reuseport group's hash left its 64 keep-alive connections on about 41 of the 64 workers, socket mode on all 64, and 64 single-threaded processes sharing one CPU serve fewer requests than 41. The control's connections are now spread over its workers as evenly as socket mode's: {}.",
            find("node socket 64 bands", "reuseport"),
        ),
        (
            "- **Spreads of ±4–33 % in the two full runs before this method** (e.g. socket mode at 8 bands 0.98 [0.72–1.29] / 0.97 [0.90–1.05]): the load generator, a thread per client in `cargo xtask`'s unoptimized build, held the client CPU at 96–100 % while the servers' CPU idled 10–60 %, so the rates measured the generator; and each front ran 2 s after the other on CPUs whose speed changes by itself (a compute loop alone on an idle CPU: 0.77 × to 1.45 × its median, in phases of seconds). Now one optimized epoll thread drives the load, and the fronts take short turns: {} for socket mode at 8 bands.",
            find("socket 8 bands", "reuseport"),
        ),
    ];
    for (text, cell) in earlier {
        let _ = writeln!(md, "{}", text.replace("{}", &show(cell)));
    }
    let s = dl.ipclusterd.summary();
    let kinds: Vec<String> =
        s.kinds.iter().map(|k| format!("{} {:.2} ×", k.0, s.p999_ratio(k.0).unwrap_or(0.0))).collect();
    let _ = writeln!(
        md,
        "- **p99.9 at cutover 2.67 × steady**: NAT mode only, and made by the five `kill -9`s sharing one window with the deploys and restarts. Each kind now has its own window; NAT: {}.",
        kinds.join(", ")
    );
    let _ = writeln!(
        md,
        "- **Failed requests dropped from the rate**: a front that fails fast looked faster. Failures are now counted in every row, and the rates are of successful requests only.\n"
    );
}

/// Rewrites the README's headline table between its bench markers.
fn readme_table(rows: &[Row]) -> Result<()> {
    let path = crate::root().join("README.md");
    let readme = fs::read_to_string(&path)?;
    let (Some(a), Some(b)) = (readme.find("<!-- bench:start -->"), readme.find("<!-- bench:end -->")) else {
        return Ok(());
    };
    let mut t = String::from(
        "<!-- bench:start -->\n| | measured: median [min–max] | target | |\n|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(t, "| {} | {} | {} | {} |", r.what, r.measured, r.target, r.verdict());
    }
    let updated = format!("{}{}{}", &readme[..a], t, &readme[b..]);
    fs::write(&path, updated)?;
    Ok(())
}

/// How many workers the keep-alive connections landed on, the median over a side's rounds.
fn workers_answering(side: &super::datapath::Side) -> String {
    let n: Vec<f64> = side.keepalive_workers.iter().map(|&n| n as f64).collect();
    if n.is_empty() { "–".into() } else { format!("{}", super::stats::median(&n)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wide_spread_is_flagged_whatever_the_verdict() {
        let tight = Spread { median: 0.99, min: 0.90, max: 1.0, ci: (0.98, 1.0), rounds: 9 };
        let wide = Spread { median: 0.99, min: 0.90, max: 1.05, ci: (0.9, 1.05), rounds: 9 };
        let row = |s: Spread, met| Row {
            what: String::new(),
            measured: String::new(),
            target: String::new(),
            met,
            spread: Some(s),
        };
        assert_eq!(row(tight, true).verdict(), "met");
        assert_eq!(row(tight, false).verdict(), "**missed** (median 0.990, its 95 % interval 0.980–1.000)");
        assert_eq!(row(wide, true).verdict(), "met (median's 95 % interval ±9.1 % > ±3 %)");
        assert_eq!(row(wide, false).verdict(), "**missed** (median's 95 % interval ±9.1 % > ±3 %)");
        let quick = Spread { rounds: 3, ..tight };
        assert_eq!(row(quick, true).verdict(), "met (3 rounds: too few to judge the spread)");
    }
}
