//! One thread per vCPU, running `KVM_RUN` under a small state machine.
//!
//! The control thread steers a vCPU by setting its [`Request`] and kicking
//! it: a real-time signal whose handler sets `immediate_exit` in the vCPU's
//! `kvm_run`, so `KVM_RUN` returns `EINTR` whether the signal arrived inside
//! or just before the ioctl. The vCPU then honours the request (pause: park
//! on a condition variable and acknowledge; exit: leave the loop).
//!
//! KVM finishes an I/O or MMIO exit (the value an `in` or an MMIO read
//! returns goes into the guest's register, RIP moves past the instruction)
//! only when KVM_RUN is entered again, and that pending work is in no state
//! userspace can read or set (KVM's api.rst, KVM_RUN). A vCPU asked to pause
//! right after such an exit therefore enters KVM_RUN once more with
//! `immediate_exit` set - KVM completes the instruction and returns at once,
//! running nothing else - before it parks, so that a state saved while it
//! is paused (snapshot, migration) is the state after the instruction, not
//! in the middle of it. Without this, a restored vCPU would run the
//! instruction a second time (a second serial byte, a second read of a
//! register that clears itself on read).
use crate::arch::pvm_assist::{self, Assist};
use crate::memory::GuestMemoryMmap;
use devices::bus::{MmioBus, PioBus};
use kvm_bindings::{kvm_regs, kvm_run, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, valid for
        // the thread's lifetime; a single byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&raw mut (*p).immediate_exit, 1) };
    }
}

/// Installs the kick handler (once per process).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuState {
    Created,
    Running,
    Paused,
    Exited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Request {
    Run = 0,
    Pause = 1,
    Exit = 2,
}

/// Why a vCPU stopped the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// KVM_EXIT_SHUTDOWN: triple fault (or a guest-requested shutdown).
    TripleFault,
    /// KVM_EXIT_SYSTEM_EVENT shutdown/reset.
    SystemEvent(u32),
    /// KVM could not run or emulate the guest.
    Failure(String),
}

/// Work the control thread hands a paused vCPU thread (which owns the
/// vCPU fd): saving or inspecting its KVM state.
pub type Job = Box<dyn FnOnce(&VcpuFd) + Send>;

/// State shared between a vCPU thread and the control thread.
pub struct VcpuShared {
    pub id: u8,
    /// Service or compute vCPU.
    pub role: vcpu_decouple::Role,
    /// The thread's kernel id, once it started (0 before).
    tid: std::sync::atomic::AtomicI32,
    /// KVM's own counters for this vCPU (None where KVM has none).
    pub kvm_stats: Option<vcpu_decouple::kvmstats::VcpuStats>,
    request: AtomicU8,
    state: Mutex<VcpuState>,
    changed: Condvar,
    jobs: Mutex<Vec<Job>>,
    pub exits: AtomicU64,
    pub io_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    /// Instructions run for a PVM host's ring-0 emulator (see `pvm_assist`).
    pub pvm_assists: AtomicU64,
}

impl VcpuShared {
    pub fn new(
        id: u8,
        role: vcpu_decouple::Role,
        kvm_stats: Option<vcpu_decouple::kvmstats::VcpuStats>,
    ) -> Self {
        VcpuShared {
            id,
            role,
            tid: std::sync::atomic::AtomicI32::new(0),
            kvm_stats,
            request: AtomicU8::new(Request::Run as u8),
            state: Mutex::new(VcpuState::Created),
            changed: Condvar::new(),
            jobs: Mutex::new(Vec::new()),
            exits: AtomicU64::new(0),
            io_exits: AtomicU64::new(0),
            mmio_exits: AtomicU64::new(0),
            pvm_assists: AtomicU64::new(0),
        }
    }

    pub fn set_tid(&self, tid: i32) {
        self.tid.store(tid, Ordering::Release);
    }

    /// The vCPU thread's kernel id (None before it started).
    pub fn tid(&self) -> Option<i32> {
        Some(self.tid.load(Ordering::Acquire)).filter(|t| *t != 0)
    }

    pub fn state(&self) -> VcpuState {
        self.state.lock().map(|s| *s).unwrap_or(VcpuState::Exited)
    }

    fn set_state(&self, s: VcpuState) {
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
        self.changed.notify_all();
    }

