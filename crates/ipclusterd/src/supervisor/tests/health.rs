//! Crash respawns, and the memory, watchdog and cluster watermark policies.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_crashing_band_is_respawned_with_doubling_delays_and_served_by_a_neighbour_meanwhile() {
    let h = start("backoff", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let mut delays = Vec::new();
    for _ in 0..4 {
        let victim = h.worker("web", 1, 1).await;
        let neighbour = h.worker("web", 1, 0).await;
        h.procs.exit(victim.pid, Exit::Signal(9));
        let crashed = tokio::time::Instant::now();
        h.until("band 1 to fall back to band 0", Duration::from_millis(50), async |h| {
            h.routed("web") == [neighbour.ports[0].1, neighbour.ports[0].1]
        })
        .await;
        h.until("band 1's replacement", Duration::from_secs(5), async |h| {
            h.workers("web")
                .await
                .iter()
                .any(|w| w.band == 1 && w.pid != victim.pid && w.state == WorkerState::Live)
        })
        .await;
        let (pid, at) = *h.procs.spawned().last().unwrap();
        assert_ne!(pid, victim.pid);
        delays.push((at - crashed).as_millis());
    }
    assert_eq!(delays, [100, 200, 400, 800]);
    let metrics = h.handle.snapshot().await.unwrap().metrics.clone();
    assert_eq!(metrics.restarts[&("web".to_owned(), 1)], 4);
}

