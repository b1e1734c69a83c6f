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
    let what = match kind {
        Kind::AppFile => "app file",
        Kind::AppsDirectory => "apps directory",
    };
    let (want_type, type_name) = match kind {
        Kind::AppFile => (S_IFREG, "a regular file"),
        Kind::AppsDirectory => (S_IFDIR, "a directory"),
    };
    if mode & S_IFMT != 0 && mode & S_IFMT != want_type {
        return Err(format!("{path}: the {what} is not {type_name}"));
    }
    let mut problems = Vec::new();
    if uid != 0 {
        problems.push(format!("owned by uid {uid}, not root"));
    }
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => problems.push("writable by its group and by others".to_owned()),
        (true, false) => problems.push("writable by its group".to_owned()),
        (false, true) => problems.push("writable by others".to_owned()),
        (false, false) => {}
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{path}: refused: the {what} is {} (mode {:04o}); ipclusterd runs as root and runs what app files say, so only root may be able to change them. Fix: chown root:root {path}; chmod go-w {path}",
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
