//! `cargo xtask install`: the one install path, used by operators and by every sandbox.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Binaries that are installed to `<root>/usr/local/bin`.
pub const BINARIES: [&str; 3] = ["ipclusterd", "ipclusterctl", "ipcluster-demo"];

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Install under this root instead of `/` (packaging, tests).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Do not build; install binaries already built (in --bin-dir).
    #[arg(long)]
    no_build: bool,
    /// Where the release binaries are.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

pub fn run(args: &InstallArgs) -> Result<()> {
    let src = crate::root();
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| src.join("target/release"));
    if !args.no_build {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["build", "--release", "--locked"]);
        for b in BINARIES {
            cmd.args(["--bin", b]);
        }
        crate::sh(&mut cmd)?;
    }
    let root = &args.root;
    for b in BINARIES {
        install_file(&bin_dir.join(b), &root.join("usr/local/bin").join(b), 0o755)?;
    }
    for unit in ["ipclusterd.service", "ipcluster.slice"] {
        install_file(&src.join("systemd").join(unit), &root.join("etc/systemd/system").join(unit), 0o644)?;
    }
    install_file(
        &src.join("dbus/org.ipcluster1.conf"),
        &root.join("etc/dbus-1/system.d/org.ipcluster1.conf"),
        0o644,
    )?;
    install_file(
        &src.join("dbus/org.ipcluster1.policy"),
        &root.join("usr/share/polkit-1/actions/org.ipcluster1.policy"),
        0o644,
    )?;
    install_file(
        &src.join("dbus/org.ipcluster1.Manager.xml"),
        &root.join("usr/share/dbus-1/interfaces/org.ipcluster1.Manager.xml"),
        0o644,
    )?;
    // Man pages and shell completions, generated from the clap definitions of the binaries.
    let generated: [(&str, &[&str], &str); 5] = [
        ("ipclusterctl", &["__man"], "usr/local/share/man/man1/ipclusterctl.1"),
        ("ipclusterd", &["--print-man"], "usr/local/share/man/man8/ipclusterd.8"),
        (
            "ipclusterctl",
            &["__completions", "bash"],
            "usr/local/share/bash-completion/completions/ipclusterctl",
        ),
        ("ipclusterctl", &["__completions", "zsh"], "usr/local/share/zsh/site-functions/_ipclusterctl"),
        (
            "ipclusterctl",
            &["__completions", "fish"],
            "usr/local/share/fish/vendor_completions.d/ipclusterctl.fish",
        ),
    ];
    for (bin, args, dest) in generated {
        let out = Command::new(bin_dir.join(bin))
            .args(args)
            .output()
            .with_context(|| format!("cannot run {bin}"))?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("{bin} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        let dest = root.join(dest);
        fs::create_dir_all(dest.parent().context("no parent")?)?;
        fs::write(&dest, &out.stdout).with_context(|| format!("cannot write {}", dest.display()))?;
    }
    let apps = root.join("etc/ipcluster/apps");
    fs::create_dir_all(&apps).with_context(|| format!("cannot create {}", apps.display()))?;
    eprintln!("installed into {}", root.display());

    if root == Path::new("/") && Path::new("/run/systemd/system").exists() {
        crate::sh(Command::new("systemctl").arg("daemon-reload"))?;
        // The bus reads its policy at start; a running bus is told to read it again.
        let active = Command::new("systemctl").args(["is-active", "--quiet", "dbus.service"]).status()?;
        if active.success() {
            crate::sh(Command::new("busctl").args([
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "ReloadConfig",
            ]))?;
        }
    }
    Ok(())
}

/// Copies `from` to `to` through a temporary file and a rename, so a running binary is replaced,
/// never rewritten in place (which fails with ETXTBSY or corrupts the running program).
fn install_file(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if !from.exists() {
        bail!("{} not found (build first, or drop --no-build)", from.display());
    }
    let dir = to.parent().context("install target has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.xtask-tmp", to.file_name().unwrap_or_default().to_string_lossy()));
    fs::copy(from, &tmp).with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, to).with_context(|| format!("cannot install {}", to.display()))?;
    Ok(())
}
