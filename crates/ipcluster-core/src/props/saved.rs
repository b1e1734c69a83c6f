//! The saved state: no bytes make its reader panic (near misses of a real file included), what
//! is written reads back the same, and whatever it accepts writes back as a file that reads the
//! same again.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
};

use proptest::prelude::*;

use crate::{
    config::Routing,
    model::GenState,
    name::AppName,
    prop_config::{config, mutated_bytes},
    saved::{SavedApp, SavedCanary, SavedGeneration, SavedState},
};

/// A public address as a config gives it: either family (IPv6 with no flow label, which no
/// address written as text has, and sometimes a scope).
fn listen() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        any::<SocketAddrV4>().prop_map(SocketAddr::V4),
        (any::<[u8; 16]>(), any::<u16>(), prop_oneof![Just(0u32), any::<u32>()])
            .prop_map(|(ip, port, scope)| SocketAddr::V6(SocketAddrV6::new(ip.into(), port, 0, scope))),
    ]
}

fn canary() -> impl Strategy<Value = SavedCanary> {
    (
        prop::collection::vec(any::<u32>(), 0..4),
        prop::option::of(any::<u64>()),
        prop::option::of(any::<u64>()),
    )
        .prop_map(|(bands, deadline_usec, canary_for_secs)| SavedCanary {
            bands,
            deadline_usec,
            canary_for_secs,
        })
}

fn saved_state() -> impl Strategy<Value = SavedState> {
    let name = "[a-z][a-z0-9_]{0,23}".prop_map(|n| AppName::new(&n).unwrap());
    let state = proptest::sample::select(vec![
        GenState::Starting,
        GenState::Live,
        GenState::Retired,
        GenState::Failed,
        GenState::Stopped,
        GenState::Draining,
        GenState::Canary,
    ]);
    let worker =
        (any::<u32>(), any::<u64>(), any::<u32>(), prop::collection::vec(any::<u16>(), 0..3)).prop_map(
            |(pid, start_usec, band, ports)| crate::saved::SavedWorker { pid, start_usec, band, ports },
        );
    let generation = (
        (
            state,
            any::<u64>(),
            prop::option::of(any::<u64>()),
            any::<u32>(),
            prop::collection::vec(listen(), 0..3),
        ),
        (
            prop::collection::vec(".{0,8}", 0..3),
            prop::collection::btree_map("[A-Z]{1,4}", ".{0,8}", 0..3),
            prop::option::of("[a-z]{1,8}"),
            prop::option::of(any::<(u16, u16)>()),
            prop::collection::vec(worker, 0..3),
        ),
        (
            prop::option::of(prop_oneof![Just(Routing::Nat), Just(Routing::Socket)]),
            prop::option::of(prop_oneof![Just("/srv".into()), "/[ -~]{0,12}".prop_map(Into::into)]),
            prop::option::of(canary()),
        ),
    )
        .prop_map(
            |(
                (state, started_usec, retired_usec, workers, listen),
                (command, environment, user, port_range, processes),
                (routing, working_directory, canary),
            )| {
                SavedGeneration {
                    state,
                    started_usec,
                    retired_usec,
                    workers,
                    listen,
                    routing,
                    command,
                    environment,
                    user,
                    working_directory,
                    port_range,
                    processes,
                    session_affinity_secs: port_range.map(|(a, _)| u64::from(a)),
                    max_draining: port_range.map(|(_, b)| u32::from(b % 7)),
                    session_slot: port_range.map(|(a, b)| ((a ^ b) % 8) as u8),
                    canary,
                }
            },
        );
    let app = (
        prop::collection::btree_map(any::<u64>(), generation, 0..3),
        prop::collection::btree_map(any::<u32>(), any::<u64>(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(generations, backoff_ms, stopped)| SavedApp { generations, backoff_ms, stopped });
    (
        prop::collection::btree_map(name.clone(), any::<u64>(), 0..3),
        prop::collection::btree_map(name, app, 0..3),
    )
        .prop_map(|(last_generation, apps): (BTreeMap<_, _>, BTreeMap<_, _>)| SavedState {
            last_generation,
            apps,
        })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn the_saved_state_never_panics_on_arbitrary_bytes(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        "[\\[\\]{}\":,0-9a-z ]{0,200}".prop_map(String::into_bytes),
        (0usize..5000).prop_map(|n| "[".repeat(n).into_bytes()),
    ]) {
        let _ = serde_json::from_slice::<SavedState>(&bytes);
    }

    /// Near misses of a real file (bytes deleted, inserted, repeated, the file cut short), and
    /// any bytes: whatever is accepted writes back as a file that reads the same.
    #[test]
    fn whatever_is_accepted_writes_back_the_same(bytes in prop_oneof![
        mutated_bytes(saved_state().prop_map(|s| serde_json::to_vec(&s).unwrap())),
        mutated_bytes(saved_state().prop_map(|s| serde_json::to_vec_pretty(&s).unwrap())),
        prop::collection::vec(any::<u8>(), 0..64),
    ]) {
        if let Ok(s) = serde_json::from_slice::<SavedState>(&bytes) {
            let again = serde_json::to_vec_pretty(&s).unwrap();
            prop_assert_eq!(serde_json::from_slice::<SavedState>(&again).unwrap(), s);
        }
    }

    #[test]
    fn the_saved_state_round_trips(s in saved_state()) {
        let json = serde_json::to_vec_pretty(&s).unwrap();
        prop_assert_eq!(serde_json::from_slice::<SavedState>(&json).unwrap(), s);
    }
}
