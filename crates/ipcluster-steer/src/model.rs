//! [`Model`]: what the steering program decides, in plain Rust, from the same state its maps
//! hold. The unit tests below pin its rules down; the kernel tests hold the program to it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use crate::{MAX_BANDS, SLOTS, addr_word, program, session_key};

/// One slot as the program sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSlot {
    /// The table's filled bands; `None` when the slot holds no table.
    pub filled: Option<BTreeSet<u32>>,
    /// The band count given when the table was put in the slot.
    pub bands: u32,
    /// Changes each time a table is put in the slot (or the slot is cleared).
    pub epoch: u32,
}

/// A session record: the slot a client was sent to, that slot's epoch then, and when it last
/// connected (ns, on `bpf_ktime_get_ns`'s clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelSession {
    pub slot: u32,
    pub epoch: u32,
    pub last_seen_ns: u64,
}

/// Where a connection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// A probe source ([`crate::probe_source`]): exactly this slot and band.
    Probe { slot: u32, band: u32 },
    /// The client's valid session: its slot, exactly its band there; the record refreshed.
    Session { slot: u32, band: u32 },
    /// A new client (or one whose session was gone or its worker gone): the live slot or its
    /// band's override, the band after the fallback; recorded when sessions are on.
    New { slot: u32, band: u32 },
}

impl Choice {
    /// The slot and band the connection went to.
    pub fn target(self) -> (u32, u32) {
        match self {
            Choice::Probe { slot, band } | Choice::Session { slot, band } | Choice::New { slot, band } => {
                (slot, band)
            }
        }
    }
}

/// The state of one group's maps, and the program's decision for a connection.
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// The live slot and its band count (the control word); `None`: nothing live.
    pub live: Option<(u32, u32)>,
    pub slots: [ModelSlot; SLOTS as usize],
    /// band → slot.
    pub overrides: BTreeMap<u32, u32>,
    /// 0: sessions off.
    pub timeout_ns: u64,
    /// By the client's 16-byte address (IPv4 as `::ffff:a.b.c.d`).
    pub sessions: HashMap<[u8; 16], ModelSession>,
}

impl Model {
    /// [`crate::Steering::put`]: a table filling `filled` with `bands` bands into `slot`.
    pub fn put(&mut self, slot: u32, filled: BTreeSet<u32>, bands: u32) {
        let s = &mut self.slots[slot as usize];
        s.epoch = (s.epoch + 1) & program::EPOCH_MASK;
        s.bands = bands;
        s.filled = Some(filled);
    }

    /// [`crate::Steering::clear_slot`].
    pub fn clear_slot(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        if s.filled.take().is_some() {
            s.epoch = (s.epoch + 1) & program::EPOCH_MASK;
        }
    }

    /// The program's decision for a new connection from `client` at `now_ns`, with its effect
    /// on the sessions. `None`: refused.
    pub fn connect(&mut self, client: IpAddr, now_ns: u64) -> Option<Choice> {
        let key = session_key(client);
        let word = addr_word(client);
        if key[..12] == session_key(IpAddr::V4(0.into()))[..12] && word >> 16 == program::PROBE_PREFIX {
            let slot = (word >> program::PROBE_SLOT_SHIFT) & 7;
            let band = word & (MAX_BANDS - 1);
            let filled = self.slots[slot as usize].filled.as_ref()?;
            return filled.contains(&band).then_some(Choice::Probe { slot, band });
        }
        if self.timeout_ns != 0
            && let Some(rec) = self.sessions.get_mut(&key)
            && let Some(s) = self.slots.get(rec.slot as usize)
            && s.epoch == rec.epoch
            && now_ns.wrapping_sub(rec.last_seen_ns) <= self.timeout_ns
            && let Some(filled) = &s.filled
        {
            let band = word & (s.bands.max(1) - 1);
            if filled.contains(&band) {
                rec.last_seen_ns = now_ns;
                return Some(Choice::Session { slot: rec.slot, band });
            }
        }
        let (live, bands) = self.live.unwrap_or((program::CONTROL_NONE, 1));
        let band = word & (bands - 1);
        let slot = match self.overrides.get(&band) {
            Some(&s) if self.slots.get(s as usize).is_some_and(|s| s.filled.is_some()) => s,
            _ => live,
        };
        let s = self.slots.get(slot as usize)?;
        let filled = s.filled.as_ref()?;
        let band = program::select_in(word, bands, |k| filled.contains(&k))?;
        if self.timeout_ns != 0 {
            self.sessions.insert(key, ModelSession { slot, epoch: s.epoch, last_seen_ns: now_ns });
        }
        Some(Choice::New { slot, band })
    }

