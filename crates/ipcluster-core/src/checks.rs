//! HTTP health checks, the parts without I/O: the request a check sends, what its answer's
//! status line says, a worker's run of failures, and which unhealthy live worker (if any) an
//! app replaces now.
//!
//! **One band at a time, and not when most fail.** A check that fails on many bands at once
//! usually says a shared dependency is down (a database, a disk), not that those workers are
//! broken: replacing them all would restart the whole app into the same failure, and drop
//! every session they hold. So an app replaces at most one unhealthy live worker at a time (the
//! next only once that replacement is ready or given up), and none while more than half of its
//! live workers are unhealthy: then it reports the shared failure (journal, `PolicyHeldBack`,
//! `held_back` in the policy metric) and waits for the checks to pass again.

/// The request line and headers of a check of `path` (already checked by
/// [`crate::config::health::check_path`]: it cannot end the line).
pub fn request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: ipclusterd-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
}

/// Most bytes of an answer read to find its status line.
pub const MAX_STATUS_LINE: usize = 256;

/// The status code of an HTTP/1.x answer that starts with `head` (at least its whole first
/// line): `HTTP/1.1 200 OK` → 200. `None` when it is not an HTTP/1.x status line.
pub fn status(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (minor, rest) = rest.split_first()?;
    if !minor.is_ascii_digit() {
        return None;
    }
    let rest = rest.strip_prefix(b" ")?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|b| *b != b' ') {
        return None;
    }
    let n = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    (100..=599).contains(&n).then_some(n)
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP status (2xx passes).
    Status(u16),
    /// No status: refused, timed out, closed, not HTTP.
    Failed(String),
}

impl Outcome {
    pub fn passed(&self) -> bool {
        matches!(self, Outcome::Status(s) if (200..300).contains(s))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Status(s) => write!(f, "HTTP {s}"),
            Outcome::Failed(why) => f.write_str(why),
        }
    }
}

/// A live worker's checks, as the replacement decision sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub id: u64,
    pub band: u32,
    /// Failed checks in a row.
    pub failures: u32,
}

/// What an app does about its unhealthy live workers this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is unhealthy, or a health replacement is already under way.
    Wait,
    /// Replace this worker.
    Replace(u64),
    /// `unhealthy` of `live` workers fail at once: a shared cause; none is replaced.
    Shared { unhealthy: u32, live: u32 },
}

