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
//! whether it finds anything or not. So the ports of a batch (every worker that left since the
//! last rule change) cost one listing per family, `conntrack -L -p tcp --state CLOSE`, and one
//! deletion per entry found on one of them — by its exact tuple, still only in state CLOSE —
//! instead of a deletion per port and family (a KillRetired of 8 workers ran 16 and spent about
//! 200 ms of CPU; most batches find nothing).

use std::{collections::HashSet, path::PathBuf, time::Duration};

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

/// A CLOSE entry found in a listing: its original direction, and the port its reply comes from
/// (the worker's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Closed {
    src: String,
    dst: String,
    sport: u16,
    dport: u16,
    reply_sport: u16,
}

impl Closed {
    /// The arguments that delete this entry alone, and only while it is still CLOSE with the
    /// same reply port.
    fn delete_args(&self, family: &'static str) -> Vec<String> {
        let (sport, dport, reply) =
            (self.sport.to_string(), self.dport.to_string(), self.reply_sport.to_string());
        ["-D", "-f", family, "-p", "tcp", "--state", "CLOSE", "-s", &self.src, "-d", &self.dst]
            .into_iter()
            .chain(["--sport", &sport, "--dport", &dport, "--reply-port-src", &reply])
            .map(str::to_owned)
            .collect()
    }
}

/// The entries of a `conntrack -L` listing whose reply comes from one of `ports`. A line is
/// `tcp 6 9 CLOSE src=… dst=… sport=… dport=… src=… dst=… sport=… dport=… [flags] mark=… use=…`:
/// the first `src`/`dst`/`sport`/`dport` are the original direction, the next ones the reply's.
/// Lines that do not read so are skipped.
fn closed_on(listing: &str, ports: &HashSet<u16>) -> Vec<Closed> {
    listing
        .lines()
        .filter_map(|line| {
            let mut fields: Vec<(&str, &str)> = Vec::new();
            for (k, v) in line.split_whitespace().filter_map(|w| w.split_once('=')) {
                if matches!(k, "src" | "dst" | "sport" | "dport") {
                    fields.push((k, v));
                }
            }
            let [("src", src), ("dst", dst), ("sport", sport), ("dport", dport), _, _, ("sport", reply), _] =
                fields[..]
            else {
                return None;
            };
            let reply_sport = reply.parse().ok().filter(|p| ports.contains(p))?;
            Some(Closed {
                src: src.to_owned(),
                dst: dst.to_owned(),
                sport: sport.parse().ok()?,
                dport: dport.parse().ok()?,
                reply_sport,
            })
        })
        .collect()
}

/// Whether a run that exited with a failure only found nothing to delete (`conntrack` exits
/// with 1 then: the entry went meanwhile).
fn found_nothing(e: &RouterError) -> bool {
    e.0.contains("0 flow entries have been deleted")
}

/// Drops the CLOSE entries of `ports`, both families. Errors are the caller's to log.
pub async fn forget_closed(tool: PathBuf, ports: Vec<u16>) -> Result<(), RouterError> {
    let ports: HashSet<u16> = ports.into_iter().collect();
    for family in ["ipv4", "ipv6"] {
        let listing = super::run_tool(&tool, &list_args(family), None, TIMEOUT, (None, "")).await?;
        for entry in closed_on(&String::from_utf8_lossy(&listing), &ports) {
            let args = entry.delete_args(family);
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
    fn a_listing_yields_the_close_entries_of_our_ports_each_deleted_by_its_exact_tuple() {
        let listing = "\
tcp      6 8 CLOSE src=127.0.0.9 dst=127.0.0.1 sport=40009 dport=80 src=127.0.0.1 dst=127.0.0.9 sport=20005 dport=40009 [ASSURED] mark=0 use=1
tcp      6 9 CLOSE src=127.0.0.8 dst=127.0.0.1 sport=40008 dport=80 src=127.0.0.1 dst=127.0.0.8 sport=20100 dport=40008 mark=0 use=1
tcp      6 3 CLOSE src=::1 dst=::1 sport=41000 dport=80 src=::1 dst=::1 sport=20006 dport=41000 [ASSURED] mark=0 use=1
tcp      6 3 CLOSE src=127.0.0.7 dst=127.0.0.1 sport=40007 dport=80 sport=20005
garbage sport=20005
";
        let found = closed_on(listing, &HashSet::from([20005, 20006]));
        assert_eq!(
            found,
            [
                Closed {
                    src: "127.0.0.9".into(),
                    dst: "127.0.0.1".into(),
                    sport: 40009,
                    dport: 80,
                    reply_sport: 20005
                },
                Closed { src: "::1".into(), dst: "::1".into(), sport: 41000, dport: 80, reply_sport: 20006 },
            ],
            "another port's entry and lines that do not read as entries are left"
        );
        assert_eq!(
            found[0].delete_args("ipv4").join(" "),
            "-D -f ipv4 -p tcp --state CLOSE -s 127.0.0.9 -d 127.0.0.1 --sport 40009 --dport 80 --reply-port-src 20005"
        );
        assert_eq!(list_args("ipv6").join(" "), "-L -f ipv6 -p tcp --state CLOSE");
        assert!(closed_on("", &HashSet::from([20005])).is_empty());
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
