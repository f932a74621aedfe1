//! Post-copy, the destination's side: the VM runs before all of its memory
//! is here.
//!
//! The pages the source dirtied after sending them are dropped
//! (`MADV_DONTNEED`) and guest RAM is registered with userfaultfd. The
//! fault thread turns a fault on a missing page into a REQUEST to the
//! source; the receiver thread puts every arriving page in place with
//! `UFFDIO_COPY`, which wakes whoever waited (a vCPU inside `KVM_RUN`, or a
//! VMM thread such as a device restoring its queues). A fault on a page
//! that is not missing (one nobody ever wrote: zero on the source too) is
//! resolved here with a zero page. Once every missing page is in place the
//! registration ends and DONE goes back: the source may exit.
//!
//! The trade-off, stated plainly: from the moment the destination runs the
//! VM until DONE, the VM's memory is split between the two hosts. If the
//! source or the link fails in between, a fault on a missing page can never
//! be served, so the VM cannot continue: the destination stops it and says
//! so, and the source keeps the state as of the switch-over, paused. No
//! failure can be undone by resuming the source silently.
use crate::protocol::{encode_request, Conn, Kind, PagesIn, MAX_REQUEST};
use crate::{Error, GuestMemory};
use cluster_auth::PlaneStream;
use serde::Serialize;
use snapshot::memory::total_pages;
use snapshot::{PageBitmap, PAGE_SIZE};
use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use userfaultfd::{Event, EventBuffer, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

const PAGE: usize = PAGE_SIZE as usize;

/// Opens a userfaultfd that also traps faults from the kernel (KVM reads
/// guest memory on behalf of the vCPUs), or says why this host cannot.
pub fn open_uffd() -> Result<Uffd, NoUffd> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(NoUffd)
}

/// This host cannot trap page faults for post-copy.
#[derive(Debug, thiserror::Error)]
#[error(
    "this host cannot trap page faults for post-copy (userfaultfd: {0}; it needs \
     CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)"
)]
pub struct NoUffd(userfaultfd::Error);

/// One guest RAM region: host address, length, first page (memory-file
/// numbering).
#[derive(Clone, Copy)]
struct Region {
    host: usize,
    len: usize,
    first: u64,
}

fn regions(mem: &GuestMemory) -> Vec<Region> {
    let mut first = 0;
    mem.iter()
        .map(|r: &GuestRegionMmap<_>| {
            let m: &MmapRegion<_> = r;
            let region = Region {
                host: m.as_ptr() as usize,
                len: r.len() as usize,
                first,
            };
            first += r.len() / PAGE_SIZE;
            region
        })
        .collect()
}

fn page_of(regions: &[Region], addr: usize) -> Option<u64> {
    regions
        .iter()
        .find(|r| addr >= r.host && addr < r.host + r.len)
        .map(|r| r.first + ((addr - r.host) / PAGE) as u64)
}

fn addr_of(regions: &[Region], page: u64) -> Option<usize> {
    regions
        .iter()
        .find(|r| page >= r.first && page < r.first + (r.len / PAGE) as u64)
        .map(|r| r.host + (page - r.first) as usize * PAGE)
}

/// What post-copy did on the destination.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Pages that were missing at the switch-over.
    pub missing_pages: u64,
    /// Faults on missing pages, and how many pages were asked for.
    pub faults: u64,
    pub requested: u64,
    /// Faults resolved here with a zero page.
    pub zero_filled: u64,
    /// Arriving pages that were already in place.
    pub already_present: u64,
    /// From a fault's request to its page in place.
    pub mean_fault_ms: f64,
    pub max_fault_ms: f64,
    /// From POSTCOPY to the last missing page.
    pub total_ms: f64,
}

/// Which pages are still missing.
struct Book {
    missing: PageBitmap,
    left: u64,
    asked: HashMap<u64, Instant>,
    stats: Stats,
    fault_ms_sum: f64,
}

struct Shared {
    uffd: Uffd,
    regions: Vec<Region>,
    book: Mutex<Book>,
    writer: Mutex<Conn<PlaneStream>>,
    stop: AtomicBool,
    /// Why the fault thread gave up (it then breaks the connection).
    fault_error: Mutex<Option<String>>,
    started: Instant,
}

impl Shared {
    fn send(&self, kind: Kind, payload: &[u8]) -> Result<(), Error> {
        self.writer
            .lock()
            .map_err(|_| Error::Protocol("connection lock poisoned".into()))?
            .send(kind, payload)
    }

