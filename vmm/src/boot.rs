//! Loading a guest: kernel (ELF vmlinux or bzImage, through linux-loader),
//! initramfs, command line, and the boot information the entry convention
//! needs (PVH start_info or the Linux zero page), plus ACPI tables.
use crate::arch::layout::*;
use crate::arch::regs::EntryMode;
use crate::memory::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

const PVH_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel image (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    KernelLoad {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("cannot open initramfs {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot read initramfs {path} into guest memory: {source}")]
    InitrdLoad {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("cannot write the command line: {0}")]
    CmdlineLoad(loader::Error),
    #[error("cannot write boot parameters: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
    #[error("cannot write boot structures: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

impl Error {
    /// Errors caused by what the user gave us (exit code 2), as opposed to host failures.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::BootParams(_) | Error::Memory(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// What was loaded, and how the boot vCPU must enter it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BootInfo {
    pub format: KernelFormat,
    pub mode: EntryMode,
    pub entry: u64,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Reads the magic numbers of `path` without loading it.
pub fn probe_kernel(path: &Path) -> Result<KernelFormat, Error> {
    let mut f = File::open(path).map_err(|source| Error::KernelOpen {
        path: path.into(),
        source,
    })?;
    let mut head = vec![0u8; 0x210];
    let n = read_up_to(&mut f, &mut head).map_err(|source| Error::KernelOpen {
        path: path.into(),
        source,
    })?;
    let head = &head[..n];
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(Error::NotAKernel { path: path.into() })
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_bytes: u64,
    /// APIC ID of each vCPU, by vCPU number.
    pub apic_ids: &'a [u8],
    pub numa: Option<&'a numa::Layout>,
}

/// Loads everything into `mem` and returns where to start.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<BootInfo, Error> {
    let format = probe_kernel(spec.kernel)?;
    let mut f = File::open(spec.kernel).map_err(|source| Error::KernelOpen {
        path: spec.kernel.into(),
        source,
    })?;
    let load_err = |source| Error::KernelLoad {
        path: spec.kernel.into(),
        source,
    };
    let (mode, entry, kernel_end, setup_header) = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut f, Some(HIGH_MEMORY_START)).map_err(load_err)?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => {
                    (EntryMode::Pvh, addr.0, r.kernel_end, None)
                }
                _ => (EntryMode::Linux64, r.kernel_load.0, r.kernel_end, None),
            }
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(HIGH_MEMORY_START)).map_err(load_err)?;
            (
                EntryMode::Linux64,
                r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                r.kernel_end,
                r.setup_header,
            )
        }
    };

    let initrd = match spec.initrd {
        Some(path) => {
            let max = setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0)
                .unwrap_or(u64::MAX);
            Some(load_initrd(mem, path, kernel_end, spec.mem_bytes, max)?)
        }
        None => None,
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    if !spec.cmdline.is_empty() {
        cmdline.insert_str(spec.cmdline)?;
    }
    loader::load_cmdline(mem, CMDLINE_START, &cmdline).map_err(Error::CmdlineLoad)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .unwrap_or(1);

    let rsdp = crate::arch::acpi::write_tables(mem, spec.apic_ids, spec.mem_bytes, spec.numa)?;
    mem.write_slice(&RESET_VECTOR_STUB, GuestAddress(RESET_VECTOR))?;
    let e820 = e820_map(spec.mem_bytes);
    match mode {
        EntryMode::Pvh => write_pvh_info(mem, &e820, initrd, rsdp)?,
        EntryMode::Linux64 => write_zero_page(mem, &e820, initrd, setup_header, cmdline_len)?,
    }
    Ok(BootInfo {
        format,
        mode,
        entry,
        kernel_end,
        initrd,
    })
}

