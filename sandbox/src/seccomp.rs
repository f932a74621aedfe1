//! seccomp filters, one per kind of thread.
//!
//! Each thread of ffmk-vmm calls [`install`] for its own kind before it
//! handles guest or client input. Filters stack: a thread started by a
//! confined thread keeps its parent's filter and adds its own, so the
//! control thread's list holds everything the threads it starts (migration,
//! post-copy requests) need, and theirs are narrower.
//!
//! With [`Mode::On`] a call outside the list raises SIGSYS; the handler
//! writes one line naming the thread and the call and ends the process with
//! [`EXIT_FORBIDDEN`]. The handler itself makes only `write` and
//! `exit_group`, which every list allows.
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Exit status of a VMM stopped by its filter (128 + SIGSYS, as a shell
/// reports a process killed by that signal).
pub const EXIT_FORBIDDEN: i32 = 128 + libc::SIGSYS;

/// `--seccomp`: what a call outside a thread's list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The VMM stops with a report (the default).
    #[default]
    On,
    /// The call goes ahead and the kernel logs it (audit log), for finding
    /// what a new host or configuration needs.
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("--seccomp takes on, log or off, not {s:?}")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// The kinds of threads of ffmk-vmm, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs `KVM_RUN` and emulates port and MMIO accesses.
    Vcpu,
    /// The virtio event loop: disk, network, vsock, console, rng back ends.
    Io,
    /// Accepts API connections and parses HTTP.
    Api,
    /// The main thread once the VM runs: API requests, signals, snapshots,
    /// checkpoints; starts the migration threads.
    Control,
    /// Sends a VM to another host (pre-copy, post-copy pages).
    Migration,
    /// On a post-copy destination: serves faults on missing pages and
    /// receives pages.
    Postcopy,
    /// Moves device interrupts and helper threads off compute cores.
    Placement,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Vcpu,
        ThreadKind::Io,
        ThreadKind::Api,
        ThreadKind::Control,
        ThreadKind::Migration,
        ThreadKind::Postcopy,
        ThreadKind::Placement,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Io => "io",
            ThreadKind::Api => "api",
            ThreadKind::Control => "control",
            ThreadKind::Migration => "migration",
            ThreadKind::Postcopy => "postcopy",
            ThreadKind::Placement => "placement",
        }
    }

    /// The system calls this kind of thread may make (unconditionally or,
    /// for `ioctl`, with the request numbers of [`Self::ioctl_types`]).
    pub fn allowed(self) -> Vec<i64> {
        let mut v: Vec<i64> = EVERY_THREAD.to_vec();
        if !matches!(self, ThreadKind::Vcpu | ThreadKind::Placement) {
            v.extend_from_slice(CONNECTED);
        }
        match self {
            ThreadKind::Vcpu => v.extend_from_slice(VCPU),
            ThreadKind::Io => v.extend_from_slice(IO),
            ThreadKind::Api => v.extend_from_slice(API),
            ThreadKind::Control => {
                v.extend_from_slice(CONTROL);
                v.extend_from_slice(MIGRATION);
                v.extend_from_slice(THREADS);
            }
            ThreadKind::Migration => {
                v.extend_from_slice(MIGRATION);
                v.extend_from_slice(THREADS);
            }
            ThreadKind::Postcopy => v.extend_from_slice(POSTCOPY),
            ThreadKind::Placement => v.extend_from_slice(PLACEMENT),
        }
        v.extend_from_slice(self.refused());
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Calls that fail with EACCES instead of stopping the VMM: threads
    /// that open no files, where glibc's allocator may still try once
    /// (it reads /proc/sys/vm/overcommit_memory the first time a heap
    /// shrinks, in whichever thread, and copes when it cannot).
    pub fn refused(self) -> &'static [i64] {
        match self {
            ThreadKind::Vcpu | ThreadKind::Io | ThreadKind::Api | ThreadKind::Postcopy => {
                &[libc::SYS_open, libc::SYS_openat]
            }
            ThreadKind::Control | ThreadKind::Migration | ThreadKind::Placement => &[],
        }
    }

    /// The ioctl "types" (bits 8-15 of the request) this kind may use:
    /// KVM's 0xAE everywhere, TUN's b'T' where TAP devices are driven,
    /// userfaultfd's 0xAA where post-copy pages are placed, VFIO's b';' where
    /// passthrough functions are driven. `None`: any
    /// ioctl (threads that only pass descriptors the kernel checks).
    pub fn ioctl_types(self) -> Option<&'static [u64]> {
        const KVM: u64 = 0xAE;
        const TUN: u64 = b'T' as u64;
        const UFFD: u64 = 0xAA;
        // VFIO's b';': a vCPU enables a passthrough function's MSI/MSI-X
        // when the guest's driver does; the I/O thread unmasks a function's
        // INTx after the guest's EOI (where the driver takes no unmask
        // eventfd); the migration thread saves a device's state (VFIO
        // migration); the main thread resets it at the end.
        const VFIO: u64 = b';' as u64;
        match self {
            ThreadKind::Vcpu => Some(&[KVM, TUN, VFIO]),
            // FIONREAD and FIONBIO are type b'T' (0x54) too.
            ThreadKind::Io => Some(&[KVM, TUN, VFIO]),
            ThreadKind::Api => Some(&[TUN]),
            ThreadKind::Control => Some(&[KVM, TUN, UFFD, VFIO]),
            ThreadKind::Migration => Some(&[KVM, TUN, UFFD, VFIO]),
            ThreadKind::Postcopy => Some(&[KVM, TUN, UFFD]),
            ThreadKind::Placement => Some(&[TUN]),
        }
    }
}

