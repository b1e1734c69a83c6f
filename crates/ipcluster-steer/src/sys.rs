//! The `bpf(2)` system call, with only the commands this crate needs.
//!
//! Every attribute struct below is a prefix of the kernel's `union bpf_attr`
//! (`include/uapi/linux/bpf.h`) for one command, with the same field order, types and offsets
//! (the offsets are asserted at compile time). The kernel copies `size` bytes and treats the rest
//! of the union as zero, so a prefix is a complete, valid argument.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use crate::insn::Insn;

// Commands (`enum bpf_cmd`).
const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_PROG_LOAD: u32 = 5;
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_MAP_GET_FD_BY_ID: u32 = 14;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_MAP_LOOKUP_BATCH: u32 = 24;
const BPF_ENABLE_STATS: u32 = 32;
/// `enum bpf_stats_type`: `run_time_ns` and `run_cnt` of every program.
const BPF_STATS_RUN_TIME: u32 = 0;

// Map types (`enum bpf_map_type`).
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
pub const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
pub const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;

// Program type (`enum bpf_prog_type`) and attach type (`enum bpf_attach_type`).
pub const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
pub const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;

/// `BPF_ANY`: create a new element or update an existing one.
pub const BPF_ANY: u64 = 0;

/// `BPF_OBJ_NAME_LEN`.
const OBJ_NAME_LEN: usize = 16;

/// `BPF_MAP_CREATE`.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; OBJ_NAME_LEN],
}

/// `BPF_MAP_{LOOKUP,UPDATE,DELETE}_ELEM`: `key` and `value` are user pointers.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_PROG_LOAD`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `BPF_OBJ_PIN` / `BPF_OBJ_GET`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `BPF_MAP_GET_FD_BY_ID`.
#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Prefix of `struct bpf_map_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct MapInfo {
    pub map_type: u32,
    pub id: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    /// NUL-padded.
    pub name: [u8; OBJ_NAME_LEN],
}

impl MapInfo {
    /// The map's name as given at creation (at most 15 bytes).
    pub fn name(&self) -> &str {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(OBJ_NAME_LEN);
        std::str::from_utf8(&self.name[..end]).unwrap_or("")
    }
}

/// Prefix of `struct bpf_prog_info`, up to `verified_insns` (the kernel's layout: most fields
/// are only there to put the later ones at their offsets).
#[repr(C)]
#[allow(dead_code)]
#[derive(Debug, Default, Clone, Copy)]
struct ProgInfoRaw {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; OBJ_NAME_LEN],
    ifindex: u32,
    gpl_compatible: u32,
    netns_dev: u64,
    netns_ino: u64,
    nr_jited_ksyms: u32,
    nr_jited_func_lens: u32,
    jited_ksyms: u64,
    jited_func_lens: u64,
    btf_id: u32,
    func_info_rec_size: u32,
    func_info: u64,
    nr_func_info: u32,
    nr_line_info: u32,
    line_info: u64,
    jited_line_info: u64,
    nr_jited_line_info: u32,
    line_info_rec_size: u32,
    jited_line_info_rec_size: u32,
    nr_prog_tags: u32,
    prog_tags: u64,
    run_time_ns: u64,
    run_cnt: u64,
    recursion_misses: u64,
    verified_insns: u32,
    attach_btf_obj_id: u32,
}

/// What the kernel says about a loaded program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgInfo {
    pub prog_type: u32,
    pub id: u32,
    /// The kernel's hash of the instructions (map references blanked): equal tags, same code.
    pub tag: [u8; 8],
    pub map_ids: Vec<u32>,
    /// Total time the program ran, while run-time statistics were on ([`enable_stats`]).
    pub run_time_ns: u64,
    /// How many times it ran, while run-time statistics were on.
    pub run_cnt: u64,
    /// Instructions the verifier processed to accept it (Linux 5.16 and later; else 0).
    pub verified_insns: u32,
}

