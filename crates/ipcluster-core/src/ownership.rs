//! Whether a file the daemon trusts may be trusted: the daemon runs as root and runs what app
//! files say, so an app file, or the directory holding them, that anyone but root can change
//! hands root to whoever can (as sshd's StrictModes refuses such files). Pure: the caller stats
//! the file and passes its owner and mode.

/// What the checked path is supposed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An app file (`/etc/ipcluster/apps/<app>.toml`): a regular file.
    AppFile,
    /// The apps directory (`/etc/ipcluster/apps`): a directory.
    AppsDirectory,
    /// The daemon's own file (`/etc/ipcluster/ipclusterd.toml`): a regular file.
    DaemonFile,
    /// Where socket mode pins its programs and maps (`/sys/fs/bpf/ipcluster`): a directory.
    PinDirectory,
    /// A directory on the way from `/` to one of the above: whoever can replace its entries
    /// can replace what is below. A sticky one (`/tmp`) is accepted although others may write
    /// in it: only an entry's owner can rename or remove it there, and every entry on the way
    /// is checked in turn.
    Ancestor,
}

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;

/// `Ok` when only root can change `path`: owned by uid 0, not writable by its group or by
/// others, and (when `mode` carries file type bits, as `st_mode` does) of the expected type.
/// Otherwise the reason, naming the path and the fix. Group write is refused even for group
/// root: membership of a group is not the same as being root.
pub fn check(path: &str, kind: Kind, uid: u32, mode: u32) -> Result<(), String> {
    let path = printable(path);
    let (what, want_type, type_name) = match kind {
        Kind::AppFile => ("app file", S_IFREG, "a regular file"),
        Kind::AppsDirectory => ("apps directory", S_IFDIR, "a directory"),
        Kind::DaemonFile => ("daemon's file", S_IFREG, "a regular file"),
        Kind::PinDirectory => ("pin directory", S_IFDIR, "a directory"),
        Kind::Ancestor => ("directory", S_IFDIR, "a directory"),
    };
    if mode & S_IFMT != 0 && mode & S_IFMT != want_type {
        return Err(format!("{path}: the {what} is not {type_name}"));
    }
    let mut problems = Vec::new();
    if uid != 0 {
        problems.push(format!("owned by uid {uid}, not root"));
    }
    let sticky = mode & 0o1000 != 0;
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        _ if kind == Kind::Ancestor && sticky => {}
        (true, true) => problems.push("writable by its group and by others".to_owned()),
        (true, false) => problems.push("writable by its group".to_owned()),
        (false, true) => problems.push("writable by others".to_owned()),
        (false, false) => {}
    }
    if problems.is_empty() {
        return Ok(());
    }
    let why = match kind {
        Kind::PinDirectory => {
            "whoever can change it can replace the steering programs and maps pinned there, which pick every client's worker"
        }
        Kind::Ancestor => {
            "whoever can change it can replace what ipclusterd reads below it, and ipclusterd runs as root and runs what app files say"
        }
        _ => "ipclusterd runs as root and runs what app files say, so only root may be able to change them",
    };
    Err(format!(
        "{path}: refused: the {what} is {} (mode {:04o}); {why}. Fix: chown root:root {path}; chmod go-w {path}",
        problems.join(" and "),
        mode & 0o7777
    ))
}

