//! A small ACPI table writer: RSDP, XSDT, FADT (hardware-reduced, with sleep
//! and reset registers), MADT (local APICs, IOAPIC, ISA overrides), MCFG (PCI
//! ECAM) and a DSDT that describes S5 and the legacy devices (COM1, the
//! CMOS clock). Linux finds the RSDP in the BIOS area or through PVH.
use super::layout::*;
use devices::legacy::{ACPI_SLEEP_BASE, COM1_BASE, COM1_IRQ, I8042_CMD};
use devices::rtc::RTC_BASE;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

const OEM_ID: &[u8; 6] = b"FFMK  ";
const OEM_TABLE_ID: &[u8; 8] = b"FFMKVMM ";
const CREATOR_ID: &[u8; 4] = b"FFMK";

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table under construction.
pub struct Sdt {
    bytes: Vec<u8>,
}

impl Sdt {
    pub fn new(signature: &[u8; 4], revision: u8) -> Sdt {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(signature);
        bytes.extend_from_slice(&0u32.to_le_bytes()); // length, patched in finish()
        bytes.push(revision);
        bytes.push(0); // checksum
        bytes.extend_from_slice(OEM_ID);
        bytes.extend_from_slice(OEM_TABLE_ID);
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(CREATOR_ID);
        bytes.extend_from_slice(&1u32.to_le_bytes());
        Sdt { bytes }
    }

    pub fn push(&mut self, data: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(data);
        self
    }

    pub fn put_at(&mut self, offset: usize, data: &[u8]) -> &mut Self {
        if self.bytes.len() < offset + data.len() {
            self.bytes.resize(offset + data.len(), 0);
        }
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[4..8].copy_from_slice(&len.to_le_bytes());
        self.bytes[9] = 0;
        self.bytes[9] = checksum(&self.bytes);
        self.bytes
    }
}

/// Generic address structure for a system-I/O register.
fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bits;
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// AML PkgLength of a package whose contents are `len` bytes long (the
/// encoding counts its own bytes).
fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 0x40 {
        vec![(len + 1) as u8]
    } else if len + 2 < 0x1000 {
        let n = len + 2;
        vec![0x40 | (n & 0xf) as u8, (n >> 4) as u8]
    } else {
        let n = len + 3;
        vec![0x80 | (n & 0xf) as u8, (n >> 4) as u8, (n >> 12) as u8]
    }
}

/// `Name (NAME, EisaId ("AAAnnnn"))` for a PNP id such as "PNP0501".
fn aml_hid(id: &[u8; 7]) -> Vec<u8> {
    let letter = |c: u8| u16::from(c - b'@') & 0x1f;
    let vendor = (letter(id[0]) << 10) | (letter(id[1]) << 5) | letter(id[2]);
    let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
    let product = [hex(id[3]) << 4 | hex(id[4]), hex(id[5]) << 4 | hex(id[6])];
    let mut v = vec![0x08, b'_', b'H', b'I', b'D', 0x0c];
    v.extend_from_slice(&vendor.to_be_bytes());
    v.extend_from_slice(&product);
    v
}

/// `IO (Decode16, port, port, 1, len)`: a fixed range of I/O ports.
fn res_io(port: u16, len: u8) -> Vec<u8> {
    let mut v = vec![0x47, 0x01];
    v.extend_from_slice(&port.to_le_bytes()); // minimum
    v.extend_from_slice(&port.to_le_bytes()); // maximum
    v.extend_from_slice(&[0x01, len]); // alignment, length
    v
}

/// `IRQNoFlags () {irq}`: edge, active high, exclusive.
fn res_irq(irq: u32) -> Vec<u8> {
    let mut v = vec![0x22];
    v.extend_from_slice(&(1u16 << irq).to_le_bytes());
    v
}

