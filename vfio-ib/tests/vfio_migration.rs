//! VFIO migration v2 against a real kernel driver: the kernel's `mtty`
//! sample (a mediated 16550-style serial port whose transmit register
//! loops back into its receive FIFO; migration with PRE_COPY since Linux
//! 6.7). Runs where the mtty driver is loaded, or FFMK_MTTY_MODULE names
//! its mtty.ko to load (the lab with its 6.12 L1: `ci/test-vfio` builds it
//! with ci/lab.d/mtty-module); elsewhere it prints "skipped"
//! (FFMK_MTTY_REQUIRED=1 makes that a failure).
//!
//! Two mtty devices are created, opened through one VFIO container as
//! ffmk-vmm opens them, and the first one's state (bytes waiting in its
//! FIFO, written before and during PRE_COPY) is moved to the second with
//! PRE_COPY, STOP_COPY and RESUMING: the bytes arrive there in order, none
//! lost or doubled, and the source keeps its own. Corrupt or cut states
//! are refused and leave the device usable.
use std::path::Path;
use std::time::Instant;
use vfio_ib::kernel::Iommu;
use vfio_ib::migration::{Error, State};
use vfio_ib::{Backend, HostDevice};

const TYPES: &str = "/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1";
/// 16550 registers (offsets in the I/O BAR).
const UART_DATA: u64 = 0;
const UART_LSR: u64 = 5;
const LSR_DATA_READY: u8 = 1;

/// An mtty device created for the test, removed when dropped.
struct Mdev(String);

impl Mdev {
    fn create(uuid: &str) -> Mdev {
        std::fs::write(format!("{TYPES}/create"), uuid).expect("create an mtty device");
        Mdev(uuid.into())
    }

    fn device(&self) -> HostDevice {
        format!("/sys/bus/mdev/devices/{}", self.0).parse().unwrap()
    }
}

impl Drop for Mdev {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("/sys/bus/mdev/devices/{}/remove", self.0), "1");
    }
}

fn send(dev: &dyn Backend, bytes: &[u8]) {
    for &b in bytes {
        dev.write(0, UART_DATA, &[b]);
    }
}

/// Everything in the device's receive FIFO.
fn drain(dev: &dyn Backend) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..64 {
        let mut lsr = [0u8];
        dev.read(0, UART_LSR, &mut lsr);
        if lsr[0] & LSR_DATA_READY == 0 {
            break;
        }
        let mut b = [0u8];
        dev.read(0, UART_DATA, &mut b);
        out.push(b[0]);
    }
    out
}

/// Loads FFMK_MTTY_MODULE's mtty.ko (and what it needs) if the driver
/// is not there yet.
fn load_mtty() {
    if Path::new(TYPES).exists() {
        return;
    }
    let Some(module) = std::env::var_os("FFMK_MTTY_MODULE") else {
        return;
    };
    if !Path::new("/sys/module/mdev").exists() {
        let _ = std::process::Command::new("modprobe").arg("mdev").status();
    }
    let ok = std::process::Command::new("insmod")
        .arg(&module)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "insmod {module:?} failed");
}

/// Whether the mtty driver is there (loaded if need be); false, with a
/// "skipped" line, where it is not.
fn have_mtty() -> bool {
    load_mtty();
    if Path::new(TYPES).exists() {
        return true;
    }
    assert!(
        std::env::var_os("FFMK_MTTY_REQUIRED").is_none(),
        "FFMK_MTTY_REQUIRED is set but the mtty driver is not loaded ({TYPES} is missing)"
    );
    eprintln!("skipped: no mtty driver (ci/test-vfio runs this in the lab)");
    false
}

