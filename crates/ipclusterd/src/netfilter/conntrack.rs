//! Forgetting the connection-tracking entries a gone worker's port leaves behind.
//!
//! When a worker is stopped with connections open, its side may reset them (a socket closed
//! with unread data, or still in the accept queue, sends RST). Each such connection stays in the
//! kernel's table in state CLOSE for `nf_conntrack_tcp_timeout_close` (10 s), with its NAT
//! mapping to the worker's port. The kernel reopens a CLOSE entry for a new SYN of the same
//! address and port only when the client sent the reset or a FIN was seen; otherwise the SYN
//! follows the old mapping, to the dead port, and the client's connection is refused although
//! the rules send it elsewhere. Clients that bind their address before connecting pick ports at
//! random, and meet this: the soak did, about once an hour, a few seconds after a KillRetired.
//!
//! Those entries are dropped once the worker has exited and a rule change that no longer names
//! its port is in force (before it, a recorded client's next connection would make a fresh entry
//! there). Only CLOSE ones: a connection of a new worker that got the same port is never touched.
//! There is no library for ctnetlink among the crates this project uses; the tool is run like
//! iptables and ipset (by absolute path, bounded in time).
//!
//! Each run of `conntrack` walks the kernel's whole table (every bucket of the hash, which is
//! shared by every network namespace: 262 144 of them on a 24 GiB host), about 14 ms of CPU
//! whether it finds anything or not — a deletion too, however exact its filter: `conntrack -D`
//! dumps and deletes what matches. So the ports of a batch (every worker that left since the last
//! rule change) cost one listing per family, `conntrack -L -p tcp --state CLOSE`, then
//! `conntrack -D -p tcp --state CLOSE --reply-port-src PORT` only for the ports that have such
//! entries, once each, however many there are — instead of a deletion per port and family,
//! found or not (a KillRetired of 8 workers ran 16 and spent about 200 ms of CPU; most batches
//! find nothing). A listing line that names one of the ports but cannot be read is deleted by
//! its port all the same.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use super::RouterError;

/// Longest one run may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The `conntrack` program, if installed.
pub fn tool() -> Option<PathBuf> {
    super::program("conntrack")
}

/// The arguments that list every CLOSE TCP entry of `family` (`ipv4` or `ipv6`).
fn list_args(family: &'static str) -> [&'static str; 7] {
    ["-L", "-f", family, "-p", "tcp", "--state", "CLOSE"]
}

/// The arguments that delete the CLOSE entries of `port` in `family`.
pub fn args(family: &'static str, port: u16) -> [String; 9] {
    ["-D", "-f", family, "-p", "tcp", "--state", "CLOSE", "--reply-port-src", &port.to_string()]
        .map(str::to_owned)
}

/// Which of `ports` have entries in a `conntrack -L` listing, in order. A line is
/// `tcp 6 9 CLOSE src=… dst=… sport=… dport=… [UNREPLIED] src=… dst=… sport=… dport=… …`: the
/// second `sport` is the reply's, the worker's port. A line that names one of `ports` in any
/// `sport` but does not read so counts for that port too (a deletion too many is one run; one
/// too few leaves a client refused).
fn ports_in(listing: &str, ports: &BTreeSet<u16>) -> BTreeSet<u16> {
    let mut found = BTreeSet::new();
    for line in listing.lines() {
        let sports: Vec<u16> = line
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("sport="))
            .filter_map(|p| p.parse().ok())
            .collect();
        match sports[..] {
            [_, reply] if ports.contains(&reply) => {
                found.insert(reply);
            }
            [_, _] => {}
            _ => found.extend(sports.iter().filter(|p| ports.contains(p))),
        }
    }
    found
}

/// Whether a run that exited with a failure only found nothing to delete (`conntrack` exits
/// with 1 then: the entry went meanwhile).
fn found_nothing(e: &RouterError) -> bool {
    e.0.contains("0 flow entries have been deleted")
}

/// Drops the CLOSE entries of `ports`, both families. Errors are the caller's to log.
pub async fn forget_closed(tool: PathBuf, ports: Vec<u16>) -> Result<(), RouterError> {
    let ports: BTreeSet<u16> = ports.into_iter().collect();
    for family in ["ipv4", "ipv6"] {
        let listing = super::run_tool(&tool, &list_args(family), None, TIMEOUT, (None, "")).await?;
        for port in ports_in(&String::from_utf8_lossy(&listing), &ports) {
            let args = args(family, port);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match super::run_tool(&tool, &args, None, TIMEOUT, (None, "")).await {
                Ok(_) => {}
                Err(e) if found_nothing(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_names_the_ports_that_have_close_entries_each_deleted_once_by_port() {
        let listing = "\
tcp      6 8 CLOSE src=127.0.0.9 dst=127.0.0.1 sport=40009 dport=80 src=127.0.0.1 dst=127.0.0.9 sport=20005 dport=40009 [ASSURED] mark=0 use=1
tcp      6 7 CLOSE src=127.0.0.10 dst=127.0.0.1 sport=40010 dport=80 src=127.0.0.1 dst=127.0.0.10 sport=20005 dport=40010 mark=0 zone=3 use=1
tcp      6 9 CLOSE src=127.0.0.8 dst=127.0.0.1 sport=40008 dport=80 src=127.0.0.1 dst=127.0.0.8 sport=20100 dport=40008 mark=0 use=1
tcp      6 3 CLOSE src=2001:db8::1:2 dst=2001:db8::9 sport=41000 dport=80 [UNREPLIED] src=2001:db8::9 dst=2001:db8::1:2 sport=20006 dport=41000 mark=0 use=1
tcp      6 3 CLOSE src=127.0.0.7 dst=127.0.0.1 sport=20007 dport=80
tcp      6 3 CLOSE src=127.0.0.6 dst=127.0.0.1 sport=20100 dport=80
";
        let found = ports_in(listing, &BTreeSet::from([20005, 20006, 20007, 20008]));
        assert_eq!(
            found,
            BTreeSet::from([20005, 20006, 20007]),
            "each port once (20005 has two entries); another port's entry is left; a line that \
             does not read as an entry counts for a port of ours it names"
        );
        assert!(ports_in("", &BTreeSet::from([20005])).is_empty());
        assert_eq!(list_args("ipv6").join(" "), "-L -f ipv6 -p tcp --state CLOSE");
        assert_eq!(args("ipv6", 20005).join(" "), "-D -f ipv6 -p tcp --state CLOSE --reply-port-src 20005");
    }

    #[test]
    fn nothing_to_delete_is_not_an_error() {
        let e = RouterError(
            "conntrack failed (exit status: 1): conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."
                .into(),
        );
        assert!(found_nothing(&e));
        assert!(!found_nothing(&RouterError("conntrack failed: Operation not permitted".into())));
    }
}