/// Address spaces a bridge produces: (resource type, type-specific flags).
const SPACE_MEMORY: (u8, u8) = (0, 0x01); // read-write, non-cacheable
const SPACE_IO: (u8, u8) = (1, 0x03); // ISA and non-ISA ranges
const SPACE_BUS: (u8, u8) = (2, 0x00);
/// General flags: producer, minimum and maximum fixed.
const SPACE_FIXED: u8 = 0x0c;

/// An address space descriptor: a window `[min, min + len)` the bridge
/// produces, with `width`-byte fields (2: `WordBusNumber`/`WordIO`, 4:
/// `DWordMemory`, 8: `QWordMemory`).
fn res_window(space: (u8, u8), width: usize, min: u64, len: u64) -> Vec<u8> {
    let tag = match width {
        2 => 0x88,
        4 => 0x87,
        _ => 0x8a,
    };
    // The length field counts the three flag bytes and five fields.
    let mut v = vec![
        tag,
        (3 + 5 * width) as u8,
        0x00,
        space.0,
        SPACE_FIXED,
        space.1,
    ];
    // granularity, minimum, maximum, translation, length
    for x in [0, min, min + (len - 1), 0, len] {
        v.extend_from_slice(&x.to_le_bytes()[..width]);
    }
    v
}

/// `Name (NAME, ResourceTemplate () { resources })`.
fn aml_resources(name: &[u8; 4], resources: &[Vec<u8>]) -> Vec<u8> {
    let mut crs: Vec<u8> = resources.concat();
    crs.extend_from_slice(&[0x79, 0x00]); // end tag
    let mut buffer = match u8::try_from(crs.len()) {
        Ok(n) => vec![0x0a, n], // BufferSize as a ByteConst
        Err(_) => {
            let mut b = vec![0x0b]; // ... or a WordConst
            b.extend_from_slice(&(crs.len() as u16).to_le_bytes());
            b
        }
    };
    buffer.extend_from_slice(&crs);
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.push(0x11); // Buffer
    v.extend_from_slice(&pkg_length(buffer.len()));
    v.extend_from_slice(&buffer);
    v
}

/// `Device (NAME) { body }`.
fn aml_device(name: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut dev = vec![0x5b, 0x82];
    dev.extend_from_slice(&pkg_length(4 + body.len()));
    dev.extend_from_slice(name);
    dev.extend_from_slice(body);
    dev
}

/// `Device (NAME) { _HID, _UID 0, _CRS { IO (port, len) [IRQNoFlags {irq}] } }`.
fn aml_legacy_device(
    name: &[u8; 4],
    hid: &[u8; 7],
    port: u16,
    len: u8,
    irq: Option<u32>,
) -> Vec<u8> {
    let mut res = vec![res_io(port, len)];
    res.extend(irq.map(res_irq));
    let mut body = aml_hid(hid);
    body.extend_from_slice(&[0x08, b'_', b'U', b'I', b'D', 0x00]);
    body.extend(aml_resources(b"_CRS", &res));
    aml_device(name, &body)
}

/// `Method (_OSC, 4) { CreateDWordField (Arg3, 8, CDW3)
/// And (CDW3, GRANTED, CDW3) Return (Arg3) }`: the PCI host bridge's
/// "operating system capabilities" handshake. The OS asks for control of
/// PCIe features in the third dword; this grants native PCIe hot-plug and
/// the PCIe capability structure (bits 0 and 4) and keeps the rest (PME,
/// AER, LTR, DPC: ffmk-vmm's ports have none of them). Without it, Linux
/// leaves hot-plug to firmware and its pciehp driver never binds.
fn aml_pci_osc() -> Vec<u8> {
    const GRANTED: u8 = 0x11;
    let mut body = vec![0x8a, 0x6b, 0x0a, 0x08]; // CreateDWordField (Arg3, 8,
    body.extend_from_slice(b"CDW3"); // CDW3)
    body.push(0x7b); // And (
    body.extend_from_slice(b"CDW3");
    body.extend_from_slice(&[0x0a, GRANTED]);
    body.extend_from_slice(b"CDW3"); // , CDW3)
    body.extend_from_slice(&[0xa4, 0x6b]); // Return (Arg3)
    let mut m = vec![0x14];
    m.extend_from_slice(&pkg_length(4 + 1 + body.len()));
    m.extend_from_slice(b"_OSC");
    m.push(0x04); // four arguments, not serialized
    m.extend_from_slice(&body);
    m
}

