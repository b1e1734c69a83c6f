//! The app files: loading them (at start and on Reload), resolving a caller's app name, and
//! starting the apps marked `autostart`.

use std::{collections::BTreeSet, sync::Arc};

use ipcluster_core::{
    config::{AppConfig, ConfigError, Overrides},
    name::AppName,
    ports,
};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::{Error, Supervisor, model::Waiter};
use crate::{
    files::{AppFile, Files},
    world::World,
};

impl<W: World> Supervisor<W> {
    /// (Re)reads every app file. Invalid files are logged and kept as errors (Deploy answers
    /// InvalidConfig); the others are unaffected.
    pub(super) fn load_configs(&mut self) {
        let mut seen = BTreeSet::new();
        let ephemeral = self.deps.files.ephemeral_ports();
        let files = self.deps.files.app_files().unwrap_or_else(|e| {
            warn!("{e}");
            Vec::new()
        });
        for AppFile { path, text } in files {
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
            let file = path.display().to_string();
            let name = match AppName::new(stem) {
                Ok(n) => n,
                Err(e) => {
                    warn!("{file}: ignored: {e}");
                    continue;
                }
            };
            let parsed = match text {
                Ok(text) => AppConfig::parse(&file, stem, &text).map(Arc::new),
                Err(message) => Err(ConfigError { file: file.clone(), location: None, key: None, message }),
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
        self.prune_metrics();
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
