use super::*;

const SEC: Duration = Duration::from_secs(1);
/// A fixed wall-clock origin: 2024-01-01, so ages are exact.
const T0_USEC: u64 = 1_704_067_200_000_000;

fn t0() -> Now {
    Now { at: Instant::now(), usec: T0_USEC }
}

fn gen_row(app: &str, generation: u64, state: &str, workers: u32, age_s: u64) -> GenerationRow {
    GenerationRow {
        app: app.into(),
        generation,
        state: state.into(),
        workers,
        start_usec: T0_USEC - age_s * 1_000_000,
        scope: format!("ipcluster-{app}-{generation}.scope"),
    }
}

fn worker_row(app: &str, generation: u64, band: u32, pid: u32, state: &str) -> WorkerRow {
    WorkerRow {
        app: app.into(),
        generation,
        band,
        pid,
        state: state.into(),
        ports: vec![(80, 20000 + pid as u16 % 1000)],
        rss: 12 << 20,
        cpu_usec: 0,
        start_usec: T0_USEC - 30_000_000,
        nice: 0,
        scope: format!("ipcluster-{app}-{generation}.scope"),
    }
}

/// The worker rows of the frame as (app, gen, band, pid, state) tuples, in the order shown.
fn shown_workers(view: &View) -> Vec<(String, u64, u32, u32, String)> {
    view.sorted_workers()
        .into_iter()
        .map(|(pid, w)| (w.app.clone(), w.generation, w.band, pid, w.state.clone()))
        .collect()
}

fn text(lines: &[Line]) -> Vec<String> {
    lines.iter().map(Line::text).collect()
}

/// One live generation 1 of web with bands 0 and 1 (pids 101, 102).
fn web_live() -> (View, Now) {
    let now = t0();
    let mut v = View::new("", SEC);
    v.begin_refresh();
    v.refreshed(
        vec![gen_row("web", 1, "live", 2, 60)],
        vec![worker_row("web", 1, 0, 101, "live"), worker_row("web", 1, 1, 102, "live")],
        now,
    );
    (v, now)
}

fn state(app: &str, generation: u64, s: &str) -> Signal {
    Signal::State { app: app.into(), generation, state: s.into() }
}

fn ready(app: &str, generation: u64, band: u32, pid: u32) -> Signal {
    Signal::Ready { app: app.into(), generation, band, pid }
}

// --- CPU % ---

#[test]
fn cpu_percent_is_the_cpu_time_between_two_samples_over_the_wall_time_between_them() {
    let now = t0();
    // 3 s of CPU in the 30 s since it started: 10 % until a rate can be measured.
    let mut cpu = Cpu::new(3_000_000, T0_USEC - 30_000_000, now);
    let settle = 3 * SEC;
    assert_eq!(cpu.percent(now.at, settle), Some(10.0));
    // 0.25 s more in the next second: 25 %.
    cpu.observe(3_250_000, now.at + SEC);
    assert_eq!(cpu.percent(now.at + SEC, settle), Some(25.0));
    // 2 s of CPU over the next 2 s on two cores: 100 %.
    cpu.observe(5_250_000, now.at + 3 * SEC);
    assert_eq!(cpu.percent(now.at + 3 * SEC, settle), Some(100.0));
}

#[test]
fn refreshing_faster_than_the_daemon_samples_neither_halves_nor_doubles_the_rate() {
    // The daemon samples every second (a worker at 40 %); top refreshes every 0.25 s and sees
    // each sample four times.
    let now = t0();
    let mut cpu = Cpu::new(0, T0_USEC - 1_000_000, now);
    let mut seen = Vec::new();
    for tick in 1..=12u32 {
        let at = now.at + SEC * tick / 4;
        let sample = u64::from(tick / 4) * 400_000;
        cpu.observe(sample, at);
        if tick >= 4 {
            seen.push(cpu.percent(at, Duration::from_millis(1500)));
        }
    }
    assert!(seen.iter().all(|p| *p == Some(40.0)), "{seen:?}");
}

