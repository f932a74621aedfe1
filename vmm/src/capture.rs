//! Taking a snapshot of a running VM (`PUT /vm/snapshot`).
//!
//! Pause the vCPUs (unless paused) and freeze the I/O thread (no virtio
//! device touches memory or its queues), save every vCPU's KVM state on
//! its own thread, the VM's clock/PIT/irqchips and every device's
//! `Persist` state by id ([`MachineState`], the one state path), write the
//! memory layer (full: pages with content; incremental: pages dirtied
//! since the previous snapshot), resume, then commit the layer, state and
//! manifest (`snapshot` crate). The guest pauses only for state and
//! memory, not for the commit. A live snapshot copies memory while the
//! guest runs, in dirty-log rounds (the `precopy` engine with its
//! `Converge` policy) until what is left is small (or stops shrinking),
//! and pauses only for the last dirty pages and the state. In a job's cut
//! (`SnapshotRequest::cut`, `ffmk-node job checkpoint`) the converged copy
//! goes on until the job's driver says the whole job pauses, and the VM
//! is left paused for the job to resume as a whole.
//!
//! Dirty pages come from the VM's tracker (`memory::dirty`): a snapshot
//! holds a session on it for its whole run; pages it fetched for a
//! snapshot that then fails go back to the tracker, so a failure never
//! makes a later incremental layer miss pages.
use crate::arch::state::{self};
use crate::memory;
use crate::vm::Vm;
use devices::virtio::Frozen;
use precopy::Tracker as _;
use snapshot::memory::{write_layer, Selection};
use snapshot::{Commit, HostProfile, PageBitmap, Pending, PAGE_SIZE};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub use crate::machine::Error;
use crate::machine::{failed, ChainRef, MachineState};

/// How long the I/O thread may take to finish the event it is serving
/// before a snapshot gives up.
const IO_FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

use vmm_api::model::CutFiles;
pub use vmm_api::model::{SnapshotKind as Kind, SnapshotReply, SnapshotRequest};

/// Live snapshots: at most this many copy rounds, and the guest is paused
/// once fewer pages than this (1 MiB) are left dirty.
const LIVE_MAX_ROUNDS: u32 = 10;
const LIVE_FINAL_PAGES: u64 = 256;

/// A cut waiting for its job's pause looks for it this often when the
/// guest dirtied nothing.
const CUT_POLL: Duration = Duration::from_millis(1);

/// Creates the (empty) file `path`: a cut's signal to its job's driver.
fn touch(path: &std::path::Path) -> Result<(), Error> {
    std::fs::File::create(path)
        .map(drop)
        .map_err(|e| failed("signal the job's driver")(format!("{}: {e}", path.display())))
}

/// Freezes the I/O thread when the VM has virtio devices: from here until
/// the guard drops, no device writes guest memory or moves a queue.
pub(crate) fn freeze_devices(vm: &Vm) -> Result<Option<Frozen>, Error> {
    vm.devices
        .freeze(IO_FREEZE_TIMEOUT)
        .map_err(failed("stop device I/O"))
}

/// Stops the passthrough devices whose state is saved with the VM (vCPUs
/// paused, device I/O frozen): from here nothing but the VMM writes guest
/// RAM, so what is copied next is final.
pub(crate) fn stop_passthrough(vm: &Vm) -> Result<(), Error> {
    match vm.devices.passthrough() {
        Some(p) => p.stop_saves().map_err(failed("stop a passthrough device")),
        None => Ok(()),
    }
}

/// A live copy's dirty pages: KVM's and the VMM's (the session), plus what
/// passthrough devices wrote by DMA.
struct LiveDirty<'s, 'v> {
    session: &'s mut memory::dirty::Session<'v>,
    vm: &'v Vm,
    /// Devices stopped: the last fetch.
    stopped: bool,
}

impl precopy::Tracker for LiveDirty<'_, '_> {
    type Error = memory::dirty::Error;

    fn fetch(&mut self) -> Result<PageBitmap, memory::dirty::Error> {
        let mut pages = self.session.fetch()?;
        if let Some(mut p) = self.vm.devices.passthrough() {
            p.add_dma_dirty(self.vm.ram.guest(), &mut pages, self.stopped)
                .map_err(memory::dirty::Error::Device)?;
        }
        Ok(pages)
    }
}

