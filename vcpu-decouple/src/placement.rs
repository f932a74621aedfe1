//! Where a VM's threads run on the host: `--pin service=LIST,compute=LIST[,io=LIST]`.
//!
//! Compute vCPU k runs alone on the k-th core of the compute list. Service
//! vCPUs, the control and API threads share the service cores; device I/O
//! threads run on the io cores (the service cores unless given).
use crate::cpulist::{CpuList, ParseError};
use crate::topology::{Role, Topology};
use std::path::{Path, PathBuf};

/// `--pin` as the user wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinSpec {
    pub service: Option<CpuList>,
    pub compute: Option<CpuList>,
    pub io: Option<CpuList>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid --pin '{spec}': {why} (service=LIST,compute=LIST[,io=LIST], lists like 0-3,8)"
    )]
    Spec { spec: String, why: String },
    #[error("--pin {what}: {source}")]
    List {
        what: &'static str,
        source: ParseError,
    },
    #[error("--pin compute= lists {cores} host core(s) but the VM has {vcpus} compute vCPU(s); give exactly one core per compute vCPU")]
    ComputeCount { cores: usize, vcpus: u8 },
    #[error("the VM has {vcpus} compute vCPU(s), each needs a host core of its own, but this host has {free} core(s) left for them ({online} online{service}); use fewer compute vCPUs (--cpus service=S,compute=C)")]
    TooFewCores {
        vcpus: u8,
        free: usize,
        online: CpuList,
        service: String,
    },
    #[error("--pin compute= needs compute vCPUs: use --cpus service=S,compute=C")]
    NoComputeVcpus,
    #[error("host core {core} is in both the {a} and the {b} list; a compute core must belong to its vCPU alone")]
    DoubleBooked {
        core: u32,
        a: &'static str,
        b: &'static str,
    },
    #[error("host core {core} ({what} list) is not online on this host (online: {online})")]
    Offline {
        core: u32,
        what: &'static str,
        online: CpuList,
    },
    #[error("no service cores left: every online core ({online}) is a compute core; list service= cores")]
    NoServiceCores { online: CpuList },
    #[error("cannot read {path}: {why}")]
    Host { path: PathBuf, why: String },
}

/// `service=0,compute=1-3,io=0`, as `--pin` takes it.
impl std::fmt::Display for PinSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (key, list) in [
            ("service", &self.service),
            ("compute", &self.compute),
            ("io", &self.io),
        ] {
            if let Some(l) = list {
                if !first {
                    f.write_str(",")?;
                }
                write!(f, "{key}={l}")?;
                first = false;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for PinSpec {
    type Err = Error;
    /// `service=0,2,compute=1,3,io=0`: a part without `=` continues the
    /// list before it.
    fn from_str(spec: &str) -> Result<PinSpec, Error> {
        let bad = |why: String| Error::Spec {
            spec: spec.into(),
            why,
        };
        let mut lists: Vec<(&'static str, String)> = Vec::new();
        for part in spec.split(',') {
            match part.split_once('=') {
                Some((key, value)) => {
                    let key = match key.trim() {
                        "service" => "service",
                        "compute" => "compute",
                        "io" => "io",
                        other => return Err(bad(format!("unknown list '{other}'"))),
                    };
                    if lists.iter().any(|(k, _)| *k == key) {
                        return Err(bad(format!("'{key}' is given twice")));
                    }
                    lists.push((key, value.to_string()));
                }
                None => match lists.last_mut() {
                    Some((_, v)) => {
                        v.push(',');
                        v.push_str(part);
                    }
                    None => return Err(bad(format!("'{part}' comes before any list name"))),
                },
            }
        }
        let mut pin = PinSpec::default();
        for (what, value) in lists {
            let list = CpuList::parse(&value).map_err(|source| Error::List { what, source })?;
            match what {
                "service" => pin.service = Some(list),
                "compute" => pin.compute = Some(list),
                _ => pin.io = Some(list),
            }
        }
        Ok(pin)
    }
}

/// What the host offers: online cores, and which are isolated from its
/// own scheduler and tick (read from sysfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCpus {
    pub online: CpuList,
    pub isolated: CpuList,
    pub nohz_full: CpuList,
}

impl HostCpus {
    /// Reads `<root>/sys/devices/system/cpu/{online,isolated,nohz_full}`
    /// (`root` is `/` on a live host; tests pass a captured tree).
    pub fn read(root: &Path) -> Result<HostCpus, Error> {
        let dir = root.join("sys/devices/system/cpu");
        let read = |name: &str, required: bool| -> Result<CpuList, Error> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(s) => CpuList::parse_sysfs(&s).map_err(|e| Error::Host {
                    path,
                    why: e.to_string(),
                }),
                Err(_) if !required => Ok(CpuList::default()),
                Err(e) => Err(Error::Host {
                    path,
                    why: e.to_string(),
                }),
            }
        };
        Ok(HostCpus {
            online: read("online", true)?,
            isolated: read("isolated", false)?,
            nohz_full: read("nohz_full", false)?,
        })
    }
}

