//! The [`Inspector`] side of [`FakeProcesses`]: what a fake process says about itself, the
//! sockets it holds, and readiness (a worker is ready once it "listens").

use std::os::fd::OwnedFd;

use super::FakeProcesses;
use crate::processes::{Inspected, Inspector};

impl FakeProcesses {
    /// Makes `pid` listen on its ports (its readiness probe succeeds).
    pub fn listen(&self, pid: u32) {
        if let Some(p) = self.world().procs.get(&pid) {
            p.listening.send_replace(true);
        }
    }

    /// Marks `port` as held by another program.
    pub fn occupy(&self, port: u16) {
        self.world().busy_ports.insert(port);
    }
}

impl Inspector for FakeProcesses {
    type Handle = u32;

    fn inspect(&self, pid: u32) -> Option<(u32, Inspected)> {
        let w = self.world();
        let p = w.procs.get(&pid).filter(|p| p.exit.borrow().is_none())?;
        let inspected = Inspected {
            env: p.env.clone(),
            cgroup: p.cgroup.clone(),
            parent: p.parent,
            start_usec: p.start_usec,
        };
        Some((pid, inspected))
    }
    fn start_time_usec(&self, pid: u32) -> Option<u64> {
        self.world().procs.get(&pid).map(|p| p.start_usec)
    }
    fn nice_of(&self, pid: u32) -> Option<i32> {
        self.world().procs.get(&pid).map(|p| p.nice)
    }
    /// A listening fake process holds one "socket" per port (a pipe: something to hand a relay).
    fn listeners(&self, pid: u32, _cgroup: Option<&str>, ports: &[u16]) -> Vec<(u16, OwnedFd)> {
        let listening = self.world().procs.get(&pid).is_some_and(|p| *p.listening.borrow());
        if !listening {
            return Vec::new();
        }
        ports.iter().filter_map(|port| Some((*port, rustix::pipe::pipe().ok()?.0))).collect()
    }
    fn sockets(
        &self,
        pid: u32,
        _cgroup: Option<&str>,
        addrs: &[std::net::SocketAddr],
    ) -> Vec<(std::net::SocketAddr, OwnedFd)> {
        let w = self.world();
        let Some(p) = w.procs.get(&pid).filter(|p| p.exit.borrow().is_none()) else { return Vec::new() };
        addrs.iter().zip(&p.sockets).filter_map(|(a, s)| Some((*a, s.try_clone().ok()?))).collect()
    }
    fn port_is_free(&self, port: u16) -> bool {
        !self.world().busy_ports.contains(&port)
    }
    fn port_holders(&self, _worker: Option<(u32, Option<&str>)>, ports: &[u16]) -> Vec<String> {
        let w = self.world();
        ports
            .iter()
            .filter(|p| w.busy_ports.contains(p))
            .map(|p| format!("0.0.0.0:{p} (uid 1000, other)"))
            .collect()
    }
    fn probe(
        &self,
        pid: u32,
        _cgroup: Option<String>,
        _ports: Vec<(std::net::SocketAddr, u16)>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let rx = self.world().procs.get(&pid).map(|p| p.listening.subscribe());
        async move {
            match rx {
                Some(mut rx) => {
                    if rx.wait_for(|l| *l).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
    }
}
