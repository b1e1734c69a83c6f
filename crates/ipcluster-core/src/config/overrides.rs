//! What a Deploy may change for one generation (its options), and which keys of a config run
//! someone else's code: a Deploy with them, or a rollback that replays them, needs the stronger
//! right (`org.ipcluster1.override`).

use std::collections::BTreeMap;

use super::{
    AppConfig, ConfigError, MAX_ENV,
    checks::{check_command, check_environment, check_workdir, check_workers},
};
use crate::units::shown;

/// The keys [`AppConfig::override_keys`] compares, in the order it reports them.
pub const OVERRIDE_KEYS: [&str; 4] = ["command", "environment", "user", "working_directory"];

impl AppConfig {
    /// The keys in which running `self` differs from running `file` (the app file's config, what
    /// a plain Deploy runs): what program, with which environment, as whom, where. Running a
    /// config that differs there runs code of someone's choosing, so it needs the same right as
    /// a Deploy with overrides. Every key when there is no valid file (a plain Deploy could not
    /// run at all). Sizes (workers, memory) and timings are not among them.
    pub fn override_keys(&self, file: Option<&AppConfig>) -> Vec<&'static str> {
        let Some(f) = file else { return OVERRIDE_KEYS.to_vec() };
        let differs = [
            self.command != f.command,
            self.environment != f.environment,
            self.user != f.user,
            self.working_directory != f.working_directory,
        ];
        OVERRIDE_KEYS.iter().zip(differs).filter(|(_, d)| *d).map(|(k, _)| *k).collect()
    }

    /// Applies Deploy overrides (already type-checked by the caller) and validates the result.
    pub fn with_overrides(&self, o: &Overrides) -> Result<Self, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: "Deploy options".into(),
            location: None,
            key: Some(key.into()),
            message,
        };
        let mut c = self.clone();
        if let Some(w) = o.workers {
            c.workers = check_workers(i64::from(w)).map_err(|m| err("workers", m))?;
        }
        if let Some(cmd) = &o.command {
            c.command = check_command(cmd).map_err(|m| err("command", m))?;
        }
        if let Some(env) = &o.environment {
            if env.len() > MAX_ENV {
                return Err(err("environment", format!("at most {MAX_ENV} entries")));
            }
            let mut extra = BTreeMap::new();
            for kv in env {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| err("environment", format!("{} is not K=V", shown(kv))))?;
                extra.insert(k.to_owned(), v.to_owned());
            }
            check_environment(&extra).map_err(|m| err("environment", m))?;
            c.environment.extend(extra);
        }
        if let Some(d) = &o.working_directory {
            c.working_directory = check_workdir(d).map_err(|m| err("working_directory", m))?;
        }
        c.check_ports().map_err(|(k, m)| err(k, m))?;
        Ok(c)
    }
}

/// Per-generation overrides of a Deploy call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub workers: Option<u32>,
    pub command: Option<Vec<String>>,
    pub environment: Option<Vec<String>>,
    pub working_directory: Option<String>,
}
