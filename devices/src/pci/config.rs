//! A PCI function's configuration space (type 0 header, or type 1 for a
//! bridge; capabilities, extended space up to 4 KiB), with per-byte write
//! masks.
//!
//! Read-only fields (IDs, class, BAR type bits) are plain bytes with a zero
//! write mask, so BAR sizing falls out of the masks: writing all ones to a BAR
//! and reading it back yields `!(size - 1)` plus the type bits.

pub const CONFIG_SPACE_SIZE: usize = 4096;
/// The standard (non-extended) part, reachable through ports 0xCF8/0xCFC.
pub const STANDARD_SIZE: usize = 256;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Type 1 (bridge) header registers.
pub const PRIMARY_BUS: usize = 0x18;
pub const SECONDARY_BUS: usize = 0x19;
pub const SUBORDINATE_BUS: usize = 0x1a;
pub const MEMORY_BASE: usize = 0x20;
pub const MEMORY_LIMIT: usize = 0x22;
pub const PREF_MEMORY_BASE: usize = 0x24;
pub const PREF_MEMORY_LIMIT: usize = 0x26;
pub const PREF_BASE_UPPER: usize = 0x28;
pub const PREF_LIMIT_UPPER: usize = 0x2c;
pub const BRIDGE_CONTROL: usize = 0x3e;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const FIRST_CAPABILITY: usize = 0x40;

pub const NUM_BARS: usize = 6;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    Mem64 {
        prefetchable: bool,
    },
    /// I/O space (port I/O: a 16550 UART's eight registers, say).
    Io,
}

/// I/O BARs are 4 to 256 bytes, a power of two (what PCI allows).
pub const IO_BAR_MAX: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub kind: BarKind,
    /// A power of two: at least 4 KiB for memory BARs (page-sized, so they
    /// can be mapped), 4 to 256 bytes for I/O BARs.
    pub size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is out of range or already used")]
    BarTaken(usize),
    #[error(
        "BAR size {0:#x} is not a power of two of at least 4 KiB (memory) or 4 to 256 bytes (I/O)"
    )]
    BarSize(u64),
    #[error("no room left for a capability of {0} bytes")]
    NoCapabilityRoom(usize),
    #[error("saved configuration does not fit: {0}")]
    Mismatch(String),
}

