//! What the VMM tells the probe: the PVH start_info (command line, memory map,
//! RSDP), and the ACPI MADT (how many CPUs to expect).

extern "C" {
    static pvh_start_info: u32;
    static __image_end: u8;
}

const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const MAX_RANGES: usize = 16;

#[derive(Clone, Copy, Default)]
pub struct Range {
    pub start: u64,
    pub len: u64,
}

pub struct BootInfo {
    pub cmdline: &'static str,
    /// RAM the probe may use freely (after its image, below 16 GiB).
    pub free: [Range; MAX_RANGES],
    pub nfree: usize,
    pub mem_bytes: u64,
    pub rsdp: u64,
}

pub fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: all guest-physical memory below 16 GiB is identity-mapped and
    // user-accessible; the VMM/firmware placed these structures there.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    pub fn read() -> BootInfo {
        // SAFETY: written once by the PVH entry code before ring 3 started.
        let si = unsafe { core::ptr::read_volatile(&raw const pvh_start_info) } as u64;
        let mut info = BootInfo {
            cmdline: "",
            free: [Range::default(); MAX_RANGES],
            nfree: 0,
            mem_bytes: 0,
            rsdp: 0,
        };
        if si == 0 || read::<u32>(si) != PVH_MAGIC {
            return info;
        }
        let version: u32 = read(si + 4);
        let cmdline_paddr: u64 = read(si + 24);
        info.rsdp = read(si + 32);
        if cmdline_paddr != 0 {
            let mut len = 0usize;
            while len < 4096 && read::<u8>(cmdline_paddr + len as u64) != 0 {
                len += 1;
            }
            // SAFETY: `len` bytes were just read from this identity-mapped range.
            let bytes = unsafe { core::slice::from_raw_parts(cmdline_paddr as *const u8, len) };
            info.cmdline = core::str::from_utf8(bytes).unwrap_or("");
        }
        if version >= 1 {
            let memmap: u64 = read(si + 40);
            let entries: u32 = read(si + 48);
            let image_end = &raw const __image_end as u64;
            let floor = (image_end + 0xfffff) & !0xfffff;
            for i in 0..entries.min(64) as u64 {
                let e = memmap + i * 24;
                let (addr, size, kind): (u64, u64, u32) = (read(e), read(e + 8), read(e + 16));
                if kind != E820_RAM {
                    continue;
                }
                info.mem_bytes += size;
                let start = addr.max(floor);
                let end = (addr + size).min(16 << 30);
                if end > start && info.nfree < MAX_RANGES {
                    info.free[info.nfree] = Range {
                        start,
                        len: end - start,
                    };
                    info.nfree += 1;
                }
            }
        }
        info
    }

    /// The page holding the PVH start_info (must not be reused).
    pub fn start_info_page(&self) -> u64 {
        // SAFETY: written once by the PVH entry code before ring 3 started.
        (unsafe { core::ptr::read_volatile(&raw const pvh_start_info) } as u64) & !0xfff
    }

    pub fn args(&self) -> Args {
        Args {
            cmdline: self.cmdline,
        }
    }

    /// Total free RAM in bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free[..self.nfree].iter().map(|r| r.len).sum()
    }

    /// Carves `bytes` (2 MiB aligned) out of the free ranges, from the top of
    /// the last range, so task buffers do not overlap each other.
    pub fn take(&mut self, bytes: u64) -> Option<u64> {
        let bytes = (bytes + 0x1f_ffff) & !0x1f_ffff;
        for r in self.free[..self.nfree].iter_mut().rev() {
            let end = r.start + r.len;
            let start = (end.saturating_sub(bytes)) & !0x1f_ffff;
            if start >= r.start && end - start >= bytes {
                r.len = start - r.start;
                return Some(start);
            }
        }
        None
    }

    /// Number of enabled local APICs in the MADT, if the ACPI tables are found.
    pub fn madt_cpus(&self) -> Option<usize> {
        self.acpi_table(b"APIC").map(count_lapics)
    }

    /// The ECAM base of PCI segment 0, bus 0 from the MCFG table.
    pub fn ecam_base(&self) -> Option<u64> {
        let mcfg = self.acpi_table(b"MCFG")?;
        let len: u32 = read(mcfg + 4);
        // header (36) + reserved (8), then 16-byte allocations
        (len >= 60).then(|| read::<u64>(mcfg + 44))
    }

    /// The address of the ACPI table with `signature` (through XSDT or RSDT).
    pub fn acpi_table(&self, signature: &[u8; 4]) -> Option<u64> {
        let rsdp = if self.rsdp != 0 {
            self.rsdp
        } else {
            scan_rsdp()?
        };
        let revision: u8 = read(rsdp + 15);
        let (table, entry) = if revision >= 2 && read::<u64>(rsdp + 24) != 0 {
            (read::<u64>(rsdp + 24), 8)
        } else {
            (read::<u32>(rsdp + 16) as u64, 4)
        };
        let len: u32 = read(table + 4);
        let mut p = table + 36;
        while p + entry <= table + len as u64 {
            let sdt = if entry == 8 {
                read::<u64>(p)
            } else {
                read::<u32>(p) as u64
            };
            if &read::<[u8; 4]>(sdt) == signature {
                return Some(sdt);
            }
            p += entry;
        }
        None
    }
}

fn scan_rsdp() -> Option<u64> {
    let mut a = 0xe0000u64;
    while a < 0x100000 {
        if &read::<[u8; 8]>(a) == b"RSD PTR " {
            return Some(a);
        }
        a += 16;
    }
    None
}

fn count_lapics(madt: u64) -> usize {
    let len: u32 = read(madt + 4);
    let mut p = madt + 44;
    let mut n = 0;
    while p + 2 <= madt + len as u64 {
        let (kind, elen): (u8, u8) = (read(p), read(p + 1));
        if elen < 2 {
            break;
        }
        // type 0: processor local APIC (flags at +4); type 9: local x2APIC (flags at +8)
        if (kind == 0 && read::<u32>(p + 4) & 1 != 0) || (kind == 9 && read::<u32>(p + 8) & 1 != 0)
        {
            n += 1;
        }
        p += elen as u64;
    }
    n
}

/// `key=value` words of the command line.
pub struct Args {
    cmdline: &'static str,
}

impl Args {
    pub fn get(&self, key: &str) -> Option<&'static str> {
        self.cmdline.split_ascii_whitespace().find_map(|w| {
            let (k, v) = w.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// A numeric argument (decimal or 0x-hex), `default` when absent.
    /// A malformed value ends the probe with a clear message.
    pub fn num(&self, key: &str, default: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(v) => {
                let parsed = match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => v.parse(),
                };
                match parsed {
                    Ok(n) => n,
                    Err(_) => {
                        crate::println!("probe: error: {key}={v} is not a number");
                        crate::arch::exit(crate::STATUS_PROBE_ERROR)
                    }
                }
            }
        }
    }
}
