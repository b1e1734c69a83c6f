//! Session affinity against the fakes: draining after a cutover, the rules it makes, counting,
//! drained generations stopping, max_draining, the actions that cut sessions, rollback and
//! adoption.

use super::*;

fn sticky(extra: &str) -> String {
    app("\"serve\"", &format!("session_affinity = \"90s\"\n{extra}"))
}

impl Harness {
    async fn gen_state(&self, app: &str, g: u64) -> Option<GenState> {
        let snap = self.handle.snapshot().await.unwrap();
        snap.generations.iter().find(|x| x.app == app && x.generation == g).map(|x| x.state)
    }

    async fn records(&self, app: &str, g: u64) -> Option<u32> {
        let snap = self.handle.snapshot().await.unwrap();
        snap.sessions.iter().find(|s| s.app == app && s.generation == g).map(|s| s.records)
    }

    /// The kernel's records, as the fake router reports them: (slot, count).
    fn set_records(&self, app: &str, records: &[(u8, u32)]) {
        let mut s = self.router.sessions.lock().unwrap();
        s.retain(|(a, _), _| a.as_str() != app);
        for (slot, n) in records {
            s.insert((AppName::new(app).unwrap(), *slot), *n);
        }
    }

    /// The session part of `app`'s rules now.
    fn sessions_route(&self, app: &str) -> Option<ipcluster_core::routing::Sessions> {
        self.router.last().into_iter().find(|r| r.app.as_str() == app).and_then(|r| r.sessions)
    }
}

