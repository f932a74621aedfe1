//! What kind of host this is, and the CPU profile that follows from it.
//!
//! A PVM-backed `/dev/kvm` (module `kvm_pvm`) runs guest ring 3 natively but
//! emulates guest ring 0, and its emulator lacks instructions (cmpxchg16b,
//! xrstor, ...). The `pvm` profile hides those features; `host` exposes the
//! full CPU on hardware-virtualized hosts.
use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKind {
    /// KVM backed by kvm-pvm (no VT-x/AMD-V).
    Pvm,
    /// KVM on Intel VT-x.
    Vmx,
    /// KVM on AMD-V.
    Svm,
    Unknown,
}

/// The CPU profile the guest sees (defined with the CPUID filter that
/// applies it).
pub use crate::arch::cpuid::CpuProfile;

impl HostKind {
    pub fn detect() -> HostKind {
        Self::detect_in(Path::new("/sys/module"))
    }

    pub fn detect_in(sys_module: &Path) -> HostKind {
        if sys_module.join("kvm_pvm").exists() {
            HostKind::Pvm
        } else if sys_module.join("kvm_intel").exists() {
            HostKind::Vmx
        } else if sys_module.join("kvm_amd").exists() {
            HostKind::Svm
        } else {
            HostKind::Unknown
        }
    }

    /// The profile chosen when the user does not pick one.
    pub fn default_profile(self) -> CpuProfile {
        match self {
            HostKind::Pvm => CpuProfile::Pvm,
            _ => CpuProfile::Host,
        }
    }
}

/// The KVM capabilities that matter to ffmk-vmm, and whether each is offered.
pub fn capabilities(kvm: &Kvm) -> Vec<(&'static str, bool)> {
    const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
    const KVM_CAP_X86_DISABLE_EXITS: u32 = 143;
    const KVM_CAP_HALT_POLL: u32 = 182;
    const KVM_CAP_XSAVE2: u32 = 208;
    const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;
    let raw = |c: u32| kvm.check_extension_raw(c.into()) > 0;
    vec![
        ("irqchip", kvm.check_extension(Cap::Irqchip)),
        ("pit2", kvm.check_extension(Cap::Pit2)),
        ("irqfd", kvm.check_extension(Cap::Irqfd)),
        ("ioeventfd", kvm.check_extension(Cap::Ioeventfd)),
        ("immediate_exit", kvm.check_extension(Cap::ImmediateExit)),
        ("tsc_control", kvm.check_extension(Cap::TscControl)),
        ("get_tsc_khz", kvm.check_extension(Cap::GetTscKhz)),
        ("adjust_clock", kvm.check_extension(Cap::AdjustClock)),
        ("kvmclock_ctrl", kvm.check_extension(Cap::KvmclockCtrl)),
        (
            "manual_dirty_log_protect2",
            raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        ),
        ("dirty_log_ring", raw(KVM_CAP_DIRTY_LOG_RING)),
        ("x86_disable_exits", raw(KVM_CAP_X86_DISABLE_EXITS)),
        ("halt_poll", raw(KVM_CAP_HALT_POLL)),
        ("xsave", kvm.check_extension(Cap::Xsave)),
        ("xsave2", raw(KVM_CAP_XSAVE2)),
        ("xcrs", kvm.check_extension(Cap::Xcrs)),
        ("msi", kvm.check_extension(Cap::SignalMsi)),
    ]
}

#[derive(Debug, Serialize)]
pub struct HostInfo {
    pub host_kind: HostKind,
    pub kvm_api_version: i32,
    pub profile: CpuProfile,
    pub hidden_cpu_features: Vec<&'static str>,
    pub max_vcpus: usize,
    pub supported_msrs: usize,
    pub supported_cpuid_entries: usize,
    pub capabilities: std::collections::BTreeMap<&'static str, bool>,
}

impl HostInfo {
    pub fn gather(kvm: &Kvm, profile: Option<CpuProfile>) -> Result<HostInfo, kvm_ioctls::Error> {
        let host_kind = HostKind::detect();
        let profile = profile.unwrap_or(host_kind.default_profile());
        Ok(HostInfo {
            host_kind,
            kvm_api_version: kvm.get_api_version(),
            profile,
            hidden_cpu_features: crate::arch::cpuid::hidden_features(profile),
            max_vcpus: kvm.get_max_vcpus(),
            supported_msrs: kvm.get_msr_index_list()?.as_slice().len(),
            supported_cpuid_entries: kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?
                .as_slice()
                .len(),
            capabilities: capabilities(kvm).into_iter().collect(),
        })
    }

    pub fn print_text(&self) {
        println!("host kind:        {:?}", self.host_kind);
        println!("kvm api version:  {}", self.kvm_api_version);
        println!("cpu profile:      {:?}", self.profile);
        let hidden = if self.hidden_cpu_features.is_empty() {
            "none".to_string()
        } else {
            self.hidden_cpu_features.join(" ")
        };
        println!("hidden features:  {hidden}");
        println!("max vcpus:        {}", self.max_vcpus);
        println!("supported msrs:   {}", self.supported_msrs);
        println!("cpuid entries:    {}", self.supported_cpuid_entries);
        println!("capabilities:");
        for (name, on) in &self.capabilities {
            println!("  {name:<28}{}", if *on { "yes" } else { "no" });
        }
    }
}

/// The CPU vendor string (`GenuineIntel`, `AuthenticAMD`).
pub fn host_vendor() -> String {
    let r = core::arch::x86_64::__cpuid(0);
    let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_host_kind_from_sysfs_modules() {
        let dir = std::env::temp_dir().join(format!("ffmk-host-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm_intel")).unwrap();
        assert_eq!(HostKind::detect_in(&dir), HostKind::Vmx);
        assert_eq!(HostKind::Vmx.default_profile(), CpuProfile::Host);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(HostKind::detect_in(&dir), HostKind::Pvm);
        assert_eq!(HostKind::Pvm.default_profile(), CpuProfile::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(HostKind::detect_in(&dir), HostKind::Unknown);
    }
}
