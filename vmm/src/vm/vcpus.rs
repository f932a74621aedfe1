//! The VM's vCPUs as one: their threads, the requests the VMM sends them
//! (run, pause, exit) and their saved state.
use crate::arch::state::{self, VcpuSnapshot};
use crate::decouple::Decoupling;
use crate::vcpu::{self, Request, VcpuShared, VcpuState, VcpuStop};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::signal::Killable;

/// Why the VM stopped: recorded by vCPUs or devices, read by the control loop.
pub type StopSlot = Arc<Mutex<Option<(u8, VcpuStop)>>>;

/// A vCPU that did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id} did not {verb} (state {state:?})")]
    NoAck {
        id: u8,
        verb: &'static str,
        state: VcpuState,
    },
    #[error("vCPU {0} did not hand over its state")]
    NoState(u8),
    #[error("vCPU {id}: {source}")]
    State {
        id: u8,
        source: crate::arch::state::Error,
    },
}

/// One vCPU: what its thread shares with the VMM, and the thread.
pub struct VcpuHandle {
    pub shared: Arc<VcpuShared>,
    pub(super) thread: Mutex<Option<JoinHandle<()>>>,
}

impl VcpuHandle {
    fn kick(&self) {
        let Ok(t) = self.thread.lock() else { return };
        if let Some(t) = &*t {
            if let Err(e) = t.kill(vcpu::kick_signal()) {
                tracing::debug!("kick of vCPU {} failed: {e}", self.shared.id);
            }
        }
    }
}

/// Every vCPU of the VM, its placement and why it stopped.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    stop: StopSlot,
    /// Topology, host placement and exit control (`GET /vm/vcpus`).
    decoupling: Arc<Decoupling>,
    /// MSRs saved with each vCPU (KVM's list, TSC first).
    msr_indices: Arc<Vec<u32>>,
}

impl Vcpus {
    pub(super) fn new(
        handles: Vec<VcpuHandle>,
        stop: StopSlot,
        decoupling: Arc<Decoupling>,
        msr_indices: Arc<Vec<u32>>,
    ) -> Vcpus {
        Vcpus {
            handles,
            stop,
            decoupling,
            msr_indices,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &VcpuHandle> {
        self.handles.iter()
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    pub fn decoupling(&self) -> &Arc<Decoupling> {
        &self.decoupling
    }

    /// Where a vCPU or device records why the VM stopped.
    pub fn stop_slot(&self) -> &StopSlot {
        &self.stop
    }

    fn request_all(&self, r: Request) {
        for v in &self.handles {
            v.shared.request(r);
            v.kick();
        }
    }

    /// Sets `r` on every vCPU and waits until each reached `state`.
    fn request_and_wait(
        &self,
        r: Request,
        state: VcpuState,
        verb: &'static str,
    ) -> Result<(), VcpuError> {
        self.request_all(r);
        for v in &self.handles {
            if !v.shared.wait_for(&[state], Duration::from_secs(5)) {
                return Err(VcpuError::NoAck {
                    id: v.shared.id,
                    verb,
                    state: v.shared.state(),
                });
            }
        }
        Ok(())
    }

    /// Pauses every vCPU and waits until each acknowledged.
    pub fn pause(&self) -> Result<(), VcpuError> {
        self.request_and_wait(Request::Pause, VcpuState::Paused, "pause")
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.request_and_wait(Request::Run, VcpuState::Running, "resume")
    }

    pub fn is_paused(&self) -> bool {
        self.handles
            .iter()
            .all(|v| v.shared.state() == VcpuState::Paused)
    }

    /// Every vCPU's KVM state, each saved on its own thread (the vCPUs are
    /// paused).
    pub fn save(&self) -> Result<Vec<VcpuSnapshot>, VcpuError> {
        let mut pending = Vec::new();
        for v in &self.handles {
            let (tx, rx) = std::sync::mpsc::channel();
            let msrs = self.msr_indices.clone();
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
                    .map_err(|_| VcpuError::NoState(id))
                    .and_then(|r| r.map_err(|source| VcpuError::State { id, source }))
            })
            .collect()
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&self) {
        self.request_all(Request::Exit);
        for v in &self.handles {
            let deadline = Instant::now() + Duration::from_secs(5);
            while v.shared.state() != VcpuState::Exited && Instant::now() < deadline {
                v.kick();
                v.shared
                    .wait_for(&[VcpuState::Exited], Duration::from_millis(20));
            }
            let thread = v.thread.lock().ok().and_then(|mut t| t.take());
            if let Some(t) = thread {
                if v.shared.state() == VcpuState::Exited {
                    let _ = t.join();
                } else {
                    tracing::warn!("vCPU {} did not stop; leaving its thread", v.shared.id);
                }
            }
        }
    }
}
