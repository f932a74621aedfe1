//! Decoupled vCPUs in the monitor: the plan for one VM (topology, host
//! placement, exits, halt polling, real-time compute threads) and the
//! points where it is applied.
//!
//! Order matters, as in KVM itself:
//! 1. [`Decoupling::plan`] (start of `Vm::prepare`): validates `--pin`
//!    against the host, claims the compute cores, pins the calling
//!    (control) thread to the service cores, so every thread the VMM starts
//!    afterwards - API, migration - inherits them;
//! 2. [`Decoupling::spawn_io_thread`]: the device I/O thread on the io cores;
//! 3. [`Decoupling::configure_vm`]: `KVM_CAP_X86_DISABLE_EXITS` and
//!    `KVM_CAP_HALT_POLL`, before the first vCPU is created;
//! 4. [`Decoupling::enter_vcpu_thread`]: first thing on each vCPU thread,
//!    before it runs guest code (compute vCPU k alone on core k, SCHED_FIFO
//!    when asked).
use crate::config::RunConfig;
use kvm_ioctls::{Kvm, VmFd};
use std::path::Path;
use std::time::Duration;
use vcpu_decouple::affinity::{self, CoreClaims};
use vcpu_decouple::exits;
use vcpu_decouple::{CpuList, HostCpus, Placement, Role, Topology};

/// Everything the VM was given and what of it took effect (`GET /vm/vcpus`).
#[derive(Debug, serde::Serialize)]
pub struct Decoupling {
    pub topology: Topology,
    /// None: threads float over all host cores (plain `--cpus N`, no `--pin`).
    pub placement: Option<Placement>,
    /// Exits KVM no longer takes for this VM (all vCPUs: KVM applies it per VM).
    pub exits_disabled: String,
    pub halt_poll_ns: Option<u64>,
    /// SCHED_FIFO priority of compute vCPU threads.
    pub realtime: Option<i32>,
    /// Host CPUs of the host node each vCPU's guest node is bound to
    /// (`--numa host-node=`), by vCPU; None for a vCPU free of one.
    #[serde(skip)]
    node_cores: Vec<Option<CpuList>>,
    #[serde(skip)]
    exits_mask: u64,
    #[serde(skip)]
    _claims: Option<CoreClaims>,
}

