//! `ipclusterctl check-config`: what it checks in each app file besides its contents, without
//! the daemon: that only root can change a file in the apps directory (and the directory
//! itself), as the daemon requires, and whether the file's `port_range` overlaps the kernel's
//! ephemeral ports (a warning: outgoing connections may take a worker's port first).

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use ipcluster_core::{
    config::AppConfig,
    ownership::{self, Kind},
    ports,
};

/// Where the daemon reads app files.
pub const APPS_DIR: &str = "/etc/ipcluster/apps";
/// The kernel's ephemeral port range.
const EPHEMERAL_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// What was found in one file.
#[derive(Debug, Default)]
pub struct Report {
    pub file: String,
    /// What makes the daemon refuse it.
    pub errors: Vec<String>,
    /// What works, but may bite.
    pub warnings: Vec<String>,
}

/// The kernel's ephemeral port range now, if it can be read.
pub fn ephemeral() -> Option<(u16, u16)> {
    ports::parse_ephemeral(&std::fs::read_to_string(EPHEMERAL_FILE).ok()?).ok()
}

/// The app files of `dir`, sorted.
pub fn app_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Checks `path`. Ownership and mode are checked when the file is in `apps_dir` (files
/// elsewhere, such as a draft in a home directory, are checked for their contents only: they
/// get their owner when installed).
pub fn file(path: &Path, apps_dir: &Path, ephemeral: Option<(u16, u16)>) -> Report {
    let shown = path.display().to_string();
    let mut r = Report { file: shown.clone(), ..Report::default() };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let in_apps_dir = match (std::fs::canonicalize(dir), std::fs::canonicalize(apps_dir)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if in_apps_dir {
        // Every directory above the apps directory too, as the daemon checks them (each on what
        // it opened; here, offline, by name).
        if let Ok(real) = std::fs::canonicalize(dir) {
            let mut above: Vec<&Path> = real.ancestors().skip(1).collect();
            above.reverse();
            for a in above {
                match std::fs::symlink_metadata(a) {
                    Ok(m) => {
                        if let Err(e) =
                            ownership::check(&a.display().to_string(), Kind::Ancestor, m.uid(), m.mode())
                        {
                            r.errors.push(e);
                        }
                    }
                    Err(e) => r.errors.push(format!("{}: {e}", a.display())),
                }
            }
        }
        for (p, kind) in [(dir, Kind::AppsDirectory), (path, Kind::AppFile)] {
            match std::fs::metadata(p) {
                Ok(m) => {
                    if let Err(e) = ownership::check(&p.display().to_string(), kind, m.uid(), m.mode()) {
                        r.errors.push(e);
                    }
                }
                Err(e) => r.errors.push(format!("{}: {e}", p.display())),
            }
        }
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let config = match std::fs::read_to_string(path) {
        Ok(text) => AppConfig::parse(&shown, stem, &text).map_err(|e| e.to_string()),
        Err(e) => Err(format!("{shown}: {e}")),
    };
    match config {
        Ok(c) => r.warnings.extend(ephemeral.and_then(|e| overlap_warning(&shown, c.port_range, e))),
        Err(e) => r.errors.push(e),
    }
    r
}

/// The warning for a `port_range` that overlaps the ephemeral range, if it does.
fn overlap_warning(file: &str, range: (u16, u16), ephemeral: (u16, u16)) -> Option<String> {
    let (lo, hi) = ports::ephemeral_overlap(range, ephemeral)?;
    Some(format!(
        "{file}: warning: port_range {}-{} overlaps the kernel's ephemeral ports {}-{} (net.ipv4.ip_local_port_range) at {lo}-{hi}: an outgoing connection can take a worker's port before the worker binds it. Choose a port_range outside it (the default {}-{} is), or reserve it: sysctl -w net.ipv4.ip_local_reserved_ports={}-{}",
        range.0,
        range.1,
        ephemeral.0,
        ephemeral.1,
        ipcluster_core::config::defaults::PORT_RANGE.0,
        ipcluster_core::config::defaults::PORT_RANGE.1,
        range.0,
        range.1,
    ))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const APP: &str = "command = [\"/bin/srv\"]\nlisten = [\"0.0.0.0:80\"]\n";

    fn dir(name: &str) -> PathBuf {
        let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/unit-tmp")
            .join(format!("ctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_file_in_the_apps_directory_that_others_can_change_is_refused() {
        let apps = dir("apps");
        let f = apps.join("chat.toml");
        write(&f, APP, 0o644);
        let owner = std::fs::metadata(&f).unwrap().uid();
        let r = file(&f, &apps, None);
        if owner == 0 {
            assert!(r.errors.is_empty(), "{:?}", r.errors);
        } else {
            // Not root: the test's own files are not root's, which is refused too.
            assert!(r.errors.iter().any(|e| e.contains(&format!("owned by uid {owner}"))), "{:?}", r.errors);
        }
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let r = file(&f, &apps, None);
        let e = r.errors.iter().find(|e| e.contains("app file")).expect("refused");
        assert!(e.contains("writable by its group and by others") && e.contains("chmod go-w"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&apps, std::fs::Permissions::from_mode(0o777)).unwrap();
        let r = file(&f, &apps, None);
        assert!(
            r.errors.iter().any(|e| e.contains("apps directory") && e.contains("by others")),
            "{:?}",
            r.errors
        );
        // The same file elsewhere: its contents only.
        let elsewhere = dir("draft");
        let g = elsewhere.join("chat.toml");
        write(&g, APP, 0o666);
        assert!(file(&g, &apps, None).errors.is_empty());
        std::fs::remove_dir_all(&apps).unwrap();
        std::fs::remove_dir_all(&elsewhere).unwrap();
    }

    /// Issue 21, item 8: as the daemon, every directory above the apps directory counts.
    #[test]
    fn a_directory_above_the_apps_directory_that_others_can_change_is_refused() {
        let base = std::fs::canonicalize(dir("above")).unwrap();
        let apps = base.join("apps");
        std::fs::create_dir(&apps).unwrap();
        std::fs::set_permissions(&apps, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = apps.join("chat.toml");
        write(&f, APP, 0o644);
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let r = file(&f, &apps, None);
        let want =
            format!("{}: refused: the directory is writable by its group and by others", base.display());
        assert!(r.errors.iter().any(|e| e.starts_with(&want)), "{:?}", r.errors);
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let r = file(&f, &apps, None);
        assert!(
            !r.errors.iter().any(|e| e.starts_with(&base.display().to_string())),
            "sticky: {:?}",
            r.errors
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_port_range_in_the_ephemeral_range_is_a_warning() {
        let d = dir("ephemeral");
        let f = d.join("web.toml");
        write(&f, &format!("{APP}port_range = \"30000-39999\"\n"), 0o644);
        let r = file(&f, Path::new("/nonexistent"), Some(ports::LINUX_EPHEMERAL));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.warnings.len(), 1);
        assert!(
            r.warnings[0].contains("at 32768-39999") && r.warnings[0].contains("ip_local_reserved_ports"),
            "{:?}",
            r.warnings
        );
        write(&f, APP, 0o644);
        assert!(file(&f, Path::new("/nonexistent"), Some(ports::LINUX_EPHEMERAL)).warnings.is_empty());
        // An invalid file: the error, no warning.
        write(&f, "workers = 3\n", 0o644);
        let r = file(&f, Path::new("/nonexistent"), Some(ports::LINUX_EPHEMERAL));
        assert_eq!((r.errors.len(), r.warnings.len()), (1, 0));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
