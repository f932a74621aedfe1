//! `task=edu`: drives QEMU's `edu` test device (1234:11e8) passed through
//! to the probe with `--device vfio=...` (the nested lab, docs/vfio.md):
//! reads its ID through the BAR, checks liveness and a factorial, sets up
//! MSI and sees an interrupt the device raises, and has the device DMA a
//! pattern from guest RAM into its buffer and back into another buffer.
//! Prints `edu_*=` lines; exits non-zero on the first thing that fails.
//! `rounds=N` times N BAR reads (`edu_mmio_read_ns=`, the median of 5 runs)
//! and N interrupts (`edu_msi_latency_us=`). `msi=0` leaves interrupts out
//! (DMA completion is then polled). `wait=S` scans the bus for up to S
//! seconds for a device plugged in later.
use crate::boot::BootInfo;
use crate::pci::{scan, Function};
use crate::{arch, irq, println, time, STATUS_PROBE_ERROR};

const ID: u64 = 0x00;
const LIVENESS: u64 = 0x04;
const FACTORIAL: u64 = 0x08;
const STATUS: u64 = 0x20;
const IRQ_STATUS: u64 = 0x24;
const IRQ_RAISE: u64 = 0x60;
const IRQ_ACK: u64 = 0x64;
const DMA_SRC: u64 = 0x80;
const DMA_DST: u64 = 0x88;
const DMA_COUNT: u64 = 0x90;
const DMA_CMD: u64 = 0x98;
/// The device's own buffer, in its DMA address space.
const EDU_BUFFER: u32 = 0x40000;
/// QEMU 7.2's edu aborts on a transfer of exactly 4096 bytes.
const DMA_BYTES: u32 = 1024;
const VECTOR: u8 = irq::DEVICE_VECTOR;

fn fail(msg: &str) -> u8 {
    println!("probe: error: edu: {msg}");
    STATUS_PROBE_ERROR
}

