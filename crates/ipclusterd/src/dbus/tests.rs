//! The adapter over a peer-to-peer connection: options, rows, error names, properties,
//! signals, and authorization of every method.

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
    let (o, canary) = parse_options(&options).unwrap();
    assert_eq!(o.workers, Some(8));
    assert_eq!(o.command.unwrap(), ["/bin/srv", "--x"]);
    assert_eq!(o.environment.unwrap(), ["A=1"]);
    assert_eq!(o.working_directory.as_deref(), Some("/srv"));
    assert_eq!(canary, None);
    let canary = HashMap::from([("canary".to_owned(), v(1u32)), ("canary_for".to_owned(), v(600u64))]);
    let (o, c) = parse_options(&canary).unwrap();
    assert_eq!(o, Overrides::default(), "a canary overrides nothing");
    assert_eq!(c, Some(CanaryRequest { bands: 1, canary_for: Some(std::time::Duration::from_secs(600)) }));
}

/// A canary (`canary`, `canary_for`) runs the app file's own code: `manage`, like a plain
/// Deploy; any override makes it `override`, with the override keys (sorted) alone as the detail.
#[test]
fn a_canary_needs_manage_and_an_override_needs_override() {
    let canary = HashMap::from([("canary".to_owned(), v(1u32)), ("canary_for".to_owned(), v(600u64))]);
    assert_eq!(Need::deploy("web", &canary), Need::app("web"));
    assert_eq!(Need::deploy("web", &HashMap::new()), Need::app("web"));
    let mut both = canary.clone();
    both.insert("workers".to_owned(), v(8u32));
    both.insert("environment".to_owned(), v(vec!["A=1".to_owned()]));
    let need = Need::deploy("web", &both);
    assert_eq!((need.action, need.overrides.as_str()), (Action::Override, "environment,workers"));
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
        ("canary", v(1u64)),
        ("canary_for", v(600u32)),
        ("canary_for", v(0u64)),
    ] {
        let e = parse_options(&HashMap::from([(key.to_owned(), value)])).unwrap_err();
        assert_eq!(e.name, ErrorName::InvalidArgs, "{key}: {e:?}");
    }
    let alone = HashMap::from([("canary_for".to_owned(), v(600u64))]);
    assert!(parse_options(&alone).unwrap_err().message.contains("needs \"canary\""));
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
        known: ["web", "api"].into_iter().map(|a| ipcluster_core::name::AppName::new(a).unwrap()).collect(),
        valid: vec!["web".into()],
        config_dir: "/etc/ipcluster/apps".into(),
        ..supervisor::Snapshot::with_workers(vec![row("web"), row("api")])
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
            assert_eq!(message.as_deref(), Some("no app \"nope\" (no file /etc/ipcluster/apps/nope.toml)"));
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

/// The D-Bus error name of a failed call.
fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(n, _, _) => n.to_string(),
        zbus::Error::FDO(f) => zbus::DBusError::name(&**f).to_string(),
        other => panic!("not an error reply: {other:?}"),
    }
}

/// The methods that only read: served from the snapshot, they never send a command.
const READS: [&str; 4] = ["ListGenerations", "ListHealth", "ListSessions", "ListWorkers"];

/// The methods of the served interface and their input signatures, from the daemon's own
/// introspection (what a client sees, whatever the docs say).
async fn served_methods(client: &zbus::Connection) -> Vec<(String, String)> {
    let reply = client
        .call_method(
            None::<&str>,
            ipcluster_bus::OBJECT_PATH,
            Some("org.freedesktop.DBus.Introspectable"),
            "Introspect",
            &(),
        )
        .await
        .unwrap();
    let xml: String = reply.body().deserialize().unwrap();
    let iface = xml
        .split(&format!("<interface name=\"{}\">", ipcluster_bus::INTERFACE))
        .nth(1)
        .and_then(|rest| rest.split("</interface>").next())
        .expect("the interface is served");
    iface
        .split("<method name=\"")
        .skip(1)
        .map(|m| {
            let (name, body) = m.split_once('"').unwrap();
            let body = body.split("</method>").next().unwrap();
            let signature: String = body
                .split("<arg ")
                .skip(1)
                .filter(|a| a.contains("direction=\"in\""))
                .map(|a| a.split("type=\"").nth(1).unwrap().split('"').next().unwrap().to_owned())
                .collect();
            (name.to_owned(), signature)
        })
        .collect()
}

/// Calls `method` with harmless arguments of `signature` (app "web", generation 1, no
/// options); a signature this does not know fails the test until a case is added here.
async fn call_any(client: &zbus::Connection, method: &str, signature: &str) -> zbus::Result<()> {
    let (path, iface) = (ipcluster_bus::OBJECT_PATH, Some(ipcluster_bus::INTERFACE));
    let options: HashMap<String, OwnedVariant> = HashMap::new();
    match signature {
        "" => client.call_method(None::<&str>, path, iface, method, &()).await,
        "s" => client.call_method(None::<&str>, path, iface, method, &("web",)).await,
        "st" => client.call_method(None::<&str>, path, iface, method, &("web", 1u64)).await,
        "sa{sv}" => client.call_method(None::<&str>, path, iface, method, &("web", options)).await,
        other => panic!("{method}({other}): add arguments of this signature to call_any"),
    }
    .map(drop)
}

