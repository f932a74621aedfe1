//! The guest's view: which CPUs are compute CPUs, and which one a process
//! (an MPI local rank) gets. Used by `ffmk-decouple` inside Linux guests.
use crate::cpulist::CpuList;
use crate::hostcheck::cmdline_cpus;
use crate::placement::HostCpus;
use std::path::Path;

/// Environment variables MPI launchers and resource managers set to a
/// process's rank on its node, in the order they are consulted.
pub const LOCAL_RANK_VARS: [&str; 6] = [
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_LOCAL_RANK",
    "PMI_LOCAL_RANK",
    "PALS_LOCAL_RANKID",
    "SLURM_LOCALID",
];

/// Set by the user to force a CPU, and by `ffmk-decouple run` for the child.
pub const CPU_VAR: &str = "FFMK_COMPUTE_CPU";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GuestCpus {
    pub online: CpuList,
    pub compute: CpuList,
    pub service: CpuList,
    /// Where the compute list came from.
    pub source: &'static str,
}

impl GuestCpus {
    /// Compute CPUs: the kernel's isolated set, else its nohz_full set, else
    /// what the command line asked for (ffmk-vmm writes all three).
    pub fn read(root: &Path) -> Result<GuestCpus, crate::placement::Error> {
        let host = HostCpus::read(root)?;
        let cmdline = std::fs::read_to_string(root.join("proc/cmdline")).unwrap_or_default();
        let (compute, source) = if !host.isolated.is_empty() {
            (host.isolated.clone(), "/sys/devices/system/cpu/isolated")
        } else if !host.nohz_full.is_empty() {
            (host.nohz_full.clone(), "/sys/devices/system/cpu/nohz_full")
        } else if let Some(c) = cmdline_cpus(&cmdline, "nohz_full") {
            (c, "nohz_full= on /proc/cmdline")
        } else {
            (CpuList::default(), "none: this guest has no compute CPUs")
        };
        let compute = compute.intersection(&host.online);
        Ok(GuestCpus {
            service: host.online.difference(&compute),
            online: host.online,
            compute,
            source,
        })
    }

    /// The compute CPU for local rank `rank` (ranks wrap around).
    pub fn for_rank(&self, rank: u32) -> Option<u32> {
        let v = self.compute.sorted();
        let v = v.as_slice();
        (!v.is_empty()).then(|| v[rank as usize % v.len()])
    }
}

/// The local rank from the environment (first variable of
/// [`LOCAL_RANK_VARS`] that is set), with the variable's name.
pub fn local_rank(env: impl Fn(&str) -> Option<String>) -> Option<(&'static str, u32)> {
    LOCAL_RANK_VARS
        .iter()
        .find_map(|v| Some((*v, env(v)?.trim().parse().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ffmk-guest-{name}-{}", std::process::id()));
        for (p, content) in files {
            let path = dir.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    #[test]
    fn compute_cpus_come_from_the_kernel_then_the_command_line() {
        let d = tree(
            "a",
            &[
                ("sys/devices/system/cpu/online", "0-3\n"),
                ("sys/devices/system/cpu/isolated", "2-3\n"),
                ("proc/cmdline", "nohz_full=1-3\n"),
            ],
        );
        let g = GuestCpus::read(&d).unwrap();
        assert_eq!(
            (g.compute.to_string(), g.service.to_string()),
            ("2-3".into(), "0-1".into())
        );
        assert_eq!(
            (g.for_rank(0), g.for_rank(1), g.for_rank(2)),
            (Some(2), Some(3), Some(2))
        );
        std::fs::write(d.join("sys/devices/system/cpu/isolated"), "\n").unwrap();
        let g = GuestCpus::read(&d).unwrap();
        assert_eq!(g.compute.to_string(), "1-3");
        assert_eq!(g.source, "nohz_full= on /proc/cmdline");
        std::fs::write(d.join("proc/cmdline"), "quiet\n").unwrap();
        let g = GuestCpus::read(&d).unwrap();
        assert!(g.compute.is_empty() && g.for_rank(0).is_none());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn local_rank_follows_the_launchers_variables() {
        let env = |k: &str| match k {
            "SLURM_LOCALID" => Some("3".to_string()),
            "PMI_LOCAL_RANK" => Some("x".to_string()),
            _ => None,
        };
        assert_eq!(local_rank(env), Some(("SLURM_LOCALID", 3)));
        assert_eq!(local_rank(|_| None), None);
    }
}