#[tokio::test(start_paused = true)]
async fn a_worker_over_worker_memory_max_is_replaced_then_retired_and_the_rate_limit_holds_the_next() {
    let mut h = start(
        "memory",
        &[("web", app("\"serve\"", "worker_memory_max = \"40M\"\nretire_rate = \"1/1h\"\n"))],
    )
    .await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let old = h.worker("web", 1, 0).await;
    h.procs.set_rss(old.pid, 64 << 20);
    h.until("band 0's replacement to take over", Duration::from_secs(2), async |h| {
        h.worker("web", 1, 0).await.pid != old.pid
    })
    .await;
    let new = h.worker("web", 1, 0).await;
    assert_eq!(h.routed("web")[0], new.ports[0].1, "band 0 moved to the replacement");
    let rows = h.workers("web").await;
    let retired = rows.iter().find(|w| w.pid == old.pid).unwrap();
    assert_eq!((retired.state, retired.nice), (WorkerState::Retired, 5));
    // A second offender inside the hour is held back, and said so.
    let band1 = h.worker("web", 1, 1).await;
    h.procs.set_rss(band1.pid, 64 << 20);
    h.sleep(Duration::from_secs(1)).await;
    assert_eq!(h.worker("web", 1, 1).await.pid, band1.pid, "not replaced");
    let held = h.held_back();
    assert!(held.iter().any(|r| r.contains("held back by retire_rate")), "{held:?}");
    let metrics = h.handle.snapshot().await.unwrap().metrics.clone();
    assert_eq!(
        metrics.policy_actions[&("web".to_owned(), crate::supervisor::PolicyAction::MemoryReplacement)],
        1
    );
    assert!(metrics.policy_actions[&("web".to_owned(), crate::supervisor::PolicyAction::HeldBack)] >= 1);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_stops_sending_watchdog_is_replaced_and_then_stopped() {
    let h = start("watchdog", &[("web", app("\"notify\"", "ready = \"notify\"\nwatchdog = \"1s\"\n"))]).await;
    let deploy = h.spawn_deploy("web");
    h.until("both workers to spawn", Duration::from_secs(1), async |h| h.procs.spawned().len() == 2).await;
    let pids: Vec<u32> = h.procs.spawned().iter().map(|(p, _)| *p).collect();
    let ready = Message { ready: true, watchdog: false };
    for pid in &pids {
        h.notify(*pid, ready.clone()).await;
    }
    assert_eq!(deploy.await.unwrap(), Ok(1));
    let (band0, band1) = (h.worker("web", 1, 0).await, h.worker("web", 1, 1).await);
    // Band 1 keeps pinging; band 0 falls silent.
    let ping = Message { ready: false, watchdog: true };
    for _ in 0..8 {
        h.sleep(Duration::from_millis(250)).await;
        h.notify(band1.pid, ping.clone()).await;
    }
    let spawned = h.procs.spawned();
    assert_eq!(spawned.len(), 3, "one replacement, for band 0 only");
    h.notify(spawned[2].0, ready).await;
    h.until("band 0's replacement to take over", Duration::from_secs(1), async |h| {
        h.worker("web", 1, 0).await.pid == spawned[2].0
    })
    .await;
    assert_eq!(h.worker("web", 1, 1).await.pid, band1.pid);
    // Still silent, now retired: stopped.
    h.until("the hung worker to be stopped", Duration::from_secs(3), async |h| !h.procs.alive(band0.pid))
        .await;
    assert!(h.procs.signals().contains(&(band0.pid, libc::SIGTERM)));
}

#[tokio::test(start_paused = true)]
async fn cluster_watermarks_stop_then_kill_retired_workers_most_killable_first() {
    const MIB: u64 = 1 << 20;
    let h = start("cluster", &[("web", app("\"serve\"", "cluster_memory_max = \"1000M\"\n"))]).await;
    for g in 1..=3 {
        assert_eq!(h.deploy("web").await, Ok(g));
    }
    let rows = h.workers("web").await;
    let pid = |g: u64, band: u32| rows.iter().find(|w| w.generation == g && w.band == band).unwrap().pid;
    // Budget 1000 MiB: stop retired workers over 800, kill them over 950. Live: 2 × 60 MiB.
    // Retired: big 500 and mid 250 without connections, held 450 with one, small 10.
    let (big, held, mid, small) = (pid(1, 0), pid(1, 1), pid(2, 0), pid(2, 1));
    for band in 0..2 {
        h.procs.set_rss(pid(3, band), 60 * MIB);
    }
    h.procs.set_rss(big, 500 * MIB);
    h.procs.set_rss(held, 450 * MIB);
    h.procs.set_connections(held, 1);
    h.procs.set_rss(mid, 250 * MIB);
    h.procs.set_rss(small, 10 * MIB);
    // 1330 > 950: kill big (fewest connections, largest) → 830 > 800: stop mid → 580. Held is
    // larger than mid but has a connection: it stays, and so does small (no more is needed).
    h.until("the watermarks to act", Duration::from_secs(2), async |h| {
        !h.procs.alive(big) && !h.procs.alive(mid)
    })
    .await;
    assert!(h.procs.signals().contains(&(big, libc::SIGKILL)));
    assert!(
        h.procs.signals().contains(&(mid, libc::SIGTERM))
            && !h.procs.signals().contains(&(mid, libc::SIGKILL))
    );
    h.sleep(Duration::from_secs(1)).await;
    assert!(h.procs.alive(held) && h.procs.alive(small), "no more than needed, connections last");
    assert!(h.procs.alive(pid(3, 0)) && h.procs.alive(pid(3, 1)), "live workers untouched");
}

/// Issue 21, item 3, and issue 25's kill -9 tail: a crashed live worker's queued connections
/// are relayed from the moment of the crash, not once the rules changed; the drain is told to
/// finish once they have; and the dead worker's port stays guarded from other hosts until its
/// drain has closed the socket.
#[tokio::test(start_paused = true)]
async fn a_crashed_workers_port_is_drained_at_once_and_guarded_until_its_socket_closes() {
    let h = start("drain", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let victim = h.worker("web", 1, 1).await;
    let neighbour = h.worker("web", 1, 0).await;
    let dead = victim.ports[0].1;
    // Each rule change now takes 500 ms.
    *h.router.delay.lock().unwrap() = Duration::from_millis(500);
    h.procs.exit(victim.pid, Exit::Signal(9));
    h.until("the drain of the dead port", Duration::from_millis(100), async |h| {
        !h.relay.drains.lock().unwrap().is_empty()
    })
    .await;
    let (app, port, target) = h.relay.drains.lock().unwrap()[0].clone();
    assert_eq!((app.as_str(), port, target.port()), ("web", dead, neighbour.ports[0].1));
    assert_eq!(h.routed("web")[1], dead, "the rules have not changed yet: the drain came first");
    assert!(h.relay.settle().is_empty(), "not told to finish before the rules changed");
    h.until("band 1 to fall back to band 0", Duration::from_secs(1), async |h| {
        h.routed("web") == [neighbour.ports[0].1, neighbour.ports[0].1]
    })
    .await;
    assert!(h.router.last()[0].guarded.contains(&dead), "guarded while the drain holds it");
    h.sleep(Duration::from_millis(1500)).await;
    assert!(h.router.last()[0].guarded.contains(&dead), "still guarded: its socket is open");
    assert_eq!(h.relay.settle(), [dead], "told to finish once the rules changed");
    h.until("the dead port's guard to go", Duration::from_secs(3), async |h| {
        !h.router.last()[0].guarded.contains(&dead)
    })
    .await;
}

/// A sampling round changes only the numbers: the snapshot after it shares the workers' rows
/// with the one before (no row is built again), and ListWorkers shows the new numbers; a
/// worker whose row changes (a crash and its respawn) makes new rows.
#[tokio::test(start_paused = true)]
async fn a_sampling_round_shares_the_rows_and_shows_new_numbers_and_a_changed_worker_rebuilds_them() {
    let h = start("rows", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let w = h.worker("web", 1, 0).await;
    h.sleep(Duration::from_secs(1)).await;
    let before = h.handle.snapshot().await.unwrap();
    h.procs.set_rss(w.pid, 77 << 20);
    h.until("the new RSS in ListWorkers", Duration::from_secs(2), async |h| {
        h.worker("web", 1, 0).await.rss == 77 << 20
    })
    .await;
    let after = h.handle.snapshot().await.unwrap();
    assert!(!Arc::ptr_eq(&before, &after), "a new snapshot was published");
    assert!(Arc::ptr_eq(&before.rows, &after.rows), "its rows are the ones before");
    assert!(after.rows.iter().all(|r| r.rss == 0 && r.cpu_usec == 0), "rows hold no numbers");
    h.procs.exit(w.pid, Exit::Signal(9));
    h.until("band 0's replacement", Duration::from_secs(5), async |h| {
        h.workers("web").await.iter().any(|x| x.band == 0 && x.pid != w.pid && x.state == WorkerState::Live)
    })
    .await;
    let respawned = h.handle.snapshot().await.unwrap();
    assert!(!Arc::ptr_eq(&before.rows, &respawned.rows), "a changed worker makes new rows");
}
