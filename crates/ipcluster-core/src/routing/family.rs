//! Address families and bands: which family's tables serve a `listen` entry, and which band a
//! client address is in (see "Bands" and "Families" in the module docs above).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{GUARD_JUMP, GUARD_JUMP_V6};

/// An address family: each has its own nat and filter tables, written by its own programs
/// (`iptables-restore`, `ip6tables-restore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Both, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The command-line program of this family (`iptables`, `ip6tables`); `-save` and
    /// `-restore` are appended for the others.
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// The filter jump rule of this family.
    pub fn guard_jump(self) -> &'static str {
        match self {
            Family::V4 => GUARD_JUMP,
            Family::V6 => GUARD_JUMP_V6,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The band of an IPv4 client address among `bands` (a power of two): its low bits.
pub fn band_of(addr: Ipv4Addr, bands: u32) -> u32 {
    u32::from(addr) & bands.wrapping_sub(1)
}

/// The band of an IPv6 client address among `bands` (a power of two): the low bits of its last
/// 32 bits, so `::ffff:a.b.c.d` (an IPv4 client of a dual-stack socket) is in `a.b.c.d`'s band.
pub fn band_of_v6(addr: Ipv6Addr, bands: u32) -> u32 {
    (u128::from(addr) as u32) & bands.wrapping_sub(1)
}

/// The band of a client address of either family: [`band_of`] or [`band_of_v6`]. The one
/// definition of bands: socket mode's steering program computes the same (its tests check it
/// against this).
pub fn band_of_ip(addr: IpAddr, bands: u32) -> u32 {
    match addr {
        IpAddr::V4(a) => band_of(a, bands),
        IpAddr::V6(a) => band_of_v6(a, bands),
    }
}

/// Where `family`'s table finds the connections of the `listen` entry `public`: `None` when
/// that family never carries them; `Some(None)` on every local address; `Some(Some(ip))` on
/// that address (of this family). See "Families" in the module docs.
pub fn served_by(family: Family, public: &SocketAddr) -> Option<Option<IpAddr>> {
    match (family, public.ip()) {
        (Family::V4, IpAddr::V4(ip)) => Some((!ip.is_unspecified()).then_some(IpAddr::V4(ip))),
        (Family::V4, IpAddr::V6(ip)) if ip.is_unspecified() => Some(None),
        (Family::V4, IpAddr::V6(ip)) => {
            ip.to_ipv4_mapped().map(|v4| (!v4.is_unspecified()).then_some(IpAddr::V4(v4)))
        }
        (Family::V6, IpAddr::V4(_)) => None,
        (Family::V6, IpAddr::V6(ip)) if ip.is_unspecified() => Some(None),
        (Family::V6, IpAddr::V6(ip)) => ip.to_ipv4_mapped().is_none().then_some(Some(IpAddr::V6(ip))),
    }
}
