//! The sending side: pre-copy with a downtime target.
//!
//! 1. Hello; the destination accepts or refuses (the guest never paused).
//! 2. Dirty tracking on; round 1 sends every resident page (all-zero ones
//!    skipped: the destination's memory starts zeroed).
//! 3. Each further round takes the pages dirtied meanwhile. From the last
//!    round's link rate and the dirtied bytes, the downtime a stop now would
//!    cost is predicted (the pages at that rate plus the switch-over's
//!    fixed cost); once it is under the target (or nothing is dirty), and
//!    the last pages would take at most a millisecond or rounds stopped
//!    halving the dirty set (a few tries), the guest and its devices pause, the
//!    last dirty pages and the machine state go, and the switch-over
//!    handshake runs.
//! 4. If rounds stop shrinking the dirty set, the vCPUs are throttled
//!    (paused for a growing share of each 50 ms period while pages go);
//!    after `max_rounds` the migration gives up and the guest runs on.
//! 5. With post-copy allowed, a round that does not meet the target ends
//!    pre-copy instead: the guest pauses, the state and the list of pages
//!    still to send go at once, and the VM runs on the destination while
//!    those pages follow - the ones it faults on first, then the rest
//!    (see `postcopy` for the destination's side and the trade-off).
//!
//! Each round ends with SYNC/SYNCED, so the rates and the predicted
//! downtime count what the destination has taken in, not what sits in
//! socket buffers.
//!
//! Any failure before GO resumes the guest (if it was paused) and returns
//! the error; the VM on the source is intact. After GO the source waits for
//! RUNNING and, without it, stays paused ([`Error::Unconfirmed`]) - never
//! two running copies.
use crate::protocol::{
    decode_request, encode_join, encode_postcopy, encode_verify, page_digests, Accept, Conn, Hello,
    Kind, Pages, Taken, BATCH_PAGES, MAX_STREAMS, VERIFY_PAGES,
};
use crate::{Error, GuestMemory, VmError};
use snapshot::memory::{resident_pages, total_pages};
use snapshot::{PageBitmap, PAGE_SIZE};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};
pub use vmm_api::migration::{Outcome, Phase, PostcopyOutcome, Progress, SwitchOver};

/// What the engine needs from the VMM.
pub trait Source {
    fn memory(&self) -> &GuestMemory;
    /// Starts (or restarts) dirty tracking: `dirty` reports from here on.
    fn start_tracking(&self) -> Result<(), VmError>;
    /// Pages dirtied since the last call (or since `start_tracking`).
    /// The VMM keeps them for whoever else tracks dirty pages
    /// (incremental snapshots) unless the migration completes.
    fn dirty(&self) -> Result<PageBitmap, VmError>;
    /// Stops the vCPUs and device I/O for the switch-over.
    fn pause(&self) -> Result<(), VmError>;
    /// The migration did not complete: the VM runs on here.
    fn resume(&self) -> Result<(), VmError>;
    /// Stops the vCPUs for a moment of the throttle's duty cycle (devices
    /// go on). Default: [`Source::pause`].
    fn throttle_pause(&self) -> Result<(), VmError> {
        self.pause()
    }
    /// Ends such a moment. Default: [`Source::resume`].
    fn throttle_resume(&self) -> Result<(), VmError> {
        self.resume()
    }
    /// The machine state (vCPUs, clocks, devices), taken while paused.
    fn state(&self) -> Result<Vec<u8>, VmError>;
    /// Bytes of device state that will travel in the state at the
    /// switch-over (passthrough devices' VFIO migration data): they count
    /// in the predicted downtime. Default: none.
    fn device_bytes(&self) -> u64 {
        0
    }
    /// Device migration data ready to go now, during the rounds (what
    /// passthrough devices give in PRE_COPY), by slot; sent before the
    /// round's SYNC, so the destination has it before the switch-over.
    /// Default: none.
    fn device_data(&self) -> Result<Vec<(u8, Vec<u8>)>, VmError> {
        Ok(Vec::new())
    }
}

/// The source's dirty pages as the rounds engine fetches them.
struct Dirty<'a>(&'a dyn Source);

impl precopy::Tracker for Dirty<'_> {
    type Error = VmError;

    fn fetch(&mut self) -> Result<PageBitmap, VmError> {
        self.0.dirty()
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub max_downtime: Duration,
    pub max_rounds: u32,
    /// Throttle the vCPUs when rounds stop converging.
    pub throttle: bool,
    /// Socket timeouts (a silent peer or a dead link ends the migration).
    pub io_timeout: Duration,
    /// Switch to post-copy when a round does not meet the downtime target.
    pub postcopy: bool,
    /// Verification mode: at the pause, send a digest of every page for
    /// the destination to compare before it loads the state (a page the
    /// dirty tracking missed fails the migration, named, and the guest runs
    /// on here). Costs one read of guest memory in the downtime. Not with
    /// post-copy.
    pub verify: bool,
    /// Page streams: connections that share the rounds' pages (each one
    /// reads, seals and sends on a thread of its own; the destination
    /// writes each on its own). The destination may take fewer.
    pub streams: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_downtime: Duration::from_millis(50),
            max_rounds: 30,
            throttle: true,
            io_timeout: Duration::from_secs(10),
            postcopy: false,
            verify: false,
            streams: 4,
        }
    }
}