// The offsets of `union bpf_attr` and the info structs, as `include/uapi/linux/bpf.h` lays them out.
const _: () = {
    assert!(std::mem::offset_of!(MapCreateAttr, inner_map_fd) == 20);
    assert!(std::mem::offset_of!(MapCreateAttr, map_name) == 28);
    assert!(size_of::<MapCreateAttr>() == 44);
    assert!(std::mem::offset_of!(MapElemAttr, key) == 8);
    assert!(std::mem::offset_of!(MapElemAttr, value) == 16);
    assert!(std::mem::offset_of!(MapElemAttr, flags) == 24);
    assert!(std::mem::offset_of!(ProgLoadAttr, insns) == 8);
    assert!(std::mem::offset_of!(ProgLoadAttr, license) == 16);
    assert!(std::mem::offset_of!(ProgLoadAttr, log_level) == 24);
    assert!(std::mem::offset_of!(ProgLoadAttr, log_buf) == 32);
    assert!(std::mem::offset_of!(ProgLoadAttr, prog_name) == 48);
    assert!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type) == 68);
    assert!(size_of::<ProgLoadAttr>() == 72);
    assert!(std::mem::offset_of!(ObjAttr, bpf_fd) == 8);
    assert!(std::mem::offset_of!(ObjAttr, file_flags) == 12);
    assert!(std::mem::offset_of!(GetFdByIdAttr, open_flags) == 8);
    assert!(std::mem::offset_of!(InfoAttr, info) == 8);
    assert!(std::mem::offset_of!(MapInfo, max_entries) == 16);
    assert!(std::mem::offset_of!(ProgInfoRaw, tag) == 8);
    assert!(std::mem::offset_of!(ProgInfoRaw, nr_map_ids) == 52);
    assert!(std::mem::offset_of!(ProgInfoRaw, map_ids) == 56);
    assert!(std::mem::offset_of!(ProgInfoRaw, run_time_ns) == 192);
    assert!(std::mem::offset_of!(ProgInfoRaw, run_cnt) == 200);
    assert!(std::mem::offset_of!(ProgInfoRaw, verified_insns) == 216);
    assert!(std::mem::offset_of!(MapInfo, name) == 24);
    assert!(std::mem::offset_of!(BatchAttr, count) == 32);
    assert!(std::mem::offset_of!(BatchAttr, map_fd) == 36);
    assert!(std::mem::offset_of!(BatchAttr, flags) == 48);
    assert!(size_of::<Insn>() == 8);
};

/// Calls `bpf(cmd, attr, sizeof *attr)`.
///
/// # Safety
/// `attr` must be one of this module's attribute structs, correct for `cmd`, and every user
/// pointer inside it must be valid for what the kernel does with it under `cmd` (read or written
/// for the stated length) for the duration of the call.
unsafe fn bpf<T>(cmd: u32, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees `attr` is a valid attribute for `cmd` whose pointers are
    // valid; `attr` itself is a live, exclusive reference of exactly `size_of::<T>()` bytes.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Takes ownership of a file descriptor the kernel just returned.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `bpf(2)` returned this descriptor as a new, open fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn name_bytes(name: &str) -> [u8; OBJ_NAME_LEN] {
    // The kernel accepts [A-Za-z0-9_.] and needs a terminating NUL within the 16 bytes.
    let mut out = [0u8; OBJ_NAME_LEN];
    for (o, c) in out.iter_mut().zip(name.bytes().take(OBJ_NAME_LEN - 1)) {
        *o = if c.is_ascii_alphanumeric() || c == b'.' { c } else { b'_' };
    }
    out
}

/// `BPF_MAP_CREATE`.
pub fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    inner_map: Option<BorrowedFd<'_>>,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
        inner_map_fd: inner_map.map_or(0, |fd| fd.as_raw_fd() as u32),
        numa_node: 0,
        map_name: name_bytes(name),
    };
    // SAFETY: a MAP_CREATE attribute without pointers.
    unsafe { bpf(BPF_MAP_CREATE, &mut attr) }.map(owned)
}

/// `BPF_MAP_UPDATE_ELEM` with a `u32` key and a value of `V`'s size.
pub fn map_update<V: Copy>(map: BorrowedFd<'_>, key: u32, value: &V, flags: u64) -> io::Result<()> {
    map_update_key(map, &key, value, flags)
}

/// `BPF_MAP_UPDATE_ELEM` with a key of `K`'s size and a value of `V`'s size.
pub fn map_update_key<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags,
    };
    // SAFETY: the key and value pointers are valid for reads of the map's key and value sizes
    // (callers pass the `K` and `V` their map was created with) during the call.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// `BPF_MAP_LOOKUP_ELEM` with a `u32` key; `None` when the entry is empty (`ENOENT`).
