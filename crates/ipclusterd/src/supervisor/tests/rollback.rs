//! Rollback: instant, redeployed, authorized by its plan, busy during a deploy.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_rollback_to_a_retired_generation_is_one_transaction_with_the_same_workers() {
    let mut h = start("rollback", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(
        h.rollback("web", 0).await,
        Err(Error::NoSuchGeneration("web has no earlier generation to roll back to".into()))
    );
    assert_eq!(h.deploy("web").await, Ok(1));
    let first: Vec<(u32, u16)> = h.workers("web").await.iter().map(|w| (w.pid, w.ports[0].1)).collect();
    assert_eq!(h.deploy("web").await, Ok(2));
    let applied = h.router.applied.lock().unwrap().len();
    assert_eq!(h.rollback("web", 0).await, Ok(1), "the newest generation that was live before");
    assert_eq!(h.router.applied.lock().unwrap().len(), applied + 1, "one transaction");
    let rows = h.workers("web").await;
    let live: Vec<(u32, u16)> =
        rows.iter().filter(|w| w.state == WorkerState::Live).map(|w| (w.pid, w.ports[0].1)).collect();
    assert_eq!(live, first, "the same workers serve again");
    assert!(
        rows.iter().filter(|w| w.generation == 1).all(|w| w.nice == 0 && h.procs.nice(w.pid) == 0),
        "renice undone"
    );
    assert!(
        rows.iter().filter(|w| w.generation == 2).all(|w| w.state == WorkerState::Retired && w.nice == 5)
    );
    assert_eq!(h.routed("web"), first.iter().map(|w| w.1).collect::<Vec<_>>());
    h.sleep(Duration::from_millis(1)).await;
    assert!(h.scopes.cpu_weights.lock().unwrap().contains(&("ipcluster-web-1.scope".into(), 100)));
    let states = h.generation_states();
    assert!(states.ends_with(&[(1, GenState::Live), (2, GenState::Retired)]), "{states:?}");
    // Rolling back to the live one changes nothing; unknown and failed generations are refused.
    assert_eq!(h.rollback("web", 1).await, Ok(1));
    assert!(matches!(h.rollback("web", 9).await, Err(Error::NoSuchGeneration(_))));
    assert!(matches!(h.rollback("nope", 0).await, Err(Error::NoSuchApp(_))));
}

