//! `org.ipcluster1.Manager`: a thin adapter. It converts D-Bus types, sends a command to the
//! supervisor and maps the answer back; it holds no state of its own. Errors are mapped to bus
//! error names in one place: [`BusError::from`].

use std::collections::HashMap;

use ipcluster_core::config::Overrides;
use zbus::{object_server::SignalEmitter, wire::OwnedVariant};

use crate::supervisor::{self, Command, Handle};

/// An error as it crosses the bus: a name and a message. Names are `org.ipcluster1.Error.*`
/// for ipclusterd's own errors and the standard `org.freedesktop.DBus.Error.*` ones otherwise;
/// never a bare `Failed`. Every mapping happens here, in [`From`] impls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusError {
    name: &'static str,
    message: String,
}

/// Error names (docs/dbus.md lists them with their meaning).
pub mod names {
    pub const NO_SUCH_APP: &str = "org.ipcluster1.Error.NoSuchApp";
    pub const NO_SUCH_GENERATION: &str = "org.ipcluster1.Error.NoSuchGeneration";
    pub const DEPLOY_FAILED: &str = "org.ipcluster1.Error.DeployFailed";
    pub const BUSY: &str = "org.ipcluster1.Error.Busy";
    pub const INVALID_CONFIG: &str = "org.ipcluster1.Error.InvalidConfig";
    pub const STOP_FAILED: &str = "org.ipcluster1.Error.StopFailed";
    pub const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
    pub const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
    pub const INTERACTIVE_AUTHORIZATION_REQUIRED: &str =
        "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired";
    pub const NO_SERVER: &str = "org.freedesktop.DBus.Error.NoServer";
}

impl BusError {
    fn new(name: &'static str, message: impl Into<String>) -> Self {
        Self { name, message: message.into() }
    }
}

impl zbus::DBusError for BusError {
    fn create_reply(&self, call: &zbus::message::Header<'_>) -> zbus::Result<zbus::message::Message> {
        zbus::message::Message::error(call, self.name).build(&(self.message.as_str(),))
    }

    fn name(&self) -> zbus::names::ErrorName<'_> {
        zbus::names::ErrorName::from_static_str_unchecked(self.name)
    }

    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

impl From<supervisor::Error> for BusError {
    fn from(e: supervisor::Error) -> Self {
        use supervisor::Error as E;
        let name = match &e {
            E::NoSuchApp(_) => names::NO_SUCH_APP,
            E::NoSuchGeneration(_) => names::NO_SUCH_GENERATION,
            E::DeployFailed(_) => names::DEPLOY_FAILED,
            E::Busy(_) => names::BUSY,
            E::InvalidConfig(_) => names::INVALID_CONFIG,
            E::InvalidArgs(_) => names::INVALID_ARGS,
            E::StopFailed(_) => names::STOP_FAILED,
            E::Gone => names::NO_SERVER,
        };
        BusError::new(name, e.to_string())
    }
}

impl From<crate::auth::Denied> for BusError {
    fn from(d: crate::auth::Denied) -> Self {
        match d {
            crate::auth::Denied::AccessDenied(m) => BusError::new(names::ACCESS_DENIED, m),
            crate::auth::Denied::InteractionRequired(m) => {
                BusError::new(names::INTERACTIVE_AUTHORIZATION_REQUIRED, m)
            }
        }
    }
}

/// zbus errors reach a reply when a call's arguments do not match the method's signature or
/// types: the caller's arguments are invalid.
impl From<zbus::Error> for BusError {
    fn from(e: zbus::Error) -> Self {
        BusError::new(names::INVALID_ARGS, e.to_string())
    }
}

fn invalid_args(m: impl Into<String>) -> BusError {
    BusError::new(names::INVALID_ARGS, m)
}

/// Most options a Deploy call may carry.
const MAX_OPTIONS: usize = 16;

/// An option's value as `T` (an owned copy: zbus converts owned variants into owned types).
fn typed<T: TryFrom<OwnedVariant>>(value: &OwnedVariant) -> Result<T, ()> {
    value.try_clone().ok().and_then(|v| T::try_from(v).ok()).ok_or(())
}

/// Parses Deploy's `a{sv}` options. Unknown keys and wrong types are InvalidArgs.
fn parse_options(options: &HashMap<String, OwnedVariant>) -> Result<Overrides, BusError> {
    if options.len() > MAX_OPTIONS {
        return Err(invalid_args(format!("at most {MAX_OPTIONS} options")));
    }
    let mut o = Overrides::default();
    for (key, value) in options {
        let wrong = |ty: &str| invalid_args(format!("option {key:?} must be of type {ty}"));
        match key.as_str() {
            "workers" => o.workers = Some(u32::try_from(value).map_err(|_| wrong("u (uint32)"))?),
            "command" => o.command = Some(typed(value).map_err(|_| wrong("as"))?),
            "environment" => o.environment = Some(typed(value).map_err(|_| wrong("as"))?),
            "working_directory" => o.working_directory = Some(typed(value).map_err(|_| wrong("s"))?),
            _ => {
                let shown: String = key.chars().take(64).collect();
                return Err(invalid_args(format!(
                    "unknown option {shown:?} (known: workers, command, environment, working_directory)"
                )));
            }
        }
    }
    Ok(o)
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
}

