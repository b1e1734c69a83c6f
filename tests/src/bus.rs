//! A client of the sandbox's system bus, from the host process (as root, over
//! `/proc/<pid>/root/run/dbus/system_bus_socket`), so tests see typed replies and error names.
//! The rows and names are the daemon's own contract ([`ipcluster_bus`]).

use std::collections::HashMap;

use zbus::wire::{OwnedVariant, Variant};

use crate::Sandbox;

pub use ipcluster_bus::{GenerationRow, WorkerRow};

/// A failed call: the D-Bus error name and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub name: String,
    pub message: String,
}

/// A connection to the sandbox's system bus.
#[derive(Debug)]
pub struct Bus {
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
}

impl Bus {
    /// Connects to `sb`'s system bus.
    pub fn connect(sb: &Sandbox) -> Self {
        Self::connect_to(&sb.system_bus_address())
    }

    /// Connects to the bus at `address` (a second client, e.g. from another thread).
    pub fn connect_to(address: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let conn = rt
            .block_on(async { zbus::connection::Builder::address(address).build().await })
            .expect("connect to the sandbox's system bus");
        Self { rt, conn }
    }

    /// Calls a Manager method with `body`, returning the reply body or the error.
    pub fn call<B, R>(&self, method: &str, body: &B) -> Result<R, CallError>
    where
        B: serde::Serialize + zbus::wire::DynamicType,
        R: for<'d> zbus::wire::DynamicDeserialize<'d>,
    {
        let reply = self.rt.block_on(self.conn.call_method(
            Some(ipcluster_bus::BUS_NAME),
            ipcluster_bus::OBJECT_PATH,
            Some(ipcluster_bus::INTERFACE),
            method,
            body,
        ));
        match reply {
            Ok(msg) => Ok(msg.body().deserialize::<R>().expect("reply of the documented type")),
            Err(zbus::Error::MethodError(name, message, _)) => {
                Err(CallError { name: name.to_string(), message: message.unwrap_or_default() })
            }
            Err(zbus::Error::FDO(e)) => {
                Err(CallError { name: zbus::DBusError::name(&*e).to_string(), message: e.to_string() })
            }
            Err(e) => panic!("{method}: transport error {e}"),
        }
    }

    /// Deploy(app, options).
    pub fn deploy(&self, app: &str, options: HashMap<&str, OwnedVariant>) -> Result<u64, CallError> {
        self.call("Deploy", &(app, options))
    }

    /// Deploy(app, {}).
    pub fn deploy_plain(&self, app: &str) -> Result<u64, CallError> {
        self.deploy(app, HashMap::new())
    }

    pub fn list_workers(&self, app: &str) -> Vec<WorkerRow> {
        self.call("ListWorkers", &(app,)).expect("ListWorkers")
    }

    pub fn list_generations(&self, app: &str) -> Vec<GenerationRow> {
        self.call("ListGenerations", &(app,)).expect("ListGenerations")
    }

    pub fn kill_retired(&self, app: &str) -> Result<u32, CallError> {
        self.call("KillRetired", &(app,))
    }

    pub fn retire(&self, app: &str, generation: u64) -> Result<(), CallError> {
        self.call("RetireGeneration", &(app, generation))
    }

    /// Introspection XML of /org/ipcluster1.
    pub fn introspect(&self) -> String {
        let msg = self
            .rt
            .block_on(self.conn.call_method(
                Some("org.ipcluster1"),
                "/org/ipcluster1",
                Some("org.freedesktop.DBus.Introspectable"),
                "Introspect",
                &(),
            ))
            .expect("Introspect");
        msg.body().deserialize::<String>().unwrap()
    }
}

/// An option value for Deploy.
pub fn opt<'a>(v: impl Into<Variant<'a>>) -> OwnedVariant {
    v.into().try_to_owned().unwrap()
}

/// Live workers' pids by band.
pub fn live_by_band(rows: &[WorkerRow]) -> std::collections::BTreeMap<u32, u32> {
    rows.iter().filter(|w| w.state == "live").map(|w| (w.band, w.pid)).collect()
}

/// `busctl call` of a Manager method, as an operator types it: the argv up to the method's
/// signature and arguments.
pub fn busctl(method: &str) -> Vec<&str> {
    vec!["busctl", "call", "org.ipcluster1", "/org/ipcluster1", "org.ipcluster1.Manager", method]
}

/// `busctl call … Deploy sa{sv} APP 0`: a plain deploy of `app` from the command line.
pub fn busctl_deploy(app: &str) -> Vec<&str> {
    let mut argv = busctl("Deploy");
    argv.extend(["sa{sv}", app, "0"]);
    argv
}
