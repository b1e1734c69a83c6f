//! The `sk_reuseport` program, written out instruction by instruction, the layout of the words
//! it reads, and the band fallback it applies ([`select_in`]; the whole decision is modelled in
//! [`crate::model`], which the tests hold the kernel to).
//!
//! ```text
//!  ; r6 = ctx (struct sk_reuseport_md *), r7 = the chosen sockarray, r8 = the client's address
//!  ; word (host order), r9 = the session record, then the mask, then the scan key.
//!  ; Stack: KEY fp-16..-1 (the client's 16-byte address, IPv4 as ::ffff:a.b.c.d; its last
//!  ; word at fp-4), SEL fp-20 (a u32 map key), SLOT fp-24, NOW fp-32, TIMEOUT fp-40,
//!  ; REC fp-56..-41 = {slot u32, epoch u32, last seen u64}, the sessions map's value.
//!      r6 = r1
//!      r2 = *(u64 *)(r6 + 48)                 ; ctx->migrating_sk
//!      if r2 == 0 goto packet                 ; a new connection: read its SYN
//!      ; a request or unaccepted child leaving a closed listener: the packet may be absent
//!      ; (the kernel then passes an empty skb), so read the client off the socket
//!      r1 = *(u32 *)(r2 + 4)                  ; migrating_sk->family
//!      if r1 != AF_INET6 goto sk4             ; (IPv6 first: the verifier explores fall-
//!      r1 = *(u32 *)(r2 + 56) ; *(u32 *)(r10 - 16) = r1   ; throughs first, and the mapped
//!      r1 = *(u32 *)(r2 + 60) ; *(u32 *)(r10 - 12) = r1   ; paths' states, with constants
//!      r1 = *(u32 *)(r2 + 64) ; *(u32 *)(r10 - 8) = r1    ; in KEY, are pruned against
//!      r1 = *(u32 *)(r2 + 68) ; *(u32 *)(r10 - 4) = r1    ; theirs) ->dst_ip6[0..3]: a v4
//!      goto have_key                          ; client of a [::] socket has ::ffff:a.b.c.d
//!  sk4:
//!      r1 = *(u32 *)(r2 + 52) ; *(u32 *)(r10 - 4) = r1    ; ->dst_ip4
//!      goto mapped
//!  packet:
//!      r2 = *(u32 *)(r6 + 20)                 ; ctx->eth_protocol (network order)
//!      if r2 == htons(ETH_P_IP) goto packet4
//!      if r2 != htons(ETH_P_IPV6) goto drop
//!      r1 = r6 ; r2 = 8 ; r3 = r10 ; r3 += -16 ; r4 = 16 ; r5 = BPF_HDR_START_NET
//!      call bpf_skb_load_bytes_relative       ; the IPv6 source into KEY
//!      if r0 != 0 goto drop
//!      goto have_key
//!  packet4:
//!      r1 = r6 ; r2 = 12 ; r3 = r10 ; r3 += -4 ; r4 = 4 ; r5 = BPF_HDR_START_NET
//!      call bpf_skb_load_bytes_relative       ; the IPv4 source into KEY's last word
//!      if r0 != 0 goto drop
//!  mapped:
//!      *(u64 *)(r10 - 16) = 0 ; *(u32 *)(r10 - 8) = bytes 00 00 ff ff
//!  have_key:
//!      r8 = *(u32 *)(r10 - 4) ; r8 = be32 r8  ; the address word as a number
//!      ; --- a probe: an IPv4 source in 127.253.0.0/16 names a slot (bits 10..12) and a band
//!      ; (bits 0..9): exactly that socket, or refused; no session looked up or recorded
//!      r1 = *(u64 *)(r10 - 16)
//!      if r1 != 0 goto lookup
//!      r1 = *(u32 *)(r10 - 8) ; r1 = be32 r1
//!      if r1 != 0xffff goto lookup
//!      r1 = r8 ; r1 >>= 16
//!      if r1 != 0x7ffd goto lookup
//!      r1 = r8 ; r1 >>= 10 ; r1 &= 7 ; *(u32 *)(r10 - 20) = r1
//!      r0 = bpf_map_lookup_elem(map[slots], r10 - 20)      ; that slot's sockarray, or NULL
//!      if r0 == 0 goto drop
//!      r7 = r0
//!      r1 = r8 ; r1 &= 1023 ; *(u32 *)(r10 - 20) = r1
//!      r0 = bpf_sk_select_reuseport(r6, r7, r10 - 20, 0)
//!      if r0 == 0 goto pass
//!      goto drop
//!  lookup:                                    ; --- a client with a session
//!      *(u32 *)(r10 - 20) = 0
//!      r0 = bpf_map_lookup_elem(map[config], r10 - 20)
//!      if r0 == 0 goto drop
//!      r1 = *(u64 *)(r0 + 0) ; *(u64 *)(r10 - 40) = r1   ; TIMEOUT (ns)
//!      if r1 == 0 goto new_client             ; session affinity off: no lookup, no record
//!      call bpf_ktime_get_ns ; *(u64 *)(r10 - 32) = r0    ; NOW
//!      r0 = bpf_map_lookup_elem(map[sessions], r10 - 16)  ; the client's record, or NULL
//!      if r0 == 0 goto new_client
//!      r9 = r0
//!      r1 = *(u32 *)(r9 + 0) ; *(u32 *)(r10 - 20) = r1    ; its slot
//!      r0 = bpf_map_lookup_elem(map[slot_info], r10 - 20)
//!      if r0 == 0 goto new_client             ; (a slot out of range)
//!      r1 = *(u32 *)(r0 + 0)                  ; the slot's info: epoch << 4 | log2(bands)
//!      r2 = r1 ; r2 >>= 4 ; r3 = *(u32 *)(r9 + 4)
//!      if r2 != r3 goto new_client            ; recorded for the slot's previous table
//!      r1 &= 15 ; r2 = 1 ; r2 <<= r1 ; r2 += -1 ; r2 &= r8 ; r2 &= 1023
//!      *(u32 *)(r10 - 24) = r2                ; the client's band in that generation
//!      r1 = *(u64 *)(r10 - 32) ; r2 = *(u64 *)(r9 + 8) ; r1 -= r2
//!      r2 = *(u64 *)(r10 - 40)
//!      if r1 > r2 goto new_client             ; idle for longer than the timeout
//!      r0 = bpf_map_lookup_elem(map[slots], r10 - 20)
//!      if r0 == 0 goto new_client             ; the slot was emptied
//!      r7 = r0
//!      r1 = *(u32 *)(r10 - 24) ; *(u32 *)(r10 - 20) = r1
//!      r0 = bpf_sk_select_reuseport(r6, r7, r10 - 20, 0)  ; exactly that band
//!      if r0 != 0 goto new_client             ; its worker is gone: a new client
//!      r1 = *(u64 *)(r10 - 32) ; *(u64 *)(r9 + 8) = r1    ; refreshed in place
//!      goto pass
//!  new_client:                                ; --- the live generation, or a band's override
//!      *(u32 *)(r10 - 20) = 0
//!      r0 = bpf_map_lookup_elem(map[control], r10 - 20)
//!      if r0 == 0 goto drop
//!      r1 = *(u32 *)(r0 + 0)                  ; control: live slot | log2(bands) << 8
//!      r2 = r1 ; r2 &= 255 ; *(u32 *)(r10 - 24) = r2      ; SLOT: the live one
//!      r1 >>= 8 ; r1 &= 15 ; r9 = 1 ; r9 <<= r1 ; r9 += -1 ; r9 &= 1023   ; the mask
//!      r1 = r8 ; r1 &= r9 ; *(u32 *)(r10 - 20) = r1       ; the band
//!      r0 = bpf_map_lookup_elem(map[overrides], r10 - 20)
//!      if r0 == 0 goto live
//!      r1 = *(u32 *)(r0 + 0)
//!      if r1 == 0 goto live                   ; 0: no override, s + 1: slot s
//!      r1 += -1 ; *(u32 *)(r10 - 20) = r1
//!      r0 = bpf_map_lookup_elem(map[slots], r10 - 20)
//!      if r0 == 0 goto live                   ; an override to an empty slot: the live one
//!      r7 = r0
//!      r1 = *(u32 *)(r10 - 20) ; *(u32 *)(r10 - 24) = r1  ; SLOT: the override's
//!      goto chosen
//!  live:
//!      r1 = *(u32 *)(r10 - 24) ; *(u32 *)(r10 - 20) = r1
//!      r0 = bpf_map_lookup_elem(map[slots], r10 - 20)
//!      if r0 == 0 goto drop                   ; nothing live (cleared): refuse
//!      r7 = r0
//!  chosen:                                    ; REC.slot, REC.epoch: SLOT and its epoch
//!      r1 = *(u32 *)(r10 - 24) ; *(u32 *)(r10 - 56) = r1 ; *(u32 *)(r10 - 20) = r1
//!      r0 = bpf_map_lookup_elem(map[slot_info], r10 - 20)
//!      if r0 == 0 goto drop
//!      r1 = *(u32 *)(r0 + 0) ; r1 >>= 4 ; *(u32 *)(r10 - 52) = r1
//!  try_mask:                                  ; keys word & mask, & mask/2, ..., & 0
//!      r1 = r8 ; r1 &= r9 ; *(u32 *)(r10 - 20) = r1
//!      r0 = bpf_sk_select_reuseport(r6, r7, r10 - 20, 0)
//!      if r0 == 0 goto selected
//!      if r9 == 0 goto scan
//!      r9 >>= 1
//!      goto try_mask
//!  scan:                                      ; band 0 and every "ancestor" are empty:
//!      r9 = 1                                 ; the lowest filled key 1..1023
//!  scan_next:
//!      *(u32 *)(r10 - 20) = r9
//!      r0 = bpf_sk_select_reuseport(r6, r7, r10 - 20, 0)
//!      if r0 == 0 goto selected
//!      r9 += 1
//!      if r9 < 1024 goto scan_next
//!  drop:
//!      r0 = SK_DROP ; exit                    ; nothing selectable: refuse, never the hash
//!  selected:                                  ; (the timeout and the time read again here,
//!      *(u32 *)(r10 - 20) = 0                 ;  not kept from above: the loops' states then
//!      r0 = bpf_map_lookup_elem(map[config], r10 - 20)   ;  match on every path, and the
//!      if r0 == 0 goto pass                   ;  verifier walks the scan out less often)
//!      r1 = *(u64 *)(r0 + 0)
//!      if r1 == 0 goto pass                   ; sessions off: nothing recorded
//!      call bpf_ktime_get_ns ; *(u64 *)(r10 - 48) = r0    ; REC.last seen
//!      r1 = map[sessions] ; r2 = r10 ; r2 += -16 ; r3 = r10 ; r3 += -56 ; r4 = BPF_ANY
//!      call bpf_map_update_elem               ; record (or replace) the client's session
//!  pass:
//!      r0 = SK_PASS ; exit                    ; the kernel uses the selected socket
//! ```
//!
//! `r0 = bpf_map_lookup_elem(map[m], r10 + k)` stands for `r1 = map[m] ; r2 = r10 ; r2 += k ;
//! call bpf_map_lookup_elem` (array lookups are inlined by the verifier), and
//! `bpf_sk_select_reuseport(r6, r7, r10 - 20, 0)` for the four moves and the call.
//!
//! Both loops are bounded (the mask is at most 1023 and halves; the scan counts to 1023), so the
//! verifier walks them out: about 34,000 instructions processed (limit 1,000,000), 11 ms to
//! load here (15–25 ms under load).

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::{
    MAX_BANDS,
    insn::{
        ADD, AND, Asm, Insn, JEQ, JGT, JLT, JNE, LSH, R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10, RSH, SUB,
    },
};