/// `Name (NAME, EisaId ("AAAnnnn"))`, as `aml_hid` but for any name.
fn aml_eisa_name(name: &[u8; 4], id: &[u8; 7]) -> Vec<u8> {
    let mut v = aml_hid(id);
    v[1..5].copy_from_slice(name);
    v
}

/// The PCI Express host bridge (PNP0A08, compatible with PNP0A03; segment
/// 0, buses 0 to `PCI_BUSES - 1`: the root bus and the hot-plug ports'
/// buses): the configuration ports, the I/O space around them, both BAR
/// windows and `_OSC`. On an ACPI system Linux scans only the host bridges
/// the DSDT names: without this no PCI device (virtio, VFIO) is found.
fn aml_pci_host_bridge(mem_bytes: u64) -> Vec<u8> {
    let (high, high_len) = pci_high_window(mem_bytes);
    let mut body = aml_hid(b"PNP0A08");
    body.extend(aml_eisa_name(b"_CID", b"PNP0A03"));
    for name in [b"_UID", b"_SEG", b"_BBN"] {
        body.push(0x08);
        body.extend_from_slice(name);
        body.push(0x00); // Zero
    }
    body.extend(aml_resources(
        b"_CRS",
        &[
            res_window(SPACE_BUS, 2, 0, PCI_BUSES),
            res_io(0xcf8, 8),
            res_window(SPACE_IO, 2, 0, 0xcf8),
            res_window(SPACE_IO, 2, 0xd00, 0xf300),
            res_window(SPACE_MEMORY, 4, PCI_LOW_WINDOW.0, PCI_LOW_WINDOW.1),
            res_window(SPACE_MEMORY, 8, high, high_len),
        ],
    ));
    body.extend(aml_pci_osc());
    body.extend(aml_pci_prt());
    aml_device(b"PCI0", &body)
}

/// An AML integer: the shortest encoding.
fn aml_integer(v: u32) -> Vec<u8> {
    match v {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, v as u8],
        0x100..=0xffff => {
            let mut b = vec![0x0b];
            b.extend_from_slice(&(v as u16).to_le_bytes());
            b
        }
        _ => {
            let mut b = vec![0x0c];
            b.extend_from_slice(&v.to_le_bytes());
            b
        }
    }
}

/// `Package () { elements }`.
fn aml_package(elements: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = elements.iter().flatten().copied().collect();
    let mut p = vec![0x12];
    p.extend_from_slice(&pkg_length(1 + body.len()));
    p.push(elements.len() as u8);
    p.extend_from_slice(&body);
    p
}

/// `_PRT`: the root bus's INTx routing, every slot and pin to its IOAPIC
/// GSI ([`devices::pci::intx_gsi`]), for passthrough functions that use
/// INTx (a functions behind a hot-plug port gets no INTx).
fn aml_pci_prt() -> Vec<u8> {
    let entries: Vec<Vec<u8>> = (0..devices::pci::root::SLOTS)
        .flat_map(|slot| {
            (0u8..4).map(move |pin| {
                aml_package(&[
                    aml_integer((u32::from(slot) << 16) | 0xffff),
                    aml_integer(u32::from(pin)),
                    aml_integer(0), // no link device: the last element is a GSI
                    aml_integer(devices::pci::intx_gsi(slot, pin + 1)),
                ])
            })
        })
        .collect();
    let mut v = vec![0x08];
    v.extend_from_slice(b"_PRT");
    v.extend(aml_package(&entries));
    v
}

