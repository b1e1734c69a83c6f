//! The `sk_reuseport` program, written out instruction by instruction, and a Rust model of what
//! it selects ([`select`]) that the tests hold the kernel to.
//!
//! ```text
//!  ; r6 = ctx (struct sk_reuseport_md *), r7 = the generation's sockarray,
//!  ; r8 = the client's address word (host order), r9 = mask, then key
//!      r6 = r1
//!      *(u32 *)(r10 - 4) = 0                  ; key 0
//!      r2 = r10 ; r2 += -4
//!      r1 = map[active]
//!      call bpf_map_lookup_elem               ; -> &active slot number
//!      if r0 == 0 goto drop
//!      r1 = *(u32 *)(r0 + 0)
//!      *(u32 *)(r10 - 4) = r1                 ; key: the active slot
//!      r2 = r10 ; r2 += -4
//!      r1 = map[outer]
//!      call bpf_map_lookup_elem               ; -> that slot's sockarray, or NULL
//!      if r0 == 0 goto drop                   ; no generation (or cleared: slot 2)
//!      r7 = r0
//!      r2 = *(u64 *)(r6 + 48)                 ; ctx->migrating_sk
//!      if r2 == 0 goto packet                 ; a new connection: read its SYN
//!      ; a request or accepted-but-unaccepted child migrating off a closed listener: the
//!      ; packet may be absent (the kernel then passes an empty skb), so read the socket
//!      r1 = *(u32 *)(r2 + 4)                  ; migrating_sk->family
//!      r8 = *(u32 *)(r2 + 52)                 ; ->dst_ip4 (the client; network order)
//!      if r1 != AF_INET6 goto have_addr
//!      r8 = *(u32 *)(r2 + 68)                 ; ->dst_ip6[3] (a v4 client of a [::] socket
//!      goto have_addr                         ;   has ::ffff:a.b.c.d here, so a.b.c.d)
//!  packet:
//!      r2 = *(u32 *)(r6 + 20)                 ; ctx->eth_protocol (network order)
//!      r3 = 12                                ; IPv4: saddr at offset 12
//!      if r2 == htons(ETH_P_IP) goto load
//!      r3 = 20                                ; IPv6: saddr at 8, its last word at 20
//!      if r2 != htons(ETH_P_IPV6) goto drop
//!  load:
//!      r1 = r6 ; r2 = r3 ; r3 = r10 ; r3 += -8 ; r4 = 4 ; r5 = BPF_HDR_START_NET
//!      call bpf_skb_load_bytes_relative       ; 4 bytes of the network header into fp-8
//!      if r0 != 0 goto drop
//!      r8 = *(u32 *)(r10 - 8)
//!  have_addr:
//!      r8 = be32 r8                           ; the address word as a number
//!      r9 = 1023
//!  try_mask:                                  ; keys addr & 1023, & 511, ..., & 1, & 0
//!      r1 = r8 ; r1 &= r9 ; *(u32 *)(r10 - 4) = r1
//!      r1 = r6 ; r2 = r7 ; r3 = r10 ; r3 += -4 ; r4 = 0
//!      call bpf_sk_select_reuseport
//!      if r0 == 0 goto pass
//!      if r9 == 0 goto scan
//!      r9 >>= 1
//!      goto try_mask
//!  scan:                                      ; band 0 and every "ancestor" are empty:
//!      r9 = 1                                 ; the lowest filled key 1..1023
//!  scan_next:
//!      *(u32 *)(r10 - 4) = r9
//!      r1 = r6 ; r2 = r7 ; r3 = r10 ; r3 += -4 ; r4 = 0
//!      call bpf_sk_select_reuseport
//!      if r0 == 0 goto pass
//!      r9 += 1
//!      if r9 < 1024 goto scan_next
//!  drop:
//!      r0 = SK_DROP ; exit                    ; nothing selectable: refuse, never the hash
//!  pass:
//!      r0 = SK_PASS ; exit                    ; the kernel uses the selected socket
//! ```
//!
//! Both loops have constant bounds, so the verifier walks them out (11 and 1023 iterations).

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::{
    MAX_BANDS,
    insn::{ADD, AND, Asm, Insn, JEQ, JLT, JNE, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10, RSH},
};

