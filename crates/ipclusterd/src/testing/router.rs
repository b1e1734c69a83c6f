//! [`FakeRouter`]: netfilter's rules, in memory.

use std::sync::{Arc, Mutex};

use std::collections::BTreeMap;

use ipcluster_core::{
    name::AppName,
    routing::{AppRoute, Existing},
};

use super::lock;
use crate::netfilter::{Applied, Router, RouterError};

/// Records every set of routes applied; [`Router::current`] answers with the last one, as the
/// kernel would. [`FakeRouter::unusable`] plays a host where netfilter cannot be used: `check`
/// and every call fail with that reason; [`FakeRouter::delay`] one where a change takes time.
#[derive(Debug, Clone, Default)]
pub struct FakeRouter {
    pub applied: Arc<Mutex<Vec<Vec<AppRoute>>>>,
    pub unusable: Arc<Mutex<Option<String>>>,
    /// How long each change takes (in the test's time) before it is in force.
    pub delay: Arc<Mutex<std::time::Duration>>,
    /// The live records of the session sets, as the test sets them: (app, slot) → count.
    pub sessions: Arc<Mutex<BTreeMap<(AppName, u8), u32>>>,
    /// Every port whose closed connections were forgotten, in order.
    pub forgotten: Arc<Mutex<Vec<u16>>>,
}

impl FakeRouter {
    /// The routes now in force.
    pub fn last(&self) -> Vec<AppRoute> {
        lock(&self.applied).last().cloned().unwrap_or_default()
    }
}

impl Router for FakeRouter {
    async fn apply(&self, routes: &[AppRoute]) -> Result<Applied, RouterError> {
        self.check()?;
        let delay = *lock(&self.delay);
        if !delay.is_zero() && lock(&self.applied).last().map(Vec::as_slice).unwrap_or_default() != routes {
            tokio::time::sleep(delay).await;
        }
        let mut applied = lock(&self.applied);
        if applied.last().map(Vec::as_slice).unwrap_or_default() == routes {
            return Ok(Applied::Unchanged);
        }
        applied.push(routes.to_vec());
        Ok(Applied::Changed)
    }
    async fn current(&self) -> Result<Existing, RouterError> {
        self.check()?;
        Ok(Existing::after(&self.last()))
    }
    fn check(&self) -> Result<(), RouterError> {
        lock(&self.unusable).clone().map_or(Ok(()), |why| Err(RouterError(why)))
    }
    async fn sessions(&self) -> Result<BTreeMap<(AppName, u8), u32>, RouterError> {
        self.check()?;
        Ok(lock(&self.sessions).clone())
    }
    fn forget(&self, ports: &[u16]) {
        lock(&self.forgotten).extend_from_slice(ports);
    }
}