/// ListWorkers row: app, generation, band, pid, state, ports (public, worker), RSS bytes,
/// CPU µs, start µs since the epoch, nice, scope.
type WorkerRow = (String, u64, u32, u32, String, Vec<(u16, u16)>, u64, u64, u64, i32, String);
/// ListGenerations row: app, generation, state, workers, start µs, scope.
type GenerationRow = (String, u64, String, u32, u64, String);

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

    /// Starts a new generation of `app` and returns its number after cutover.
    async fn deploy(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
        options: HashMap<String, OwnedVariant>,
    ) -> Result<u64, BusError> {
        crate::auth::authorize(conn, &hdr).await?;
        let overrides = parse_options(&options)?;
        Ok(self.handle.call(|reply| Command::Deploy { app, overrides, reply }).await?)
    }

    /// Retires a generation (a live one only after its replacement is live).
    async fn retire_generation(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
        generation: u64,
    ) -> Result<(), BusError> {
        crate::auth::authorize(conn, &hdr).await?;
        Ok(self.handle.call(|reply| Command::Retire { app, generation, reply }).await?)
    }

    /// Stops every retired worker of `app` ("" = all apps); returns how many it began to stop.
    async fn kill_retired(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
    ) -> Result<u32, BusError> {
        crate::auth::authorize(conn, &hdr).await?;
        Ok(self.handle.call(|reply| Command::KillRetired { app, reply }).await?)
    }

    /// One entry per worker of `app` ("" = all apps).
    async fn list_workers(&self, app: String) -> Result<Vec<WorkerRow>, BusError> {
        let rows = self.handle.call(|reply| Command::ListWorkers { app, reply }).await?;
        Ok(rows
            .into_iter()
            .map(|w| {
                (
                    w.app,
                    w.generation,
                    w.band,
                    w.pid,
                    w.state.as_str().to_owned(),
                    w.ports,
                    w.rss,
                    w.cpu_usec,
                    w.start_usec,
                    w.nice,
                    w.scope,
                )
            })
            .collect())
    }

    /// One entry per generation of `app` ("" = all apps).
    async fn list_generations(&self, app: String) -> Result<Vec<GenerationRow>, BusError> {
        let rows = self.handle.call(|reply| Command::ListGenerations { app, reply }).await?;
        Ok(rows
            .into_iter()
            .map(|g| (g.app, g.generation, g.state.as_str().to_owned(), g.workers, g.start_usec, g.scope))
            .collect())
    }

    /// Stops every generation of `app` and removes its rules, until the next Deploy.
    async fn stop_app(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
    ) -> Result<(), BusError> {
        crate::auth::authorize(conn, &hdr).await?;
        Ok(self.handle.call(|reply| Command::StopApp { app, reply }).await?)
    }

    /// Re-reads /etc/ipcluster/apps/.
    async fn reload(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
    ) -> Result<(), BusError> {
        crate::auth::authorize(conn, &hdr).await?;
        Ok(self.handle.call(|reply| Command::Reload { reply }).await?)
    }

    /// The version of the running daemon.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        ipcluster_core::VERSION.to_owned()
    }

    /// The configured (valid) apps.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn apps(&self) -> Vec<String> {
        self.handle.ask(Command::Apps).await.unwrap_or_default()
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
        };
        if let Err(e) = r {
            tracing::warn!("cannot emit {s:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use zbus::wire::{Str, Variant};

    use super::*;

    fn v<'a>(x: impl Into<Variant<'a>>) -> OwnedVariant {
        x.into().try_to_owned().unwrap()
    }

    #[test]
    fn options_of_the_documented_types_are_accepted() {
        let options = HashMap::from([
            ("workers".to_owned(), v(8u32)),
            ("command".to_owned(), v(vec!["/bin/srv", "--x"])),
            ("environment".to_owned(), v(vec!["A=1"])),
            ("working_directory".to_owned(), v(Str::from("/srv"))),
        ]);
        let o = parse_options(&options).unwrap();
        assert_eq!(o.workers, Some(8));
        assert_eq!(o.command.unwrap(), ["/bin/srv", "--x"]);
        assert_eq!(o.environment.unwrap(), ["A=1"]);
        assert_eq!(o.working_directory.as_deref(), Some("/srv"));
    }

    #[test]
    fn wrong_types_unknown_keys_and_too_many_options_are_invalid_args() {
        for (key, value) in [
            ("workers", v(Str::from("8"))),
            ("workers", v(8i32)),
            ("command", v(Str::from("/bin/sh -c x"))),
            ("environment", v(7u32)),
            ("working_directory", v(vec!["/"])),
            ("colour", v(1u32)),
        ] {
            let e = parse_options(&HashMap::from([(key.to_owned(), value)])).unwrap_err();
            assert_eq!(e.name, names::INVALID_ARGS, "{key}: {e:?}");
        }
        let many: HashMap<String, OwnedVariant> = (0..17).map(|i| (format!("k{i}"), v(1u32))).collect();
        assert!(parse_options(&many).unwrap_err().message.contains("at most 16"));
    }

    #[test]
    fn every_supervisor_error_has_its_own_name() {
        use supervisor::Error as E;
        let cases = [
            (E::NoSuchApp("x".into()), names::NO_SUCH_APP),
            (E::NoSuchGeneration("x".into()), names::NO_SUCH_GENERATION),
            (E::DeployFailed("x".into()), names::DEPLOY_FAILED),
            (E::Busy("x".into()), names::BUSY),
            (E::InvalidConfig("x".into()), names::INVALID_CONFIG),
            (E::InvalidArgs("x".into()), names::INVALID_ARGS),
            (E::StopFailed("x".into()), names::STOP_FAILED),
            (E::Gone, names::NO_SERVER),
        ];
        for (e, name) in cases {
            let b = BusError::from(e);
            assert_eq!(b.name, name);
            assert!(!b.name.ends_with(".Failed"), "never a bare Failed");
        }
        let denied = BusError::from(crate::auth::Denied::AccessDenied("no".into()));
        assert_eq!(denied.name, names::ACCESS_DENIED);
    }
}
