//! `cargo xtask test`: what CI runs (`.ci/run`).
//!
//! 1. installs the system packages the tests need when missing (as root, with apt-get);
//! 2. `cargo fmt --check` and `cargo clippy -D warnings`;
//! 3. builds the release binaries that sandboxes install, and checks that a sandbox boots and
//!    installs them from a checkout under /tmp whose path has a space ([`checkout_under_tmp`]);
//! 4. builds the Ansible collection with Ansible from PyPI and runs `ansible-test sanity` on it
//!    (`cargo xtask ansible --sanity`), and installs the npm packages the end-to-end tests use
//!    (Socket.IO: `crate::npm`) into the target directory;
//! 5. runs every test with cargo-nextest: unit, adapter and end-to-end (the Ansible collection's
//!    among them). End-to-end tests need root; without it they are skipped, and the output says so
//!    and why. Adapter and kernel tests that need root are `#[ignore]`d: run (`--run-ignored all`)
//!    as root, reported as skipped otherwise;
//! 6. runs the 3-minute chaos soak with a fixed seed (`cargo xtask soak`, `crate::soak`) unless
//!    `--no-soak` says otherwise;
//! 7. checks that the host's netfilter rules, /etc and a marker in /tmp are as they were.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub fn run(unit_only: bool, no_soak: bool, nextest_args: &[String]) -> Result<()> {
    let root = nix::unistd::Uid::effective().is_root();
    let e2e_skip = if unit_only {
        Some("--unit-only was given".to_owned())
    } else {
        ipcluster_sandbox::unavailable_reason()
    };
    if root {
        crate::packages::ensure(&[
            crate::packages::ANSIBLE,
            crate::packages::RUNTIME,
            crate::packages::SANDBOX,
            crate::packages::TESTS,
            crate::packages::DEB,
        ])?;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::sh(Command::new(&cargo).args(["fmt", "--all", "--check"]))?;
    crate::sh(Command::new(&cargo).args([
        "clippy",
        "--locked",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    if e2e_skip.is_none() {
        crate::demo::build()?;
        checkout_under_tmp()?;
    }
    crate::ansible::run(&crate::ansible::AnsibleArgs { sanity: true })?;
    let node_modules = if e2e_skip.is_none() { Some(crate::npm::ensure()?) } else { None };

    let before = HostState::capture()?;
    let mut cmd = Command::new(&cargo);
    // cargo-nextest runs each test in its own process (sandboxes of a killed test are collected
    // by the next boot); plain `cargo test` is the fallback where it is not installed.
    let nextest =
        Command::new(&cargo).args(["nextest", "--version"]).output().is_ok_and(|o| o.status.success());
    if nextest {
        cmd.args(["nextest", "run", "--locked", "--workspace", "--no-fail-fast"]);
    } else {
        eprintln!("cargo-nextest not found (cargo install cargo-nextest); using cargo test");
        cmd.args(["test", "--locked", "--workspace", "--no-fail-fast"]);
    }
    // Tests that need root (real netfilter and eBPF in namespaces of their own) are
    // `#[ignore = "needs root…"]`: as root they run; as another user the runner reports each as
    // skipped, by name, and the summary below says so.
    if root {
        cmd.args(if nextest { &["--run-ignored", "all"][..] } else { &["--", "--include-ignored"][..] });
    } else {
        eprintln!("\n*** not root: the tests marked `needs root` are reported as skipped, not run ***\n");
    }
    if let Some(why) = &e2e_skip {
        cmd.args(["--exclude", "ipcluster-e2e"]);
        eprintln!("\n*** END-TO-END TESTS SKIPPED: {why} ***\n");
    } else {
        let xtask = std::env::current_exe()?;
        cmd.env("IPCLUSTER_XTASK", xtask)
            .env("IPCLUSTER_BIN_DIR", crate::target().join("release"))
            .env(ipcluster_sandbox::TARGET_DIR_VAR, crate::target())
            .env("IPCLUSTER_ANSIBLE_DIR", crate::ansible::dir());
        if let Some(m) = &node_modules {
            cmd.env("IPCLUSTER_NODE_MODULES", m);
        }
    }
    cmd.args(nextest_args);
    let tests = crate::sh(&mut cmd);
    let soak_skip = e2e_skip.clone().or_else(|| no_soak.then(|| "--no-soak was given".to_owned()));
    let soak = match &soak_skip {
        None => crate::soak::run(&crate::soak::SoakArgs::ci()),
        Some(why) => {
            eprintln!("\n*** SOAK SKIPPED: {why} ***\n");
            Ok(())
        }
    };
    ipcluster_sandbox::collect_stale();
    let after = HostState::capture()?;
    before.ensure_same(&after)?;
    drop(before);
    tests?;
    soak?;
    if let Some(why) = &e2e_skip {
        eprintln!("\n*** unit tests passed; END-TO-END TESTS WERE SKIPPED: {why} ***");
    }
    Ok(())
}

/// A sandbox works from a checkout anywhere: boots one whose work directory and build are under
/// `/tmp/ipcluster self-check <pid>/` (covered by the sandbox's own /tmp, and with a space),
/// hides this workspace inside it as a checkout under /tmp would be, installs that build and
/// starts the daemon. The directory is removed afterwards.
fn checkout_under_tmp() -> Result<()> {
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let dir = Remove(PathBuf::from(format!("/tmp/ipcluster self-check {}", std::process::id())));
    let bin = dir.0.join("bin");
    fs::create_dir_all(&bin)?;
    let release = crate::target().join("release");
    let xtask = std::env::current_exe()?;
    let files = crate::install::BINARIES.iter().map(|b| (release.join(b), bin.join(b)));
    for (from, to) in files.chain([(xtask, bin.join("xtask"))]) {
        // A hard link where /tmp is on the same file system; a copy where it is not.
        if fs::hard_link(&from, &to).is_err() {
            fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    let build = ipcluster_sandbox::Build { xtask: bin.join("xtask"), bin_dir: bin.clone() };
    let sandbox = ipcluster_sandbox::Sandbox::boot_with(ipcluster_sandbox::Options {
        base_dir: Some(dir.0.join("sandboxes")),
        build: Some(build),
        share: Vec::new(),
    })
    .context("booting a sandbox from a checkout under /tmp")?;
    // xtask knows the workspace by its path at build time; a checkout under /tmp is not there
    // inside. A tmpfs over it, in the sandbox's (private) mount namespace, makes it so here.
    let workspace = crate::root();
    if sandbox.host_path(&workspace).is_dir() {
        sandbox.check([
            OsStr::new("mount"),
            OsStr::new("-t"),
            OsStr::new("tmpfs"),
            OsStr::new("tmpfs"),
            workspace.as_os_str(),
        ])?;
    }
    sandbox.install().context("installing from a checkout under /tmp")?;
    sandbox.check(["systemctl", "start", "ipclusterd"])?;
    let version = sandbox.check(["ipclusterctl", "version"])?;
    if version.trim() != env!("CARGO_PKG_VERSION") {
        bail!("ipclusterctl version in the sandbox from /tmp said {version:?}");
    }
    sandbox.teardown()?;
    eprintln!("self-check: a sandbox boots and installs from {:?}: ok", dir.0);
    Ok(())
}

/// What the tests must leave exactly as they found it on the host.
#[derive(Debug)]
struct HostState {
    netfilter: String,
    etc: BTreeMap<PathBuf, (u64, i64)>,
    marker: PathBuf,
}

impl HostState {
    fn capture() -> Result<Self> {
        let marker = std::env::temp_dir().join(format!("ipcluster-xtask-marker-{}", std::process::id()));
        if !marker.exists() {
            fs::write(&marker, "left by cargo xtask test; the tests must not remove it\n")?;
        }
        Ok(Self { netfilter: netfilter_rules()?, etc: tree(Path::new("/etc")), marker })
    }

    fn ensure_same(&self, after: &Self) -> Result<()> {
        if self.netfilter != after.netfilter {
            bail!(
                "the host's netfilter rules changed during the tests:\nbefore:\n{}\nafter:\n{}",
                self.netfilter,
                after.netfilter
            );
        }
        if self.etc != after.etc {
            let changed: Vec<_> = self
                .etc
                .keys()
                .chain(after.etc.keys())
                .filter(|k| self.etc.get(*k) != after.etc.get(*k))
                .take(20)
                .collect();
            bail!("the host's /etc changed during the tests: {changed:?}");
        }
        if !self.marker.exists() {
            bail!("the marker {} in the host's /tmp disappeared during the tests", self.marker.display());
        }
        Ok(())
    }
}

impl Drop for HostState {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.marker);
    }
}

/// The host's whole ruleset, as nft sees it (covers iptables-nft and native nft tables of
/// every family), or iptables-save and ip6tables-save where nft is not installed.
fn netfilter_rules() -> Result<String> {
    let runs: Vec<(&str, &[&str])> = if Path::new("/usr/sbin/nft").exists() {
        vec![("nft", &["list", "ruleset"])]
    } else {
        ["iptables-save", "ip6tables-save"]
            .into_iter()
            .filter(|p| Path::new("/usr/sbin").join(p).exists())
            .map(|p| (p, &[][..]))
            .collect()
    };
    let mut text = String::new();
    for (prog, args) in runs {
        let out = Command::new(prog).args(args).output().with_context(|| format!("cannot run {prog}"))?;
        // iptables-save prints a timestamp comment; drop comments.
        for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.starts_with('#')) {
            text.push_str(line);
            text.push('\n');
        }
    }
    Ok(text)
}

/// Size and mtime of every file under `dir` (not following symlinks).
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path(), (m.size(), m.mtime()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// Every test that `.config/nextest.toml` names to run alone exists under that name: a
    /// renamed test would otherwise drop out of the filter silently and run beside three
    /// sandboxes again.
    #[test]
    fn every_test_named_in_the_nextest_config_exists() {
        let root = crate::root();
        let config = std::fs::read_to_string(root.join(".config/nextest.toml")).unwrap();
        let names: Vec<&str> =
            config.split("test(=").skip(1).map(|rest| rest.split(')').next().unwrap()).collect();
        assert!(names.len() >= 6, "the config names the tests that run alone: {names:?}");
        let mut sources = String::new();
        for dir in ["tests/tests", "crates/ipcluster-steer/tests"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                sources += &std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
            }
        }
        for name in names {
            assert!(
                sources.contains(&format!("fn {name}()")),
                "no test named {name}: fix .config/nextest.toml"
            );
        }
    }
}
