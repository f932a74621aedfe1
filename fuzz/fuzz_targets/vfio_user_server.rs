//! A vfio-user server that says anything: the input is the byte stream
//! the "server" end of a socket pair sends to ffmk-vmm's client
//! (`vfio_ib::vfio_user::VfioUser`), all at once, before it hangs up.
//! The client negotiates, reads regions and interrupts, and if that
//! succeeds does what a guest would make it do (configuration and BAR
//! reads and writes, MSI-X on and off, reset), while the server's DMA
//! requests in the stream are served against a 64 KiB guest memory.
//! What must hold: no panic and no hang; DMA never reaches outside that
//! memory; once the client has given up on the server, every read
//! returns all ones.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vfio_ib::backend::{Backend, CONFIG_REGION, IRQ_MSIX};
use vfio_ib::vfio_user::{GuestDma, NotRam, VfioUser};
use vmm_sys_util::eventfd::EventFd;

const BASE: u64 = 0x10000;
const SIZE: usize = 0x10000;

struct Memory(Mutex<Vec<u8>>);

impl Memory {
    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, String> {
        let start = gpa.checked_sub(BASE).ok_or("below RAM")? as usize;
        let end = start.checked_add(len).ok_or("overflow")?;
        if end > SIZE {
            return Err("above RAM".into());
        }
        Ok(start..end)
    }
}

impl GuestDma for Memory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        let len = buf.len();
        let r = self.range(gpa, len).map_err(|_| NotRam { gpa, len })?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        let len = data.len();
        let r = self.range(gpa, len).map_err(|_| NotRam { gpa, len })?;
        self.0.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    sandbox::seccomp::set_mode(sandbox::Mode::Off);
    let (client, server) = UnixStream::pair().unwrap();
    let input = data.to_vec();
    let peer = std::thread::spawn(move || {
        let _ = (&server).write_all(&input);
        let _ = server.shutdown(std::net::Shutdown::Write);
        // Take whatever the client sends until it hangs up.
        let mut sink = [0u8; 4096];
        while matches!((&server).read(&mut sink), Ok(n) if n > 0) {}
    });
    let mem = Arc::new(Memory(Mutex::new(vec![0; SIZE])));
    let dev = VfioUser::from_stream(
        client,
        Path::new("fuzz"),
        mem.clone(),
        Duration::from_millis(200),
    );
    if let Ok(dev) = dev {
        let mut b = [0u8; 4];
        dev.read(CONFIG_REGION, 0, &mut b);
        dev.write(CONFIG_REGION, 4, &[6, 0]);
        dev.read(0, 0x800, &mut b);
        dev.write(0, 0x800, &[1, 0, 0, 0]);
        let fds: Vec<EventFd> = (0..dev.irq_count(IRQ_MSIX).min(8))
            .map(|_| EventFd::new(0).unwrap())
            .collect();
        let refs: Vec<&EventFd> = fds.iter().collect();
        let _ = dev.enable_irqs(IRQ_MSIX, &refs);
        let _ = dev.disable_irqs(IRQ_MSIX);
        dev.reset();
        if dev.failure().is_some() {
            let mut after = [0u8; 8];
            dev.read(CONFIG_REGION, 0, &mut after);
            assert_eq!(after, [0xff; 8], "a broken server's device reads all ones");
        }
        drop(dev);
    }
    let _ = peer.join();
    assert_eq!(mem.0.lock().unwrap().len(), SIZE);
});