// Helper function ids (`enum bpf_func_id` / `___BPF_FUNC_MAPPER`).
pub(crate) const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_MAP_UPDATE_ELEM: i32 = 2;
const BPF_FUNC_KTIME_GET_NS: i32 = 5;
pub(crate) const BPF_FUNC_SKB_LOAD_BYTES_RELATIVE: i32 = 68;
pub(crate) const BPF_FUNC_SK_SELECT_REUSEPORT: i32 = 82;
/// `bpf_skb_load_bytes_relative`'s `start_header`: offsets count from the network header.
pub(crate) const BPF_HDR_START_NET: i32 = 1;
// `enum sk_action`.
pub(crate) const SK_DROP: i32 = 0;
pub(crate) const SK_PASS: i32 = 1;
// `struct sk_reuseport_md` field offsets.
pub(crate) const MD_ETH_PROTOCOL: i16 = 20;
pub(crate) const MD_MIGRATING_SK: i16 = 48;
// `struct bpf_sock` field offsets.
pub(crate) const SOCK_FAMILY: i16 = 4;
pub(crate) const SOCK_DST_IP4: i16 = 52;
pub(crate) const SOCK_DST_IP6: i16 = 56;
/// `skb->protocol` is big-endian; the register holds its two bytes as a native u16.
pub(crate) const ETH_P_IP_NET: i32 = 0x0800u16.to_be() as i32;
pub(crate) const ETH_P_IPV6_NET: i32 = 0x86DDu16.to_be() as i32;
/// Source address offsets in the IPv4 and IPv6 headers.
pub(crate) const IPV4_SADDR: i32 = 12;
const IPV6_SADDR: i32 = 8;
// Stack slots below the frame pointer.
const KEY: i16 = -16;
const KEY_LAST: i16 = -4;
const SEL: i16 = -20;
const SLOT: i16 = -24;
const NOW: i16 = -32;
const TIMEOUT: i16 = -40;
const REC: i16 = -56;
// `struct Record` field offsets (the sessions map's value).
const REC_SLOT: i16 = 0;
const REC_EPOCH: i16 = 4;
const REC_LAST: i16 = 8;

