//! Instructions a PVM host's ring-0 emulator gives up on
//! (`KVM_EXIT_INTERNAL_ERROR`, emulation failure), run here instead.
//! See docs/pvm-hosts.md. Pure functions over the registers and the
//! instruction bytes, so every case is unit-tested without KVM.
use kvm_bindings::kvm_regs;

/// What the vCPU thread must do to finish the instruction.
#[derive(Debug, Clone, PartialEq)]
pub enum Assist {
    /// Write back the registers (RIP already past the instruction).
    Done(kvm_regs),
    /// Write back the registers, then inject this exception vector.
    Inject(kvm_regs, u8),
}

impl Assist {
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Assist::Inject(_, BP_VECTOR) => "int3",
            Assist::Inject(..) => "exception",
            Assist::Done(_) => "popcnt/clac/stac",
        }
    }
}

const BP_VECTOR: u8 = 3;

/// Flags that POPCNT clears (OF SF ZF AF PF CF) and the ZF bit it may set.
const ARITH_FLAGS: u64 = 0x8d5;
const ZF: u64 = 1 << 6;

/// Decides how to run the instruction at `regs.rip` (its bytes in `code`),
/// or None when it is not one we handle.
pub fn assist(regs: &kvm_regs, code: &[u8]) -> Option<Assist> {
    if code.first() == Some(&0xcc) {
        // int3 is a trap: #BP is delivered with RIP after the instruction.
        let mut r = *regs;
        r.rip = r.rip.wrapping_add(1);
        return Some(Assist::Inject(r, BP_VECTOR));
    }
    if let Some(r) = clac_stac(regs, code) {
        return Some(Assist::Done(r));
    }
    popcnt(regs, code).map(Assist::Done)
}

/// `clac` (0F 01 CA) and `stac` (0F 01 CB): clear or set RFLAGS.AC.
fn clac_stac(regs: &kvm_regs, code: &[u8]) -> Option<kvm_regs> {
    const AC: u64 = 1 << 18;
    let mut r = *regs;
    match code.get(..3)? {
        [0x0f, 0x01, 0xca] => r.rflags &= !AC,
        [0x0f, 0x01, 0xcb] => r.rflags |= AC,
        _ => return None,
    }
    r.rip = r.rip.wrapping_add(3);
    Some(r)
}

/// `popcnt reg, reg` (F3 [66] [REX] 0F B8 /r with a register operand).
fn popcnt(regs: &kvm_regs, code: &[u8]) -> Option<kvm_regs> {
    let mut i = 0;
    let mut opsize16 = false;
    let mut rep = false;
    while let Some(&b) = code.get(i) {
        match b {
            0xf3 => rep = true,
            0x66 => opsize16 = true,
            _ => break,
        }
        i += 1;
    }
    let rex = match code.get(i) {
        Some(&b) if (0x40..=0x4f).contains(&b) => {
            i += 1;
            b
        }
        _ => 0,
    };
    if !rep || code.get(i..i + 2) != Some(&[0x0f, 0xb8]) {
        return None;
    }
    let modrm = *code.get(i + 2)?;
    if modrm >> 6 != 3 {
        return None; // memory operand: not handled
    }
    let len = (i + 3) as u64;
    let dst = usize::from(((modrm >> 3) & 7) | ((rex & 4) << 1));
    let src = usize::from((modrm & 7) | ((rex & 1) << 3));
    let wide = rex & 8 != 0;
    let mut r = *regs;
    let value = gpr(&r, src);
    let (count, zero) = if wide {
        (u64::from(value.count_ones()), value == 0)
    } else if opsize16 {
        let v = value as u16;
        (u64::from(v.count_ones()), v == 0)
    } else {
        let v = value as u32;
        (u64::from(v.count_ones()), v == 0)
    };
    let old = gpr(&r, dst);
    let result = if opsize16 && !wide {
        (old & !0xffff) | count
    } else {
        count // 32-bit results zero-extend
    };
    *gpr_mut(&mut r, dst) = result;
    r.rflags = (r.rflags & !ARITH_FLAGS) | if zero { ZF } else { 0 };
    r.rip = r.rip.wrapping_add(len);
    Some(r)
}

fn gpr(r: &kvm_regs, n: usize) -> u64 {
    let mut copy = *r;
    *gpr_mut(&mut copy, n)
}

