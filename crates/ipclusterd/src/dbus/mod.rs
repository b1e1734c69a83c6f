//! `org.ipcluster1.Manager`: a thin adapter. It converts D-Bus types, sends a command to the
//! supervisor and maps the answer back; it holds no state of its own. The contract (names,
//! error names, option keys, rows) is [`ipcluster_bus`]'s; errors are mapped to bus error names
//! in one place: [`BusError::from`].

use std::collections::HashMap;

use ipcluster_bus::{ErrorName, GenerationRow, HealthRow, SessionRow, WorkerRow, option};
use ipcluster_core::config::Overrides;
use zbus::{object_server::SignalEmitter, wire::OwnedVariant};

use crate::{
    auth::{Action, Authorized, authorize},
    supervisor::{self, CanaryRequest, Command, Handle},
};

/// An error as it crosses the bus: a name and a message. Never a bare `Failed`. Every mapping
/// happens here, in [`From`] impls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusError {
    name: ErrorName,
    message: String,
}

impl BusError {
    fn new(name: ErrorName, message: impl Into<String>) -> Self {
        Self { name, message: message.into() }
    }
}

impl zbus::DBusError for BusError {
    fn create_reply(&self, call: &zbus::message::Header<'_>) -> zbus::Result<zbus::message::Message> {
        zbus::message::Message::error(call, self.name.as_str()).build(&(self.message.as_str(),))
    }

    fn name(&self) -> zbus::names::ErrorName<'_> {
        zbus::names::ErrorName::from_static_str_unchecked(self.name.as_str())
    }

    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

impl From<supervisor::Error> for BusError {
    fn from(e: supervisor::Error) -> Self {
        use supervisor::Error as E;
        let name = match &e {
            E::NoSuchApp(_) => ErrorName::NoSuchApp,
            E::NoSuchGeneration(_) => ErrorName::NoSuchGeneration,
            E::DeployFailed(_) => ErrorName::DeployFailed,
            E::Busy(_) => ErrorName::Busy,
            E::InvalidConfig(_) => ErrorName::InvalidConfig,
            E::InvalidArgs(_) => ErrorName::InvalidArgs,
            E::StopFailed(_) => ErrorName::StopFailed,
            E::Gone => ErrorName::NoServer,
        };
        BusError::new(name, e.to_string())
    }
}

impl From<crate::auth::Denied> for BusError {
    fn from(d: crate::auth::Denied) -> Self {
        match d {
            crate::auth::Denied::AccessDenied(m) => BusError::new(ErrorName::AccessDenied, m),
            crate::auth::Denied::InteractionRequired(m) => {
                BusError::new(ErrorName::InteractiveAuthorizationRequired, m)
            }
        }
    }
}

/// zbus errors reach a reply when a call's arguments do not match the method's signature or
/// types: the caller's arguments are invalid.
impl From<zbus::Error> for BusError {
    fn from(e: zbus::Error) -> Self {
        BusError::new(ErrorName::InvalidArgs, e.to_string())
    }
}

fn invalid_args(m: impl Into<String>) -> BusError {
    BusError::new(ErrorName::InvalidArgs, m)
}

/// A caller's app name, checked before anything else sees it — polkit (its `app` detail), the
/// supervisor, the journal: a malformed one is refused as `InvalidArgs` quoting at most 64
/// characters of it, escaped. `all`: the method takes "" for every app.
fn app_arg(app: &str, all: bool) -> Result<(), BusError> {
    if all && app.is_empty() {
        return Ok(());
    }
    ipcluster_core::name::AppName::new(app).map(drop).map_err(|e| invalid_args(e.to_string()))
}

/// An option's value as `T` (an owned copy: zbus converts owned variants into owned types).
fn typed<T: TryFrom<OwnedVariant>>(value: &OwnedVariant) -> Result<T, ()> {
    value.try_clone().ok().and_then(|v| T::try_from(v).ok()).ok_or(())
}

