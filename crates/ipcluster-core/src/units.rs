//! Values written by people in app files: durations (`30s`, `2min`, `1min 30s`), signal names
//! (`SIGTERM`, `TERM`), port ranges (`20000-29999`), sizes and rates.
//!
//! Every value is bounded here, at parse time, so that no arithmetic on a parsed value can
//! overflow later (`ready_timeout + spawn_interval × (workers − 1)`, `Instant + Duration`,
//! `backoff × 2`, `budget × 95`). Error messages quote at most [`SHOWN`] characters of the input,
//! with control characters escaped: input never reaches a log line raw or unbounded.

use std::{fmt, time::Duration};

/// The longest duration accepted anywhere: 365 days. Even multiplied by the largest worker
/// count (1024 × 365 d ≈ 1000 years) it stays far from overflowing a `Duration` or an `Instant`.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);
/// The largest size accepted: 1 PiB (`1024T`). Even × 100 it fits in a u64.
pub const MAX_SIZE: u64 = 1 << 50;
/// The most events a rate may allow per window.
pub const MAX_RATE: u32 = 1_000_000;
/// How many characters of a bad value an error message quotes.
pub const SHOWN: usize = 64;

/// `s` as an error message quotes it: Rust string syntax (quotes, control characters escaped),
/// cut after [`SHOWN`] characters.
pub fn shown(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(SHOWN).collect();
    if chars.next().is_some() { format!("{head:?}…") } else { format!("{head:?}") }
}

/// Parses a systemd-style duration: one or more `<integer><unit>` parts, optionally separated by
/// spaces. Units: `us`, `ms`, `s`/`sec`, `m`/`min`, `h`/`hr`, `d`. A bare `0` is zero. At most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_any_duration(s)?;
    if d > MAX_DURATION {
        return Err(format!("{} is longer than 365d, the longest duration accepted", shown(s)));
    }
    Ok(d)
}

fn parse_any_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{} is not a duration (examples: 500ms, 30s, 2min, 1h, 1min 30s)", shown(s));
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let part = match unit {
            "us" => Duration::from_micros(n),
            "ms" => Duration::from_millis(n),
            "s" | "sec" => Duration::from_secs(n),
            // Saturating: anything that large is refused as too long by the caller.
            "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
            "h" | "hr" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => return Err(err()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// The signals an app file may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    Hup,
    Int,
    Quit,
    Kill,
    Usr1,
    Usr2,
    Alrm,
    Term,
    Cont,
    Winch,
}

impl Signal {
    const ALL: [(Signal, &'static str, i32); 10] = [
        (Signal::Hup, "SIGHUP", 1),
        (Signal::Int, "SIGINT", 2),
        (Signal::Quit, "SIGQUIT", 3),
        (Signal::Kill, "SIGKILL", 9),
        (Signal::Usr1, "SIGUSR1", 10),
        (Signal::Usr2, "SIGUSR2", 12),
        (Signal::Alrm, "SIGALRM", 14),
        (Signal::Term, "SIGTERM", 15),
        (Signal::Cont, "SIGCONT", 18),
        (Signal::Winch, "SIGWINCH", 28),
    ];

    /// Parses `SIGTERM` or `TERM` (case-sensitive, as in systemd unit files).
    pub fn parse(s: &str) -> Result<Self, String> {
        let full = if s.starts_with("SIG") { s.to_owned() } else { format!("SIG{s}") };
        Self::ALL.iter().find(|(_, name, _)| *name == full).map(|(sig, _, _)| *sig).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(_, n, _)| *n).collect();
            format!("{} is not a supported signal (one of {})", shown(s), names.join(", "))
        })
    }

    /// The Linux signal number.
    pub fn number(self) -> i32 {
        Self::ALL.iter().find(|(sig, _, _)| *sig == self).map_or(15, |(_, _, n)| *n)
    }

    /// The signal's name (`SIGTERM`).
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(sig, _, _)| *sig == self).map_or("SIGTERM", |(_, n, _)| n)
    }

    /// The name of signal number `n`, if it is one of ours, else `signal N`.
    pub fn describe(n: i32) -> String {
        Self::ALL
            .iter()
            .find(|(_, _, num)| *num == n)
            .map_or_else(|| format!("signal {n}"), |(_, name, _)| (*name).to_owned())
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses `lo-hi` with `1024 <= lo <= hi <= 65535`.
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let err = || format!("{} is not a port range (\"lo-hi\" with 1024 <= lo <= hi <= 65535)", shown(s));
    let (lo, hi) = s.split_once('-').ok_or_else(err)?;
    let lo: u16 = lo.trim().parse().map_err(|_| err())?;
    let hi: u16 = hi.trim().parse().map_err(|_| err())?;
    if lo < 1024 || lo > hi {
        return Err(err());
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1min 30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "s", "30", "3x", "-1s", "1.5s", "30 s s", "99999999999999999999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn signals() {
        assert_eq!(Signal::parse("SIGTERM").unwrap().number(), 15);
        assert_eq!(Signal::parse("USR1").unwrap(), Signal::Usr1);
        assert!(Signal::parse("sigterm").is_err());
        assert!(Signal::parse("SIGFOO").unwrap_err().contains("SIGTERM"));
        assert_eq!(Signal::describe(9), "SIGKILL");
        assert_eq!(Signal::describe(11), "signal 11");
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("20000-29999").unwrap(), (20000, 29999));
        for bad in ["", "1-2", "3000-2000", "a-b", "20000", "20000-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad:?} accepted");
        }
    }
}

