//! The units of app files (durations, sizes, rates, port ranges, signals): no text makes them
//! panic, errors are brief and printable, and values mean what they say.

use std::time::Duration;

use proptest::prelude::*;

use super::{duration_parts, unit_value};
use crate::{
    prop_config::config,
    units::{self, MAX_DURATION, MAX_SIZE, Signal},
};

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn units_never_panic_and_say_why_briefly(s in prop_oneof![any::<String>(), "[0-9 ]{0,30}[a-zA-Z]{0,3}[-/]?[0-9a-z ]{0,10}"]) {
        let errors = [
            units::parse_duration(&s).map(|d| assert!(d <= MAX_DURATION)).err(),
            units::parse_size(&s).map(|n| assert!(n <= MAX_SIZE)).err(),
            units::parse_rate(&s).map(|(n, d)| assert!(n >= 1 && !d.is_zero() && d <= MAX_DURATION)).err(),
            units::parse_duration_range(&s).map(|(a, b)| assert!(!a.is_zero() && a <= b && b <= MAX_DURATION)).err(),
            units::parse_port_range(&s).map(|(a, b)| assert!(1024 <= a && a <= b)).err(),
            Signal::parse(&s).map(|_| ()).err(),
            crate::ports::parse_ephemeral(&s).map(|(a, b)| assert!(a <= b)).err(),
        ];
        for e in errors.into_iter().flatten() {
            prop_assert!(e.chars().count() < 400, "{e}");
            prop_assert!(!e.chars().any(char::is_control), "{e:?}");
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn durations_mean_what_they_say(parts in duration_parts(), spaced in any::<bool>()) {
        let text = parts.iter().map(|(n, u)| format!("{n}{u}")).collect::<Vec<_>>().join(if spaced { " " } else { "" });
        let want: Duration = parts.iter().map(|(n, u)| unit_value(*n, u)).sum();
        match units::parse_duration(&text) {
            Ok(d) => prop_assert_eq!(d, want),
            Err(e) => {
                prop_assert!(want > MAX_DURATION, "{text}: {e}");
                prop_assert!(e.contains("365d"), "{e}");
            }
        }
    }

    #[test]
    fn sizes_rates_ranges_and_signals_round_trip(
        n in 0u64..5000, shift in 0usize..5, count in 1u32..2_000_000, lo in 0u16..=u16::MAX, hi in 0u16..=u16::MAX,
        sig in proptest::sample::select(vec!["HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "ALRM", "TERM", "CONT", "WINCH"]),
    ) {
        let unit = ["", "K", "M", "G", "T"][shift];
        let size = n << (10 * shift);
        prop_assert_eq!(units::parse_size(&format!("{n}{unit}")).ok(), (size <= MAX_SIZE).then_some(size));
        let rate = units::parse_rate(&format!("{count}/2min")).ok();
        prop_assert_eq!(rate, (count <= units::MAX_RATE).then_some((count, Duration::from_secs(120))));
        let range = units::parse_port_range(&format!("{lo}-{hi}")).ok();
        prop_assert_eq!(range, (1024 <= lo && lo <= hi).then_some((lo, hi)));
        let s = Signal::parse(sig).unwrap();
        prop_assert_eq!(Signal::parse(s.name()), Ok(s));
        prop_assert_eq!(Signal::describe(s.number()), s.name());
    }
}
