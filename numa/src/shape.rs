//! The guest's CPU topology (`--topology sockets=S,cores=C,threads=T`) and
//! the x2APIC IDs that encode it: vCPU i is thread `i % T` of core
//! `(i / T) % C` of socket `i / (T * C)`, and its APIC ID packs the three
//! into bit fields as wide as the counts need (CPUID leaf 0xB's shifts),
//! so a shape with counts that are not powers of two leaves gaps between
//! the IDs, as on real machines.
use crate::guest::Layout;
use std::fmt;

/// The highest APIC ID a vCPU may have (xAPIC: 255 is the broadcast ID).
pub const MAX_APIC_ID: u32 = 254;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid --topology '{spec}': {why} (sockets=S,cores=C,threads=T: cores per socket, threads per core)")]
    Spec { spec: String, why: String },
    #[error("--topology {shape} is {total} vCPUs but the VM has {vcpus}")]
    Count {
        shape: CpuShape,
        total: u32,
        vcpus: u32,
    },
    #[error("--topology {shape}: the highest APIC ID would be {apic} (at most {MAX_APIC_ID}); use fewer sockets, or core and thread counts that are powers of two")]
    ApicIds { shape: CpuShape, apic: u32 },
    #[error("--topology {shape}: {what} {index} (vCPUs {cpus}) spans guest NUMA nodes {a} and {b}; a node must hold whole {what}s (give --topology or --numa so that they line up)")]
    SpansNodes {
        shape: CpuShape,
        what: &'static str,
        index: u32,
        cpus: String,
        a: u32,
        b: u32,
    },
}

/// Sockets, cores per socket, threads per core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuShape {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

/// Bits a field of `n` values takes in an APIC ID.
fn bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Where one vCPU sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub socket: u32,
    pub core: u32,
    pub thread: u32,
}

impl CpuShape {
    /// `n` single-thread cores in one socket (what a VM gets without
    /// `--topology` or `--numa`).
    pub fn flat(n: u32) -> CpuShape {
        CpuShape {
            sockets: 1,
            cores: n.max(1),
            threads: 1,
        }
    }

    /// The shape a VM gets without `--topology`: one socket per guest node
    /// when the nodes have equal vCPU counts, else one socket.
    pub fn default_for(vcpus: u32, numa: Option<&Layout>) -> CpuShape {
        let Some(l) = numa else {
            return CpuShape::flat(vcpus);
        };
        let k = l.nodes.len() as u32;
        if k > 1 && vcpus % k == 0 && l.nodes.iter().all(|n| n.cpus.len() as u32 == vcpus / k) {
            CpuShape {
                sockets: k,
                cores: vcpus / k,
                threads: 1,
            }
        } else {
            CpuShape::flat(vcpus)
        }
    }

    pub fn total(&self) -> u32 {
        self.sockets * self.cores * self.threads
    }

    /// APIC-ID bits of the thread field.
    pub fn thread_bits(&self) -> u32 {
        bits(self.threads)
    }

    /// APIC-ID bits below the socket field (threads and cores).
    pub fn socket_shift(&self) -> u32 {
        self.thread_bits() + bits(self.cores)
    }

    pub fn position(&self, vcpu: u32) -> Position {
        Position {
            thread: vcpu % self.threads,
            core: (vcpu / self.threads) % self.cores,
            socket: vcpu / (self.threads * self.cores),
        }
    }

    /// The APIC ID of vCPU `vcpu`.
    pub fn apic_id(&self, vcpu: u32) -> u32 {
        let p = self.position(vcpu);
        (p.socket << self.socket_shift()) | (p.core << self.thread_bits()) | p.thread
    }

