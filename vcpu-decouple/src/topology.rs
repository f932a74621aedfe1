//! The guest's CPU topology: service vCPUs first (vCPU 0, the boot CPU, is
//! always one), then compute vCPUs. Service vCPUs run the guest OS, its
//! interrupts, timers and daemons; compute vCPUs run the ranks' compute
//! threads and nothing else.
use crate::cpulist::CpuList;
use std::fmt;

/// The most vCPUs a VM may have (APIC IDs 0-254; 255 is the broadcast ID).
pub const MAX_VCPUS: u32 = 254;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Topology {
    pub service: u8,
    pub compute: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid --cpus '{spec}': {why} (N, or service=S,compute=C)")]
    Spec { spec: String, why: String },
    #[error("--cpus needs at least one service vCPU (vCPU 0 boots the guest and runs its OS)")]
    NoService,
    #[error("--cpus must total between 1 and {MAX_VCPUS} vCPUs (got {0})")]
    Total(u32),
}

/// Whether a vCPU runs the guest OS or a decoupled compute thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Service,
    Compute,
}

/// Guest command-line parameters [`Topology::guest_cmdline`] manages.
pub const MANAGED_PARAMS: [&str; 4] = ["isolcpus", "nohz_full", "rcu_nocbs", "irqaffinity"];

impl Topology {
    /// `n` vCPUs, all of them service vCPUs (the classic `--cpus N`).
    pub fn plain(n: u8) -> Topology {
        Topology {
            service: n,
            compute: 0,
        }
    }

    pub fn new(service: u32, compute: u32) -> Result<Topology, Error> {
        if service == 0 {
            return Err(Error::NoService);
        }
        let total = service + compute;
        if total > MAX_VCPUS {
            return Err(Error::Total(total));
        }
        Ok(Topology {
            service: service as u8,
            compute: compute as u8,
        })
    }

    pub fn total(&self) -> u8 {
        self.service + self.compute
    }

    pub fn is_decoupled(&self) -> bool {
        self.compute > 0
    }

    pub fn role(&self, vcpu: u8) -> Role {
        if vcpu < self.service {
            Role::Service
        } else {
            Role::Compute
        }
    }

    /// Guest CPU numbers (= vCPU ids = APIC IDs) of the service vCPUs.
    pub fn service_cpus(&self) -> CpuList {
        CpuList::range(0, u32::from(self.service))
    }

    pub fn compute_cpus(&self) -> CpuList {
        CpuList::range(u32::from(self.service), u32::from(self.total()))
    }

    /// The kernel parameters that keep the guest's own noise (timer ticks,
    /// RCU callbacks, kthreads, IRQs) off the compute CPUs; empty when there
    /// are none.
    pub fn guest_params(&self) -> Vec<String> {
        if !self.is_decoupled() {
            return Vec::new();
        }
        let compute = self.compute_cpus();
        vec![
            format!("isolcpus=nohz,domain,managed_irq,{compute}"),
            format!("nohz_full={compute}"),
            format!("rcu_nocbs={compute}"),
            format!("irqaffinity={}", self.service_cpus()),
        ]
    }

    /// `cmdline` with [`Topology::guest_params`] added to the kernel's part
    /// (before a ` -- `, after which everything goes to init); a parameter
    /// the user already set is left as the user wrote it.
    pub fn guest_cmdline(&self, cmdline: &str) -> String {
        let (kernel, init) = match cmdline.find(" -- ") {
            Some(i) => (&cmdline[..i], Some(&cmdline[i + 1..])),
            None if cmdline.trim_start().starts_with("-- ") => ("", Some(cmdline.trim_start())),
            None => (cmdline, None),
        };
        let set: Vec<&str> = kernel
            .split_whitespace()
            .map(|w| w.split('=').next().unwrap_or(w))
            .collect();
        let mut out = kernel.trim().to_string();
        for p in self.guest_params() {
            let key = p.split('=').next().unwrap_or(&p);
            if !set.contains(&key) {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(&p);
            }
        }
        if let Some(init) = init {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(init);
        }
        out
    }
}

