//! `task=rng`: reads 64 bytes twice from virtio-rng; prints `rng_bytes=`,
//! `rng_distinct=1` when the two reads differ, and the first read in hex.
use crate::boot::BootInfo;
use crate::virtio::{self, Device, Queue};
use crate::{println, STATUS_PROBE_ERROR};

struct Hex<'a>(&'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

pub fn run(info: &mut BootInfo) -> u8 {
    let Some(f) = virtio::find(info.ecam_base(), 4, 0) else {
        println!("probe: error: no virtio-rng device");
        return STATUS_PROBE_ERROR;
    };
    let Ok(dev) = Device::open(f, 0) else {
        println!("probe: error: virtio-rng did not accept the driver");
        return STATUS_PROBE_ERROR;
    };
    let Some(mem) = info.take(Queue::bytes(16) + 0x1000) else {
        return STATUS_PROBE_ERROR;
    };
    let Ok(mut q) = dev.setup_queue(0, 16, mem) else {
        return STATUS_PROBE_ERROR;
    };
    dev.driver_ok();
    let buf = mem + Queue::bytes(16);
    let mut reads = [[0u8; 64]; 2];
    for r in reads.iter_mut() {
        let Some(n) = q.submit(&[(buf, 64, true)], 1_000_000) else {
            println!("probe: error: virtio-rng did not answer");
            return STATUS_PROBE_ERROR;
        };
        println!("rng_bytes={n}");
        // SAFETY: `buf` is 64 bytes of task memory the device just filled.
        r.copy_from_slice(unsafe { core::slice::from_raw_parts(buf as *const u8, 64) });
    }
    println!("rng_distinct={}", u8::from(reads[0] != reads[1]));
    println!("rng_hex={}", Hex(&reads[0]));
    0
}
