use super::*;

fn event(fault: Fault, start: Secs, end: Secs, hit: Hit) -> FaultEvent {
    FaultEvent { fault, start, end: Some(end), hit }
}

fn open(app: &str, band: u32, start: Secs, end: Secs) -> Failure {
    Failure { load: Load::Open, app: app.into(), band, worker: None, start, end, what: "refused".into() }
}

fn on(load: Load, app: &str, worker: (u32, u64), start: Secs, end: Secs) -> Failure {
    Failure { load, app: app.into(), band: 1, worker: Some(worker), start, end, what: "reset".into() }
}

fn world() -> World {
    World { nat_apps: vec!["demo".into(), "chat".into()], ..World::default() }
}

#[test]
fn quiet_means_no_fault_lasts_and_none_ended_within_the_settling_time() {
    let faults = vec![
        event(Fault::Deploy, 10.0, 12.0, Hit::ok("")),
        FaultEvent { fault: Fault::Rollback, start: 30.0, end: None, hit: Hit::ok("") },
    ];
    assert!(quiet(9.9, &faults));
    assert!(!quiet(11.0, &faults) && !quiet(16.9, &faults));
    assert!(quiet(17.1, &faults));
    assert!(!quiet(31.0, &faults) && !quiet(100.0, &faults), "a fault still running");
    assert_eq!(last_faults(20.0, &faults, 3), ["   10.0 s  deploy: "]);
}

#[test]
fn a_kill_explains_requests_in_flight_to_its_band_and_its_workers_connections_only() {
    let kill = event(Fault::WorkerKill, 50.0, 50.1, Hit::ok("killed").on("demo", 2, 700, 3));
    let faults = [kill];
    let w = world();
    assert_eq!(attribute(&open("demo", 2, 49.5, 50.2), &faults, &w), Cause::KilledWorker);
    assert_eq!(attribute(&open("demo", 2, 52.0, 52.1), &faults, &w), Cause::Unexplained, "a new one later");
    assert_eq!(attribute(&open("demo", 1, 49.5, 50.2), &faults, &w), Cause::Unexplained, "another band");
    assert_eq!(attribute(&open("node", 2, 49.5, 50.2), &faults, &w), Cause::Unexplained, "another app");
    let ka = on(Load::KeepAlive, "demo", (700, 3), 55.0, 55.0);
    assert_eq!(attribute(&ka, &faults, &w), Cause::KilledWorker, "its connection, noticed later");
    let other = on(Load::KeepAlive, "demo", (700, 4), 55.0, 55.0);
    assert_eq!(attribute(&other, &faults, &w), Cause::Unexplained, "a reused pid of another generation");
    let before = on(Load::KeepAlive, "demo", (700, 3), 40.0, 40.0);
    assert_eq!(attribute(&before, &faults, &w), Cause::Unexplained, "before the kill");
}

#[test]
fn a_nat_flush_explains_new_nat_connections_until_its_repair_and_nothing_in_socket_mode() {
    let faults = [event(Fault::NatFlush, 100.0, 102.5, Hit::ok("repaired in 2.5 s"))];
    let w = world();
    assert_eq!(attribute(&open("demo", 0, 100.1, 100.1), &faults, &w), Cause::NatFlush);
    assert_eq!(attribute(&open("demo", 3, 102.4, 102.6), &faults, &w), Cause::NatFlush);
    assert_eq!(
        attribute(&open("demo", 3, 104.0, 104.0), &faults, &w),
        Cause::Unexplained,
        "after the repair"
    );
    assert_eq!(attribute(&open("node", 0, 101.0, 101.0), &faults, &w), Cause::Unexplained, "socket mode");
    let session = on(Load::Session, "chat", (900, 2), 106.0, 106.0);
    assert_eq!(attribute(&session, &faults, &w), Cause::NatFlush, "a session notices a little later");
}

#[test]
fn a_sigstop_explains_its_band_and_worker_until_the_replacement() {
    let faults = [event(Fault::WorkerStop, 200.0, 204.0, Hit::ok("replaced").on("demo", 1, 800, 5))];
    let w = world();
    assert_eq!(attribute(&open("demo", 1, 199.0, 204.5), &faults, &w), Cause::StoppedWorker, "timed out");
    assert_eq!(attribute(&open("demo", 1, 206.0, 206.0), &faults, &w), Cause::Unexplained);
    assert_eq!(
        attribute(&on(Load::KeepAlive, "demo", (800, 5), 203.0, 208.0), &faults, &w),
        Cause::StoppedWorker
    );
}

#[test]
fn kill_retired_explains_connections_and_sessions_on_workers_retired_before_it() {
    let faults = [event(Fault::KillRetired, 300.0, 300.2, Hit::ok("stopped 4"))];
    let mut w = world();
    w.workers.note(290.0, [(10, 1, "live"), (11, 2, "live")]);
    w.workers.note(295.0, [(10, 1, "retired"), (11, 2, "live")]);
    w.note_draining("chat", 7, 296.0);
    assert_eq!(w.workers.retired_at((10, 1)), Some(295.0));
    assert_eq!(
        attribute(&on(Load::KeepAlive, "demo", (10, 1), 301.0, 301.0), &faults, &w),
        Cause::RetiredStopped
    );
    assert_eq!(
        attribute(&on(Load::KeepAlive, "demo", (11, 2), 301.0, 301.0), &faults, &w),
        Cause::Unexplained,
        "live"
    );
    assert_eq!(
        attribute(&on(Load::Session, "chat", (12, 7), 300.5, 300.5), &faults, &w),
        Cause::RetiredStopped
    );
    assert_eq!(
        attribute(&on(Load::KeepAlive, "demo", (10, 1), 340.0, 340.0), &faults, &w),
        Cause::Unexplained,
        "long after"
    );
}

