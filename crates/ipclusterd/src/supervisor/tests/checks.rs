//! HTTP health checks against the fakes, with tokio's paused clock: `ready = "http"`, a live
//! worker replaced after `health_failures` failed checks, one band at a time, and a shared
//! failure left alone.

use ipcluster_core::checks::Outcome;

use super::*;
use crate::supervisor::PolicyAction;

fn checked(workers: u32, extra: &str) -> String {
    format!(
        "command = [\"serve\"]\nworkers = {workers}\n{BASE}health_path = \"/healthz\"\nhealth_interval = \"1s\"\nhealth_failures = 3\n{extra}"
    )
}

impl Harness {
    async fn retired(&self, pid: u32) -> bool {
        self.workers("web").await.iter().any(|w| w.pid == pid && w.state == WorkerState::Retired)
    }

    async fn policy(&self, app: &str, action: PolicyAction) -> u64 {
        let snap = self.handle.snapshot().await.unwrap();
        snap.metrics.policy_actions.get(&(app.to_owned(), action)).copied().unwrap_or(0)
    }
}

#[tokio::test(start_paused = true)]
async fn ready_http_waits_for_a_passing_check() {
    let h = start("checks-ready", &[("web", checked(2, "ready = \"http\"\n"))]).await;
    // Every port of the range answers 503 at first: the workers hold their ports, but are not
    // ready.
    for port in 30000..30100 {
        h.checker.answer(port, Outcome::Status(503));
    }
    let deploy = h.spawn_deploy("web");
    h.sleep(Duration::from_secs(2)).await;
    assert!(!deploy.is_finished(), "not ready while the checks fail");
    assert!(h.workers("web").await.iter().all(|w| w.state == WorkerState::Starting));
    assert!(h.never_routed());
    for port in 30000..30100 {
        h.checker.answer(port, Outcome::Status(200));
    }
    assert_eq!(deploy.await.unwrap(), Ok(1));
    let paths: Vec<String> = h.checker.checks.lock().unwrap().iter().map(|(_, p)| p.clone()).collect();
    assert!(paths.iter().all(|p| p == "/healthz") && paths.len() >= 4, "{paths:?}");
    // Never passing: the deploy fails at ready_timeout, saying why.
    for port in 30000..30100 {
        h.checker.answer(port, Outcome::Failed("cannot connect: Connection refused".into()));
    }
    let e = h.deploy("web").await.unwrap_err();
    assert!(matches!(&e, Error::DeployFailed(m) if m.contains("not ready")), "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn a_live_worker_failing_its_checks_is_replaced_one_band_at_a_time() {
    let h = start("checks-replace", &[("web", checked(8, ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    let (b1, b5) = (h.worker("web", 1, 1).await, h.worker("web", 1, 5).await);
    h.checker.answer(b1.ports[0].1, Outcome::Status(500));
    h.checker.answer(b5.ports[0].1, Outcome::Status(500));
    // Two failed checks: not yet.
    h.sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.policy("web", PolicyAction::Health).await, 0);
    // The third: one of the two is replaced (band 1 first), the other waits for it.
    h.until("a replacement", Duration::from_secs(3), async |h| {
        h.policy("web", PolicyAction::Health).await == 1
    })
    .await;
    h.until("band 1's old worker retired", Duration::from_secs(3), async |h| h.retired(b1.pid).await).await;
    assert_eq!(h.worker("web", 1, 1).await.generation, 1, "a replacement in the same generation");
    assert_ne!(h.worker("web", 1, 1).await.pid, b1.pid);
    // Then band 5, once band 1's replacement is done.
    h.until("band 5 replaced next", Duration::from_secs(5), async |h| h.retired(b5.pid).await).await;
    assert_eq!(h.policy("web", PolicyAction::Health).await, 2);
    // The new workers answer 200 (their ports are new): nothing more happens.
    h.sleep(Duration::from_secs(5)).await;
    assert_eq!(h.policy("web", PolicyAction::Health).await, 2);
}

#[tokio::test(start_paused = true)]
async fn most_workers_failing_at_once_is_a_shared_cause_and_nothing_is_replaced() {
    let mut h = start("checks-shared", &[("web", checked(4, ""))]).await;
    assert_eq!(h.deploy("web").await, Ok(1));
    for w in h.workers("web").await.iter().take(3) {
        h.checker.answer(w.ports[0].1, Outcome::Failed("no answer within 1s".into()));
    }
    h.sleep(Duration::from_secs(10)).await;
    assert_eq!(h.policy("web", PolicyAction::Health).await, 0, "3 of 4 fail: a shared cause");
    let held = h.held_back();
    assert_eq!(held.len(), 1, "reported once: {held:?}");
    assert!(held[0].contains("3 of 4 live workers fail") && held[0].contains("shared cause"), "{held:?}");
    assert!(h.workers("web").await.iter().all(|w| w.state == WorkerState::Live));
}