/// The control word's slot when nothing is live: no table there, so new clients are refused.
pub(crate) const CONTROL_NONE: u32 = 0xff;
/// Bits of a slot-info word below its epoch: the log2 of the slot's band count.
pub(crate) const INFO_LOG2_BITS: u32 = 4;
/// Epochs count modulo 2^28 (the bits of a slot-info word above the band count).
pub(crate) const EPOCH_MASK: u32 = u32::MAX >> INFO_LOG2_BITS;
/// The probe range, 127.253.0.0/16, as its top 16 bits.
pub(crate) const PROBE_PREFIX: u32 = 0x7ffd;
/// The probe address's slot: bits 10..12 of the address.
pub(crate) const PROBE_SLOT_SHIFT: u32 = 10;

/// The control word for `slot` live with `2^log2` bands.
pub(crate) fn control_word(slot: u32, log2: u32) -> u32 {
    slot | log2 << 8
}

/// A slot-info word.
pub(crate) fn info_word(epoch: u32, log2: u32) -> u32 {
    (epoch & EPOCH_MASK) << INFO_LOG2_BITS | log2
}

/// `bands.ilog2()` for a power of two in `1..=MAX_BANDS`, else `None`.
pub(crate) fn log2_of(bands: u32) -> Option<u32> {
    (bands.is_power_of_two() && bands <= MAX_BANDS).then(|| bands.ilog2())
}

