//! /proc sampling: RSS, CPU time and open connections of each worker's whole process tree.
//!
//! Runs on a blocking thread (it reads many small files); the supervisor gets the results as one
//! event per round. A worker that exits mid-sample simply reads as what was left.
//!
//! Connections are counted only when a policy needs them ([`connections`]): /proc/net/tcp walks
//! the kernel's whole TCP hash table, which costs milliseconds per read on a large host, far too
//! much to do every second for nothing.

use std::{collections::HashSet, fs};

use crate::process;

/// One worker's numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub rss: u64,
    pub cpu_usec: u64,
}

/// Inodes of established TCP sockets (IPv4 and IPv6) on this host (network namespace).
fn established_inodes() -> HashSet<u64> {
    let mut set = HashSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(file) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.get(3) == Some(&"01")
                && let Some(inode) = f.get(9).and_then(|i| i.parse().ok())
            {
                set.insert(inode);
            }
        }
    }
    set
}

/// Established connections among the open files of `pids`.
fn connections_of(pids: &[u32], established: &HashSet<u64>) -> u32 {
    let mut n = 0;
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            let t = target.to_string_lossy();
            if let Some(inode) =
                t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).and_then(|i| i.parse().ok())
                && established.contains(&inode)
            {
                n += 1;
            }
        }
    }
    n
}

/// Samples RSS and CPU time of every `(id, pid)`.
pub fn sample(workers: &[(u64, u32)]) -> Vec<(u64, Sample)> {
    workers
        .iter()
        .map(|(id, pid)| {
            let (rss, cpu_usec) = process::usage_of_tree(*pid);
            (*id, Sample { rss, cpu_usec })
        })
        .collect()
}

/// Established TCP connections held by each `(id, pid)`'s process tree.
pub fn connections(workers: &[(u64, u32)]) -> Vec<(u64, u32)> {
    let established = established_inodes();
    workers
        .iter()
        .map(|(id, pid)| (*id, connections_of(&process::process_tree(*pid), &established)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process_and_its_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let me = std::process::id();
        let s = sample(&[(1, me)]);
        assert_eq!(s.len(), 1);
        assert!(s[0].1.rss > 1 << 20, "RSS of the test process: {:?}", s[0].1);
        let c = connections(&[(1, me)]);
        assert!(c[0].1 >= 2, "both ends of the connection are ours: {c:?}");
        assert_eq!(sample(&[(2, u32::MAX - 1)])[0].1, Sample::default(), "a missing process samples as zero");
    }
}