#[test]
fn a_deploy_beyond_max_draining_explains_the_oldest_draining_generations_sessions_only() {
    let faults = [event(Fault::Deploy, 400.0, 401.0, Hit { app: Some("chat".into()), ..Hit::ok("live") })];
    let mut w = world();
    for t in [396.0, 397.0, 398.0, 399.0, 400.0] {
        w.note_draining("chat", 3, t);
        w.note_draining("chat", 4, t);
    }
    let lost = |g| on(Load::Session, "chat", (50, g), 401.2, 401.2);
    assert_eq!(attribute(&lost(3), &faults, &w), Cause::DrainingLimit);
    assert_eq!(attribute(&lost(4), &faults, &w), Cause::Unexplained, "not the oldest");
    assert_eq!(attribute(&lost(5), &faults, &w), Cause::Unexplained, "the live one");
    let mut one = world();
    one.note_draining("chat", 3, 399.0);
    assert_eq!(attribute(&lost(3), &faults, &one), Cause::Unexplained, "one draining: none is cut");
}

#[test]
fn bounds_flag_slow_repairs_and_slow_watchdogs() {
    let faults = [
        event(Fault::NatFlush, 0.0, 4.0, Hit::ok("")),
        event(Fault::NatFlush, 10.0, 16.0, Hit::ok("")),
        event(Fault::WorkerStop, 20.0, 29.0, Hit::ok("")),
        event(Fault::WorkerStop, 40.0, 51.0, Hit::ok("")),
        event(Fault::Deploy, 60.0, 90.0, Hit::ok("")),
    ];
    let broken: Vec<(Secs, Secs, Secs)> =
        broken_bounds(&faults).iter().map(|(e, t, b)| (e.start, *t, *b)).collect();
    assert_eq!(broken, [(10.0, 6.0, NAT_REPAIR_BOUND), (40.0, 11.0, STOP_BOUND)]);
}

#[test]
fn the_slope_is_within_each_daemon_process_and_leaves_out_what_the_workers_explain() {
    // Two processes, each flat, the second higher: no growth.
    let flat: Vec<DaemonSample> = (0..100)
        .map(|i| (if i < 50 { 1 } else { 2 }, i as f64, if i < 50 { 10.0 } else { 30.0 }, 12.0))
        .collect();
    assert!(slope_per_minute(&flat).unwrap().abs() < 1e-9);
    // Growing by 1 a second in each: 60 a minute.
    let growing: Vec<DaemonSample> =
        (0..100).map(|i| (if i < 50 { 1 } else { 2 }, i as f64, (i % 50) as f64 + 100.0, 12.0)).collect();
    assert!((slope_per_minute(&growing).unwrap() - 60.0).abs() < 1e-9);
    // Memory that follows the workers (deploys add them over time, KillRetired takes them
    // away) is not growth; on top of it, 0.5 a second is.
    let workers = |i: usize| 12.0 + ((i % 30) / 5 * 4) as f64;
    let state: Vec<DaemonSample> =
        (0..120).map(|i| (1, i as f64, 8000.0 + 40.0 * workers(i), workers(i))).collect();
    assert!(slope_per_minute(&state).unwrap().abs() < 1e-6, "{:?}", slope_per_minute(&state));
    let leak: Vec<DaemonSample> =
        (0..120).map(|i| (1, i as f64, 8000.0 + 40.0 * workers(i) + 0.5 * i as f64, workers(i))).collect();
    assert!((slope_per_minute(&leak).unwrap() - 30.0).abs() < 1e-6);
    assert_eq!(slope_per_minute(&[(1, 0.0, 1.0, 4.0)]), None);
}

#[test]
fn repeated_journal_lines_are_counted_per_minute_and_panics_are_recognised() {
    let mut lines: Vec<(Secs, String)> = (0..25).map(|i| (i as f64, "same".to_owned())).collect();
    lines.extend((0..25).map(|i| (60.0 + i as f64 * 2.0, "spread".to_owned())));
    lines.extend((0..15).map(|i| (120.0 + i as f64, "same".to_owned())));
    assert_eq!(repeated_lines(&lines, 20), [(0, "same".to_owned(), 25), (1, "spread".to_owned(), 25)]);
    assert!(is_panic("thread 'main' panicked at crates/ipclusterd/src/lib.rs:10:5:"));
    let name = super::super::inject::FORGED_NAME;
    assert!(raw_input(&format!("Deploy of {name} by uid 0")).is_some());
    assert_eq!(raw_input(&format!("Deploy of {name:?} by uid 0")), None, "quoted and escaped is fine");
    assert!(raw_input(&format!("Deploy of {} by uid 0", "a".repeat(10_000))).is_some());
    assert_eq!(raw_input(&format!("invalid app name {:?}… (10000 characters)", "a".repeat(64))), None);
    assert!(!is_panic("worker pid 12 exited: killed by signal 9"));
}

#[test]
fn percentiles_of_unsorted_values() {
    let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
    assert_eq!(percentile(&mut v, 99.0), 99.0);
    assert_eq!(percentile(&mut v, 50.0), 51.0);
    assert_eq!(percentile(&mut [], 99.0), 0.0);
}