/// The machine state: configuration, boot entry, the VM's and every vCPU's
/// KVM state and every device's state (vCPUs paused, devices frozen).
pub(crate) fn machine_state(vm: &Vm) -> Result<MachineState, Error> {
    let p = &vm.platform;
    Ok(MachineState::new(
        vm.config.machine_spec(p.profile),
        p.boot.clone(),
        p.tsc_khz,
        state::save_vm(&vm.vm_fd).map_err(|e| failed("save VM state")(e.to_string()))?,
        vm.vcpus
            .save()
            .map_err(|e| failed("save vCPU state")(e.to_string()))?,
        vm.devices
            .save()
            .map_err(|e| failed("save device state")(e.to_string()))?,
    ))
}

/// Lets the guest run again; a failure is logged (the snapshot's own
/// outcome is what the caller reports).
fn resume_after_snapshot(vm: &Vm) {
    if let Err(e) = vm.resume() {
        tracing::error!("snapshot: cannot resume the VM: {e}");
    }
}

/// Takes a snapshot as `req` asks; returns its summary for the API.
pub fn take(vm: &Vm, req: &SnapshotRequest) -> Result<SnapshotReply, Error> {
    let started = Instant::now();
    let mut dirty = match vm.ram.try_dirty_session() {
        Ok(s) => s,
        Err(memory::dirty::Error::Busy) => {
            return Err(Error::Unsupported(
                "a migration of this VM is in progress".into(),
            ))
        }
        Err(e) => return Err(failed("snapshot")(e.to_string())),
    };
    let chain = vm.ram.chain();
    let mut pending = match req.kind {
        Kind::Full => Pending::full(&req.dest, req.force)?,
        Kind::Incremental => {
            if req.force {
                return Err(Error::Chain(
                    "force replaces full snapshots only; an incremental one adds a layer".into(),
                ));
            }
            let Some(chain) = chain.filter(|_| dirty.logging()) else {
                return Err(Error::Chain(
                    "an incremental snapshot needs a previous snapshot of this VM: take a full \
                     one first"
                        .into(),
                ));
            };
            Pending::extend(&req.dest, &chain.chain_id, chain.generation)?
        }
    };
    let file = pending.memory_file()?;
    let was_paused = vm.is_paused();
    let live = req.live && !was_paused;
    let cut = req.cut.map(|c| (c, CutFiles::beside(&req.dest)));
    let mut pause = Duration::ZERO;
    let mut rounds = 0;
    let captured = (|| -> Result<_, Error> {
        let mut pause_start = Instant::now();
        if !live && !was_paused {
            vm.pause()
                .map_err(|e| failed("pause the VM")(e.to_string()))?;
        }
        // Devices stop with the vCPUs (and run during live rounds; what
        // they write is in the VMM's dirty bitmap).
        let mut frozen = if live { None } else { freeze_devices(vm)? };
        if live {
            // What passthrough devices write by DMA meanwhile is tracked.
            if let Some(mut p) = vm.devices.passthrough() {
                p.start_dma_tracking(vm.ram.guest())
                    .map_err(failed("track passthrough DMA"))?;
            }
        } else {
            stop_passthrough(vm)?;
        }
        // The first round: all pages with content, or those dirtied since
        // the previous snapshot. Dirty logging is on from here on.
        let dirty_err = |e: memory::dirty::Error| failed("read the dirty log")(e.to_string());
        let first = if dirty.start().map_err(dirty_err)? {
            Selection::Full
        } else {
            match (req.kind, dirty.fetch().map_err(dirty_err)?) {
                (Kind::Full, _) => Selection::Full,
                (Kind::Incremental, pages) => Selection::Pages(pages),
            }
        };
        let write = |sel: &Selection| {
            write_layer(vm.ram.guest(), sel, &file)
                .map_err(|e| failed("write guest memory")(e.to_string()))
        };
        let mut written = write(&first)?;
        rounds = 1;
        if live {
            // Copy what the guest dirtied meanwhile until the rest is small
            // or stops shrinking, then pause for the remainder.
            let mut policy = precopy::Converge::new(LIVE_MAX_ROUNDS, LIVE_FINAL_PAGES);
            let first = match &first {
                Selection::Full => PageBitmap::new(0),
                Selection::Pages(p) => p.clone(),
            };
            let mut tracker = LiveDirty {
                session: &mut dirty,
                vm,
                stopped: false,
            };
            let ending = precopy::run(
                &mut tracker,
                first,
                &mut |pages, round| {
                    // Round 1 was written above (it may be the whole memory).
                    if round > 1 {
                        let w = write(&Selection::Pages(pages.clone()))?;
                        written.defined.union(&w.defined);
                    }
                    Ok(pages.count() * PAGE_SIZE)
                },
                &mut |r| Ok(policy.decide(r)),
            )
            .map_err(|e| match e {
                precopy::Error::Tracker(e) => failed("read the dirty log")(e),
                precopy::Error::Stopped(e) => e,
            })?;
            rounds = ending.rounds;
            let mut unwritten = ending.last;
            if let Some((cut, files)) = &cut {
                // A job's cut: converged; go on copying until the job
                // pauses, so that the pause has only the last moment's
                // pages to write.
                touch(&files.ready)?;
                let deadline = Instant::now() + cut.max_wait();
                loop {
                    if files.abort.exists() {
                        return Err(Error::Unsupported(
                            "the job's checkpoint was abandoned before its pause".into(),
                        ));
                    }
                    if files.pause.exists() {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Unsupported(format!(
                            "the job did not pause within {} ms of this VM's copy converging",
                            cut.max_wait().as_millis()
                        )));
                    }
                    if unwritten.count() > 0 {
                        let w = write(&Selection::Pages(unwritten))?;
                        written.defined.union(&w.defined);
                        rounds += 1;
                    } else {
                        std::thread::sleep(CUT_POLL);
                    }
                    unwritten = tracker.fetch().map_err(dirty_err)?;
                }
            }
            pause_start = Instant::now();
            vm.pause()
                .map_err(|e| failed("pause the VM")(e.to_string()))?;
            frozen = freeze_devices(vm)?;
            stop_passthrough(vm)?;
            tracker.stopped = true;
            let mut last = tracker.fetch().map_err(dirty_err)?;
            last.union(&unwritten);
            let w = write(&Selection::Pages(last))?;
            written.defined.union(&w.defined);
            rounds += 1;
        }
        let machine = machine_state(vm);
        drop(frozen);
        if let (Some((cut, files)), true, Ok(_)) = (&cut, live, &machine) {
            // Captured: the job's driver resumes the job once every VM of
            // it says so; this VM stays paused until then.
            touch(&files.captured)?;
            let deadline = Instant::now() + cut.max_wait();
            while !files.resume.exists() {
                if files.abort.exists() || Instant::now() > deadline {
                    return Err(Error::Unsupported(
                        "the job's checkpoint was abandoned after this VM's capture".into(),
                    ));
                }
                std::thread::sleep(CUT_POLL);
            }
        }
        pause = pause_start.elapsed();
        if !was_paused {
            resume_after_snapshot(vm);
        }
        if live {
            // Pages were rewritten across rounds: checksum the final file,
            // and count what it really stores.
            written.crc32 = snapshot::memory::checksum_layer(&file, &written.defined)
                .map_err(|e| failed("checksum guest memory")(e.to_string()))?;
            use std::os::unix::fs::MetadataExt;
            written.data_bytes = file
                .metadata()
                .map(|m| m.blocks() * 512)
                .unwrap_or(written.data_bytes);
        }
        Ok((machine?, written))
    })();
    if captured.is_err() && !was_paused && vm.is_paused() {
        resume_after_snapshot(vm);
    }
    // A failure from here on drops the session uncommitted: the pages it
    // fetched go back to the tracker for the next snapshot.
    let (machine, written) = captured?;
    let state = serde_json::to_vec(&machine).map_err(|e| failed("encode state")(e.to_string()))?;
    let pages = written.defined.count();
    let data_bytes = written.data_bytes;
    let commit = Commit {
        written,
        live,
        pause_ms: pause.as_secs_f64() * 1e3,
        state,
        vm_config: serde_json::to_value(&vm.config).unwrap_or_default(),
        host: HostProfile {
            cpu_vendor: crate::host::host_vendor(),
            cpu_profile: format!("{:?}", vm.platform.profile).to_lowercase(),
            host_kind: format!("{:?}", vm.platform.host_kind).to_lowercase(),
            tsc_khz: vm.platform.tsc_khz,
        },
        memory_bytes: vm.config.memory_bytes,
        regions: vm
            .ram
            .guest()
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect(),
    };
    let manifest = pending.commit(commit)?;
    dirty.commit();
    vm.ram.set_chain(ChainRef {
        dir: req.dest.clone(),
        chain_id: manifest.chain_id.clone(),
        generation: manifest.generation,
    });
    Ok(SnapshotReply {
        dest: req.dest.clone(),
        kind: req.kind,
        chain_id: manifest.chain_id.clone(),
        generation: manifest.generation,
        layers: manifest.layers.len() as u64,
        pause_ms: pause.as_secs_f64() * 1e3,
        live,
        rounds,
        total_ms: started.elapsed().as_secs_f64() * 1e3,
        pages_written: pages,
        data_bytes,
        memory_bytes: vm.config.memory_bytes,
        unplugged: Vec::new(),
    })
}