    fn book(&self) -> Result<std::sync::MutexGuard<'_, Book>, Error> {
        self.book
            .lock()
            .map_err(|_| Error::Protocol("post-copy page book poisoned".into()))
    }

    /// Puts arriving pages in place (pages no longer missing are skipped:
    /// a page may come both pushed and requested).
    fn place(&self, pages: &PagesIn) -> Result<(), Error> {
        let mut guard = self.book()?;
        let book = &mut *guard;
        for (page, data) in pages.iter() {
            if !book.missing.get(page) {
                continue;
            }
            let addr = addr_of(&self.regions, page)
                .ok_or_else(|| Error::Protocol(format!("page {page} is past guest RAM")))?;
            self.fill(page, addr, data, &mut book.stats)?;
            book.missing.clear(page);
            book.left -= 1;
            if let Some(t) = book.asked.remove(&page) {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                book.fault_ms_sum += ms;
                if ms > book.stats.max_fault_ms {
                    book.stats.max_fault_ms = ms;
                }
            }
        }
        Ok(())
    }

    /// Puts `data` (None: zeros) at `addr`, page `page`, and wakes the
    /// threads waiting on it. The kernel may ask to try again while the
    /// address space changes (EAGAIN); a page already there only needs
    /// the wake-up.
    fn fill(
        &self,
        page: u64,
        addr: usize,
        data: Option<&[u8]>,
        stats: &mut Stats,
    ) -> Result<(), Error> {
        let mut tries = 0;
        loop {
            // SAFETY: `addr` is a page of guest RAM registered with this
            // userfaultfd; the kernel copies PAGE bytes from `data`, a
            // live slice of that length, into it (or zero-fills it) and
            // wakes the threads waiting on it. Nothing in this process
            // holds a reference into that page.
            let placed = unsafe {
                match data {
                    Some(d) => self
                        .uffd
                        .copy(d.as_ptr().cast(), addr as *mut _, PAGE, true)
                        .map(|_| ()),
                    None => self.uffd.zeropage(addr as *mut _, PAGE, true).map(|_| ()),
                }
            };
            let errno = match placed {
                Ok(()) => return Ok(()),
                Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e)) => {
                    e as i32
                }
                Err(userfaultfd::Error::PartiallyCopied(_)) => libc::EAGAIN,
                Err(e) => return Err(Error::vm(format!("cannot put page {page} in place: {e}"))),
            };
            match errno {
                libc::EEXIST => {
                    stats.already_present += 1;
                    let _ = self.uffd.wake(addr as *mut _, PAGE);
                    return Ok(());
                }
                libc::EAGAIN if tries < 100 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                _ => {
                    return Err(Error::vm(format!(
                        "cannot put page {page} in place: {}",
                        std::io::Error::from_raw_os_error(errno)
                    )))
                }
            }
        }
    }

    /// Resolves the faults in one read of the userfaultfd; returns the
    /// pages to ask the source for.
    fn on_faults(&self, events: &mut EventBuffer) -> Result<Vec<u64>, String> {
        let faults: Vec<usize> = self
            .uffd
            .read_events(events)
            .map_err(|e| format!("reading page faults: {e}"))?
            .filter_map(|e| match e {
                Ok(Event::Pagefault { addr, .. }) => Some(addr as usize & !(PAGE - 1)),
                _ => None,
            })
            .collect();
        let mut ask = Vec::new();
        let mut book = self.book.lock().map_err(|_| "page book poisoned")?;
        for addr in faults {
            let Some(page) = page_of(&self.regions, addr) else {
                continue;
            };
            if book.missing.get(page) {
                book.stats.faults += 1;
                if !book.asked.contains_key(&page) && ask.len() < MAX_REQUEST {
                    book.asked.insert(page, Instant::now());
                    book.stats.requested += 1;
                    ask.push(page);
                }
                continue;
            }
            book.stats.zero_filled += 1;
            // SAFETY: `addr` is a registered, page-aligned guest RAM page
            // that no one has written (it is not missing and it faulted):
            // the kernel maps the zero page there and wakes the waiters.
            let r = unsafe { self.uffd.zeropage(addr as *mut _, PAGE, true) };
            if r.is_err() {
                // Already mapped meanwhile: only the wake-up is left.
                let _ = self.uffd.wake(addr as *mut _, PAGE);
            }
        }
        Ok(ask)
    }

    fn unregister(&self) {
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host as *mut _, r.len) {
                tracing::warn!("post-copy: cannot unregister guest RAM: {e}");
            }
        }
    }
}