    /// Sets the request; the caller kicks the thread afterwards.
    pub fn request(&self, r: Request) {
        // Exit is final: a later pause/resume must not undo it.
        let _ = self
            .request
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur != Request::Exit as u8).then_some(r as u8)
            });
        if let Ok(_g) = self.state.lock() {
            self.changed.notify_all();
        }
    }

    /// Waits until the vCPU is in one of `states` (or has exited).
    pub fn wait_for(&self, states: &[VcpuState], timeout: Duration) -> bool {
        let Ok(g) = self.state.lock() else {
            return false;
        };
        match self.changed.wait_timeout_while(g, timeout, |s| {
            !states.contains(s) && *s != VcpuState::Exited
        }) {
            Ok((g, _)) => states.contains(&g),
            Err(_) => false,
        }
    }

    fn current_request(&self) -> Request {
        match self.request.load(Ordering::Acquire) {
            0 => Request::Run,
            1 => Request::Pause,
            _ => Request::Exit,
        }
    }

    /// Runs `job` on the vCPU thread once it is paused (or as soon as it
    /// pauses). The caller pauses the vCPU and collects the job's result.
    pub fn run_paused(&self, job: Job) {
        if let Ok(mut j) = self.jobs.lock() {
            j.push(job);
        }
        if let Ok(_g) = self.state.lock() {
            self.changed.notify_all();
        }
    }

    fn has_jobs(&self) -> bool {
        self.jobs.lock().map(|j| !j.is_empty()).unwrap_or(false)
    }

    /// Parks while paused (running the jobs it is handed), or says why it
    /// cannot yet (`io_pending`: the last exit's instruction is unfinished)
    /// or that the vCPU must exit. After a pause the guest is told it was
    /// stopped (KVMCLOCK_CTRL), so its soft-lockup watchdog stays quiet.
    fn honour_requests(&self, fd: &VcpuFd, io_pending: bool) -> Honour {
        let mut paused = false;
        loop {
            match self.current_request() {
                Request::Run => {
                    if paused {
                        // EINVAL when the guest does not use kvmclock: fine.
                        let _ = fd.kvmclock_ctrl();
                    }
                    self.set_state(VcpuState::Running);
                    return Honour::Run;
                }
                Request::Exit => return Honour::Exit,
                // Decided here, where the request is read: a pause that
                // came after the caller looked must not park a vCPU whose
                // I/O instruction KVM has not finished (its state would be
                // saved before the instruction, and a restored guest would
                // run it again: an IN read twice from the device, an OUT
                // written twice).
                Request::Pause if io_pending && !paused => return Honour::CompleteIo,
                Request::Pause => {
                    paused = true;
                    let Ok(mut g) = self.state.lock() else {
                        return Honour::Exit;
                    };
                    if *g != VcpuState::Paused {
                        *g = VcpuState::Paused;
                        self.changed.notify_all();
                    }
                    let g = self
                        .changed
                        .wait_while(g, |_| {
                            self.current_request() == Request::Pause && !self.has_jobs()
                        })
                        .ok();
                    drop(g);
                    let jobs: Vec<Job> = self
                        .jobs
                        .lock()
                        .map(|mut j| j.drain(..).collect())
                        .unwrap_or_default();
                    for job in jobs {
                        job(fd);
                    }
                }
            }
        }
    }
}

/// What the vCPU thread does after looking at its requests.
#[derive(Debug, PartialEq, Eq)]
enum Honour {
    /// Run the guest.
    Run,
    /// The thread ends.
    Exit,
    /// A pause is asked for: finish the last exit's I/O instruction
    /// first (KVM_RUN with `immediate_exit`), then look again.
    CompleteIo,
}

/// Whether KVM finishes this exit's instruction only on the next KVM_RUN.
fn is_io(exit: &VcpuExit) -> bool {
    matches!(
        exit,
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)
    )
}

/// The buses a vCPU's I/O exits go to.
pub struct Buses {
    pub pio: PioBus,
    pub mmio: MmioBus,
}

/// Everything a vCPU thread owns.
pub struct Vcpu {
    pub fd: VcpuFd,
    pub shared: Arc<VcpuShared>,
    pub buses: Arc<Buses>,
    pub mem: GuestMemoryMmap,
    /// On a PVM host: run instructions the ring-0 emulator lacks (`pvm_assist`).
    pub pvm_assist_enabled: bool,
    /// Called once with the reason when this vCPU stops the VM.
    pub on_stop: Box<dyn Fn(u8, VcpuStop) + Send>,
}

enum Step {
    Continue,
    Stop(VcpuStop),
    /// KVM_EXIT_INTERNAL_ERROR: described with registers and instruction bytes.
    InternalError,
}

