//! A Slurm task that stays its VM's proxy (`ffmk-node slurm-vm --config`).
//!
//! Slurm counts a task as running while its process runs, and signals it on
//! `scancel` and at the time limit. The task starts the VM's `ffmk-vmm` as
//! its child and forwards those signals to it. When the node daemons move
//! the VM to another host (a live migration: the source VMM ends with 0),
//! the task does not end: it finds the host the VM runs on now (`vm-watch`
//! over the daemons' control ports: "moved to H", "runs here", "ended with
//! status S"), forwards signals there (`vm-signal`), follows further moves,
//! and ends with the VM's own exit status when the VM ends, wherever it
//! ran. So `squeue`, `srun`'s status and `scancel` stay true for a rank
//! whose VM moved.
use crate::config::{Plane, Resolved};
use crate::control::{self, Request};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The signals a task forwards to its VM.
pub const FORWARDED: [(i32, &str); 7] = [
    (libc::SIGTERM, "TERM"),
    (libc::SIGINT, "INT"),
    (libc::SIGHUP, "HUP"),
    (libc::SIGQUIT, "QUIT"),
    (libc::SIGUSR1, "USR1"),
    (libc::SIGUSR2, "USR2"),
    (libc::SIGCONT, "CONT"),
];

/// How long a task looks for its VM after it moved (the destination's
/// daemon lists it at its next look at its VM directory).
const LOCATE_FOR: Duration = Duration::from_secs(30);

/// The daemons' cluster, to follow a VM through.
pub struct Cluster {
    pub r: Resolved,
    pub plane: Plane,
}

/// The forwarded signals, blocked in the calling thread (before any
/// other thread starts, so that they are only ever taken by
/// [`next_signal`]). Children start with an empty mask (std resets it).
pub fn block_signals() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value to initialize with
    // sigemptyset, which comes next.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned here; the signal numbers are
    // valid; pthread_sigmask changes only this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        for (s, _) in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// A signal of `set` taken within `timeout`, if one came.
pub fn next_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are valid for the call; a null siginfo pointer
    // is allowed.
    let s = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (s > 0).then_some(s)
}

/// A signal that ends a VM (the others only go through to it).
fn stops(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT
    )
}

fn name_of(sig: i32) -> &'static str {
    FORWARDED
        .iter()
        .find(|(s, _)| *s == sig)
        .map_or("?", |(_, n)| n)
}

/// Runs the VMM `cmd` of VM `name` (API socket `sock`) as this task's
/// child, forwarding signals; follows the VM when it moves away (with
/// `cluster`). Returns the VM's exit status.
pub fn run(
    cmd: &mut Command,
    name: &str,
    sock: &Path,
    cluster: Option<&Cluster>,
    signals: &libc::sigset_t,
) -> Result<u8, String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let api = vmm_api::Client::new(sock).with_timeout(Duration::from_millis(500));
    let mut moving = false;
    let mut stopped_by = None;
    let mut last_look = Instant::now();
    let status = loop {
        if let Some(sig) = next_signal(signals, Duration::from_millis(100)) {
            // SAFETY: kill(2) on this task's own child.
            unsafe { libc::kill(child.id() as i32, sig) };
            if stops(sig) {
                stopped_by = Some(sig);
            }
        }
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(format!("cannot wait for the VMM: {e}")),
        }
        // Is it being migrated away? (A source VMM that ends with 0 then
        // means the VM runs elsewhere.)
        if cluster.is_some() && last_look.elapsed() >= Duration::from_millis(200) {
            last_look = Instant::now();
            if let Ok(
                vmm_api::model::MigrationStatus::Running { .. }
                | vmm_api::model::MigrationStatus::Completed(_),
            ) = api.migration()
            {
                moving = true;
            }
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or(128 + status.signal().unwrap_or(0));
    if let (0, Some(sig)) = (code, stopped_by) {
        // Stopped by the signal this task forwarded: as a shell reports a
        // process a signal ended (srun then fails, as Slurm cancelled it).
        return Ok((128 + sig) as u8);
    }
    match cluster {
        Some(c) if code == 0 => {
            let f = Follow { c, name };
            // A migration that began and ended between two looks: this
            // host's daemon knows (it moved the VM).
            if moving || f.moved_from_here() {
                f.follow(signals)
            } else {
                Ok(0)
            }
        }
        _ => Ok(code.clamp(0, 255) as u8),
    }
}

/// Where a VM that moved is.
enum Where {
    At(usize),
    Ended(u8),
}

struct Follow<'a> {
    c: &'a Cluster,
    name: &'a str,
}

