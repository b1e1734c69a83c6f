//! What ipclusterctl prints: tables for people (colors only on a terminal), JSON for machines.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::SystemTime};

use ipcluster_bus::{GenerationRow, HealthRow, SessionRow, WorkerRow};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub(crate) struct Worker<'a> {
    app: &'a str,
    generation: u64,
    band: u32,
    pid: u32,
    state: &'a str,
    ports: Vec<Port>,
    rss_bytes: u64,
    cpu_usec: u64,
    start_usec: u64,
    nice: i32,
    scope: &'a str,
}

#[derive(Debug, Serialize)]
struct Port {
    public: u16,
    worker: u16,
}

#[derive(Debug, Serialize)]
pub(crate) struct Generation<'a> {
    app: &'a str,
    generation: u64,
    state: &'a str,
    workers: u32,
    /// Session records (generations of an app with session_affinity), else null.
    sessions: Option<u32>,
    start_usec: u64,
    scope: &'a str,
}

pub(crate) fn worker(w: &WorkerRow) -> Worker<'_> {
    Worker {
        app: &w.app,
        generation: w.generation,
        band: w.band,
        pid: w.pid,
        state: &w.state,
        ports: w.ports.iter().map(|(public, worker)| Port { public: *public, worker: *worker }).collect(),
        rss_bytes: w.rss,
        cpu_usec: w.cpu_usec,
        start_usec: w.start_usec,
        nice: w.nice,
        scope: &w.scope,
    }
}

pub(crate) fn generation<'a>(g: &'a GenerationRow, sessions: &[SessionRow]) -> Generation<'a> {
    Generation {
        app: &g.app,
        generation: g.generation,
        state: &g.state,
        workers: g.workers,
        sessions: records(g, sessions),
        start_usec: g.start_usec,
        scope: &g.scope,
    }
}

/// Prints `{"key": value}` as JSON, or the value alone.
pub fn print_value<T: Serialize + std::fmt::Display>(json: bool, key: &str, value: T) {
    if json {
        println!("{}", serde_json::json!({ key: value }));
    } else {
        println!("{value}");
    }
}

/// Wall-clock time now, µs since the epoch (the unit of the rows' `start_usec`).
pub(crate) fn now_usec() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn age(start_usec: u64) -> String {
    age_at(start_usec, now_usec())
}

/// How long ago `start_usec` was at `now_usec`, shortly (`42s`, `5min`, `3h`).
pub(crate) fn age_at(start_usec: u64, now_usec: u64) -> String {
    let s = now_usec.saturating_sub(start_usec) / 1_000_000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}min", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// The session records of `g`, if its app keeps sessions.
pub(crate) fn records(g: &GenerationRow, sessions: &[SessionRow]) -> Option<u32> {
    sessions.iter().find(|s| s.app == g.app && s.generation == g.generation).map(|s| s.records)
}

/// Where a state sorts: live first, then canary, starting, draining, retired, stopping, the rest.
pub(crate) fn rank(state: &str) -> u8 {
    match state {
        "live" => 0,
        "canary" => 1,
        "starting" => 2,
        "draining" => 3,
        "retired" => 4,
        "stopping" => 5,
        _ => 6,
    }
}

/// The state, colored when stdout is a terminal.
fn colored(state: &str, width: usize) -> String {
    let padded = format!("{state:<width$}");
    if !std::io::stdout().is_terminal() {
        return padded;
    }
    let code = match state {
        "live" => "32",
        "canary" => "34",
        "starting" => "36",
        "draining" => "35",
        "retired" | "stopping" => "33",
        "failed" => "31",
        _ => "2",
    };
    format!("\x1b[{code}m{padded}\x1b[0m")
}

pub fn workers(json: bool, rows: &[WorkerRow]) {
    let mut rows: Vec<&WorkerRow> = rows.iter().collect();
    rows.sort_by_key(|w| (rank(&w.state), w.app.clone(), std::cmp::Reverse(w.generation), w.band));
    if json {
        let v: Vec<Worker<'_>> = rows.into_iter().map(worker).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "{:<12} {:>4} {:<9} {:>5} {:>8} {:<15} {:>9} {:>8} {:>4} {:>6}",
        "APP", "GEN", "STATE", "BAND", "PID", "PORTS", "RSS", "CPU", "NICE", "AGE"
    );
    for w in rows {
        let ports: Vec<String> = w.ports.iter().map(|(p, q)| format!("{p}->{q}")).collect();
        // Socket mode: the worker accepts on the public sockets it was handed, no port of its own
        // (as `top` shows it).
        let ports = if ports.is_empty() { "-".to_owned() } else { ports.join(",") };
        println!(
            "{:<12} {:>4} {} {:>5} {:>8} {:<15} {:>8}K {:>7.1}s {:>4} {:>6}",
            w.app,
            w.generation,
            colored(&w.state, 9),
            w.band,
            w.pid,
            ports,
            w.rss / 1024,
            w.cpu_usec as f64 / 1e6,
            w.nice,
            age(w.start_usec)
        );
    }
}

