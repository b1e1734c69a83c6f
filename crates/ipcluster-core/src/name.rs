//! App names. An app name ends up in unit names (`ipcluster-<app>-<g>.scope`), slice names and
//! netfilter chain names, so it is restricted to `^[a-z][a-z0-9_]{0,23}$`: no path, shell or unit
//! name metacharacters, and short enough for iptables' 28-character chain names.

use std::fmt;

/// Longest app name accepted (`IPC-<app>` must fit iptables' 28-character chain names).
pub const MAX_APP_NAME: usize = 24;

/// A validated app name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppName(String);

/// Why a string is not an app name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid app name {shown:?}: must match ^[a-z][a-z0-9_]{{0,23}}$ (a lowercase letter, then up to 23 lowercase letters, digits or '_')"
)]
pub struct InvalidAppName {
    /// The rejected name, cut to a readable length.
    pub shown: String,
}

impl AppName {
    /// Validates `s` as an app name.
    pub fn new(s: &str) -> Result<Self, InvalidAppName> {
        let mut chars = s.chars();
        let ok = s.len() <= MAX_APP_NAME
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok { Ok(Self(s.to_owned())) } else { Err(InvalidAppName { shown: s.chars().take(64).collect() }) }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for AppName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Names read back (from the daemon's saved state) are validated like any other.
impl<'de> serde::Deserialize<'de> for AppName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AppName::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for n in ["a", "chat", "web_2", "abcdefghijklmnopqrstuvwx"] {
            assert_eq!(AppName::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn rejects_invalid_names() {
        for n in [
            "",
            "2web",
            "Web",
            "we-b",
            "../x",
            "a/b",
            "a b",
            "a;rm",
            "a$x",
            "a.b",
            "é",
            "abcdefghijklmnopqrstuvwxy",
            "_a",
        ] {
            assert!(AppName::new(n).is_err(), "{n:?} accepted");
        }
    }

    #[test]
    fn error_is_bounded_and_explains() {
        let long = "x".repeat(10_000);
        let e = AppName::new(&long).unwrap_err().to_string();
        assert!(e.len() < 300, "{e}");
        assert!(e.contains("^[a-z][a-z0-9_]{0,23}$"), "{e}");
    }
}