    /// Checks the shape against the VM's vCPU count and NUMA nodes.
    pub fn check(&self, vcpus: u32, numa: Option<&Layout>) -> Result<(), Error> {
        if self.total() != vcpus {
            return Err(Error::Count {
                shape: *self,
                total: self.total(),
                vcpus,
            });
        }
        let top = self.apic_id(vcpus - 1);
        if top > MAX_APIC_ID {
            return Err(Error::ApicIds {
                shape: *self,
                apic: top,
            });
        }
        let Some(l) = numa else { return Ok(()) };
        // Threads of a core and cores of a socket share caches: one node each.
        for (what, size) in [
            ("core", self.threads),
            ("socket", self.threads * self.cores),
        ] {
            for index in 0..vcpus / size {
                let first = index * size;
                let node = |c: u32| l.node_of_cpu(c).map_or(u32::MAX, |n| n.id);
                let a = node(first);
                if let Some(c) = (first..first + size).find(|&c| node(c) != a) {
                    return Err(Error::SpansNodes {
                        shape: *self,
                        what,
                        index,
                        cpus: format!("{first}-{}", first + size - 1),
                        a,
                        b: node(c),
                    });
                }
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for CpuShape {
    type Err = Error;
    /// `sockets=2,cores=4,threads=2`; a count left out is 1.
    fn from_str(spec: &str) -> Result<CpuShape, Error> {
        let bad = |why: String| Error::Spec {
            spec: spec.into(),
            why,
        };
        let (mut sockets, mut cores, mut threads) = (None, None, None);
        for part in spec.split(',').map(str::trim) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("'{part}' is not KEY=N")))?;
            let n: u32 = value
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=254).contains(n))
                .ok_or_else(|| bad(format!("{key}: '{value}' is not a count (1-254)")))?;
            let slot = match key.trim() {
                "sockets" => &mut sockets,
                "cores" => &mut cores,
                "threads" => &mut threads,
                other => return Err(bad(format!("unknown key '{other}'"))),
            };
            if slot.replace(n).is_some() {
                return Err(bad(format!("'{key}' is given twice")));
            }
        }
        Ok(CpuShape {
            sockets: sockets.unwrap_or(1),
            cores: cores.unwrap_or(1),
            threads: threads.unwrap_or(1),
        })
    }
}

impl fmt::Display for CpuShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sockets={},cores={},threads={}",
            self.sockets, self.cores, self.threads
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::NodeSpec;

    #[test]
    fn apic_ids_pack_socket_core_and_thread() {
        let s: CpuShape = "sockets=2,cores=3,threads=2".parse().unwrap();
        assert_eq!(s.total(), 12);
        assert_eq!((s.thread_bits(), s.socket_shift()), (1, 3));
        let ids: Vec<u32> = (0..12).map(|i| s.apic_id(i)).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
        assert_eq!(
            s.position(7),
            Position {
                socket: 1,
                core: 0,
                thread: 1
            }
        );
        let flat = CpuShape::flat(5);
        assert!(
            (0..5).all(|i| flat.apic_id(i) == i),
            "flat: IDs are vCPU numbers"
        );
        assert_eq!(s.to_string().parse::<CpuShape>().unwrap(), s);
        assert_eq!("cores=4".parse::<CpuShape>().unwrap(), CpuShape::flat(4));
    }

    #[test]
    fn refuses_shapes_that_do_not_fit() {
        for (spec, want) in [
            ("sockets=0", "not a count"),
            ("cores=2,cores=3", "given twice"),
            ("dies=2", "unknown key 'dies'"),
            ("sockets", "not KEY=N"),
        ] {
            let e = spec.parse::<CpuShape>().unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
        let s: CpuShape = "sockets=2,cores=2".parse().unwrap();
        assert!(s
            .check(3, None)
            .unwrap_err()
            .to_string()
            .contains("is 4 vCPUs but the VM has 3"));
        let s: CpuShape = "sockets=127,cores=3".parse().unwrap();
        assert!(s
            .check(381, None)
            .unwrap_err()
            .to_string()
            .contains("highest APIC ID"));
    }

    #[test]
    fn nodes_hold_whole_sockets_and_the_default_follows_them() {
        let nodes: Vec<NodeSpec> = ["cpus=0-1,memory=1G", "cpus=2-3,memory=1G"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        let l = Layout::new(&nodes, 4, None, 2 << 20).unwrap();
        let d = CpuShape::default_for(4, Some(&l));
        assert_eq!(d.to_string(), "sockets=2,cores=2,threads=1");
        assert!(d.check(4, Some(&l)).is_ok());
        let e = CpuShape::flat(4)
            .check(4, Some(&l))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("socket 0 (vCPUs 0-3) spans guest NUMA nodes 0 and 1"),
            "{e}"
        );
        let odd: Vec<NodeSpec> = ["cpus=0,2,memory=1G", "cpus=1,3,memory=1G"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        let l = Layout::new(&odd, 4, None, 2 << 20).unwrap();
        let s: CpuShape = "sockets=2,cores=1,threads=2".parse().unwrap();
        assert!(s
            .check(4, Some(&l))
            .unwrap_err()
            .to_string()
            .contains("core 0"));
    }
}
