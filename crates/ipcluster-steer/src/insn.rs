//! eBPF instructions (`struct bpf_insn`) and a small assembler that resolves jump labels.
//!
//! Encoding (`include/uapi/linux/bpf.h`, `bpf_common.h`, Documentation/bpf/standardization/
//! instruction-set.rst): 8 bytes = opcode (class | size/source | mode/operation), a byte holding
//! the destination and source registers (4 bits each), a signed 16-bit offset and a signed 32-bit
//! immediate. Registers: r0 return value, r1–r5 arguments (clobbered by calls), r6–r9 preserved
//! across calls, r10 read-only frame pointer. A jump's offset counts instructions from the next
//! one.

use std::collections::BTreeMap;

// Instruction classes.
const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_JMP: u8 = 0x05;
const BPF_ALU: u8 = 0x04;
const BPF_ALU64: u8 = 0x07;
// Sizes (loads and stores).
const BPF_W: u8 = 0x00;
const BPF_DW: u8 = 0x18;
// Modes (loads and stores).
const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
// Operand source: immediate (K) or register (X).
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
// ALU operations.
pub const ADD: u8 = 0x00;
pub const SUB: u8 = 0x10;
pub const AND: u8 = 0x50;
pub const LSH: u8 = 0x60;
pub const RSH: u8 = 0x70;
pub const MOV: u8 = 0xb0;
const BPF_END: u8 = 0xd0;
const BPF_TO_BE: u8 = 0x08;
// Jump operations.
const JA: u8 = 0x00;
pub const JEQ: u8 = 0x10;
pub const JGT: u8 = 0x20;
pub const JNE: u8 = 0x50;
pub const JLT: u8 = 0xa0;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
/// `src_reg` of a 64-bit immediate load that the kernel replaces with a map pointer.
const BPF_PSEUDO_MAP_FD: u8 = 1;

/// A register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg(pub u8);
pub const R0: Reg = Reg(0);
pub const R1: Reg = Reg(1);
pub const R2: Reg = Reg(2);
pub const R3: Reg = Reg(3);
pub const R4: Reg = Reg(4);
pub const R5: Reg = Reg(5);
pub const R6: Reg = Reg(6);
pub const R7: Reg = Reg(7);
pub const R8: Reg = Reg(8);
pub const R9: Reg = Reg(9);
/// The frame pointer; the stack is the 512 bytes below it.
pub const R10: Reg = Reg(10);

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    fn new(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Self {
        // `__u8 dst_reg:4; __u8 src_reg:4;`: the first bit-field takes the low bits on
        // little-endian ABIs and the high bits on big-endian ones.
        let regs = if cfg!(target_endian = "little") { dst.0 | (src.0 << 4) } else { (dst.0 << 4) | src.0 };
        Self { code, regs, off, imm }
    }
}

