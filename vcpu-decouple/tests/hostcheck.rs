//! `host-check` against captured /proc and /sys trees: `pvm-dev` was taken
//! from a development machine with `ci/capture-host-tree` (nothing tuned),
//! `tuned-8core` is an 8-core host set up for compute cores 4-7 (with one
//! SMT pair split between compute and service in the last case).
use std::path::{Path, PathBuf};
use vcpu_decouple::hostcheck::{check, Report, Verdict};
use vcpu_decouple::CpuList;

fn tree(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/hosts")
        .join(name)
}

fn verdict(r: &Report, item: &str) -> Verdict {
    r.findings
        .iter()
        .find(|f| f.item == item)
        .unwrap_or_else(|| panic!("no {item} in {r:?}"))
        .verdict
}

#[test]
fn an_untuned_host_gets_warnings_with_suggestions() {
    let r = check(&tree("pvm-dev"), Some(&CpuList::new(vec![1]))).unwrap();
    assert_eq!(r.compute.to_string(), "1");
    for item in [
        "isolcpus",
        "nohz_full",
        "rcu_nocbs",
        "irq_affinity",
        "workqueues",
    ] {
        assert_eq!(verdict(&r, item), Verdict::Warn, "{item}");
    }
    assert_eq!(verdict(&r, "thp"), Verdict::Ok);
    assert_eq!(verdict(&r, "nmi_watchdog"), Verdict::Ok);
    assert_eq!(verdict(&r, "cpufreq"), Verdict::Info);
    assert_eq!(verdict(&r, "hugepages"), Verdict::Info);
    for f in r.findings.iter().filter(|f| f.verdict == Verdict::Warn) {
        assert!(f.suggestion.is_some(), "{f:?}");
    }
    let irq = r
        .findings
        .iter()
        .find(|f| f.item == "irq_affinity")
        .unwrap();
    assert!(
        irq.detail.contains("the default affinity includes 1"),
        "{irq:?}"
    );
    // Without --compute the last online core is taken (nothing is isolated).
    let r = check(&tree("pvm-dev"), None).unwrap();
    assert!(r.compute_from.contains("last online core"), "{r:?}");
}

#[test]
fn a_tuned_host_is_quiet_and_defaults_to_its_isolated_cores() {
    let r = check(&tree("tuned-8core"), None).unwrap();
    assert_eq!(r.compute.to_string(), "4-7");
    assert_eq!(r.warnings(), 0, "{r:#?}");
    let tasks = r.findings.iter().find(|f| f.item == "tasks").unwrap();
    assert_eq!(
        tasks.verdict,
        Verdict::Ok,
        "a rank pinned to one core is not movable"
    );
}

#[test]
fn compute_cores_outside_the_tuned_set_are_flagged() {
    // Core 3: not isolated, IRQs allowed, its SMT sibling 2 is a service
    // core, and systemd may run there.
    let r = check(&tree("tuned-8core"), Some(&CpuList::parse("3-4").unwrap())).unwrap();
    for item in [
        "isolcpus",
        "nohz_full",
        "rcu_nocbs",
        "irq_affinity",
        "smt",
        "workqueues",
    ] {
        assert_eq!(verdict(&r, item), Verdict::Warn, "{item}: {r:#?}");
    }
    let smt = r.findings.iter().find(|f| f.item == "smt").unwrap();
    assert!(smt.detail.contains("3<->2"), "{smt:?}");
    let tasks = r.findings.iter().find(|f| f.item == "tasks").unwrap();
    assert!(tasks.detail.contains("systemd (1/1)"), "{tasks:?}");
    assert!(check(&tree("no-such-host"), None).is_err());
}