/// Parses a size in binary units: `448M` = 448 MiB, `4G`, `512K`, `1T`, or plain bytes (`1048576`).
/// `M` means MiB, as in systemd's `MemoryMax=` (the `bytesize` crate would read it as 10⁶). At
/// most [`MAX_SIZE`].
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("{} is not a size (examples: 512K, 448M, 4G; binary units: M = MiB)", shown(s));
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(err());
    }
    let n: u64 = t[..digits].parse().map_err(|_| err())?;
    let unit = t[digits..].trim();
    let shift = match unit {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        _ => return Err(err()),
    };
    match n.checked_mul(1u64 << shift) {
        Some(size) if size <= MAX_SIZE => Ok(size),
        _ => Err(format!("{} is more than 1024T (1 PiB), the largest size accepted", shown(s))),
    }
}

/// Parses `N/duration` (e.g. `10/2min`): at most N events per window; `1 <= N <=`
/// [`MAX_RATE`], the window at most [`MAX_DURATION`].
pub fn parse_rate(s: &str) -> Result<(u32, Duration), String> {
    let err = || {
        format!(
            "{} is not a rate (\"N/duration\" with 1 <= N <= {MAX_RATE} and 0 < duration <= 365d, e.g. \"10/2min\")",
            shown(s)
        )
    };
    let (n, d) = s.split_once('/').ok_or_else(err)?;
    let n: u32 = n.trim().parse().map_err(|_| err())?;
    let d = parse_duration(d).map_err(|_| err())?;
    if n == 0 || n > MAX_RATE || d.is_zero() {
        return Err(err());
    }
    Ok((n, d))
}