/// Where a real-mode jump to the BIOS reset entry (`ljmp $0xf000, $0xfff0`)
/// lands.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// What the guest finds there instead of a BIOS: real-mode code that pulses
/// the reset line through the i8042 (`mov al, 0xfe; out 0x64, al`), then
/// halts. Linux reboots a hardware-reduced ACPI machine without EFI through
/// this "BIOS" path (its reboot order is EFI, then BIOS, before ACPI and the
/// keyboard controller); without a stub there it ran into zeroed memory and
/// never reset.
const RESET_VECTOR_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Places the initramfs page-aligned at the top of low RAM (below `max`).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    mem_bytes: u64,
    max: u64,
) -> Result<(u64, u64), Error> {
    let mut f = File::open(path).map_err(|source| Error::InitrdOpen {
        path: path.into(),
        source,
    })?;
    let size = f
        .metadata()
        .map_err(|source| Error::InitrdOpen {
            path: path.into(),
            source,
        })?
        .len();
    let top = mem_bytes.min(MMIO_HOLE_START).min(max.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end && size > 0);
    let addr = addr.ok_or(Error::InitrdTooBig {
        path: path.into(),
        size,
        limit: top,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|source| Error::InitrdLoad {
            path: path.into(),
            source,
        })?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    rsdp: GuestAddress,
) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let memmap_addr = PVH_INFO_START.unchecked_add(std::mem::size_of::<hvm_start_info>() as u64);
    let modlist_addr = memmap_addr
        .unchecked_add((memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64);
    let mut start_info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        rsdp_paddr: rsdp.0,
        memmap_paddr: memmap_addr.0,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = modlist_addr.0;
    }
    let mut params = BootParams::new(&start_info, PVH_INFO_START);
    params.set_sections(&memmap, memmap_addr);
    if !modules.is_empty() {
        params.set_modules(&modules, modlist_addr);
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
) -> Result<(), Error> {
    let mut params = boot_params::default();
    if let Some(h) = setup_header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, ZERO_PAGE_START),
        mem,
    )?;
    Ok(())
}

/// Sanity check used by tests and `GET /vm`: the guest's highest RAM address.
pub fn last_ram_addr(mem: &GuestMemoryMmap) -> u64 {
    mem.last_addr().raw_value()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ffmk-boot-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let p = tmp("text", b"#!/bin/sh\necho not a kernel\n");
        assert!(matches!(probe_kernel(&p), Err(Error::NotAKernel { .. })));
        let e = tmp("empty", b"");
        assert!(matches!(probe_kernel(&e), Err(Error::NotAKernel { .. })));
        assert!(matches!(
            probe_kernel(Path::new("/nonexistent/vmlinux")),
            Err(Error::KernelOpen { .. })
        ));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let b = tmp("bz", &bz);
        assert_eq!(probe_kernel(&b).unwrap(), KernelFormat::BzImage);
        for f in [p, e, b] {
            std::fs::remove_file(f).unwrap();
        }
    }

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let mem = crate::memory::create(64 << 20, crate::memory::HugePages::Off, None).unwrap();
        let e820 = e820_map(64 << 20);
        write_zero_page(&mem, &e820, Some((0x3000000, 0x1234)), None, 10).unwrap();
        let p: boot_params = mem.read_obj(ZERO_PAGE_START).unwrap();
        assert_eq!(p.e820_entries as usize, e820.len());
        let ram = p.e820_table[e820.len() - 2];
        assert_eq!({ ram.addr }, HIGH_MEMORY_START.0);
        let ecam = p.e820_table[e820.len() - 1];
        assert_eq!({ ecam.addr }, PCI_ECAM_START);
        assert_eq!({ ecam.r#type }, E820_RESERVED);
        assert_eq!({ p.hdr.ramdisk_image }, 0x3000000);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START.0 as u32);
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
    }

    #[test]
    fn pvh_start_info_points_at_memmap_cmdline_and_module() {
        let mem = crate::memory::create(64 << 20, crate::memory::HugePages::Off, None).unwrap();
        let e820 = e820_map(64 << 20);
        write_pvh_info(&mem, &e820, Some((0x3000000, 0x800)), ACPI_START).unwrap();
        let si: hvm_start_info = mem.read_obj(PVH_INFO_START).unwrap();
        assert_eq!((si.magic, si.version, si.nr_modules), (PVH_MAGIC, 1, 1));
        assert_eq!(si.memmap_entries as usize, e820.len());
        assert_eq!(si.rsdp_paddr, ACPI_START.0);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x3000000, 0x800));
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(si.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, E820_RAM));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory_or_is_refused() {
        let mem = crate::memory::create(32 << 20, crate::memory::HugePages::Off, None).unwrap();
        let p = tmp("initrd", &[7u8; 5000]);
        let (addr, size) = load_initrd(&mem, &p, 0x200000, 32 << 20, u64::MAX).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 32 << 20);
        assert!(matches!(
            load_initrd(&mem, &p, 32 << 20, 32 << 20, u64::MAX),
            Err(Error::InitrdTooBig { .. })
        ));
        std::fs::remove_file(p).unwrap();
    }
}