#[test]
fn an_unmoving_cpu_time_is_idle_after_settling_and_a_drop_starts_over() {
    let now = t0();
    let settle = 3 * SEC;
    let mut cpu = Cpu::new(1_000_000, T0_USEC - 10_000_000, now);
    cpu.observe(1_000_000, now.at + 2 * SEC);
    assert_eq!(cpu.percent(now.at + 2 * SEC, settle), Some(10.0), "not settled yet: the average");
    assert_eq!(cpu.percent(now.at + 4 * SEC, settle), Some(0.0), "unmoved past settle: idle");
    // Busy, then idle: the rate holds while the daemon may not have sampled again, then 0.
    cpu.observe(1_500_000, now.at + 5 * SEC);
    cpu.observe(2_000_000, now.at + 6 * SEC);
    assert_eq!(cpu.percent(now.at + 8 * SEC, settle), Some(50.0));
    assert_eq!(cpu.percent(now.at + 10 * SEC, settle), Some(0.0));
    // A daemon sampling every 5 s: the span is 5 s, and 6 s without a move is not idle yet.
    let mut slow = Cpu::new(0, T0_USEC - 1_000_000, now);
    slow.observe(1_000_000, now.at + 5 * SEC);
    slow.observe(2_000_000, now.at + 10 * SEC);
    assert_eq!(slow.percent(now.at + 16 * SEC, settle), Some(20.0));
    // A process of the tree exited: its CPU time left the sum; no rate until the next move.
    cpu.observe(200_000, now.at + 11 * SEC);
    assert_eq!(cpu.percent(now.at + 11 * SEC, settle), None);
    cpu.observe(300_000, now.at + 12 * SEC);
    assert_eq!(cpu.percent(now.at + 12 * SEC, settle), Some(10.0));
}

#[test]
fn the_view_computes_cpu_across_refreshes_of_the_same_process_only() {
    let (mut v, now) = web_live();
    let later = now.after(SEC);
    let mut busy = worker_row("web", 1, 0, 101, "live");
    busy.cpu_usec = 500_000;
    // pid 102 was reused by another process (a later start): no rate carried over.
    let mut reused = worker_row("web", 1, 1, 102, "live");
    reused.start_usec = later.usec - 1_000_000;
    reused.cpu_usec = 100_000;
    v.begin_refresh();
    v.refreshed(vec![gen_row("web", 1, "live", 2, 61)], vec![busy, reused], later);
    let cpu = |pid: u32| v.workers[&pid].cpu.as_ref().and_then(|c| c.percent(later.at, v.settle));
    assert_eq!(cpu(101), Some(50.0));
    assert_eq!(cpu(102), Some(10.0), "the new process's average since its start");
}

// --- sorting ---

#[test]
fn workers_sort_live_first_then_app_newest_generation_band_as_status_does() {
    let now = t0();
    let mut v = View::new("", SEC);
    v.refreshed(
        vec![],
        vec![
            worker_row("web", 1, 1, 11, "retired"),
            worker_row("api", 3, 0, 30, "starting"),
            worker_row("web", 2, 1, 21, "live"),
            worker_row("web", 1, 0, 10, "retired"),
            worker_row("web", 2, 0, 20, "live"),
            worker_row("api", 2, 0, 25, "live"),
            worker_row("web", 1, 2, 12, "stopping"),
        ],
        now,
    );
    let order: Vec<u32> = shown_workers(&v).into_iter().map(|w| w.3).collect();
    assert_eq!(order, [25, 20, 21, 30, 10, 11, 12]);
    let gens = vec![
        gen_row("web", 1, "retired", 2, 60),
        gen_row("web", 3, "failed", 0, 5),
        gen_row("api", 1, "stopped", 0, 90),
        gen_row("web", 2, "live", 2, 30),
        gen_row("api", 2, "live", 1, 30),
    ];
    v.refreshed(gens, vec![], now);
    let order: Vec<(String, u64)> = v.sorted_gens().into_iter().map(|(k, _)| k.clone()).collect();
    let want = [("api", 2), ("api", 1), ("web", 2), ("web", 1), ("web", 3)];
    assert_eq!(order, want.map(|(a, g)| (a.to_owned(), g)));
}

// --- signals ---

#[test]
fn a_deploy_shows_as_its_signals_arrive_before_any_refresh() {
    let (mut v, now) = web_live();
    // Generation 2 starts: its row at once, no workers yet.
    v.signal(state("web", 2, "starting"), now);
    assert_eq!(v.gens[&("web".into(), 2)].state, "starting");
    assert_eq!(v.gens[&("web".into(), 2)].workers, 0);
    assert_eq!(v.gens[&("web".into(), 2)].start_usec, Some(now.usec));
    // Its bands become ready: starting workers, RSS and the rest unknown until a refresh.
    v.signal(ready("web", 2, 0, 201), now);
    v.signal(ready("web", 2, 1, 202), now);
    assert_eq!(v.workers[&201].state, "starting");
    assert_eq!(v.workers[&201].rss, None);
    assert_eq!(v.gens[&("web".into(), 2)].workers, 2);
    // The cutover: 2 live, its workers live; 1 retired, its workers retired.
    v.signal(state("web", 2, "live"), now);
    v.signal(state("web", 1, "retired"), now);
    let rows: Vec<(u64, u32, String)> =
        shown_workers(&v).into_iter().map(|(_, g, _, pid, s)| (g, pid, s)).collect();
    let want = [(2, 201, "live"), (2, 202, "live"), (1, 101, "retired"), (1, 102, "retired")];
    assert_eq!(rows, want.map(|(g, p, s)| (g, p, s.to_owned())));
    // Each state change is an event (ready bands are not: the table shows them).
    let events: Vec<&str> = v.events.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(events, ["web: generation 2 starting", "web: generation 2 live", "web: generation 1 retired"]);
}

