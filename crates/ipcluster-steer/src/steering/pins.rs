//! What is pinned, and how it is found again.

use std::{
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use crate::{MAX_BANDS, SLOTS, SteerError, is_bpffs, sys};

pub(super) const PROG_PIN: &str = "prog";
/// Where a replacement program is pinned before it is renamed over `prog` (no dot: bpffs
/// refuses names with dots, with EPERM).
pub(super) const PROG_NEW_PIN: &str = "prog_new";
/// Where a resized sessions map is pinned before it is renamed over `sessions`.
pub(super) const SESSIONS_NEW_PIN: &str = "sessions_new";

/// A map this crate pins: its pin, kernel name and shape.
pub(crate) struct MapSpec {
    pub pin: &'static str,
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// `None`: any size (the sessions map's is chosen at creation).
    pub max_entries: Option<u32>,
}

pub(super) const SLOTS_MAP: MapSpec = MapSpec {
    pin: "slots",
    name: "ipc_slots",
    map_type: sys::BPF_MAP_TYPE_ARRAY_OF_MAPS,
    key_size: 4,
    value_size: 4,
    max_entries: Some(SLOTS),
};
pub(super) const CONTROL_MAP: MapSpec = MapSpec {
    pin: "control",
    name: "ipc_control",
    map_type: sys::BPF_MAP_TYPE_ARRAY,
    key_size: 4,
    value_size: 4,
    max_entries: Some(1),
};
pub(super) const SLOT_INFO_MAP: MapSpec = MapSpec {
    pin: "slot_info",
    name: "ipc_slot_info",
    map_type: sys::BPF_MAP_TYPE_ARRAY,
    key_size: 4,
    value_size: 4,
    max_entries: Some(SLOTS),
};
pub(super) const OVERRIDES_MAP: MapSpec = MapSpec {
    pin: "overrides",
    name: "ipc_overrides",
    map_type: sys::BPF_MAP_TYPE_ARRAY,
    key_size: 4,
    value_size: 4,
    max_entries: Some(MAX_BANDS),
};
pub(super) const SESSIONS_MAP: MapSpec = MapSpec {
    pin: "sessions",
    name: "ipc_sessions",
    map_type: sys::BPF_MAP_TYPE_LRU_HASH,
    key_size: 16,
    value_size: 16,
    max_entries: None,
};
pub(super) const CONFIG_MAP: MapSpec = MapSpec {
    pin: "config",
    name: "ipc_config",
    map_type: sys::BPF_MAP_TYPE_ARRAY,
    key_size: 4,
    value_size: 8,
    max_entries: Some(1),
};
pub(super) const ALL_MAPS: [&MapSpec; 6] =
    [&SLOTS_MAP, &CONTROL_MAP, &SLOT_INFO_MAP, &OVERRIDES_MAP, &SESSIONS_MAP, &CONFIG_MAP];

/// Checks that `base_dir` is (or will be created) on a bpffs, then creates it.
pub(super) fn prepare_base(base_dir: &Path) -> Result<(), SteerError> {
    let mut existing = base_dir;
    while !existing.exists() {
        existing = existing.parent().ok_or_else(|| SteerError::NotBpffs(base_dir.to_owned()))?;
    }
    let on_bpffs = is_bpffs(existing).map_err(sys(format!("statfs {}", existing.display())))?;
    if !on_bpffs {
        return Err(SteerError::NotBpffs(base_dir.to_owned()));
    }
    fs::create_dir_all(base_dir).map_err(sys(format!("mkdir {}", base_dir.display())))
}

pub(crate) fn open_pinned(path: &Path) -> Result<Option<OwnedFd>, SteerError> {
    match sys::obj_get(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(sys(format!("open pinned {}", path.display()))(e)),
    }
}

/// The map pinned as `spec.pin` under `dir`; else the map of that shape and name among the
/// pinned program's (re-pinned); else a new one from `create` (pinned). Returns it with its id.
pub(crate) fn open_map(
    dir: &Path,
    spec: &MapSpec,
    prog_maps: &[u32],
    create: impl FnOnce(&MapSpec) -> io::Result<OwnedFd>,
) -> Result<(OwnedFd, u32), SteerError> {
    let path = dir.join(spec.pin);
    if let Some(fd) = open_pinned(&path)? {
        let id =
            check_shape(&fd, spec).map_err(|why| SteerError::Inconsistent { path: path.clone(), why })?;
        return Ok((fd, id));
    }
    let mut found = None;
    for &id in prog_maps {
        let fd = sys::map_get_fd_by_id(id).map_err(sys(format!("open map id {id}")))?;
        if check_shape(&fd, spec).is_ok() {
            found = Some(fd);
            break;
        }
    }
    let fd = match found {
        Some(fd) => fd,
        None => create(spec).map_err(sys(format!("create the map for {}", path.display())))?,
    };
    let id = check_shape(&fd, spec).map_err(|why| SteerError::Inconsistent { path: path.clone(), why })?;
    sys::obj_pin(fd.as_fd(), &path).map_err(sys(format!("pin {}", path.display())))?;
    Ok((fd, id))
}

/// The map's id when it has `spec`'s shape and name, else why not.
pub(crate) fn check_shape(fd: &OwnedFd, spec: &MapSpec) -> Result<u32, String> {
    let info = sys::map_info(fd.as_fd()).map_err(|e| format!("map info: {e}"))?;
    let size_ok = spec.max_entries.is_none_or(|n| n == info.max_entries);
    if (info.map_type, info.key_size, info.value_size) == (spec.map_type, spec.key_size, spec.value_size)
        && size_ok
        && info.name() == spec.name
    {
        Ok(info.id)
    } else {
        Err(format!(
            "not the map {} ({}, key {}, value {}, {:?} entries): {info:?}",
            spec.name, spec.map_type, spec.key_size, spec.value_size, spec.max_entries
        ))
    }
}
