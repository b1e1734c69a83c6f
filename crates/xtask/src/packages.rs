//! The Debian packages each project command needs on the host, and the one function that installs
//! the missing ones ([`ensure`]), so `cargo xtask demo`, `bench`, `deb`, `test` and `install`
//! (into `/`) each work first, on their own, on a fresh Debian 12 machine.
//!
//! A sandbox's /etc, /usr and /var are overlays of the host's, so whatever a sandbox runs (iptables,
//! the system bus, polkit) must be installed on the host: the sandbox has no network.

use std::{path::Path, process::Command};

use anyhow::{Result, bail};

/// A Debian package and a file that shows it is installed.
pub type Need = (&'static str, &'static str);

/// What the daemon needs on a host (the package's dependencies): systemd, the system bus,
/// iptables, ipset (session affinity in NAT mode), conntrack (a stopped worker's reset
/// connections), and polkit, which authorizes callers other
/// than root.
pub const RUNTIME: &[Need] = &[
    ("systemd", "/lib/systemd/systemd"),
    ("dbus", "/usr/bin/dbus-daemon"),
    ("iptables", "/usr/sbin/iptables-restore"),
    ("ipset", "/usr/sbin/ipset"),
    ("conntrack", "/usr/sbin/conntrack"),
    ("polkitd", "/usr/lib/polkit-1/polkitd"),
];

/// What a sandbox needs besides [`RUNTIME`] (the daemon runs inside): unshare, nsenter, ip.
pub const SANDBOX: &[Need] = &[("iproute2", "/usr/sbin/ip"), ("util-linux", "/usr/bin/nsenter")];

/// What the end-to-end tests run inside sandboxes besides: `kill` and `pgrep`; tmux, the real
/// terminal `ipclusterctl top` is tested in; `curl`, and a Prometheus server and `promtool` that
/// scrape and check `/metrics`; for the fleet (tests/tests/fleet.rs), sshd on each host, ssh and
/// ssh-keygen on the operator's, and HAProxy in front; Node.js and npm for the Socket.IO apps and
/// clients of the session tests (their packages come from npm: `crate::npm`). Their services
/// start only where a test starts them: a sandbox boots none of the host's.
pub const TESTS: &[Need] = &[
    ("nodejs", "/usr/bin/node"),
    ("npm", "/usr/bin/npm"),
    ("procps", "/bin/kill"),
    ("tmux", "/usr/bin/tmux"),
    ("curl", "/usr/bin/curl"),
    ("prometheus", "/usr/bin/prometheus"),
    ("openssh-server", "/usr/sbin/sshd"),
    ("openssh-client", "/usr/bin/ssh"),
    ("haproxy", "/usr/sbin/haproxy"),
];

/// What `cargo xtask ansible` needs: Python's `venv` and `ensurepip` (Ansible comes from PyPI into
/// a virtual environment), git (`ansible-test` lists a collection's files with it).
pub const ANSIBLE: &[Need] =
    &[("python3-venv", "/usr/lib/python3.11/ensurepip/__init__.py"), ("git", "/usr/bin/git")];

/// What `cargo xtask deb` runs: dpkg-shlibdeps, strip, lintian.
pub const DEB: &[Need] = &[
    ("dpkg-dev", "/usr/bin/dpkg-shlibdeps"),
    ("binutils", "/usr/bin/strip"),
    ("lintian", "/usr/bin/lintian"),
];

/// What the benchmarks compare ipclusterd with.
pub const BENCH: &[Need] =
    &[("haproxy", "/usr/sbin/haproxy"), ("nodejs", "/usr/bin/node"), ("npm", "/usr/bin/npm")];

/// The packages of `needs` that are not installed.
pub fn missing(needs: &[&[Need]]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = needs
        .iter()
        .flat_map(|set| set.iter())
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Installs whatever of `needs` is missing, with apt-get (as root). Without root, a missing
/// package is an error that names the command to run.
pub fn ensure(needs: &[&[Need]]) -> Result<()> {
    let missing = missing(needs);
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("missing packages: {0} (as root: apt-get install {0})", missing.join(" "));
    }
    eprintln!("installing missing packages: {}", missing.join(" "));
    crate::sh(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    crate::sh(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_packages_whose_file_is_absent_are_missing_each_once() {
        const A: &[Need] = &[("present", "/"), ("absent", "/nonexistent/ipcluster-probe")];
        const B: &[Need] = &[("absent", "/nonexistent/ipcluster-probe")];
        assert_eq!(missing(&[A, B]), ["absent"]);
        assert!(missing(&[&[("present", "/")]]).is_empty());
    }
}
