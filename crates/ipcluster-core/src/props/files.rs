//! App files and the daemon's file: no text makes them panic, errors are well-formed, and a
//! valid file means what it says.

use std::{net::SocketAddrV4, time::Duration};

use proptest::prelude::*;

use super::{FILE, duration_parts, toml_like, unit_value, well_formed};
use crate::{
    config::{AppConfig, DaemonConfig},
    prop_config::config,
    units::MAX_DURATION,
};

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn app_files_never_panic_and_errors_are_well_formed(text in toml_like()) {
        if let Err(e) = AppConfig::parse(FILE, "chat", &text) {
            well_formed(&e, FILE, &text)?;
        }
    }

    #[test]
    fn arbitrary_text_as_an_app_file(text in any::<String>()) {
        if let Err(e) = AppConfig::parse(FILE, "chat", &text) {
            well_formed(&e, FILE, &text)?;
        }
    }

    #[test]
    fn the_daemons_file_never_panics(text in toml_like()) {
        let file = "/etc/ipcluster/ipclusterd.toml";
        match DaemonConfig::parse(file, &text) {
            Ok(c) => {
                prop_assert!(c.sample_interval >= Duration::from_millis(100) && c.sample_interval <= MAX_DURATION);
                prop_assert!(c.metrics_listen.is_none_or(|a| a.port() != 0));
            }
            Err(e) => well_formed(&e, file, &text)?,
        }
    }

}

/// A valid app and the file that says it.
fn valid_app() -> impl Strategy<Value = (String, u32, Vec<SocketAddrV4>, Duration, Duration, Option<u64>)> {
    let listen = prop::collection::btree_set(1u16..20000, 1..5).prop_flat_map(|ports| {
        let n = ports.len();
        (Just(ports), prop::collection::vec(prop_oneof![Just([0u8, 0, 0, 0]), any::<[u8; 4]>()], n))
    });
    (0u32..=10, listen, duration_parts(), duration_parts(), prop::option::of(1u64..(1 << 40))).prop_map(
        |(k, (ports, ips), ready, stop, mem)| {
            let listen: Vec<SocketAddrV4> =
                ports.iter().zip(&ips).map(|(p, ip)| SocketAddrV4::new((*ip).into(), *p)).collect();
            let show = |parts: &[(u64, &str)]| {
                parts.iter().map(|(n, u)| format!("{n}{u}")).collect::<Vec<_>>().join(" ")
            };
            let sum = |parts: &[(u64, &str)]| parts.iter().map(|(n, u)| unit_value(*n, u)).sum::<Duration>();
            let mut text = format!(
                "command = [\"/usr/bin/srv\", \"--x\"]\nworkers = {}\nlisten = [{}]\nstop_timeout = \"{}\"\n",
                1u32 << k,
                listen.iter().map(|l| format!("\"{l}\"")).collect::<Vec<_>>().join(", "),
                show(&stop),
            );
            let ready_timeout = sum(&ready);
            if !ready_timeout.is_zero() {
                text.push_str(&format!("ready_timeout = \"{}\"\n", show(&ready)));
            }
            if let Some(m) = mem {
                text.push_str(&format!("worker_memory_max = \"{m}\"\n"));
            }
            (
                text,
                1u32 << k,
                listen,
                if ready_timeout.is_zero() { crate::config::defaults::READY_TIMEOUT } else { ready_timeout },
                sum(&stop),
                mem,
            )
        },
    )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn valid_app_files_mean_what_they_say((text, workers, listen, ready, stop, mem) in valid_app()) {
        let fits = ready >= Duration::from_millis(1)
            && ready <= MAX_DURATION && stop <= MAX_DURATION
            && 2 * workers as usize * listen.len() <= 10_000
            && !listen.iter().any(|l| (20000..=29999).contains(&l.port()));
        // Distinct ports, so no two entries overlap, whatever their addresses.
        match AppConfig::parse(FILE, "chat", &text) {
            Ok(c) => {
                prop_assert!(fits, "{text}");
                prop_assert_eq!(c.workers, workers);
                prop_assert_eq!(c.listen, listen.iter().map(|l| std::net::SocketAddr::V4(*l)).collect::<Vec<_>>());
                prop_assert_eq!((c.ready_timeout, c.stop_timeout), (ready, stop));
                prop_assert_eq!(c.worker_memory_max, mem);
            }
            Err(e) => {
                prop_assert!(!fits, "{text}\n{e}");
                well_formed(&e, FILE, &text)?;
            }
        }
    }
}
