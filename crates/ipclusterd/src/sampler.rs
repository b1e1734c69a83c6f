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

/// RSS (bytes), CPU time (µs) and parent of a process, from its one /proc/<pid>/stat.
fn stat(pid: u32, page: u64) -> Option<(u32, u64, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields after the command: ppid is field 4, utime 14, stime 15, rss 24 (proc(5)).
    let ppid = f.get(1)?.parse().ok()?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let rss: u64 = f.get(21)?.parse().ok()?;
    // USER_HZ is 100 for /proc on every architecture.
    Some((ppid, ticks * 10_000, rss * page))
}

/// Samples RSS and CPU time of every `(id, pid)` and its descendants.
///
/// `scopes` are the cgroup directories of the generations' scopes: one read of each
/// `cgroup.procs` lists every process, and one read of each process's `stat` gives all its
/// numbers, so a round costs about one file read per process (1024 workers: ~1 % of a core at
/// one round a second). Workers outside a readable scope are sampled by walking their tree.
pub fn sample(scopes: &[std::path::PathBuf], workers: &[(u64, u32)]) -> Vec<(u64, Sample)> {
    let page = rustix::param::page_size() as u64;
    let ids: std::collections::HashMap<u32, u64> = workers.iter().map(|(id, pid)| (*pid, *id)).collect();
    let mut procs: std::collections::HashMap<u32, (u32, u64, u64)> = std::collections::HashMap::new();
    for scope in scopes {
        let Ok(list) = fs::read_to_string(scope.join("cgroup.procs")) else { continue };
        for pid in list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            if let Some(s) = stat(pid, page) {
                procs.insert(pid, s);
            }
        }
    }
    let mut out: std::collections::HashMap<u64, Sample> = std::collections::HashMap::new();
    for (&pid, &(_, cpu, rss)) in &procs {
        // Attribute each process to the nearest worker among its ancestors.
        let mut p = pid;
        let owner = loop {
            if let Some(id) = ids.get(&p) {
                break Some(*id);
            }
            match procs.get(&p) {
                Some((parent, _, _)) if *parent != p => p = *parent,
                _ => break None,
            }
        };
        if let Some(id) = owner {
            let s = out.entry(id).or_default();
            s.rss += rss;
            s.cpu_usec += cpu;
        }
    }
    workers
        .iter()
        .map(|(id, pid)| {
            let s = match out.get(id) {
                Some(s) => *s,
                None if procs.contains_key(pid) => Sample::default(),
                None => {
                    let (rss, cpu_usec) = process::usage_of_tree(*pid);
                    Sample { rss, cpu_usec }
                }
            };
            (*id, s)
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
    fn a_scope_listing_attributes_children_to_their_worker() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let me = std::process::id();
        let dir = crate::test_dir("cgroup");
        std::fs::write(dir.join("cgroup.procs"), format!("{me}\n{}\n", child.id())).unwrap();
        let alone = sample(&[], &[(1, me)])[0].1;
        let with_child = sample(std::slice::from_ref(&dir), &[(1, me)])[0].1;
        let (child_rss, _) = process::usage_of_tree(child.id());
        assert!(child_rss > 0);
        // The test process's own RSS moves a little between the two reads.
        let diff = with_child.rss as i64 - alone.rss as i64 - child_rss as i64;
        assert!(
            diff.unsigned_abs() < 4 << 20,
            "child attributed to its worker: {alone:?} {with_child:?} {child_rss}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn samples_this_process_and_its_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let me = std::process::id();
        let s = sample(&[], &[(1, me)]);
        assert_eq!(s.len(), 1);
        assert!(s[0].1.rss > 1 << 20, "RSS of the test process: {:?}", s[0].1);
        let c = connections(&[(1, me)]);
        assert!(c[0].1 >= 2, "both ends of the connection are ours: {c:?}");
        assert_eq!(
            sample(&[], &[(2, u32::MAX - 1)])[0].1,
            Sample::default(),
            "a missing process samples as zero"
        );
    }
}
