//! The daemon's balancing decision: a pure function of what the bulletin
//! board says about this host's neighbourhood and of the local VMs, so it
//! can be tested without hosts.
//!
//! Only an overloaded host acts, and only on its own VMs (pushing), so
//! two daemons never decide about the same VM. Loads are compared per
//! core (runnable vCPU demand / cores). The flows come from the same SOS
//! diffusion as the repartitioning library ([`diffusion::flows`]) on the
//! neighbourhood; a VM is moved along the largest outflow it fits (half a
//! VM of overshoot at most, as in task selection), to a live, healthy
//! neighbour with memory for it, and never so that the receiver ends up
//! busier than the sender (no ping-pong).
use balance::diffusion::{self, Params, Quotient};
use balance::gossip::wire::Health;

/// A host as the board shows it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct HostView {
    pub slot: usize,
    pub load: f64,
    pub cores: u16,
    pub free_mib: u64,
    pub health: Health,
    /// Age of its entry (gossip periods).
    pub age: f64,
}

impl HostView {
    fn per_core(&self) -> f64 {
        self.load / f64::from(self.cores.max(1))
    }
}

/// A local VM as the policy needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmView {
    pub name: String,
    pub load: f64,
    pub memory_mib: u64,
    /// Why it may not move now (devices, pinning, just arrived, migrating).
    pub held: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct PolicyParams {
    /// Act when this host's per-core load exceeds the neighbourhood mean
    /// by this share (0.25 = 25 %).
    pub threshold: f64,
    /// Entries older than this (periods) are dead hosts.
    pub dead_after: f64,
    /// Memory a destination keeps free beyond the VM.
    pub reserve_mib: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    Stay {
        reason: String,
        imbalance: f64,
    },
    Move {
        vm: String,
        to: usize,
        /// The flow (load per core) the move realises, and the VM's share.
        flow: f64,
        vm_load: f64,
        imbalance: f64,
        /// The destination's per-core load after the move (it re-checks).
        to_after: f64,
        /// This host's per-core load after the move.
        me_after: f64,
    },
}

