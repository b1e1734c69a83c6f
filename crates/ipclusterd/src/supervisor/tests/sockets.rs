//! Socket mode against the fakes: which sockets each worker is handed, which table the steering
//! reads after each deploy, crash, rollback and restart, and what a refused program changes
//! (nothing).

use std::collections::BTreeMap;

use super::*;

const LISTEN: &str = "0.0.0.0:80";

fn socket_app() -> String {
    app("\"notify\"", "routing = \"socket\"\n")
}

impl Harness {
    /// Deploys `app`, sending READY=1 for each new worker as it appears.
    async fn deploy_notified(&self, app: &str) -> Result<u64, Error> {
        let handle = self.handle.clone();
        let name = app.to_owned();
        let call = tokio::spawn(async move {
            handle.call(|reply| Command::Deploy { app: name, overrides: Overrides::default(), reply }).await
        });
        let mut readied = self.procs.spawned().len();
        loop {
            if call.is_finished() {
                return call.await.unwrap();
            }
            let spawned = self.procs.spawned();
            for (pid, _) in &spawned[readied..] {
                self.notify(*pid, Message { ready: true, watchdog: false }).await;
            }
            readied = spawned.len();
            self.sleep(Duration::from_millis(10)).await;
        }
    }

    /// Band → socket cookie of the table web's group reads now.
    fn steered(&self) -> BTreeMap<u32, u64> {
        self.steer.routed(&FakeSteer::name("web", LISTEN))
    }

    /// Band → the cookie of the socket handed to generation `g`'s worker of that band.
    async fn handed(&self, g: u64) -> BTreeMap<u32, u64> {
        let rows = self.workers("web").await;
        rows.iter()
            .filter(|w| w.generation == g && w.state != WorkerState::Stopping)
            .map(|w| (w.band, self.procs.socket_cookies(w.pid)[0]))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn each_deploy_is_one_switch_to_the_new_workers_sockets_and_a_rollback_switches_back() {
    let mut h = start("sockets", &[("web", socket_app())]).await;
    assert_eq!(h.deploy_notified("web").await, Ok(1));
    let first = h.handed(1).await;
    assert_eq!(first.len(), 2, "each worker is handed a socket of its own: {first:?}");
    assert_eq!(h.steered(), first);
    assert_eq!(h.steer.switches(), 1);
    assert!(h.router.last().iter().all(|r| r.app.as_str() != "web"), "no NAT rule");
    for w in h.workers("web").await {
        assert!(w.ports.is_empty(), "no worker port: {w:?}");
        let env = h.procs.env(w.pid);
        let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!((get("LISTEN_FDS"), get("LISTEN_FDNAMES")), (Some("1"), Some("0.0.0.0_80")));
        assert_eq!((get("PORT"), get("IPCLUSTER_PORTS")), (None, None));
    }

    assert_eq!(h.deploy_notified("web").await, Ok(2));
    let second = h.handed(2).await;
    assert_eq!(h.steered(), second, "one switch sends every band to generation 2");
    assert_eq!(h.steer.switches(), 2);
    assert!(
        h.workers("web").await.iter().filter(|w| w.generation == 1).all(|w| w.state == WorkerState::Retired)
    );

    assert_eq!(h.rollback("web", 0).await, Ok(1));
    assert_eq!(h.steered(), first, "the retired workers' sockets, steered to again");
    assert_eq!(h.steer.switches(), 3);
    let states = h.generation_states();
    assert!(states.ends_with(&[(1, GenState::Live), (2, GenState::Retired)]), "{states:?}");
}

#[tokio::test(start_paused = true)]
async fn a_crashed_band_goes_to_a_neighbour_until_its_replacement_is_ready() {
    let h = start("sockets-crash", &[("web", socket_app())]).await;
    assert_eq!(h.deploy_notified("web").await, Ok(1));
    let before = h.handed(1).await;
    let crashed = h.worker("web", 1, 1).await.pid;
    h.procs.exit(crashed, Exit::Signal(libc::SIGKILL));
    h.until("band 1's slot to empty", Duration::from_secs(1), async |h| !h.steered().contains_key(&1)).await;
    assert_eq!(h.steered().get(&0), before.get(&0), "band 0 is untouched");
    h.until("band 1's replacement", Duration::from_secs(2), async |h| h.procs.spawned().len() == 3).await;
    let replacement = h.procs.spawned()[2].0;
    assert!(!h.steered().contains_key(&1), "not steered to before it is ready");
    h.notify(replacement, Message { ready: true, watchdog: false }).await;
    h.until("band 1 to be steered to its replacement", Duration::from_secs(1), async |h| {
        h.steered().get(&1) == h.procs.socket_cookies(replacement).first()
    })
    .await;
    assert_eq!(h.steer.switches(), 1, "a slot changes, the table in force does not");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_daemon_takes_the_sockets_back_and_the_steering_names_the_live_generation() {
    let mut h = start("sockets-restart", &[("web", socket_app())]).await;
    assert_eq!(h.deploy_notified("web").await, Ok(1));
    assert_eq!(h.deploy_notified("web").await, Ok(2));
    let (first, second) = (h.handed(1).await, h.handed(2).await);
    h.restart().await;
    assert_eq!(h.steered(), second, "the same sockets, after the restart");
    let live: Vec<u64> = h
        .workers("web")
        .await
        .iter()
        .filter(|w| w.state == WorkerState::Live)
        .map(|w| w.generation)
        .collect();
    assert_eq!(live, [2, 2]);
    // The tables of the retired generation were rebuilt too: a rollback is still instant.
    assert_eq!(h.rollback("web", 1).await, Ok(1));
    assert_eq!(h.steered(), first);

    // With the state file lost, the steering alone says generation 1 is live (generation 2,
    // newer and complete, was never recorded: it is stopped).
    std::fs::remove_file(h.dir.join("state.json")).unwrap();
    h.restart().await;
    assert_eq!(h.steered(), first);
    let rows = h.workers("web").await;
    assert!(rows.iter().filter(|w| w.generation == 1).all(|w| w.state == WorkerState::Live), "{rows:?}");
    h.until("generation 2's scope to be stopped", Duration::from_secs(1), async |h| {
        h.scopes.stopped.lock().unwrap().contains(&"ipcluster-web-2.scope".to_owned())
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_program_the_kernel_refuses_fails_the_deploy_and_changes_nothing() {
    let h = start("sockets-refused", &[("web", socket_app())]).await;
    h.steer.refuse("the verifier says: R0 !read_ok");
    let e = h.deploy_notified("web").await.unwrap_err();
    assert!(matches!(&e, Error::DeployFailed(m) if m.contains("R0 !read_ok")), "{e:?}");
    assert!(h.procs.spawned().is_empty(), "no process");
    assert!(h.scopes.names().is_empty(), "no scope");
    let saved = crate::state::load(&h.dir.join("state.json")).unwrap_or_default();
    assert!(saved.apps.values().all(|a| a.generations.is_empty()), "no record: {saved:?}");
}

#[tokio::test(start_paused = true)]
async fn stop_app_stops_steering_before_it_stops_the_workers() {
    let h = start("sockets-stop", &[("web", socket_app())]).await;
    assert_eq!(h.deploy_notified("web").await, Ok(1));
    assert!(!h.steered().is_empty());
    assert_eq!(h.handle.call(|reply| Command::StopApp { app: "web".into(), reply }).await, Ok(()));
    assert!(h.steered().is_empty(), "nothing is steered to");
    // And the next deploy loads the steering again.
    assert_eq!(h.deploy_notified("web").await, Ok(2));
    assert_eq!(h.steered(), h.handed(2).await);
}
