//! `cargo xtask ansible [--sanity]`: the Ansible collection `ipcluster.ipclusterd` (`ansible/`).
//!
//! Everything goes to `ansible/` in the target directory ([`dir`]):
//!
//! - `venv/`: Ansible from PyPI ([`PINS`]) in a virtual environment of Debian's Python
//!   (`/usr/bin/python3`, which the sandboxes' /usr also has); installed again only when the
//!   pins change;
//! - `ipcluster-ipclusterd-<version>.tar.gz`: `ansible-galaxy collection build`;
//! - `collections/ansible_collections/ipcluster/ipclusterd/`: that archive installed, which the
//!   end-to-end tests use (`ANSIBLE_COLLECTIONS_PATH`);
//! - with `--sanity`, `sanity/ansible_collections/ipcluster/ipclusterd/`: a copy of `ansible/`
//!   in the layout `ansible-test` needs, where `ansible-test sanity --venv` runs (no Docker);
//!   `home/` and `tmp/` are its `HOME` and `TMPDIR` (its virtual environments, caches and
//!   temporary files stay in the target directory).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// The Ansible release the collection is tested with: the `ansible` package 12 (which carries
/// `community.general`, for the rolling playbook's HAProxy steps) and its ansible-core 2.19,
/// the newest whose controller runs on Python 3.11, Debian 12's (ansible-core 2.20 needs 3.12).
pub const PINS: [&str; 2] = ["ansible==12.3.0", "ansible-core==2.19.14"];

/// The pip release ansible-core 2.19's `ansible-test` bootstraps into its virtual environments
/// (`get_venv_packages` in `ansible_test/_internal/python_requirements.py`).
const ANSIBLE_TEST_PIP: &str = "24.2";

/// Stands in for the pip bootstrap script `ansible-test` downloads from ci-files.testing.ansible.com,
/// which is not reachable here: pip from Python's own `ensurepip` (python3-venv), then what the
/// script would install, from PyPI.
const GET_PIP: &str = r#"# Written by cargo xtask ansible: stands in for ansible-test's get-pip script
# (ci-files.testing.ansible.com is not reachable). pip from Python's own ensurepip, then what
# get-pip would install (pip's pinned version), from PyPI.
import ensurepip
import os
import subprocess
import sys
import tempfile

tempfile.tempdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tmp")
os.makedirs(tempfile.tempdir, exist_ok=True)
ensurepip.bootstrap()
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
env = dict(os.environ, TMPDIR=tempfile.tempdir)
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install"] + args, env=env))
"#;

/// Where the collection's source is.
fn source() -> PathBuf {
    crate::root().join("ansible")
}

/// `ansible/` in the target directory.
pub fn dir() -> PathBuf {
    crate::target().join("ansible")
}

#[derive(Debug, clap::Args)]
pub struct AnsibleArgs {
    /// Also run `ansible-test sanity --venv` on a staged copy of the collection.
    #[arg(long)]
    pub sanity: bool,
}

pub fn run(args: &AnsibleArgs) -> Result<()> {
    crate::packages::ensure(&[crate::packages::ANSIBLE])?;
    let dir = dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let python = venv(&dir)?;
    let archive = build(&dir, &python)?;
    let collections = dir.join("collections");
    crate::sh(
        ansible(&dir, &python, "galaxy")
            .args(["collection", "install", "--force", "--offline", "-p"])
            .arg(&collections)
            .arg(&archive)
            // Where Ansible runs find it (the tests say so too).
            .env("ANSIBLE_COLLECTIONS_PATH", &collections),
    )?;
    eprintln!("ansible: {} installed in {}", archive.display(), collections.display());
    if args.sanity {
        sanity(&dir, &python)?;
    }
    Ok(())
}

/// The virtual environment with [`PINS`]; its Python.
fn venv(dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let python = venv.join("bin/python3");
    if !python.exists() {
        crate::sh(Command::new("/usr/bin/python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let marker = venv.join("ipcluster-pins.txt");
    let pins = PINS.join("\n") + "\n";
    if fs::read_to_string(&marker).ok().as_deref() != Some(pins.as_str()) {
        crate::sh(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                .args(PINS)
                .env("TMPDIR", tmp(dir)?),
        )?;
        fs::write(&marker, pins)?;
    }
    Ok(python)
}

/// `python -m ansible TOOL` (the venv's scripts name the venv's path in their first line, so
/// they are run through its Python instead), with HOME and TMPDIR in `dir`.
fn ansible(dir: &Path, python: &Path, tool: &str) -> Command {
    let mut cmd = Command::new(python);
    cmd.args(["-m", "ansible", tool]).env("HOME", dir.join("home")).env("TMPDIR", dir.join("tmp"));
    cmd
}

/// `dir/tmp`, created.
fn tmp(dir: &Path) -> Result<PathBuf> {
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp)?;
    Ok(tmp)
}

/// `ansible-galaxy collection build`; the archive.
fn build(dir: &Path, python: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir.join("home"))?;
    tmp(dir)?;
    let archive = dir.join(format!("ipcluster-ipclusterd-{}.tar.gz", galaxy_version()?));
    crate::sh(
        ansible(dir, python, "galaxy")
            .args(["collection", "build", "--force", "--output-path"])
            .arg(dir)
            .arg(source()),
    )?;
    if !archive.exists() {
        bail!("ansible-galaxy built no {}", archive.display());
    }
    Ok(archive)
}

/// The collection's version, from `ansible/galaxy.yml`.
fn galaxy_version() -> Result<String> {
    let galaxy = fs::read_to_string(source().join("galaxy.yml"))?;
    galaxy
        .lines()
        .find_map(|l| l.strip_prefix("version:"))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_owned())
        .context("ansible/galaxy.yml has no version")
}

