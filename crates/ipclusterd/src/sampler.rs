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

/// Small kernel files (/proc, cgroupfs) read round after round: each is opened once and read
/// again from offset 0 with `pread` (the kernel makes its text anew), so a read is one system
/// call instead of the four of `fs::read_to_string` (open, statx, read to the end, close). A
/// file not read for [`KEEP_ROUNDS`] rounds is closed (its worker is gone: a worker in the
/// rotating share is read every few rounds). The descriptors are close-on-exec.
#[derive(Debug, Default)]
struct Reader {
    /// Each open file (by its path's bytes: a `Path` hashes and compares component by
    /// component, which cost more than the read) and the round it was last read in.
    open: std::collections::HashMap<std::ffi::OsString, (fs::File, u64)>,
    round: u64,
    buf: Vec<u8>,
    /// Where each worker's cgroup was found (`<scope>/worker-<pid>/cgroup.procs`), so that a
    /// round opens only that one file, whatever the number of scopes.
    found: std::collections::HashMap<u32, std::path::PathBuf>,
}

/// Rounds a kept file may go unread before it is closed: longer than the rotating share's
/// cycle ([`SHARE`] workers a round) up to 8,192 workers.
const KEEP_ROUNDS: u64 = 64;

impl Reader {
    /// The text of `path`, from its kept descriptor or a new one (once more if the kept one
    /// fails: its process ended, its cgroup was removed).
    fn read(&mut self, path: &std::path::Path) -> Option<&str> {
        use std::os::unix::fs::FileExt;
        let Reader { open, round, buf, .. } = self;
        let key = path.as_os_str();
        let mut len = 0;
        for fresh in [false, true] {
            if fresh || !open.contains_key(key) {
                open.insert(key.to_owned(), (fs::File::open(path).ok()?, *round));
            }
            let entry = open.get_mut(key)?;
            entry.1 = *round;
            let f = &entry.0;
            buf.clear();
            buf.resize(4096, 0);
            len = 0;
            let ok = loop {
                match f.read_at(&mut buf[len..], len as u64) {
                    Ok(n) => {
                        len += n;
                        if n == 0 || len < buf.len() {
                            break true;
                        }
                        buf.resize(buf.len() * 2, 0);
                    }
                    Err(_) => break false,
                }
            };
            if ok {
                break;
            }
            open.remove(key);
            if fresh {
                return None;
            }
        }
        std::str::from_utf8(&buf[..len]).ok()
    }

    /// Closes what was not read for [`KEEP_ROUNDS`] rounds, and starts the next round.
    fn end_round(&mut self) {
        let round = self.round;
        self.open.retain(|_, (_, last)| round - *last < KEEP_ROUNDS);
        let open = &self.open;
        self.found.retain(|_, path| open.contains_key(path.as_os_str()));
        self.round += 1;
    }
}

