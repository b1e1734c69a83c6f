//! `cargo xtask deb`: the Debian package, `target/debian/ipclusterd_<version>_<arch>.deb`.
//!
//! Built with `dpkg-deb --build` from a tree staged by [`crate::install::stage`] with
//! [`Layout::DEBIAN`] (the same files as `cargo xtask install`, in the distribution's places), plus
//! what a binary package carries: stripped binaries, `DEBIAN/control` (dependencies from
//! `dpkg-shlibdeps`), `conffiles`, `md5sums`, the maintainer scripts of `packaging/debian/`, the
//! copyright file and a changelog. Then `lintian` checks it: an error fails the build.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::install::{BINARIES, Layout};

const POSTINST: &str = include_str!("../../../packaging/debian/postinst");
const PRERM: &str = include_str!("../../../packaging/debian/prerm");
const POSTRM: &str = include_str!("../../../packaging/debian/postrm");
const COPYRIGHT: &str = include_str!("../../../packaging/debian/copyright");

const PACKAGE: &str = "ipclusterd";
const MAINTAINER: &str = "ipclusterd developers <ipclusterd@example.invalid>";
/// Run-time dependencies besides the shared libraries: the NAT rules, the system bus (any
/// implementation), the service manager the daemon creates scopes with, and polkit, which
/// authorizes callers other than root.
const DEPENDS: &str =
    "iptables, ipset, conntrack, systemd, default-dbus-system-bus | dbus-system-bus, polkitd";
const DESCRIPTION: &str = "\
network services as many processes, sticky sessions, zero-downtime deploys
 ipclusterd runs a network service, in any language, as N worker processes on
 one host. The kernel routes each client to a worker with NAT REDIRECT rules
 keyed on its IPv4 or IPv6 address (sticky sessions without a proxy). A
 deploy starts a new generation of workers in its own systemd scope and
 switches every client to it in one netfilter transaction, while established
 connections finish on the old workers. Workers outlive the daemon: an
 upgrade restarts ipclusterd, which adopts every running generation.
 .
 It is controlled over D-Bus (org.ipcluster1, also bus-activated) and with
 ipclusterctl. Apps are files in /etc/ipcluster/apps/; see the example there.
 .
 Removing the package stops the daemon and every app: their workers stop and
 their NAT rules are removed. App files and /var/lib/ipcluster are kept, and
 a reinstall starts the apps again. Purging also deletes /var/lib/ipcluster.";

#[derive(Debug, clap::Args)]
pub struct DebArgs {
    /// Do not build; package the binaries already built (in --bin-dir).
    #[arg(long)]
    no_build: bool,
    /// Where the release binaries are (default: release/ in the target directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The package's version (default: the workspace's).
    #[arg(long, value_name = "VERSION")]
    version: Option<String>,
    /// Directory to write the package to (default: debian/ in the target directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip lintian.
    #[arg(long)]
    no_lintian: bool,
}

pub fn run(args: &DebArgs) -> Result<()> {
    crate::packages::ensure(&[crate::packages::DEB])?;
    if !args.no_build {
        crate::install::build_release()?;
    }
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| crate::target().join("release"));
    let out = args.out.clone().unwrap_or_else(|| crate::target().join("debian"));
    let version = args.version.clone().unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
    let deb = build(&bin_dir, &version, &out)?;
    let size = fs::metadata(&deb)?.len();
    eprintln!("built {} ({} KiB)", deb.display(), size.div_ceil(1024));
    if !args.no_lintian {
        lintian(&deb)?;
    }
    println!("{}", deb.display());
    Ok(())
}

