//! PCI configuration access from ring 3: mechanism #1 (ports 0xCF8/0xCFC,
//! standard 256 bytes) and ECAM (MMIO, all 4 KiB; base from ACPI MCFG).
use crate::arch::{inl, mmio_read32, mmio_write32, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Bus 0, function 0 of `dev`: the only functions the probe drives.
#[derive(Clone, Copy)]
pub struct Function {
    pub dev: u8,
    pub ecam: Option<u64>,
}

impl Function {
    fn address(self, reg: u16) -> u32 {
        (1 << 31) | (u32::from(self.dev) << 11) | u32::from(reg & 0xfc)
    }

    /// Through ports 0xCF8/0xCFC (registers below 256 only).
    pub fn io_read32(self, reg: u16) -> u32 {
        outl(CONFIG_ADDRESS, self.address(reg));
        inl(CONFIG_DATA)
    }

    pub fn io_write32(self, reg: u16, value: u32) {
        outl(CONFIG_ADDRESS, self.address(reg));
        outl(CONFIG_DATA, value);
    }

    fn ecam_addr(self, reg: u16) -> Option<u64> {
        self.ecam
            .map(|base| base + (u64::from(self.dev) << 15) + u64::from(reg & 0xffc))
    }

    /// Through ECAM when the VM has one, else through the ports.
    pub fn read32(self, reg: u16) -> u32 {
        match self.ecam_addr(reg) {
            Some(a) => mmio_read32(a),
            None => self.io_read32(reg),
        }
    }

    pub fn write32(self, reg: u16, value: u32) {
        match self.ecam_addr(reg) {
            Some(a) => mmio_write32(a, value),
            None => self.io_write32(reg, value),
        }
    }

    /// The address BAR `bar` is programmed with (64-bit BARs whole).
    pub fn bar_address(self, bar: u8) -> u64 {
        let reg = 0x10 + 4 * u16::from(bar);
        let lo = self.read32(reg);
        let mut addr = u64::from(lo & !0xf);
        if lo & 0x6 == 0x4 {
            addr |= u64::from(self.read32(reg + 4)) << 32;
        }
        addr
    }

    /// Offset of the first capability with `id`, if the function has one.
    pub fn find_capability(self, id: u8) -> Option<u16> {
        let mut cap = (self.read32(0x34) & 0xfc) as u16;
        let mut guard = 0;
        while cap != 0 && guard < 48 {
            let head = self.read32(cap);
            if head as u8 == id {
                return Some(cap);
            }
            cap = ((head >> 8) & 0xfc) as u16;
            guard += 1;
        }
        None
    }

    pub fn ids(self) -> Option<(u16, u16)> {
        let v = self.read32(0);
        (v & 0xffff != 0xffff).then_some((v as u16, (v >> 16) as u16))
    }
}

/// Every function present on bus 0.
pub fn scan(ecam: Option<u64>) -> impl Iterator<Item = Function> {
    (0..32u8)
        .map(move |dev| Function { dev, ecam })
        .filter(|f| f.ids().is_some())
}