/// Parses `min-max` durations (e.g. `100ms-30s`) with `0 < min <= max <= 365d`.
pub fn parse_duration_range(s: &str) -> Result<(Duration, Duration), String> {
    let err = || {
        format!(
            "{} is not a range of durations (\"min-max\" with 0 < min <= max <= 365d, e.g. \"100ms-30s\")",
            shown(s)
        )
    };
    let (lo, hi) = s.split_once('-').ok_or_else(err)?;
    let lo = parse_duration(lo).map_err(|_| err())?;
    let hi = parse_duration(hi).map_err(|_| err())?;
    if lo.is_zero() || lo > hi {
        return Err(err());
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn sizes_are_binary() {
        assert_eq!(parse_size("448M").unwrap(), 448 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        for bad in ["", "M", "1.5G", "4X", "-1M", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Item 13 of issue 12: huge values are refused at parse time, with the bound named.
    #[test]
    fn huge_values_are_refused_with_the_bound_named() {
        assert_eq!(parse_duration("365d").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("8760h").unwrap(), MAX_DURATION);
        for huge in [
            "366d",
            "365d 1us",
            "525601min",
            "99999999999d",
            "18446744073709551615s",
            "18446744073709551615d",
            "18446744073709551615s 18446744073709551615s",
            "31536000001ms",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(e.contains("365d"), "{huge}: {e}");
        }
        assert_eq!(parse_size("1024T").unwrap(), MAX_SIZE);
        for huge in ["1025T", "1125899906842625", "18446744073709551615", "17179869184G"] {
            assert!(parse_size(huge).unwrap_err().contains("1 PiB"), "{huge}");
        }
        assert_eq!(parse_rate("1000000/1s").unwrap().0, MAX_RATE);
        for huge in ["1000001/1s", "4294967295/1s", "1/366d"] {
            assert!(parse_rate(huge).unwrap_err().contains("365d"), "{huge}");
        }
        assert!(parse_duration_range("1s-366d").unwrap_err().contains("365d"));
        // The largest values make the largest sums the daemon computes without overflow.
        let (d, workers) = (MAX_DURATION, 1024u32);
        let total = d + d * (workers - 1);
        let _ = std::time::Instant::now() + total;
        assert!(total.as_micros() < u128::from(u64::MAX));
        assert!(MAX_SIZE.checked_mul(100).is_some());
    }

    #[test]
    fn messages_quote_a_bounded_escaped_value() {
        let long = "x".repeat(100_000);
        for e in [
            parse_duration(&long).unwrap_err(),
            parse_size(&long).unwrap_err(),
            parse_rate(&long).unwrap_err(),
            parse_port_range(&long).unwrap_err(),
            parse_duration_range(&long).unwrap_err(),
            Signal::parse(&long).unwrap_err(),
        ] {
            assert!(e.len() < 300, "{} bytes: {e}", e.len());
        }
        let e = parse_duration("1s\u{7}\n\u{1b}[31m").unwrap_err();
        assert!(!e.chars().any(char::is_control), "{e:?}");
        assert_eq!(shown("a\tb"), "\"a\\tb\"");
    }

    #[test]
    fn rates_and_ranges() {
        assert_eq!(parse_rate("10/2min").unwrap(), (10, Duration::from_secs(120)));
        assert!(parse_rate("0/1s").is_err() && parse_rate("10").is_err() && parse_rate("1/0").is_err());
        assert_eq!(
            parse_duration_range("100ms-30s").unwrap(),
            (Duration::from_millis(100), Duration::from_secs(30))
        );
        assert!(parse_duration_range("30s-1s").is_err() && parse_duration_range("0-1s").is_err());
    }
}

/// Property tests: what a parser here accepts is within its bounds and renders back to itself,
/// whatever the text (valid values, near misses of them, anything); errors stay brief and
/// printable.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        prop_config::{config, mutated},
        props::{show_duration, show_size},
    };

    const MAX_US: u64 = MAX_DURATION.as_micros() as u64;

    fn duration() -> impl Strategy<Value = Duration> {
        prop_oneof![0u64..2_000_000, 0u64..=MAX_US].prop_map(Duration::from_micros)
    }

    /// Every shape of value the parsers read, valid.
    fn valid() -> BoxedStrategy<String> {
        let signal = prop::sample::select(Signal::ALL.iter().map(|(_, name, _)| *name).collect::<Vec<_>>());
        prop_oneof![
            duration().prop_map(show_duration),
            prop_oneof![0u64..=MAX_SIZE, (0u64..=1024, 0u32..5).prop_map(|(n, s)| n << (10 * s))]
                .prop_map(show_size),
            (1u32..=MAX_RATE, duration()).prop_map(|(n, d)| format!("{n}/{}", show_duration(d))),
            (duration(), duration()).prop_map(|(a, b)| format!(
                "{}-{}",
                show_duration(a.min(b)),
                show_duration(a.max(b))
            )),
            (1024u16..=u16::MAX, 1024u16..=u16::MAX).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
            signal.prop_map(|s| s.strip_prefix("SIG").unwrap_or(s).to_owned()),
        ]
        .boxed()
    }

    fn brief(e: &str) -> Result<(), TestCaseError> {
        prop_assert!(e.chars().count() < 400, "{e}");
        prop_assert!(!e.chars().any(char::is_control), "{e:?}");
        Ok(())
    }

    proptest! {
        #![proptest_config(config(512))]

        /// Whatever a parser accepts is within its documented bounds, a whole number of
        /// microseconds where it is a duration, and its rendering parses back to it.
        #[test]
        fn accepted_values_render_back(s in prop_oneof![valid(), mutated(valid()), any::<String>()]) {
            let whole = |d: Duration| d == Duration::from_micros(d.as_micros() as u64);
            match parse_duration(&s) {
                Ok(d) => {
                    prop_assert!(d <= MAX_DURATION && whole(d), "{s:?}: {d:?}");
                    prop_assert_eq!(parse_duration(&show_duration(d)), Ok(d));
                }
                Err(e) => brief(&e)?,
            }
            match parse_size(&s) {
                Ok(n) => {
                    prop_assert!(n <= MAX_SIZE);
                    prop_assert_eq!(parse_size(&show_size(n)), Ok(n));
                }
                Err(e) => brief(&e)?,
            }
            match parse_rate(&s) {
                Ok((n, d)) => {
                    prop_assert!((1..=MAX_RATE).contains(&n) && !d.is_zero() && d <= MAX_DURATION && whole(d));
                    prop_assert_eq!(parse_rate(&format!("{n}/{}", show_duration(d))), Ok((n, d)));
                }
                Err(e) => brief(&e)?,
            }
            match parse_duration_range(&s) {
                Ok((a, b)) => {
                    prop_assert!(!a.is_zero() && a <= b && b <= MAX_DURATION && whole(a) && whole(b));
                    let shown = format!("{}-{}", show_duration(a), show_duration(b));
                    prop_assert_eq!(parse_duration_range(&shown), Ok((a, b)));
                }
                Err(e) => brief(&e)?,
            }
            match parse_port_range(&s) {
                Ok((lo, hi)) => {
                    prop_assert!(1024 <= lo && lo <= hi);
                    prop_assert_eq!(parse_port_range(&format!("{lo}-{hi}")), Ok((lo, hi)));
                }
                Err(e) => brief(&e)?,
            }
            match Signal::parse(&s) {
                Ok(sig) => {
                    prop_assert_eq!(Signal::parse(sig.name()), Ok(sig));
                    prop_assert_eq!(Signal::parse(&sig.to_string()["SIG".len()..]), Ok(sig));
                    prop_assert_eq!(Signal::describe(sig.number()), sig.name());
                }
                Err(e) => brief(&e)?,
            }
        }

        /// Every duration and size a file may say renders as text that says exactly it.
        #[test]
        fn every_duration_and_size_renders_back(d in duration(), n in 0u64..=MAX_SIZE) {
            prop_assert_eq!(parse_duration(&show_duration(d)), Ok(d));
            prop_assert_eq!(parse_size(&show_size(n)), Ok(n));
        }
    }
}