/// Parses Deploy's `a{sv}` options: the overrides, and a canary. Unknown keys and wrong types
/// are InvalidArgs.
fn parse_options(
    options: &HashMap<String, OwnedVariant>,
) -> Result<(Overrides, Option<CanaryRequest>), BusError> {
    if options.len() > option::MAX {
        return Err(invalid_args(format!("at most {} options", option::MAX)));
    }
    let mut o = Overrides::default();
    let (mut canary, mut canary_for) = (None, None);
    for (key, value) in options {
        let wrong = |ty: &str| invalid_args(format!("option {key:?} must be of type {ty}"));
        match key.as_str() {
            option::WORKERS => o.workers = Some(u32::try_from(value).map_err(|_| wrong("u (uint32)"))?),
            option::COMMAND => o.command = Some(typed(value).map_err(|_| wrong("as"))?),
            option::ENVIRONMENT => o.environment = Some(typed(value).map_err(|_| wrong("as"))?),
            option::WORKING_DIRECTORY => o.working_directory = Some(typed(value).map_err(|_| wrong("s"))?),
            option::CANARY => canary = Some(u32::try_from(value).map_err(|_| wrong("u (uint32)"))?),
            option::CANARY_FOR => {
                let secs = u64::try_from(value).map_err(|_| wrong("t (uint64, seconds)"))?;
                canary_for = Some(ipcluster_core::canary::check_for(secs).map_err(invalid_args)?);
            }
            _ => {
                let shown: String = key.chars().take(64).collect();
                return Err(invalid_args(format!(
                    "unknown option {shown:?} (known: {})",
                    option::ALL.join(", ")
                )));
            }
        }
    }
    let canary = match (canary, canary_for) {
        (Some(bands), canary_for) => Some(CanaryRequest { bands, canary_for }),
        (None, Some(_)) => {
            return Err(invalid_args("option \"canary_for\" needs \"canary\" (how many bands)"));
        }
        (None, None) => None,
    };
    Ok((o, canary))
}

/// The largest body a Deploy call may have: the options of a real deploy are a few hundred
/// bytes (at most 16 keys, a command and an environment). Anything larger is refused before
/// any other work.
pub const MAX_DEPLOY_BODY: u32 = 64 * 1024;

/// Refuses an options dict too large to be a real one, before it is sorted, joined, parsed or
/// shown to polkit: too many keys, a key too long, or a call body over [`MAX_DEPLOY_BODY`].
fn bound_options(
    hdr: &zbus::message::Header<'_>,
    options: &HashMap<String, OwnedVariant>,
) -> Result<(), BusError> {
    let size = hdr.primary().body_len();
    if size > MAX_DEPLOY_BODY {
        return Err(invalid_args(format!(
            "the call is {size} bytes; Deploy takes at most {MAX_DEPLOY_BODY}"
        )));
    }
    if options.len() > option::MAX {
        return Err(invalid_args(format!("at most {} options", option::MAX)));
    }
    if options.keys().any(|k| k.len() > option::MAX_KEY) {
        return Err(invalid_args(format!("option names are at most {} bytes", option::MAX_KEY)));
    }
    Ok(())
}

/// What a change needs of its caller: the polkit action, and the details polkit rules see
/// (`app`, `overrides`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Need {
    action: Action,
    /// `None`: a change of every app (Reload); no `app` detail then.
    app: Option<String>,
    overrides: String,
}

impl Need {
    /// `org.ipcluster1.manage` for `app` (polkit sees its name, "" for every app).
    fn app(app: &str) -> Self {
        Self { action: Action::Manage, app: Some(app.to_owned()), overrides: String::new() }
    }

    /// `org.ipcluster1.manage` for every app at once.
    fn any_app() -> Self {
        Self { action: Action::Manage, app: None, overrides: String::new() }
    }

    /// What a Deploy with `options` needs. Overrides run code of the caller's choosing: a
    /// second, stronger action. How to deploy (a canary) is not one.
    fn deploy(app: &str, options: &HashMap<String, OwnedVariant>) -> Self {
        let mut keys: Vec<&str> =
            options.keys().map(String::as_str).filter(|k| !option::NOT_OVERRIDES.contains(k)).collect();
        keys.sort_unstable();
        Self::app(app).with_overrides(&keys)
    }

    /// `org.ipcluster1.override` when `keys` name an override (a Deploy option that runs other
    /// code, or what a rollback replays), with them as the `overrides` detail.
    fn with_overrides(mut self, keys: &[&str]) -> Self {
        if !keys.is_empty() {
            self.action = Action::Override;
            self.overrides = keys.join(",");
        }
        self
    }
}

impl From<supervisor::WorkerInfo> for WorkerRow {
    fn from(w: supervisor::WorkerInfo) -> Self {
        let supervisor::WorkerInfo {
            app,
            generation,
            band,
            pid,
            state,
            ports,
            rss,
            cpu_usec,
            start_usec,
            nice,
            scope,
        } = w;
        WorkerRow {
            app,
            generation,
            band,
            pid,
            state: state.as_str().to_owned(),
            ports,
            rss,
            cpu_usec,
            start_usec,
            nice,
            scope,
        }
    }
}

impl From<supervisor::GenerationInfo> for GenerationRow {
    fn from(g: supervisor::GenerationInfo) -> Self {
        let supervisor::GenerationInfo { app, generation, state, workers, start_usec, scope } = g;
        GenerationRow { app, generation, state: state.as_str().to_owned(), workers, start_usec, scope }
    }
}