/// DSDT: `Name (_S5_, Package () { 5, 0, 0, 0 })` and, in `\_SB`, the PCI
/// host bridge, COM1 (PNP0501) and the CMOS clock (PNP0B00). A
/// hardware-reduced ACPI guest has no legacy PIC and maps no ISA interrupt
/// by itself: Linux's serial driver gets IRQ 4 only through this description
/// (without it, the port opens with an error and user-space console output
/// is lost).
pub fn dsdt(mem_bytes: u64) -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    t.push(&[
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00,
    ]);
    let mut devices = aml_pci_host_bridge(mem_bytes);
    devices.extend(aml_legacy_device(
        b"COM1",
        b"PNP0501",
        COM1_BASE,
        8,
        Some(COM1_IRQ),
    ));
    devices.extend(aml_legacy_device(b"RTC_", b"PNP0B00", RTC_BASE, 2, None));
    let mut scope = vec![0x10];
    scope.extend_from_slice(&pkg_length(5 + devices.len()));
    scope.extend_from_slice(b"\\_SB_");
    scope.extend_from_slice(&devices);
    t.push(&scope);
    t.finish()
}

const FADT_HW_REDUCED: u32 = 1 << 20;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;

pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut t = Sdt::new(b"FACP", 6);
    t.put_at(40, &(dsdt_addr as u32).to_le_bytes());
    t.put_at(46, &9u16.to_le_bytes()); // SCI_INT
    t.put_at(109, &0x0004u16.to_le_bytes()); // IAPC_BOOT_ARCH: VGA not present
    let flags = FADT_HW_REDUCED | FADT_RESET_REG_SUP | FADT_PWR_BUTTON | FADT_SLP_BUTTON;
    t.put_at(112, &flags.to_le_bytes());
    t.put_at(116, &gas_io(I8042_CMD, 8)); // RESET_REG: i8042 command port
    t.put_at(128, &[0xfe]); // RESET_VALUE
    t.put_at(131, &[5]); // FADT minor version
    t.put_at(140, &dsdt_addr.to_le_bytes()); // X_DSDT
    t.put_at(244, &gas_io(ACPI_SLEEP_BASE, 8)); // SLEEP_CONTROL_REG
    t.put_at(256, &gas_io(ACPI_SLEEP_BASE + 1, 8)); // SLEEP_STATUS_REG
    t.put_at(268, b"FFMKVMM\0"); // hypervisor vendor identity
    t.finish()
}