/// A validated placement of every thread of one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    /// Cores of the service vCPUs and the control/API threads.
    pub service: CpuList,
    /// Core of compute vCPU k is `compute[k]`.
    pub compute: CpuList,
    /// Cores of device I/O threads.
    pub io: CpuList,
    /// Things worth knowing that do not stop the VM.
    pub warnings: Vec<String>,
}

impl Placement {
    /// Checks `pin` against the topology and the host. Without `--pin`
    /// compute vCPUs still get one core each: the last online cores.
    pub fn new(
        topo: &Topology,
        pin: Option<&PinSpec>,
        host: &HostCpus,
    ) -> Result<Placement, Error> {
        let empty = PinSpec::default();
        let pin = pin.unwrap_or(&empty);
        if pin.compute.is_some() && !topo.is_decoupled() {
            return Err(Error::NoComputeVcpus);
        }
        for (what, list) in [
            ("service", &pin.service),
            ("compute", &pin.compute),
            ("io", &pin.io),
        ] {
            for core in list.iter().flat_map(|l| l.iter()) {
                if !host.online.contains(core) {
                    return Err(Error::Offline {
                        core,
                        what,
                        online: host.online.clone(),
                    });
                }
            }
        }
        let mut warnings = Vec::new();
        let compute = match &pin.compute {
            Some(c) => c.clone(),
            None if topo.is_decoupled() => {
                let free = match &pin.service {
                    Some(s) => host.online.difference(s),
                    None => host.online.clone(),
                };
                let n = usize::from(topo.compute);
                if free.len() < n + usize::from(pin.service.is_none()) {
                    return Err(Error::TooFewCores {
                        vcpus: topo.compute,
                        free: free
                            .len()
                            .saturating_sub(usize::from(pin.service.is_none())),
                        online: host.online.clone(),
                        service: match &pin.service {
                            Some(s) => format!(", service cores {s}"),
                            None => ", one kept for the service vCPUs".into(),
                        },
                    });
                }
                let v = free.as_slice();
                warnings.push(format!(
                    "no --pin compute= given: compute vCPUs placed on host cores {}",
                    CpuList::new(v[v.len() - n..].to_vec())
                ));
                CpuList::new(v[v.len() - n..].to_vec())
            }
            None => CpuList::default(),
        };
        if compute.len() != usize::from(topo.compute) {
            return Err(Error::ComputeCount {
                cores: compute.len(),
                vcpus: topo.compute,
            });
        }
        let service = match &pin.service {
            Some(s) => s.clone(),
            None => {
                let s = host.online.difference(&compute);
                if s.is_empty() {
                    return Err(Error::NoServiceCores {
                        online: host.online.clone(),
                    });
                }
                s
            }
        };
        let io = pin.io.clone().unwrap_or_else(|| service.clone());
        for (what, list) in [("service", &service), ("io", &io)] {
            if let Some(core) = list.iter().find(|c| compute.contains(*c)) {
                return Err(Error::DoubleBooked {
                    core,
                    a: "compute",
                    b: what,
                });
            }
        }
        for core in compute.iter() {
            let mut missing = Vec::new();
            if !host.isolated.contains(core) {
                missing.push("isolcpus");
            }
            if !host.nohz_full.contains(core) {
                missing.push("nohz_full");
            }
            if !missing.is_empty() {
                warnings.push(format!(
                    "compute core {core} is not isolated on the host (no {} on the host kernel command line); host tasks and ticks may still run there (see `ffmk-vmm host-check --compute {core}`)",
                    missing.join("/")
                ));
            }
        }
        if service.len() < usize::from(topo.service) && topo.is_decoupled() {
            warnings.push(format!(
                "{} service vCPUs share {} service core(s) with the I/O threads",
                topo.service,
                service.len()
            ));
        }
        Ok(Placement {
            service,
            compute,
            io,
            warnings,
        })
    }