/// The D-Bus object at `/org/ipcluster1`.
#[derive(Debug)]
pub struct Manager {
    handle: Handle,
}

impl Manager {
    /// An adapter forwarding to the supervisor behind `handle`.
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    /// The one way a change reaches the supervisor: the caller is authorized for `need` first
    /// (failing closed: see [`crate::auth`]), and the command carries the proof, which nothing
    /// else makes. Every mutating method is this call and nothing more.
    async fn change<T>(
        &self,
        conn: &zbus::Connection,
        hdr: &zbus::message::Header<'_>,
        need: Need,
        make: impl FnOnce(Authorized, supervisor::Reply<T>) -> Command,
    ) -> Result<T, BusError> {
        let mut details = vec![("overrides", need.overrides.as_str())];
        if let Some(app) = &need.app {
            details.insert(0, ("app", app.as_str()));
        }
        let auth = authorize(conn, hdr, need.action, &details).await?;
        Ok(self.handle.call(|reply| make(auth, reply)).await?)
    }
}

#[zbus::interface(name = "org.ipcluster1.Manager")]
impl Manager {
    // Signals come first: zbus writes members in this order, and busctl (systemd 252 at least)
    // misreads a nested <node> (zbus puts each child object's interfaces inside its parent's
    // introspection) where a method's direction="in" argument precedes a signal: it warns
    // "Unexpected signal <arg> direction value 'in'" for every signal argument after it.

    /// A generation changed state.
    #[zbus(signal)]
    pub async fn generation_state_changed(
        emitter: &SignalEmitter<'_>,
        app: &str,
        generation: u64,
        state: &str,
    ) -> zbus::Result<()>;

    /// A worker became ready (accepts on its ports, or sent READY=1).
    #[zbus(signal)]
    pub async fn worker_ready(
        emitter: &SignalEmitter<'_>,
        app: &str,
        generation: u64,
        band: u32,
        pid: u32,
    ) -> zbus::Result<()>;

    /// A memory or health policy could not act: a retirement held back by `retire_rate`, or live
    /// workers alone over `cluster_memory_max` (band and pid are 0 then).
    #[zbus(signal)]
    pub async fn policy_held_back(
        emitter: &SignalEmitter<'_>,
        app: &str,
        generation: u64,
        band: u32,
        pid: u32,
        reason: &str,
    ) -> zbus::Result<()>;

    /// A canary ended: `result` is `promoted` or `rolled_back`; `reason` says why (who asked,
    /// `canary_for` passing, or the trouble that rolled it back by itself).
    #[zbus(signal)]
    pub async fn canary_ended(
        emitter: &SignalEmitter<'_>,
        app: &str,
        generation: u64,
        result: &str,
        reason: &str,
    ) -> zbus::Result<()>;

    /// A worker exited: `reason` is `exited N`, `killed by signal S`, or `reaped (...)`.
    #[zbus(signal)]
    pub async fn worker_exited(
        emitter: &SignalEmitter<'_>,
        app: &str,
        generation: u64,
        band: u32,
        pid: u32,
        reason: &str,
    ) -> zbus::Result<()>;