/// The generations; SESSIONS (when an app keeps sessions) is "-" for an app without session
/// affinity.
pub fn generations(json: bool, rows: &[GenerationRow], sessions: &[SessionRow]) {
    let mut rows: Vec<&GenerationRow> = rows.iter().collect();
    rows.sort_by_key(|g| (g.app.clone(), rank(&g.state), std::cmp::Reverse(g.generation)));
    if json {
        let v: Vec<Generation<'_>> = rows.into_iter().map(|g| generation(g, sessions)).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    // SESSIONS only when an app keeps sessions.
    let column = |text: &str| if sessions.is_empty() { String::new() } else { format!(" {text:>8}") };
    println!(
        "{:<12} {:>4} {:<9} {:>7}{} {:>6}  SCOPE",
        "APP",
        "GEN",
        "STATE",
        "WORKERS",
        column("SESSIONS"),
        "AGE"
    );
    for g in rows {
        let records = records(g, sessions).map_or_else(|| "-".to_owned(), |n| n.to_string());
        println!(
            "{:<12} {:>4} {} {:>7}{} {:>6}  {}",
            g.app,
            g.generation,
            colored(&g.state, 9),
            g.workers,
            column(&records),
            age(g.start_usec),
            g.scope
        );
    }
}

pub fn status(
    json: bool,
    gens: &[GenerationRow],
    sessions: &[SessionRow],
    rows: &[WorkerRow],
    health: &[HealthRow],
) {
    if json {
        let v = serde_json::json!({
            "generations": gens.iter().map(|g| generation(g, sessions)).collect::<Vec<_>>(),
            "workers": rows.iter().map(worker).collect::<Vec<_>>(),
            "health": health.iter().map(|h| serde_json::json!({
                "app": h.app, "generation": h.generation, "band": h.band, "pid": h.pid,
                "failures": h.failures, "last": h.last, "last_usec": h.last_usec, "note": h.note,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    generations(false, gens, sessions);
    println!();
    workers(false, rows);
    let notes = health_notes(health);
    if !notes.is_empty() {
        println!("\nHEALTH");
        for n in notes {
            println!("{n}");
        }
    }
}

/// What `status` says about health checks: workers failing now, and health replacements.
pub(crate) fn health_notes(health: &[HealthRow]) -> Vec<String> {
    let mut rows: Vec<&HealthRow> = health.iter().filter(|h| h.failures > 0 || !h.note.is_empty()).collect();
    rows.sort_by_key(|h| (h.app.clone(), std::cmp::Reverse(h.generation), h.band));
    rows.into_iter()
        .map(|h| {
            let mut parts = Vec::new();
            if h.failures > 0 {
                let s = if h.failures == 1 { "" } else { "s" };
                parts.push(format!("{} failed check{s} in a row ({})", h.failures, h.last));
            }
            if !h.note.is_empty() {
                parts.push(h.note.clone());
            }
            format!(
                "{} generation {} band {} pid {}: {}",
                h.app,
                h.generation,
                h.band,
                h.pid,
                parts.join("; ")
            )
        })
        .collect()
}

/// Validates app files offline (their contents, and who may change them); exit status 1 if
/// any is invalid. Warnings (see [`crate::check`]) do not change the exit status.
pub fn check_config(files: &[PathBuf], json: bool) -> ExitCode {
    let apps_dir = std::path::Path::new(crate::check::APPS_DIR);
    let files: Vec<PathBuf> =
        if files.is_empty() { crate::check::app_files(apps_dir) } else { files.to_vec() };
    let ephemeral = crate::check::ephemeral();
    let reports: Vec<crate::check::Report> =
        files.iter().map(|f| crate::check::file(f, apps_dir, ephemeral)).collect();
    let failed = reports.iter().any(|r| !r.errors.is_empty());
    if json {
        let v: Vec<_> = reports
            .iter()
            .map(|r| {
                let error = (!r.errors.is_empty()).then(|| r.errors.join("\n"));
                serde_json::json!({"file": r.file, "ok": r.errors.is_empty(), "error": error, "warnings": r.warnings})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for r in &reports {
            for w in &r.warnings {
                eprintln!("{w}");
            }
            if r.errors.is_empty() {
                println!("{}: ok", r.file);
            }
            for e in &r.errors {
                eprintln!("{e}");
            }
        }
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}
