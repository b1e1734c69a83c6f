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
//! `conntrack -D -p tcp --state CLOSE --reply-port-src PORT`, in both families, drops those
//! entries once the worker has exited and a rule change that no longer names its port is in
//! force (before it, a recorded client's next connection would make a fresh entry there).
//! Only CLOSE ones: a connection of a new worker that got the same port is never touched. There
//! is no library for ctnetlink among the crates this project uses; the tool is run like
//! iptables and ipset (by absolute path, bounded in time).

use std::{path::PathBuf, time::Duration};

use super::RouterError;

/// Longest one run may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The `conntrack` program, if installed.
pub fn tool() -> Option<PathBuf> {
    super::program("conntrack")
}

/// The arguments that delete the CLOSE entries of `port` in `family` (`ipv4` or `ipv6`).
pub fn args(family: &'static str, port: u16) -> [String; 9] {
    ["-D", "-f", family, "-p", "tcp", "--state", "CLOSE", "--reply-port-src", &port.to_string()]
        .map(str::to_owned)
}

/// Whether a run that exited with a failure only found nothing to delete (`conntrack` exits
/// with 1 then).
fn found_nothing(e: &RouterError) -> bool {
    e.0.contains("0 flow entries have been deleted")
}

/// Drops the CLOSE entries of `ports`, both families. Errors are the caller's to log.
pub async fn forget_closed(tool: PathBuf, ports: Vec<u16>) -> Result<(), RouterError> {
    for port in ports {
        for family in ["ipv4", "ipv6"] {
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
    fn only_close_entries_of_the_port_are_named() {
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
