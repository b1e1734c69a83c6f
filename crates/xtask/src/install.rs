//! `cargo xtask install`: the one install path, used by operators and by every sandbox; and
//! [`stage`], which lays the same files out for the Debian package (`cargo xtask deb`).
//!
//! Everything installed besides the binaries is compiled into xtask (`include_str!`), so a
//! sandbox runs `xtask install` without seeing the source tree. The unit is generated for where
//! the daemon goes ([`Layout::daemon`]): one template, no second copy to drift.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The binaries of the build: the daemon, the CLI and the demo worker.
pub const BINARIES: [&str; 3] = ["ipclusterd", "ipclusterctl", "ipcluster-demo"];

const UNIT_TEMPLATE: &str = include_str!("../../../systemd/ipclusterd.service.in");
const SLICE: &str = include_str!("../../../systemd/ipcluster.slice");
const BUS_POLICY: &str = include_str!("../../../dbus/org.ipcluster1.conf");
const POLKIT_ACTION: &str = include_str!("../../../dbus/org.ipcluster1.policy");
const INTROSPECTION: &str = include_str!("../../../dbus/org.ipcluster1.Manager.xml");
const ACTIVATION: &str = include_str!("../../../dbus/org.ipcluster1.service");
const EXAMPLE_APP: &str = include_str!("../../../packaging/example.toml.disabled");
const DEMO_MAN: &str = include_str!("../../../packaging/ipcluster-demo.1");

/// Where each kind of file goes, relative to the install root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The daemon binary (the unit's ExecStart).
    pub daemon: &'static str,
    /// ipclusterctl and ipcluster-demo.
    pub bin_dir: &'static str,
    pub units: &'static str,
    pub bus_policy: &'static str,
    pub bus_services: &'static str,
    pub man: &'static str,
    pub bash_completions: &'static str,
    pub zsh_completions: &'static str,
    pub fish_completions: &'static str,
    /// Man pages compressed with gzip (Debian policy 12.3).
    pub gzip_man: bool,
}

impl Layout {
    /// From source: the local administrator's directories.
    pub const LOCAL: Layout = Layout {
        daemon: "usr/local/bin/ipclusterd",
        bin_dir: "usr/local/bin",
        units: "etc/systemd/system",
        bus_policy: "etc/dbus-1/system.d",
        // The system bus reads /usr/share/dbus-1/system-services only (not /usr/local/share).
        bus_services: "usr/share/dbus-1/system-services",
        man: "usr/local/share/man",
        bash_completions: "usr/local/share/bash-completion/completions",
        zsh_completions: "usr/local/share/zsh/site-functions",
        fish_completions: "usr/local/share/fish/vendor_completions.d",
        gzip_man: false,
    };

    /// The Debian package: the distribution's directories.
    pub const DEBIAN: Layout = Layout {
        daemon: "usr/libexec/ipclusterd",
        bin_dir: "usr/bin",
        units: "lib/systemd/system",
        bus_policy: "usr/share/dbus-1/system.d",
        bus_services: "usr/share/dbus-1/system-services",
        man: "usr/share/man",
        bash_completions: "usr/share/bash-completion/completions",
        zsh_completions: "usr/share/zsh/vendor-completions",
        fish_completions: "usr/share/fish/vendor_completions.d",
        gzip_man: true,
    };

    /// `ipclusterd.service` with ExecStart at [`Layout::daemon`].
    pub fn unit(&self) -> String {
        render(UNIT_TEMPLATE, "@DAEMON@", &format!("/{}", self.daemon))
    }

    /// The example app file, naming the demo worker where this layout puts it.
    pub fn example_app(&self) -> String {
        render(EXAMPLE_APP, "@BINDIR@", &format!("/{}", self.bin_dir))
    }
}

/// `template` with every `key` replaced; the template must use the key (a renamed placeholder
/// would otherwise ship unreplaced).
fn render(template: &str, key: &str, value: &str) -> String {
    assert!(template.contains(key), "template lacks {key}");
    template.replace(key, value)
}

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
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| crate::target().join("release"));
    if !args.no_build {
        build_release()?;
    }
    let root = &args.root;
    if root == Path::new("/") {
        // What the daemon runs, as the package's dependencies would bring it.
        crate::packages::ensure(&[crate::packages::RUNTIME])?;
    }
    stage(root, &Layout::LOCAL, &bin_dir)?;
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

/// `cargo build --release` of [`BINARIES`].
pub fn build_release() -> Result<()> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--release", "--locked"]);
    for b in BINARIES {
        cmd.args(["--bin", b]);
    }
    crate::sh(&mut cmd)
}