/// Builds the package from the binaries in `bin_dir` into `out`; returns its path.
pub fn build(bin_dir: &Path, version: &str, out: &Path) -> Result<PathBuf> {
    check_version(version)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // dpkg-shlibdeps wants the tree at debian/<package> beside a debian/control.
    let work = out.join(format!(".build-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(work.clone());
    let root = work.join("debian").join(PACKAGE);
    fs::create_dir_all(&root)?;
    crate::install::stage(&root, &Layout::DEBIAN, bin_dir)?;
    let binaries: Vec<PathBuf> =
        BINARIES
            .iter()
            .map(|b| {
                if *b == "ipclusterd" {
                    root.join(Layout::DEBIAN.daemon)
                } else {
                    root.join("usr/bin").join(b)
                }
            })
            .collect();
    for b in &binaries {
        // As dh_strip does; the package has no -dbgsym companion.
        crate::sh(
            Command::new("strip")
                .args(["--remove-section=.comment", "--remove-section=.note", "--strip-unneeded", "--"])
                .arg(b),
        )?;
    }

    let doc = root.join("usr/share/doc").join(PACKAGE);
    fs::create_dir_all(&doc)?;
    fs::write(doc.join("copyright"), COPYRIGHT)?;
    // A version without a Debian revision is a native package's: its changelog is changelog.gz.
    let changelog_path = doc.join(if version.contains('-') { "changelog.Debian" } else { "changelog" });
    fs::write(&changelog_path, changelog(version)?)?;
    crate::sh(Command::new("gzip").args(["-9nf", "--"]).arg(&changelog_path))?;

    let control_dir = root.join("DEBIAN");
    fs::create_dir_all(&control_dir)?;
    for (name, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let path = control_dir.join(name);
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    let conffiles = files_under(&root, "etc")?;
    let listed: String = conffiles.iter().map(|f| format!("/{}\n", f.display())).collect();
    fs::write(control_dir.join("conffiles"), listed)?;

    fs::write(
        work.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let mut shlibdeps = Command::new("dpkg-shlibdeps");
    shlibdeps.arg("-O").current_dir(&work);
    for b in &binaries {
        shlibdeps.arg(format!("-e{}", b.strip_prefix(&work)?.display()));
    }
    let shlibs = output(&mut shlibdeps)?;
    let shlibs = shlibs
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?;

    let files = files_under(&root, "")?;
    let mut md5 = Command::new("md5sum");
    md5.arg("--").args(&files).current_dir(&root);
    fs::write(control_dir.join("md5sums"), output(&mut md5)?)?;
    let installed_kib: u64 = files
        .iter()
        .map(|f| fs::symlink_metadata(root.join(f)).map(|m| m.len().div_ceil(1024)))
        .sum::<std::io::Result<u64>>()?;
    fs::write(
        control_dir.join("control"),
        format!(
            "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
             Installed-Size: {installed_kib}\nDepends: {shlibs}, {DEPENDS}\nSection: net\n\
             Priority: optional\nDescription: {DESCRIPTION}\n"
        ),
    )?;

    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    crate::sh(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&root).arg(&deb))?;
    Ok(deb)
}

/// Runs lintian on `deb`, printing what it says; fails on an error (`E:`).
pub fn lintian(deb: &Path) -> Result<()> {
    // lintian leaves temporary files (mldbm-elf-*) behind in $TMPDIR: give it one of its own.
    let tmp = RemoveOnDrop(deb.with_extension(format!("lintian-tmp-{}", std::process::id())));
    fs::create_dir_all(&tmp.0)?;
    let out = Command::new("lintian")
        .arg("--display-info")
        .arg(deb)
        .env("TMPDIR", &tmp.0)
        .output()
        .context("cannot run lintian")?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprint!("lintian:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    if !errors.is_empty() {
        bail!("lintian reports {} errors:\n{}", errors.len(), errors.join("\n"));
    }
    Ok(())
}

/// A Debian version of the characters policy allows (it names a file; nothing reaches a shell).
fn check_version(version: &str) -> Result<()> {
    let ok = version.chars().next().is_some_and(|c| c.is_ascii_digit())
        && version.chars().all(|c| c.is_ascii_alphanumeric() || ".+~-".contains(c));
    if !ok {
        bail!("{version:?} is not a Debian version (digits first, then [A-Za-z0-9.+~-])");
    }
    Ok(())
}

/// A one-entry changelog, dated `$SOURCE_DATE_EPOCH` (reproducible builds) or now.
fn changelog(version: &str) -> Result<String> {
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s.parse::<u64>().context("SOURCE_DATE_EPOCH is not a number")?,
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
    };
    let date =
        output(Command::new("date").args(["-u", "-R", "-d"]).arg(format!("@{epoch}")).env("LC_ALL", "C"))?;
    Ok(format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\n  * Package built by cargo xtask deb from the ipclusterd source.\n\n -- {MAINTAINER}  {}\n",
        date.trim()
    ))
}

/// Every file (not directory) under `root/dir`, relative to `root`, sorted.
fn files_under(root: &Path, dir: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.join(dir)];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let path = entry?.path();
            if path.strip_prefix(root)?.starts_with("DEBIAN") {
                continue;
            }
            if path.symlink_metadata()?.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(root)?.to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Stdout of a command that must succeed.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {}", crate::show(cmd)))?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", crate::show(cmd), out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_checked_before_they_name_a_file() {
        for good in ["0.1.0", "0.1.0+test2", "1.2~rc1-1"] {
            assert!(check_version(good).is_ok(), "{good}");
        }
        for bad in ["", "v1", "1 2", "1/../x", "1;rm"] {
            assert!(check_version(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_description_fits_debian_s_limits() {
        let mut lines = DESCRIPTION.lines();
        let synopsis = lines.next().unwrap();
        assert!(synopsis.len() <= 80 && !synopsis.ends_with('.'), "{synopsis}");
        for line in lines {
            assert!(line.starts_with(' ') && line.len() <= 80, "{line:?}");
        }
    }
}
