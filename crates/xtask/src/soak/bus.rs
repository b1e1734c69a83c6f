//! The soak's client of the sandbox's system bus, from this process (as root, through
//! `/proc/<init>/root/run/dbus/system_bus_socket`): typed calls of `org.ipcluster1.Manager`
//! with a deadline each, and raw calls for the malformed input fault. Shared by the threads.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result};
use ipcluster_bus::{GenerationRow, WorkerRow};
use zbus::wire::{DynamicDeserialize, DynamicType, OwnedVariant};

/// A call the daemon refused or that did not complete: the D-Bus error name (or `timeout`,
/// `transport`) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub name: String,
    pub message: String,
}

impl CallError {
    /// The error name without `org.ipcluster1.Error.` / `org.freedesktop.DBus.Error.`.
    pub fn short(&self) -> &str {
        self.name.rsplit('.').next().unwrap_or(&self.name)
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message: String = self.message.chars().take(160).collect();
        write!(f, "{}: {message}", self.short())
    }
}

#[derive(Debug)]
pub struct Bus {
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
}

impl Bus {
    /// Connects to the bus at `address`.
    pub fn connect(address: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let conn = rt
            .block_on(async { zbus::connection::Builder::address(address).build().await })
            .with_context(|| format!("cannot connect to the sandbox's system bus at {address}"))?;
        Ok(Self { rt, conn })
    }

    /// Calls a Manager method with `body`; gives up after `timeout`.
    pub fn call<B, R>(&self, method: &str, body: &B, timeout: Duration) -> Result<R, CallError>
    where
        B: serde::Serialize + DynamicType,
        R: for<'d> DynamicDeserialize<'d>,
    {
        let msg = self.call_message(method, body, timeout)?;
        msg.body().deserialize::<R>().map_err(|e| CallError {
            name: "transport".into(),
            message: format!("{method}: reply not of the documented type: {e}"),
        })
    }

    /// Calls a Manager method with `body` (of any signature, the wrong ones too); the reply's
    /// body is not read.
    pub fn call_any<B>(&self, method: &str, body: &B, timeout: Duration) -> Result<(), CallError>
    where
        B: serde::Serialize + DynamicType,
    {
        self.call_message(method, body, timeout).map(drop)
    }

    fn call_message<B>(&self, method: &str, body: &B, timeout: Duration) -> Result<zbus::Message, CallError>
    where
        B: serde::Serialize + DynamicType,
    {
        let call = self.conn.call_method(
            Some(ipcluster_bus::BUS_NAME),
            ipcluster_bus::OBJECT_PATH,
            Some(ipcluster_bus::INTERFACE),
            method,
            body,
        );
        let reply = match self.rt.block_on(async { tokio::time::timeout(timeout, call).await }) {
            Ok(r) => r,
            Err(_) => {
                return Err(CallError {
                    name: "timeout".into(),
                    message: format!("{method}: no reply in {timeout:?}"),
                });
            }
        };
        match reply {
            Ok(msg) => Ok(msg),
            Err(zbus::Error::MethodError(name, message, _)) => {
                Err(CallError { name: name.to_string(), message: message.unwrap_or_default() })
            }
            Err(zbus::Error::FDO(e)) => {
                Err(CallError { name: zbus::DBusError::name(&*e).to_string(), message: e.to_string() })
            }
            Err(e) => Err(CallError { name: "transport".into(), message: format!("{method}: {e}") }),
        }
    }

    pub fn list_workers(&self) -> Result<Vec<WorkerRow>, CallError> {
        self.call("ListWorkers", &("",), Duration::from_secs(5))
    }

    pub fn list_generations(&self) -> Result<Vec<GenerationRow>, CallError> {
        self.call("ListGenerations", &("",), Duration::from_secs(5))
    }

    /// Deploy(app, {}): the new generation once it is live.
    pub fn deploy(&self, app: &str) -> Result<u64, CallError> {
        let none: HashMap<&str, OwnedVariant> = HashMap::new();
        self.call("Deploy", &(app, none), Duration::from_secs(90))
    }

    /// Rollback(app, 0): the generation live afterwards.
    pub fn rollback(&self, app: &str) -> Result<u64, CallError> {
        self.call("Rollback", &(app, 0u64), Duration::from_secs(90))
    }

    pub fn kill_retired(&self, app: &str) -> Result<u32, CallError> {
        self.call("KillRetired", &(app,), Duration::from_secs(30))
    }
}

/// A Deploy option's value.
pub fn opt<'a>(v: impl Into<zbus::wire::Variant<'a>>) -> OwnedVariant {
    v.into().try_to_owned().expect("a value without file descriptors")
}