/// MADT: the local APIC of every vCPU (processor UID = vCPU number, so
/// the guest's CPU n is vCPU n; `apic_ids[n]` its APIC ID), the IOAPIC,
/// the PIT's override and the NMI wiring.
pub fn madt(apic_ids: &[u8]) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 4);
    t.push(&LAPIC_ADDR.to_le_bytes());
    t.push(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259 present
    for (uid, &apic) in apic_ids.iter().enumerate() {
        t.push(&[0, 8, uid as u8, apic, 1, 0, 0, 0]); // processor local APIC, enabled
    }
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.push(&ioapic);
    // ISA IRQ0 (PIT) is wired to GSI 2 on the IOAPIC.
    t.push(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    // LINT1 of every local APIC is NMI.
    t.push(&[4, 6, 0xff, 0, 0, 1]);
    t.finish()
}

/// SRAT: which guest node (proximity domain) each vCPU's local APIC and
/// each range of guest RAM belongs to. A node's RAM is its share of the
/// VM's RAM offsets ([`numa::Layout::ram_ranges`]), split where it
/// crosses the MMIO hole.
pub fn srat(apic_ids: &[u8], numa: &numa::Layout, mem_bytes: u64) -> Vec<u8> {
    let mut t = Sdt::new(b"SRAT", 3);
    t.push(&1u32.to_le_bytes()); // reserved, 1 for compatibility
    t.push(&[0u8; 8]);
    for (cpu, &apic) in apic_ids.iter().enumerate() {
        let node = numa.node_of_cpu(cpu as u32).map_or(0, |n| n.id);
        let d = node.to_le_bytes();
        // Processor local APIC affinity: domain bits 0-7, APIC ID, flags
        // (enabled), SAPIC EID, domain bits 8-31, clock domain.
        t.push(&[
            0, 16, d[0], apic, 1, 0, 0, 0, 0, d[1], d[2], d[3], 0, 0, 0, 0,
        ]);
    }
    for r in numa.ram_ranges() {
        for (gpa, len) in ram_offsets_to_guest(r.offset, r.len, mem_bytes) {
            let mut e = vec![1, 40];
            e.extend_from_slice(&r.node.to_le_bytes());
            e.extend_from_slice(&[0, 0]);
            e.extend_from_slice(&gpa.to_le_bytes());
            e.extend_from_slice(&len.to_le_bytes());
            e.extend_from_slice(&[0u8; 4]);
            e.extend_from_slice(&1u32.to_le_bytes()); // enabled
            e.extend_from_slice(&[0u8; 8]);
            t.push(&e);
        }
    }
    t.finish()
}

/// SLIT: the distance between every two guest nodes.
pub fn slit(numa: &numa::Layout) -> Vec<u8> {
    let mut t = Sdt::new(b"SLIT", 1);
    t.push(&(numa.nodes.len() as u64).to_le_bytes());
    for n in &numa.nodes {
        t.push(&n.distances);
    }
    t.finish()
}

/// MCFG: one ECAM region for segment 0, buses 0 to `PCI_BUSES - 1`.
pub fn mcfg() -> Vec<u8> {
    let mut t = Sdt::new(b"MCFG", 1);
    t.push(&[0u8; 8]); // reserved
    t.push(&PCI_ECAM_START.to_le_bytes());
    t.push(&0u16.to_le_bytes()); // PCI segment group
    t.push(&[0, ((PCI_ECAM_SIZE >> 20) - 1) as u8]); // start, end bus
    t.push(&[0u8; 4]);
    t.finish()
}

pub fn xsdt(tables: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for a in tables {
        t.push(&a.to_le_bytes());
    }
    t.finish()
}

pub fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(OEM_ID);
    r.push(2);
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Writes all tables at `ACPI_START` (RSDP first) and returns the RSDP
/// address: a vCPU per entry of `apic_ids`, and SRAT and SLIT when the
/// guest has NUMA nodes.
pub fn write_tables<M: GuestMemory>(
    mem: &M,
    apic_ids: &[u8],
    mem_bytes: u64,
    numa: Option<&numa::Layout>,
) -> Result<GuestAddress, vm_memory::GuestMemoryError> {
    let rsdp_addr = ACPI_START;
    let mut next = rsdp_addr.unchecked_add(64);
    let mut place = |bytes: &[u8]| -> Result<u64, vm_memory::GuestMemoryError> {
        let at = next;
        mem.write_slice(bytes, at)?;
        next = at.unchecked_add((bytes.len() as u64 + 15) & !15);
        Ok(at.0)
    };
    let dsdt_addr = place(&dsdt(mem_bytes))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let mut tables = vec![fadt_addr, place(&madt(apic_ids))?, place(&mcfg())?];
    if let Some(l) = numa {
        tables.push(place(&srat(apic_ids, l, mem_bytes))?);
        tables.push(place(&slit(l))?);
    }
    let xsdt_addr = place(&xsdt(&tables))?;
    mem.write_slice(&rsdp(xsdt_addr), rsdp_addr)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_have_valid_lengths_and_checksums() {
        for t in [
            dsdt(512 << 20),
            fadt(0xe0100),
            madt(&[0, 1, 2, 3]),
            mcfg(),
            xsdt(&[1, 2]),
        ] {
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert!(sums_to_zero(&t), "{:?}", &t[..4]);
        }
        assert_eq!(fadt(0).len(), 276);
        let m = mcfg();
        assert_eq!(m.len(), 60);
        assert_eq!(
            u64::from_le_bytes(m[44..52].try_into().unwrap()),
            PCI_ECAM_START
        );
        assert_eq!(
            &m[54..56],
            &[0, PCI_BUSES as u8 - 1],
            "root bus and port buses"
        );
        let r = rsdp(0xe0200);
        assert_eq!(r.len(), 36);
        assert!(sums_to_zero(&r[..20]) && sums_to_zero(&r));
    }

    #[test]
    fn the_host_bridge_routes_every_slots_intx_pins_to_ioapic_gsis() {
        let d = dsdt(512 << 20);
        let find = |pat: &[u8]| d.windows(pat.len()).position(|w| w == pat);
        let prt = find(b"_PRT").expect("_PRT");
        assert_eq!(d[prt - 1], 0x08, "Name");
        assert_eq!(d[prt + 4], 0x12, "Package");
        // A two-byte PkgLength, then 128 entries: 32 slots x 4 pins.
        assert_eq!(d[prt + 5] >> 6, 1);
        assert_eq!(d[prt + 7], 128);
        // Slot 0 INTA: Package (4) { 0xFFFF, Zero, Zero, 16 }.
        let first = [0x12, 9, 4, 0x0b, 0xff, 0xff, 0x00, 0x00, 0x0a, 16];
        assert_eq!(d[prt + 8..prt + 18], first);
        // Slot 3 INTB: (3 + 1) % 4 -> GSI 16.
        let slot3_b = [
            0x12, 11, 4, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x01, 0x00, 0x0a, 16,
        ];
        assert!(find(&slot3_b).is_some());
        assert_eq!(devices::pci::intx_gsi(1, 1), 17);
        assert_eq!(devices::pci::intx_gsi(1, 4), 16);
    }

    #[test]
    fn dsdt_describes_com1_and_the_rtc() {
        assert_eq!(aml_hid(b"PNP0501")[6..], [0x41, 0xd0, 0x05, 0x01]);
        assert_eq!(pkg_length(10), vec![11]);
        assert_eq!(pkg_length(100), vec![0x40 | (102 & 0xf), 102 >> 4]);
        let d = dsdt(512 << 20);
        let find = |pat: &[u8]| d.windows(pat.len()).position(|w| w == pat);
        let com1 = find(b"COM1").expect("COM1");
        // Device op, then a one-byte PkgLength that covers the name and body.
        assert_eq!(d[com1 - 3..com1 - 1], [0x5b, 0x82]);
        let io = find(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]).expect("IO 0x3f8");
        assert_eq!(d[io + 8..io + 11], [0x22, 0x10, 0x00], "IRQ 4");
        assert!(find(&[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02, 0x79]).is_some());
        let pci = find(b"PCI0").expect("PCI0");
        assert_eq!(d[pci + 10..pci + 14], [0x41, 0xd0, 0x0a, 0x08], "PNP0A08");
        let cid = find(b"_CID").expect("_CID");
        assert_eq!(d[cid + 5..cid + 9], [0x41, 0xd0, 0x0a, 0x03], "PNP0A03");
        let osc = find(b"_OSC").expect("_OSC");
        assert_eq!(d[osc - 2..osc], [0x14, 27], "a method of 26 bytes");
        assert_eq!(d[osc + 4], 4, "four arguments");
        assert_eq!(d[osc + 24..osc + 26], [0xa4, 0x6b], "returns Arg3");
        // Buses 0-15 (WordBusNumber: minimum 0, maximum PCI_BUSES - 1).
        let mut bus = vec![0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0];
        bus.extend_from_slice(&(PCI_BUSES as u16 - 1).to_le_bytes());
        assert!(find(&bus).is_some(), "bus range");
        // The 32-bit BAR window, as a DWordMemory descriptor.
        let mut win = vec![0x87, 0x17, 0x00, 0x00, 0x0c, 0x01, 0, 0, 0, 0];
        win.extend_from_slice(&(PCI_LOW_WINDOW.0 as u32).to_le_bytes());
        assert!(find(&win).is_some(), "32-bit window");
        // Scope op and a two-byte PkgLength that runs to the end of the table.
        let sb = find(b"\\_SB_").expect("scope");
        assert_eq!(d[sb - 3], 0x10);
        assert_eq!(d[sb - 2] >> 6, 1, "two-byte PkgLength");
        let len = usize::from(d[sb - 2] & 0xf) | usize::from(d[sb - 1]) << 4;
        assert_eq!(sb - 2 + len, d.len(), "scope runs to the end");
    }

    #[test]
    fn madt_lists_one_enabled_lapic_per_vcpu() {
        let m = madt(&[0, 1, 4]);
        let mut p = 44;
        let mut lapics = vec![];
        while p < m.len() {
            if m[p] == 0 {
                lapics.push((m[p + 3], m[p + 4]));
            }
            p += m[p + 1] as usize;
        }
        assert_eq!(p, m.len());
        assert_eq!(lapics, vec![(0, 1), (1, 1), (4, 1)]);
        assert_eq!(m[44 + 2 * 8 + 2], 2, "processor UID: the vCPU number");
    }

    #[test]
    fn srat_and_slit_describe_the_nodes() {
        let nodes: Vec<numa::NodeSpec> = ["cpus=0-1,memory=3G", "cpus=2-3,memory=2G,distance=0:21"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        let gib = 1u64 << 30;
        let l = numa::Layout::new(&nodes, 4, None, 2 << 20).unwrap();
        let s = srat(&[0, 1, 2, 3], &l, 5 * gib);
        assert!(sums_to_zero(&s));
        assert_eq!(&s[0..4], b"SRAT");
        let mut p = 48;
        let (mut cpus, mut mem) = (vec![], vec![]);
        while p < s.len() {
            let e = &s[p..p + s[p + 1] as usize];
            match e[0] {
                0 => cpus.push((e[3], e[2])),
                1 => mem.push((
                    e[2],
                    u64::from_le_bytes(e[8..16].try_into().unwrap()),
                    u64::from_le_bytes(e[16..24].try_into().unwrap()),
                )),
                t => panic!("entry type {t}"),
            }
            p += e.len();
        }
        assert_eq!(cpus, vec![(0, 0), (1, 0), (2, 1), (3, 1)]);
        // Node 0 fills RAM below the hole, node 1 lies above 4 GiB.
        assert_eq!(mem, vec![(0, 0, 3 * gib), (1, 4 * gib, 2 * gib)]);
        let t = slit(&l);
        assert!(sums_to_zero(&t));
        assert_eq!(&t[36..44], &2u64.to_le_bytes());
        assert_eq!(&t[44..], &[10, 21, 21, 10]);
        // A node across the hole gets two ranges.
        let nodes: Vec<numa::NodeSpec> = ["cpus=0,memory=1G", "cpus=1,memory=4G"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        let l = numa::Layout::new(&nodes, 2, None, 2 << 20).unwrap();
        let s = srat(&[0, 1], &l, 5 * gib);
        assert_eq!(s.len(), 48 + 2 * 16 + 3 * 40);
    }

    #[test]
    fn written_tables_are_linked_from_the_rsdp() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rsdp = write_tables(&mem, &[0, 1], 0x10_0000, None).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt: u64 = mem.read_obj(rsdp.unchecked_add(24)).unwrap();
        let madt: u64 = mem.read_obj(GuestAddress(xsdt + 36 + 8)).unwrap();
        let mut s = [0u8; 4];
        mem.read_slice(&mut s, GuestAddress(madt)).unwrap();
        assert_eq!(&s, b"APIC");
    }
}
