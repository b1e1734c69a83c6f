//! The [`Sampler`] side of [`FakeProcesses`]: the memory and connections a test gives a fake
//! process.

use super::FakeProcesses;
use crate::{processes::Sampler, sampler::Sample};

impl FakeProcesses {
    /// Sets the resident memory `pid` samples as.
    pub fn set_rss(&self, pid: u32, rss: u64) {
        if let Some(p) = self.world().procs.get_mut(&pid) {
            p.rss = rss;
        }
    }

    /// Sets how many established connections `pid` has.
    pub fn set_connections(&self, pid: u32, n: u32) {
        if let Some(p) = self.world().procs.get_mut(&pid) {
            p.connections = n;
        }
    }
}

impl Sampler for FakeProcesses {
    fn sample(&self, _scopes: &[(String, String)], workers: &[(u64, u32)]) -> Vec<(u64, Sample)> {
        let w = self.world();
        workers
            .iter()
            .map(|(id, pid)| (*id, Sample { rss: w.procs.get(pid).map_or(0, |p| p.rss), cpu_usec: 0 }))
            .collect()
    }
    fn connections(&self, workers: &[(u64, u32)]) -> Vec<(u64, u32)> {
        let w = self.world();
        workers.iter().map(|(id, pid)| (*id, w.procs.get(pid).map_or(0, |p| p.connections))).collect()
    }
    fn usage(&self, pid: u32) -> (u64, u64) {
        self.world().procs.get(&pid).map_or((0, 0), |p| (p.rss, 0))
    }
}