impl Vcpu {
    /// The thread body.
    pub fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|c| c.set(run_ptr));
        let id = self.shared.id;
        // The last exit was I/O or MMIO that KVM completes on the next entry.
        let mut io_pending = false;
        loop {
            match self.shared.honour_requests(&self.fd, io_pending) {
                Honour::Run => {}
                Honour::Exit => break,
                Honour::CompleteIo => {
                    if let Err(reason) = self.complete_io() {
                        (self.on_stop)(id, reason);
                        break;
                    }
                    io_pending = false;
                    continue;
                }
            }
            let step = match self.fd.run() {
                Ok(exit) => {
                    self.shared.exits.fetch_add(1, Ordering::Relaxed);
                    io_pending = is_io(&exit);
                    Self::handle_exit(&self.shared, &self.buses, exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    io_pending = false;
                    Step::Continue
                }
                Err(e) => Step::Stop(VcpuStop::Failure(format!("KVM_RUN failed: {e}"))),
            };
            let reason = match step {
                Step::Continue => continue,
                Step::Stop(VcpuStop::TripleFault) => {
                    // What the vCPU was doing: for the diagnosis of a
                    // guest that faults (docs/lab.md, "L2 triple faults").
                    tracing::warn!("vCPU {id}: {}", self.describe_triple_fault());
                    VcpuStop::TripleFault
                }
                Step::Stop(reason) => reason,
                Step::InternalError if self.pvm_assist_enabled && self.pvm_assist() => continue,
                Step::InternalError => VcpuStop::Failure(self.describe_internal_error()),
            };
            (self.on_stop)(id, reason);
            break;
        }
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        self.shared.set_state(VcpuState::Exited);
    }

    /// Lets KVM finish the I/O or MMIO instruction of the last exit without
    /// running the guest on: KVM_RUN with `immediate_exit` set. Completing
    /// a `rep ins/outs` may exit to userspace again for the next element;
    /// those exits are served the same way until KVM returns EINTR.
    fn complete_io(&mut self) -> Result<(), VcpuStop> {
        self.fd.set_kvm_immediate_exit(1);
        let done = loop {
            match self.fd.run() {
                Ok(exit) => {
                    self.shared.exits.fetch_add(1, Ordering::Relaxed);
                    match Self::handle_exit(&self.shared, &self.buses, exit) {
                        Step::Continue => continue,
                        Step::Stop(reason) => break Err(reason),
                        Step::InternalError => {
                            break Err(VcpuStop::Failure(self.describe_internal_error()))
                        }
                    }
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break Ok(()),
                Err(e) => {
                    break Err(VcpuStop::Failure(format!(
                        "KVM_RUN failed completing an I/O exit: {e}"
                    )))
                }
            }
        };
        self.fd.set_kvm_immediate_exit(0);
        done
    }

    fn handle_exit(shared: &VcpuShared, buses: &Buses, exit: VcpuExit) -> Step {
        match exit {
            VcpuExit::IoOut(port, data) => {
                shared.io_exits.fetch_add(1, Ordering::Relaxed);
                buses.pio.write(u64::from(port), data);
                Step::Continue
            }
            VcpuExit::IoIn(port, data) => {
                shared.io_exits.fetch_add(1, Ordering::Relaxed);
                buses.pio.read(u64::from(port), data);
                Step::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                shared.mmio_exits.fetch_add(1, Ordering::Relaxed);
                buses.mmio.read(addr, data);
                Step::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                shared.mmio_exits.fetch_add(1, Ordering::Relaxed);
                buses.mmio.write(addr, data);
                Step::Continue
            }
            VcpuExit::Hlt => Step::Continue,
            VcpuExit::Shutdown => Step::Stop(VcpuStop::TripleFault),
            VcpuExit::SystemEvent(kind, _) => Step::Stop(VcpuStop::SystemEvent(kind)),
            VcpuExit::InternalError => Step::InternalError,
            VcpuExit::FailEntry(reason, cpu) => Step::Stop(VcpuStop::Failure(format!(
                "KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
            ))),
            other => Step::Stop(VcpuStop::Failure(format!("unexpected VM exit: {other:?}"))),
        }
    }

    /// The registers and the 15 bytes at the guest's RIP (None where RIP
    /// does not translate to guest memory).
    fn code_at_rip(&self) -> Option<(kvm_regs, kvm_sregs, Option<[u8; 15]>)> {
        let regs = self.fd.get_regs().ok()?;
        let sregs = self.fd.get_sregs().ok()?;
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let gpa = if sregs.cr0 & (1 << 31) != 0 {
            self.fd
                .translate_gva(linear)
                .ok()
                .filter(|t| t.valid != 0)
                .map(|t| t.physical_address)
        } else {
            Some(linear)
        };
        let mut bytes = [0u8; 15];
        let bytes = gpa
            .and_then(|a| self.mem.read_slice(&mut bytes, GuestAddress(a)).ok())
            .map(|()| bytes);
        Some((regs, sregs, bytes))
    }

    /// Runs, on the emulator's behalf, an instruction that a PVM host's ring-0
    /// emulator reports as an internal error (`arch::pvm_assist`: `int3`,
    /// `popcnt`). Returns false when the instruction is not one we know.
    fn pvm_assist(&mut self) -> bool {
        let Some((regs, _, Some(code))) = self.code_at_rip() else {
            return false;
        };
        let Some(assist) = pvm_assist::assist(&regs, &code) else {
            return false;
        };
        let ok = match &assist {
            Assist::Done(r) => self.fd.set_regs(r).is_ok(),
            Assist::Inject(r, vector) => match self.fd.get_vcpu_events() {
                Ok(mut events) => {
                    events.exception.injected = 1;
                    events.exception.nr = *vector;
                    events.exception.has_error_code = 0;
                    events.exception.error_code = 0;
                    self.fd.set_regs(r).is_ok() && self.fd.set_vcpu_events(&events).is_ok()
                }
                Err(_) => false,
            },
        };
        if ok {
            tracing::trace!(
                "vCPU {}: ran {} at {:#x}",
                self.shared.id,
                assist.mnemonic(),
                regs.rip
            );
            self.shared.pvm_assists.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// "KVM internal error (suberror N) at RIP ...: instruction bytes ..."
    /// The vCPU's state at a triple fault (KVM_EXIT_SHUTDOWN): where it
    /// was, its control registers and descriptor tables, and the events
    /// KVM had for it.
    fn describe_triple_fault(&self) -> String {
        let Some((regs, sregs, bytes)) = self.code_at_rip() else {
            return "triple fault; its registers could not be read".into();
        };
        let mut msg = format!(
            "triple fault at RIP {:#x} (CS {:#x}, CPL {}), RSP {:#x}, RFLAGS {:#x}, CR0 {:#x}, \
             CR2 {:#x}, CR3 {:#x}, CR4 {:#x}, EFER {:#x}, IDT {:#x}+{:#x}, GDT {:#x}+{:#x}, \
             TR {:#x}",
            regs.rip,
            sregs.cs.selector,
            sregs.cs.dpl,
            regs.rsp,
            regs.rflags,
            sregs.cr0,
            sregs.cr2,
            sregs.cr3,
            sregs.cr4,
            sregs.efer,
            sregs.idt.base,
            sregs.idt.limit,
            sregs.gdt.base,
            sregs.gdt.limit,
            sregs.tr.base
        );
        if regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 {
            // KVM on AMD puts a vCPU through INIT at a shutdown intercept
            // (the VMCB is undefined after it): the registers are the
            // reset state, and only the events below still tell what was
            // last delivered.
            msg += " (the reset state: KVM re-initialised the vCPU at the shutdown)";
        }
        if let Ok(e) = self.fd.get_vcpu_events() {
            msg += &format!(
                "; exception injected {} pending {} vector {:#x} error code {:#x} \
                 (has one: {}), interrupt injected {} vector {:#x}, NMI injected {} \
                 pending {}, interrupt shadow {}",
                e.exception.injected,
                e.exception.pending,
                e.exception.nr,
                e.exception.error_code,
                e.exception.has_error_code,
                e.interrupt.injected,
                e.interrupt.nr,
                e.nmi.injected,
                e.nmi.pending,
                e.interrupt.shadow
            );
        }
        if let Some(b) = bytes {
            let hex: Vec<String> = b.iter().map(|b| format!("{b:02x}")).collect();
            msg += &format!("; instruction bytes {}", hex.join(" "));
        }
        msg
    }

    fn describe_internal_error(&mut self) -> String {
        let suberror = {
            let run = self.fd.get_kvm_run();
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
            // `internal` member of the union is the one KVM filled in.
            unsafe { run.__bindgen_anon_1.internal.suberror }
        };
        let mut msg = format!("KVM internal error (suberror {suberror})");
        if let Some((regs, sregs, bytes)) = self.code_at_rip() {
            msg += &format!(
                " at RIP {:#x} (CS base {:#x}, CR0 {:#x})",
                regs.rip, sregs.cs.base, sregs.cr0
            );
            match bytes {
                Some(b) => {
                    let hex: Vec<String> = b.iter().map(|b| format!("{b:02x}")).collect();
                    msg += &format!(": instruction bytes {}", hex.join(" "));
                }
                None => msg += ": instruction bytes unavailable",
            }
        }
        msg
    }
}