/// A path as a message shows it: control characters escaped, at most 256 characters.
fn printable(path: &str) -> String {
    let mut out = String::new();
    for (i, c) in path.chars().enumerate() {
        if i == 256 {
            out.push('…');
            break;
        }
        if c.is_control() { out.extend(c.escape_debug()) } else { out.push(c) }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: &str = "/etc/ipcluster/apps/chat.toml";
    const D: &str = "/etc/ipcluster/apps";

    #[test]
    fn root_owned_and_not_writable_by_others_is_safe() {
        for mode in [0o100644, 0o100600, 0o100444, 0o644, 0o100755, 0o104644] {
            assert_eq!(check(F, Kind::AppFile, 0, mode), Ok(()), "{mode:o}");
        }
        for mode in [0o040755, 0o040700, 0o755, 0o041755] {
            assert_eq!(check(D, Kind::AppsDirectory, 0, mode), Ok(()), "{mode:o}");
        }
    }

    #[test]
    fn anyone_else_able_to_write_is_refused_with_the_path_and_the_fix() {
        let cases: &[(Kind, &str, u32, u32, &str)] = &[
            (Kind::AppFile, F, 1000, 0o100644, "owned by uid 1000, not root"),
            (Kind::AppFile, F, 0, 0o100664, "writable by its group"),
            (Kind::AppFile, F, 0, 0o100646, "writable by others"),
            (Kind::AppFile, F, 0, 0o100666, "writable by its group and by others"),
            (
                Kind::AppFile,
                F,
                33,
                0o100666,
                "owned by uid 33, not root and writable by its group and by others",
            ),
            (Kind::AppsDirectory, D, 0, 0o040777, "writable by its group and by others"),
            (Kind::AppsDirectory, D, 0, 0o041777, "writable by its group and by others"),
            (Kind::AppsDirectory, D, 1000, 0o040755, "owned by uid 1000"),
        ];
        for (kind, path, uid, mode, why) in cases {
            let e = check(path, *kind, *uid, *mode).unwrap_err();
            assert!(e.starts_with(&format!("{path}: refused: ")), "{e}");
            assert!(e.contains(why), "{e}");
            assert!(e.contains(&format!("Fix: chown root:root {path}; chmod go-w {path}")), "{e}");
        }
    }

    /// Issue 21, item 8: the directories on the way, the daemon's file and the pin directory.
    #[test]
    fn directories_on_the_way_the_daemon_file_and_the_pin_directory() {
        assert_eq!(check("/", Kind::Ancestor, 0, 0o040755), Ok(()));
        assert_eq!(check("/tmp", Kind::Ancestor, 0, 0o041777), Ok(()), "sticky: entries keep their owner");
        let e = check("/etc", Kind::Ancestor, 0, 0o040777).unwrap_err();
        assert!(
            e.contains("the directory is writable by its group and by others")
                && e.contains("chmod go-w /etc"),
            "{e}"
        );
        assert!(check("/srv", Kind::Ancestor, 1000, 0o041755).unwrap_err().contains("owned by uid 1000"));
        assert!(check("/etc/x", Kind::Ancestor, 0, 0o120777).unwrap_err().contains("not a directory"));
        let d = "/etc/ipcluster/ipclusterd.toml";
        assert_eq!(check(d, Kind::DaemonFile, 0, 0o100644), Ok(()));
        assert!(
            check(d, Kind::DaemonFile, 0, 0o100666).unwrap_err().contains("the daemon's file is writable")
        );
        let p = "/sys/fs/bpf/ipcluster";
        assert_eq!(check(p, Kind::PinDirectory, 0, 0o040700), Ok(()));
        let e = check(p, Kind::PinDirectory, 65534, 0o040700).unwrap_err();
        assert!(e.contains("pin directory is owned by uid 65534") && e.contains("steering programs"), "{e}");
        assert!(
            check(p, Kind::PinDirectory, 0, 0o041777).unwrap_err().contains("writable"),
            "sticky is not enough"
        );
    }

    #[test]
    fn the_wrong_kind_of_file_is_refused() {
        assert!(check(F, Kind::AppFile, 0, 0o040755).unwrap_err().contains("not a regular file"));
        assert!(check(D, Kind::AppsDirectory, 0, 0o100755).unwrap_err().contains("not a directory"));
    }

    #[test]
    fn paths_are_shown_escaped_and_bounded() {
        let e = check("/etc/ipcluster/apps/\u{1b}[31mx.toml", Kind::AppFile, 5, 0o100644).unwrap_err();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        let long = format!("/{}", "a".repeat(100_000));
        assert!(check(&long, Kind::AppFile, 5, 0o100644).unwrap_err().len() < 1200);
    }
}
