//! Generations for the second version's tests: a table and its listeners, where a connection
//! lands, and the model's agreement.

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    time::Duration,
};

use ipcluster_steer::{
    SockArray, Steering,
    model::{Choice, Model},
    monotonic_now,
};

use super::{accepted_by, connect, nonblocking, v4};

pub const HOUR: Duration = Duration::from_secs(3600);

/// One generation: its table and a listener per filled band (`None`: not filled).
pub struct Gen {
    pub table: SockArray,
    pub socks: Vec<Option<OwnedFd>>,
}

impl Gen {
    /// `n` bands on `addr`, each filled.
    pub fn new(st: &Steering, addr: SocketAddr, n: u32) -> Self {
        Self::with_bands(st, addr, 0..n)
    }

    /// Only `bands` filled (a canary's).
    pub fn with_bands(st: &Steering, addr: SocketAddr, bands: impl IntoIterator<Item = u32>) -> Self {
        let table = SockArray::new().unwrap();
        let mut socks = Vec::new();
        for band in bands {
            let s = st.listen(addr, 256).unwrap();
            nonblocking(&s);
            table.insert(band, &s).unwrap();
            if socks.len() <= band as usize {
                socks.resize_with(band as usize + 1, || None);
            }
            socks[band as usize] = Some(s);
        }
        Self { table, socks }
    }

    pub fn filled(&self) -> BTreeSet<u32> {
        self.table.entries().unwrap().into_iter().map(|(b, _)| b).collect()
    }

    /// Closes band `b`'s socket (its worker died): it leaves the table.
    pub fn kill(&mut self, b: u32) {
        drop(self.socks[b as usize].take());
        assert_eq!(self.table.cookie(b).unwrap(), None, "a closed socket leaves its slot");
    }
}

/// Every listener of the given generations, named by (slot, band).
pub struct Targets<'a> {
    pub fds: Vec<&'a OwnedFd>,
    pub names: Vec<(u32, u32)>,
}

pub fn targets<'a>(gens: &[(u32, &'a Gen)]) -> Targets<'a> {
    let mut t = Targets { fds: Vec::new(), names: Vec::new() };
    for &(slot, g) in gens {
        for (band, s) in g.socks.iter().enumerate() {
            if let Some(s) = s {
                t.fds.push(s);
                t.names.push((slot, band as u32));
            }
        }
    }
    t
}

/// Where a connection from `src` to `dst` lands: (slot, band), or `None` when refused.
pub fn land(t: &Targets<'_>, src: IpAddr, dst: SocketAddr) -> Option<(u32, u32)> {
    match connect(src, dst) {
        Ok(c) => Some(t.names[accepted_by(&t.fds, &c)]),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => None,
        Err(e) => panic!("connect from {src}: {e}"),
    }
}

pub fn now_ns() -> u64 {
    monotonic_now().as_nanos() as u64
}

/// Connects from each source and checks the kernel chose what the model chooses.
pub fn agree(model: &mut Model, t: &Targets<'_>, dst: SocketAddr, sources: &[IpAddr]) -> Vec<Option<Choice>> {
    sources
        .iter()
        .map(|&src| {
            let want = model.connect(src, now_ns());
            assert_eq!(land(t, src, dst), want.map(Choice::target), "client {src}: the model says {want:?}");
            want
        })
        .collect()
}

pub fn lo_sources(range: std::ops::Range<u32>) -> Vec<IpAddr> {
    range.map(|k| v4(k).into()).collect()
}