// Helper function ids (`enum bpf_func_id` / `___BPF_FUNC_MAPPER`).
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_SKB_LOAD_BYTES_RELATIVE: i32 = 68;
const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;
/// `bpf_skb_load_bytes_relative`'s `start_header`: offsets count from the network header.
const BPF_HDR_START_NET: i32 = 1;
// `enum sk_action`.
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;
// `struct sk_reuseport_md` field offsets.
const MD_ETH_PROTOCOL: i16 = 20;
const MD_MIGRATING_SK: i16 = 48;
// `struct bpf_sock` field offsets.
const SOCK_FAMILY: i16 = 4;
const SOCK_DST_IP4: i16 = 52;
const SOCK_DST_IP6_LAST: i16 = 56 + 12;
/// `skb->protocol` is big-endian; the register holds its two bytes as a native u16.
const ETH_P_IP_NET: i32 = 0x0800u16.to_be() as i32;
const ETH_P_IPV6_NET: i32 = 0x86DDu16.to_be() as i32;
/// Source address offsets in the IPv4 header and of the last 32 bits in the IPv6 header.
const IPV4_SADDR: i32 = 12;
const IPV6_SADDR_LAST: i32 = 20;
// Stack slots below the frame pointer.
const KEY: i16 = -4;
const BUF: i16 = -8;

/// The program's instructions for the given outer map.
pub(crate) fn steering_program(active_map: BorrowedFd<'_>, outer_map: BorrowedFd<'_>) -> Vec<Insn> {
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
        .load32(R8, R2, SOCK_DST_IP6_LAST)
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
    select_key(&mut a)
        .jmp_imm(JEQ, R0, 0, "pass")
        .jmp_imm(JEQ, R9, 0, "scan")
        .alu_imm(RSH, R9, 1)
        .ja("try_mask");
    a.label("scan").mov_imm(R9, 1);
    a.label("scan_next").store32(R10, KEY, R9);
    select_key(&mut a).jmp_imm(JEQ, R0, 0, "pass").alu_imm(ADD, R9, 1).jmp_imm(
        JLT,
        R9,
        MAX_BANDS as i32,
        "scan_next",
    );
    a.label("drop").mov_imm(R0, SK_DROP).exit();
    a.label("pass").mov_imm(R0, SK_PASS).exit();
    a.finish()
}

/// `bpf_sk_select_reuseport(ctx, sockarray, &key, 0)`.
fn select_key(a: &mut Asm) -> &mut Asm {
    a.mov(R1, R6)
        .mov(R2, R7)
        .mov(R3, R10)
        .alu_imm(ADD, R3, KEY.into())
        .mov_imm(R4, 0)
        .call(BPF_FUNC_SK_SELECT_REUSEPORT)
}

/// What the program selects for a client whose address word is `addr`
/// ([`crate::addr_word`]), given which sockarray entries hold a socket: the band
/// `addr & (N-1)` when its entry is filled (for a generation that fills entries `0..N`), else
/// the first filled of `addr & (N/2-1)`, `addr & (N/4-1)`, …, `0`, else the lowest filled
/// entry, else `None` (the connection is refused).
pub fn select(addr: u32, filled: impl Fn(u32) -> bool) -> Option<u32> {
    let mut mask = MAX_BANDS - 1;
    loop {
        if filled(addr & mask) {
            return Some(addr & mask);
        }
        if mask == 0 {
            break;
        }
        mask >>= 1;
    }
    (1..MAX_BANDS).find(|&k| filled(k))
}

#[cfg(test)]
mod tests {
    use std::{os::fd::AsFd, time::Instant};

    use super::*;
    use crate::sys;

    /// Loading needs CAP_BPF and CAP_NET_ADMIN; it changes no namespace state.
    fn root(test: &str) -> bool {
        let root = nix::unistd::Uid::effective().is_root();
        if !root {
            // Straight to fd 2: libtest captures eprintln! of passing tests.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {test} needs root (loads eBPF programs) ***");
        }
        root
    }

    fn maps() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        let inner =
            sys::map_create(sys::BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, MAX_BANDS, None, "t_inner").unwrap();
        let outer = sys::map_create(sys::BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 2, Some(inner.as_fd()), "t_outer")
            .unwrap();
        (sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, 4, 1, None, "t_active").unwrap(), outer)
    }

    #[test]
    fn the_verifier_accepts_the_program() {
        if !root("the_verifier_accepts_the_program") {
            return;
        }
        let (active, outer) = maps();
        let insns = steering_program(active.as_fd(), outer.as_fd());
        let t = Instant::now();
        let loaded = sys::prog_load(
            sys::BPF_PROG_TYPE_SK_REUSEPORT,
            sys::BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
            &insns,
            "Apache-2.0",
            "ipc_steer",
        );
        let took = t.elapsed();
        assert_eq!(insns.len(), 68, "the crate docs give the program's size");
        if let Err(e) = &loaded {
            panic!("{}: {}", e.error, e.log);
        }
        eprintln!("steering program: {} instruction slots, loaded and verified in {took:?}", insns.len());
    }

    #[test]
    fn a_rejected_program_carries_the_verifier_log() {
        if !root("a_rejected_program_carries_the_verifier_log") {
            return;
        }
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
    }
}