/// Builds a program; jumps name their target label, resolved by [`Asm::finish`].
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: BTreeMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn push(&mut self, insn: Insn) -> &mut Self {
        self.insns.push(insn);
        self
    }

    /// Marks the next instruction as `name`.
    pub fn label(&mut self, name: &'static str) -> &mut Self {
        let prev = self.labels.insert(name, self.insns.len());
        assert!(prev.is_none(), "label {name} defined twice");
        self
    }

    /// `dst op= imm` (64-bit).
    pub fn alu_imm(&mut self, op: u8, dst: Reg, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | op | BPF_K, dst, R0, 0, imm))
    }

    /// `dst op= src` (64-bit).
    pub fn alu_reg(&mut self, op: u8, dst: Reg, src: Reg) -> &mut Self {
        self.push(Insn::new(BPF_ALU64 | op | BPF_X, dst, src, 0, 0))
    }

    /// `dst = imm`.
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.alu_imm(MOV, dst, imm)
    }

    /// `dst = src`.
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.alu_reg(MOV, dst, src)
    }

    /// `dst = be32(dst)`: the low 32 bits read as big-endian (network order) become the number
    /// they encode; the upper 32 bits are cleared. A byte swap on little-endian hosts.
    pub fn be32(&mut self, dst: Reg) -> &mut Self {
        self.push(Insn::new(BPF_ALU | BPF_END | BPF_TO_BE, dst, R0, 0, 32))
    }

    /// `dst = *(u32 *)(src + off)`.
    pub fn load32(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(Insn::new(BPF_LDX | BPF_MEM | BPF_W, dst, src, off, 0))
    }

    /// `dst = *(u64 *)(src + off)`.
    pub fn load64(&mut self, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(Insn::new(BPF_LDX | BPF_MEM | BPF_DW, dst, src, off, 0))
    }

    /// `*(u32 *)(dst + off) = src`.
    pub fn store32(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(Insn::new(BPF_STX | BPF_MEM | BPF_W, dst, src, off, 0))
    }

    /// `*(u64 *)(dst + off) = src`.
    pub fn store64(&mut self, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(Insn::new(BPF_STX | BPF_MEM | BPF_DW, dst, src, off, 0))
    }

    /// `*(u64 *)(dst + off) = imm` (sign-extended).
    pub fn store64_imm(&mut self, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ST | BPF_MEM | BPF_DW, dst, R0, off, imm))
    }

    /// `*(u32 *)(dst + off) = imm`.
    pub fn store32_imm(&mut self, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.push(Insn::new(BPF_ST | BPF_MEM | BPF_W, dst, R0, off, imm))
    }

    /// `dst = map` (a two-slot 64-bit immediate load; the kernel swaps the fd for the map).
    pub fn load_map_fd(&mut self, dst: Reg, fd: i32) -> &mut Self {
        self.push(Insn::new(BPF_LD | BPF_DW | BPF_IMM, dst, Reg(BPF_PSEUDO_MAP_FD), 0, fd));
        self.push(Insn::new(0, R0, R0, 0, 0))
    }

    /// `call helper` (arguments in r1–r5, result in r0).
    pub fn call(&mut self, helper: i32) -> &mut Self {
        self.push(Insn::new(BPF_JMP | CALL, R0, R0, 0, helper))
    }

    /// `if dst op imm goto label` (64-bit comparison; unsigned for `JLT`).
    pub fn jmp_imm(&mut self, op: u8, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(Insn::new(BPF_JMP | op | BPF_K, dst, R0, 0, imm))
    }

    /// `if dst op src goto label` (64-bit comparison; unsigned for `JGT` and `JLT`).
    pub fn jmp_reg(&mut self, op: u8, dst: Reg, src: Reg, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(Insn::new(BPF_JMP | op | BPF_X, dst, src, 0, 0))
    }

    /// `goto label`.
    pub fn ja(&mut self, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(Insn::new(BPF_JMP | JA, R0, R0, 0, 0))
    }

    /// `return r0`.
    pub fn exit(&mut self) -> &mut Self {
        self.push(Insn::new(BPF_JMP | EXIT, R0, R0, 0, 0))
    }

    /// The instructions, with every jump's offset filled in.
    pub fn finish(&mut self) -> Vec<Insn> {
        for &(at, label) in &self.fixups {
            let target = *self.labels.get(label).unwrap_or_else(|| panic!("undefined label {label}"));
            let off = target as isize - at as isize - 1;
            self.insns[at].off = i16::try_from(off).expect("jump too far");
        }
        std::mem::take(&mut self.insns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_the_kernel_headers_say() {
        // Opcodes from include/uapi/linux/bpf.h: BPF_LD|BPF_IMM|BPF_DW = 0x18,
        // BPF_ALU|BPF_END|BPF_TO_BE = 0xdc, BPF_JMP|BPF_CALL = 0x85, BPF_JMP|BPF_EXIT = 0x95.
        let insns = Asm::default().load_map_fd(R1, 7).be32(R8).call(82).exit().finish();
        assert_eq!(insns[0].code, 0x18);
        assert_eq!(insns[0].imm, 7);
        assert_eq!(insns[2].code, 0xdc);
        assert_eq!(insns[2].imm, 32);
        assert_eq!(insns[3].code, 0x85);
        assert_eq!(insns[4].code, 0x95);
        if cfg!(target_endian = "little") {
            assert_eq!(insns[0].regs, 0x11, "dst r1, src BPF_PSEUDO_MAP_FD");
        }
    }

    #[test]
    fn jumps_count_from_the_next_instruction() {
        let insns =
            Asm::default().jmp_imm(JEQ, R0, 0, "end").mov_imm(R0, 1).ja("end").label("end").exit().finish();
        assert_eq!(insns[0].off, 2);
        assert_eq!(insns[2].off, 0);
    }
}