    /// Starts a new generation of `app` and returns its number after cutover (a canary's: after
    /// its bands' cutover).
    async fn deploy(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<u64, BusError> {
        app_arg(&app, false)?;
        bound_options(&hdr, &options)?;
        let need = Need::deploy(&app, &options);
        let (overrides, canary) = parse_options(&options)?;
        match canary {
            None => {
                self.change(conn, &hdr, need, |auth, reply| Command::Deploy { app, overrides, auth, reply })
                    .await
            }
            Some(canary) => {
                self.change(conn, &hdr, need, |auth, reply| Command::DeployCanary {
                    app,
                    overrides,
                    canary,
                    auth,
                    reply,
                })
                .await
            }
        }
    }

    /// Promotes `app`'s canary: its other bands start, then every band moves to it; returns its
    /// number once it is live.
    async fn promote(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
    ) -> Result<u64, BusError> {
        app_arg(&app, false)?;
        let need = Need::app(&app);
        self.change(conn, &hdr, need, |auth, reply| Command::Promote { app, auth, reply }).await
    }

    /// Goes back to an earlier generation (0: the newest that was live before the live one):
    /// the same workers in one cutover when they still run, else a new generation running what
    /// it ran. Returns the generation now live.
    async fn rollback(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
        generation: u64,
    ) -> Result<u64, BusError> {
        app_arg(&app, false)?;
        // Authorized by what it will do: replaying another generation's command or environment
        // is an override. The supervisor refuses if the plan changes before it acts.
        let plan =
            self.handle.call(|reply| Command::PlanRollback { app: app.clone(), generation, reply }).await?;
        let need = Need::app(&app).with_overrides(plan.overrides());
        self.change(conn, &hdr, need, |auth, reply| Command::Rollback { app, generation, plan, auth, reply })
            .await
    }

    /// Retires a generation (a live one only after its replacement is live).
    async fn retire_generation(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
        generation: u64,
    ) -> Result<(), BusError> {
        app_arg(&app, false)?;
        let need = Need::app(&app);
        self.change(conn, &hdr, need, |auth, reply| Command::Retire { app, generation, auth, reply }).await
    }

    /// Stops every retired worker of `app` ("" = all apps); returns how many it began to stop.
    async fn kill_retired(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
    ) -> Result<u32, BusError> {
        app_arg(&app, true)?;
        let need = Need::app(&app);
        self.change(conn, &hdr, need, |auth, reply| Command::KillRetired { app, auth, reply }).await
    }

    /// One entry per worker of `app` ("" = all apps).
    async fn list_workers(&self, app: String) -> Result<Vec<WorkerRow>, BusError> {
        app_arg(&app, true)?;
        let rows = self.handle.snapshot().await?.workers_of(&app)?;
        Ok(rows.into_iter().map(WorkerRow::from).collect())
    }

    /// One entry per generation of `app` ("" = all apps).
    async fn list_generations(&self, app: String) -> Result<Vec<GenerationRow>, BusError> {
        app_arg(&app, true)?;
        let rows = self.handle.snapshot().await?.generations_of(&app)?;
        Ok(rows.into_iter().map(GenerationRow::from).collect())
    }

    /// One entry per running generation with session affinity of `app` ("" = all apps): how
    /// many clients' next connection goes to it.
    async fn list_sessions(&self, app: String) -> Result<Vec<SessionRow>, BusError> {
        app_arg(&app, true)?;
        let rows = self.handle.snapshot().await?.sessions_of(&app)?;
        Ok(rows
            .into_iter()
            .map(|s| SessionRow { app: s.app, generation: s.generation, records: s.records })
            .collect())
    }

    /// One entry per worker of `app` ("" = all apps) whose generation has health checks: failed
    /// checks in a row, the last outcome, and what happened to its band before it.
    async fn list_health(&self, app: String) -> Result<Vec<HealthRow>, BusError> {
        app_arg(&app, true)?;
        let rows = self.handle.snapshot().await?.health_of(&app)?;
        Ok(rows
            .into_iter()
            .map(|h| HealthRow {
                app: h.app,
                generation: h.generation,
                band: h.band,
                pid: h.pid,
                failures: h.failures,
                last: h.last,
                last_usec: h.last_usec,
                note: h.note,
            })
            .collect())
    }

    /// Stops every generation of `app` and removes its rules, until the next Deploy.
    async fn stop_app(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
    ) -> Result<(), BusError> {
        app_arg(&app, false)?;
        let need = Need::app(&app);
        self.change(conn, &hdr, need, |auth, reply| Command::StopApp { app, auth, reply }).await
    }

    /// Re-reads /etc/ipcluster/apps/.
    async fn reload(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
    ) -> Result<(), BusError> {
        self.change(conn, &hdr, Need::any_app(), |auth, reply| Command::Reload { auth, reply }).await
    }

    /// The version of the running daemon.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        ipcluster_core::VERSION.to_owned()
    }

    /// The configured (valid) apps.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn apps(&self) -> Vec<String> {
        self.handle.snapshot().await.map(|s| s.valid.clone()).unwrap_or_default()
    }
}

/// Emits the supervisor's signals on the bus until the supervisor goes away.
pub async fn forward_signals(
    conn: zbus::Connection,
    path: &'static str,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<supervisor::BusSignal>,
) {
    let Ok(emitter) = SignalEmitter::new(&conn, path) else { return };
    while let Some(s) = rx.recv().await {
        let r = match &s {
            supervisor::BusSignal::GenerationStateChanged { app, generation, state } => {
                Manager::generation_state_changed(&emitter, app, *generation, state.as_str()).await
            }
            supervisor::BusSignal::WorkerExited { app, generation, band, pid, reason } => {
                Manager::worker_exited(&emitter, app, *generation, *band, *pid, reason).await
            }
            supervisor::BusSignal::WorkerReady { app, generation, band, pid } => {
                Manager::worker_ready(&emitter, app, *generation, *band, *pid).await
            }
            supervisor::BusSignal::PolicyHeldBack { app, generation, band, pid, reason } => {
                Manager::policy_held_back(&emitter, app, *generation, *band, *pid, reason).await
            }
            supervisor::BusSignal::CanaryEnded { app, generation, result, reason } => {
                Manager::canary_ended(&emitter, app, *generation, result, reason).await
            }
        };
        if let Err(e) = r {
            tracing::warn!("cannot emit {s:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
