//! `ipclusterctl top [APP]`: a live view of generations and workers (state, RSS, CPU %, nice,
//! age), like `systemd-cgtop`, until `q` (or Ctrl-C).
//!
//! What the daemon signals (a generation changing state, a worker ready or gone, a policy held
//! back) shows at once; `ListGenerations` and `ListWorkers` every `--interval` bring the figures
//! (RSS, CPU time, nice) and correct anything a signal cannot say. The model and the frame are
//! [`view`]'s, tested without a terminal; the terminal's mode is [`screen`]'s.
//!
//! When stdout is not a terminal, or with `--json`, it prints one snapshot and exits. Errors
//! before the view starts (an unknown app, no daemon) end it with the usual exit status; once it
//! runs, a failing refresh is shown in the view, which keeps trying. Refreshes do not start a
//! stopped daemon by D-Bus activation (only the first call may, as `status` would): watching
//! must not undo `systemctl stop ipclusterd`.

mod screen;
mod table;
mod view;

use std::{
    fs::File,
    future::Future,
    io::IsTerminal,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    time::Duration,
};

use crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use futures_util::StreamExt;
use ipcluster_bus::{GenerationRow, ManagerProxy, SessionRow, WorkerRow};
use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use zbus::proxy::MethodFlags;

use self::view::{Now, Signal, View};

/// The shortest refresh interval: the daemon samples at most every 100 ms.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// The shortest time between two frames.
const FRAME: Duration = Duration::from_millis(50);

/// `ipclusterctl top`'s arguments.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Only this app (default: every app).
    app: Option<String>,
    /// Time between refreshes of the figures: seconds (`2`, `0.5`) or a duration (`500ms`).
    /// Signals show at once whatever it is.
    #[arg(short = 'd', long, value_name = "SECONDS", default_value = "1", value_parser = parse_interval)]
    interval: Duration,
}

/// `--interval`: plain seconds as `top -d` takes them, or a duration as app files write them;
/// 0.1 s to 1 h.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 && secs <= MAX_INTERVAL.as_secs_f64() => {
            Duration::from_secs_f64(secs)
        }
        Ok(_) => return Err(format!("{s:?}: must be 0.1 to 3600 seconds")),
        Err(_) => ipcluster_core::units::parse_duration(s)?,
    };
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&d) {
        return Err(format!("{s:?}: must be 0.1 to 3600 seconds"));
    }
    Ok(d)
}

/// Runs the live view, or prints one snapshot when stdout is not a terminal or with `json`.
pub async fn run(manager: &ManagerProxy<'_>, args: TopArgs, json: bool) -> zbus::Result<()> {
    let app = args.app.unwrap_or_default();
    if json || !std::io::stdout().is_terminal() {
        let (gens, workers, sessions) = fetch(manager, &app, true).await?;
        snapshot(&app, args.interval, (gens, workers, sessions), json);
        return Ok(());
    }
    live(manager, &app, args.interval).await
}