/// The identity of a function: what `lspci -n` shows.
#[derive(Debug, Clone, Copy)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    /// (class, subclass, programming interface)
    pub class: (u8, u8, u8),
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<Bar>; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl ConfigSpace {
    pub fn new(ids: PciIds) -> Self {
        let mut c = ConfigSpace {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        c.set_u16(VENDOR_ID, ids.vendor);
        c.set_u16(DEVICE_ID, ids.device);
        c.bytes[REVISION] = ids.revision;
        c.bytes[CLASS_PROG_IF] = ids.class.2;
        c.bytes[CLASS_PROG_IF + 1] = ids.class.1;
        c.bytes[CLASS_PROG_IF + 2] = ids.class.0;
        c.bytes[HEADER_TYPE] = 0;
        c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, ids.subsystem);
        let command_mask = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command_mask.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    /// A bridge's configuration space (type 1 header): bus numbers, a
    /// 32-bit memory window and a 64-bit prefetchable one are the guest's
    /// to program; there is no I/O window (its registers read as zero, so
    /// the guest sees none) and no BAR.
    pub fn bridge(ids: PciIds) -> Self {
        let mut c = ConfigSpace::new(ids);
        c.bytes[HEADER_TYPE] = 1;
        c.set_u32(SUBSYSTEM_VENDOR_ID, 0); // prefetchable limit, upper half
        c.writable[INTERRUPT_LINE] = 0;
        for (off, mask) in [
            (PRIMARY_BUS, 0xff_ffffu32),
            (MEMORY_BASE, 0xfff0_fff0),
            (PREF_MEMORY_BASE, 0xfff0_fff0),
            (PREF_BASE_UPPER, 0xffff_ffff),
            (PREF_LIMIT_UPPER, 0xffff_ffff),
        ] {
            c.writable[off..off + 4].copy_from_slice(&mask.to_le_bytes());
        }
        // 64-bit prefetchable window.
        c.bytes[PREF_MEMORY_BASE] = 1;
        c.bytes[PREF_MEMORY_LIMIT] = 1;
        // Bridge control: parity and SERR# response, secondary bus reset.
        c.writable[BRIDGE_CONTROL] = 0x43;
        c
    }

    /// Sets the write mask of the bytes at `offset` (a device that handles
    /// some bits itself, such as write-1-to-clear status, marks them
    /// writable so that a saved state carrying them is accepted).
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(w) = self.writable.get_mut(offset..offset + mask.len()) {
            w.copy_from_slice(mask);
        }
    }

    /// Declares BAR `index` (a 64-bit BAR takes `index + 1` too).
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), ConfigError> {
        let wide = matches!(bar.kind, BarKind::Mem64 { .. });
        let last = index + usize::from(wide);
        if last >= NUM_BARS
            || (index..=last).any(|i| self.bars[i].is_some() || self.is_upper_half(i))
        {
            return Err(ConfigError::BarTaken(index));
        }
        let io = bar.kind == BarKind::Io;
        let size_ok = if io {
            (4..=IO_BAR_MAX).contains(&bar.size)
        } else {
            bar.size >= 4096 && (wide || bar.size <= 1 << 31)
        };
        if !bar.size.is_power_of_two() || !size_ok {
            return Err(ConfigError::BarSize(bar.size));
        }
        let (type_bits, low_bits): (u32, u32) = match bar.kind {
            BarKind::Mem32 => (0, 0xf),
            BarKind::Mem64 { prefetchable } => (0b100 | if prefetchable { 0b1000 } else { 0 }, 0xf),
            // Port addresses are 16 bits on x86: the upper half reads 0.
            BarKind::Io => (0b1, 0xffff_0003),
        };
        let mask = !(bar.size - 1);
        let off = BAR0 + 4 * index;
        self.set_u32(off, type_bits);
        self.writable[off..off + 4].copy_from_slice(&((mask as u32) & !low_bits).to_le_bytes());
        if wide {
            self.set_u32(off + 4, 0);
            self.writable[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    fn is_upper_half(&self, i: usize) -> bool {
        i > 0
            && matches!(
                self.bars[i - 1],
                Some(Bar {
                    kind: BarKind::Mem64 { .. },
                    ..
                })
            )
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// The BARs a device declared, with their indices.
    pub fn bars(&self) -> impl Iterator<Item = (usize, Bar)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
    }

    /// The guest-physical address BAR `index` is programmed with.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        let off = BAR0 + 4 * index;
        let low = u64::from(self.u32_at(off) & !0xf);
        Some(match bar.kind {
            BarKind::Mem32 => low,
            BarKind::Mem64 { .. } => low | (u64::from(self.u32_at(off + 4)) << 32),
            BarKind::Io => u64::from(self.u32_at(off) & 0xfffc),
        })
    }

    /// Programs BAR `index` (what firmware does before the OS runs).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bar(index) else {
            return;
        };
        let off = BAR0 + 4 * index;
        if bar.kind == BarKind::Io {
            self.set_u32(off, (addr as u32 & 0xfffc) | 1);
            return;
        }
        let type_bits = self.u32_at(off) & 0xf;
        self.set_u32(off, (addr as u32 & !0xf) | type_bits);
        if matches!(bar.kind, BarKind::Mem64 { .. }) {
            self.set_u32(off + 4, (addr >> 32) as u32);
        }
    }

    /// Which BAR decodes `addr`, and the offset in it (memory decoding on).
    pub fn bar_containing(&self, addr: u64) -> Option<(usize, u64)> {
        self.decoding(addr, false)
    }

    /// Which I/O BAR decodes port `port`, and the offset in it (I/O
    /// decoding on).
    pub fn io_bar_containing(&self, port: u64) -> Option<(usize, u64)> {
        self.decoding(port, true)
    }

    fn decoding(&self, addr: u64, io: bool) -> Option<(usize, u64)> {
        let enable = if io { COMMAND_IO } else { COMMAND_MEMORY };
        if self.command() & enable == 0 {
            return None;
        }
        self.bars().find_map(|(i, bar)| {
            if (bar.kind == BarKind::Io) != io {
                return None;
            }
            let base = self.bar_address(i)?;
            (base != 0 && addr >= base && addr - base < bar.size).then(|| (i, addr - base))
        })
    }

    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    pub fn interrupt_pin(&mut self, pin: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
    }

    /// Appends a capability (`body` starts with its ID; the next pointer
    /// byte is filled in here). `writable` masks the guest's writes into it
    /// (same length as `body`). Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len().max(2);
        let off = self.next_capability;
        if off + len > STANDARD_SIZE || writable.len() != body.len() {
            return Err(ConfigError::NoCapabilityRoom(len));
        }
        self.bytes[off..off + body.len()].copy_from_slice(body);
        self.writable[off..off + body.len()].copy_from_slice(writable);
        self.bytes[off + 1] = 0;
        self.writable[off + 1] = 0;
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = off as u8;
                let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(off);
        self.next_capability = (off + len + 3) & !3;
        Ok(off)
    }

    /// Guest read of `data.len()` bytes at `offset` (out of range: all ones).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// Guest write: only the bits the masks allow change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let Some(mask) = self.writable.get(offset + i).copied() else {
                return;
            };
            let b = &mut self.bytes[offset + i];
            *b = (*b & !mask) | (v & mask);
        }
    }

    /// All of the function's configuration bytes, for a snapshot.
    pub fn save(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Takes back saved bytes. Refused (nothing changed) unless they have
    /// the right length and every bit the guest cannot write (IDs, BAR
    /// types, capabilities) is what this function has: a snapshot of
    /// another device does not fit.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), ConfigError> {
        self.check(saved)?;
        self.bytes.copy_from_slice(saved);
        Ok(())
    }

    /// Whether [`ConfigSpace::restore`] would take `saved`.
    pub fn check(&self, saved: &[u8]) -> Result<(), ConfigError> {
        if saved.len() != CONFIG_SPACE_SIZE {
            return Err(ConfigError::Mismatch(format!(
                "{} configuration bytes (expected {CONFIG_SPACE_SIZE})",
                saved.len()
            )));
        }
        let differs =
            (0..CONFIG_SPACE_SIZE).find(|&i| (saved[i] ^ self.bytes[i]) & !self.writable[i] != 0);
        if let Some(i) = differs {
            return Err(ConfigError::Mismatch(format!(
                "read-only configuration byte {i:#x} is {:#04x}, this function has {:#04x}",
                saved[i], self.bytes[i]
            )));
        }
        Ok(())
    }

    /// Device-side access to the raw bytes (capability state the device owns).
    pub fn raw(&self, offset: usize, len: usize) -> &[u8] {
        &self.bytes[offset..offset + len]
    }

    pub fn raw_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        &mut self.bytes[offset..offset + len]
    }

    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    pub fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[off..off + 4]);
        u32::from_le_bytes(b)
    }

    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: (0x01, 0x00, 0x00),
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn read32(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_is_read_only_except_command_and_interrupt_line() {
        let mut c = ConfigSpace::new(ids());
        assert_eq!(read32(&c, 0), 0x1042_1af4);
        assert_eq!(read32(&c, 8) >> 8, 0x01_00_00, "class");
        c.write(0, &[0xff; 4]);
        assert_eq!(read32(&c, 0), 0x1042_1af4, "IDs ignore writes");
        c.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x0407);
        c.write(INTERRUPT_LINE, &[9]);
        assert_eq!(c.raw(INTERRUPT_LINE, 1), &[9]);
        let mut b = [0u8; 4];
        c.read(CONFIG_SPACE_SIZE - 2, &mut b);
        assert_eq!(b, [0xff; 4], "reads past the end are all ones");
        c.write(CONFIG_SPACE_SIZE - 1, &[1, 2, 3, 4]); // must not panic
    }

    #[test]
    fn bar_sizing_and_programming_32_and_64_bit() {
        let mut c = ConfigSpace::new(ids());
        c.add_bar(
            0,
            Bar {
                kind: BarKind::Mem32,
                size: 0x4000,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            Bar {
                kind: BarKind::Mem64 { prefetchable: true },
                size: 1 << 33,
            },
        )
        .unwrap();
        // Sizing: write all ones, read back the mask plus the type bits.
        c.write(BAR0, &[0xff; 4]);
        assert_eq!(read32(&c, BAR0), 0xffff_c000);
        c.write(BAR0 + 8, &[0xff; 4]);
        c.write(BAR0 + 12, &[0xff; 4]);
        assert_eq!(
            read32(&c, BAR0 + 8),
            0x0000_000c,
            "64-bit prefetchable, low bits"
        );
        assert_eq!(read32(&c, BAR0 + 12), 0xffff_fffe, "8 GiB: upper mask");
        // Programming.
        c.set_bar_address(0, 0xc000_0000);
        c.set_bar_address(2, 0x8_0000_0000);
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        assert_eq!(c.bar_address(2), Some(0x8_0000_0000));
        assert_eq!(read32(&c, BAR0 + 8) & 0xf, 0xc, "type bits kept");
        // Decoding only with memory space enabled.
        assert_eq!(c.bar_containing(0xc000_0010), None);
        c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar_containing(0xc000_0010), Some((0, 0x10)));
        assert_eq!(c.bar_containing(0xc000_4000), None);
        assert_eq!(c.bar_containing(0x8_0000_1000), Some((2, 0x1000)));
        assert_eq!(c.bar(1), None);
    }

    #[test]
    fn io_bars_size_program_and_decode_ports() {
        let mut c = ConfigSpace::new(ids());
        let io = Bar {
            kind: BarKind::Io,
            size: 8,
        };
        c.add_bar(0, io).unwrap();
        assert_eq!(read32(&c, BAR0), 1, "I/O space indicator");
        // Sizing: all ones reads back the size mask, 16 bits of ports.
        c.write(BAR0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&c, BAR0), 0xfff9);
        c.set_bar_address(0, 0xc010);
        assert_eq!(c.bar_address(0), Some(0xc010));
        assert_eq!(read32(&c, BAR0), 0xc011);
        // Decoding only with I/O space enabled, and never as memory.
        assert_eq!(c.io_bar_containing(0xc013), None);
        c.write(COMMAND, &(COMMAND_IO | COMMAND_MEMORY).to_le_bytes());
        assert_eq!(c.io_bar_containing(0xc013), Some((0, 3)));
        assert_eq!(c.io_bar_containing(0xc018), None);
        assert_eq!(c.bar_containing(0xc013), None);
        for size in [2, 12, 512] {
            let bad = Bar {
                kind: BarKind::Io,
                size,
            };
            assert_eq!(c.add_bar(1, bad), Err(ConfigError::BarSize(size)));
        }
    }

    #[test]
    fn bar_declarations_are_checked() {
        let mut c = ConfigSpace::new(ids());
        let mem64 = Bar {
            kind: BarKind::Mem64 {
                prefetchable: false,
            },
            size: 0x1000,
        };
        assert_eq!(c.add_bar(5, mem64), Err(ConfigError::BarTaken(5)));
        c.add_bar(0, mem64).unwrap();
        assert_eq!(c.add_bar(1, mem64), Err(ConfigError::BarTaken(1)));
        let odd = Bar {
            kind: BarKind::Mem32,
            size: 0x1800,
        };
        assert_eq!(c.add_bar(2, odd), Err(ConfigError::BarSize(0x1800)));
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = ConfigSpace::new(ids());
        let a = c
            .add_capability(&[0x11, 0, 1, 2], &[0, 0, 0xff, 0])
            .unwrap();
        let b = c.add_capability(&[0x09, 0, 7], &[0; 3]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_eq!(c.raw(CAPABILITIES_POINTER, 1), &[0x40]);
        assert_eq!(c.raw(0x41, 1), &[0x44], "a links to b");
        assert_eq!(c.raw(0x45, 1), &[0], "b ends the list");
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        c.write(0x42, &[0xaa, 0xbb]);
        assert_eq!(c.raw(0x42, 2), &[0xaa, 2], "only the writable byte changed");
        assert!(c.add_capability(&[0u8; 200], &[0u8; 200]).is_err());
    }
}
