//! Property tests of every parser in this crate that reads text from outside: app files, the
//! daemon's file, the units inside them, `iptables-save` output and the saved state. Each runs
//! a bounded number of cases from a fixed seed (a few seconds in all, the same cases on every
//! run of `cargo xtask test`; [`crate::prop_config`]) and writes no persistence files. A
//! failing input found once stays as a named `#[test]` below its property; `cargo xtask
//! props` explores with random seeds and many more cases.
//!
//! Properties: no input makes a parser panic; errors are well-formed (the `file:line:column: `
//! prefix where the input has lines, bounded length, no raw control characters); valid inputs
//! mean what they say, and what a renderer writes parses back to what it rendered.
//!
//! One file per area: [`files`] (app files and the daemon's), [`units`], [`iptables`] (rules
//! and `iptables-save` output), [`saved`] (the saved state). More properties live beside the
//! code they test, each in a module named `props` (`cargo xtask props` finds them by that name).

mod files;
pub(crate) mod iptables;
mod saved;
mod units;

use std::time::Duration;

use proptest::prelude::*;

use crate::config::MAX_MESSAGE;

/// The app file every app-file property parses as.
pub(crate) const FILE: &str = "/etc/ipcluster/apps/chat.toml";

/// The checks every configuration error must pass.
pub(crate) fn well_formed(
    e: &crate::config::ConfigError,
    file: &str,
    text: &str,
) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    let prefix = match e.location {
        Some((line, col)) => {
            prop_assert!(line >= 1 && col >= 1 && line <= text.lines().count() + 1, "{e:?}");
            format!("{file}:{line}:{col}: ")
        }
        None => format!("{file}: "),
    };
    prop_assert!(shown.starts_with(&prefix), "{shown}");
    prop_assert!(!shown.chars().any(char::is_control), "{shown:?}");
    prop_assert!(e.message.chars().count() <= MAX_MESSAGE + 1, "{} chars", e.message.chars().count());
    prop_assert!(e.key.as_ref().is_none_or(|k| k.chars().count() <= 65), "{:?}", e.key);
    Ok(())
}

/// Text that looks like an app file: known and unknown keys with values of every TOML shape,
/// some valid, most not, with control characters and long strings mixed in.
pub(crate) fn toml_like() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        proptest::sample::select([&crate::config::KEYS[..], &crate::config::DAEMON_KEYS[..]].concat())
            .prop_map(str::to_owned),
        "[a-z_]{1,12}",
        "\"[\\x00-\\x7f]{0,8}\"",
    ];
    let value = prop_oneof![
        "\"[0-9a-zA-Z:./ _-]{0,20}\"",
        "\"[0-9]{1,12}(us|ms|s|min|h|d|K|M|G|T)?\"",
        "\"[0-9]{1,5}-[0-9]{1,5}\"",
        "\"\\[?[0-9a-f.:]{0,20}\\]?:[0-9]{0,6}\"",
        "\"[0-9]{1,3}/[0-9]{1,3}(s|min)\"",
        "\"(SIG)?(TERM|INT|HUP|FOO)\"",
        "-?[0-9]{1,20}",
        "(true|false)",
        "\\[(\"[^\"\\\\]{0,10}\", ?){0,3}\\]",
        "\"\\\\u00[01][0-9a-f]\"",
        "\\{ ?[A-Z]{1,4} = \"[a-z]{0,4}\" ?\\}",
        any::<String>().prop_map(|s| format!("{s:?}")),
    ];
    let line = prop_oneof![
        8 => (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => any::<String>(),
        1 => Just("[table]".to_owned()),
    ];
    prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

/// A duration written in parts of random units.
pub(crate) fn duration_parts() -> impl Strategy<Value = Vec<(u64, &'static str)>> {
    let unit = proptest::sample::select(vec!["us", "ms", "s", "sec", "m", "min", "h", "hr", "d"]);
    prop::collection::vec((0u64..400, unit), 1..4)
}

pub(crate) fn unit_value(n: u64, unit: &str) -> Duration {
    match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" | "sec" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" | "hr" => Duration::from_secs(n * 3600),
        _ => Duration::from_secs(n * 86400),
    }
}

/// A duration as an app file may write it, exactly: its nonzero days, hours, minutes, seconds,
/// milliseconds and microseconds (`1d 2h 30s 5ms`), or `0`. Every duration a file can say is
/// a whole number of microseconds, the smallest unit.
pub(crate) fn show_duration(d: Duration) -> String {
    let mut us = d.as_micros();
    let mut parts = Vec::new();
    for (unit, size) in
        [("d", 86_400_000_000u128), ("h", 3_600_000_000), ("min", 60_000_000), ("s", 1_000_000)]
            .into_iter()
            .chain([("ms", 1_000), ("us", 1)])
    {
        if us >= size {
            parts.push(format!("{}{unit}", us / size));
            us %= size;
        }
    }
    if parts.is_empty() { "0".to_owned() } else { parts.join(" ") }
}

/// A size exactly, in the largest binary unit it is a whole number of (`448M`, `1025K`, `7`).
pub(crate) fn show_size(n: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if n != 0 && n.trailing_zeros() >= shift {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}
