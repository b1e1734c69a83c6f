//! [`FakeChecker`]: health checks answered from a table the test sets (by the target's port, or
//! by the probe source in socket mode), 200 for anything not in it, and a record of every
//! check asked for.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use ipcluster_core::checks::Outcome;

use super::lock;
use crate::checker::{Checker, Target};

#[derive(Debug, Clone, Default)]
pub struct FakeChecker {
    /// What a check of a port answers (absent: HTTP 200).
    answers: Arc<Mutex<HashMap<u16, Outcome>>>,
    /// What a check from a probe source answers (socket mode), before `answers`.
    by_source: Arc<Mutex<HashMap<std::net::IpAddr, Outcome>>>,
    /// Every check asked for: (target, path).
    pub checks: Arc<Mutex<Vec<(Target, String)>>>,
    /// Socket mode's kernel side: a check from a probe source reaches a worker only if the
    /// table in that slot has a socket in that band (else the connection is refused, as the
    /// program refuses it).
    steer: Option<super::steer::FakeSteer>,
}

impl FakeChecker {
    /// Checks whose probe sources go through `steer`'s tables.
    pub fn probing(steer: super::steer::FakeSteer) -> Self {
        Self { steer: Some(steer), ..Self::default() }
    }

    /// Checks of `port` answer `outcome` from now on.
    pub fn answer(&self, port: u16, outcome: Outcome) {
        lock(&self.answers).insert(port, outcome);
    }

    /// Checks from `source` (socket mode's probe path) answer `outcome` from now on.
    pub fn answer_from(&self, source: std::net::IpAddr, outcome: Outcome) {
        lock(&self.by_source).insert(source, outcome);
    }

    /// How many checks went to `port`.
    pub fn count(&self, port: u16) -> usize {
        lock(&self.checks).iter().filter(|(t, _)| t.addr.port() == port).count()
    }
}

impl Checker for FakeChecker {
    fn check(
        &self,
        target: Target,
        path: String,
        _timeout: Duration,
    ) -> impl Future<Output = Outcome> + Send + 'static {
        lock(&self.checks).push((target, path));
        if let (Some(source), Some(steer)) = (target.source, &self.steer)
            && !steer.probe_reaches(source)
        {
            let refused = Outcome::Failed("cannot connect: Connection refused".into());
            return std::future::ready(refused);
        }
        let by_source = target.source.and_then(|s| lock(&self.by_source).get(&s).cloned());
        let outcome = by_source
            .or_else(|| lock(&self.answers).get(&target.addr.port()).cloned())
            .unwrap_or(Outcome::Status(200));
        std::future::ready(outcome)
    }
}
