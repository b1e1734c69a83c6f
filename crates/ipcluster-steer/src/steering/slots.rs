//! The slots, the live slot (the cutover) and the bands' overrides.

use std::os::fd::{AsFd, AsRawFd};

use super::{SlotState, Steering, check_bands, check_slot, sessions::no_batch};
use crate::{
    MAX_BANDS, SLOTS, SockArray, SteerError, check_band,
    program::{self, CONTROL_NONE, EPOCH_MASK, INFO_LOG2_BITS},
    sys,
};

impl Steering {
    /// Puts `table`, a generation of `bands` bands (a power of two ≤ [`MAX_BANDS`]), in `slot`,
    /// replacing what was there, and gives the slot a new epoch, so the sessions recorded for
    /// its previous occupant stop counting at once (they go to the live generation as new
    /// clients). Changes no other slot, and nothing live: a staged or canary generation is put
    /// first, then made live ([`Steering::set_live`]) or given bands ([`Steering::set_override`]).
    ///
    /// Slow when the table changes: the kernel waits for an RCU grace period after every update
    /// of a map of maps (5–20 ms here), so do it ahead of a cutover. The same table with
    /// another band count is one array update; the same table and band count is a no-op
    /// (idempotent: the epoch stays, and the sessions with it).
    ///
    /// The epoch moves first, then the table: no session of the previous occupant ever reaches
    /// the new table. Putting into the live slot or an override's slot changes where their new
    /// clients go at once (with the control word's band count for the live slot: call
    /// [`Steering::set_live`] with the new count). On failure the slot's previous sessions no
    /// longer count, and it may still hold its previous table: put again, or clear it.
    pub fn put(&self, slot: u32, table: &SockArray, bands: u32) -> Result<(), SteerError> {
        check_slot(slot)?;
        let log2 = check_bands(bands)?;
        let info = self.info_word(slot)?;
        let same = self.slot_id(slot)? == Some(table.id);
        if same && info & 15 == log2 {
            return Ok(());
        }
        let epoch = (info >> INFO_LOG2_BITS).wrapping_add(1) & EPOCH_MASK;
        sys::map_update(self.maps.slot_info.0.as_fd(), slot, &program::info_word(epoch, log2), sys::BPF_ANY)
            .map_err(sys(format!("write slot {slot}'s info")))?;
        if !same {
            let fd = table.fd.as_raw_fd() as u32;
            sys::map_update(self.maps.slots.0.as_fd(), slot, &fd, sys::BPF_ANY)
                .map_err(sys(format!("put the table in slot {slot}")))?;
        }
        Ok(())
    }

    /// Empties `slot` (its table's sockets are untouched) and gives it a new epoch: its
    /// sessions stop counting, its clients go to the live generation as new clients, and bands
    /// overridden to it go to the live slot. Returns whether it held a table. Idempotent.
    /// Refused for the live slot ([`SteerError::SlotLive`]): make another live first, or
    /// [`Steering::clear_live`]. Slow, as [`Steering::put`]. On failure the slot's sessions no
    /// longer count, and it may still hold its table.
    pub fn clear_slot(&self, slot: u32) -> Result<bool, SteerError> {
        check_slot(slot)?;
        if self.live()?.is_some_and(|(live, _)| live == slot) {
            return Err(SteerError::SlotLive(slot));
        }
        self.clear_slot_unchecked(slot)
    }

    pub(super) fn clear_slot_unchecked(&self, slot: u32) -> Result<bool, SteerError> {
        if self.slot_id(slot)?.is_none() {
            return Ok(false);
        }
        let info = self.info_word(slot)?;
        let epoch = (info >> INFO_LOG2_BITS).wrapping_add(1) & EPOCH_MASK;
        sys::map_update(
            self.maps.slot_info.0.as_fd(),
            slot,
            &program::info_word(epoch, info & 15),
            sys::BPF_ANY,
        )
        .map_err(sys(format!("write slot {slot}'s info")))?;
        sys::map_delete(self.maps.slots.0.as_fd(), slot).map_err(sys(format!("empty slot {slot}")))
    }

    /// The table in `slot`, re-opened from the kernel (after a daemon restart this is how each
    /// generation's table is adopted).
    pub fn slot_table(&self, slot: u32) -> Result<Option<SockArray>, SteerError> {
        check_slot(slot)?;
        self.open_slot(slot)
    }

    /// Every slot's table id, band count and epoch.
    pub fn slots(&self) -> Result<[SlotState; SLOTS as usize], SteerError> {
        let mut out = [SlotState { table: None, bands: 1, epoch: 0 }; SLOTS as usize];
        for (slot, state) in (0..SLOTS).zip(out.iter_mut()) {
            let info = self.info_word(slot)?;
            *state = SlotState {
                table: self.slot_id(slot)?,
                bands: 1 << (info & 15),
                epoch: info >> INFO_LOG2_BITS,
            };
        }
        Ok(out)
    }