/// Every thread: memory, locks, time, signals, reads and writes on
/// descriptors it already has, ending.
const EVERY_THREAD: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_ioctl,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What a new thread does for itself (inherited filters apply to it),
/// including installing its own, narrower filter.
const THREADS: &[i64] = &[
    libc::SYS_seccomp,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
];

/// A vCPU also activates devices when the guest's driver says DRIVER_OK
/// (event descriptors, rate-limit timers, TAP offloads, MSI routes), and
/// forwards passthrough accesses (VFIO, vfio-user).
const VCPU: &[i64] = &[
    // vfio-user: a trapped access is a request to the device's server
    // (the reply comes back on its reader thread), and interrupt eventfds
    // go there (SCM_RIGHTS) when the guest's driver enables MSI/MSI-X.
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_sched_setaffinity,
];

const IO: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    // virtio-blk: flush, discard, write zeroes.
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    // vsock: guest connections become Unix-socket connections.
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
];

const API: &[i64] = &[libc::SYS_accept4, libc::SYS_accept];

/// Talking over a connected socket (every kind but vCPU and placement).
const CONNECTED: &[i64] = &[
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

/// Snapshots, checkpoints, restores of disks, signals, shutting down.
const CONTROL: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_unlink,
    libc::SYS_mincore,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_getdents64,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_copy_file_range,
    libc::SYS_fchmod,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    // realpath(3), for --snapshot-dir checks.
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_epoll_create1,
    libc::SYS_rt_sigaction,
    libc::SYS_kill,
    libc::SYS_sched_setaffinity,
    libc::SYS_wait4,
    libc::SYS_accept4,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    // Guest memory of an arriving or restored VM, bound to its host
    // NUMA nodes (--numa host-node=).
    libc::SYS_mbind,
];

/// TCP to the destination, the dirty log, post-copy page requests.
const MIGRATION: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendfile,
    libc::SYS_mincore,
    // Name resolution of the destination (files, then DNS).
    libc::SYS_openat,
    libc::SYS_uname,
    // An arriving VM's memory, bound to its host NUMA nodes.
    libc::SYS_mbind,
];

const POSTCOPY: &[i64] = &[
    // The API socket, removed when post-copy fails and the VMM stops.
    libc::SYS_unlink,
];

