//! What the data path compares: the cells, each a mode and its control, with their targets.
//!
//! **Adding a cell** is one entry of [`CELLS`]: a mode and a control, each a [`Front`]; an
//! ipclusterd front takes extra app settings, so on/off comparisons of a setting (e.g. the
//! cost of `session_affinity` on new connections) are two ipclusterd fronts that differ in
//! `extra`.

/// The worker program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// `ipcluster-demo` (Rust, a thread per connection).
    Demo,
    /// A minimal Node.js `http` server ([`super::NODE_WORKER`]).
    Node,
}

impl Program {
    pub fn command(self) -> &'static str {
        match self {
            Program::Demo => "[\"/usr/local/bin/ipcluster-demo\"]",
            Program::Node => "[\"/usr/bin/node\", \"/var/lib/ipcluster-bench/worker.js\"]",
        }
    }
    pub fn argv(self) -> &'static [&'static str] {
        match self {
            Program::Demo => &["/usr/local/bin/ipcluster-demo"],
            Program::Node => &["/usr/bin/node", super::WORKER_JS],
        }
    }
}

/// One side of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// ipclusterd with `routing` (`nat` or `socket`) and `extra` lines of app settings.
    Ipclusterd { routing: &'static str, extra: &'static str },
    /// The mode's own sandbox and workers (an ipclusterd NAT front), reached through conntrack
    /// and one REDIRECT rule per worker: NAT's physical limit.
    NatLimit,
    /// An ipclusterd socket-mode sandbox with its steering program detached: a plain
    /// `SO_REUSEPORT` group of the same workers.
    Reuseport,
    /// HAProxy (2 threads) in front of as many workers, sticky by source address.
    Haproxy,
    /// PM2 cluster mode with as many Node.js processes.
    Pm2,
}

pub const NAT: Front = Front::Ipclusterd { routing: "nat", extra: "" };
pub const SOCKET: Front = Front::Ipclusterd { routing: "socket", extra: "" };
/// The same fronts with session affinity on (every client recorded, refreshed on each new
/// connection).
pub const NAT_STICKY: Front = Front::Ipclusterd { routing: "nat", extra: "session_affinity = \"90s\"\n" };
pub const SOCKET_STICKY: Front =
    Front::Ipclusterd { routing: "socket", extra: "session_affinity = \"90s\"\n" };

impl Front {
    pub fn label(self, program: Program, bands: u32) -> String {
        let p = if program == Program::Node { "node " } else { "" };
        match self {
            Front::Ipclusterd { routing, extra } => {
                let mode = if routing == "nat" { "NAT" } else { "socket" };
                let extra = if extra.is_empty() { String::new() } else { format!(" ({})", extra.trim()) };
                format!("{p}{mode} {bands} bands{extra}")
            }
            Front::NatLimit => format!("{p}{bands} workers via conntrack + REDIRECT"),
            Front::Reuseport => format!("{p}{bands} workers, plain reuseport group"),
            Front::Haproxy => format!("{p}HAProxy, {bands} workers"),
            Front::Pm2 => format!("{p}PM2 cluster, {bands} processes"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    KeepAlive,
    NewConn,
}

/// A target on a cell's ratio (mode / control), judged on the median.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub metric: Metric,
    pub min: f64,
}

/// A comparison measured in interleaved rounds.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub program: Program,
    pub bands: u32,
    pub mode: Front,
    pub control: Front,
    /// Clients on one CPU, servers on the other; `false` for the one row that shows what
    /// pinning changes.
    pub pinned: bool,
    /// Part of `--quick` (the headline cells).
    pub quick: bool,
    pub targets: &'static [Target],
}

const SOCKET_TARGETS: &[Target] =
    &[Target { metric: Metric::KeepAlive, min: 0.98 }, Target { metric: Metric::NewConn, min: 0.98 }];
const NAT_TARGETS: &[Target] =
    &[Target { metric: Metric::KeepAlive, min: 0.97 }, Target { metric: Metric::NewConn, min: 0.97 }];
const VS_ALTERNATIVE: &[Target] = &[Target { metric: Metric::NewConn, min: 1.5 }];
/// `session_affinity`'s cost on new connections (issue 23): at most 8 % in NAT mode (a set
/// lookup and a set update per new connection), at most 3 % in socket mode (a map lookup and
/// update in the program).
const AFFINITY_NAT: &[Target] = &[Target { metric: Metric::NewConn, min: 0.92 }];
const AFFINITY_SOCKET: &[Target] = &[Target { metric: Metric::NewConn, min: 0.97 }];

const fn cell(program: Program, bands: u32, mode: Front, control: Front, targets: &'static [Target]) -> Cell {
    Cell { program, bands, mode, control, pinned: true, quick: false, targets }
}

/// Every cell of the full run, in order.
pub const CELLS: &[Cell] = &[
    cell(Program::Demo, 8, NAT, Front::NatLimit, NAT_TARGETS),
    Cell { quick: true, ..cell(Program::Demo, 64, NAT, Front::NatLimit, NAT_TARGETS) },
    Cell { quick: true, ..cell(Program::Demo, 8, SOCKET, Front::Reuseport, SOCKET_TARGETS) },
    Cell { quick: true, ..cell(Program::Demo, 64, SOCKET, Front::Reuseport, SOCKET_TARGETS) },
    cell(Program::Node, 8, SOCKET, Front::Reuseport, SOCKET_TARGETS),
    cell(Program::Node, 64, SOCKET, Front::Reuseport, SOCKET_TARGETS),
    cell(Program::Demo, 8, NAT, Front::Haproxy, VS_ALTERNATIVE),
    cell(Program::Node, 8, NAT, Front::Pm2, VS_ALTERNATIVE),
    // The same as the third, unpinned: what pinning changes.
    Cell { pinned: false, ..cell(Program::Demo, 8, SOCKET, Front::Reuseport, &[]) },
    // session_affinity on against off, the same app otherwise.
    cell(Program::Demo, 8, NAT_STICKY, NAT, AFFINITY_NAT),
    cell(Program::Demo, 8, SOCKET_STICKY, SOCKET, AFFINITY_SOCKET),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cell_compares_like_with_like() {
        for c in CELLS {
            assert!(c.bands.is_power_of_two());
            match c.control {
                Front::NatLimit => assert_eq!(c.mode, NAT, "NAT's limit is NAT's own sandbox"),
                Front::Reuseport => assert!(matches!(c.mode, Front::Ipclusterd { routing: "socket", .. })),
                Front::Pm2 => assert_eq!(c.program, Program::Node),
                _ => {}
            }
            assert!(!matches!(c.mode, Front::NatLimit | Front::Reuseport), "a control is never a mode");
        }
        assert!(CELLS.iter().any(|c| !c.pinned), "one unpinned row");
        assert!(CELLS.iter().filter(|c| c.quick).count() >= 2);
    }

    #[test]
    fn labels_name_the_front_and_its_workers() {
        assert_eq!(SOCKET.label(Program::Node, 8), "node socket 8 bands");
        assert_eq!(Front::NatLimit.label(Program::Demo, 64), "64 workers via conntrack + REDIRECT");
        assert_eq!(NAT_STICKY.label(Program::Demo, 8), "NAT 8 bands (session_affinity = \"90s\")");
        let sticky: Vec<&Cell> =
            CELLS.iter().filter(|c| c.mode == NAT_STICKY || c.mode == SOCKET_STICKY).collect();
        assert_eq!(sticky.len(), 2, "one on/off cell per mode");
        assert!(sticky.iter().all(|c| c.control == NAT || c.control == SOCKET));
    }
}
