//! Guest-physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT (boot)            0x0000_6000  PVH start_info + memmap + modlist
//! 0x0000_7000  Linux zero page       0x0000_9000  boot page tables (64-bit protocol)
//! 0x0002_0000  kernel command line   0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first; reserved up to 1 MiB)
//! 0x0010_0000  kernel                ...          RAM up to 3 GiB
//! 0xc000_0000  MMIO hole up to 4 GiB:
//!              0xc000_0000  PCI 32-bit BAR window (512 MiB)
//!              0xe000_0000  PCI ECAM, buses 0-15 (16 MiB; reserved in e820, MCFG)
//!              0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC
//! 0x1_0000_0000  RAM above the hole
//! top of RAM rounded up to 1 GiB: PCI 64-bit BAR window (64 GiB)
//! ```
use vm_memory::GuestAddress;

pub const GDT_START: GuestAddress = GuestAddress(0x500);
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
pub const HIGH_MEMORY_START: GuestAddress = GuestAddress(0x10_0000);
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
pub const PCI_LOW_WINDOW: (u64, u64) = (MMIO_HOLE_START, 0x2000_0000);
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Buses of segment 0: the root bus and one per hot-plug root port.
pub const PCI_BUSES: u64 = 16;
/// ECAM for all of them (MCFG says buses 0-15).
pub const PCI_ECAM_SIZE: u64 = PCI_BUSES << 20;
pub const PCI_HIGH_WINDOW_SIZE: u64 = 1 << 36;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map, below 4 GiB.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// RAM regions (guest address, size) for `mem_bytes` of guest memory.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > MMIO_HOLE_START {
        regions.push((
            GuestAddress(MMIO_HOLE_END),
            (mem_bytes - MMIO_HOLE_START) as usize,
        ));
    }
    regions
}

/// Guest-physical ranges of RAM offsets `offset..offset + len` (RAM
/// counted from address 0, the MMIO hole skipped) in a VM of `mem_bytes`.
pub fn ram_offsets_to_guest(offset: u64, len: u64, mem_bytes: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut ram = 0;
    for (addr, size) in ram_regions(mem_bytes) {
        let size = size as u64;
        let start = offset.max(ram);
        let end = (offset + len).min(ram + size);
        if start < end {
            out.push((addr.0 + (start - ram), end - start));
        }
        ram += size;
    }
    out
}

/// The 64-bit PCI window: above all RAM, 1 GiB aligned.
pub fn pci_high_window(mem_bytes: u64) -> (u64, u64) {
    let top = ram_regions(mem_bytes)
        .iter()
        .map(|(a, l)| a.0 + *l as u64)
        .max()
        .unwrap_or(0)
        .max(MMIO_HOLE_END);
    let gib = 1u64 << 30;
    (top.div_ceil(gib) * gib, PCI_HIGH_WINDOW_SIZE)
}

/// The e820 map given to the guest: (address, size, type).
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        (
            ACPI_START.0,
            HIGH_MEMORY_START.0 - ACPI_START.0,
            E820_RESERVED,
        ),
    ];
    let low_end = mem_bytes.min(MMIO_HOLE_START);
    map.push((HIGH_MEMORY_START.0, low_end - HIGH_MEMORY_START.0, E820_RAM));
    // ECAM must be reserved, or Linux refuses MMCONFIG and falls back to
    // ports 0xCF8/0xCFC for the standard 256 bytes only.
    map.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    if mem_bytes > MMIO_HOLE_START {
        map.push((MMIO_HOLE_END, mem_bytes - MMIO_HOLE_START, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_a_low_map() {
        let mib = 1 << 20;
        assert_eq!(
            ram_regions(256 * mib),
            vec![(GuestAddress(0), 256 * mib as usize)]
        );
        let map = e820_map(256 * mib);
        assert!(map.contains(&(HIGH_MEMORY_START.0, 255 * mib, E820_RAM)));
        assert!(map.contains(&(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED)));
        assert_eq!(pci_high_window(256 * mib).0, 4 << 30);
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, 256 * mib - (0x100000 - EBDA_START));
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let gib = 1u64 << 30;
        let regions = ram_regions(5 * gib);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), 3 * gib as usize),
                (GuestAddress(4 * gib), 2 * gib as usize)
            ]
        );
        assert_eq!(pci_high_window(5 * gib).0, 6 * gib);
        assert_eq!(pci_high_window(5 * gib + 1).0, 7 * gib);
        let map = e820_map(5 * gib);
        assert!(map.contains(&(4 * gib, 2 * gib, E820_RAM)));
        // no RAM entry overlaps the hole
        assert!(map
            .iter()
            .all(|(a, s, t)| *t != E820_RAM || a + s <= MMIO_HOLE_START || *a >= MMIO_HOLE_END));
    }
}