/// Reads /proc and /sys, writes IRQ affinities, pins helper threads.
const PLACEMENT: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_getdents64,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setscheduler,
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {kind} thread: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot compile the seccomp filter of the {kind} thread: {source}")]
    Compile {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of the {kind} thread: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The second filter of `kind`: its [`ThreadKind::refused`] calls fail
/// with EACCES (the first filter lets them through to this one).
pub fn refusals(kind: ThreadKind) -> Result<Option<BpfProgram>, Error> {
    if kind.refused().is_empty() {
        return Ok(None);
    }
    let rules = kind.refused().iter().map(|&nr| (nr, Vec::new())).collect();
    compile(
        kind,
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
    )
    .map(Some)
}

/// `rules` with the actions for a mismatch and a match, as BPF.
fn compile(
    kind: ThreadKind,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, Error> {
    let filter =
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(|source| {
            Error::Build {
                kind: kind.name(),
                source,
            }
        })?;
    BpfProgram::try_from(filter).map_err(|source| Error::Compile {
        kind: kind.name(),
        source,
    })
}

/// The BPF program of `kind` with `mode` (`Off` has none).
pub fn program(kind: ThreadKind, mode: Mode) -> Result<Option<BpfProgram>, Error> {
    let mismatch = match mode {
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
        Mode::Off => return Ok(None),
    };
    let build = |source| Error::Build {
        kind: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in kind.allowed() {
        let chain = if nr == libc::SYS_ioctl {
            match kind.ioctl_types() {
                None => Vec::new(),
                Some(types) => types
                    .iter()
                    .map(|t| {
                        SeccompCondition::new(
                            1,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::MaskedEq(0xff00),
                            t << 8,
                        )
                        .and_then(|c| SeccompRule::new(vec![c]))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(build)?,
            }
        } else {
            Vec::new()
        };
        rules.insert(nr, chain);
    }
    compile(kind, rules, mismatch, SeccompAction::Allow).map(Some)
}

/// The process's mode: `Off` until [`set_mode`] is called, so that code
/// using the VMM's crates as a library (tests, tools) is not confined
/// unless it asks.
static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Sets the mode every later [`confine`] uses (ffmk-vmm: `--seccomp`,
/// before any thread starts).
pub fn set_mode(mode: Mode) {
    let v = match mode {
        Mode::On => 0,
        Mode::Log => 1,
        Mode::Off => 2,
    };
    MODE.store(v, std::sync::atomic::Ordering::SeqCst);
}

pub fn mode() -> Mode {
    match MODE.load(std::sync::atomic::Ordering::SeqCst) {
        0 => Mode::On,
        1 => Mode::Log,
        _ => Mode::Off,
    }
}

/// Installs the filter of `kind` on the calling thread with the process's
/// mode ([`set_mode`]). `label` names the thread in a report (`vcpu3`).
pub fn confine(kind: ThreadKind, label: &str) -> Result<(), Error> {
    install(kind, mode(), label)
}

/// Installs the filter of `kind` on the calling thread (and, for `On`,
/// the process's SIGSYS handler). `label` names the thread in a report
/// (`vcpu3`); at most 15 bytes are kept.
pub fn install(kind: ThreadKind, mode: Mode, label: &str) -> Result<(), Error> {
    let Some(program) = program(kind, mode)? else {
        return Ok(());
    };
    if mode == Mode::On {
        report::install_handler().map_err(Error::Handler)?;
    }
    report::set_label(label);
    let install = |p: &BpfProgram| {
        seccompiler::apply_filter(p).map_err(|source| Error::Install {
            kind: kind.name(),
            source,
        })
    };
    if let Some(refusals) = refusals(kind)? {
        install(&refusals)?;
    }
    install(&program)
}

/// The one line that a forbidden call produces, and the SIGSYS handler
/// that writes it. Async-signal-safe: no allocation, no locks, only
/// `write(2)` and `_exit(2)`.
mod report {
    use std::cell::Cell;
    use std::sync::Once;

    thread_local! {
        static LABEL: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    }

    pub fn set_label(label: &str) {
        let mut buf = [0u8; 16];
        let n = label.len().min(15);
        buf[..n].copy_from_slice(&label.as_bytes()[..n]);
        LABEL.with(|l| l.set(buf));
    }

    /// The SIGSYS part of `siginfo_t` on x86_64: after signo, errno, code
    /// and padding, the call address, the system call number and the
    /// audit architecture.
    #[repr(C)]
    struct SigsysInfo {
        signo: i32,
        errno: i32,
        code: i32,
        _pad: i32,
        call_addr: *mut libc::c_void,
        syscall: i32,
        arch: u32,
    }

    struct Line {
        buf: [u8; 320],
        len: usize,
    }

    impl Line {
        fn push(&mut self, s: &[u8]) {
            let n = s.len().min(self.buf.len() - self.len);
            self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
            self.len += n;
        }
        fn number(&mut self, mut v: u64) {
            let mut digits = [0u8; 20];
            let mut i = digits.len();
            loop {
                i -= 1;
                digits[i] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            self.push(&digits[i..]);
        }
    }

    /// The report for a call `nr` made by the thread labelled `label`.
    pub(super) fn line(label: &[u8], nr: i64) -> ([u8; 320], usize) {
        let mut l = Line {
            buf: [0; 320],
            len: 0,
        };
        l.push(b"ffmk-vmm: seccomp: the ");
        l.push(if label.is_empty() { b"unnamed" } else { label });
        l.push(b" thread made system call ");
        l.number(nr as u64);
        if let Some(name) = crate::syscall_name(nr) {
            l.push(b" (");
            l.push(name.as_bytes());
            l.push(b")");
        }
        l.push(b", which its filter forbids: stopping the VMM (exit ");
        l.number(super::EXIT_FORBIDDEN as u64);
        l.push(b"; --seccomp=log lets such calls through and logs them)\n");
        (l.buf, l.len)
    }

    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose
        // layout on x86_64 starts as SigsysInfo does.
        let nr = unsafe { (*(info as *const SigsysInfo)).syscall };
        let label = LABEL.with(|l| l.get());
        let n = label.iter().position(|&b| b == 0).unwrap_or(label.len());
        let (buf, len) = line(&label[..n], i64::from(nr));
        // SAFETY: write(2) and _exit(2) are async-signal-safe; buf lives
        // on this stack for the call.
        unsafe {
            libc::write(2, buf.as_ptr().cast(), len);
            libc::_exit(super::EXIT_FORBIDDEN);
        }
    }

    pub fn install_handler() -> std::io::Result<()> {
        static ONCE: Once = Once::new();
        let mut result = Ok(());
        ONCE.call_once(|| {
            // SAFETY: a zeroed sigaction is valid; the handler only makes
            // async-signal-safe calls.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_sigsys as *const () as usize;
                sa.sa_flags = libc::SA_SIGINFO;
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                    result = Err(std::io::Error::last_os_error());
                }
            }
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/security.md has a table of how many calls each kind may make;
    /// it must say what the lists say.
    #[test]
    fn the_documented_counts_are_the_lists() {
        let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md"));
        let mut want = String::new();
        for kind in ThreadKind::ALL {
            let row = format!(
                "| `{}` | {} | {} |",
                kind.name(),
                kind.allowed().len(),
                kind.refused().len()
            );
            want.push_str(&row);
            want.push('\n');
        }
        assert!(
            doc.contains(&want),
            "docs/security.md should have these rows, in this order:\n{want}"
        );
    }

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for kind in ThreadKind::ALL {
            assert!(program(kind, Mode::Off).unwrap().is_none());
            for mode in [Mode::On, Mode::Log] {
                let p = program(kind, mode).unwrap().unwrap();
                assert!(!p.is_empty(), "{kind:?}");
            }
            // The report handler needs these two wherever it runs.
            let allowed = kind.allowed();
            assert!(allowed.contains(&libc::SYS_write));
            assert!(allowed.contains(&libc::SYS_exit_group));
        }
    }

    #[test]
    fn lists_stack_where_threads_start_threads() {
        // The control thread starts migration threads, which start the
        // post-copy request thread: a child's list must fit in its
        // parent's, or the inherited filter would stop it.
        let control = ThreadKind::Control.allowed();
        for nr in ThreadKind::Migration.allowed() {
            assert!(control.contains(&nr), "{:?}", crate::syscall_name(nr));
        }
        // ... and it must be allowed to install its own.
        assert!(control.contains(&libc::SYS_seccomp));
        assert!(control.contains(&libc::SYS_prctl));
    }

    #[test]
    fn the_vcpu_thread_cannot_open_files_or_sockets() {
        assert!(ThreadKind::Vcpu.refused().contains(&libc::SYS_openat));
        assert!(refusals(ThreadKind::Vcpu).unwrap().is_some());
        assert!(refusals(ThreadKind::Control).unwrap().is_none());
        let vcpu = ThreadKind::Vcpu.allowed();
        for nr in [
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_fork,
            libc::SYS_ptrace,
            libc::SYS_mount,
        ] {
            assert!(!vcpu.contains(&nr), "{:?}", crate::syscall_name(nr));
        }
    }

    #[test]
    fn modes_parse_and_reports_name_the_thread_and_call() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("yes"
            .parse::<Mode>()
            .unwrap_err()
            .contains("on, log or off"));
        // The longest names and labels still end the line.
        let (buf, len) = report::line(b"postcopy-faults", libc::SYS_set_mempolicy_home_node);
        assert_eq!(buf[len - 1], b'\n');
        let (buf, len) = report::line(b"vcpu1", libc::SYS_socket);
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert_eq!(
            text,
            "ffmk-vmm: seccomp: the vcpu1 thread made system call 41 (socket), which its \
             filter forbids: stopping the VMM (exit 159; --seccomp=log lets such calls through \
             and logs them)\n"
        );
    }
}
