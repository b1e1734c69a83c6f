//! The first version's calls, over slots 0 and 1.

use super::Steering;
use crate::{MAX_BANDS, SLOTS, SockArray, SteerError, program::CONTROL_NONE};

impl Steering {
    /// Puts `generation` in slot 0 or 1, whichever is not live, with [`MAX_BANDS`] bands,
    /// ready for [`Steering::switch_to`], without changing where any connection goes (unless
    /// that slot is an override's). Slow (a grace period: see [`Steering::put`]). A no-op when
    /// `generation` is in a slot already. Replaces the generation that was in that slot, if
    /// any; on failure the slots are unchanged.
    pub fn stage(&self, generation: &SockArray) -> Result<(), SteerError> {
        self.stage_slot(generation).map(drop)
    }

    fn stage_slot(&self, generation: &SockArray) -> Result<u32, SteerError> {
        if let Some(slot) = self.find(generation)? {
            return Ok(slot);
        }
        let slot = if self.live()?.is_some_and(|(s, _)| s == 0) { 1 } else { 0 };
        self.put(slot, generation, MAX_BANDS)?;
        Ok(slot)
    }

    /// Makes `generation` the live one: [`Steering::stage`] (when in no slot yet), then
    /// [`Steering::set_live`] with the band count it was put with (1,024 when staged here: the
    /// first version's selection). Every new connection without a session after it returns is
    /// steered by `generation`; connections already queued on the previous generation's sockets
    /// stay there. Idempotent; switching back to the previous generation needs no staging while
    /// it is still in its slot. On failure the previous generation stays live.
    pub fn switch_to(&self, generation: &SockArray) -> Result<(), SteerError> {
        let slot = self.stage_slot(generation)?;
        let bands = 1 << (self.info_word(slot)? & 15);
        self.set_live(slot, bands)
    }

    /// The live generation's table, re-opened from the kernel; `None` before the first switch
    /// or after [`Steering::clear`].
    pub fn current(&self) -> Result<Option<SockArray>, SteerError> {
        match self.live()? {
            Some((slot, _)) => self.open_slot(slot),
            None => Ok(None),
        }
    }

    /// The table in the other one of slots 0 and 1 while one of them is live (the previous
    /// generation after a switch, or a staged one); `None` otherwise.
    pub fn standby(&self) -> Result<Option<SockArray>, SteerError> {
        match self.live()? {
            Some((slot @ (0 | 1), _)) => self.open_slot(1 - slot),
            _ => Ok(None),
        }
    }

    /// Stops steering: nothing live, every override gone, every slot emptied (releasing their
    /// tables; their sessions stop counting), so every new connection is refused (reset) until
    /// the next [`Steering::switch_to`] or [`Steering::set_live`]. Returns whether a generation
    /// was live. Idempotent.
    pub fn clear(&self) -> Result<bool, SteerError> {
        let was = self.current()?.is_some();
        self.write_control(CONTROL_NONE)?;
        self.clear_overrides()?;
        for slot in 0..SLOTS {
            self.clear_slot_unchecked(slot)?;
        }
        Ok(was)
    }
}
