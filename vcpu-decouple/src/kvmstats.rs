//! Per-vCPU counters from KVM's binary statistics (`KVM_GET_STATS_FD`):
//! every exit KVM took for the vCPU, including the ones it handled in the
//! kernel without the VMM ever seeing them (interrupt injections, halts,
//! host interrupts), which are what disturbs a compute vCPU.
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileExt;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
const HEADER_LEN: usize = 24;
const DESC_FIXED: usize = 16;
/// The stat types this reader reports (cumulative, instant, peak); histograms are left out.
const TYPE_MASK: u32 = 0xf;
const TYPE_HISTOGRAM_LINEAR: u32 = 3;

/// A vCPU's statistics file.
pub struct VcpuStats {
    file: File,
    /// (name, offset of the value in the data block)
    fields: Vec<(String, u64)>,
    data_offset: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl VcpuStats {
    /// Opens the statistics of the vCPU whose fd is `vcpu_fd`. Call it
    /// before the vCPU runs: KVM holds the vCPU's lock during `KVM_RUN`.
    pub fn open(vcpu_fd: RawFd) -> std::io::Result<VcpuStats> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let fd = unsafe { libc::ioctl(vcpu_fd, KVM_GET_STATS_FD as _) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0)?;
        let bad = || std::io::Error::other("malformed KVM statistics header");
        let name_size = u32_at(&header, 4).ok_or_else(bad)? as usize;
        let num_desc = u32_at(&header, 8).ok_or_else(bad)? as usize;
        let desc_offset = u32_at(&header, 16).ok_or_else(bad)? as u64;
        let data_offset = u32_at(&header, 20).ok_or_else(bad)? as u64;
        if name_size > 4096 || num_desc > 4096 {
            return Err(bad());
        }
        let stride = DESC_FIXED + name_size;
        let mut descs = vec![0u8; stride * num_desc];
        file.read_exact_at(&mut descs, desc_offset)?;
        let mut fields = Vec::new();
        for d in descs.chunks_exact(stride) {
            let flags = u32_at(d, 0).ok_or_else(bad)?;
            let size = u16::from_le_bytes([d[6], d[7]]);
            let offset = u32_at(d, 8).ok_or_else(bad)?;
            if flags & TYPE_MASK >= TYPE_HISTOGRAM_LINEAR || size != 1 {
                continue;
            }
            let name = &d[DESC_FIXED..];
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            fields.push((
                String::from_utf8_lossy(&name[..end]).into_owned(),
                u64::from(offset),
            ));
        }
        Ok(VcpuStats {
            file,
            fields,
            data_offset,
        })
    }

    /// Current values, by name (`exits`, `halt_exits`, `irq_injections`, ...).
    pub fn read(&self) -> std::io::Result<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        let mut v = [0u8; 8];
        for (name, off) in &self.fields {
            self.file.read_exact_at(&mut v, self.data_offset + off)?;
            out.insert(name.clone(), u64::from_le_bytes(v));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_a_real_vcpus_counters() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let stats = match VcpuStats::open(vcpu.as_raw_fd()) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                eprintln!("skipped: this KVM has no binary statistics");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let values = stats.read().unwrap();
        assert!(values.contains_key("exits"), "{values:?}");
        assert_eq!(values["exits"], 0);
    }
}
