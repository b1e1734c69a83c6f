//! `org.ipcluster1.Manager`: a thin adapter. It converts D-Bus types, sends a command to the
//! supervisor and maps the answer back; it holds no state of its own. The contract (names,
//! error names, option keys, rows) is [`ipcluster_bus`]'s; errors are mapped to bus error names
//! in one place: [`BusError::from`].

use std::collections::HashMap;

use ipcluster_bus::{ErrorName, GenerationRow, WorkerRow, option};
use ipcluster_core::config::Overrides;
use zbus::{object_server::SignalEmitter, wire::OwnedVariant};

use crate::{
    auth::{Action, authorize},
    supervisor::{self, Command, Handle},
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

/// An option's value as `T` (an owned copy: zbus converts owned variants into owned types).
fn typed<T: TryFrom<OwnedVariant>>(value: &OwnedVariant) -> Result<T, ()> {
    value.try_clone().ok().and_then(|v| T::try_from(v).ok()).ok_or(())
}

/// Parses Deploy's `a{sv}` options. Unknown keys and wrong types are InvalidArgs.
fn parse_options(options: &HashMap<String, OwnedVariant>) -> Result<Overrides, BusError> {
    if options.len() > option::MAX {
        return Err(invalid_args(format!("at most {} options", option::MAX)));
    }
    let mut o = Overrides::default();
    for (key, value) in options {
        let wrong = |ty: &str| invalid_args(format!("option {key:?} must be of type {ty}"));
        match key.as_str() {
            option::WORKERS => o.workers = Some(u32::try_from(value).map_err(|_| wrong("u (uint32)"))?),
            option::COMMAND => o.command = Some(typed(value).map_err(|_| wrong("as"))?),
            option::ENVIRONMENT => o.environment = Some(typed(value).map_err(|_| wrong("as"))?),
            option::WORKING_DIRECTORY => o.working_directory = Some(typed(value).map_err(|_| wrong("s"))?),
            _ => {
                let shown: String = key.chars().take(64).collect();
                return Err(invalid_args(format!(
                    "unknown option {shown:?} (known: {})",
                    option::ALL.join(", ")
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
        // Overrides run code of the caller's choosing: a second, stronger action.
        let keys: Vec<&str> = {
            let mut k: Vec<&str> = options.keys().map(String::as_str).collect();
            k.sort_unstable();
            k
        };
        let (action, overrides) = if keys.is_empty() {
            (Action::Manage, String::new())
        } else {
            (Action::Override, keys.join(","))
        };
        authorize(conn, &hdr, action, &[("app", &app), ("overrides", &overrides)]).await?;
        let overrides = parse_options(&options)?;
        Ok(self.handle.call(|reply| Command::Deploy { app, overrides, reply }).await?)
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
        authorize(conn, &hdr, Action::Manage, &[("app", &app)]).await?;
        Ok(self.handle.call(|reply| Command::Rollback { app, generation, reply }).await?)
    }

    /// Retires a generation (a live one only after its replacement is live).
    async fn retire_generation(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
        generation: u64,
    ) -> Result<(), BusError> {
        authorize(conn, &hdr, Action::Manage, &[("app", &app)]).await?;
        Ok(self.handle.call(|reply| Command::Retire { app, generation, reply }).await?)
    }

    /// Stops every retired worker of `app` ("" = all apps); returns how many it began to stop.
    async fn kill_retired(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        app: String,
    ) -> Result<u32, BusError> {
        authorize(conn, &hdr, Action::Manage, &[("app", &app)]).await?;
        Ok(self.handle.call(|reply| Command::KillRetired { app, reply }).await?)
    }

    /// One entry per worker of `app` ("" = all apps).
    async fn list_workers(&self, app: String) -> Result<Vec<WorkerRow>, BusError> {
        let rows = self.handle.snapshot().await?.workers_of(&app)?;
        Ok(rows
            .into_iter()
            .map(|w| WorkerRow {
                app: w.app,
                generation: w.generation,
                band: w.band,
                pid: w.pid,
                state: w.state.as_str().to_owned(),
                ports: w.ports,
                rss: w.rss,
                cpu_usec: w.cpu_usec,
                start_usec: w.start_usec,
                nice: w.nice,
                scope: w.scope,
            })
            .collect())
    }

    /// One entry per generation of `app` ("" = all apps).
    async fn list_generations(&self, app: String) -> Result<Vec<GenerationRow>, BusError> {
        let rows = self.handle.snapshot().await?.generations_of(&app)?;
        Ok(rows
            .into_iter()
            .map(|g| GenerationRow {
                app: g.app,
                generation: g.generation,
                state: g.state.as_str().to_owned(),
                workers: g.workers,
                start_usec: g.start_usec,
                scope: g.scope,
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
        authorize(conn, &hdr, Action::Manage, &[("app", &app)]).await?;
        Ok(self.handle.call(|reply| Command::StopApp { app, reply }).await?)
    }

    /// Re-reads /etc/ipcluster/apps/.
    async fn reload(
        &self,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
    ) -> Result<(), BusError> {
        authorize(conn, &hdr, Action::Manage, &[]).await?;
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
            assert_eq!(e.name, ErrorName::InvalidArgs, "{key}: {e:?}");
        }
        let many: HashMap<String, OwnedVariant> = (0..17).map(|i| (format!("k{i}"), v(1u32))).collect();
        assert!(parse_options(&many).unwrap_err().message.contains("at most 16"));
    }

    /// The interface served over a peer-to-peer connection, with a fake supervisor behind the
    /// handle: what a client sees on the wire (rows, error names, properties, signals).
    async fn served(
        snapshot: supervisor::Snapshot,
        answer: impl FnMut(Command) + Send + 'static,
    ) -> (zbus::Connection, zbus::Connection) {
        let (handle, mut mailbox) = supervisor::channel();
        mailbox.publish(snapshot);
        let mut answer = answer;
        tokio::spawn(async move {
            while let Some(c) = mailbox.recv().await {
                answer(c);
            }
        });
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let guid = zbus::Guid::generate();
        let server = zbus::connection::Builder::unix_stream(a)
            .server(guid)
            .p2p()
            .serve_at(ipcluster_bus::OBJECT_PATH, Manager::new(handle))
            .build();
        let client = zbus::connection::Builder::unix_stream(b).p2p().build();
        let (server, client) = tokio::join!(server, client);
        (server.unwrap(), client.unwrap())
    }

    fn row(app: &str) -> supervisor::WorkerInfo {
        supervisor::WorkerInfo {
            app: app.into(),
            generation: 3,
            band: 1,
            pid: 4711,
            state: ipcluster_core::model::WorkerState::Retired,
            ports: vec![(80, 20001)],
            rss: 1 << 20,
            cpu_usec: 5,
            start_usec: 6,
            nice: 5,
            scope: "ipcluster-web-3.scope".into(),
        }
    }

    #[tokio::test]
    async fn the_wire_carries_named_rows_error_names_properties_and_signals() {
        let snapshot = supervisor::Snapshot {
            workers: vec![row("web"), row("api")],
            known: ["web", "api"]
                .into_iter()
                .map(|a| ipcluster_core::name::AppName::new(a).unwrap())
                .collect(),
            valid: vec!["web".into()],
            config_dir: "/etc/ipcluster/apps".into(),
            ..Default::default()
        };
        let (server, client) = served(snapshot, |_| {}).await;
        let proxy = ipcluster_bus::ManagerProxy::new(&client).await.unwrap();
        let rows = proxy.list_workers("web").await.unwrap();
        assert_eq!(rows.len(), 1);
        let w = &rows[0];
        assert_eq!(
            (w.app.as_str(), w.generation, w.band, w.pid, w.state.as_str()),
            ("web", 3, 1, 4711, "retired")
        );
        assert_eq!(
            (w.ports.clone(), w.rss, w.nice, w.scope.as_str()),
            (vec![(80, 20001)], 1 << 20, 5, "ipcluster-web-3.scope")
        );
        match proxy.list_workers("nope").await.unwrap_err() {
            zbus::Error::MethodError(name, message, _) => {
                assert_eq!(name.as_str(), ErrorName::NoSuchApp.as_str());
                assert_eq!(
                    message.as_deref(),
                    Some("no app \"nope\" (no file /etc/ipcluster/apps/nope.toml)")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(proxy.apps().await.unwrap(), ["web"]);
        assert_eq!(proxy.version().await.unwrap(), ipcluster_core::VERSION);

        let mut states = proxy.receive_generation_state_changed().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(forward_signals(server.clone(), ipcluster_bus::OBJECT_PATH, rx));
        tx.send(supervisor::BusSignal::GenerationStateChanged {
            app: "web".into(),
            generation: 4,
            state: ipcluster_core::model::GenState::Live,
        })
        .unwrap();
        let s = futures_util::StreamExt::next(&mut states).await.unwrap();
        let args = s.args().unwrap();
        assert_eq!((args.app.as_str(), args.generation, args.state.as_str()), ("web", 4, "live"));
    }

    #[tokio::test]
    async fn changes_fail_closed_when_the_caller_cannot_be_identified() {
        // No bus daemon to ask who the caller is: every mutating call is refused, and the
        // supervisor never hears of it.
        let heard = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = heard.clone();
        let (_server, client) = served(supervisor::Snapshot::default(), move |_| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .await;
        let proxy = ipcluster_bus::ManagerProxy::new(&client).await.unwrap();
        let name = |e: zbus::Error| match e {
            zbus::Error::FDO(f) => zbus::DBusError::name(&*f).to_string(),
            zbus::Error::MethodError(n, _, _) => n.to_string(),
            other => panic!("{other:?}"),
        };
        let denied = ErrorName::AccessDenied.as_str();
        assert_eq!(name(proxy.deploy("web", HashMap::new()).await.unwrap_err()), denied);
        assert_eq!(name(proxy.kill_retired("").await.unwrap_err()), denied);
        assert_eq!(name(proxy.stop_app("web").await.unwrap_err()), denied);
        assert!(!heard.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn every_supervisor_error_has_its_own_name() {
        use supervisor::Error as E;
        let cases = [
            (E::NoSuchApp("x".into()), ErrorName::NoSuchApp),
            (E::NoSuchGeneration("x".into()), ErrorName::NoSuchGeneration),
            (E::DeployFailed("x".into()), ErrorName::DeployFailed),
            (E::Busy("x".into()), ErrorName::Busy),
            (E::InvalidConfig("x".into()), ErrorName::InvalidConfig),
            (E::InvalidArgs("x".into()), ErrorName::InvalidArgs),
            (E::StopFailed("x".into()), ErrorName::StopFailed),
            (E::Gone, ErrorName::NoServer),
        ];
        for (e, name) in cases {
            assert_eq!(BusError::from(e).name, name);
        }
        let denied = BusError::from(crate::auth::Denied::AccessDenied("no".into()));
        assert_eq!(denied.name, ErrorName::AccessDenied);
    }

    mod props {
        use proptest::{prelude::*, test_runner::Config};

        use super::*;

        /// An option value of one of the types a caller can send.
        #[derive(Debug, Clone)]
        enum Value {
            U32(u32),
            I32(i32),
            U64(u64),
            Bool(bool),
            Str(String),
            Strs(Vec<String>),
            U32s(Vec<u32>),
        }

        impl Value {
            fn variant(&self) -> OwnedVariant {
                match self.clone() {
                    Value::U32(x) => v(x),
                    Value::I32(x) => v(x),
                    Value::U64(x) => v(x),
                    Value::Bool(x) => v(x),
                    Value::Str(x) => v(Str::from(x)),
                    Value::Strs(x) => v(x),
                    Value::U32s(x) => v(x),
                }
            }
        }

        fn value() -> impl Strategy<Value = Value> {
            let text = "[^\\x00]{0,40}";
            prop_oneof![
                any::<u32>().prop_map(Value::U32),
                any::<i32>().prop_map(Value::I32),
                any::<u64>().prop_map(Value::U64),
                any::<bool>().prop_map(Value::Bool),
                text.prop_map(Value::Str),
                prop::collection::vec(text, 0..5).prop_map(Value::Strs),
                prop::collection::vec(any::<u32>(), 0..5).prop_map(Value::U32s),
            ]
        }

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => prop::sample::select(option::ALL.to_vec()).prop_map(str::to_owned),
                1 => "[^\\x00]{0,300}",
            ]
        }

        proptest! {
            #![proptest_config(Config { cases: 512, failure_persistence: None, ..Config::default() })]

            /// Any options of any types: no panic; accepted ones are taken as given; refused
            /// ones are InvalidArgs with a short, printable message.
            #[test]
            fn any_options_are_parsed_or_refused_briefly(
                entries in prop::collection::vec((key(), value()), 0..(option::MAX + 4)),
            ) {
                let options: HashMap<String, OwnedVariant> =
                    entries.iter().map(|(k, val)| (k.clone(), val.variant())).collect();
                let given: HashMap<&String, &Value> = entries.iter().map(|(k, val)| (k, val)).collect();
                match parse_options(&options) {
                    Ok(o) => {
                        prop_assert!(options.len() <= option::MAX);
                        match given.get(&option::WORKERS.to_owned()) {
                            Some(Value::U32(w)) => prop_assert_eq!(o.workers, Some(*w)),
                            other => prop_assert!(other.is_none() && o.workers.is_none()),
                        }
                        match given.get(&option::COMMAND.to_owned()) {
                            Some(Value::Strs(c)) => prop_assert_eq!(o.command.as_ref(), Some(c)),
                            // zvariant does not check the element type of an empty array: an
                            // empty `au` is taken as an empty `as` (then refused by the config
                            // check: a command must name a program).
                            Some(Value::U32s(c)) if c.is_empty() => prop_assert_eq!(o.command, Some(vec![])),
                            other => prop_assert!(other.is_none() && o.command.is_none()),
                        }
                        match given.get(&option::WORKING_DIRECTORY.to_owned()) {
                            Some(Value::Str(d)) => prop_assert_eq!(o.working_directory.as_ref(), Some(d)),
                            other => prop_assert!(other.is_none() && o.working_directory.is_none()),
                        }
                    }
                    Err(e) => {
                        prop_assert_eq!(e.name, ErrorName::InvalidArgs);
                        // At most 64 characters of a key are quoted, each at most 10 when
                        // escaped (`\u{10ffff}`), in a sentence of about 100.
                        prop_assert!(e.message.chars().count() < 800, "{}", e.message);
                        prop_assert!(!e.message.chars().any(char::is_control), "{:?}", e.message);
                    }
                }
            }
        }
    }
}
