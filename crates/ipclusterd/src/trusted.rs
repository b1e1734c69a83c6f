//! Reading what the daemon takes as root's word — app files, its own file — and checking the
//! directory it pins steering in, without a race (issue 21, item 8).
//!
//! The daemon runs as root and runs what an app file says, so a file (or a directory on its
//! way) that anyone but root can change hands root to whoever can. The check walks the path
//! from `/` one component at a time, each opened relative to the previous one with
//! `O_NOFOLLOW` and checked on what was opened (`fstat`), never by name: a symbolic link or a
//! directory swapped in between cannot divert the read. Every directory on the way must be
//! root's and writable by nobody else (as sshd's `StrictModes`; a sticky one such as `/tmp` is
//! accepted, see [`Kind::Ancestor`]); the file itself must be a regular file, root's, writable by
//! nobody else, and is read from the very descriptor that was checked.
//!
//! The directory holding the path is resolved first (`realpath`, so a configuration directory
//! that is a symbolic link to a root-owned one still works); the walk then checks the real
//! directories. The daemon's own user counts as root (it is root in production; a test runs it
//! as the user who owns its files).

use std::{
    ffi::OsStr,
    io::{self, Read},
    os::fd::OwnedFd,
    path::{Component, Path, PathBuf},
};

pub use ipcluster_core::ownership::Kind;
use ipcluster_core::ownership::check;
use rustix::fs::{Mode, OFlags};

/// The largest file read (app files and the daemon's file are a few hundred bytes).
pub const MAX_FILE: u64 = 1 << 20;

/// The owner as the check sees it: the daemon's own user counts as root.
fn owner(uid: u32) -> u32 {
    if uid == rustix::process::geteuid().as_raw() { 0 } else { uid }
}

/// Opens every directory from `/` to `dir` (an absolute path without `..`), each below the
/// previous one with `O_NOFOLLOW`, checking each as [`Kind::Ancestor`] and the last as
/// `last_kind`; returns the last one (an `O_PATH` descriptor).
fn walk(dir: &Path, last_kind: Kind) -> Result<OwnedFd, String> {
    let root = rustix::fs::open("/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| format!("/: {e}"))?;
    let mut components: Vec<&OsStr> = Vec::new();
    for c in dir.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => components.push(n),
            _ => return Err(format!("{}: not a plain absolute path", dir.display())),
        }
    }
    let mut at = PathBuf::from("/");
    let check_fd = |fd: &OwnedFd, at: &Path, kind: Kind| -> Result<(), String> {
        let st = rustix::fs::fstat(fd).map_err(|e| format!("{}: {e}", at.display()))?;
        check(&at.display().to_string(), kind, owner(st.st_uid), st.st_mode)
    };
    check_fd(&root, &at, if components.is_empty() { last_kind } else { Kind::Ancestor })?;
    let mut fd = root;
    for (i, name) in components.iter().enumerate() {
        at.push(name);
        // O_PATH with O_NOFOLLOW opens a symbolic link itself: fstat then says it is not a
        // directory, and the check refuses it.
        let next =
            rustix::fs::openat(&fd, *name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| format!("{}: {e}", at.display()))?;
        let kind = if i + 1 == components.len() { last_kind } else { Kind::Ancestor };
        check_fd(&next, &at, kind)?;
        fd = next;
    }
    Ok(fd)
}

/// `path` made absolute, with its directory's symbolic links resolved: (directory, file name).
fn split(path: &Path) -> Result<(PathBuf, Option<&OsStr>), (io::ErrorKind, String)> {
    let name = path.file_name();
    let dir = match (name, path.parent()) {
        (Some(_), Some(p)) if !p.as_os_str().is_empty() => p,
        (Some(_), _) => Path::new("."),
        (None, _) => path,
    };
    let real = std::fs::canonicalize(dir).map_err(|e| (e.kind(), format!("{}: {e}", dir.display())))?;
    Ok((real, name))
}

/// Checks that the directory `path` and every directory above it can be changed by root alone;
/// `kind` names what `path` is for in the message (the apps directory, the pin directory).
pub fn check_dir(path: &Path, kind: Kind) -> Result<(), String> {
    let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    walk(&real, kind).map(drop)
}