/// Slots that are ring neighbours of `me` among `slots`: within k/2
/// either side (at least one each side).
pub fn neighbours(me: usize, slots: usize, k: usize) -> Vec<usize> {
    if slots <= 1 {
        return Vec::new();
    }
    let side = (k / 2).max(1);
    if 2 * side + 1 >= slots {
        return (0..slots).filter(|&s| s != me).collect();
    }
    let mut out: Vec<usize> = (1..=side)
        .flat_map(|d| [(me + d) % slots, (me + slots - d) % slots])
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

pub fn decide(me: &HostView, hood: &[HostView], vms: &[VmView], p: &PolicyParams) -> Decision {
    let live: Vec<&HostView> = hood
        .iter()
        .filter(|h| h.slot != me.slot && h.age <= p.dead_after && h.health == Health::Ok)
        .collect();
    let mut w = vec![me.per_core()];
    w.extend(live.iter().map(|h| h.per_core()));
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    let imbalance = if mean > 0.0 { w[0] / mean - 1.0 } else { 0.0 };
    let stay = |reason: String| Decision::Stay { reason, imbalance };
    if live.is_empty() {
        return stay("no live, healthy neighbour on the board".into());
    }
    if imbalance <= p.threshold {
        return stay(format!(
            "load {:.2}/core vs neighbourhood mean {mean:.2}: within the threshold {:.0}%",
            w[0],
            p.threshold * 100.0
        ));
    }
    // SOS flows on the neighbourhood (every host talks to every other).
    let n = w.len();
    let q = Quotient {
        neighbours: (0..n)
            .map(|i| (0..n).filter(|&j| j != i).collect())
            .collect(),
    };
    let (flows, _) = diffusion::flows(&q, &w, &Params::default());
    let mut out: Vec<(usize, f64)> = (1..n)
        .filter_map(|j| flows.get(&(0, j)).map(|&f| (j, f)))
        .filter(|(_, f)| *f > 0.0)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    let my_cores = f64::from(me.cores.max(1));
    let mut why = Vec::new();
    let mut wanted = 0.0;
    for (j, flow) in out {
        wanted += flow;
        let dest = live[j - 1];
        let dest_cores = f64::from(dest.cores.max(1));
        let mut best: Option<(&VmView, f64)> = None;
        for vm in vms {
            if vm.held.is_some() || vm.load <= 0.0 {
                continue;
            }
            let share = vm.load / my_cores;
            if share / 2.0 > wanted {
                continue; // more than half a VM beyond the flow
            }
            if dest.free_mib < vm.memory_mib + p.reserve_mib {
                why.push(format!("{}: host {} lacks memory", vm.name, dest.slot));
                continue;
            }
            let to_after = dest.per_core() + vm.load / dest_cores;
            if !diffusion::admits(
                w[0],
                dest.per_core(),
                share,
                vm.load / dest_cores,
                f64::NEG_INFINITY,
            ) {
                why.push(format!(
                    "{}: host {} would end busier ({to_after:.2}/core) than this one",
                    vm.name, dest.slot
                ));
                continue;
            }
            let miss = (share - wanted).abs();
            if best.is_none_or(|(_, m)| miss < m) {
                best = Some((vm, miss));
            }
        }
        if let Some((vm, _)) = best {
            return Decision::Move {
                vm: vm.name.clone(),
                to: dest.slot,
                flow,
                vm_load: vm.load,
                imbalance,
                to_after: dest.per_core() + vm.load / dest_cores,
                me_after: w[0] - vm.load / my_cores,
            };
        }
    }
    let held: Vec<String> = vms
        .iter()
        .filter_map(|v| v.held.as_ref().map(|h| format!("{} {h}", v.name)))
        .collect();
    why.extend(held);
    stay(format!(
        "overloaded by {:.0}% but no VM fits the flows{}{}",
        imbalance * 100.0,
        if why.is_empty() { "" } else { ": " },
        why.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(slot: usize, load: f64) -> HostView {
        HostView {
            slot,
            load,
            cores: 2,
            free_mib: 8192,
            health: Health::Ok,
            age: 1.0,
        }
    }

    fn vm(name: &str, load: f64) -> VmView {
        VmView {
            name: name.into(),
            load,
            memory_mib: 256,
            held: None,
        }
    }

    const P: PolicyParams = PolicyParams {
        threshold: 0.25,
        dead_after: 10.0,
        reserve_mib: 512,
    };

    #[test]
    fn an_overloaded_host_moves_a_vm_to_the_idlest_neighbour() {
        let me = host(0, 3.0);
        let hood = [host(1, 1.0), host(2, 0.0)];
        let vms = [vm("big", 2.0), vm("small", 1.0)];
        match decide(&me, &hood, &vms, &P) {
            Decision::Move { vm, to, .. } => {
                assert_eq!(to, 2);
                assert_eq!(vm, "small", "1 vCPU fits the flow to host 2 best");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn balanced_dead_unhealthy_and_full_neighbours_keep_vms_home() {
        let vms = [vm("a", 1.0)];
        // Balanced: 2, 1, 1 with VMs of 1 (moving would reverse it).
        let d = decide(&host(0, 2.0), &[host(1, 1.0), host(2, 1.0)], &vms, &P);
        assert!(matches!(d, Decision::Stay { .. }), "{d:?}");
        let mut dead = host(1, 0.0);
        dead.age = 11.0;
        let mut sick = host(2, 0.0);
        sick.health = Health::Degraded;
        let d = decide(&host(0, 3.0), &[dead, sick], &vms, &P);
        assert!(
            matches!(&d, Decision::Stay { reason, .. } if reason.contains("no live")),
            "{d:?}"
        );
        let mut full = host(1, 0.0);
        full.free_mib = 600;
        let d = decide(&host(0, 3.0), &[full], &vms, &P);
        assert!(
            matches!(&d, Decision::Stay { reason, .. } if reason.contains("memory")),
            "{d:?}"
        );
    }

    #[test]
    fn held_vms_stay() {
        let mut v = vm("a", 2.0);
        v.held = Some("just arrived".into());
        let d = decide(&host(0, 2.0), &[host(1, 0.0)], &[v], &P);
        assert!(
            matches!(&d, Decision::Stay { reason, .. } if reason.contains("just arrived")),
            "{d:?}"
        );
    }

    #[test]
    fn ring_neighbours() {
        assert_eq!(neighbours(0, 3, 4), vec![1, 2]);
        assert_eq!(neighbours(0, 10, 4), vec![1, 2, 8, 9]);
        assert_eq!(neighbours(5, 10, 2), vec![4, 6]);
        assert!(neighbours(0, 1, 4).is_empty());
    }
}