/// Issue 22: every method of the interface, as introspection lists it, either only reads
/// (and then sends the supervisor no command) or is refused to a caller who cannot be
/// authorized (here, with no bus daemon to identify the caller, every one) with AccessDenied,
/// and then the supervisor hears of no change. A method added without going through
/// `Manager::change` fails here.
#[tokio::test]
async fn every_method_either_only_reads_or_refuses_a_caller_without_rights() {
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = heard.clone();
    let (_server, client) = served(supervisor::Snapshot::default(), move |c| {
        let mut log = log.lock().unwrap();
        match c {
            // A read: the plan a Rollback is authorized by.
            Command::PlanRollback { reply, .. } => {
                let plan = supervisor::RollbackPlan { target: 1, how: supervisor::RollbackHow::Instant };
                let _ = reply.send(Ok(plan));
                log.push("PlanRollback (a read)".into());
            }
            other => log.push(format!("CHANGE {other:?}")),
        }
    })
    .await;
    let methods = served_methods(&client).await;
    assert!(methods.len() >= 8, "{methods:?}");
    let denied = ErrorName::AccessDenied.as_str();
    for (method, signature) in &methods {
        heard.lock().unwrap().clear();
        let result = call_any(&client, method, signature).await;
        let changes: Vec<String> =
            heard.lock().unwrap().iter().filter(|c| c.starts_with("CHANGE")).cloned().collect();
        assert!(changes.is_empty(), "{method} sent a change without authorization: {changes:?}");
        if READS.contains(&method.as_str()) {
            continue;
        }
        let e = result.expect_err(method);
        assert_eq!(error_name(&e), denied, "{method}: {e:?}");
    }
}

/// Issue 21, item 6: an options dict too large to be a real one is refused before it is
/// sorted, shown to polkit or parsed (InvalidArgs, not AccessDenied: no authorization was
/// even asked), and the supervisor hears nothing.
#[tokio::test]
async fn oversized_options_are_refused_before_anything_else() {
    let heard = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = heard.clone();
    let (_server, client) = served(supervisor::Snapshot::default(), move |_| {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    })
    .await;
    let proxy = ipcluster_bus::ManagerProxy::new(&client).await.unwrap();
    let cases: [(&str, Vec<(String, OwnedVariant)>); 3] = [
        ("a 100 KB value", vec![("environment".into(), v(vec!["X=".to_owned() + &"y".repeat(100_000)]))]),
        ("17 options", (0..17).map(|i| (format!("k{i}"), v(1u32))).collect()),
        ("a 65-byte name", vec![("k".repeat(65), v(1u32))]),
    ];
    for (what, options) in cases {
        let options: HashMap<&str, OwnedVariant> =
            options.iter().map(|(k, x)| (k.as_str(), x.try_clone().unwrap())).collect();
        let e = proxy.deploy("web", options).await.unwrap_err();
        assert_eq!(error_name(&e), ErrorName::InvalidArgs.as_str(), "{what}: {e:?}");
    }
    assert!(!heard.load(std::sync::atomic::Ordering::SeqCst));
}