/// The text of the file at `path` if root alone could have written it and every directory
/// above it (see the module's doc); `Ok(None)` when it does not exist. `kind` is
/// [`Kind::AppFile`] or [`Kind::DaemonFile`]. The error names the path at fault and the fix.
pub fn read(path: &Path, kind: Kind) -> Result<Option<String>, String> {
    let (dir, name) = match split(path) {
        Ok(x) => x,
        Err((io::ErrorKind::NotFound, _)) => return Ok(None),
        Err((_, e)) => return Err(e),
    };
    let Some(name) = name else { return Err(format!("{}: not a file name", path.display())) };
    let dir_fd = walk(&dir, Kind::Ancestor)?;
    let shown = dir.join(name);
    let file = match rustix::fs::openat(
        &dir_fd,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(f) => f,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(rustix::io::Errno::LOOP) => {
            return Err(format!(
                "{}: refused: it is a symbolic link (ipclusterd reads its configuration without following links). Fix: put the file itself there",
                shown.display()
            ));
        }
        Err(e) => return Err(format!("{}: {e}", shown.display())),
    };
    let st = rustix::fs::fstat(&file).map_err(|e| format!("{}: {e}", shown.display()))?;
    check(&shown.display().to_string(), kind, owner(st.st_uid), st.st_mode)?;
    let mut bytes = Vec::new();
    std::fs::File::from(file)
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e: io::Error| format!("{}: {e}", shown.display()))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(format!("{}: larger than {MAX_FILE} bytes", shown.display()));
    }
    String::from_utf8(bytes).map(Some).map_err(|_| format!("{}: not UTF-8 text", shown.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A directory of the test's own (below the checkout's target/, whose ancestors are the
    /// checkout's: root's or the test user's).
    ///
    /// Every test here needs that tree to pass the check it tests: where it does not (an
    /// ancestor writable by another user), the test fails and says so rather than pass unrun.
    fn setup(name: &str) -> PathBuf {
        let dir = std::fs::canonicalize(crate::test_dir(name)).unwrap();
        chmod(&dir, 0o755);
        std::fs::create_dir(dir.join("apps")).unwrap();
        std::fs::write(dir.join("apps/web.toml"), "x = 1\n").unwrap();
        chmod(&dir.join("apps/web.toml"), 0o644);
        if let Err(e) = check_dir(&dir, Kind::AppsDirectory) {
            panic!(
                "these tests need a checkout (or CARGO_TARGET_DIR) whose directories only its owner \
                 or root can write, as the daemon needs of /etc/ipcluster: {e}"
            );
        }
        dir
    }

    #[test]
    fn a_file_root_alone_could_write_is_read_and_a_missing_one_is_none() {
        let dir = setup("trusted-ok");
        assert_eq!(read(&dir.join("apps/web.toml"), Kind::AppFile), Ok(Some("x = 1\n".into())));
        assert_eq!(read(&dir.join("apps/none.toml"), Kind::AppFile), Ok(None));
        assert_eq!(read(&dir.join("nodir/none.toml"), Kind::DaemonFile), Ok(None));
        assert_eq!(check_dir(&dir.join("apps"), Kind::AppsDirectory), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symbolic_link_a_writable_directory_on_the_way_or_a_fifo_is_refused() {
        let dir = setup("trusted-refused");
        // The file itself a link (even to a root-owned file): O_NOFOLLOW.
        symlink(dir.join("apps/web.toml"), dir.join("apps/link.toml")).unwrap();
        let e = read(&dir.join("apps/link.toml"), Kind::AppFile).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // Not a regular file.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("apps/fifo.toml"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let e = read(&dir.join("apps/fifo.toml"), Kind::AppFile).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        // A directory on the way that others can write: the file below is refused, and the
        // message names that directory.
        let middle = dir.join("etc");
        std::fs::create_dir_all(middle.join("ipcluster/apps")).unwrap();
        std::fs::write(middle.join("ipcluster/apps/web.toml"), "x = 1\n").unwrap();
        chmod(&middle.join("ipcluster/apps/web.toml"), 0o644);
        chmod(&middle.join("ipcluster"), 0o777);
        let e = read(&middle.join("ipcluster/apps/web.toml"), Kind::AppFile).unwrap_err();
        assert!(
            e.starts_with(&format!(
                "{}: refused: the directory is writable",
                middle.join("ipcluster").display()
            )),
            "{e}"
        );
        assert!(e.contains("chmod go-w"), "{e}");
        let e = check_dir(&middle.join("ipcluster/apps"), Kind::AppsDirectory).unwrap_err();
        assert!(e.contains("writable by its group and by others"), "{e}");
        // Sticky (as /tmp): accepted, since the entries keep their owners.
        chmod(&middle.join("ipcluster"), 0o1777);
        assert_eq!(read(&middle.join("ipcluster/apps/web.toml"), Kind::AppFile), Ok(Some("x = 1\n".into())));
        // The daemon's file writable by others.
        chmod(&middle.join("ipcluster/apps/web.toml"), 0o666);
        let e = read(&middle.join("ipcluster/apps/web.toml"), Kind::DaemonFile).unwrap_err();
        assert!(e.contains("the daemon's file is writable by its group and by others"), "{e}");
        // Too large.
        chmod(&middle.join("ipcluster/apps/web.toml"), 0o644);
        std::fs::write(middle.join("ipcluster/apps/web.toml"), vec![b'#'; MAX_FILE as usize + 1]).unwrap();
        assert!(read(&middle.join("ipcluster/apps/web.toml"), Kind::AppFile).unwrap_err().contains("larger"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Owned by another user (here: nobody, as root can chown): refused, file or directory.
    #[test]
    #[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
    fn another_users_file_or_directory_is_refused() {
        let dir = setup("trusted-owner");
        let nobody = Some(rustix::process::Uid::from_raw(65534));
        rustix::fs::chown(dir.join("apps/web.toml"), nobody, None).unwrap();
        let e = read(&dir.join("apps/web.toml"), Kind::AppFile).unwrap_err();
        assert!(e.contains("owned by uid 65534, not root"), "{e}");
        rustix::fs::chown(dir.join("apps/web.toml"), Some(rustix::process::Uid::ROOT), None).unwrap();
        rustix::fs::chown(dir.join("apps"), nobody, None).unwrap();
        let e = read(&dir.join("apps/web.toml"), Kind::AppFile).unwrap_err();
        assert!(e.contains("apps: refused: the directory is owned by uid 65534"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