/// One snapshot: the tables as plain text, or JSON (`status --json` with each worker's
/// `cpu_percent`, its average since it started: one sample has no rate).
fn snapshot(app: &str, interval: Duration, (gens, workers, sessions): Lists, json: bool) {
    let now = Now::current();
    if json {
        #[derive(Serialize)]
        struct Worker<'a> {
            #[serde(flatten)]
            row: crate::output::Worker<'a>,
            cpu_percent: Option<f64>,
        }
        let mut rows: Vec<&WorkerRow> = workers.iter().collect();
        rows.sort_by_key(|w| {
            (crate::output::rank(&w.state), &w.app, std::cmp::Reverse(w.generation), w.band)
        });
        let workers: Vec<Worker<'_>> = rows
            .into_iter()
            .map(|w| {
                let cpu = view::Cpu::new(w.cpu_usec, w.start_usec, now).percent(now.at, Duration::MAX);
                Worker { row: crate::output::worker(w), cpu_percent: cpu.map(|c| (c * 10.0).round() / 10.0) }
            })
            .collect();
        let v = serde_json::json!({
            "generations": gens.iter().map(|g| crate::output::generation(g, &sessions)).collect::<Vec<_>>(),
            "workers": workers,
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let mut v = View::new(app, interval);
    v.refreshed(gens, workers, now);
    v.sessions(&sessions);
    for line in v.render(None, now) {
        println!("{}", line.text());
    }
}

type Lists = (Vec<GenerationRow>, Vec<WorkerRow>, Vec<SessionRow>);

/// ListGenerations, ListWorkers and ListSessions of `app` ("" = every app); with `auto_start`
/// false, a stopped daemon is not started by D-Bus activation (the bus answers that nobody owns
/// the name). A daemon too old to list sessions has none.
async fn fetch(manager: &ManagerProxy<'_>, app: &str, auto_start: bool) -> zbus::Result<Lists> {
    let flags = if auto_start { MethodFlags::empty() } else { MethodFlags::NO_AUTO_START };
    let (proxy, body) = (manager.inner(), (app,));
    let sessions = async {
        match proxy.call_with_flags::<_, _, Vec<SessionRow>>("ListSessions", flags, &body).await {
            Err(zbus::Error::MethodError(name, _, _)) if name.as_str() == crate::UNKNOWN_METHOD => {
                Ok(Some(Vec::new()))
            }
            other => other,
        }
    };
    let (gens, workers, sessions) = tokio::try_join!(
        proxy.call_with_flags::<_, _, Vec<GenerationRow>>("ListGenerations", flags, &body),
        proxy.call_with_flags::<_, _, Vec<WorkerRow>>("ListWorkers", flags, &body),
        sessions,
    )?;
    let missing = || zbus::Error::Failure("no reply".into());
    Ok((gens.ok_or_else(missing)?, workers.ok_or_else(missing)?, sessions.ok_or_else(missing)?))
}

/// A signal of the interface, as the view takes it (`None`: another member, or malformed).
fn parse(msg: zbus::Message) -> Option<Signal> {
    use ipcluster_bus::{GenerationStateChanged, PolicyHeldBack, WorkerExited, WorkerReady};
    if let Some(s) = GenerationStateChanged::from_message(msg.clone()) {
        let a = s.args().ok()?;
        return Some(Signal::State { app: a.app, generation: a.generation, state: a.state });
    }
    if let Some(s) = WorkerReady::from_message(msg.clone()) {
        let a = s.args().ok()?;
        return Some(Signal::Ready { app: a.app, generation: a.generation, band: a.band, pid: a.pid });
    }
    if let Some(s) = WorkerExited::from_message(msg.clone()) {
        let a = s.args().ok()?;
        let (app, generation, band, pid, reason) = (a.app, a.generation, a.band, a.pid, a.reason);
        return Some(Signal::Exited { app, generation, band, pid, reason });
    }
    let s = PolicyHeldBack::from_message(msg)?;
    let a = s.args().ok()?;
    Some(Signal::HeldBack {
        app: a.app,
        generation: a.generation,
        band: a.band,
        pid: a.pid,
        reason: a.reason,
    })
}

/// Whether a key ends the view: `q`, or Ctrl-C (in raw mode it is a key, not SIGINT).
fn quits(k: &KeyEvent) -> bool {
    k.kind == KeyEventKind::Press
        && match k.code {
            KeyCode::Char('q' | 'Q') => true,
            KeyCode::Char('c') => k.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

/// The terminal keys are read from (stdin, or the controlling terminal where stdin is not one,
/// as crossterm reads them) and the one frames go to (stdout).
fn terminal() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let stdin = std::io::stdin();
    let tty: OwnedFd = if stdin.is_terminal() {
        stdin.as_fd().try_clone_to_owned()?
    } else {
        File::options().read(true).write(true).open("/dev/tty")?.into()
    };
    Ok((tty, std::io::stdout().as_fd().try_clone_to_owned()?))
}

/// The terminal went away or refused a write: nothing more can be shown. The terminal is put
/// back (as far as it still can be) before saying so.
fn terminal_failed(e: &std::io::Error) -> ! {
    let _ = screen::restore();
    eprintln!("ipclusterctl: terminal: {e}");
    std::process::exit(1)
}

async fn live(manager: &ManagerProxy<'_>, app: &str, interval: Duration) -> zbus::Result<()> {
    // Subscribed before the first list: nothing that happens after it is missed.
    let mut signals = manager.inner().receive_all_signals().await?;
    let (gens, workers, sessions) = fetch(manager, app, true).await?;
    let mut view = View::new(app, interval);
    view.refreshed(gens, workers, Now::current());
    view.sessions(&sessions);
    let io = |e: std::io::Error| zbus::Error::InputOutput(e.into());
    let mut stops = [SignalKind::terminate(), SignalKind::hangup(), SignalKind::interrupt()]
        .map(|k| signal(k).map_err(io));
    let [Ok(term), Ok(hup), Ok(int)] = &mut stops else {
        return Err(zbus::Error::Failure("cannot handle SIGTERM, SIGHUP, SIGINT".into()));
    };
    let screen = match terminal().and_then(|(tty, out)| screen::Screen::enter(tty, out)) {
        Ok(s) => s,
        Err(e) => {
            let _ = screen::restore();
            eprintln!("ipclusterctl: cannot use the terminal ({e}): one snapshot");
            let now = Now::current();
            view.render(None, now).iter().for_each(|l| println!("{}", l.text()));
            return Ok(());
        }
    };
    let mut keys = crossterm::event::EventStream::new();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Ages move on between refreshes (which may be a minute apart).
    let mut clock = tokio::time::interval(Duration::from_secs(1));
    let mut refresh: Option<Pin<Box<dyn Future<Output = zbus::Result<Lists>> + '_>>> = None;
    // Frames are drawn at most every FRAME: a deploy of 1024 workers is 1024 signals in a burst.
    let (mut dirty, mut next_frame) = (true, tokio::time::Instant::now());
    loop {
        if dirty && tokio::time::Instant::now() >= next_frame {
            let (w, h) = crossterm::terminal::size().unwrap_or((80, 24));
            let frame = view.render(Some((usize::from(w), usize::from(h))), Now::current());
            if let Err(e) = screen.draw(&frame) {
                terminal_failed(&e);
            }
            (dirty, next_frame) = (false, tokio::time::Instant::now() + FRAME);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_frame), if dirty => {}
            _ = clock.tick() => dirty = true,
            _ = ticker.tick(), if refresh.is_none() => {
                view.begin_refresh();
                refresh = Some(Box::pin(fetch(manager, app, false)));
            }
            result = async { refresh.as_mut().expect("polled only when set").await }, if refresh.is_some() => {
                refresh = None;
                match result {
                    Ok((gens, workers, sessions)) => {
                        view.refreshed(gens, workers, Now::current());
                        view.sessions(&sessions);
                    }
                    Err(e) => view.refresh_failed(crate::describe(&e).1, Now::current()),
                }
                dirty = true;
            }
            msg = signals.next() => match msg {
                Some(msg) => {
                    if let Some(s) = parse(msg) {
                        view.signal(s, Now::current());
                        dirty = true;
                    }
                }
                None => return Err(zbus::Error::Failure("the connection to the bus closed".into())),
            },
            key = keys.next() => match key {
                Some(Ok(Event::Key(k))) if quits(&k) => return Ok(()),
                // Other keys, a resize: drawn again.
                Some(Ok(_)) => dirty = true,
                Some(Err(e)) => terminal_failed(&e),
                None => terminal_failed(&std::io::ErrorKind::UnexpectedEof.into()),
            },
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_seconds_or_durations_within_bounds() {
        assert_eq!(parse_interval("1"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2min"), Ok(Duration::from_secs(120)));
        for bad in ["0", "0.05", "-1", "NaN", "inf", "2h", "soon", ""] {
            assert!(parse_interval(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn message<B: serde::Serialize + zbus::zvariant::DynamicType>(member: &str, body: &B) -> zbus::Message {
        zbus::Message::signal(ipcluster_bus::OBJECT_PATH, ipcluster_bus::INTERFACE, member)
            .build(body)
            .unwrap()
    }

    #[test]
    fn each_signal_of_the_interface_is_read_and_anything_else_is_not() {
        assert_eq!(
            parse(message("GenerationStateChanged", &("web", 2u64, "live"))),
            Some(Signal::State { app: "web".into(), generation: 2, state: "live".into() })
        );
        assert_eq!(
            parse(message("WorkerReady", &("web", 2u64, 1u32, 42u32))),
            Some(Signal::Ready { app: "web".into(), generation: 2, band: 1, pid: 42 })
        );
        let reason = "exited with status 4";
        assert_eq!(
            parse(message("WorkerExited", &("web", 2u64, 1u32, 42u32, reason))),
            Some(Signal::Exited {
                app: "web".into(),
                generation: 2,
                band: 1,
                pid: 42,
                reason: reason.into()
            })
        );
        assert_eq!(
            parse(message("PolicyHeldBack", &("web", 2u64, 1u32, 42u32, reason))),
            Some(Signal::HeldBack {
                app: "web".into(),
                generation: 2,
                band: 1,
                pid: 42,
                reason: reason.into()
            })
        );
        // Another member, or a known one with the wrong arguments.
        assert_eq!(parse(message("Reloaded", &("web",))), None);
        assert_eq!(parse(message("WorkerReady", &("web", 2u64))), None);
    }

    #[test]
    fn q_and_ctrl_c_quit_and_nothing_else_does() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(quits(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('Q'), KeyModifiers::SHIFT)));
        assert!(quits(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
        assert!(!quits(&key(KeyCode::Enter, KeyModifiers::NONE)));
        let mut release = key(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert!(!quits(&release));
    }
}