    /// The slot holding `table`, if any (the lowest, should it be in several).
    pub fn find(&self, table: &SockArray) -> Result<Option<u32>, SteerError> {
        for slot in 0..SLOTS {
            if self.slot_id(slot)? == Some(table.id) {
                return Ok(Some(slot));
            }
        }
        Ok(None)
    }

    // ---- The live generation --------------------------------------------------------------

    /// The cutover: `slot` becomes live with `bands` bands, one 4-byte array update (a few
    /// microseconds), atomic for the program: every band at once, each new connection is
    /// steered by the previous live slot or by this one, never a mix. Clients with a valid
    /// session keep going where it is; bands with an override keep it. Idempotent.
    ///
    /// Refused, changing nothing, when `slot` holds no table ([`SteerError::EmptySlot`]) or
    /// its table was put with another band count ([`SteerError::BandsMismatch`]: put it again
    /// with this count first).
    pub fn set_live(&self, slot: u32, bands: u32) -> Result<(), SteerError> {
        check_slot(slot)?;
        let log2 = check_bands(bands)?;
        if self.slot_id(slot)?.is_none() {
            return Err(SteerError::EmptySlot(slot));
        }
        let has = 1 << (self.info_word(slot)? & 15);
        if has != bands {
            return Err(SteerError::BandsMismatch { slot, has, asked: bands });
        }
        if self.live()? != Some((slot, bands)) {
            self.write_control(program::control_word(slot, log2))?;
        }
        Ok(())
    }

    /// The live slot and its band count; `None` when nothing is live (every new client without
    /// a session or an override is refused).
    pub fn live(&self) -> Result<Option<(u32, u32)>, SteerError> {
        let word = sys::map_lookup::<u32>(self.maps.control.0.as_fd(), 0)
            .map_err(sys("read the control word"))?
            .unwrap_or(CONTROL_NONE);
        let slot = word & 0xff;
        Ok((slot < SLOTS).then(|| (slot, 1 << ((word >> 8) & 15))))
    }

    /// Makes nothing live: new clients without a session or an override are refused (reset)
    /// from now on. The slots keep their tables. Idempotent.
    pub fn clear_live(&self) -> Result<(), SteerError> {
        self.write_control(CONTROL_NONE)
    }

    pub(super) fn write_control(&self, word: u32) -> Result<(), SteerError> {
        sys::map_update(self.maps.control.0.as_fd(), 0, &word, sys::BPF_ANY)
            .map_err(sys("write the control word"))
    }

    // ---- Overrides ------------------------------------------------------------------------

    /// New clients of `band` (by the live generation's band count) go to `slot`'s table
    /// instead of the live one (`None`: back to the live one). One 4-byte update, atomic for
    /// the band; several bands change one after another. Clients with a valid session are not
    /// moved. A band overridden to a slot that holds no table goes to the live slot. In the
    /// override's table the band falls back to a neighbour as in the live one (so a canary's
    /// band whose worker is gone sends its new clients to another of the canary's bands). When
    /// a canary is promoted, [`Steering::set_live`] comes first, then
    /// [`Steering::clear_overrides`]. Idempotent.
    pub fn set_override(&self, band: u32, slot: Option<u32>) -> Result<(), SteerError> {
        check_band(band)?;
        let value = match slot {
            Some(s) => {
                check_slot(s)?;
                s + 1
            }
            None => 0,
        };
        sys::map_update(self.maps.overrides.0.as_fd(), band, &value, sys::BPF_ANY)
            .map_err(sys(format!("write band {band}'s override")))
    }

    /// Every band with an override, and its slot, in band order.
    pub fn overrides(&self) -> Result<Vec<(u32, u32)>, SteerError> {
        let fd = self.maps.overrides.0.as_fd();
        let all: Vec<(u32, u32)> = match sys::map_lookup_batch::<u32, u32>(fd, MAX_BANDS) {
            Ok(all) => all,
            Err(e) if no_batch(&e) => {
                let mut all = Vec::new();
                for band in 0..MAX_BANDS {
                    let v = sys::map_lookup::<u32>(fd, band).map_err(sys("read the overrides"))?;
                    all.push((band, v.unwrap_or(0)));
                }
                all
            }
            Err(e) => return Err(sys("read the overrides")(e)),
        };
        let mut out: Vec<(u32, u32)> =
            all.into_iter().filter(|&(_, v)| v != 0).map(|(b, v)| (b, v - 1)).collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Removes every override, band after band: each band's new clients go back to the live
    /// slot as its entry is cleared. Idempotent.
    pub fn clear_overrides(&self) -> Result<(), SteerError> {
        for (band, _) in self.overrides()? {
            self.set_override(band, None)?;
        }
        Ok(())
    }
}