/// How pre-copy ended.
enum Next {
    /// These pages are left: pause and send them.
    StopAndCopy(PageBitmap),
    /// These pages are left, too many for the target: post-copy.
    Postcopy(PageBitmap),
}

/// What the switch-over costs beyond the last pages and its two round
/// trips, for the prediction: capturing the state (0.4-0.5 ms on the
/// development host), the destination loading it (1-1.5 ms) and starting
/// its vCPUs.
const SWITCH_FIXED_MS: f64 = 2.0;
/// Once the predicted downtime meets the target, rounds go on (while each
/// halves the dirty set, or for [`POLISH_MISSES`] that do not) until the
/// last pages are predicted to take at most this long: each such round
/// costs about that much total time.
const POLISH_FLOOR_MS: f64 = 1.0;
/// A round that moved at least this much measures the link's throughput
/// (smaller ones mostly their round trip).
const LINK_SAMPLE_BYTES: u64 = 8 << 20;
/// Rounds that do not halve the dirty set that polishing tries, in a row.
const POLISH_MISSES: u32 = 3;
/// Polishing stops once it has taken this share of the time the copy
/// took before it: each round also costs its fixed part (the dirty log,
/// a SYNC on every stream), so it is bounded in total time, not in rounds
/// (a guest writing 100 MiB/s in bursts took 9 rounds and 1.5x the total
/// time without this bound).
const POLISH_SHARE: f64 = 0.25;

/// Pages pushed per frame in post-copy (small frames: a requested page
/// never waits behind much).
const PUSH_PAGES: usize = 32;
/// Pages after a requested one that go with it (guests touch memory in
/// runs).
const PREFETCH: u64 = 7;
/// Send buffer in post-copy, for the same reason.
const POSTCOPY_SNDBUF: libc::c_int = 256 << 10;

