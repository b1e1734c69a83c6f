//! The domain of ipclusterd, free of I/O so that every rule can be unit-tested.
//!
//! Nothing in this crate touches the file system, the bus, processes or the network: callers read
//! files and pass their text in, and apply the decisions that come out.

pub mod adoption;
pub mod canary;
pub mod checks;
pub mod config;
pub mod model;
pub mod name;
pub mod ownership;
pub mod policy;
pub mod ports;
pub mod prop_config;
#[cfg(test)]
mod props;
pub mod routing;
pub mod saved;
pub mod units;

/// The version of the ipclusterd suite, reported over D-Bus as `Version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