/// The maps the program reads (and the sessions map, which it writes).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Maps<'a> {
    pub slots: BorrowedFd<'a>,
    pub control: BorrowedFd<'a>,
    pub slot_info: BorrowedFd<'a>,
    pub overrides: BorrowedFd<'a>,
    pub sessions: BorrowedFd<'a>,
    pub config: BorrowedFd<'a>,
}

/// The program's instructions for the given maps.
pub(crate) fn steering_program(m: &Maps<'_>) -> Vec<Insn> {
    let mapped = i32::from_ne_bytes([0, 0, 0xff, 0xff]);
    let mut a = Asm::default();
    a.mov(R6, R1).load64(R2, R6, MD_MIGRATING_SK).jmp_imm(JEQ, R2, 0, "packet");
    // (The IPv6 paths come first: the verifier explores fall-throughs first, and the states
    // of the mapped paths, with constants in KEY, are then pruned against theirs.)
    a.load32(R1, R2, SOCK_FAMILY).jmp_imm(JNE, R1, libc::AF_INET6, "sk4");
    for word in 0..4 {
        a.load32(R1, R2, SOCK_DST_IP6 + 4 * word).store32(R10, KEY + 4 * word, R1);
    }
    a.ja("have_key");
    a.label("sk4").load32(R1, R2, SOCK_DST_IP4).store32(R10, KEY_LAST, R1).ja("mapped");
    a.label("packet").load32(R2, R6, MD_ETH_PROTOCOL).jmp_imm(JEQ, R2, ETH_P_IP_NET, "packet4").jmp_imm(
        JNE,
        R2,
        ETH_P_IPV6_NET,
        "drop",
    );
    load_source(&mut a, IPV6_SADDR, KEY, 16).ja("have_key");
    a.label("packet4");
    load_source(&mut a, IPV4_SADDR, KEY_LAST, 4);
    a.label("mapped").store64_imm(R10, KEY, 0).store32_imm(R10, KEY + 8, mapped);
    a.label("have_key").load32(R8, R10, KEY_LAST).be32(R8);

    // The probe path.
    a.load64(R1, R10, KEY)
        .jmp_imm(JNE, R1, 0, "lookup")
        .load32(R1, R10, KEY + 8)
        .be32(R1)
        .jmp_imm(JNE, R1, 0xffff, "lookup")
        .mov(R1, R8)
        .alu_imm(RSH, R1, 16)
        .jmp_imm(JNE, R1, PROBE_PREFIX as i32, "lookup")
        .mov(R1, R8)
        .alu_imm(RSH, R1, PROBE_SLOT_SHIFT as i32)
        .alu_imm(AND, R1, 7)
        .store32(R10, SEL, R1);
    lookup(&mut a, m.slots, SEL).jmp_imm(JEQ, R0, 0, "drop").mov(R7, R0);
    a.mov(R1, R8).alu_imm(AND, R1, (MAX_BANDS - 1) as i32).store32(R10, SEL, R1);
    select_key(&mut a).jmp_imm(JEQ, R0, 0, "pass").ja("drop");

    // A client with a session.
    a.label("lookup").store32_imm(R10, SEL, 0);
    lookup(&mut a, m.config, SEL)
        .jmp_imm(JEQ, R0, 0, "drop")
        .load64(R1, R0, 0)
        .store64(R10, TIMEOUT, R1)
        .jmp_imm(JEQ, R1, 0, "new_client")
        .call(BPF_FUNC_KTIME_GET_NS)
        .store64(R10, NOW, R0);
    lookup(&mut a, m.sessions, KEY)
        .jmp_imm(JEQ, R0, 0, "new_client")
        .mov(R9, R0)
        .load32(R1, R9, REC_SLOT)
        .store32(R10, SEL, R1);
    lookup(&mut a, m.slot_info, SEL)
        .jmp_imm(JEQ, R0, 0, "new_client")
        .load32(R1, R0, 0)
        .mov(R2, R1)
        .alu_imm(RSH, R2, INFO_LOG2_BITS as i32)
        .load32(R3, R9, REC_EPOCH)
        .jmp_reg(JNE, R2, R3, "new_client")
        .alu_imm(AND, R1, 15)
        .mov_imm(R2, 1)
        .alu_reg(LSH, R2, R1)
        .alu_imm(ADD, R2, -1)
        .alu_reg(AND, R2, R8)
        .alu_imm(AND, R2, (MAX_BANDS - 1) as i32)
        .store32(R10, SLOT, R2)
        .load64(R1, R10, NOW)
        .load64(R2, R9, REC_LAST)
        .alu_reg(SUB, R1, R2)
        .load64(R2, R10, TIMEOUT)
        .jmp_reg(JGT, R1, R2, "new_client");
    lookup(&mut a, m.slots, SEL)
        .jmp_imm(JEQ, R0, 0, "new_client")
        .mov(R7, R0)
        .load32(R1, R10, SLOT)
        .store32(R10, SEL, R1);
    select_key(&mut a)
        .jmp_imm(JNE, R0, 0, "new_client")
        .load64(R1, R10, NOW)
        .store64(R9, REC_LAST, R1)
        .ja("pass");

    // A new client: the live generation, or its band's override.
    a.label("new_client").store32_imm(R10, SEL, 0);
    lookup(&mut a, m.control, SEL)
        .jmp_imm(JEQ, R0, 0, "drop")
        .load32(R1, R0, 0)
        .mov(R2, R1)
        .alu_imm(AND, R2, 0xff)
        .store32(R10, SLOT, R2)
        .alu_imm(RSH, R1, 8)
        .alu_imm(AND, R1, 15)
        .mov_imm(R9, 1)
        .alu_reg(LSH, R9, R1)
        .alu_imm(ADD, R9, -1)
        .alu_imm(AND, R9, (MAX_BANDS - 1) as i32)
        .mov(R1, R8)
        .alu_reg(AND, R1, R9)
        .store32(R10, SEL, R1);
    lookup(&mut a, m.overrides, SEL)
        .jmp_imm(JEQ, R0, 0, "live")
        .load32(R1, R0, 0)
        .jmp_imm(JEQ, R1, 0, "live")
        .alu_imm(ADD, R1, -1)
        .store32(R10, SEL, R1);
    lookup(&mut a, m.slots, SEL)
        .jmp_imm(JEQ, R0, 0, "live")
        .mov(R7, R0)
        .load32(R1, R10, SEL)
        .store32(R10, SLOT, R1)
        .ja("chosen");
    a.label("live").load32(R1, R10, SLOT).store32(R10, SEL, R1);
    lookup(&mut a, m.slots, SEL).jmp_imm(JEQ, R0, 0, "drop").mov(R7, R0);
    a.label("chosen").load32(R1, R10, SLOT).store32(R10, REC + REC_SLOT, R1).store32(R10, SEL, R1);
    lookup(&mut a, m.slot_info, SEL)
        .jmp_imm(JEQ, R0, 0, "drop")
        .load32(R1, R0, 0)
        .alu_imm(RSH, R1, INFO_LOG2_BITS as i32)
        .store32(R10, REC + REC_EPOCH, R1);
    a.label("try_mask").mov(R1, R8).alu_reg(AND, R1, R9).store32(R10, SEL, R1);
    select_key(&mut a)
        .jmp_imm(JEQ, R0, 0, "selected")
        .jmp_imm(JEQ, R9, 0, "scan")
        .alu_imm(RSH, R9, 1)
        .ja("try_mask");
    a.label("scan").mov_imm(R9, 1);
    a.label("scan_next").store32(R10, SEL, R9);
    select_key(&mut a).jmp_imm(JEQ, R0, 0, "selected").alu_imm(ADD, R9, 1).jmp_imm(
        JLT,
        R9,
        MAX_BANDS as i32,
        "scan_next",
    );
    a.label("drop").mov_imm(R0, SK_DROP).exit();
    a.label("selected").store32_imm(R10, SEL, 0);
    lookup(&mut a, m.config, SEL)
        .jmp_imm(JEQ, R0, 0, "pass")
        .load64(R1, R0, 0)
        .jmp_imm(JEQ, R1, 0, "pass")
        .call(BPF_FUNC_KTIME_GET_NS)
        .store64(R10, REC + REC_LAST, R0);
    a.load_map_fd(R1, m.sessions.as_raw_fd())
        .mov(R2, R10)
        .alu_imm(ADD, R2, KEY.into())
        .mov(R3, R10)
        .alu_imm(ADD, R3, REC.into())
        .mov_imm(R4, crate::sys::BPF_ANY as i32)
        .call(BPF_FUNC_MAP_UPDATE_ELEM);
    a.label("pass").mov_imm(R0, SK_PASS).exit();
    a.finish()
}

