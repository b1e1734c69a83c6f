//! The first version's pins (two slots, `outer` and `active`), which [`crate::Steering::open`]
//! upgrades, and — for the upgrade's tests only — that version's program and loader
//! ([`Legacy`]), kept word for word.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
};

use crate::{
    MAX_BANDS, SockArray, SteerError, create_sockarray,
    insn::{ADD, AND, Asm, Insn, JEQ, JLT, JNE, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10, RSH},
    program::*,
    steering::{MapSpec, check_shape, open_map, open_pinned, open_table},
    sys,
};

/// Its pins, besides `prog`.
pub(crate) const PINS: [&str; 2] = ["outer", "active"];

const OUTER: MapSpec = MapSpec {
    pin: "outer",
    name: "ipc_outer",
    map_type: sys::BPF_MAP_TYPE_ARRAY_OF_MAPS,
    key_size: 4,
    value_size: 4,
    max_entries: Some(2),
};
const ACTIVE: MapSpec = MapSpec {
    pin: "active",
    name: "ipc_active",
    map_type: sys::BPF_MAP_TYPE_ARRAY,
    key_size: 4,
    value_size: 4,
    max_entries: Some(1),
};

/// The first version's maps of a group.
pub(crate) struct Maps {
    outer: OwnedFd,
    active: OwnedFd,
    /// Whether they are pinned (else found through the pinned program only).
    pub pinned: bool,
}

/// The first version's maps under `dir`: pinned, or named by the pinned program (`prog_maps`).
pub(crate) fn find(dir: &Path, prog_maps: &[u32]) -> Result<Option<Maps>, SteerError> {
    let find_one = |spec: &MapSpec| -> Result<(Option<OwnedFd>, bool), SteerError> {
        if let Some(fd) = open_pinned(&dir.join(spec.pin))? {
            return match check_shape(&fd, spec) {
                Ok(_) => Ok((Some(fd), true)),
                Err(why) => Err(SteerError::Inconsistent { path: dir.join(spec.pin), why }),
            };
        }
        for &id in prog_maps {
            let fd = sys::map_get_fd_by_id(id).map_err(crate::sys(format!("open map id {id}")))?;
            if check_shape(&fd, spec).is_ok() {
                return Ok((Some(fd), false));
            }
        }
        Ok((None, false))
    };
    let (outer, outer_pinned) = find_one(&OUTER)?;
    let (active, active_pinned) = find_one(&ACTIVE)?;
    match (outer, active) {
        (Some(outer), Some(active)) => {
            Ok(Some(Maps { outer, active, pinned: outer_pinned || active_pinned }))
        }
        // Half of the old layout: no program of that version can use it (it names both).
        (None, None) => Ok(None),
        _ => unpin(dir).map(|()| None),
    }
}

impl Maps {
    /// The table in slot 0 or 1.
    pub fn table(&self, slot: u32) -> Result<Option<SockArray>, SteerError> {
        open_table(self.outer.as_fd(), slot)
    }

    /// The slot in force: 0 or 1; `None` when cleared (2).
    pub fn active(&self) -> Result<Option<u32>, SteerError> {
        let slot = sys::map_lookup::<u32>(self.active.as_fd(), 0)
            .map_err(crate::sys("read the first version's active slot"))?
            .unwrap_or(0);
        Ok((slot < 2).then_some(slot))
    }
}

/// Removes the first version's map pins under `dir`. Idempotent.
pub(crate) fn unpin(dir: &Path) -> Result<(), SteerError> {
    for pin in PINS {
        match std::fs::remove_file(dir.join(pin)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::sys(format!("unpin {}", dir.join(pin).display()))(e)),
        }
    }
    Ok(())
}

/// A group pinned as the first version pinned it, for the upgrade's tests: its program (68
/// instructions, two slots, masks from 1,023 down), `prog`, `outer` and `active` under
/// `<base_dir>/<name>/`.
#[doc(hidden)]
#[derive(Debug)]
pub struct Legacy {
    outer: OwnedFd,
    active: OwnedFd,
    prog: OwnedFd,
}