/// `ansible-test sanity --venv` on a copy of the collection at
/// `sanity/ansible_collections/ipcluster/ipclusterd/`, for the Python of the venv.
fn sanity(dir: &Path, python: &Path) -> Result<()> {
    let staged = dir.join("sanity/ansible_collections/ipcluster/ipclusterd");
    stage(&source(), &staged)?;
    // ansible-test lists a collection's files with git when it is in a repository (the checkout
    // is, and target/ is ignored there): the copy is a repository of its own.
    if !staged.join(".git").exists() {
        crate::sh(Command::new("git").args(["init", "--quiet"]).arg(&staged))?;
    }
    check_pip_pin(python)?;
    let cache = dir.join("home/.ansible/test/cache");
    fs::create_dir_all(&cache)?;
    fs::write(cache.join(format!("get_pip_{}.py", ANSIBLE_TEST_PIP.replace('.', "_"))), GET_PIP)?;
    let version = Command::new(python)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .context("cannot run the venv's Python")?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    // Its tools (ansible-doc, the venv's python3.X) by name: the venv's bin first.
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        dir.join("venv/bin").display()
    );
    let mut cmd = ansible(dir, python, "test");
    cmd.args(["sanity", "--venv", "--python", &version, "--color", "no"])
        .env("PATH", path)
        .current_dir(&staged);
    eprintln!("+ (in {}) {}", staged.display(), crate::show(&cmd));
    let status = cmd.status().context("cannot run ansible-test")?;
    if !status.success() {
        bail!("ansible-test sanity failed ({status})");
    }
    eprintln!("ansible: ansible-test sanity passed");
    Ok(())
}

/// The stand-in for the pip bootstrap script is for [`ANSIBLE_TEST_PIP`]: the pinned
/// ansible-test must ask for that one.
fn check_pip_pin(python: &Path) -> Result<()> {
    let code = "import ansible_test, os; print(os.path.dirname(ansible_test.__file__))";
    let out = Command::new(python).args(["-c", code]).output().context("cannot find ansible_test")?;
    let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let source = fs::read_to_string(root.join("_internal/python_requirements.py"))?;
    if !source.contains(&format!("pip='{ANSIBLE_TEST_PIP}'")) {
        bail!(
            "ansible-test no longer bootstraps pip {ANSIBLE_TEST_PIP} (see get_venv_packages in {}): update ANSIBLE_TEST_PIP in crates/xtask/src/ansible.rs",
            root.join("_internal/python_requirements.py").display()
        );
    }
    Ok(())
}

/// Makes `to` a copy of `from`, keeping what ansible-test keeps there (`.git`, `tests/output`:
/// its virtual environments and results).
fn stage(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(to)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".git" {
            continue;
        }
        if name == "tests" {
            for inner in fs::read_dir(entry.path())? {
                let inner = inner?;
                if inner.file_name() != "output" {
                    remove(&inner.path())?;
                }
            }
            continue;
        }
        remove(&entry.path())?;
    }
    copy_tree(from, to)
}

fn remove(path: &Path) -> Result<()> {
    if path.is_dir() && !path.is_symlink() { fs::remove_dir_all(path) } else { fs::remove_file(path) }
        .with_context(|| format!("cannot remove {}", path.display()))
}

/// Copies the files of `from` into `to`, leaving out what is not the collection's: test output and
/// built archives.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let (path, dest) = (entry.path(), to.join(entry.file_name()));
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tar.gz") || (name == "output" && from.ends_with("tests")) {
            continue;
        }
        if entry.file_type()?.is_dir() {
            copy_tree(&path, &dest)?;
        } else {
            fs::copy(&path, &dest).with_context(|| format!("cannot copy {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collection_has_the_workspace_version() {
        assert_eq!(galaxy_version().unwrap(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn the_app_module_takes_every_key_of_an_app_file() {
        let module = fs::read_to_string(source().join("plugins/modules/app.py")).unwrap();
        let (docs, code) = module.split_once("\nimport ").unwrap();
        for key in ipcluster_core::config::KEYS {
            assert!(docs.contains(&format!("\n  {key}:\n")), "{key} is not documented in the app module");
            assert!(code.contains(&format!("('{key}', dict(")), "{key} is not an option of the app module");
        }
    }
}
