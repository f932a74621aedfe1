//! `ffmk-vmm host-check`: what on this host would disturb the compute cores.
//!
//! Everything is read below a root directory (`/` on a live host), so tests
//! run against captured `/proc` and `/sys` trees.
use crate::cpulist::CpuList;
use crate::placement::HostCpus;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    Info,
    Warn,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub item: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    pub suggestion: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub compute: CpuList,
    /// Where the compute list came from.
    pub compute_from: String,
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn warnings(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.verdict == Verdict::Warn)
            .count()
    }
}

fn read(root: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(root.join(rel)).ok()
}

fn finding(
    item: &'static str,
    verdict: Verdict,
    detail: String,
    suggestion: Option<String>,
) -> Finding {
    Finding {
        item,
        verdict,
        detail,
        suggestion,
    }
}

/// The CPU list of a boot parameter (`isolcpus=nohz,domain,2-3` -> 2-3).
pub fn cmdline_cpus(cmdline: &str, key: &str) -> Option<CpuList> {
    let value = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?;
    // isolcpus takes flags first; the list is what parses as one.
    let list: Vec<&str> = value
        .split(',')
        .filter(|p| p.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    CpuList::parse(&list.join(",")).ok()
}

/// Runs every check for `compute` (default: the host's isolated cores, or
/// its last online core).
pub fn check(root: &Path, compute: Option<&CpuList>) -> Result<Report, crate::placement::Error> {
    let host = HostCpus::read(root)?;
    let (compute, compute_from) = match compute {
        Some(c) => (c.clone(), "--compute".to_string()),
        None if !host.isolated.is_empty() => {
            (host.isolated.clone(), "the host's isolated cores".into())
        }
        None => {
            let last = host.online.as_slice().last().copied().unwrap_or(0);
            (
                CpuList::new(vec![last]),
                "the last online core (no core is isolated)".into(),
            )
        }
    };
    let mut f = Vec::new();
    let list = compute.to_string();
    let offline = compute.difference(&host.online);
    if !offline.is_empty() {
        f.push(finding(
            "online",
            Verdict::Warn,
            format!("core(s) {offline} are not online (online: {})", host.online),
            Some("pick compute cores from the online list".into()),
        ));
    }
    let cmdline = read(root, "proc/cmdline").unwrap_or_default();
    for (key, what, live) in [
        (
            "isolcpus",
            "kept out of the scheduler's load balancing",
            &host.isolated,
        ),
        ("nohz_full", "without the periodic tick", &host.nohz_full),
        ("rcu_nocbs", "without RCU callbacks", &CpuList::default()),
    ] {
        let from_cmdline = cmdline_cpus(&cmdline, key).unwrap_or_default();
        let covered = if key == "rcu_nocbs" {
            &from_cmdline
        } else {
            live
        };
        let missing = compute.difference(covered);
        f.push(if missing.is_empty() {
            finding(
                key,
                Verdict::Ok,
                format!("compute core(s) {list} are {what}"),
                None,
            )
        } else {
            finding(
                key,
                Verdict::Warn,
                format!(
                    "cores {missing} are not {what} ({key}= on the host: {})",
                    if from_cmdline.is_empty() {
                        "not set".into()
                    } else {
                        from_cmdline.to_string()
                    }
                ),
                Some(format!(
                    "boot the host with {key}={}{list}",
                    if key == "isolcpus" {
                        "nohz,domain,managed_irq,"
                    } else {
                        ""
                    }
                )),
            )
        });
    }
    f.push(irq_affinity(root, &compute));
    f.push(governor(root, &compute));
    f.push(thp(root));
    f.push(hugepages(root));
    f.push(smt(root, &compute));
    f.push(tasks(root, &compute));
    if let Some(w) = read(root, "proc/sys/kernel/nmi_watchdog") {
        f.push(if w.trim() == "0" {
            finding("nmi_watchdog", Verdict::Ok, "off".into(), None)
        } else {
            finding(
                "nmi_watchdog",
                Verdict::Warn,
                "on: a perf NMI hits every core periodically".into(),
                Some("sysctl kernel.nmi_watchdog=0 (or boot with nmi_watchdog=0)".into()),
            )
        });
    }
    if let Some(mask) = read(root, "sys/devices/virtual/workqueue/cpumask") {
        let cpus = hex_mask_cpus(&mask);
        let hit = compute.intersection(&cpus);
        f.push(if hit.is_empty() {
            finding(
                "workqueues",
                Verdict::Ok,
                format!("unbound workqueues stay on {cpus}"),
                None,
            )
        } else {
            finding(
                "workqueues",
                Verdict::Warn,
                format!("unbound kernel workqueues may run on compute cores {hit}"),
                Some(
                    "write the service cores' mask to /sys/devices/virtual/workqueue/cpumask"
                        .into(),
                ),
            )
        });
    }
    Ok(Report {
        compute,
        compute_from,
        findings: f,
    })
}

/// CPUs of a hex mask as sysfs writes it (`ff`, `00000000,00000003`).
pub fn hex_mask_cpus(mask: &str) -> CpuList {
    let digits: String = mask.trim().chars().filter(|c| *c != ',').collect();
    let mut cpus = Vec::new();
    for (i, c) in digits.chars().rev().enumerate() {
        let v = c.to_digit(16).unwrap_or(0);
        for bit in 0..4 {
            if v & (1 << bit) != 0 {
                cpus.push((i * 4 + bit) as u32);
            }
        }
    }
    CpuList::new(cpus)
}

fn irq_affinity(root: &Path, compute: &CpuList) -> Finding {
    let Ok(dir) = std::fs::read_dir(root.join("proc/irq")) else {
        return finding(
            "irq_affinity",
            Verdict::Info,
            "no /proc/irq to read".into(),
            None,
        );
    };
    let mut hits: Vec<u32> = dir
        .flatten()
        .filter_map(|e| {
            let irq: u32 = e.file_name().to_str()?.parse().ok()?;
            let aff = std::fs::read_to_string(e.path().join("smp_affinity_list")).ok()?;
            let aff = CpuList::parse_sysfs(&aff).ok()?;
            (!aff.intersection(compute).is_empty()).then_some(irq)
        })
        .collect();
    hits.sort_unstable();
    let default = read(root, "proc/irq/default_smp_affinity")
        .map(|m| hex_mask_cpus(&m))
        .unwrap_or_default();
    let default_hit = compute.intersection(&default);
    if hits.is_empty() && default_hit.is_empty() {
        return finding(
            "irq_affinity",
            Verdict::Ok,
            "no IRQ may fire on the compute cores".into(),
            None,
        );
    }
    let shown: Vec<String> = hits.iter().take(12).map(|i| i.to_string()).collect();
    finding(
        "irq_affinity",
        Verdict::Warn,
        format!(
            "{} IRQ(s) may fire on compute cores{}{}",
            hits.len(),
            if shown.is_empty() { String::new() } else { format!(" ({}{})", shown.join(","), if hits.len() > 12 { ",..." } else { "" }) },
            if default_hit.is_empty() { String::new() } else { format!("; the default affinity includes {default_hit}") }
        ),
        Some("boot with irqaffinity=<service cores> or write service cores to /proc/irq/*/smp_affinity_list (stop irqbalance)".into()),
    )
}

fn governor(root: &Path, compute: &CpuList) -> Finding {
    let mut other = Vec::new();
    let mut seen = 0;
    for c in compute.iter() {
        if let Some(g) = read(
            root,
            &format!("sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor"),
        ) {
            seen += 1;
            if g.trim() != "performance" {
                other.push(format!("{c}:{}", g.trim()));
            }
        }
    }
    if seen == 0 {
        finding(
            "cpufreq",
            Verdict::Info,
            "no cpufreq on the compute cores (fixed frequency or a virtual machine)".into(),
            None,
        )
    } else if other.is_empty() {
        finding("cpufreq", Verdict::Ok, "governor performance".into(), None)
    } else {
        finding(
            "cpufreq",
            Verdict::Warn,
            format!("governor is not performance on {}", other.join(" ")),
            Some(
                "cpupower frequency-set -g performance (frequency changes show up as FWQ noise)"
                    .into(),
            ),
        )
    }
}

fn thp(root: &Path) -> Finding {
    let Some(s) = read(root, "sys/kernel/mm/transparent_hugepage/enabled") else {
        return finding(
            "thp",
            Verdict::Info,
            "transparent huge pages not available".into(),
            None,
        );
    };
    let mode = s
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        .unwrap_or_default();
    if mode == "always" {
        finding(
            "thp",
            Verdict::Warn,
            "transparent huge pages: always (khugepaged and compaction may run at any time)".into(),
            Some(
                "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled and use --hugepages"
                    .into(),
            ),
        )
    } else {
        finding(
            "thp",
            Verdict::Ok,
            format!("transparent huge pages: {mode}"),
            None,
        )
    }
}

fn hugepages(root: &Path) -> Finding {
    let meminfo = read(root, "proc/meminfo").unwrap_or_default();
    let field = |k: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let (total, free, size_kb) = (
        field("HugePages_Total:").unwrap_or(0),
        field("HugePages_Free:").unwrap_or(0),
        field("Hugepagesize:").unwrap_or(2048),
    );
    if free == 0 {
        finding(
            "hugepages",
            Verdict::Info,
            format!("no free huge pages ({total} reserved of {size_kb} kB): --hugepages will fail"),
            Some("sysctl vm.nr_hugepages=N (N x 2 MiB per VM's memory)".into()),
        )
    } else {
        finding(
            "hugepages",
            Verdict::Ok,
            format!(
                "{free} of {total} huge pages free ({} MiB)",
                free * size_kb / 1024
            ),
            None,
        )
    }
}

fn smt(root: &Path, compute: &CpuList) -> Finding {
    let mut busy_siblings = Vec::new();
    for c in compute.iter() {
        let Some(s) = read(
            root,
            &format!("sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list"),
        ) else {
            continue;
        };
        let sib = CpuList::parse_sysfs(&s).unwrap_or_default();
        for other in sib.iter().filter(|o| *o != c && !compute.contains(*o)) {
            busy_siblings.push(format!("{c}<->{other}"));
        }
    }
    if busy_siblings.is_empty() {
        finding(
            "smt",
            Verdict::Ok,
            "no compute core shares its physical core with a non-compute thread".into(),
            None,
        )
    } else {
        finding(
            "smt",
            Verdict::Warn,
            format!("compute cores share a physical core with other hardware threads: {}", busy_siblings.join(" ")),
            Some("take the siblings offline (echo 0 > /sys/devices/system/cpu/cpuN/online) or leave them idle".into()),
        )
    }
}

/// Kernel threads bound to one core (ksoftirqd/N, kworker/N:..., migration/N)
/// are part of every core's life; count the tasks that could be moved.
fn tasks(root: &Path, compute: &CpuList) -> Finding {
    let Ok(procs) = std::fs::read_dir(root.join("proc")) else {
        return finding("tasks", Verdict::Info, "no /proc to read".into(), None);
    };
    let (mut allowed, mut running) = (Vec::new(), Vec::new());
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        for t in crate::affinity::threads(&root.join("proc"), pid) {
            let hits = t.cpus_allowed.intersection(compute);
            if hits.is_empty() || t.cpus_allowed.len() == 1 {
                continue;
            }
            let label = format!("{} ({pid}/{})", t.name, t.tid);
            let stat =
                std::fs::read_to_string(root.join(format!("proc/{pid}/task/{}/stat", t.tid)))
                    .unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or("");
            if state == "R" && t.last_cpu.is_some_and(|c| compute.contains(c)) {
                running.push(label.clone());
            }
            allowed.push(label);
        }
    }
    if allowed.is_empty() {
        return finding(
            "tasks",
            Verdict::Ok,
            "no movable task may run on the compute cores".into(),
            None,
        );
    }
    let verdict = if running.is_empty() {
        Verdict::Info
    } else {
        Verdict::Warn
    };
    let examples: Vec<&str> = running
        .iter()
        .chain(&allowed)
        .take(5)
        .map(String::as_str)
        .collect();
    finding(
        "tasks",
        verdict,
        format!(
            "{} task(s) may run on the compute cores, {} runnable there now (e.g. {})",
            allowed.len(),
            running.len(),
            examples.join(", ")
        ),
        Some("isolcpus= keeps new tasks off; move old ones with taskset or a cpuset cgroup".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_boot_parameter_lists() {
        let c = "ro isolcpus=nohz,domain,managed_irq,2-3,6 nohz_full=2-3 quiet";
        assert_eq!(cmdline_cpus(c, "isolcpus").unwrap().to_string(), "2-3,6");
        assert_eq!(cmdline_cpus(c, "nohz_full").unwrap().to_string(), "2-3");
        assert!(cmdline_cpus(c, "rcu_nocbs").is_none());
        assert!(cmdline_cpus("isolcpus_x=1", "isolcpus").is_none());
    }

    #[test]
    fn reads_hex_masks() {
        assert_eq!(hex_mask_cpus("3\n").to_string(), "0-1");
        assert_eq!(hex_mask_cpus("00000001,00000100").to_string(), "8,32");
        assert!(hex_mask_cpus("0").is_empty());
    }
}