impl Follow<'_> {
    /// One host's `vm-watch` answer about the VM.
    fn watch(&self, slot: usize) -> Option<Value> {
        let req = Request::VmWatch {
            name: self.name.to_string(),
        };
        control::call(
            self.c.r.control[slot],
            &self.c.plane.trust,
            &req,
            Duration::from_secs(5),
        )
        .ok()
        .filter(|r| r.ok)
        .and_then(|r| r.status)
    }

    /// Whether this host's daemon is moving or has moved the VM (asked
    /// for a second: it records the move once the migration's outcome is
    /// read).
    fn moved_from_here(&self) -> bool {
        for _ in 0..5 {
            if let Some(w) = self.watch(self.c.r.slot) {
                if matches!(w["state"].as_str(), Some("moving" | "moved")) {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    /// Where the VM is now: `from`'s daemon says where it sent it (or that
    /// it ended there), else every host is asked (for `LOCATE_FOR`).
    fn locate(&self, from: usize) -> Option<Where> {
        let slot_of = |h: &str| self.c.r.names.iter().position(|n| n == h);
        let deadline = Instant::now() + LOCATE_FOR;
        loop {
            if let Some(w) = self.watch(from) {
                match w["state"].as_str() {
                    Some("moved") => {
                        if let Some(s) = w["to"].as_str().and_then(slot_of) {
                            return Some(Where::At(s));
                        }
                    }
                    Some("running" | "paused" | "incoming") => return Some(Where::At(from)),
                    Some("ended") => {
                        return Some(Where::Ended(
                            w["exit"].as_i64().unwrap_or(1).clamp(0, 255) as u8
                        ))
                    }
                    _ => {}
                }
            }
            for s in 0..self.c.r.names.len() {
                if s == from {
                    continue;
                }
                if let Some(w) = self.watch(s) {
                    if matches!(w["state"].as_str(), Some("running" | "paused")) {
                        return Some(Where::At(s));
                    }
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn follow(&self, signals: &libc::sigset_t) -> Result<u8, String> {
        let me = self.c.r.slot;
        let mut stopped_by = None;
        let ended = |code: u8, stopped_by: Option<i32>| match (code, stopped_by) {
            (0, Some(sig)) => (128 + sig) as u8,
            _ => code,
        };
        let mut at = match self.locate(me) {
            Some(Where::At(s)) => s,
            Some(Where::Ended(code)) => return Ok(code),
            None => {
                return Err(format!(
                    "{} was migrated away, and no host reports it running within {} s",
                    self.name,
                    LOCATE_FOR.as_secs()
                ))
            }
        };
        eprintln!(
            "ffmk-node: {} moved to {}; this task follows it (signals go there, it ends with the VM)",
            self.name, self.c.r.names[at]
        );
        loop {
            if let Some(sig) = next_signal(signals, Duration::from_millis(500)) {
                if stops(sig) {
                    stopped_by = Some(sig);
                }
                let req = Request::VmSignal {
                    name: self.name.to_string(),
                    signal: name_of(sig).to_string(),
                };
                let sent = control::call(
                    self.c.r.control[at],
                    &self.c.plane.trust,
                    &req,
                    Duration::from_secs(5),
                );
                match sent {
                    Ok(r) if r.ok => eprintln!(
                        "ffmk-node: SIG{} forwarded to {} on {}",
                        name_of(sig),
                        self.name,
                        self.c.r.names[at]
                    ),
                    Ok(r) => eprintln!(
                        "ffmk-node: SIG{} for {}: {} refused: {}",
                        name_of(sig),
                        self.name,
                        self.c.r.names[at],
                        r.error.unwrap_or_default()
                    ),
                    Err(e) => eprintln!("ffmk-node: SIG{} for {}: {e}", name_of(sig), self.name),
                }
            }
            let Some(w) = self.watch(at) else {
                continue;
            };
            match w["state"].as_str() {
                Some("running" | "paused" | "incoming" | "moving") => {}
                _ => match self.locate(at) {
                    Some(Where::Ended(code)) => {
                        eprintln!(
                            "ffmk-node: {} ended on {} with status {code}",
                            self.name, self.c.r.names[at]
                        );
                        return Ok(ended(code, stopped_by));
                    }
                    Some(Where::At(s)) => {
                        if s != at {
                            eprintln!("ffmk-node: {} moved on to {}", self.name, self.c.r.names[s]);
                        }
                        at = s;
                    }
                    None => {
                        return Err(format!(
                            "lost track of {}: {} no longer has it and no host reports it running",
                            self.name, self.c.r.names[at]
                        ))
                    }
                },
            }
        }
    }
}
