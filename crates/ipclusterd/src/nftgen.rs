//! The nf_tables generation id: a counter the kernel bumps on every committed ruleset change
//! in this network namespace (any table, any family, any tool: iptables-nft, nft, firewalld).
//!
//! The periodic rule check ([`crate::netfilter`]) asks for it before anything else: while it
//! has not moved since a read that found our rules as they should be, nothing can have changed
//! them, and no `iptables-save` is forked. One request and one answer on a netlink socket
//! (`NFT_MSG_GETGEN`, which `nft monitor` and iptables-nft use themselves) cost a few
//! microseconds, where a fork and parse of ~1,100 rules cost tens of milliseconds.
//!
//! **Why a module of our own.** The request is 20 bytes and the answer one attribute. The
//! crates that speak nf_tables either need the C library libnftnl (nftnl), are GPL-licensed
//! (rustables), or bring an async netlink stack for a typed ruleset API we do not use; the
//! socket calls come from rustix, which the daemon already uses, so there is no `unsafe` here.
//!
//! **Only for iptables-nft.** iptables-legacy's tables are not nf_tables: their changes do not
//! move the counter, so with it ([`counts_iptables`] false) the check keeps reading every time.

use std::{path::Path, time::Duration};

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, netlink, sockopt};

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN` (linux/netfilter/nfnetlink.h, nf_tables.h).
const GETGEN: u16 = (10 << 8) | 16;
/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN`: the answer.
const NEWGEN: u16 = (10 << 8) | 15;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
/// `NFTA_GEN_ID`: the generation, a big-endian u32.
const NFTA_GEN_ID: u16 = 1;
/// A netlink message header (16 bytes) and a `struct nfgenmsg` (4 bytes).
const HEADER: usize = 16;
const NFGENMSG: usize = 4;

/// Whether the programs behind `save` write nf_tables (iptables-nft): Debian's
/// `/usr/sbin/iptables-save` is an alternatives link to `xtables-nft-multi` or
/// `xtables-legacy-multi`.
pub fn counts_iptables(save: &Path) -> bool {
    std::fs::canonicalize(save)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.contains("nft"))
}

/// The request: `NFT_MSG_GETGEN` for every family, sequence number `seq`.
pub fn request(seq: u32) -> [u8; HEADER + NFGENMSG] {
    let mut m = [0u8; HEADER + NFGENMSG];
    m[0..4].copy_from_slice(&((HEADER + NFGENMSG) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&GETGEN.to_ne_bytes());
    m[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    // Port id 0 (the kernel fills it in); nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0.
    m
}

/// The generation id in the kernel's answer to [`request`]`(seq)`.
pub fn parse(answer: &[u8], seq: u32) -> Result<u32, String> {
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]));
    let len = u32_at(answer, 0).ok_or("short netlink answer")? as usize;
    let kind = u16_at(answer, 4).ok_or("short netlink answer")?;
    let body = answer.get(HEADER..len.min(answer.len())).ok_or("short netlink answer")?;
    if u32_at(answer, 8) != Some(seq) {
        return Err("netlink answer to another request".into());
    }
    if kind == NLMSG_ERROR {
        let errno = u32_at(body, 0).map_or(0, |e| -(e as i32));
        return Err(format!("NFT_MSG_GETGEN: {}", std::io::Error::from_raw_os_error(errno)));
    }
    if kind != NEWGEN {
        return Err(format!("unexpected netlink message type {kind:#x}"));
    }
    // Attributes after the nfgenmsg: u16 length (header included), u16 type, payload padded
    // to 4 bytes.
    let mut at = NFGENMSG;
    while let (Some(alen), Some(atype)) = (u16_at(body, at), u16_at(body, at + 2)) {
        let alen = alen as usize;
        if alen < 4 {
            break;
        }
        if atype & 0x3fff == NFTA_GEN_ID
            && let Some(v) = body.get(at + 4..at + 8)
        {
            return Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        }
        at += (alen + 3) & !3;
    }
    Err("no NFTA_GEN_ID in the answer".into())
}

/// Asks the kernel for the current generation id of this network namespace (blocking, but
/// netlink answers within the send: a few microseconds).
pub fn current() -> Result<u32, String> {
    let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(netlink::NETFILTER))
        .map_err(|e| format!("netlink socket: {e}"))?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(1)))
        .map_err(|e| format!("netlink socket: {e}"))?;
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    rustix::net::send(&fd, &request(seq), SendFlags::empty()).map_err(|e| format!("netlink send: {e}"))?;
    let mut buf = [0u8; 512];
    let (got, _) =
        rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()).map_err(|e| format!("netlink recv: {e}"))?;
    parse(&buf[..got], seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as the kernel writes it: header, nfgenmsg, then the three attributes.
    fn answer(seq: u32, gen_id: u32) -> Vec<u8> {
        let mut body = vec![0, 0, 0, 0];
        let mut attr = |t: u16, payload: &[u8]| {
            body.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(payload);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        };
        attr(3, b"iptables-nft\0");
        attr(NFTA_GEN_ID, &gen_id.to_be_bytes());
        attr(2, &1234u32.to_be_bytes());
        let mut m = Vec::new();
        m.extend_from_slice(&((HEADER + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&NEWGEN.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn the_request_is_a_getgen_for_every_family() {
        let r = request(7);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 20);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 0x0a10);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        assert_eq!(&r[16..], &[0, 0, 0, 0]);
    }

    #[test]
    fn the_generation_is_found_among_the_attributes_and_errors_say_why() {
        assert_eq!(parse(&answer(7, 0x0102_0304), 7), Ok(0x0102_0304));
        assert!(parse(&answer(7, 1), 8).unwrap_err().contains("another request"));
        assert!(parse(&answer(7, 1)[..10], 7).is_err());
        let mut err = answer(7, 1);
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert!(parse(&err, 7).unwrap_err().contains("not permitted"), "{:?}", parse(&err, 7));
        let mut none = answer(7, 1);
        none.truncate(HEADER + NFGENMSG);
        none[0..4].copy_from_slice(&((HEADER + NFGENMSG) as u32).to_ne_bytes());
        assert!(parse(&none, 7).unwrap_err().contains("NFTA_GEN_ID"));
    }

    /// The kernel answers (read only: this host's rules are not touched; the tests run as
    /// root, as the daemon does), and the id never goes back.
    #[test]
    fn the_kernel_answers_a_getgen() {
        let a = current().expect("NFT_MSG_GETGEN");
        let b = current().expect("NFT_MSG_GETGEN");
        assert!(b.wrapping_sub(a) < 1 << 16, "{a} then {b}");
    }
}
