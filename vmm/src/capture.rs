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
//! and pauses only for the last dirty pages and the state.
//!
//! Dirty pages come from the VM's tracker (`memory::dirty`): a snapshot
//! holds a session on it for its whole run; pages it fetched for a
//! snapshot that then fails go back to the tracker, so a failure never
//! makes a later incremental layer miss pages.
use crate::arch::state::{self, VcpuSnapshot};
use crate::memory;
use crate::vm::Vm;
use devices::persist::StateError;
use devices::virtio::Frozen;
use snapshot::memory::{write_layer, Selection};
use snapshot::{Commit, HostProfile, PageBitmap, Pending, PAGE_SIZE};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub use crate::machine::Error;
use crate::machine::{
    failed, ChainRef, DeviceStateError, DeviceStates, MachineState, PCI, RTC, SERIAL,
};

/// How long the I/O thread may take to finish the event it is serving
/// before a snapshot gives up.
const IO_FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

pub use vmm_api::model::{SnapshotKind as Kind, SnapshotReply, SnapshotRequest};

/// Live snapshots: at most this many copy rounds, and the guest is paused
/// once fewer pages than this (1 MiB) are left dirty.
const LIVE_MAX_ROUNDS: u32 = 10;
const LIVE_FINAL_PAGES: u64 = 256;

/// Freezes the I/O thread when the VM has virtio devices: from here until
/// the guard drops, no device writes guest memory or moves a queue.
pub(crate) fn freeze_devices(vm: &Vm) -> Result<Option<Frozen>, Error> {
    if vm.virtio.is_empty() {
        return Ok(None);
    }
    vm.io_thread
        .freeze(IO_FREEZE_TIMEOUT)
        .map(Some)
        .map_err(failed("stop device I/O"))
}

fn save_vcpus(vm: &Vm) -> Result<Vec<VcpuSnapshot>, Error> {
    let mut pending = Vec::new();
    for v in &vm.vcpus {
        let (tx, rx) = std::sync::mpsc::channel();
        let msrs = vm.msr_indices.clone();
        let id = v.shared.id;
        v.shared.run_paused(Box::new(move |fd| {
            let _ = tx.send(state::save_vcpu(fd, id, &msrs));
        }));
        pending.push((id, rx));
    }
    pending
        .into_iter()
        .map(|(id, rx)| {
            rx.recv_timeout(Duration::from_secs(10))
                .map_err(|_| format!("vCPU {id} did not hand over its state"))
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(failed("save vCPU state"))
        })
        .collect()
}

/// Every device's state by id: the platform devices, the PCI root bus and
/// each virtio transport.
fn save_devices(vm: &Vm) -> Result<DeviceStates, DeviceStateError> {
    let poisoned = |what: &'static str| DeviceStateError::Device {
        id: what.into(),
        source: StateError::Poisoned(what),
    };
    let mut d = DeviceStates::default();
    d.put(SERIAL, &*vm.serial.lock().map_err(|_| poisoned(SERIAL))?)?;
    d.put(RTC, &*vm.rtc.lock().map_err(|_| poisoned(RTC))?)?;
    d.put(PCI, &vm.pci)?;
    for f in &vm.virtio {
        d.put(&f.id, &f.transport)?;
    }
    Ok(d)
}

pub(crate) fn machine_state(vm: &Vm) -> Result<MachineState, Error> {
    let c = &vm.config;
    Ok(MachineState::new(
        c.machine_spec(vm.profile),
        vm.boot.clone(),
        vm.tsc_khz,
        state::save_vm(&vm.vm_fd).map_err(|e| failed("save VM state")(e.to_string()))?,
        save_vcpus(vm)?,
        save_devices(vm).map_err(|e| failed("save device state")(e.to_string()))?,
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
    let mut dirty = match vm.dirty.try_session(&vm.vm_fd, &vm.mem) {
        Ok(s) => s,
        Err(memory::dirty::Error::Busy) => {
            return Err(Error::Unsupported(
                "a migration of this VM is in progress".into(),
            ))
        }
        Err(e) => return Err(failed("snapshot")(e.to_string())),
    };
    let chain = vm.chain.lock().map(|c| c.clone()).unwrap_or_default();
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
    let mut pause = Duration::ZERO;
    let mut rounds = 0;
    let captured = (|| -> Result<_, Error> {
        let mut pause_start = Instant::now();
        if !live && !was_paused {
            vm.pause().map_err(failed("pause the VM"))?;
        }
        // Devices stop with the vCPUs (and run during live rounds; what
        // they write is in the VMM's dirty bitmap).
        let mut frozen = if live { None } else { freeze_devices(vm)? };
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
            write_layer(&vm.mem, sel, &file)
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
            let ending = precopy::run(
                &mut dirty,
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
            pause_start = Instant::now();
            vm.pause().map_err(failed("pause the VM"))?;
            frozen = freeze_devices(vm)?;
            let mut last = dirty.fetch().map_err(dirty_err)?;
            last.union(&ending.last);
            let w = write(&Selection::Pages(last))?;
            written.defined.union(&w.defined);
            rounds += 1;
        }
        let machine = machine_state(vm);
        drop(frozen);
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
            cpu_profile: format!("{:?}", vm.profile).to_lowercase(),
            host_kind: format!("{:?}", vm.host_kind).to_lowercase(),
            tsc_khz: vm.tsc_khz,
        },
        memory_bytes: vm.config.memory_bytes,
        regions: vm.mem.iter().map(|r| (r.start_addr().0, r.len())).collect(),
    };
    let manifest = pending.commit(commit)?;
    dirty.commit();
    if let Ok(mut c) = vm.chain.lock() {
        *c = Some(ChainRef {
            dir: req.dest.clone(),
            chain_id: manifest.chain_id.clone(),
            generation: manifest.generation,
        });
    }
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