    /// Records per slot that still count (their slot holds a table of their epoch, seen within
    /// the timeout), as [`crate::Steering::session_counts`] counts them.
    pub fn session_counts(&self, now_ns: u64) -> [u32; SLOTS as usize] {
        let mut out = [0; SLOTS as usize];
        if self.timeout_ns == 0 {
            return out;
        }
        for rec in self.sessions.values() {
            if let Some(s) = self.slots.get(rec.slot as usize)
                && s.filled.is_some()
                && s.epoch == rec.epoch
                && now_ns.wrapping_sub(rec.last_seen_ns) <= self.timeout_ns
            {
                out[rec.slot as usize] += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::probe_source;

    const SEC: u64 = 1_000_000_000;

    fn all(n: u32) -> BTreeSet<u32> {
        (0..n).collect()
    }

    fn v4(i: u32) -> IpAddr {
        Ipv4Addr::from(0x0a00_0000 | i).into()
    }

    fn two_generations(timeout_ns: u64) -> Model {
        let mut m = Model { timeout_ns, ..Model::default() };
        m.put(0, all(4), 4);
        m.live = Some((0, 4));
        m
    }

    #[test]
    fn without_sessions_clients_go_to_the_live_slot_by_band_and_nothing_is_recorded() {
        let mut m = two_generations(0);
        for i in 0..16 {
            assert_eq!(m.connect(v4(i), 0), Some(Choice::New { slot: 0, band: i & 3 }));
        }
        assert!(m.sessions.is_empty());
        m.put(1, all(8), 8);
        m.live = Some((1, 8));
        assert_eq!(m.connect(v4(13), 0), Some(Choice::New { slot: 1, band: 5 }));
        m.live = None;
        assert_eq!(m.connect(v4(13), 0), None, "nothing live: refused");
    }

    #[test]
    fn a_session_sticks_across_a_cutover_until_it_idles_out_and_each_connection_refreshes_it() {
        let mut m = two_generations(10 * SEC);
        assert_eq!(m.connect(v4(6), 0), Some(Choice::New { slot: 0, band: 2 }));
        m.put(1, all(8), 8);
        m.live = Some((1, 8));
        assert_eq!(m.connect(v4(6), 9 * SEC), Some(Choice::Session { slot: 0, band: 2 }));
        assert_eq!(
            m.connect(v4(6), 18 * SEC),
            Some(Choice::Session { slot: 0, band: 2 }),
            "refreshed at 9 s"
        );
        assert_eq!(m.session_counts(18 * SEC), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(m.session_counts(28 * SEC + 1), [0; 8], "idle past the timeout");
        assert_eq!(m.connect(v4(6), 28 * SEC + 1), Some(Choice::New { slot: 1, band: 6 }));
        assert_eq!(m.session_counts(28 * SEC + 1), [0, 1, 0, 0, 0, 0, 0, 0], "recorded on the live slot");
        assert_eq!(m.connect(v4(7), 28 * SEC), Some(Choice::New { slot: 1, band: 7 }), "a new client");
    }

    #[test]
    fn a_new_table_in_the_slot_ends_its_sessions_at_once() {
        let mut m = two_generations(10 * SEC);
        m.connect(v4(6), 0);
        m.put(1, all(4), 4);
        m.live = Some((1, 4));
        assert_eq!(m.session_counts(SEC), [1, 0, 0, 0, 0, 0, 0, 0]);
        m.put(0, all(4), 4);
        assert_eq!(m.session_counts(SEC), [0; 8]);
        assert_eq!(m.connect(v4(6), SEC), Some(Choice::New { slot: 1, band: 2 }));
        m.clear_slot(1);
        assert_eq!(m.session_counts(SEC), [0; 8], "a cleared slot's records do not count");
    }

    #[test]
    fn a_session_whose_worker_is_gone_moves_to_the_live_slot() {
        let mut m = two_generations(10 * SEC);
        m.connect(v4(6), 0);
        m.put(1, all(4), 4);
        m.live = Some((1, 4));
        m.slots[0].filled.as_mut().unwrap().remove(&2);
        assert_eq!(m.connect(v4(6), SEC), Some(Choice::New { slot: 1, band: 2 }));
        assert_eq!(m.sessions[&session_key(v4(6))].slot, 1);
    }

    #[test]
    fn an_override_takes_new_clients_of_its_band_and_leaves_sessions_where_they_are() {
        let mut m = two_generations(10 * SEC);
        m.connect(v4(1), 0);
        m.put(2, [1].into(), 4);
        m.overrides.insert(1, 2);
        assert_eq!(m.connect(v4(1), SEC), Some(Choice::Session { slot: 0, band: 1 }));
        assert_eq!(m.connect(v4(5), SEC), Some(Choice::New { slot: 2, band: 1 }));
        assert_eq!(m.connect(v4(6), SEC), Some(Choice::New { slot: 0, band: 2 }), "another band");
        m.clear_slot(2);
        assert_eq!(m.connect(v4(9), SEC), Some(Choice::New { slot: 0, band: 1 }), "an empty override slot");
    }

    #[test]
    fn a_probe_reaches_exactly_its_slot_and_band_and_is_not_recorded() {
        let mut m = two_generations(10 * SEC);
        m.put(3, all(8), 8);
        let p = |slot, band| IpAddr::V4(probe_source(slot, band).unwrap());
        assert_eq!(m.connect(p(3, 5), 0), Some(Choice::Probe { slot: 3, band: 5 }));
        assert_eq!(m.connect(p(0, 3), 0), Some(Choice::Probe { slot: 0, band: 3 }));
        assert_eq!(m.connect(p(0, 5), 0), None, "no band 5 in slot 0: refused, no fallback");
        assert_eq!(m.connect(p(4, 0), 0), None, "an empty slot");
        assert!(m.sessions.is_empty());
        let v6 = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0x7ffd, 3 << 10 | 5));
        assert_eq!(
            m.connect(v6, 0),
            Some(Choice::New { slot: 0, band: 1 }),
            "an IPv6 source with a probe's last word is no probe"
        );
    }

    #[test]
    fn ipv4_clients_and_their_mapped_form_are_one_client() {
        let mut m = two_generations(10 * SEC);
        let v4 = Ipv4Addr::new(10, 0, 0, 6);
        m.connect(v4.into(), 0);
        m.put(1, all(8), 8);
        m.live = Some((1, 8));
        assert_eq!(m.connect(v4.to_ipv6_mapped().into(), SEC), Some(Choice::Session { slot: 0, band: 2 }));
    }
}