#[test]
fn exits_remove_workers_and_stopped_or_failed_generations_take_theirs_along() {
    let (mut v, now) = web_live();
    v.signal(
        Signal::Exited {
            app: "web".into(),
            generation: 1,
            band: 0,
            pid: 101,
            reason: "killed by SIGKILL\x1b[2J".into(),
        },
        now,
    );
    assert!(!v.workers.contains_key(&101));
    assert_eq!(v.gens[&("web".into(), 1)].workers, 1);
    let last = &v.events.back().unwrap().1;
    assert_eq!(
        last, "web: generation 1 band 0: pid 101 exited: killed by SIGKILL?[2J",
        "no escape reaches the terminal"
    );
    // An exit of a pid the view has under another generation changes nothing.
    v.signal(Signal::Exited { app: "web".into(), generation: 9, band: 1, pid: 102, reason: "x".into() }, now);
    assert!(v.workers.contains_key(&102));
    // A failed generation's workers are being stopped; a stopped generation has none left.
    v.signal(state("web", 3, "starting"), now);
    v.signal(ready("web", 3, 0, 301), now);
    v.signal(state("web", 3, "failed"), now);
    assert_eq!(v.workers[&301].state, "stopping");
    v.signal(state("web", 1, "stopped"), now);
    assert!(!v.workers.contains_key(&102));
    assert_eq!(v.gens[&("web".into(), 1)].workers, 0);
    assert_eq!(v.gens[&("web".into(), 1)].state, "stopped");
}

#[test]
fn a_replacement_ready_in_a_live_generation_takes_its_band_and_the_old_worker_is_retired() {
    let (mut v, now) = web_live();
    v.signal(ready("web", 1, 0, 111), now);
    assert_eq!(v.workers[&111].state, "live");
    assert_eq!(v.workers[&101].state, "retired");
    assert_eq!(v.workers[&102].state, "live", "another band is untouched");
    assert!(v.events.is_empty());
}

#[test]
fn held_back_is_an_event_and_other_apps_signals_are_ignored_when_one_app_is_shown() {
    let now = t0();
    let mut v = View::new("web", SEC);
    v.signal(state("api", 1, "starting"), now);
    v.signal(ready("api", 1, 0, 5), now);
    assert!(v.gens.is_empty() && v.workers.is_empty() && v.events.is_empty());
    let held = Signal::HeldBack {
        app: "web".into(),
        generation: 1,
        band: 0,
        pid: 7,
        reason: "cluster memory over 95% and only live workers left".into(),
    };
    v.signal(held, now);
    assert_eq!(
        v.events.back().unwrap().1,
        "web: generation 1 band 0: pid 7 held back: cluster memory over 95% and only live workers left"
    );
}

#[test]
fn a_refresh_in_flight_when_a_signal_arrived_does_not_undo_it() {
    let (mut v, now) = web_live();
    v.begin_refresh();
    // While the refresh is on its way: generation 2 goes live, 1 retires.
    v.signal(state("web", 2, "starting"), now);
    v.signal(ready("web", 2, 0, 201), now);
    v.signal(state("web", 2, "live"), now);
    v.signal(state("web", 1, "retired"), now);
    // The reply was computed before all that.
    v.refreshed(
        vec![gen_row("web", 1, "live", 2, 60), gen_row("web", 2, "starting", 1, 0)],
        vec![
            worker_row("web", 1, 0, 101, "live"),
            worker_row("web", 1, 1, 102, "live"),
            worker_row("web", 2, 0, 201, "starting"),
        ],
        now,
    );
    assert_eq!(v.gens[&("web".into(), 2)].state, "live");
    assert_eq!(v.gens[&("web".into(), 1)].state, "retired");
    assert_eq!(v.workers[&201].state, "live");
    assert_eq!(v.workers[&201].rss, Some(12 << 20), "the reply's figures are kept");
    assert_eq!(v.workers[&101].state, "retired");
    assert_eq!(v.events.len(), 3, "replayed signals are not events twice");
    // The next refresh, with nothing in flight meanwhile, is taken as it is.
    v.begin_refresh();
    v.refreshed(vec![gen_row("web", 2, "live", 1, 1)], vec![worker_row("web", 2, 0, 201, "live")], now);
    assert_eq!(v.gens.len(), 1);
    assert_eq!(v.workers.len(), 1);
}