/// Post-copy on the source: what is still missing there, and the
/// destination's messages (read on their own thread).
struct Serving {
    missing: PageBitmap,
    missing_pages: u64,
    left: u64,
    /// The next page to push in order.
    cursor: u64,
    total: u64,
    rx: Receiver<Result<(Kind, Vec<u8>), Error>>,
    stream: TcpStream,
    thread: Option<std::thread::JoinHandle<()>>,
    requested: u64,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Caps the socket's send buffer (best effort).
fn set_send_buffer(stream: &TcpStream, bytes: libc::c_int) {
    // SAFETY: sets an int socket option on a descriptor `stream` owns,
    // from a local of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "post-copy: cannot cap the send buffer: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Pauses the vCPUs for `pct`% of every period while pages are sent.
struct Throttle {
    pct: u32,
    period: Duration,
    start: Instant,
    paused: bool,
}

impl Throttle {
    fn new() -> Throttle {
        Throttle {
            pct: 0,
            period: Duration::from_millis(50),
            start: Instant::now(),
            paused: false,
        }
    }

    /// Pauses or resumes the guest as the duty cycle says now.
    fn tick(&mut self, vm: &dyn Source) -> Result<(), Error> {
        if self.pct == 0 && !self.paused {
            return Ok(());
        }
        let period = self.period.as_nanos();
        let at = self.start.elapsed().as_nanos() % period;
        let want_paused = at < period * u128::from(self.pct) / 100;
        if want_paused != self.paused {
            if want_paused {
                vm.throttle_pause().map_err(Error::Vm)?;
            } else {
                vm.throttle_resume().map_err(Error::Vm)?;
            }
            self.paused = want_paused;
        }
        Ok(())
    }

    /// Leaves the guest running.
    fn release(&mut self, vm: &dyn Source) -> Result<(), Error> {
        if self.paused {
            vm.throttle_resume().map_err(Error::Vm)?;
            self.paused = false;
        }
        Ok(())
    }
}

/// Pages per unit of work when several streams share a round (2 MiB):
/// large enough that taking one costs nothing, small enough that the
/// streams finish together.
const UNIT_PAGES: u64 = 512;
/// How often the migration thread ticks (throttle, cancellation,
/// progress) while its streams send.
const STREAM_TICK: Duration = Duration::from_millis(5);

/// A round's pages as runs of at most [`UNIT_PAGES`], taken in order by
/// whichever stream is free.
struct Units {
    list: Vec<(u64, u64)>,
    next: AtomicUsize,
}

impl Units {
    fn new(pages: &PageBitmap) -> Units {
        let mut list = Vec::new();
        for (first, count) in pages.runs() {
            let mut at = first;
            while at < first + count {
                let n = UNIT_PAGES.min(first + count - at);
                list.push((at, n));
                at += n;
            }
        }
        Units {
            list,
            next: AtomicUsize::new(0),
        }
    }

    fn take(&self) -> Option<(u64, u64)> {
        self.list
            .get(self.next.fetch_add(1, Ordering::Relaxed))
            .copied()
    }
}

/// What the streams of one round count together.
#[derive(Default)]
struct Shared {
    /// Pages sent (zero ones included) and of them all-zero.
    pages: AtomicU64,
    zero: AtomicU64,
    /// Pages looked at (sent or skipped).
    done: AtomicU64,
    bytes: AtomicU64,
    /// A stream failed or the round was cancelled: the others stop.
    stop: AtomicBool,
}

/// One stream's share of a round: units until none are left; `tick`
/// runs after every batch (an error from it stops the stream).
fn send_units(
    conn: &mut Conn<cluster_auth::PlaneStream>,
    mem: &GuestMemory,
    units: &Units,
    skip_zero: bool,
    shared: &Shared,
    tick: &mut dyn FnMut(&Shared) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut batch = Pages::default();
    let flush = |conn: &mut Conn<cluster_auth::PlaneStream>, batch: &mut Pages| {
        let before = conn.sent;
        conn.send_pages(batch)?;
        shared
            .bytes
            .fetch_add(conn.sent - before, Ordering::Relaxed);
        batch.clear();
        Ok::<(), Error>(())
    };
    while let Some((first, count)) = units.take() {
        for p in first..first + count {
            match batch.read(mem, p, skip_zero)? {
                Taken::Skipped => {}
                Taken::Zero => {
                    shared.zero.fetch_add(1, Ordering::Relaxed);
                    shared.pages.fetch_add(1, Ordering::Relaxed);
                }
                Taken::Data => {
                    shared.pages.fetch_add(1, Ordering::Relaxed);
                }
            }
            if batch.len() == BATCH_PAGES {
                flush(conn, &mut batch)?;
                tick(shared)?;
            }
        }
        shared.done.fetch_add(count, Ordering::Relaxed);
    }
    if !batch.is_empty() {
        flush(conn, &mut batch)?;
    }
    Ok(())
}

/// [`Engine::link_rate`]: the rate (bytes/s) of a round that moved
/// `bytes` in `elapsed` s on a link with round trip `rtt`, given the best
/// rate a large round measured so far (`peak`); and the new best.
fn link_estimate(bytes: u64, elapsed: f64, rtt: Duration, peak: f64) -> (f64, f64) {
    let rtt = rtt.as_secs_f64().min(elapsed * 0.9);
    let rate = bytes as f64 / (elapsed - rtt).max(elapsed * 0.1);
    let peak = if bytes >= LINK_SAMPLE_BYTES {
        peak.max(rate)
    } else {
        peak
    };
    (rate.max(peak), peak)
}

struct Engine<'a> {
    vm: &'a dyn Source,
    conn: Conn<cluster_auth::PlaneStream>,
    /// Further page streams (connections of their own) that share each
    /// round's pages with `conn`; empty with one stream.
    extra: Vec<Conn<cluster_auth::PlaneStream>>,
    /// Bytes the further streams wrote before they ended.
    ended_sent: u64,
    /// Rounds in a row that met the target without halving the dirty set.
    polish_misses: u32,
    /// When the copy began, and when the target was first met (polishing
    /// began).
    copy_started: Instant,
    polish_started: Option<Instant>,
    opts: Options,
    cancel: &'a AtomicBool,
    report: &'a mut dyn FnMut(&Progress),
    progress: Progress,
    throttle: Throttle,
    batch: Pages,
    /// Verification mode: pages digested and the time it took.
    verified: Option<(u64, f64)>,
    /// The link's round trip (the quickest SYNC): the switch-over makes
    /// two (STATE/READY, GO/RUNNING), so they count in the predicted
    /// downtime.
    rtt: Duration,
    /// The link's throughput (bytes/s) as the rounds that moved at least
    /// [`LINK_SAMPLE_BYTES`] measured it: the best of them. A small round
    /// is bound by its round trips and fixed costs, not by the link.
    link_peak: f64,
    /// Marks of the switch-over: paused, last pages sent, state sent,
    /// READY.
    marks: Vec<Instant>,
}

impl Engine<'_> {
    fn check_cancel(&mut self) -> Result<(), Error> {
        if self.cancel.load(Ordering::Acquire) {
            self.conn.abort("cancelled on the source");
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        if !self.batch.is_empty() {
            self.conn.send_pages(&self.batch)?;
            self.batch.clear();
        }
        Ok(())
    }

    /// Bytes written on every stream.
    fn sent(&self) -> u64 {
        self.conn.sent + self.ended_sent + self.extra.iter().map(|c| c.sent).sum::<u64>()
    }

    /// Sends `pages` on every stream; `skip_zero` drops all-zero pages
    /// instead of sending them as zero (the first round: the destination
    /// starts zeroed). `live`: the guest runs, so the throttle ticks,
    /// cancellation is checked and progress reported while pages go.
    fn send_pages(&mut self, pages: &PageBitmap, skip_zero: bool, live: bool) -> Result<(), Error> {
        let units = Units::new(pages);
        let shared = Shared::default();
        let left = pages.count();
        let before = (self.progress.pages_sent, self.progress.zero_pages);
        let sent_before = self.sent();
        let Engine {
            vm,
            conn,
            extra,
            cancel,
            report,
            progress,
            throttle,
            ..
        } = self;
        let mem = vm.memory();
        let mut batches = 0u32;
        // Between batches: cancellation, the throttle's duty cycle and, now
        // and then, progress.
        let mut tick = |shared: &Shared| -> Result<(), Error> {
            if !live {
                return Ok(());
            }
            if cancel.load(Ordering::Acquire) {
                return Err(Error::Cancelled);
            }
            throttle.tick(*vm)?;
            batches += 1;
            if batches % 64 == 0 {
                progress.pages_sent = before.0 + shared.pages.load(Ordering::Relaxed);
                progress.zero_pages = before.1 + shared.zero.load(Ordering::Relaxed);
                progress.remaining_pages = left.saturating_sub(shared.done.load(Ordering::Relaxed));
                progress.sent_bytes = sent_before + shared.bytes.load(Ordering::Relaxed);
                report(progress);
            }
            Ok(())
        };
        // One unit (2 MiB) or less goes on the first connection alone:
        // starting threads would cost more than it saves (and in the pause
        // every microsecond counts).
        let result = if extra.is_empty() || units.list.len() <= 1 {
            send_units(conn, mem, &units, skip_zero, &shared, &mut |sh| tick(sh))
        } else {
            std::thread::scope(|scope| {
                let (done_tx, done_rx) = channel();
                let streams = std::iter::once(conn).chain(extra.iter_mut());
                let mut running = 0;
                for c in streams {
                    let (done_tx, units, shared) = (done_tx.clone(), &units, &shared);
                    scope.spawn(move || {
                        let r = send_units(c, mem, units, skip_zero, shared, &mut |sh| {
                            if sh.stop.load(Ordering::Acquire) {
                                Err(Error::Cancelled)
                            } else {
                                Ok(())
                            }
                        });
                        if r.is_err() {
                            shared.stop.store(true, Ordering::Release);
                        }
                        let _ = done_tx.send(r);
                    });
                    running += 1;
                }
                drop(done_tx);
                // The streams' first real error wins over the Cancelled
                // the others stop with.
                let mut first: Option<Error> = None;
                let mut keep = |e: Error| {
                    if first.is_none() || matches!(first, Some(Error::Cancelled)) {
                        first = Some(e);
                    }
                };
                while running > 0 {
                    match done_rx.recv_timeout(STREAM_TICK) {
                        Ok(r) => {
                            running -= 1;
                            if let Err(e) = r {
                                keep(e);
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            if let Err(e) = tick(&shared) {
                                shared.stop.store(true, Ordering::Release);
                                keep(e);
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                match first {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            })
        };
        self.progress.pages_sent = before.0 + shared.pages.load(Ordering::Relaxed);
        self.progress.zero_pages = before.1 + shared.zero.load(Ordering::Relaxed);
        if matches!(result, Err(Error::Cancelled)) {
            self.conn.abort("cancelled on the source");
        }
        result
    }

    /// What passthrough devices have for the destination now (PRE_COPY
    /// data), on the first connection, before the round's SYNC.
    fn send_device_data(&mut self) -> Result<(), Error> {
        for (slot, data) in self.vm.device_data().map_err(Error::Vm)? {
            for frame in crate::protocol::encode_device_data(slot, &data) {
                self.conn.send(Kind::DeviceData, &frame)?;
            }
        }
        Ok(())
    }

    fn fetch_dirty(&mut self) -> Result<PageBitmap, Error> {
        self.vm.dirty().map_err(Error::Vm)
    }

    /// Waits until the destination has taken in everything sent so far.
    /// (On every stream: the round trips overlap.)
    fn sync(&mut self) -> Result<(), Error> {
        let t = Instant::now();
        self.conn.send(Kind::Sync, &[])?;
        for c in &mut self.extra {
            c.send(Kind::Sync, &[])?;
        }
        self.conn.expect(Kind::Synced)?;
        for c in &mut self.extra {
            c.expect(Kind::Synced)?;
        }
        // A SYNC after a round also waits for the destination to take in
        // what was still in flight; the smallest is the link's round trip.
        self.rtt = self.rtt.min(t.elapsed());
        Ok(())
    }

    /// Ends the further streams (END on each): from here on everything
    /// goes on the first connection, after what they carried.
    fn end_streams(&mut self) -> Result<(), Error> {
        for c in &mut self.extra {
            c.send(Kind::End, &[])?;
            self.ended_sent += c.sent;
        }
        self.extra.clear();
        Ok(())
    }

    /// Rounds while the guest runs (the `precopy` engine), until the
    /// predicted downtime meets the target (or post-copy takes over).
    fn precopy(&mut self) -> Result<Next, Error> {
        let t = Instant::now();
        self.vm.start_tracking().map_err(Error::Vm)?;
        self.progress.phase = Phase::Precopy;
        self.copy_started = Instant::now();
        let first = resident_pages(self.vm.memory());
        tracing::debug!(
            "migration: dirty tracking on in {:.1} ms, {} resident pages found in {:.1} ms",
            self.copy_started.duration_since(t).as_secs_f64() * 1e3,
            first.count(),
            self.copy_started.elapsed().as_secs_f64() * 1e3
        );
        let vm = self.vm;
        let mut previous = u64::MAX;
        let mut stalled = 0;
        let engine = std::cell::RefCell::new(self);
        let ending = precopy::run(
            &mut Dirty(vm),
            first,
            &mut |pages, round| {
                let mut e = engine.borrow_mut();
                e.progress.round = round;
                let before = e.sent();
                // Round 1: all-zero pages are skipped (the destination's
                // memory starts zeroed).
                e.send_pages(pages, round == 1, true)?;
                e.send_device_data()?;
                e.sync()?;
                Ok(e.sent() - before)
            },
            &mut |r| {
                engine
                    .borrow_mut()
                    .after_round(r, &mut previous, &mut stalled)
            },
        );
        match ending {
            Ok(end) if end.verdict == precopy::Verdict::Postcopy => Ok(Next::Postcopy(end.last)),
            Ok(end) => Ok(Next::StopAndCopy(end.last)),
            Err(precopy::Error::Tracker(e)) => Err(Error::Vm(e)),
            Err(precopy::Error::Stopped(e)) => Err(e),
        }
    }

    /// The migration's policy after each round: report, then stop once the
    /// predicted downtime meets the target; otherwise post-copy, give up
    /// after `max_rounds`, or throttle harder when rounds stop shrinking.
    fn after_round(
        &mut self,
        r: &precopy::Round,
        previous: &mut u64,
        stalled: &mut u32,
    ) -> Result<precopy::Verdict, Error> {
        // The throttle's pauses hold pages back too: the dirtying rate is
        // per second of the round.
        let elapsed = r.elapsed.as_secs_f64().max(1e-6);
        let link = self.link_rate(r.bytes, elapsed); // bytes/s
        let n = r.dirty_pages;
        let dirty_bytes = n * PAGE_SIZE;
        let sent = self.sent();
        let device_bytes = self.vm.device_bytes();
        let p = &mut self.progress;
        p.dirty_pages = n;
        p.dirty_mib_s = dirty_bytes as f64 / elapsed / f64::from(1 << 20);
        p.link_mib_s = link / f64::from(1 << 20);
        // The last pages at the link's rate, plus the switch-over's fixed
        // cost: its two round trips and the state's capture, load and start
        // (what each part took is measured and reported in the outcome's
        // `switch_over`).
        // Device state (VFIO migration data) goes in the state, at the
        // switch-over: it counts as pages would.
        p.predicted_downtime_ms = if link > 0.0 {
            (dirty_bytes + device_bytes) as f64 / link * 1e3
                + 2.0 * self.rtt.as_secs_f64() * 1e3
                + SWITCH_FIXED_MS
        } else {
            f64::INFINITY
        };
        p.remaining_pages = 0;
        p.sent_bytes = sent;
        (self.report)(&self.progress);
        self.check_cancel()?;
        let predicted =
            Duration::from_secs_f64((self.progress.predicted_downtime_ms / 1e3).min(3600.0));
        tracing::debug!(
            "migration: round {} sent {} KiB in {:.1} ms, {n} pages dirty, predicted downtime \
             {:.2} ms (round trip {:.3} ms)",
            r.number,
            r.bytes >> 10,
            elapsed * 1e3,
            self.progress.predicted_downtime_ms,
            self.rtt.as_secs_f64() * 1e3
        );
        let halved = n <= *previous / 2;
        let shrinking = n < *previous / 10 * 9;
        *previous = n;
        if n == 0 {
            return Ok(precopy::Verdict::Pause);
        }
        if predicted <= self.opts.max_downtime {
            // The target is met. One more round costs about the predicted
            // downtime in total time and may cut the pause: go on until the
            // prediction is a fraction of the target, while rounds halve
            // the dirty set, or for a few that do not (a guest that writes
            // in bursts leaves a small set after a round that missed the
            // burst).
            if halved {
                self.polish_misses = 0;
            } else {
                self.polish_misses += 1;
            }
            let pages_ms = dirty_bytes as f64 / link * 1e3;
            self.polish_started.get_or_insert_with(Instant::now);
            if pages_ms > POLISH_FLOOR_MS && self.may_polish() {
                return Ok(precopy::Verdict::Again);
            }
            return Ok(precopy::Verdict::Pause);
        }
        if self.polish_started.is_some() {
            // The target was met and a polishing round lost it (the dirty
            // set moves from round to round; in the lab the prediction of
            // an idle Linux guest sat on either side of 50 ms): a miss,
            // then the pause once polishing may not go on. A migration that
            // met its target never fails for polishing ("no convergence"
            // after 30 rounds, seen in the lab).
            self.polish_misses += 1;
            if self.may_polish() {
                return Ok(precopy::Verdict::Again);
            }
            return Ok(precopy::Verdict::Pause);
        }
        if self.opts.postcopy {
            return Ok(precopy::Verdict::Postcopy);
        }
        if self.progress.round >= self.opts.max_rounds {
            return Err(Error::NoConvergence {
                rounds: self.progress.round,
                dirty_mib_s: self.progress.dirty_mib_s,
                link_mib_s: self.progress.link_mib_s,
                throttle_pct: self.throttle.pct,
            });
        }
        // Not shrinking: throttle harder (from the third round on).
        if shrinking {
            *stalled = 0;
        } else {
            *stalled += 1;
        }
        if self.opts.throttle && *stalled >= 2 && self.throttle.pct < 90 {
            self.throttle.pct = (self.throttle.pct + 30).min(90);
            self.progress.throttle_pct = self.throttle.pct;
            *stalled = 0;
            tracing::info!("migration: vCPUs throttled to {}%", 100 - self.throttle.pct);
        }
        Ok(precopy::Verdict::Again)
    }

    /// Whether polishing may take another round: not too many misses in a
    /// row, within its share of the time the copy took before it, and
    /// rounds left.
    fn may_polish(&self) -> bool {
        let Some(since) = self.polish_started else {
            return false;
        };
        let budget = since
            .duration_since(self.copy_started)
            .mul_f64(POLISH_SHARE);
        self.polish_misses <= POLISH_MISSES
            && since.elapsed() < budget
            && self.progress.round < self.opts.max_rounds
    }

    /// The link's throughput after a round that moved `bytes` in
    /// `elapsed` seconds (its pages and the SYNC that waited for them):
    /// the time less the one round trip the SYNC costs whatever the size,
    /// and never less than the best a large round measured. Taken as the
    /// round's plain rate, a round of a few hundred KiB that a slow round
    /// trip dominates (a nested lab: ~100 ms) makes the link look like
    /// 2 MiB/s, the predicted downtime never meets the target and a
    /// migration that would pause for a fraction of it fails after
    /// `max_rounds` ("no convergence").
    fn link_rate(&mut self, bytes: u64, elapsed: f64) -> f64 {
        let (rate, peak) = link_estimate(bytes, elapsed, self.rtt, self.link_peak);
        self.link_peak = peak;
        rate
    }

    /// The guest is paused: last pages, state, handshake.
    fn stop_and_copy(&mut self, last: PageBitmap) -> Result<(), Error> {
        self.progress.phase = Phase::StopAndCopy;
        self.marks.push(Instant::now());
        let mut dirty = self.fetch_dirty()?;
        dirty.union(&last);
        self.progress.round += 1;
        self.send_pages(&dirty, false, false)?;
        self.end_streams()?;
        if self.opts.verify && !self.opts.postcopy {
            self.send_digests()?;
        }
        self.marks.push(Instant::now());
        let state = self.vm.state().map_err(Error::Vm)?;
        self.conn.send(Kind::State, &state)?;
        self.marks.push(Instant::now());
        self.progress.phase = Phase::SwitchOver;
        self.progress.sent_bytes = self.sent();
        (self.report)(&self.progress);
        self.conn.expect(Kind::Ready)?;
        self.marks.push(Instant::now());
        if self.cancel.load(Ordering::Acquire) {
            self.conn.abort("cancelled on the source");
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// Verification mode, guest paused and every page sent: the digest of
    /// every page as it is now (VERIFY frames).
    fn send_digests(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        let mem = self.vm.memory();
        let total = total_pages(mem);
        let resident = resident_pages(mem);
        let mut first = 0;
        while first < total {
            let count = (VERIFY_PAGES as u64).min(total - first);
            let digests = page_digests(mem, &resident, first, count)?;
            self.conn
                .send(Kind::Verify, &encode_verify(first, &digests))?;
            first += count;
        }
        self.verified = Some((total, started.elapsed().as_secs_f64() * 1e3));
        Ok(())
    }

    /// The guest is paused: the state and the pages still to send go as
    /// POSTCOPY; the destination may ask for pages from here on. Returns
    /// once it is READY (pages it asked for meanwhile served).
    fn start_postcopy(&mut self, last: PageBitmap) -> Result<Serving, Error> {
        self.progress.phase = Phase::SwitchOver;
        self.end_streams()?;
        let mut missing = self.fetch_dirty()?;
        missing.union(&last);
        let state = self.vm.state().map_err(Error::Vm)?;
        self.conn
            .send(Kind::Postcopy, &encode_postcopy(&state, &missing))?;
        set_send_buffer(self.conn.stream(), POSTCOPY_SNDBUF);
        let mut reader = self.conn.try_clone()?;
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("postcopy-requests".into())
            .spawn(move || loop {
                let m = reader.recv();
                let end = m.is_err();
                if tx.send(m).is_err() || end {
                    return;
                }
            })?;
        let total = missing.pages();
        let mut srv = Serving {
            left: missing.count(),
            missing_pages: missing.count(),
            missing,
            cursor: 0,
            total,
            rx,
            stream: self.conn.stream().try_clone()?,
            thread: Some(thread),
            requested: 0,
        };
        self.serve_until(&mut srv, Some(Kind::Ready), false)?;
        if self.cancel.load(Ordering::Acquire) {
            self.conn.abort("cancelled on the source");
            return Err(Error::Cancelled);
        }
        Ok(srv)
    }

    /// Sends page `p` if the destination still misses it.
    fn push_page(&mut self, srv: &mut Serving, p: u64) -> Result<(), Error> {
        if !srv.missing.get(p) {
            return Ok(());
        }
        srv.missing.clear(p);
        srv.left -= 1;
        if self.batch.read(self.vm.memory(), p, false)? == Taken::Zero {
            self.progress.zero_pages += 1;
        }
        self.progress.pages_sent += 1;
        Ok(())
    }

    /// Serves the destination's requests until `want` arrives (None: until
    /// every page is sent); with `push`, sends the missing pages in order
    /// in between. (Before RUNNING nothing is pushed: the pages the
    /// destination needs to load the state and start never wait behind
    /// others.)
    fn serve_until(
        &mut self,
        srv: &mut Serving,
        want: Option<Kind>,
        push: bool,
    ) -> Result<(), Error> {
        let mut batches = 0u32;
        loop {
            if want.is_none() && srv.left == 0 {
                return self.flush();
            }
            // Requests first, each with the pages after it.
            let msg = if srv.left == 0 || !push {
                match srv.rx.recv_timeout(self.opts.io_timeout) {
                    Ok(m) => Some(m),
                    Err(_) => {
                        return Err(Error::Protocol(format!(
                            "the destination went silent for {:?}",
                            self.opts.io_timeout
                        )))
                    }
                }
            } else {
                srv.rx.try_recv().ok()
            };
            if let Some(m) = msg {
                match m? {
                    (k, _) if Some(k) == want => {
                        self.flush()?;
                        return Ok(());
                    }
                    (Kind::Request, body) => {
                        for p in decode_request(&body, srv.total)? {
                            srv.requested += 1;
                            for q in p..(p + 1 + PREFETCH).min(srv.total) {
                                self.push_page(srv, q)?;
                                if self.batch.len() == BATCH_PAGES {
                                    self.flush()?;
                                }
                            }
                        }
                        self.flush()?;
                    }
                    (k, _) => {
                        return Err(Error::Protocol(format!(
                            "expected Request or {want:?}, got {k:?}"
                        )))
                    }
                }
                continue;
            }
            // Then the next few pages in order.
            while self.batch.len() < PUSH_PAGES && srv.cursor < srv.total {
                let p = srv.cursor;
                srv.cursor += 1;
                self.push_page(srv, p)?;
            }
            self.flush()?;
            batches += 1;
            if batches % 256 == 0 {
                self.progress.remaining_pages = srv.left;
                self.progress.sent_bytes = self.sent();
                (self.report)(&self.progress);
            }
        }
    }

    /// After RUNNING: every missing page, then COMPLETE, then DONE.
    fn finish_postcopy(&mut self, srv: &mut Serving) -> Result<PostcopyOutcome, Error> {
        let started = Instant::now();
        self.progress.phase = Phase::Postcopy;
        self.serve_until(srv, None, true)?;
        self.conn.send(Kind::Complete, &[])?;
        self.serve_until(srv, Some(Kind::Done), true)?;
        self.progress.remaining_pages = 0;
        self.progress.sent_bytes = self.sent();
        (self.report)(&self.progress);
        Ok(PostcopyOutcome {
            missing_pages: srv.missing_pages,
            requested_pages: srv.requested,
            postcopy_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// The cluster-plane channel migrations use.
pub const CHANNEL: &str = "migration";

/// Connects to `to` (HOST:PORT), authenticates both ends with `trust` and
/// migrates. `cancel` is polled between
/// page batches; `report` gets progress. On error the guest runs on here.
pub fn migrate(
    vm: &dyn Source,
    to: &str,
    trust: &cluster_auth::Trust,
    hello: &Hello,
    opts: &Options,
    cancel: &AtomicBool,
    report: &mut dyn FnMut(&Progress),
) -> Result<Outcome, Error> {
    let started = Instant::now();
    let connect_err = |source| Error::Connect {
        to: to.to_string(),
        source,
    };
    let addr = to
        .to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| connect_err(std::io::Error::other("no address")))?;
    let open =
        || -> Result<Conn<cluster_auth::PlaneStream>, Error> {
            let stream = TcpStream::connect_timeout(&addr, opts.io_timeout).map_err(connect_err)?;
            let stream = cluster_auth::connect(stream, trust, CHANNEL, None, opts.io_timeout)
                .map_err(|e| Error::Connect {
                    to: to.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            stream.tcp().set_read_timeout(Some(opts.io_timeout))?;
            stream.tcp().set_write_timeout(Some(opts.io_timeout))?;
            Ok(Conn::plane(stream))
        };
    let mut conn = open()?;
    let hello = &Hello {
        verify: opts.verify && !opts.postcopy,
        streams: opts.streams.clamp(1, MAX_STREAMS),
        ..hello.clone()
    };
    conn.send_hello(hello)?;
    let accept = match conn.recv()? {
        (Kind::Accept, body) => Accept::decode(&body)?,
        (Kind::Refuse, why) => return Err(Error::Refused(String::from_utf8_lossy(&why).into())),
        (k, _) => return Err(Error::Protocol(format!("expected Accept, got {k:?}"))),
    };
    if accept.streams > hello.streams {
        return Err(Error::Protocol(format!(
            "the destination takes {} page streams, {} were offered",
            accept.streams, hello.streams
        )));
    }
    // The further streams: connections of their own, each authenticated
    // and then tied to this migration by the destination's token.
    let mut extra = Vec::new();
    for index in 1..accept.streams {
        let joined = open().and_then(|mut c| {
            c.send(Kind::Join, &encode_join(&accept.token, index))?;
            Ok(c)
        });
        match joined {
            Ok(c) => extra.push(c),
            Err(e) => {
                conn.abort(&format!("page stream {index} could not join: {e}"));
                return Err(e);
            }
        }
    }
    let total = total_pages(vm.memory());
    let mut e = Engine {
        vm,
        conn,
        extra,
        ended_sent: 0,
        polish_misses: 0,
        copy_started: Instant::now(),
        polish_started: None,
        opts: opts.clone(),
        cancel,
        report,
        progress: Progress {
            phase: Phase::Connecting,
            memory_bytes: total * PAGE_SIZE,
            round: 0,
            sent_bytes: 0,
            pages_sent: 0,
            zero_pages: 0,
            remaining_pages: 0,
            dirty_pages: 0,
            dirty_mib_s: 0.0,
            link_mib_s: 0.0,
            predicted_downtime_ms: 0.0,
            throttle_pct: 0,
        },
        throttle: Throttle::new(),
        batch: Pages::default(),
        verified: None,
        rtt: Duration::MAX,
        link_peak: 0.0,
        marks: Vec::new(),
    };
    let mut paused_at = None;
    let result = (|| {
        // One SYNC with nothing in flight on the first connection (the
        // others may still be joining): the link's round trip.
        let t = Instant::now();
        e.conn.send(Kind::Sync, &[])?;
        e.conn.expect(Kind::Synced)?;
        e.rtt = t.elapsed();
        tracing::debug!(
            "migration: {} stream(s) up {:.1} ms after the start, round trip {:.3} ms",
            1 + e.extra.len(),
            started.elapsed().as_secs_f64() * 1e3,
            e.rtt.as_secs_f64() * 1e3
        );
        let next = e.precopy()?;
        e.throttle.release(e.vm)?;
        paused_at = Some(Instant::now());
        e.vm.pause().map_err(Error::Vm)?;
        match next {
            Next::StopAndCopy(last) => e.stop_and_copy(last).map(|()| None),
            Next::Postcopy(last) => e.start_postcopy(last).map(Some),
        }
    })();
    let mut serving = match result {
        Ok(s) => s,
        Err(err) => {
            // Before GO: the guest runs on here (the VMM keeps the pages
            // fetched from its dirty log for whoever else tracks them).
            if !matches!(err, Error::Aborted(_) | Error::Cancelled) {
                e.conn.abort(&err.to_string());
            }
            let _ = e.throttle.release(e.vm);
            if paused_at.is_some() {
                if let Err(r) = e.vm.resume() {
                    tracing::error!("migration failed and the VM cannot resume: {r}");
                }
            }
            return Err(err);
        }
    };
    // The point of no return: once GO is out, the destination may run the
    // VM. A GO that could not be written whole cannot have been acted on,
    // and a destination that answers ABORT did not start.
    let resume = |e: &mut Engine, err: Error| {
        if let Err(r) = e.vm.resume() {
            tracing::error!("migration failed and the VM cannot resume: {r}");
        }
        Err(err)
    };
    if let Err(err) = e.conn.send(Kind::Go, &[]) {
        return resume(&mut e, err);
    }
    let running = match serving.as_mut() {
        None => e.conn.expect(Kind::Running).map(|_| ()),
        Some(srv) => e.serve_until(srv, Some(Kind::Running), false),
    };
    // Past GO the VM may run there, so it stays paused here (the VMM
    // keeps the pages fetched from its dirty log in case the operator
    // resumes it after all).
    match running {
        Ok(()) => {}
        Err(err @ Error::Aborted(_)) => return resume(&mut e, err),
        Err(err) => return Err(Error::Unconfirmed(err.to_string())),
    }
    let downtime = paused_at.map(|t| t.elapsed()).unwrap_or_default();
    let switch_over = match (paused_at, e.marks.as_slice()) {
        (Some(p), [stopped, pages, state, ready]) => {
            let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
            let running = p + downtime;
            Some(SwitchOver {
                pause_ms: ms(p, *stopped),
                last_pages_ms: ms(*stopped, *pages),
                state_ms: ms(*pages, *state),
                destination_ms: ms(*state, *ready),
                resume_ms: ms(*ready, running),
            })
        }
        _ => None,
    };
    let postcopy = match serving.as_mut() {
        None => None,
        Some(srv) => {
            (e.report)(&Progress {
                phase: Phase::Postcopy,
                remaining_pages: srv.left,
                ..e.progress.clone()
            });
            match e.finish_postcopy(srv) {
                Ok(o) => Some(o),
                Err(err) => {
                    let left = srv.left;
                    return Err(Error::Postcopy {
                        left,
                        why: err.to_string(),
                    });
                }
            }
        }
    };
    Ok(Outcome {
        to: to.to_string(),
        rounds: e.progress.round,
        downtime_ms: downtime.as_secs_f64() * 1e3,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        sent_bytes: e.sent(),
        pages_sent: e.progress.pages_sent,
        zero_pages: e.progress.zero_pages,
        memory_bytes: total * PAGE_SIZE,
        throttle_pct: e.throttle.pct,
        postcopy,
        verified_pages: e.verified.map(|v| v.0),
        verify_ms: e.verified.map(|v| v.1),
        max_downtime_ms: e.opts.max_downtime.as_millis() as u64,
        switch_over,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = (1 << 20) as f64;

    #[test]
    fn a_small_round_bound_by_its_round_trip_keeps_the_links_measured_rate() {
        // Round 1 of a nested lab: 160 MiB in 20 s (8 MiB/s).
        let (rate, peak) = link_estimate(160 << 20, 20.0, Duration::from_millis(150), 0.0);
        assert!((rate / MIB - 8.06).abs() < 0.1, "{}", rate / MIB);
        assert_eq!(rate, peak);
        // A late round: 360 KiB in 170 ms, 150 ms of which is the SYNC's
        // round trip. Its plain rate (2 MiB/s) is not the link's.
        let (rate, peak2) = link_estimate(360 << 10, 0.17, Duration::from_millis(150), peak);
        assert_eq!(peak2, peak, "a small round does not set the peak");
        assert!(rate / MIB >= 8.0, "{}", rate / MIB);
    }

    #[test]
    fn without_a_large_round_the_round_trip_is_taken_out_but_never_all_of_the_time() {
        let (rate, peak) = link_estimate(1 << 20, 0.2, Duration::from_millis(100), 0.0);
        assert_eq!(peak, 0.0);
        assert!((rate / MIB - 10.0).abs() < 1e-9, "{}", rate / MIB);
        // A round trip longer than the round (measured earlier, under other
        // load): at most 90% of the time is taken out.
        let (rate, _) = link_estimate(1 << 20, 0.1, Duration::from_millis(500), 0.0);
        assert!((rate / MIB - 100.0).abs() < 1e-6, "{}", rate / MIB);
    }
}
