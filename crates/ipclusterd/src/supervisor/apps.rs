//! The app files: loading them (at start and on Reload), resolving a caller's app name, and
//! starting the apps marked `autostart`.

use std::{collections::BTreeSet, sync::Arc};

use ipcluster_core::{
    config::{AppConfig, ConfigError, Overrides},
    name::AppName,
    ownership::{self, Kind},
    ports,
};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{Error, Supervisor, model::Waiter};
use crate::{netfilter::Router, processes::Processes, scopes::Scopes, steering::Steer};

/// Whether `path` is root's alone ([`ownership::check`]); a path that cannot be read is left to
/// the read that follows to report. The daemon's own user counts as root (it is root in
/// production; a test runs it as the user who owns its files): the daemon trusts what it could
/// have written itself, nobody else.
fn unsafe_path(path: &std::path::Path, kind: Kind) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => {
            let owner = if m.uid() == rustix::process::geteuid().as_raw() { 0 } else { m.uid() };
            ownership::check(&path.display().to_string(), kind, owner, m.mode())
        }
        Err(_) => Ok(()),
    }
}

impl<S: Scopes + Clone + 'static, R: Router + 'static, P: Processes, T: Steer> Supervisor<S, R, P, T> {
    /// (Re)reads every app file. Invalid files are logged and kept as errors (Deploy answers
    /// InvalidConfig); the others are unaffected.
    pub(super) fn load_configs(&mut self) {
        let dir = &self.deps.config_dir;
        let mut seen = BTreeSet::new();
        // Files anyone but root could have written are not taken as root's word (StrictModes).
        let dir_unsafe = unsafe_path(dir, Kind::AppsDirectory).err();
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| ports::parse_ephemeral(&t).ok());
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e.flatten().collect::<Vec<_>>(),
            Err(e) => {
                warn!("cannot read {}: {e}", dir.display());
                Vec::new()
            }
        };
        for entry in entries {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
            let file = path.display().to_string();
            let name = match AppName::new(stem) {
                Ok(n) => n,
                Err(e) => {
                    warn!("{file}: ignored: {e}");
                    continue;
                }
            };
            let refused =
                |message: String| ConfigError { file: file.clone(), location: None, key: None, message };
            let parsed = match dir_unsafe.clone().map_or_else(|| unsafe_path(&path, Kind::AppFile), Err) {
                Err(why) => Err(refused(why)),
                Ok(()) => match std::fs::read_to_string(&path) {
                    Ok(text) => AppConfig::parse(&file, stem, &text).map(Arc::new),
                    Err(e) => Err(refused(e.to_string())),
                },
            };
            if let (Ok(c), Some(eph)) = (&parsed, ephemeral)
                && let Some((lo, hi)) = ports::ephemeral_overlap(c.port_range, eph)
            {
                warn!(app = %name, "{file}: port_range {}-{} overlaps the kernel's ephemeral ports ({lo}-{hi}, net.ipv4.ip_local_port_range): an outgoing connection may take a worker's port", c.port_range.0, c.port_range.1);
            }
            if let Err(e) = &parsed {
                error!(app = %name, "invalid app file, skipped: {e}");
            }
            seen.insert(name.clone());
            self.m.apps.entry(name).or_default().config = Some(parsed);
        }
        for (name, app) in &mut self.m.apps {
            if !seen.contains(name) && app.config.is_some() {
                info!(app = %name, "app file removed; running generations keep running");
                app.config = None;
            }
        }
    }

    /// The apps with a valid file.
    pub(super) fn valid_apps(&self) -> Vec<String> {
        self.m
            .apps
            .iter()
            .filter(|(_, a)| matches!(a.config, Some(Ok(_))))
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Resolves a caller's app name: malformed → InvalidArgs, unknown → NoSuchApp.
    pub(super) fn app_name(&self, app: &str) -> Result<AppName, Error> {
        let name = AppName::new(app).map_err(|e| Error::InvalidArgs(e.to_string()))?;
        if !self.m.apps.contains_key(&name) {
            return Err(Error::NoSuchApp(format!(
                "no app \"{name}\" (no file {}/{name}.toml)",
                self.deps.config_dir.display()
            )));
        }
        Ok(name)
    }

    /// `app`, or every app when it is "".
    pub(super) fn apps_matching(&self, app: &str) -> Result<Vec<AppName>, Error> {
        if app.is_empty() { Ok(self.m.apps.keys().cloned().collect()) } else { Ok(vec![self.app_name(app)?]) }
    }

    /// Deploys every autostart app that has no live generation and was not stopped; returns
    /// where each answer will arrive.
    pub(super) async fn autostart(&mut self) -> Vec<oneshot::Receiver<Result<u64, Error>>> {
        let names: Vec<AppName> = self
            .m
            .apps
            .iter()
            .filter(|(_, a)| {
                matches!(&a.config, Some(Ok(c)) if c.autostart) && a.live().is_none() && !a.stopped
            })
            .map(|(n, _)| n.clone())
            .collect();
        let mut pending = Vec::new();
        for name in names {
            let (tx, rx) = oneshot::channel();
            info!(app = %name, "{name}: autostart");
            self.deploy(
                name.as_str(),
                super::deploy::Source::File(&Overrides::default()),
                Waiter::Deploy(tx),
            )
            .await;
            pending.push(rx);
        }
        pending
    }
}