/// Lays out every installed file under `root` as `layout` says: binaries (from `bin_dir`), units,
/// bus policy and activation file, polkit action, introspection XML, man pages, completions, and
/// `/etc/ipcluster/apps/` with the example app (not enabled: its name does not end in `.toml`).
pub fn stage(root: &Path, layout: &Layout, bin_dir: &Path) -> Result<()> {
    for b in BINARIES {
        let dest =
            if b == "ipclusterd" { root.join(layout.daemon) } else { root.join(layout.bin_dir).join(b) };
        install_file(&bin_dir.join(b), &dest, 0o755)?;
    }
    let units = root.join(layout.units);
    write_file(&units.join("ipclusterd.service"), layout.unit().as_bytes())?;
    write_file(&units.join("ipcluster.slice"), SLICE.as_bytes())?;
    write_file(&root.join(layout.bus_policy).join("org.ipcluster1.conf"), BUS_POLICY.as_bytes())?;
    write_file(&root.join(layout.bus_services).join("org.ipcluster1.service"), ACTIVATION.as_bytes())?;
    write_file(&root.join("usr/share/polkit-1/actions/org.ipcluster1.policy"), POLKIT_ACTION.as_bytes())?;
    write_file(
        &root.join("usr/share/dbus-1/interfaces/org.ipcluster1.Manager.xml"),
        INTROSPECTION.as_bytes(),
    )?;
    // Man pages and shell completions, generated from the clap definitions of the binaries.
    let generated: [(&str, &[&str], PathBuf); 5] = [
        ("ipclusterctl", &["__man"], Path::new(layout.man).join("man1/ipclusterctl.1")),
        ("ipclusterd", &["--print-man"], Path::new(layout.man).join("man8/ipclusterd.8")),
        ("ipclusterctl", &["__completions", "bash"], Path::new(layout.bash_completions).join("ipclusterctl")),
        ("ipclusterctl", &["__completions", "zsh"], Path::new(layout.zsh_completions).join("_ipclusterctl")),
        (
            "ipclusterctl",
            &["__completions", "fish"],
            Path::new(layout.fish_completions).join("ipclusterctl.fish"),
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
        write_file(&root.join(dest), &out.stdout)?;
    }
    write_file(&root.join(layout.man).join("man1/ipcluster-demo.1"), DEMO_MAN.as_bytes())?;
    if layout.gzip_man {
        gzip_man_pages(&root.join(layout.man))?;
    }
    let apps = root.join("etc/ipcluster/apps");
    write_file(&apps.join("example.toml.disabled"), layout.example_app().as_bytes())?;
    Ok(())
}

/// Compresses every page under `man/man*/` with `gzip -9n` (no name or time stamp: the same
/// input gives the same package).
fn gzip_man_pages(man: &Path) -> Result<()> {
    for section in fs::read_dir(man)?.flatten() {
        for page in fs::read_dir(section.path())?.flatten() {
            let path = page.path();
            if path.extension().is_some_and(|e| e == "gz") {
                continue;
            }
            crate::sh(Command::new("gzip").args(["-9nf", "--"]).arg(&path))?;
        }
    }
    Ok(())
}

/// Writes `data` to `to` (mode 0644) through a temporary file and a rename.
fn write_file(to: &Path, data: &[u8]) -> Result<()> {
    let dir = to.parent().context("install target has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.xtask-tmp", to.file_name().unwrap_or_default().to_string_lossy()));
    fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, to).with_context(|| format!("cannot install {}", to.display()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layout_gets_a_unit_that_starts_the_daemon_where_it_put_it() {
        for layout in [Layout::LOCAL, Layout::DEBIAN] {
            let unit = layout.unit();
            let exec: Vec<&str> = unit.lines().filter(|l| l.starts_with("ExecStart=")).collect();
            assert_eq!(exec, [format!("ExecStart=/{}", layout.daemon)]);
            // Placeholders are @NAME@ (a system call group such as @clock is not one).
            let placeholder = unit.lines().any(|l| {
                l.split('@')
                    .collect::<Vec<_>>()
                    .windows(3)
                    .any(|w| !w[1].is_empty() && w[1].chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            });
            assert!(!placeholder, "an unreplaced placeholder: {unit}");
            assert!(layout.example_app().contains(&format!("\"/{}/ipcluster-demo\"", layout.bin_dir)));
        }
        assert_eq!(Layout::DEBIAN.daemon, "usr/libexec/ipclusterd");
    }

    #[test]
    fn the_activation_file_names_the_unit_and_the_unit_its_conventional_alias() {
        assert!(ACTIVATION.lines().any(|l| l == "Name=org.ipcluster1"));
        assert!(ACTIVATION.lines().any(|l| l == "SystemdService=ipclusterd.service"));
        assert!(Layout::DEBIAN.unit().lines().any(|l| l == "Alias=dbus-org.ipcluster1.service"));
    }
}