    /// The host cores vCPU `id` may run on.
    pub fn vcpu_cores(&self, topo: &Topology, id: u8) -> CpuList {
        match topo.role(id) {
            Role::Service => self.service.clone(),
            Role::Compute => {
                let k = usize::from(id - topo.service);
                CpuList::new(
                    self.compute
                        .as_slice()
                        .get(k)
                        .copied()
                        .into_iter()
                        .collect(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(online: &str, isolated: &str) -> HostCpus {
        HostCpus {
            online: CpuList::parse(online).unwrap(),
            isolated: CpuList::parse_sysfs(isolated).unwrap(),
            nohz_full: CpuList::parse_sysfs(isolated).unwrap(),
        }
    }

    #[test]
    fn parses_pin_specs_with_commas_inside_lists() {
        let p: PinSpec = "service=0,2,compute=1,3,io=0".parse().unwrap();
        assert_eq!(p.service.unwrap().as_slice(), &[0, 2]);
        assert_eq!(p.compute.unwrap().as_slice(), &[1, 3]);
        assert_eq!(p.io.unwrap().as_slice(), &[0]);
        let p: PinSpec = "compute=4-7".parse().unwrap();
        assert_eq!((p.service, p.compute.unwrap().len()), (None, 4));
        for (bad, want) in [
            ("1,compute=2", "before any list name"),
            ("cpu=1", "unknown list 'cpu'"),
            ("service=0,service=1", "given twice"),
            ("compute=1,1", "listed twice"),
            ("compute=", "empty CPU list"),
            ("service=0-x", "not a CPU number"),
        ] {
            let e = bad.parse::<PinSpec>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn places_compute_vcpus_one_per_core() {
        let topo = Topology::new(2, 2).unwrap();
        let pin: PinSpec = "service=0-1,compute=3,2".parse().unwrap();
        let p = Placement::new(&topo, Some(&pin), &host("0-3", "2-3")).unwrap();
        assert_eq!(p.vcpu_cores(&topo, 0).to_string(), "0-1");
        assert_eq!(p.vcpu_cores(&topo, 2).as_slice(), &[3]);
        assert_eq!(p.vcpu_cores(&topo, 3).as_slice(), &[2]);
        assert_eq!(p.io.to_string(), "0-1");
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        // Not isolated on the host: a warning, not an error.
        let p = Placement::new(&topo, Some(&pin), &host("0-3", "")).unwrap();
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings[0].contains("compute core 3 is not isolated"));
    }

    #[test]
    fn defaults_put_compute_vcpus_on_the_last_cores() {
        let topo = Topology::new(1, 1).unwrap();
        let p = Placement::new(&topo, None, &host("0-1", "")).unwrap();
        assert_eq!(
            (p.service.to_string(), p.compute.to_string()),
            ("0".into(), "1".into())
        );
        let plain = Placement::new(&Topology::plain(4), None, &host("0-1", "")).unwrap();
        assert_eq!(
            (plain.service.to_string(), plain.compute.len()),
            ("0-1".into(), 0)
        );
    }

    #[test]
    fn rejects_impossible_placements() {
        let topo = Topology::new(1, 2).unwrap();
        let h = host("0-3", "");
        let err = |spec: &str, topo: &Topology| {
            let pin: PinSpec = spec.parse().unwrap();
            Placement::new(topo, Some(&pin), &h)
                .unwrap_err()
                .to_string()
        };
        assert!(err("compute=1", &topo).contains("lists 1 host core(s) but the VM has 2"));
        assert!(err("service=0-1,compute=1-2", &topo).contains("host core 1 is in both"));
        assert!(err("compute=2-3,io=3", &topo).contains("host core 3 is in both"));
        assert!(err("compute=2,9", &topo).contains("host core 9 (compute list) is not online"));
        assert!(err("compute=1", &Topology::plain(2)).contains("needs compute vCPUs"));
        let h2 = host("0-1", "");
        let all: PinSpec = "compute=0-1".parse().unwrap();
        let e = Placement::new(&topo, Some(&all), &h2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no service cores left"), "{e}");
        let big = Topology::new(1, 3).unwrap();
        let e = Placement::new(&big, None, &h2).unwrap_err().to_string();
        assert!(e.contains("the VM has 3 compute vCPU(s)"), "{e}");
        assert!(e.contains("1 core(s) left") && !e.contains("--pin"), "{e}");
    }

    #[test]
    fn reads_host_cpus_from_a_captured_tree() {
        let dir = std::env::temp_dir().join(format!("ffmk-hostcpus-{}", std::process::id()));
        let cpu = dir.join("sys/devices/system/cpu");
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(cpu.join("online"), "0-7\n").unwrap();
        std::fs::write(cpu.join("isolated"), "\n").unwrap();
        std::fs::write(cpu.join("nohz_full"), "4-7\n").unwrap();
        let h = HostCpus::read(&dir).unwrap();
        assert_eq!(h.online.len(), 8);
        assert!(h.isolated.is_empty());
        assert_eq!(h.nohz_full.to_string(), "4-7");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(HostCpus::read(&dir)
            .unwrap_err()
            .to_string()
            .contains("online"));
    }
}
