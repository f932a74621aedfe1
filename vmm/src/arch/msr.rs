//! MSR policy: the MSRs set at boot, filtered by what KVM supports
//! (`KVM_GET_MSR_INDEX_LIST`). `IA32_ARCH_CAPABILITIES` is never written.
use kvm_bindings::kvm_msr_entry;

pub const IA32_TSC: u32 = 0x10;
pub const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MTRR_DEF_TYPE: u32 = 0x2ff;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SYSCALL_MASK: u32 = 0xc000_0084;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSRs the VMM must never write (on any host).
pub const NEVER_WRITE: &[u32] = &[IA32_ARCH_CAPABILITIES];

/// Boot values: (index, value).
const BOOT_MSRS: &[(u32, u64)] = &[
    (IA32_SYSENTER_CS, 0),
    (IA32_SYSENTER_ESP, 0),
    (IA32_SYSENTER_EIP, 0),
    (STAR, 0),
    (CSTAR, 0),
    (KERNEL_GS_BASE, 0),
    (SYSCALL_MASK, 0),
    (LSTAR, 0),
    (IA32_TSC, 0),
    (IA32_MISC_ENABLE, 1),          // fast strings
    (MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs enabled, default write-back
];

/// The boot MSR entries that `supported` (KVM's index list) allows.
pub fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    BOOT_MSRS
        .iter()
        .filter(|(i, _)| supported.contains(i) && !NEVER_WRITE.contains(i))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

/// MSRs whose state a snapshot must carry: KVM's list minus the never-written ones.
pub fn saveable_msrs(supported: &[u32]) -> Vec<u32> {
    supported
        .iter()
        .copied()
        .filter(|i| !NEVER_WRITE.contains(i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_follow_the_supported_list_and_skip_arch_capabilities() {
        let supported = [IA32_TSC, STAR, LSTAR, IA32_ARCH_CAPABILITIES, 0xdead];
        let msrs = boot_msrs(&supported);
        let idx: Vec<u32> = msrs.iter().map(|m| m.index).collect();
        assert_eq!(idx, vec![STAR, LSTAR, IA32_TSC]);
        assert!(!saveable_msrs(&supported).contains(&IA32_ARCH_CAPABILITIES));
        assert_eq!(saveable_msrs(&supported).len(), 4);
    }
}