/// RSS (bytes), CPU time (µs) and parent of a process, from its one /proc/<pid>/stat.
fn stat(pid: u32, page: u64, reader: &mut Reader) -> Option<(u32, u64, u64)> {
    let text = reader.read(std::path::Path::new(&format!("/proc/{pid}/stat")))?;
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
/// `scopes` are the cgroup directories of the generations' scopes: one read of the
/// `cgroup.procs` of each scope and of each worker's cgroup below it lists every process, and
/// one read of each process's `stat` gives all its numbers, so a round costs about two small
/// file reads per worker.
/// Workers outside a readable scope are sampled by walking their tree, which costs far more.
pub fn sample(scopes: &[std::path::PathBuf], workers: &[(u64, u32)]) -> Vec<(u64, Sample)> {
    let page = rustix::param::page_size() as u64;
    let ids: std::collections::HashMap<u32, u64> = workers.iter().map(|(id, pid)| (*pid, *id)).collect();
    // One sampling round at a time (the supervisor never overlaps them); a test's rounds wait.
    static READER: std::sync::Mutex<Option<Reader>> = std::sync::Mutex::new(None);
    let mut guard = READER.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let reader = guard.get_or_insert_with(Reader::default);
    let wanted: HashSet<u32> = workers.iter().map(|(_, pid)| *pid).collect();
    let procs: std::collections::HashMap<u32, (u32, u64, u64)> = cgroup_pids(scopes, &wanted, reader)
        .into_iter()
        .filter_map(|pid| Some((pid, stat(pid, page, reader)?)))
        .collect();
    reader.end_round();
    drop(guard);
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

/// The processes in `scopes` and in the cgroups of the `wanted` workers below them
/// (`worker-<pid>`; a round may sample only a share of the workers, see [`next_share`]). Each
/// worker's cgroup is read by its name, never by listing a scope (at 1,024 workers a listing
/// cost as much as the rest of a round): looked for in each scope the first time, then read
/// where it was found. A cgroup a worker made below its own, or beside it, is not read: only a
/// root worker can make one, since the daemon owns the tree.
fn cgroup_pids(scopes: &[std::path::PathBuf], wanted: &HashSet<u32>, reader: &mut Reader) -> Vec<u32> {
    let mut pids = Vec::new();
    let listed = |text: Option<&str>, pids: &mut Vec<u32>| match text {
        Some(list) => {
            pids.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            true
        }
        None => false,
    };
    for scope in scopes {
        listed(reader.read(&scope.join("cgroup.procs")), &mut pids);
    }
    for pid in wanted {
        if let Some(path) = reader.found.remove(pid)
            && listed(reader.read(&path), &mut pids)
        {
            reader.found.insert(*pid, path);
            continue;
        }
        for scope in scopes {
            let path = scope.join(crate::process::worker_cgroup_name(*pid)).join("cgroup.procs");
            if listed(reader.read(&path), &mut pids) {
                reader.found.insert(*pid, path);
                break;
            }
        }
    }
    pids
}

/// At most this many workers are sampled in a round for numbers only shown (ListWorkers,
/// /metrics, `ipclusterctl top`): with more, each round takes the next share, so each worker's
/// numbers are at most `ceil(n / SHARE)` rounds old. Workers a memory policy watches are
/// sampled every round ([`crate::supervisor`]'s health).
pub const SHARE: usize = 128;

/// The share of the round after the one that ended at worker `cursor`: the next [`SHARE`]
/// workers by id, wrapping around (every worker when there are no more). Found in the map
/// without walking it: at 1,024 workers a walk of them all each round cost as much as the
/// round's reads.
pub fn next_share<V>(workers: &std::collections::BTreeMap<u64, V>, cursor: u64) -> Vec<(u64, &V)> {
    if workers.len() <= SHARE {
        return workers.iter().map(|(id, v)| (*id, v)).collect();
    }
    let after = workers.range(cursor.saturating_add(1)..).chain(workers.range(..=cursor));
    after.take(SHARE).map(|(id, v)| (*id, v)).collect()
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

    /// Workers live in cgroups of their own below their scope's (which then lists no process):
    /// a round reads them, not the slow /proc walk.
    #[test]
    fn the_cgroups_below_a_scope_are_read_too() {
        let dir = crate::test_dir("cgroup-nested");
        let many: String = (1000..3000).map(|p| format!("{p}\n")).collect();
        for (sub, pids) in
            [("", "10\n"), ("worker-11", "11\n"), ("worker-13", "13\n"), ("worker-14", many.as_str())]
        {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::write(dir.join(sub).join("cgroup.procs"), pids).unwrap();
        }
        let mut reader = Reader::default();
        let all: HashSet<u32> = [11, 13, 14].into();
        let mut pids = cgroup_pids(std::slice::from_ref(&dir), &all, &mut reader);
        pids.sort_unstable();
        let want: Vec<u32> = [10, 11, 13].into_iter().chain(1000..3000).collect();
        assert_eq!(pids, want, "a listing longer than one read is read whole");
        let mut pids = cgroup_pids(std::slice::from_ref(&dir), &[13].into(), &mut reader);
        pids.sort_unstable();
        assert_eq!(pids, [10, 13], "only the cgroups of the workers asked for (and the scope's own)");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// With several scopes (every running generation of every app), a worker's cgroup is looked
    /// for in each only the first time; later rounds read it where it was found, and look again
    /// once it is gone.
    #[test]
    fn a_workers_cgroup_is_looked_for_once_and_then_read_where_it_was() {
        let dir = crate::test_dir("cgroup-scopes");
        let scopes: Vec<std::path::PathBuf> = (0..3).map(|i| dir.join(format!("s{i}"))).collect();
        for s in &scopes {
            std::fs::create_dir_all(s).unwrap();
            std::fs::write(s.join("cgroup.procs"), "").unwrap();
        }
        std::fs::create_dir_all(scopes[2].join("worker-7")).unwrap();
        std::fs::write(scopes[2].join("worker-7").join("cgroup.procs"), "7\n70\n").unwrap();
        let mut reader = Reader::default();
        let wanted: HashSet<u32> = [7].into();
        assert_eq!(cgroup_pids(&scopes, &wanted, &mut reader), [7, 70]);
        let at = scopes[2].join("worker-7").join("cgroup.procs");
        assert_eq!(reader.found.get(&7), Some(&at), "found in the third scope");
        reader.end_round();
        assert_eq!(cgroup_pids(&scopes, &wanted, &mut reader), [7, 70], "read again where it was");
        // Gone from there: looked for again, and found in the first scope. (On cgroupfs a kept
        // descriptor of a removed cgroup fails; a plain file's stays readable, so it is dropped.)
        std::fs::remove_dir_all(scopes[2].join("worker-7")).unwrap();
        reader.open.clear();
        std::fs::create_dir_all(scopes[0].join("worker-7")).unwrap();
        std::fs::write(scopes[0].join("worker-7").join("cgroup.procs"), "7\n").unwrap();
        assert_eq!(cgroup_pids(&scopes, &wanted, &mut reader), [7]);
        assert_eq!(reader.found.get(&7), Some(&scopes[0].join("worker-7").join("cgroup.procs")));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn every_worker_is_in_a_share_within_a_cycle() {
        for total in [1u64, 64, SHARE as u64, SHARE as u64 + 1, 1024, 1500] {
            // Ids with gaps, as workers leave and new ones come.
            let workers: std::collections::BTreeMap<u64, ()> = (0..total).map(|i| (i * 3 + 5, ())).collect();
            let rounds = (total as usize).div_ceil(SHARE);
            let mut seen: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
            let mut cursor = 0;
            for _ in 0..rounds {
                let share = next_share(&workers, cursor);
                assert!(share.len() <= SHARE, "{total}: {} in a round", share.len());
                share.iter().for_each(|(id, _)| *seen.entry(*id).or_default() += 1);
                cursor = share.last().unwrap().0;
            }
            assert_eq!(seen.len() as u64, total, "{total}: every worker within {rounds} rounds");
        }
        let few: std::collections::BTreeMap<u64, ()> = (0..100).map(|i| (i, ())).collect();
        assert_eq!(next_share(&few, 40).len(), 100, "up to SHARE workers: all, every round");
        let many: std::collections::BTreeMap<u64, ()> = (0..300).map(|i| (i, ())).collect();
        let wrapped: Vec<u64> = next_share(&many, 250).iter().map(|(id, _)| *id).collect();
        assert_eq!(
            wrapped,
            (251..300).chain(0..79).collect::<Vec<u64>>(),
            "past the last id: from the first"
        );
    }

    #[test]
    fn a_kept_descriptor_reads_its_file_anew_and_unread_files_are_closed() {
        let dir = crate::test_dir("reader");
        let path = dir.join("f");
        std::fs::write(&path, "one").unwrap();
        let mut r = Reader::default();
        assert_eq!(r.read(&path), Some("one"));
        std::fs::write(&path, "two, longer").unwrap();
        assert_eq!(r.read(&path), Some("two, longer"), "the same descriptor, read again from 0");
        // Read in round 0; rounds 1..=KEEP_ROUNDS read nothing.
        for _ in 0..KEEP_ROUNDS {
            r.end_round();
            assert_eq!(r.open.len(), 1, "kept while its worker may come round again");
        }
        r.end_round();
        assert!(r.open.is_empty(), "a file not read for KEEP_ROUNDS rounds is closed");
        let me = std::process::id();
        for _ in 0..2 {
            let text = r.read(std::path::Path::new(&format!("/proc/{me}/stat"))).unwrap().to_owned();
            assert!(text.starts_with(&format!("{me} (")), "{text}");
        }
        assert_eq!(r.read(&dir.join("missing")), None);
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