/// Which unhealthy live worker to replace now: one with at least `threshold` failures in a row,
/// the most first (then the lowest band), unless a health replacement is `under_way` or more
/// than half of the `live` workers are unhealthy (see the module's doc).
pub fn decide(live: &[Checked], threshold: u32, under_way: bool) -> Decision {
    let mut unhealthy: Vec<&Checked> = live.iter().filter(|c| c.failures >= threshold).collect();
    if unhealthy.is_empty() || under_way {
        return Decision::Wait;
    }
    // Failing now (their last check failed), whether or not they reached the threshold yet: the
    // checks of one round come back one by one, so the first to reach it must not be taken
    // for the only one failing.
    let failing = live.iter().filter(|c| c.failures > 0).count() as u32;
    let all = live.len() as u32;
    // One worker alone is replaced even when it is the whole app: nothing is shared with it.
    if all > 1 && failing * 2 > all {
        return Decision::Shared { unhealthy: failing, live: all };
    }
    unhealthy.sort_by_key(|c| (std::cmp::Reverse(c.failures), c.band));
    Decision::Replace(unhealthy[0].id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_strictly() {
        assert_eq!(status(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), Some(200));
        assert_eq!(status(b"HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(status(b"HTTP/1.1 204\r\n"), Some(204), "no reason phrase");
        assert_eq!(status(b"HTTP/1.1 200 OK"), Some(200), "the line may be all there is");
        for bad in [
            &b"HTTP/2 200\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n",
            b"HTTP/1.1 20 OK\r\n",
            b"HTTP/1.1 099 x\r\n",
            b"HTTP/1.1 600 x\r\n",
            b"http/1.1 200 OK\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"",
            b"HTTP/1.x 200 OK",
            b"HTTP/1.1  200 OK",
        ] {
            assert_eq!(status(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn only_2xx_passes() {
        assert!(Outcome::Status(200).passed() && Outcome::Status(299).passed());
        assert!(!Outcome::Status(301).passed() && !Outcome::Status(500).passed());
        assert!(!Outcome::Failed("refused".into()).passed());
    }

    #[test]
    fn the_request_is_one_get_that_closes() {
        let r = request("/healthz?deep=1");
        assert!(r.starts_with("GET /healthz?deep=1 HTTP/1.1\r\nHost: localhost\r\n"));
        assert!(r.ends_with("Connection: close\r\n\r\n"));
    }

    fn c(id: u64, band: u32, failures: u32) -> Checked {
        Checked { id, band, failures }
    }

    #[test]
    fn one_unhealthy_band_is_replaced_at_a_time() {
        let live =
            [c(1, 0, 0), c(2, 1, 3), c(3, 2, 0), c(4, 3, 0), c(5, 4, 5), c(6, 5, 0), c(7, 6, 0), c(8, 7, 2)];
        assert_eq!(decide(&live, 3, false), Decision::Replace(5), "the most failures first");
        assert_eq!(decide(&live, 3, true), Decision::Wait, "one replacement at a time");
        assert_eq!(decide(&live, 6, false), Decision::Wait, "below the threshold");
    }

    #[test]
    fn more_than_half_the_app_failing_at_once_is_a_shared_cause() {
        let live = [c(1, 0, 3), c(2, 1, 3), c(3, 2, 4), c(4, 3, 0)];
        assert_eq!(decide(&live, 3, false), Decision::Shared { unhealthy: 3, live: 4 });
        let half = [c(1, 0, 3), c(2, 1, 3), c(3, 2, 0), c(4, 3, 0)];
        assert_eq!(decide(&half, 3, false), Decision::Replace(1), "half: one at a time, lowest band first");
        let one = [c(1, 0, 3)];
        assert_eq!(decide(&one, 3, false), Decision::Replace(1), "a single worker is replaced");
        let two = [c(1, 0, 3), c(2, 1, 3)];
        assert_eq!(decide(&two, 3, false), Decision::Shared { unhealthy: 2, live: 2 });
        // The others of the round have not reached the threshold yet, but fail too.
        let round = [c(1, 0, 3), c(2, 1, 2), c(3, 2, 2), c(4, 3, 0)];
        assert_eq!(decide(&round, 3, false), Decision::Shared { unhealthy: 3, live: 4 });
    }
}

/// Property tests of the status line reader: no bytes make it panic, it accepts exactly an
/// HTTP/1.x status line with a code 100..=599 (whatever follows the first line), and what it
/// accepts renders back as a status line that reads the same.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::prop_config::{config, mutated_bytes};

    /// Status lines, valid and nearly so, then more lines.
    fn answer() -> impl Strategy<Value = Vec<u8>> {
        let line =
            (0u8..=9, 0u16..=999, "( [ -~]{0,20})?", prop::sample::select(vec!["\r\n", "\n", "", "\r"]))
                .prop_map(|(minor, code, reason, end)| format!("HTTP/1.{minor} {code:03}{reason}{end}"));
        (line, "[ -~\r\n]{0,40}").prop_map(|(l, rest)| format!("{l}{rest}").into_bytes())
    }

    /// What the reader should say of `head`, written out from its documentation.
    fn expected(head: &[u8]) -> Option<u16> {
        let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let s = std::str::from_utf8(line.get(..12)?).ok()?;
        let (version, code) = s.split_at(9);
        let ok = version.len() == 9
            && version.starts_with("HTTP/1.")
            && version.as_bytes()[7].is_ascii_digit()
            && version.ends_with(' ')
            && code.bytes().all(|b| b.is_ascii_digit())
            && line.get(12).is_none_or(|b| *b == b' ');
        let code: u16 = code.parse().ok()?;
        (ok && (100..=599).contains(&code)).then_some(code)
    }

    proptest! {
        #![proptest_config(config(1024))]

        #[test]
        fn status_lines_are_read_as_documented(head in prop_oneof![
            answer(),
            mutated_bytes(answer()),
            prop::collection::vec(any::<u8>(), 0..=MAX_STATUS_LINE),
        ]) {
            let got = status(&head);
            prop_assert_eq!(got, expected(&head), "{:?}", String::from_utf8_lossy(&head));
            if let Some(code) = got {
                prop_assert_eq!(status(format!("HTTP/1.1 {code}\r\n").as_bytes()), Some(code));
                // Only the first line counts.
                if let Some(end) = head.iter().position(|b| *b == b'\n') {
                    prop_assert_eq!(status(&[&head[..=end], b"garbage\xff"].concat()), Some(code));
                }
                prop_assert_eq!(Outcome::Status(code).passed(), (200..300).contains(&code));
            }
        }
    }
}