enum Note {
    Go,
    End(Result<Stats, Error>),
}

/// A post-copy in progress on the destination.
pub struct Postcopy {
    shared: Arc<Shared>,
    notes: Receiver<Note>,
    stream: TcpStream,
    threads: Vec<JoinHandle<()>>,
}

impl Postcopy {
    /// Drops the `missing` pages of `mem`, traps faults on guest RAM, and
    /// starts the fault and receiver threads on `conn`.
    pub fn start(
        mem: &GuestMemory,
        missing: PageBitmap,
        conn: Conn<PlaneStream>,
    ) -> Result<Postcopy, Error> {
        let regions = regions(mem);
        for (first, count) in missing.runs() {
            let mut page = first;
            while page < first + count {
                let r = regions
                    .iter()
                    .find(|r| page >= r.first && page < r.first + (r.len / PAGE) as u64)
                    .ok_or_else(|| Error::Protocol(format!("page {page} is past guest RAM")))?;
                let here = (first + count).min(r.first + (r.len / PAGE) as u64) - page;
                let at = r.host + (page - r.first) as usize * PAGE;
                // SAFETY: the range lies inside a private anonymous guest
                // RAM mapping this process owns; dropping its pages only
                // makes the next access fault (to the userfaultfd below).
                let rc = unsafe {
                    libc::madvise(at as *mut _, here as usize * PAGE, libc::MADV_DONTNEED)
                };
                if rc != 0 {
                    return Err(Error::vm(format!(
                        "cannot drop stale pages: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                page += here;
            }
        }
        let uffd = open_uffd().map_err(|e| Error::Vm(Box::new(e)))?;
        for r in &regions {
            uffd.register(r.host as *mut _, r.len)
                .map_err(|e| Error::vm(format!("cannot trap faults on guest RAM: {e}")))?;
        }
        let stream = conn.stream().try_clone()?;
        let mut reader = conn.try_clone()?;
        let left = missing.count();
        let total = total_pages(mem);
        let shared = Arc::new(Shared {
            uffd,
            regions,
            book: Mutex::new(Book {
                missing,
                left,
                asked: HashMap::new(),
                stats: Stats {
                    missing_pages: left,
                    ..Stats::default()
                },
                fault_ms_sum: 0.0,
            }),
            writer: Mutex::new(conn),
            stop: AtomicBool::new(false),
            fault_error: Mutex::new(None),
            started: Instant::now(),
        });
        let (tx, notes) = channel();
        let faults = {
            let shared = shared.clone();
            let stream = stream.try_clone()?;
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || {
                    confined("postcopy-faults");
                    fault_loop(&shared, &stream)
                })?
        };
        let receiver = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("postcopy-pages".into())
                .spawn(move || {
                    confined("postcopy-pages");
                    receive_loop(&shared, &mut reader, total, &tx)
                })?
        };
        Ok(Postcopy {
            shared,
            notes,
            stream,
            threads: vec![faults, receiver],
        })
    }

    /// Pages still missing.
    pub fn left(&self) -> u64 {
        self.shared.book().map(|b| b.left).unwrap_or(0)
    }

    pub fn send(&self, kind: Kind, payload: &[u8]) -> Result<(), Error> {
        self.shared.send(kind, payload)
    }

    /// Waits for GO (pages keep arriving meanwhile).
    pub fn wait_go(&self, timeout: Duration) -> Result<(), Error> {
        match self.notes.recv_timeout(timeout) {
            Ok(Note::Go) => Ok(()),
            Ok(Note::End(Err(e))) => Err(e),
            Ok(Note::End(Ok(_))) => Err(Error::Protocol("COMPLETE before GO".into())),
            Err(_) => Err(Error::Protocol("no GO from the source".into())),
        }
    }

    /// Gives up before GO: tells the source, stops the threads and leaves
    /// guest RAM untrapped (the caller drops the VM).
    pub fn abort(mut self, why: &str) {
        let _ = self.shared.send(Kind::Abort, why.as_bytes());
        self.stop();
    }

    /// After RUNNING: `report` is called once, from another thread, when
    /// every missing page is in place or post-copy failed (with the number
    /// of pages still missing). If that thread cannot start, post-copy is
    /// stopped and the error returned: the VM cannot go on.
    pub fn finish(
        mut self,
        report: impl FnOnce(Result<Stats, Error>, u64) + Send + 'static,
    ) -> std::io::Result<()> {
        let threads = std::mem::take(&mut self.threads);
        std::thread::Builder::new()
            .name("postcopy".into())
            .spawn(move || {
                confined("postcopy");
                let end = match self.notes.recv() {
                    Ok(Note::End(r)) => r,
                    Ok(Note::Go) => Err(Error::Protocol("a second GO".into())),
                    Err(_) => Err(Error::Protocol("post-copy threads ended".into())),
                };
                self.stop();
                for t in threads {
                    let _ = t.join();
                }
                report(end, self.left());
            })
            .map(drop)
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Postcopy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn fault_loop(shared: &Shared, stream: &TcpStream) {
    let mut events = EventBuffer::new(64);
    let fd = shared.uffd.as_raw_fd();
    while !shared.stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid descriptor described by a local pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n <= 0 {
            continue;
        }
        let failed = match shared.on_faults(&mut events) {
            Ok(ask) if ask.is_empty() => None,
            Ok(ask) => shared
                .send(Kind::Request, &encode_request(&ask))
                .err()
                .map(|e| format!("cannot ask for pages: {e}")),
            Err(e) => Some(e),
        };
        if let Some(why) = failed {
            if let Ok(mut slot) = shared.fault_error.lock() {
                slot.get_or_insert(why);
            }
            // The receiver thread ends on the broken connection.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn receive_loop(shared: &Shared, reader: &mut Conn<PlaneStream>, total: u64, notes: &Sender<Note>) {
    let mut frame = Vec::new();
    let end = (|| loop {
        let (kind, len) = reader.recv_into(&mut frame)?;
        match (kind, &frame[..len]) {
            (Kind::Pages, body) => shared.place(&PagesIn::decode(body, total)?)?,
            (Kind::Go, _) => {
                let _ = notes.send(Note::Go);
            }
            (Kind::Complete, _) => {
                let mut book = shared.book()?;
                if book.left != 0 {
                    return Err(Error::Protocol(format!(
                        "the source says it sent everything, but {} pages are missing",
                        book.left
                    )));
                }
                shared.unregister();
                shared.send(Kind::Done, &[])?;
                let mut stats = book.stats.clone();
                if stats.requested > 0 {
                    stats.mean_fault_ms = book.fault_ms_sum / stats.requested as f64;
                }
                stats.total_ms = shared.started.elapsed().as_secs_f64() * 1e3;
                book.asked.clear();
                return Ok(stats);
            }
            (k, _) => {
                return Err(Error::Protocol(format!(
                    "expected Pages, Go or Complete during post-copy, got {k:?}"
                )))
            }
        }
    })();
    let end = end.map_err(
        |e| match shared.fault_error.lock().ok().and_then(|mut s| s.take()) {
            Some(why) => Error::vm(why),
            None => e,
        },
    );
    shared.stop.store(true, Ordering::Release);
    let _ = notes.send(Note::End(end));
}

/// Installs the post-copy threads' seccomp filter. A thread that cannot be
/// confined ends the process: it would otherwise serve the source's pages
/// unfiltered, and the VM cannot go on without it.
fn confined(label: &str) {
    if let Err(e) = sandbox::seccomp::confine(sandbox::ThreadKind::Postcopy, label) {
        eprintln!("ffmk-vmm: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_map_to_host_addresses_and_back_across_regions() {
        let regions = [
            Region {
                host: 0x10000,
                len: 4 * PAGE,
                first: 0,
            },
            Region {
                host: 0x80000,
                len: 2 * PAGE,
                first: 4,
            },
        ];
        assert_eq!(addr_of(&regions, 0), Some(0x10000));
        assert_eq!(addr_of(&regions, 3), Some(0x10000 + 3 * PAGE));
        assert_eq!(addr_of(&regions, 4), Some(0x80000));
        assert_eq!(addr_of(&regions, 6), None);
        assert_eq!(page_of(&regions, 0x80000 + PAGE + 17), Some(5));
        assert_eq!(page_of(&regions, 0x10000 + 4 * PAGE), None);
    }
}