impl std::str::FromStr for Topology {
    type Err = Error;
    /// `N` or `service=S,compute=C` (either part may be left out:
    /// `service=2` is 2 service vCPUs, `compute=4` is 1 service + 4 compute).
    fn from_str(spec: &str) -> Result<Topology, Error> {
        let bad = |why: String| Error::Spec {
            spec: spec.into(),
            why,
        };
        let num = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| bad(format!("'{v}' is not a number")))
        };
        if !spec.contains('=') {
            let n = num(spec)?;
            if n == 0 || n > MAX_VCPUS {
                return Err(Error::Total(n));
            }
            return Topology::new(n, 0);
        }
        let (mut service, mut compute) = (None, None);
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("service", v)) if service.is_none() => service = Some(num(v)?),
                Some(("compute", v)) if compute.is_none() => compute = Some(num(v)?),
                Some(("service" | "compute", _)) => {
                    return Err(bad(format!("'{part}' is given twice")))
                }
                _ => return Err(bad(format!("unknown part '{part}'"))),
            }
        }
        Topology::new(service.unwrap_or(1), compute.unwrap_or(0))
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_decoupled() {
            write!(f, "service={},compute={}", self.service, self.compute)
        } else {
            write!(f, "{}", self.service)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_split_topologies() {
        assert_eq!("4".parse::<Topology>().unwrap(), Topology::plain(4));
        let t: Topology = "service=1,compute=3".parse().unwrap();
        assert_eq!((t.service, t.compute, t.total()), (1, 3, 4));
        assert_eq!(t.role(0), Role::Service);
        assert_eq!(t.role(1), Role::Compute);
        assert_eq!(t.compute_cpus().to_string(), "1-3");
        assert_eq!(t.to_string(), "service=1,compute=3");
        assert_eq!(
            "compute=2".parse::<Topology>().unwrap(),
            Topology::new(1, 2).unwrap()
        );
    }

    #[test]
    fn rejects_invalid_topologies() {
        for (spec, want) in [
            ("0", "between 1 and 254"),
            ("255", "between 1 and 254"),
            ("service=0,compute=2", "at least one service vCPU"),
            ("service=200,compute=100", "between 1 and 254"),
            ("service=1,io=2", "unknown part 'io=2'"),
            ("service=x", "'x' is not a number"),
            ("service=1,service=2", "given twice"),
            ("two", "'two' is not a number"),
        ] {
            let e = spec.parse::<Topology>().unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }

    #[test]
    fn guest_cmdline_isolates_compute_cpus_and_respects_the_user() {
        let t = Topology::new(2, 2).unwrap();
        assert_eq!(
            t.guest_cmdline("console=ttyS0"),
            "console=ttyS0 isolcpus=nohz,domain,managed_irq,2-3 nohz_full=2-3 rcu_nocbs=2-3 irqaffinity=0-1"
        );
        let user = t.guest_cmdline("nohz_full=3 console=ttyS0");
        assert!(user.starts_with("nohz_full=3 console=ttyS0 isolcpus="));
        assert_eq!(user.matches("nohz_full").count(), 1);
        assert_eq!(Topology::plain(4).guest_cmdline("a b"), "a b");
        // Everything after ` -- ` belongs to init and stays last.
        let t = Topology::new(1, 1).unwrap();
        assert_eq!(
            t.guest_cmdline("console=ttyS0 -- echo nohz_full=x"),
            "console=ttyS0 isolcpus=nohz,domain,managed_irq,1 nohz_full=1 rcu_nocbs=1 irqaffinity=0 -- echo nohz_full=x"
        );
        assert!(t
            .guest_cmdline("-- true")
            .ends_with("irqaffinity=0 -- true"));
    }
}