// --- rendering ---

/// A view of two apps after a deploy of web, with CPU figures.
fn busy_view() -> (View, Now) {
    let now = t0();
    let mut v = View::new("", SEC);
    let gens = vec![
        gen_row("web", 2, "live", 2, 30),
        gen_row("web", 1, "retired", 2, 3600),
        gen_row("chat-backend", 1, "live", 1, 7200),
    ];
    let mut workers = vec![
        worker_row("web", 2, 0, 4201, "live"),
        worker_row("web", 2, 1, 4202, "live"),
        worker_row("web", 1, 0, 3101, "retired"),
        worker_row("web", 1, 1, 3102, "retired"),
        worker_row("chat-backend", 1, 0, 999, "live"),
    ];
    workers[2].nice = 10;
    workers[3].nice = 10;
    workers[4].rss = 1536 << 20;
    v.refreshed(gens.clone(), workers.clone(), now);
    let later = now.after(SEC);
    workers[0].cpu_usec = 125_000;
    workers[4].cpu_usec = 1_000_000;
    v.refreshed(gens, workers, later);
    v.signal(state("web", 1, "retired"), later);
    (v, later)
}

#[test]
fn the_frame_at_a_fixed_width_reads_as_expected() {
    let (v, now) = busy_view();
    let frame = text(&v.render(Some((100, 24)), now));
    let want = [
        "ipclusterctl top: every app: 3 running generations, 5 workers (3 live)            every 1s · q quits",
        "",
        "APP          GEN STATE   WORKERS   AGE SCOPE",
        "chat-backend   1 live          1    2h ipcluster-chat-backend-1.scope",
        "web            2 live          2   31s ipcluster-web-2.scope",
        "web            1 retired       2 60min ipcluster-web-1.scope",
        "",
        "APP          GEN BAND  PID STATE    RSS  CPU% NICE AGE PORTS",
        "chat-backend   1    0  999 live    1.5G 100.0    0 31s 80->20999",
        "web            2    0 4201 live     12M  12.5    0 31s 80->20201",
        "web            2    1 4202 live     12M   0.0    0 31s 80->20202",
        "web            1    0 3101 retired  12M   0.0   10 31s 80->20101",
        "web            1    1 3102 retired  12M   0.0   10 31s 80->20102",
        "",
        "EVENTS",
        "   0s ago  web: generation 1 retired",
    ];
    assert_eq!(frame, want, "\n{}", frame.join("\n"));
}

#[test]
fn a_narrow_terminal_drops_the_least_needed_columns_and_no_line_is_wider() {
    let (v, now) = busy_view();
    for width in [20, 40, 52, 60, 80, 160] {
        let frame = v.render(Some((width, 40)), now);
        for line in &frame {
            assert!(line.text().chars().count() <= width, "{width}: {:?}", line.text());
        }
        let frame = text(&frame);
        let heads = frame
            .iter()
            .filter(|l| l.contains("STATE"))
            .nth(1)
            .unwrap_or_else(|| panic!("{width}: {}", frame.join("\n")));
        let cols: Vec<&str> = heads.split_whitespace().collect();
        match width {
            160 | 80 => assert_eq!(
                cols,
                ["APP", "GEN", "BAND", "PID", "STATE", "RSS", "CPU%", "NICE", "AGE", "PORTS"]
            ),
            60 => assert_eq!(cols, ["APP", "GEN", "BAND", "PID", "STATE", "RSS", "CPU%", "NICE", "AGE"]),
            52 => assert_eq!(cols, ["APP", "GEN", "BAND", "PID", "STATE", "RSS", "CPU%", "AGE"]),
            40 => assert_eq!(cols, ["APP", "GEN", "PID", "STATE", "RSS", "CPU%"]),
            _ => assert_eq!(cols, ["GEN", "STATE"]),
        }
    }
}