/// `bpf_skb_load_bytes_relative(ctx, offset, r10 + to, len, BPF_HDR_START_NET)`; refuses the
/// connection when it fails.
fn load_source(a: &mut Asm, offset: i32, to: i16, len: i32) -> &mut Asm {
    a.mov(R1, R6)
        .mov_imm(R2, offset)
        .mov(R3, R10)
        .alu_imm(ADD, R3, to.into())
        .mov_imm(R4, len)
        .mov_imm(R5, BPF_HDR_START_NET)
        .call(BPF_FUNC_SKB_LOAD_BYTES_RELATIVE)
        .jmp_imm(JNE, R0, 0, "drop")
}

/// `r0 = bpf_map_lookup_elem(map, r10 + key)`.
fn lookup<'a>(a: &'a mut Asm, map: BorrowedFd<'_>, key: i16) -> &'a mut Asm {
    a.load_map_fd(R1, map.as_raw_fd())
        .mov(R2, R10)
        .alu_imm(ADD, R2, key.into())
        .call(BPF_FUNC_MAP_LOOKUP_ELEM)
}

/// `bpf_sk_select_reuseport(ctx, r7, r10 + SEL, 0)`.
fn select_key(a: &mut Asm) -> &mut Asm {
    a.mov(R1, R6)
        .mov(R2, R7)
        .mov(R3, R10)
        .alu_imm(ADD, R3, SEL.into())
        .mov_imm(R4, 0)
        .call(BPF_FUNC_SK_SELECT_REUSEPORT)
}