fn wait(bar: u64, reg: u64, bit: u32, timeout_us: u64) -> bool {
    let deadline = time::now_us() + timeout_us;
    while arch::mmio_read32(bar + reg) & bit != 0 {
        if time::now_us() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

fn wait_irq(before: u32, timeout_us: u64) -> Option<u64> {
    let start = time::now_us();
    while irq::count(0, VECTOR) == before {
        if time::now_us() > start + timeout_us {
            return None;
        }
        core::hint::spin_loop();
    }
    Some(time::now_us() - start)
}

/// MSI capability: 64-bit address at +4, data at +0xc (or +8 with 32-bit).
fn enable_msi(f: Function) -> bool {
    let Some(cap) = f.find_capability(0x05) else {
        return false;
    };
    let control = (f.read32(cap) >> 16) as u16;
    let addr = 0xfee0_0000 | ((irq::apic_id() & 0xff) << 12);
    f.write32(cap + 4, addr);
    if control & (1 << 7) != 0 {
        f.write32(cap + 8, 0);
        f.write32(cap + 0xc, u32::from(VECTOR));
    } else {
        f.write32(cap + 8, u32::from(VECTOR));
    }
    // Enable, one message.
    let head = f.read32(cap);
    f.write32(cap, (head & !(0x70 << 16)) | (1 << 16));
    f.read32(cap) & (1 << 16) != 0
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

pub fn run(info: &mut BootInfo, args: &crate::boot::Args) -> u8 {
    let rounds = args.num("rounds", 0);
    let use_msi = args.num("msi", 1) != 0;
    // wait=S: keep scanning the bus for up to S seconds (hot-plug).
    let wait_us = args.num("wait", 0) * 1_000_000;
    let ecam = info.ecam_base();
    let start = time::now_us();
    let mut found = scan(ecam).find(|f| f.ids() == Some((0x1234, 0x11e8)));
    while found.is_none() && time::now_us() - start < wait_us {
        time::delay_us(10_000);
        found = scan(ecam).find(|f| f.ids() == Some((0x1234, 0x11e8)));
    }
    let Some(f) = found else {
        return fail("no edu device (1234:11e8) on the bus; pass one with --device vfio=...");
    };
    println!("edu_bdf=00:{:02x}.0", f.dev);
    let bar = f.bar_address(0);
    if bar == 0 {
        return fail("BAR 0 is not programmed");
    }
    // Memory decoding and bus mastering.
    f.write32(4, f.read32(4) | 0x6);
    let id = arch::mmio_read32(bar + ID);
    println!("edu_id={id:#010x}");
    if id & 0xff != 0xed {
        return fail("BAR 0 does not read as an edu device");
    }
    arch::mmio_write32(bar + LIVENESS, 0x1234_5678);
    let live = arch::mmio_read32(bar + LIVENESS);
    println!("edu_liveness={}", u8::from(live == !0x1234_5678u32));
    arch::mmio_write32(bar + FACTORIAL, 10);
    if !wait(bar, STATUS, 1, 2_000_000) {
        return fail("factorial never finished");
    }
    let fact = arch::mmio_read32(bar + FACTORIAL);
    println!("edu_factorial={fact}");

    if rounds > 0 {
        let mut reads = [0u64; 5];
        for r in reads.iter_mut() {
            let t0 = arch::rdtsc();
            for _ in 0..rounds {
                let _ = arch::mmio_read32(bar + ID);
            }
            *r = time::cycles_to_us((arch::rdtsc() - t0) * 1000) / rounds;
        }
        println!("edu_mmio_read_ns={}", median(&mut reads));
    }

    // MSI: the device raises, the guest's local APIC takes it.
    if use_msi {
        irq::enable_this_cpu(0);
        if !enable_msi(f) {
            return fail("no MSI capability, or it did not enable");
        }
        let before = irq::count(0, VECTOR);
        arch::mmio_write32(bar + IRQ_RAISE, 0x1);
        let got = wait_irq(before, 2_000_000);
        println!("edu_irq_status={:#x}", arch::mmio_read32(bar + IRQ_STATUS));
        arch::mmio_write32(bar + IRQ_ACK, 0x1);
        println!("edu_msi={}", u8::from(got.is_some()));
        if got.is_none() {
            return fail("the MSI never arrived");
        }
    }

    // DMA: guest RAM -> device buffer -> other guest RAM.
    let Some(mem) = info.take(2 * 4096) else {
        return fail("no memory for DMA buffers");
    };
    let (src, dst) = (mem, mem + 4096);
    if dst + 4096 > 1 << 28 {
        return fail("DMA buffers above 256 MiB (edu's DMA mask); give the probe less memory");
    }
    for i in 0..DMA_BYTES as u64 {
        // SAFETY: task memory the probe owns, identity mapped.
        unsafe {
            core::ptr::write_volatile((src + i) as *mut u8, (i as u8).wrapping_mul(7) ^ 0x5a);
            core::ptr::write_volatile((dst + i) as *mut u8, 0);
        }
    }
    arch::mmio_write32(bar + DMA_SRC, src as u32);
    arch::mmio_write32(bar + DMA_DST, EDU_BUFFER);
    arch::mmio_write32(bar + DMA_COUNT, DMA_BYTES);
    arch::mmio_write32(bar + DMA_CMD, 0x1);
    if !wait(bar, DMA_CMD, 1, 5_000_000) {
        return fail("DMA to the device never finished");
    }
    let before = irq::count(0, VECTOR);
    arch::mmio_write32(bar + DMA_SRC, EDU_BUFFER);
    arch::mmio_write32(bar + DMA_DST, dst as u32);
    arch::mmio_write32(bar + DMA_COUNT, DMA_BYTES);
    // Device to RAM, interrupt when done.
    let irq_bit = if use_msi { 0x4 } else { 0 };
    arch::mmio_write32(bar + DMA_CMD, 0x1 | 0x2 | irq_bit);
    if !wait(bar, DMA_CMD, 1, 5_000_000) {
        return fail("DMA from the device never finished");
    }
    let irq_done = !use_msi || wait_irq(before, 2_000_000).is_some();
    arch::mmio_write32(bar + IRQ_ACK, 0x100);
    let same = (0..DMA_BYTES as u64).all(|i| {
        // SAFETY: as above; the device wrote it by DMA.
        unsafe {
            core::ptr::read_volatile((src + i) as *const u8)
                == core::ptr::read_volatile((dst + i) as *const u8)
        }
    });
    println!("edu_dma_bytes={DMA_BYTES}");
    println!("edu_dma={}", u8::from(same));
    if use_msi {
        println!("edu_dma_irq={}", u8::from(irq_done));
    }
    if !same || !irq_done {
        return fail("DMA round trip failed");
    }

    if rounds > 0 && use_msi {
        let mut lat = [0u64; 64];
        let n = (rounds as usize).clamp(1, lat.len());
        for l in lat.iter_mut().take(n) {
            let before = irq::count(0, VECTOR);
            arch::mmio_write32(bar + IRQ_RAISE, 0x2);
            *l = wait_irq(before, 2_000_000).unwrap_or(u64::MAX);
            arch::mmio_write32(bar + IRQ_ACK, 0x2);
        }
        println!("edu_msi_latency_us={}", median(&mut lat[..n]));
    }
    if use_msi {
        irq::disable_this_cpu();
    }
    0
}
