//! Boot-time register state of the boot vCPU.
//!
//! Two entry conventions: PVH (32-bit protected mode, paging off, RBX =
//! start_info) and the Linux 64-bit boot protocol (long mode with an identity
//! map of the first GiB, RSI = zero page). Application processors are left in
//! KVM's wait-for-SIPI state; the guest starts them through its local APIC.
use super::layout::*;
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write boot structures to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryMode {
    /// PVH: 32-bit entry, RBX = start_info.
    Pvh,
    /// Linux 64-bit boot protocol: RSI = zero page.
    Linux64,
}

/// A GDT descriptor from (flags, base, limit), flags in the 0xF0FF layout.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            if (entry >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Special registers for `mode`; writes the GDT (and page tables for
/// `Linux64`) to guest memory.
pub fn boot_sregs<M: GuestMemory>(
    mem: &M,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, Error> {
    let table = gdt(mode);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GDT_START.unchecked_add(i as u64 * 8))?;
    }
    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let code = segment(table[1], 0x08);
    let data = segment(table[2], 0x10);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(table[3], 0x18);
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity map of the first GiB with 2 MiB pages.
fn write_identity_page_tables<M: GuestMemory>(mem: &M) -> Result<(), Error> {
    mem.write_obj(PDPTE_START.0 | 0x03, PML4_START)?;
    mem.write_obj(PDE_START.0 | 0x03, PDPTE_START)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, PDE_START.unchecked_add(i * 8))?;
    }
    Ok(())
}

/// General-purpose registers for the boot vCPU.
pub fn boot_regs(mode: EntryMode, entry: GuestAddress) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        ..Default::default()
    };
    match mode {
        EntryMode::Pvh => regs.rbx = PVH_INFO_START.0,
        EntryMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START.0;
        }
    }
    regs
}

/// x87/SSE control words as after FNINIT.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(l: &mut kvm_lapic_state, reg: usize) -> &mut [u8] {
    // kvm_lapic_state.regs is c_char (i8); view it as bytes.
    let regs = &mut l.regs[reg..reg + 4];
    // SAFETY: i8 and u8 have the same size and alignment; the slice is in bounds.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), 4) }
}

/// LINT0 = ExtINT (legacy PIC), LINT1 = NMI, as a PC BIOS leaves them.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let r = lapic_reg(lapic, reg);
        let v = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
        let v = (v & !0x700) | (mode << 8);
        r.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    type Mem = vm_memory::GuestMemoryMmap<()>;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn pvh_entry_is_flat_32_bit_protected_mode() {
        let m = mem();
        let s = boot_sregs(&m, EntryMode::Pvh, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(
            (s.cs.base, s.cs.limit, s.cs.db, s.cs.l),
            (0, 0xffff_ffff, 1, 0)
        );
        assert_eq!(s.efer, 0);
        assert_eq!(s.tr.type_, 0xb);
        let r = boot_regs(EntryMode::Pvh, GuestAddress(0x100000));
        assert_eq!((r.rip, r.rbx), (0x100000, PVH_INFO_START.0));
        let gdt1: u64 = m.read_obj(GDT_START.unchecked_add(8)).unwrap();
        assert_eq!(gdt1, 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn linux64_entry_has_long_mode_and_identity_map() {
        let m = mem();
        let s = boot_sregs(&m, EntryMode::Linux64, kvm_sregs::default()).unwrap();
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START.0);
        let pde: u64 = m.read_obj(PDE_START.unchecked_add(8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        assert_eq!(
            boot_regs(EntryMode::Linux64, GuestAddress(0x1000200)).rsi,
            ZERO_PAGE_START.0
        );
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!(lapic_reg(&mut l, APIC_LVT0)[1] & 7, 7);
        assert_eq!(lapic_reg(&mut l, APIC_LVT1)[1] & 7, 4);
    }
}
