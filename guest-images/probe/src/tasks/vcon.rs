//! `task=vcon lines=N`: writes N lines through the virtio console's
//! transmit queue; prints `vcon_lines=N`.
use crate::boot::{Args, BootInfo};
use crate::virtio::{self, Device, Queue};
use crate::{println, STATUS_PROBE_ERROR};

pub fn run(info: &mut BootInfo, args: &Args) -> u8 {
    let lines = args.num("lines", 10);
    let Some(f) = virtio::find(info.ecam_base(), 3, 0) else {
        println!("probe: error: no virtio-console device");
        return STATUS_PROBE_ERROR;
    };
    let Ok(dev) = Device::open(f, 0) else {
        return STATUS_PROBE_ERROR;
    };
    let Some(mem) = info.take(Queue::bytes(16) + 0x1000) else {
        return STATUS_PROBE_ERROR;
    };
    let Ok(mut tx) = dev.setup_queue(1, 16, mem) else {
        println!("probe: error: virtio-console transmit queue");
        return STATUS_PROBE_ERROR;
    };
    dev.driver_ok();
    let buf = mem + Queue::bytes(16);
    for i in 0..lines {
        let mut line = [0u8; 64];
        let mut w = Cursor {
            buf: &mut line,
            at: 0,
        };
        let _ = core::fmt::write(&mut w, format_args!("vcon line {i} from the probe\n"));
        let n = w.at;
        // SAFETY: `buf` is task memory; the device reads it only while the
        // request is in flight and we wait for it below.
        unsafe { core::ptr::copy_nonoverlapping(line.as_ptr(), buf as *mut u8, n) };
        if tx.submit(&[(buf, n as u32, false)], 1_000_000).is_none() {
            println!("probe: error: virtio-console did not take line {i}");
            return STATUS_PROBE_ERROR;
        }
    }
    println!("vcon_lines={lines}");
    0
}

struct Cursor<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl core::fmt::Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = (self.at + s.len()).min(self.buf.len());
        self.buf[self.at..end].copy_from_slice(&s.as_bytes()[..end - self.at]);
        self.at = end;
        Ok(())
    }
}