/// A malformed app name (found by the soak: a line break and a terminal escape, 10 000
/// characters) is refused by every method that takes one, as InvalidArgs quoting at most 64
/// characters of it escaped, before polkit or the supervisor sees it (so it never reaches the
/// journal raw); "" stays every app where a method says so.
#[tokio::test]
async fn malformed_app_names_are_refused_before_authorization_by_every_method() {
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = heard.clone();
    let (_server, client) =
        served(supervisor::Snapshot::default(), move |c| log.lock().unwrap().push(format!("{c:?}"))).await;
    let (path, iface) = (ipcluster_bus::OBJECT_PATH, Some(ipcluster_bus::INTERFACE));
    let forged = "soak\nipclusterd: \u{1b}[31mforged line".to_owned();
    let long = "a".repeat(10_000);
    for (method, signature) in served_methods(&client).await {
        if !signature.starts_with('s') {
            continue;
        }
        for name in [forged.as_str(), long.as_str(), "../etc", "demo;reboot", "Web"] {
            let options: HashMap<String, OwnedVariant> = HashMap::new();
            let r = match signature.as_str() {
                "s" => client.call_method(None::<&str>, path, iface, method.as_str(), &(name,)).await,
                "st" => client.call_method(None::<&str>, path, iface, method.as_str(), &(name, 1u64)).await,
                "sa{sv}" => {
                    client.call_method(None::<&str>, path, iface, method.as_str(), &(name, options)).await
                }
                other => panic!("{method}({other}): add a case"),
            };
            let e = r.map(drop).expect_err(&method);
            assert_eq!(error_name(&e), ErrorName::InvalidArgs.as_str(), "{method}: {e:?}");
            let message = e.to_string();
            assert!(
                message.len() < 300 && !message.contains('\n') && !message.contains('\u{1b}'),
                "{message}"
            );
        }
    }
    assert_eq!(*heard.lock().unwrap(), Vec::<String>::new(), "the supervisor heard nothing");
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
    use ipcluster_core::prop_config::config;
    use proptest::prelude::*;

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

    /// The options a client sends for `o` and `canary`, of the documented types.
    fn dict(o: &Overrides, canary: Option<CanaryRequest>) -> HashMap<String, OwnedVariant> {
        let mut d = HashMap::new();
        if let Some(w) = o.workers {
            d.insert(option::WORKERS.to_owned(), v(w));
        }
        if let Some(c) = &o.command {
            d.insert(option::COMMAND.to_owned(), v(c.clone()));
        }
        if let Some(e) = &o.environment {
            d.insert(option::ENVIRONMENT.to_owned(), v(e.clone()));
        }
        if let Some(w) = &o.working_directory {
            d.insert(option::WORKING_DIRECTORY.to_owned(), v(Str::from(w.clone())));
        }
        if let Some(c) = canary {
            d.insert(option::CANARY.to_owned(), v(c.bands));
            if let Some(f) = c.canary_for {
                d.insert(option::CANARY_FOR.to_owned(), v(f.as_secs()));
            }
        }
        d
    }

    /// What a client may ask for: any overrides, a canary with or without `canary_for` (in
    /// seconds, some out of bounds), or `canary_for` alone.
    fn request() -> impl Strategy<Value = (Overrides, Option<u32>, Option<u64>)> {
        let text = "[^\\x00]{0,20}";
        let max = ipcluster_core::canary::MAX_CANARY_FOR.as_secs();
        let overrides = (
            prop::option::of(any::<u32>()),
            prop::option::of(prop::collection::vec(text, 0..4)),
            prop::option::of(prop::collection::vec("[A-Z]{1,4}=[ -~]{0,6}|[^\\x00]{0,8}", 0..4)),
            prop::option::of(text),
        )
            .prop_map(|(workers, command, environment, working_directory)| Overrides {
                workers,
                command,
                environment,
                working_directory,
            });
        let secs = prop_oneof![1..=max, Just(0), max + 1..=u64::MAX];
        (overrides, prop::option::of(any::<u32>()), prop::option::of(secs))
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(option::ALL.to_vec()).prop_map(str::to_owned),
            1 => "[^\\x00]{0,300}",
        ]
    }

    proptest! {
        #![proptest_config(config(512))]

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
                Ok((o, canary)) => {
                    prop_assert!(options.len() <= option::MAX);
                    // What was taken, sent again as a client sends it, is taken the same.
                    let again = parse_options(&dict(&o, canary)).map_err(|e| TestCaseError::fail(e.message))?;
                    prop_assert_eq!(&again, &(o.clone(), canary));
                    match given.get(&option::CANARY.to_owned()) {
                        Some(Value::U32(k)) => prop_assert_eq!(canary.map(|c| c.bands), Some(*k)),
                        other => prop_assert!(other.is_none() && canary.is_none()),
                    }
                    match given.get(&option::CANARY_FOR.to_owned()) {
                        Some(Value::U64(secs)) => {
                            prop_assert_eq!(canary.and_then(|c| c.canary_for), Some(std::time::Duration::from_secs(*secs)));
                        }
                        other => prop_assert!(other.is_none() && canary.is_none_or(|c| c.canary_for.is_none())),
                    }
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
                    match given.get(&option::ENVIRONMENT.to_owned()) {
                        Some(Value::Strs(e)) => prop_assert_eq!(o.environment.as_ref(), Some(e)),
                        Some(Value::U32s(e)) if e.is_empty() => prop_assert_eq!(o.environment, Some(vec![])),
                        other => prop_assert!(other.is_none() && o.environment.is_none()),
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

        /// Options as a client sends them (ipclusterctl, the Ansible modules): taken exactly
        /// as asked, unless `canary_for` is out of bounds or comes without `canary`; then
        /// InvalidArgs.
        #[test]
        fn a_clients_options_are_taken_as_asked((o, bands, secs) in request()) {
            let canary = bands.map(|bands| CanaryRequest { bands, canary_for: secs.map(std::time::Duration::from_secs) });
            let mut sent = dict(&o, canary);
            if let (None, Some(secs)) = (bands, secs) {
                sent.insert(option::CANARY_FOR.to_owned(), v(secs));
            }
            let max = ipcluster_core::canary::MAX_CANARY_FOR.as_secs();
            let valid = secs.is_none_or(|s| bands.is_some() && (1..=max).contains(&s));
            match parse_options(&sent) {
                Ok(taken) => {
                    prop_assert!(valid);
                    prop_assert_eq!(taken, (o, canary));
                }
                Err(e) => {
                    prop_assert!(!valid, "{}", e.message);
                    prop_assert_eq!(e.name, ErrorName::InvalidArgs);
                    prop_assert!(e.message.contains("canary_for"), "{}", e.message);
                }
            }
        }
    }
}