#[test]
fn an_mtty_devices_state_moves_with_pre_copy_and_stop_copy() {
    if !have_mtty() {
        return;
    }
    let a = Mdev::create("a1b2c3d4-0000-4000-8000-00000000000a");
    let b = Mdev::create("a1b2c3d4-0000-4000-8000-00000000000b");
    let iommu = Iommu::open(None, Vec::new()).expect("a VFIO container");
    let src = iommu.attach(&a.device()).expect("open the first mtty");
    let dst = iommu.attach(&b.device()).expect("open the second mtty");

    let sm = src.migration().expect("mtty migrates");
    let support = sm.support();
    eprintln!("mtty migration support: {support}");
    assert!(
        support.stop_copy && support.p2p && support.pre_copy,
        "{support}"
    );
    assert_eq!(sm.state().unwrap(), State::Running);

    // Written before the migration starts.
    send(&src, b"0123");
    let t = Instant::now();
    sm.begin().unwrap();
    assert_eq!(sm.state().unwrap(), State::PreCopy);
    let pending = sm.precopy_pending().unwrap();
    assert!(pending > 0, "mtty has its header to send in PRE_COPY");
    let mut stream = sm.read_precopy().unwrap();
    assert_eq!(
        stream.len() as u64,
        pending,
        "PRE_COPY gave what it announced"
    );
    assert_eq!(sm.precopy_pending().unwrap(), 0);
    assert!(
        sm.read_precopy().unwrap().is_empty(),
        "nothing more for now"
    );
    // The device runs in PRE_COPY: bytes written now belong to the state too.
    send(&src, b"4567");
    let stop = Instant::now();
    let rest = sm.stop_and_copy().unwrap();
    let stop_ms = stop.elapsed().as_secs_f64() * 1e3;
    assert_eq!(sm.state().unwrap(), State::StopCopy);
    stream.extend_from_slice(&rest);
    eprintln!(
        "saved: {} bytes in PRE_COPY, {} in STOP_COPY ({stop_ms:.2} ms), {:.2} ms in all",
        pending,
        rest.len(),
        t.elapsed().as_secs_f64() * 1e3
    );

    // Loaded into the second device, which had bytes of its own.
    send(&dst, b"xyz");
    let dm = dst.migration().unwrap();
    let load = Instant::now();
    dm.load(&stream).unwrap();
    assert_eq!(dm.state().unwrap(), State::Stop);
    dm.resume().unwrap();
    eprintln!("loaded in {:.2} ms", load.elapsed().as_secs_f64() * 1e3);
    assert_eq!(
        String::from_utf8_lossy(&drain(&dst)),
        "01234567",
        "the source's FIFO, in order, none lost or doubled, the destination's own gone"
    );
    // A save that does not complete leaves the source running with its state.
    sm.resume().unwrap();
    assert_eq!(sm.state().unwrap(), State::Running);
    assert_eq!(String::from_utf8_lossy(&drain(&src)), "01234567");

    // Bad states: refused with the device's name, the device reset and running.
    let mut corrupt = stream.clone();
    corrupt[0] ^= 0xff; // the driver's magic number
    send(&dst, b"q");
    let e = dm.load(&corrupt).unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    assert!(e.to_string().contains(&b.0), "{e}");
    assert_eq!(dm.state().unwrap(), State::Running);
    let cut = &stream[..stream.len() - 1];
    let e = dm.load(cut).unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e}");
    assert_eq!(dm.state().unwrap(), State::Running);
    // Still a working serial port, and neither refused state was loaded
    // (they hold the source's "01234567"); mtty's reset leaves its FIFO
    // alone, so the byte written before them is still there.
    send(&dst, b"ok");
    assert_eq!(String::from_utf8_lossy(&drain(&dst)), "qok");

    // Device DMA dirty logging (mtty does no DMA, but offers the calls).
    // Where the report cannot be read, every page mapped for the device's
    // DMA has to count as dirty at the switch-over.
    match sm.start_dirty_logging(4096, &[(0, 1 << 20)]) {
        Ok(Some(granule)) => {
            match sm.dirty_pages((0, 1 << 20), granule) {
                Ok(words) => {
                    assert!(
                        words.iter().all(|w| *w == 0),
                        "mtty never writes guest memory"
                    )
                }
                Err(e) => eprintln!("DMA dirty log not readable: {e}"),
            }
            sm.stop_dirty_logging().unwrap();
            eprintln!("DMA dirty logging: started, granule {granule}");
        }
        Ok(None) => eprintln!("DMA dirty logging: not offered"),
        Err(e) => panic!("{e}"),
    }
    drop((src, dst));
}

/// The type1 IOMMU's dirty page tracking, which finds what a mediated
/// device without DMA logging of its own (mtty) writes to guest memory
/// during a migration: over a real DMA mapping, started, read (mtty
/// pins no page and writes none: all clean) and stopped.
#[test]
fn the_iommu_container_tracks_dirty_pages_of_a_mediated_device() {
    if !have_mtty() {
        return;
    }
    let m = Mdev::create("a1b2c3d4-0000-4000-8000-00000000000c");
    // 2 MiB of "guest RAM" at guest-physical 1 MiB.
    let len = 2usize << 20;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    let iommu = Iommu::open(None, vec![(1 << 20, host as u64, len as u64)]).unwrap();
    let dev = iommu.attach(&m.device()).expect("open the mtty");
    assert_eq!(iommu.mapped_bytes(), len as u64);
    assert!(
        iommu.dirty_pages().is_err(),
        "no bitmap before the tracking starts"
    );
    iommu
        .start_dirty_tracking()
        .expect("type1 v2 tracks dirty pages");
    iommu
        .start_dirty_tracking()
        .expect("starting again is harmless");
    for _ in 0..2 {
        let dirty = iommu.dirty_pages().unwrap();
        assert_eq!(dirty.len(), 1);
        let (gpa, size, words) = &dirty[0];
        assert_eq!((*gpa, *size), (1 << 20, len as u64));
        assert_eq!(words.len(), 512 / 64, "one bit per 4 KiB page");
        assert!(
            words.iter().all(|w| *w == 0),
            "mtty pins and writes nothing: {words:x?}"
        );
    }
    iommu.stop_dirty_tracking();
    assert!(iommu.dirty_pages().is_err(), "stopped");
    drop(dev);
    iommu.unmap_all();
    // SAFETY: the mapping made above, out of the IOMMU now.
    unsafe { libc::munmap(host, len) };
}