#[test]
fn a_short_terminal_shows_what_fits_and_says_how_many_more() {
    let now = t0();
    let mut v = View::new("web", SEC);
    let workers: Vec<WorkerRow> = (0..64).map(|b| worker_row("web", 1, b, 1000 + b, "live")).collect();
    v.refreshed(vec![gen_row("web", 1, "live", 64, 10)], workers, now);
    for height in [3, 8, 24, 40] {
        let frame = text(&v.render(Some((80, height)), now));
        assert!(frame.len() <= height, "{height}: {frame:#?}");
        if height >= 8 {
            assert!(frame.iter().any(|l| l.ends_with("64 10s ipcluster-web-1.scope")), "{frame:#?}");
            let last = frame.last().unwrap();
            let shown = frame.iter().filter(|l| l.contains(" live ") && l.contains("->")).count();
            assert_eq!(last, &format!("… {} more workers", 64 - shown), "{frame:#?}");
            assert_eq!(frame.len(), height, "every row used: {frame:#?}");
        }
    }
}

#[test]
fn a_failing_refresh_is_said_under_the_title_and_the_rows_stay() {
    let (mut v, now) = busy_view();
    v.begin_refresh();
    v.refresh_failed("ipclusterd is not running (systemctl start ipclusterd)".into(), now);
    let later = now.after(5 * SEC);
    v.refresh_failed("ipclusterd is not running (systemctl start ipclusterd)".into(), later);
    let frame = v.render(Some((120, 30)), later);
    assert_eq!(
        frame[1].text(),
        "ipclusterd is not running (systemctl start ipclusterd), for 5s (last update 5s ago)"
    );
    assert_eq!(frame[1].0[0].style, Style::Error);
    assert!(text(&frame).iter().any(|l| l.contains("4201")));
    v.begin_refresh();
    v.refreshed(vec![], vec![], later);
    assert!(!text(&v.render(Some((120, 30)), later))[1].contains("not running"));
}

#[test]
fn states_are_styled_and_the_snapshot_has_the_whole_tables_without_a_title() {
    let (v, now) = busy_view();
    let frame = v.render(Some((160, 40)), now);
    let styles: Vec<Style> = frame.iter().flat_map(|l| l.0.iter()).map(|s| s.style).collect();
    for s in [Style::Title, Style::Header, Style::Live, Style::Retired, Style::Dim] {
        assert!(styles.contains(&s), "{s:?} missing");
    }
    let snapshot = text(&v.render(None, now));
    assert!(snapshot[0].starts_with("APP") && snapshot[0].ends_with("SCOPE"), "{snapshot:#?}");
    assert!(!snapshot.iter().any(|l| l.contains("q quits") || l.contains("EVENTS")));
    assert!(snapshot.iter().any(|l| l.contains("PORTS")));
    assert_eq!(snapshot.iter().filter(|l| l.contains("->")).count(), 5);
}

#[test]
fn sizes_and_intervals_read_shortly() {
    assert_eq!(bytes(0), "0K");
    assert_eq!(bytes(980 << 10), "980K");
    assert_eq!(bytes(1000 << 10), "1.0M");
    assert_eq!(bytes(12 << 20), "12M");
    assert_eq!(bytes((3 << 30) / 2), "1.5G");
    assert_eq!(seconds(SEC), "1s");
    assert_eq!(seconds(Duration::from_millis(250)), "0.25s");
    assert_eq!(cut("chat-backend", 6), "chat-…");
}

#[test]
fn sessions_are_a_column_only_when_an_app_keeps_them() {
    let (mut v, now) = web_live();
    v.refreshed(
        vec![gen_row("web", 2, "live", 2, 10), gen_row("web", 1, "draining", 2, 60)],
        vec![worker_row("web", 2, 0, 201, "live"), worker_row("web", 1, 0, 101, "retired")],
        now,
    );
    let header = |v: &View| text(&v.render(None, now)).into_iter().find(|l| l.starts_with("APP ")).unwrap();
    assert!(!header(&v).contains("SESSIONS"), "{}", header(&v));
    v.sessions(&[
        SessionRow { app: "web".into(), generation: 1, records: 17 },
        SessionRow { app: "web".into(), generation: 2, records: 3 },
    ]);
    let lines = text(&v.render(None, now));
    assert!(header(&v).contains("SESSIONS"), "{lines:#?}");
    let row = |g: &str| lines.iter().find(|l| l.starts_with("web") && l.contains(g)).unwrap().clone();
    assert!(row("draining").split_whitespace().any(|c| c == "17"), "{lines:#?}");
    assert!(row("ipcluster-web-2.scope").split_whitespace().any(|c| c == "3"), "{lines:#?}");
}