fn gpr_mut(r: &mut kvm_regs, n: usize) -> &mut u64 {
    match n {
        0 => &mut r.rax,
        1 => &mut r.rcx,
        2 => &mut r.rdx,
        3 => &mut r.rbx,
        4 => &mut r.rsp,
        5 => &mut r.rbp,
        6 => &mut r.rsi,
        7 => &mut r.rdi,
        8 => &mut r.r8,
        9 => &mut r.r9,
        10 => &mut r.r10,
        11 => &mut r.r11,
        12 => &mut r.r12,
        13 => &mut r.r13,
        14 => &mut r.r14,
        _ => &mut r.r15,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: 0x1000,
            rflags: 0x2 | ARITH_FLAGS,
            ..Default::default()
        }
    }

    #[test]
    fn int3_injects_a_breakpoint_after_the_instruction() {
        match assist(&regs(), &[0xcc, 0x90]) {
            Some(Assist::Inject(r, 3)) => assert_eq!(r.rip, 0x1001),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn popcnt_64_bit_register_form() {
        // popcnt %rdi,%rax (the kernel's __arch_hweight64 alternative)
        let mut r = regs();
        r.rdi = 0xf0f0_0000_0000_0003;
        r.rax = u64::MAX;
        let Some(Assist::Done(out)) = assist(&r, &[0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0x41]) else {
            panic!("not decoded");
        };
        assert_eq!(out.rax, 10);
        assert_eq!(out.rip, 0x1005);
        assert_eq!(out.rflags & ARITH_FLAGS, 0, "flags cleared, ZF clear");
    }

    #[test]
    fn popcnt_32_bit_zero_extends_and_sets_zf_on_zero() {
        // popcnt %edi,%eax
        let mut r = regs();
        r.rdi = 0xffff_ffff_0000_0000; // low 32 bits are zero
        r.rax = u64::MAX;
        let Some(Assist::Done(out)) = assist(&r, &[0xf3, 0x0f, 0xb8, 0xc7]) else {
            panic!("not decoded");
        };
        assert_eq!(out.rax, 0);
        assert_eq!(out.rflags & ARITH_FLAGS, ZF);
        assert_eq!(out.rip, 0x1004);
    }

    #[test]
    fn popcnt_extended_registers_and_16_bit_form() {
        // popcnt %r9,%r12: REX.WRB
        let mut r = regs();
        r.r9 = 0b1011;
        let Some(Assist::Done(out)) = assist(&r, &[0xf3, 0x4d, 0x0f, 0xb8, 0xe1]) else {
            panic!("not decoded");
        };
        assert_eq!(out.r12, 3);
        // popcnt %cx,%dx keeps the upper bits of rdx
        let mut r = regs();
        r.rcx = 0xffff_0007;
        r.rdx = 0xaaaa_bbbb_cccc_dddd;
        let Some(Assist::Done(out)) = assist(&r, &[0x66, 0xf3, 0x0f, 0xb8, 0xd1]) else {
            panic!("not decoded");
        };
        assert_eq!(out.rdx, 0xaaaa_bbbb_cccc_0003);
    }

    #[test]
    fn clac_and_stac_flip_the_alignment_check_flag() {
        let mut r = regs();
        let Some(Assist::Done(set)) = assist(&r, &[0x0f, 0x01, 0xcb]) else {
            panic!("stac");
        };
        assert_eq!(set.rflags & (1 << 18), 1 << 18);
        assert_eq!(set.rip, 0x1003);
        r.rflags = set.rflags;
        let Some(Assist::Done(clear)) = assist(&r, &[0x0f, 0x01, 0xca]) else {
            panic!("clac");
        };
        assert_eq!(clear.rflags & (1 << 18), 0);
    }

    #[test]
    fn anything_else_is_left_alone() {
        let r = regs();
        assert_eq!(assist(&r, &[0x0f, 0xb8, 0xc7]), None, "no F3 prefix");
        assert_eq!(
            assist(&r, &[0xf3, 0x48, 0x0f, 0xb8, 0x07]),
            None,
            "memory operand"
        );
        assert_eq!(assist(&r, &[0x48, 0x0f, 0xae, 0x2f]), None, "xrstor");
        assert_eq!(assist(&r, &[]), None);
    }
}