pub fn map_lookup<V: Copy + Default>(map: BorrowedFd<'_>, key: u32) -> io::Result<Option<V>> {
    map_lookup_key(map, &key)
}

/// `BPF_MAP_LOOKUP_ELEM` with a key of `K`'s size; `None` when there is no such entry.
pub fn map_lookup_key<K: Copy, V: Copy + Default>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        flags: 0,
    };
    // SAFETY: the key pointer is valid for reads of the map's key size and the value pointer
    // for writes of `size_of::<V>()` bytes, the value size of the maps callers use it with.
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_DELETE_ELEM` with a `u32` key; `false` when the entry was already empty.
pub fn map_delete(map: BorrowedFd<'_>, key: u32) -> io::Result<bool> {
    map_delete_key(map, &key)
}

/// `BPF_MAP_DELETE_ELEM` with a key of `K`'s size; `false` when there was no such entry.
pub fn map_delete_key<K: Copy>(map: BorrowedFd<'_>, key: &K) -> io::Result<bool> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: the key pointer is valid for reads of the map's key size during the call.
    match unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_GET_NEXT_KEY`: the key after `key` (the first key for `None`), `None` at the end.
pub fn map_next_key<K: Copy + Default>(map: BorrowedFd<'_>, key: Option<&K>) -> io::Result<Option<K>> {
    let mut next = K::default();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.map_or(0, |k| k as *const K as u64),
        value: &mut next as *mut K as u64,
        flags: 0,
    };
    // SAFETY: the key pointer is null or valid for reads of the map's key size; `next` is
    // writable for the same size (callers pass their map's key type).
    match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
        Ok(_) => Ok(Some(next)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_*_BATCH`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of a hash map (or array) with keys `K` and values `V`, by `BPF_MAP_LOOKUP_BATCH`
/// in batches of `batch` entries. Fails with `EINVAL` (or `ENOTSUPP`, 524) on a kernel or map
/// type without batch operations: see [`map_entries_by_key`]. Not a snapshot: entries that
/// change meanwhile may be seen in either state, or (for a hash map) not at all.
pub fn map_lookup_batch<K: Copy + Default, V: Copy + Default>(
    map: BorrowedFd<'_>,
    batch: u32,
) -> io::Result<Vec<(K, V)>> {
    let batch = batch.max(1) as usize;
    let mut keys = vec![K::default(); batch];
    let mut values = vec![V::default(); batch];
    // The position token: a bucket number for hash maps, a key for arrays; 8 bytes hold both.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token_in as *const u64 as u64 },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: batch as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `keys` and `values` are writable for `count` elements of the map's key and
        // value sizes (callers pass their map's `K` and `V`); the tokens are 8 writable bytes,
        // at least the map's token size (4 for hash maps and arrays).
        let done = match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = (attr.count as usize).min(batch);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if done {
            return Ok(out);
        }
        token_in = token_out;
        first = false;
    }
}

/// Every entry of a hash map, one `BPF_MAP_GET_NEXT_KEY` and one lookup per entry: for kernels
/// without [`map_lookup_batch`]. An entry deleted during the walk may restart it from the first
/// key (the kernel's rule for a key that is gone), so entries can come twice: callers that
/// count deduplicate by key.
pub fn map_entries_by_key<K: Copy + Default + Ord, V: Copy + Default>(
    map: BorrowedFd<'_>,
    max_entries: u32,
) -> io::Result<Vec<(K, V)>> {
    let mut out = std::collections::BTreeMap::new();
    let mut key: Option<K> = None;
    // A map rewritten faster than it is walked could restart the walk forever: at most twice
    // its size in steps.
    for _ in 0..2 * u64::from(max_entries) + 2 {
        let Some(next) = map_next_key(map, key.as_ref())? else { break };
        if let Some(v) = map_lookup_key::<K, V>(map, &next)? {
            out.insert(next, v);
        }
        key = Some(next);
    }
    Ok(out.into_iter().collect())
}

/// Why `BPF_PROG_LOAD` failed: the error, and the verifier's log when the kernel gave one.
#[derive(Debug)]
pub struct LoadError {
    pub error: io::Error,
    pub log: String,
}

/// The size of the verifier log buffer asked for when a load fails. Since Linux 6.4 a log that
/// does not fit keeps its end, which is where the verifier says what it rejected.
const LOG_SIZE: usize = 256 * 1024;

/// `BPF_PROG_LOAD`. The first attempt asks for no log (cheaper); if it fails, the load is
/// repeated with `log_level = 1` so the error carries the verifier's explanation.
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[Insn],
    license: &str,
    name: &str,
) -> Result<OwnedFd, LoadError> {
    let license = CString::new(license).expect("license without NUL");
    let attempt = |log: Option<&mut Vec<u8>>| {
        let (log_level, log_size, log_buf) = match log {
            Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        let mut attr = ProgLoadAttr {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level,
            log_size,
            log_buf,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name_bytes(name),
            prog_ifindex: 0,
            expected_attach_type,
        };
        // SAFETY: `insns` is valid for `insn_cnt` 8-byte instructions, `license` is a
        // NUL-terminated string, and `log_buf` (when set) is writable for `log_size` bytes; all
        // outlive the call.
        unsafe { bpf(BPF_PROG_LOAD, &mut attr) }.map(owned)
    };
    match attempt(None) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            let mut buf = vec![0u8; LOG_SIZE];
            // The program is the same, so this fails again (or, for a transient error, succeeds).
            match attempt(Some(&mut buf)) {
                Ok(fd) => Ok(fd),
                Err(_) => {
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                    Err(LoadError { error, log: String::from_utf8_lossy(&buf[..end]).trim_end().to_owned() })
                }
            }
        }
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `BPF_OBJ_PIN`: makes `path` (on a bpffs) hold a reference to the object.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr { pathname: path.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0 };
    // SAFETY: `pathname` is a NUL-terminated string that outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// `BPF_OBJ_GET`: opens a pinned object (read-write).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `pathname` is a NUL-terminated string that outlives the call.
    unsafe { bpf(BPF_OBJ_GET, &mut attr) }.map(owned)
}

/// `BPF_MAP_GET_FD_BY_ID`.
pub fn map_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr { id, next_id: 0, open_flags: 0 };
    // SAFETY: an attribute without pointers.
    unsafe { bpf(BPF_MAP_GET_FD_BY_ID, &mut attr) }.map(owned)
}

/// `BPF_PROG_GET_FD_BY_ID`: `ENOENT` once nothing holds the program any more.
pub fn prog_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr { id, next_id: 0, open_flags: 0 };
    // SAFETY: an attribute without pointers.
    unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }.map(owned)
}

/// `BPF_OBJ_GET_INFO_BY_FD` for a map.
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut info = MapInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: map.as_raw_fd() as u32,
        info_len: size_of::<MapInfo>() as u32,
        info: &mut info as *mut MapInfo as u64,
    };
    // SAFETY: `info` is writable for `info_len` bytes during the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// `BPF_OBJ_GET_INFO_BY_FD` for a program, with the ids of the maps it uses.
pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    let mut ids = [0u32; 16];
    let mut raw =
        ProgInfoRaw { nr_map_ids: ids.len() as u32, map_ids: ids.as_mut_ptr() as u64, ..Default::default() };
    let mut attr = InfoAttr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of::<ProgInfoRaw>() as u32,
        info: &mut raw as *mut ProgInfoRaw as u64,
    };
    // SAFETY: `raw` is writable for `info_len` bytes and `map_ids` points at `nr_map_ids`
    // writable u32s; both live until the call returns. The other array pointers are null with
    // zero lengths, so the kernel writes nothing through them.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let n = (raw.nr_map_ids as usize).min(ids.len());
    Ok(ProgInfo {
        prog_type: raw.prog_type,
        id: raw.id,
        tag: raw.tag,
        map_ids: ids[..n].to_vec(),
        run_time_ns: raw.run_time_ns,
        run_cnt: raw.run_cnt,
        verified_insns: raw.verified_insns,
    })
}

/// `BPF_ENABLE_STATS` (`BPF_STATS_RUN_TIME`): every program's `run_time_ns` and `run_cnt`
/// count while the returned descriptor is open (the kernel's switch is a count of such
/// descriptors plus `kernel.bpf_stats_enabled`, so closing it restores what was).
pub fn enable_stats() -> io::Result<OwnedFd> {
    #[repr(C)]
    struct StatsAttr {
        stats_type: u32,
    }
    let mut attr = StatsAttr { stats_type: BPF_STATS_RUN_TIME };
    // SAFETY: an attribute without pointers.
    unsafe { bpf(BPF_ENABLE_STATS, &mut attr) }.map(owned)
}