#[tokio::test(start_paused = true)]
async fn a_deploy_leaves_the_previous_generation_draining_with_its_clients() {
    let h = start("sessions-drain", &[("web", sticky(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let s = h.sessions_route("web").expect("session affinity in the rules");
    assert_eq!((s.timeout, s.record.clone(), s.draining.len()), (90, vec![0, 0], 0));
    let first: Vec<u16> = (0..2).map(|b| h.routed("web")[b]).collect();
    assert_eq!(h.deploy("web").await, Ok(2));
    assert_eq!(h.gen_state("web", 1).await, Some(GenState::Draining));
    let s = h.sessions_route("web").unwrap();
    assert_eq!(s.record, [1, 1], "generation 2 records new clients in its own set (slot 1)");
    assert_eq!(s.draining.len(), 1);
    assert_eq!(s.draining[0].slot, 0);
    let kept: Vec<u16> = s.draining[0].bands.iter().map(|b| b.as_ref().unwrap()[0]).collect();
    assert_eq!(kept, first, "generation 1's clients still reach its workers of their bands");
    // The records are counted at each reconcile and published.
    h.set_records("web", &[(0, 7), (1, 3)]);
    h.until("the counts", Duration::from_secs(5), async |h| h.records("web", 1).await == Some(7)).await;
    assert_eq!(h.records("web", 2).await, Some(3));
    // Retired workers of a draining generation are not taken for dead bands.
    assert!(
        h.workers("web").await.iter().filter(|w| w.generation == 1).all(|w| w.state == WorkerState::Retired)
    );
}

/// `web` with session affinity after two deploys: generation 2 live, generation 1 draining
/// with `records` records in its slot (0).
async fn first_draining(name: &str, records: u32) -> Harness {
    let h = start(name, &[("web", sticky(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    h.set_records("web", &[(0, records)]);
    h
}

#[tokio::test(start_paused = true)]
async fn a_draining_generation_with_no_record_and_no_connection_is_stopped() {
    let h = start("sessions-drained", &[("web", sticky(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    let old: Vec<u32> = h.workers("web").await.iter().filter(|w| w.generation == 1).map(|w| w.pid).collect();
    h.set_records("web", &[(0, 2)]);
    h.sleep(Duration::from_secs(5)).await;
    assert_eq!(h.gen_state("web", 1).await, Some(GenState::Draining), "records left: it drains");
    // No record, but a connection still open: it keeps draining.
    h.set_records("web", &[]);
    h.procs.set_connections(old[0], 1);
    h.sleep(Duration::from_secs(5)).await;
    assert_eq!(h.gen_state("web", 1).await, Some(GenState::Draining), "a connection left: it drains");
    h.procs.set_connections(old[0], 0);
    h.until("generation 1 to stop", Duration::from_secs(10), async |h| {
        h.gen_state("web", 1).await == Some(GenState::Stopped)
    })
    .await;
    h.until("its clients to go to the live generation", Duration::from_secs(1), async |h| {
        h.sessions_route("web").unwrap().draining.is_empty()
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn at_most_max_draining_generations_drain_and_the_oldest_is_cut_first() {
    let h = start("sessions-max", &[("web", sticky("max_draining = 1\n"))]).await;
    for g in 1..=3 {
        assert_eq!(h.deploy("web").await, Ok(g));
    }
    assert_eq!(h.gen_state("web", 2).await, Some(GenState::Draining));
    assert_eq!(h.gen_state("web", 1).await, Some(GenState::Retired), "cut: its clients go to the live one");
    let s = h.sessions_route("web").unwrap();
    assert_eq!(s.draining.iter().map(|d| d.slot).collect::<Vec<_>>(), [1], "generation 2 only");
    assert_eq!(s.record, [2, 2]);
    // Generation 1's slot is free again once it stopped: a new generation may take it.
    assert_eq!(h.kill_retired("web").await.map(|n| n >= 2), Ok(true));
}

#[tokio::test(start_paused = true)]
async fn kill_retired_and_retire_generation_act_at_once_on_draining_generations() {
    let h = start("sessions-cut", &[("web", sticky(""))]).await;
    for g in 1..=3 {
        assert_eq!(h.deploy("web").await, Ok(g));
    }
    h.set_records("web", &[(0, 4), (1, 4)]);
    // RetireGeneration of a draining generation: its clients go to the live one now.
    let r = h
        .handle
        .call(|reply| Command::Retire { app: "web".into(), generation: 2, auth: Authorized::test(), reply })
        .await;
    assert_eq!(r, Ok(()));
    assert_eq!(h.gen_state("web", 2).await, Some(GenState::Retired));
    let slots = |h: &Harness| -> Vec<u8> {
        h.sessions_route("web").unwrap().draining.iter().map(|d| d.slot).collect()
    };
    assert_eq!(slots(&h), [0], "the rules dropped generation 2 before the call returned");
    // KillRetired stops draining workers too, after their clients went to the live one (in the
    // rules before the call returns); the generation stops with its workers.
    assert_eq!(h.kill_retired("web").await, Ok(4));
    assert_eq!(slots(&h), [0u8; 0], "the rules dropped generation 1 before the call returned");
    h.until("generation 1 to stop", Duration::from_secs(5), async |h| {
        h.gen_state("web", 1).await == Some(GenState::Stopped)
    })
    .await;
}

/// KillRetired (and SIGUSR1) change the rules before they tell a draining generation's workers
/// to stop: until the change is in force, its clients' new connections still go to those
/// workers, which must then still take them (the soak saw refused connections in between).
#[tokio::test(start_paused = true)]
async fn kill_retired_sends_a_draining_generations_clients_away_before_its_workers_stop() {
    let h = first_draining("sessions-cut-order", 4).await;
    let (old, ports): (Vec<u32>, Vec<u16>) = h
        .workers("web")
        .await
        .into_iter()
        .filter(|w| w.generation == 1)
        .map(|w| (w.pid, w.ports[0].1))
        .unzip();
    assert_eq!(old.len(), 2);
    let before = h.procs.signals().len();
    let signalled = |h: &Harness| h.procs.signals()[before..].iter().filter(|(p, _)| old.contains(p)).count();
    // Each rule change now takes 500 ms.
    *h.router.delay.lock().unwrap() = Duration::from_millis(500);
    let handle = h.handle.clone();
    let call = tokio::spawn(async move {
        handle.call(|reply| Command::KillRetired { app: "web".into(), auth: Authorized::test(), reply }).await
    });
    h.sleep(Duration::from_millis(250)).await;
    assert_eq!(h.sessions_route("web").unwrap().draining.len(), 1, "the change is not in force yet");
    assert_eq!(
        signalled(&h),
        0,
        "no worker of generation 1 is told to stop while its clients still reach it"
    );
    assert_eq!(call.await.unwrap(), Ok(2));
    assert!(h.sessions_route("web").unwrap().draining.is_empty(), "in force when the call returns");
    assert_eq!(signalled(&h), 2, "then both are stopped");
    // Once they exited, the connections they reset no longer send their clients there.
    h.until("their ports' closed connections to be forgotten", Duration::from_secs(5), async |h| {
        let forgotten = h.router.forgotten.lock().unwrap().clone();
        ports.iter().all(|p| forgotten.contains(p))
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_draining_workers_death_sends_its_bands_clients_to_the_live_generation() {
    let h = first_draining("sessions-dead-band", 9).await;
    let victim = h.workers("web").await.into_iter().find(|w| w.generation == 1 && w.band == 1).unwrap();
    h.procs.exit(victim.pid, Exit::Signal(9));
    h.until("band 1 of generation 1 to drop its records", Duration::from_secs(1), async |h| {
        h.sessions_route("web").unwrap().draining[0].bands[1].is_none()
    })
    .await;
    assert!(h.sessions_route("web").unwrap().draining[0].bands[0].is_some(), "band 0 still drains");
    h.sleep(Duration::from_secs(2)).await;
    assert!(
        h.workers("web").await.iter().all(|w| !(w.generation == 1 && w.band == 1)),
        "a draining generation's worker is not respawned"
    );
}

#[tokio::test(start_paused = true)]
async fn an_instant_rollback_to_a_draining_generation_makes_the_live_one_drain() {
    let h = start("sessions-rollback", &[("web", sticky(""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    assert_eq!(h.rollback("web", 0).await, Ok(1));
    assert_eq!(h.gen_state("web", 1).await, Some(GenState::Live));
    assert_eq!(h.gen_state("web", 2).await, Some(GenState::Draining));
    let s = h.sessions_route("web").unwrap();
    assert_eq!(
        (s.record.clone(), s.draining.iter().map(|d| d.slot).collect::<Vec<_>>()),
        (vec![0, 0], vec![1])
    );
}

/// A restart keeps every session where it is: the rules (and the saved state) say which
/// generation drains and in which slot; with the state file lost, the rules alone do.
#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_adopts_draining_generations_from_the_rules() {
    let mut h = start("sessions-adopt", &[("web", sticky(""))]).await;
    for g in 1..=3 {
        assert_eq!(h.deploy("web").await, Ok(g));
    }
    let before = h.sessions_route("web").unwrap();
    // Clients still hold sessions with 1 and 2 (else they would be drained and stopped).
    h.set_records("web", &[(0, 1), (1, 1)]);
    h.restart().await;
    assert_eq!(h.gen_state("web", 3).await, Some(GenState::Live));
    assert_eq!(h.gen_state("web", 2).await, Some(GenState::Draining));
    assert_eq!(h.gen_state("web", 1).await, Some(GenState::Draining));
    assert_eq!(h.sessions_route("web").unwrap(), before, "the same rules, the same sets");
    h.store.clear();
    h.restart().await;
    assert_eq!(h.gen_state("web", 2).await, Some(GenState::Draining), "the rules alone tell");
    assert_eq!(h.sessions_route("web").unwrap(), before);
    assert_eq!(h.deploy("web").await, Ok(4), "and the next deploy takes the free slot");
    assert_eq!(h.sessions_route("web").unwrap().record, [3, 3]);
}

/// A draining NAT worker that exits while its generation's session rules still name its port
/// (here: the rule change cannot be made): the connections it reset are forgotten only once a
/// rule change is in force, never before, or a recorded client's next connection would leave a
/// fresh entry to the dead port. (Before, they were forgotten at once when the change failed,
/// and at once whenever the generation's sessions had been cut an instant before.)
#[tokio::test(start_paused = true)]
async fn a_gone_workers_connections_are_forgotten_only_once_no_rule_names_its_port() {
    let h = first_draining("sessions-forget-order", 4).await;
    let old = h.workers("web").await.into_iter().find(|w| w.generation == 1).unwrap();
    let port = old.ports[0].1;
    *h.router.unusable.lock().unwrap() = Some("iptables-restore: resource busy".into());
    h.procs.exit(old.pid, Exit::Signal(9));
    h.until("the exit to be seen", Duration::from_secs(1), async |h| {
        h.workers("web").await.iter().all(|w| w.pid != old.pid)
    })
    .await;
    h.sleep(Duration::from_secs(3)).await;
    assert!(
        !h.router.forgotten.lock().unwrap().contains(&port),
        "forgotten while the rules could not change"
    );
    *h.router.unusable.lock().unwrap() = None;
    h.until("its port to be forgotten once the rules changed", Duration::from_secs(5), async |h| {
        h.router.forgotten.lock().unwrap().contains(&port)
    })
    .await;
    assert!(h.router.last().iter().all(|r| r.bands.iter().flatten().all(|p| *p != port)));
}