#[tokio::test(start_paused = true)]
async fn a_rollback_to_a_reaped_generation_redeploys_what_it_ran() {
    let h = start(
        "rollback_reaped",
        &[("web", app("\"serve\"", "")), ("signals", app("\"serve\"", "retire_signal = \"USR2\"\n"))],
    )
    .await;
    let v1 = Overrides { command: Some(vec!["serve".into(), "--v1".into()]), ..Overrides::default() };
    assert_eq!(h.deploy_with("web", v1).await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    assert_eq!(
        h.handle
            .call(|reply| Command::KillRetired { app: "web".into(), auth: Authorized::test(), reply })
            .await,
        Ok(2)
    );
    h.until("generation 1 to stop", Duration::from_secs(1), async |h| {
        h.workers("web").await.iter().all(|w| w.generation == 2)
    })
    .await;
    assert_eq!(h.rollback("web", 0).await, Ok(3), "a new generation");
    for w in h.workers("web").await.iter().filter(|w| w.generation == 3) {
        assert_eq!(h.procs.argv(w.pid), ["serve", "--v1"], "generation 1's command, override included");
    }
    // A generation told to wind down (retire_signal) is not brought back: it is redeployed.
    assert_eq!(h.deploy("signals").await, Ok(1));
    assert_eq!(h.deploy("signals").await, Ok(2));
    let old: Vec<u32> =
        h.workers("signals").await.iter().filter(|w| w.generation == 1).map(|w| w.pid).collect();
    assert_eq!(h.rollback("signals", 1).await, Ok(3));
    assert!(
        h.workers("signals")
            .await
            .iter()
            .filter(|w| w.state == WorkerState::Live)
            .all(|w| !old.contains(&w.pid))
    );
}

/// Issue 21, item 2: replaying another caller's override (a redeploy of a generation that ran
/// another environment or command than the app file) needs `override`, like the Deploy that
/// made it; an instant rollback, or a redeploy of what the file says, needs `manage` only; and a
/// plan that changes between its authorization and the rollback is refused.
#[tokio::test(start_paused = true)]
async fn a_rollback_is_authorized_by_what_it_will_run() {
    // The plan is asked for before the caller is authorized: it rebuilds no snapshot.
    {
        let h = start("rollback_plan_quiet", &[("web", app("\"serve\"", ""))]).await;
        assert_eq!(h.deploy("web").await, Ok(1));
        assert_eq!(h.deploy("web").await, Ok(2));
        // Another turn (a sample's results, say) may publish one in between: five tries.
        let mut unchanged = false;
        for _ in 0..5 {
            let before = h.handle.snapshot().await.unwrap();
            for _ in 0..3 {
                assert_eq!(h.plan_rollback("web", 1).await.map(|p| p.how), Ok(RollbackHow::Instant));
            }
            if Arc::ptr_eq(&before, &h.handle.snapshot().await.unwrap()) {
                unchanged = true;
                break;
            }
        }
        assert!(unchanged, "every plan rebuilt the snapshot");
    }
    let h = start("rollback_auth", &[("web", app("\"serve\"", ""))]).await;
    let manage = || Authorized::test_for(crate::auth::Action::Manage);
    let env = Overrides { environment: Some(vec!["SECRET_MODE=1".into()]), ..Overrides::default() };
    assert_eq!(h.deploy_with("web", env).await, Ok(1));
    assert_eq!(h.deploy("web").await, Ok(2));
    // Generation 1 still runs: instant, manage is enough (the same workers, nothing new runs).
    assert_eq!(h.plan_rollback("web", 1).await.map(|p| p.how), Ok(RollbackHow::Instant));
    assert_eq!(h.kill_retired("web").await, Ok(2));
    h.until("generation 1 to stop", Duration::from_secs(1), async |h| {
        h.workers("web").await.iter().all(|w| w.generation == 2)
    })
    .await;
    let plan = h.plan_rollback("web", 1).await.unwrap();
    assert_eq!(
        plan,
        RollbackPlan { target: 1, how: RollbackHow::Redeploy { overrides: vec!["environment"] } }
    );
    let e = h.rollback_as("web", 1, manage()).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgs(m) if m.contains("environment") && m.contains("org.ipcluster1.override")),
        "{e:?}"
    );
    assert!(h.workers("web").await.iter().all(|w| w.generation == 2), "nothing started");
    assert_eq!(h.rollback("web", 1).await, Ok(3), "with override it replays generation 1");
    for w in h.workers("web").await.iter().filter(|w| w.generation == 3) {
        assert!(h.procs.env(w.pid).contains(&("SECRET_MODE".into(), "1".into())));
    }
    // Generation 2 ran the file's config: redeploying it is what a plain Deploy does.
    assert_eq!(h.kill_retired("web").await, Ok(2));
    h.until("generation 2 to stop", Duration::from_secs(1), async |h| {
        h.workers("web").await.iter().all(|w| w.generation == 3)
    })
    .await;
    let plan = h.plan_rollback("web", 2).await.unwrap();
    assert_eq!(plan.how, RollbackHow::Redeploy { overrides: vec![] });
    assert_eq!(h.rollback_as("web", 2, manage()).await, Ok(4));
    // A plan authorized, then changed before the rollback (the app file now runs another
    // command, so generation 2's is an override): refused, nothing changes.
    assert_eq!(h.deploy("web").await, Ok(5));
    assert_eq!(h.kill_retired("web").await, Ok(4), "generations 3 and 4");
    h.until("generation 4 to stop", Duration::from_secs(1), async |h| {
        h.workers("web").await.iter().all(|w| w.generation == 5)
    })
    .await;
    let authorized = h.plan_rollback("web", 4).await.unwrap();
    h.files.write("web", &app("\"serve\", \"--v2\"", ""));
    let reload = h.handle.call(|reply| Command::Reload { auth: Authorized::test(), reply }).await;
    assert_eq!(reload, Ok(()));
    let e = h
        .handle
        .call(|reply| Command::Rollback {
            app: "web".into(),
            generation: 4,
            plan: authorized,
            auth: manage(),
            reply,
        })
        .await
        .unwrap_err();
    assert!(matches!(&e, Error::Busy(m) if m.contains("changed while it was being authorized")), "{e:?}");
    assert!(h.workers("web").await.iter().all(|w| w.generation == 5), "nothing started");
}

#[tokio::test(start_paused = true)]
async fn a_rollback_during_a_deploy_is_busy() {
    let h = start("rollback_busy", &[("web", app("\"serve\"", ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let hang = Overrides { command: Some(vec!["hang".into()]), ..Overrides::default() };
    let deploying = {
        let handle = h.handle.clone();
        tokio::spawn(async move {
            handle
                .call(|reply| Command::Deploy {
                    app: "web".into(),
                    overrides: hang,
                    auth: Authorized::test(),
                    reply,
                })
                .await
        })
    };
    h.sleep(Duration::from_millis(10)).await;
    assert!(matches!(h.rollback("web", 0).await, Err(Error::Busy(_))));
    assert!(deploying.await.unwrap().is_err());
}