impl Legacy {
    /// Pins the first version's maps and program under `<base_dir>/<name>/` (which must not
    /// hold a group yet).
    pub fn pin(base_dir: &Path, name: &str) -> Result<Self, SteerError> {
        let dir = base_dir.join(name);
        std::fs::create_dir_all(&dir).map_err(crate::sys(format!("mkdir {}", dir.display())))?;
        let (outer, _) = open_map(&dir, &OUTER, &[], |s| {
            let template = create_sockarray("ipc_template")?;
            sys::map_create(sys::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 2, Some(template.as_fd()), s.name)
        })?;
        let (active, _) = open_map(&dir, &ACTIVE, &[], |s| {
            sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, s.name)
        })?;
        let prog = load(active.as_fd(), outer.as_fd())?;
        sys::obj_pin(prog.as_fd(), &dir.join("prog"))
            .map_err(crate::sys("pin the first version's program"))?;
        Ok(Self { outer, active, prog })
    }

    /// Its `stage` + `switch_to`: `table` into `slot` (0 or 1), and that slot in force.
    pub fn switch_to(&self, slot: u32, table: &SockArray) -> Result<(), SteerError> {
        self.stage(slot, table)?;
        sys::map_update(self.active.as_fd(), 0, &slot, sys::BPF_ANY).map_err(crate::sys("switch"))
    }

    /// Its `stage`: `table` into `slot` (0 or 1).
    pub fn stage(&self, slot: u32, table: &SockArray) -> Result<(), SteerError> {
        let fd = table.as_fd().as_raw_fd() as u32;
        sys::map_update(self.outer.as_fd(), slot, &fd, sys::BPF_ANY).map_err(crate::sys("stage"))
    }

    /// Its program's `run_cnt` and `run_time_ns` ([`crate::enable_run_time_stats`]).
    pub fn program_stats(&self) -> Result<crate::ProgramStats, SteerError> {
        let info = sys::prog_info(self.prog.as_fd()).map_err(crate::sys("read the program's info"))?;
        Ok(crate::ProgramStats { run_cnt: info.run_cnt, run_time_ns: info.run_time_ns })
    }

    /// Attaches its program to `socket`'s group.
    pub fn attach(&self, socket: impl AsFd) -> Result<(), SteerError> {
        crate::socket::attach_program(socket.as_fd(), self.prog.as_fd()).map_err(crate::sys("attach"))
    }
}

fn load(active: BorrowedFd<'_>, outer: BorrowedFd<'_>) -> Result<OwnedFd, SteerError> {
    let insns = program(active, outer);
    crate::load_steering(&insns)
}

/// The first version's program, as it was.
fn program(active_map: BorrowedFd<'_>, outer_map: BorrowedFd<'_>) -> Vec<Insn> {
    const KEY: i16 = -4;
    const BUF: i16 = -8;
    const IPV6_SADDR_LAST: i32 = 20;
    let mut a = Asm::default();
    a.mov(R6, R1)
        .store32_imm(R10, KEY, 0)
        .mov(R2, R10)
        .alu_imm(ADD, R2, KEY.into())
        .load_map_fd(R1, active_map.as_raw_fd())
        .call(BPF_FUNC_MAP_LOOKUP_ELEM)
        .jmp_imm(JEQ, R0, 0, "drop")
        .load32(R1, R0, 0)
        .store32(R10, KEY, R1)
        .mov(R2, R10)
        .alu_imm(ADD, R2, KEY.into())
        .load_map_fd(R1, outer_map.as_raw_fd())
        .call(BPF_FUNC_MAP_LOOKUP_ELEM)
        .jmp_imm(JEQ, R0, 0, "drop")
        .mov(R7, R0)
        .load64(R2, R6, MD_MIGRATING_SK)
        .jmp_imm(JEQ, R2, 0, "packet")
        .load32(R1, R2, SOCK_FAMILY)
        .load32(R8, R2, SOCK_DST_IP4)
        .jmp_imm(JNE, R1, libc::AF_INET6, "have_addr")
        .load32(R8, R2, SOCK_DST_IP6 + 12)
        .ja("have_addr");
    a.label("packet")
        .load32(R2, R6, MD_ETH_PROTOCOL)
        .mov_imm(R3, IPV4_SADDR)
        .jmp_imm(JEQ, R2, ETH_P_IP_NET, "load")
        .mov_imm(R3, IPV6_SADDR_LAST)
        .jmp_imm(JNE, R2, ETH_P_IPV6_NET, "drop");
    a.label("load")
        .mov(R1, R6)
        .mov(R2, R3)
        .mov(R3, R10)
        .alu_imm(ADD, R3, BUF.into())
        .mov_imm(R4, 4)
        .mov_imm(R5, BPF_HDR_START_NET)
        .call(BPF_FUNC_SKB_LOAD_BYTES_RELATIVE)
        .jmp_imm(JNE, R0, 0, "drop")
        .load32(R8, R10, BUF);
    a.label("have_addr").be32(R8).mov_imm(R9, (MAX_BANDS - 1) as i32);
    a.label("try_mask").mov(R1, R8).alu_reg(AND, R1, R9).store32(R10, KEY, R1);
    select_key(&mut a, KEY)
        .jmp_imm(JEQ, R0, 0, "pass")
        .jmp_imm(JEQ, R9, 0, "scan")
        .alu_imm(RSH, R9, 1)
        .ja("try_mask");
    a.label("scan").mov_imm(R9, 1);
    a.label("scan_next").store32(R10, KEY, R9);
    select_key(&mut a, KEY).jmp_imm(JEQ, R0, 0, "pass").alu_imm(ADD, R9, 1).jmp_imm(
        JLT,
        R9,
        MAX_BANDS as i32,
        "scan_next",
    );
    a.label("drop").mov_imm(R0, SK_DROP).exit();
    a.label("pass").mov_imm(R0, SK_PASS).exit();
    a.finish()
}

fn select_key(a: &mut Asm, key: i16) -> &mut Asm {
    a.mov(R1, R6)
        .mov(R2, R7)
        .mov(R3, R10)
        .alu_imm(ADD, R3, key.into())
        .mov_imm(R4, 0)
        .call(BPF_FUNC_SK_SELECT_REUSEPORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_version_had_68_instruction_slots() {
        let fd = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(program(fd.as_fd(), fd.as_fd()).len(), 68);
    }
}
