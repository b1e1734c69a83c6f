//! The program's unit tests: its size, the verifier, the fallback and the words.

use std::{os::fd::AsFd, time::Instant};

use super::*;
use crate::sys;

/// Loading needs CAP_BPF and CAP_NET_ADMIN; it changes no namespace state. The tests that
/// load are ignored unless asked for (`cargo xtask test` asks as root); asked for as another
/// user, they fail.
fn need_root(test: &str) {
    assert!(nix::unistd::Uid::effective().is_root(), "{test} needs root (loads eBPF programs)");
}

struct TestMaps([std::os::fd::OwnedFd; 6]);

impl TestMaps {
    fn new() -> Self {
        let inner =
            sys::map_create(sys::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, MAX_BANDS, None, "t_inner").unwrap();
        let slots = sys::map_create(sys::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 8, Some(inner.as_fd()), "t_slots");
        let array = |v, n, name| sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, v, n, None, name).unwrap();
        Self([
            slots.unwrap(),
            array(4, 1, "t_control"),
            array(4, 8, "t_info"),
            array(4, MAX_BANDS, "t_overrides"),
            sys::map_create(sys::BPF_MAP_TYPE_LRU_HASH, 16, 16, 1024, None, "t_sessions").unwrap(),
            array(8, 1, "t_config"),
        ])
    }

    fn maps(&self) -> Maps<'_> {
        let [slots, control, slot_info, overrides, sessions, config] = &self.0;
        Maps {
            slots: slots.as_fd(),
            control: control.as_fd(),
            slot_info: slot_info.as_fd(),
            overrides: overrides.as_fd(),
            sessions: sessions.as_fd(),
            config: config.as_fd(),
        }
    }
}

/// The crate docs give the program's size.
const PROGRAM_SLOTS: usize = 242;

#[test]
fn the_program_has_the_size_the_docs_give() {
    // Map fds are only immediates here: any descriptor will do to count the instructions.
    let fd = std::fs::File::open("/dev/null").unwrap();
    let f = fd.as_fd();
    let insns =
        steering_program(&Maps { slots: f, control: f, slot_info: f, overrides: f, sessions: f, config: f });
    assert_eq!(insns.len(), PROGRAM_SLOTS);
}

#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn the_verifier_accepts_the_program_with_bounded_work() {
    need_root("the_verifier_accepts_the_program_with_bounded_work");
    let maps = TestMaps::new();
    let insns = steering_program(&maps.maps());
    let t = Instant::now();
    let loaded = sys::prog_load(
        sys::BPF_PROG_TYPE_SK_REUSEPORT,
        sys::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
        &insns,
        "Apache-2.0",
        "ipc_steer",
    );
    let took = t.elapsed();
    let prog = match loaded {
        Ok(p) => p,
        Err(e) => panic!("{}: {}", e.error, e.log),
    };
    let info = sys::prog_info(prog.as_fd()).unwrap();
    eprintln!(
        "steering program: {} instruction slots, loaded and verified in {took:?}; the verifier \
         processed {} instructions (limit 1,000,000)",
        insns.len(),
        info.verified_insns
    );
    assert!(info.verified_insns > 0, "this kernel reports the verifier's work (Linux 5.16+)");
    assert!(
        info.verified_insns < 100_000,
        "the verifier's work grew to {} instructions: a path multiplies the scan loop",
        info.verified_insns
    );
}

#[test]
#[ignore = "needs root: cargo xtask test runs it as root with --run-ignored"]
fn a_rejected_program_carries_the_verifier_log() {
    need_root("a_rejected_program_carries_the_verifier_log");
    // Returns without setting r0: the verifier refuses to read an uninitialised register.
    let insns = Asm::default().mov(R6, R1).exit().finish();
    let err = sys::prog_load(
        sys::BPF_PROG_TYPE_SK_REUSEPORT,
        sys::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
        &insns,
        "Apache-2.0",
        "ipc_broken",
    )
    .expect_err("the verifier accepted a program that returns garbage");
    assert_eq!(err.error.raw_os_error(), Some(libc::EACCES), "{}", err.error);
    assert!(err.log.contains("R0 !read_ok"), "no verifier log in the error: {:?}", err.log);
    let shown = crate::SteerError::Verifier { error: err.error, log: err.log }.to_string();
    assert!(shown.contains("R0 !read_ok"), "{shown}");
    eprintln!("rejected as expected:\n{shown}");
}

#[test]
fn selects_the_band_when_its_entry_is_filled() {
    for bands in [1u32, 2, 8, 64, 1024] {
        for addr in [0u32, 1, 7, 0x7f00_0005, 0x0a01_02ff, u32::MAX] {
            assert_eq!(select(addr, |k| k < bands), Some(addr & (bands - 1)), "{addr:#x} / {bands}");
            assert_eq!(select_in(addr, bands, |k| k < bands), Some(addr & (bands - 1)));
        }
    }
}

#[test]
fn an_empty_band_falls_back_to_a_filled_neighbour() {
    let n = 8;
    let without = |gone: &'static [u32]| move |k: u32| k < n && !gone.contains(&k);
    assert_eq!(select(7, without(&[7])), Some(3));
    assert_eq!(select(7, without(&[7, 3])), Some(1));
    assert_eq!(select(3, without(&[3])), Some(1));
    assert_eq!(select(0, without(&[0])), Some(1));
    assert_eq!(select(8, without(&[0, 1])), Some(2));
    assert_eq!(select(5, |_| false), None);
    assert_eq!(select_in(7, 8, without(&[7, 3])), Some(1));
}

#[test]
fn select_in_agrees_with_select_for_tables_below_their_band_count() {
    // Every subset of 8 bands' entries, every address word's low 12 bits.
    for bands in [1u32, 2, 4, 8] {
        for set in 0u32..(1 << bands) {
            let filled = |k: u32| k < bands && set & (1 << k) != 0;
            for addr in 0..4096 {
                assert_eq!(select_in(addr, bands, filled), select(addr, filled), "{addr} {bands} {set:b}");
            }
        }
    }
}

#[test]
fn the_words_pack_as_the_program_unpacks_them() {
    assert_eq!(control_word(3, 10), 0x0a03);
    assert_eq!(info_word(5, 3), 0x53);
    assert_eq!(info_word(EPOCH_MASK + 2, 0) >> INFO_LOG2_BITS, 1, "epochs wrap");
    assert_eq!(log2_of(1), Some(0));
    assert_eq!(log2_of(1024), Some(10));
    assert_eq!(log2_of(2048), None);
    assert_eq!(log2_of(0), None);
    assert_eq!(log2_of(12), None);
}