/// What the program selects in a table for a new client whose address word is `addr`
/// ([`crate::addr_word`]), when the generation has `bands` bands (a power of two ≤
/// [`MAX_BANDS`]), given which sockarray entries hold a socket: the band `addr & (bands-1)`
/// when its entry is filled, else the first filled of `addr & (bands/2-1)`, `addr &
/// (bands/4-1)`, …, `0`, else the lowest filled entry, else `None` (the connection is refused).
///
/// A table that fills only entries below `bands` (every table the daemon builds) gets from
/// this exactly what [`select`] gives, which starts at 1,024 bands: the masks above `bands-1`
/// only name empty entries or the same ones.
pub fn select_in(addr: u32, bands: u32, filled: impl Fn(u32) -> bool) -> Option<u32> {
    let mut mask = bands.clamp(1, MAX_BANDS).next_power_of_two() - 1;
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

/// [`select_in`] with [`MAX_BANDS`] bands: what the program selects in a generation put in
/// its slot with [`crate::Steering::stage`] or [`crate::Steering::switch_to`] (which do not
/// say the band count), and what the first version of the program selected in every table.
/// For a generation that fills entries `0..N`, the first success is exactly `addr & (N-1)`.
pub fn select(addr: u32, filled: impl Fn(u32) -> bool) -> Option<u32> {
    select_in(addr, MAX_BANDS, filled)
}

#[cfg(test)]
mod tests;