/// Why a VM's threads cannot be placed as asked.
#[derive(Debug, thiserror::Error)]
pub enum DecoupleError {
    #[error(transparent)]
    Placement(#[from] vcpu_decouple::placement::Error),
    #[error(transparent)]
    Exits(#[from] vcpu_decouple::exits::Error),
    #[error(transparent)]
    Affinity(#[from] vcpu_decouple::affinity::Error),
    #[error("--realtime applies to compute vCPUs: use --cpus service=S,compute=C")]
    RealtimeWithoutCompute,
    #[error(transparent)]
    Numa(#[from] numa::host::Error),
    #[error("vCPU {vcpu} is in guest node {node}, bound to host node {host_node} (CPUs {node_cpus}), but its placement gives it host cores {placed}, none of them on that node: pin it to that node's cores (--pin)")]
    NodeCores {
        vcpu: u8,
        node: u32,
        host_node: u32,
        node_cpus: CpuList,
        placed: CpuList,
    },
}

/// Host cores vCPU `id` runs on (None: anywhere): its placement's, within
/// its guest node's host node.
fn cores_of(
    placement: Option<&Placement>,
    topology: &Topology,
    node_cores: &[Option<CpuList>],
    id: u8,
) -> Option<CpuList> {
    let placed = placement.map(|p| p.vcpu_cores(topology, id));
    match (placed, node_cores.get(usize::from(id)).cloned().flatten()) {
        (Some(p), Some(n)) => Some(p.intersection(&n)),
        (p, n) => p.or(n),
    }
}

/// The guest is told that a socket's vCPUs share an L3 (CPUID's cache
/// leaves, `--topology`): one warning per guest socket whose vCPUs are
/// placed across the host's last-level caches, where that is not so.
fn socket_cache_warnings(config: &RunConfig, cores: impl Fn(u8) -> Option<CpuList>) -> Vec<String> {
    let shape = config.shape;
    let per_socket = shape.cores * shape.threads;
    let mut out = Vec::new();
    for socket in 0..shape.sockets {
        let vcpus = socket * per_socket..(socket + 1) * per_socket;
        let mut host: Vec<u32> = Vec::new();
        for id in vcpus.clone() {
            let Some(c) = cores(id as u8) else { return out };
            for core in c.iter() {
                if !host.contains(&core) {
                    host.push(core);
                }
            }
        }
        let host = CpuList::new(host).sorted();
        let caches = numa::host::llc_domains(Path::new("/"), &host);
        if caches.len() > 1 {
            out.push(format!(
                "guest socket {socket} (vCPUs {}-{}) runs on host cores {host} under {} host last-level caches ({}), but its vCPUs are told they share one L3: place each guest socket under one host L3 (--topology, --pin, --numa host-node=)",
                vcpus.start,
                vcpus.end - 1,
                caches.len(),
                caches.into_iter().collect::<Vec<_>>().join(" / ")
            ));
        }
    }
    out
}

/// The host CPUs each vCPU's guest node is bound to, checked against
/// the placement: a vCPU must keep at least one core of its host node.
fn vcpu_node_cores(
    config: &RunConfig,
    placement: Option<&Placement>,
) -> Result<Vec<Option<CpuList>>, DecoupleError> {
    let Some(layout) = &config.numa else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut cpus_of: std::collections::BTreeMap<u32, CpuList> = std::collections::BTreeMap::new();
    for id in 0..config.cpus {
        let Some((node, host_node)) = layout
            .node_of_cpu(u32::from(id))
            .and_then(|n| Some((n.id, n.host_node?)))
        else {
            out.push(None);
            continue;
        };
        let node_cpus = match cpus_of.get(&host_node) {
            Some(c) => c.clone(),
            None => {
                let c = numa::host::node_cpus(Path::new("/"), host_node)?;
                cpus_of.insert(host_node, c.clone());
                c
            }
        };
        if let Some(p) = placement {
            let placed = p.vcpu_cores(&config.topology, id);
            if placed.intersection(&node_cpus).is_empty() {
                return Err(DecoupleError::NodeCores {
                    vcpu: id,
                    node,
                    host_node,
                    node_cpus,
                    placed,
                });
            }
        }
        out.push(Some(node_cpus));
    }
    Ok(out)
}

impl Decoupling {
    pub fn plan(kvm: &Kvm, config: &RunConfig) -> Result<Decoupling, DecoupleError> {
        let topology = config.topology;
        let placement = if config.pin.is_some() || topology.is_decoupled() {
            let host = HostCpus::read(Path::new("/"))?;
            let p = Placement::new(&topology, config.pin.as_ref(), &host)?;
            for w in &p.warnings {
                tracing::warn!("{w}");
            }
            Some(p)
        } else {
            None
        };
        if config.realtime.is_some() && !topology.is_decoupled() {
            return Err(DecoupleError::RealtimeWithoutCompute);
        }
        let node_cores = vcpu_node_cores(config, placement.as_ref())?;
        if placement.is_some() || !node_cores.is_empty() {
            for w in socket_cache_warnings(config, |id| {
                cores_of(placement.as_ref(), &topology, &node_cores, id)
            }) {
                tracing::warn!("{w}");
            }
        }
        let exits_mask =
            exits::resolve(config.exits, topology.is_decoupled(), exits::offered(kvm))?;
        let claims = match &placement {
            Some(p) if !p.compute.is_empty() => {
                Some(CoreClaims::claim(&affinity::claims_dir(), &p.compute)?)
            }
            _ => None,
        };
        if let Some(p) = &placement {
            affinity::pin_current_thread(&p.service, "the control thread")?;
        }
        Ok(Decoupling {
            topology,
            placement,
            exits_disabled: exits::names(exits_mask),
            halt_poll_ns: config.halt_poll_ns,
            realtime: config.realtime,
            node_cores,
            exits_mask,
            _claims: claims,
        })
    }

    /// Starts the device I/O thread on the io cores (it inherits the
    /// affinity of the thread that creates it).
    pub fn spawn_io_thread(&self) -> std::io::Result<devices::virtio::IoThread> {
        // Confined before the first device event is handled.
        let confine =
            || sandbox::seccomp::confine(sandbox::ThreadKind::Io, "io").map_err(|e| e.to_string());
        let Some(p) = &self.placement else {
            return devices::virtio::IoThread::spawn("io", confine);
        };
        let pin = |cores: &CpuList, what: &str| {
            affinity::pin_current_thread(cores, what).map_err(std::io::Error::other)
        };
        pin(&p.io, "the device I/O thread")?;
        let io = devices::virtio::IoThread::spawn("io", confine);
        pin(&p.service, "the control thread")?;
        io
    }

    pub fn configure_vm(&self, kvm: &Kvm, vm: &VmFd) -> Result<(), DecoupleError> {
        exits::disable_exits(vm, self.exits_mask)?;
        if let Some(ns) = self.halt_poll_ns {
            exits::set_halt_poll(kvm, vm, ns)?;
        }
        Ok(())
    }

    /// Host cores vCPU `id` runs on (None: anywhere): its placement's,
    /// within its guest node's host node.
    pub fn vcpu_cores(&self, id: u8) -> Option<CpuList> {
        cores_of(
            self.placement.as_ref(),
            &self.topology,
            &self.node_cores,
            id,
        )
    }

    /// KVM starts kernel workers of its own inside the VMM process (the NX
    /// huge-page recovery thread `kvm-nx-lpage-recovery`, created by the
    /// first `KVM_RUN`, which inherits the affinity of whichever vCPU ran
    /// first - possibly a compute vCPU). A watcher thread moves every such
    /// worker to the service cores as soon as it appears, then ends.
    pub fn watch_kvm_workers(&self) {
        let Some(service) = self.placement.as_ref().map(|p| p.service.clone()) else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("placement".into())
            .spawn(move || {
                if let Err(e) =
                    sandbox::seccomp::confine(sandbox::ThreadKind::Placement, "placement")
                {
                    tracing::warn!("{e}: KVM workers stay where they are");
                    return;
                }
                let proc_root = Path::new("/proc");
                let pid = std::process::id();
                for i in 0..600u32 {
                    let workers: Vec<_> = affinity::threads(proc_root, pid)
                        .into_iter()
                        .filter(|t| t.name.starts_with("kvm-"))
                        .collect();
                    for w in &workers {
                        if w.cpus_allowed != service {
                            match affinity::pin_thread(w.tid, &service, &w.name) {
                                Ok(()) => {
                                    tracing::info!("moved KVM worker {} to cores {service}", w.name)
                                }
                                Err(e) => tracing::warn!("{e}"),
                            }
                        }
                    }
                    if !workers.is_empty() {
                        return;
                    }
                    // Often for the first seconds, then once a second (a
                    // VM restored paused starts running later).
                    std::thread::sleep(Duration::from_millis(if i < 100 { 10 } else { 1000 }));
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the placement watcher: {e}");
        }
    }

    /// Runs on vCPU thread `id` before any guest code.
    pub fn enter_vcpu_thread(&self, id: u8) -> Result<(), DecoupleError> {
        if let Some(cores) = self.vcpu_cores(id) {
            affinity::pin_current_thread(&cores, &format!("vCPU {id}"))?;
        }
        if let (Some(prio), Role::Compute) = (self.realtime, self.topology.role(id)) {
            affinity::make_current_thread_realtime(prio, &format!("compute vCPU {id}"))?;
        }
        Ok(())
    }
}
