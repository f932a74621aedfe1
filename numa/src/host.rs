//! The host's NUMA nodes as sysfs shows them, and the binding of guest
//! memory to them.
//!
//! Checks run before any memory is mapped: the host node exists, has the
//! memory the guest nodes bound to it need (free now), and, with huge
//! pages, enough free pages of that size *on that node* (hugetlb
//! reservations are counted host-wide, so a node short of pages would
//! only show as a SIGBUS in the guest later).
use crate::guest::RamRange;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vcpu_decouple::CpuList;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("host node {node} does not exist (this host has node(s) {have})")]
    NoSuchNode { node: u32, have: String },
    #[error("host node {node} has {free_mib} MiB free, but the guest nodes bound to it need {need_mib} MiB", free_mib = .free >> 20, need_mib = .need >> 20)]
    NodeMemory { node: u32, need: u64, free: u64 },
    #[error(
        "host node {node} has {free} free {page_kib} KiB huge pages, but the guest nodes bound to it need {need}: \
         reserve them on that node (echo {enough} > {dir}/nr_hugepages)",
        page_kib = .page >> 10, enough = .total + .need - .free
    )]
    NodeHugePages {
        node: u32,
        page: u64,
        need: u64,
        free: u64,
        total: u64,
        dir: PathBuf,
    },
    #[error("cannot read {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("cannot bind guest memory to host node {node} (mbind): {source}")]
    Bind { node: u32, source: std::io::Error },
}

const NODE_DIR: &str = "sys/devices/system/node";

fn node_dir(root: &Path, node: u32) -> PathBuf {
    root.join(NODE_DIR).join(format!("node{node}"))
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// The host's online nodes, as a list (`0-1`).
pub fn online_nodes(root: &Path) -> Result<CpuList, Error> {
    let path = root.join(NODE_DIR).join("online");
    let text = read(&path)?;
    CpuList::parse_sysfs(&text).map_err(|e| Error::Read {
        path,
        why: e.to_string(),
    })
}

/// Fails with the host's nodes unless `node` is one of them.
fn exists(root: &Path, node: u32) -> Result<(), Error> {
    let online = online_nodes(root).unwrap_or_default();
    if online.contains(node) && node_dir(root, node).is_dir() {
        return Ok(());
    }
    Err(Error::NoSuchNode {
        node,
        have: if online.is_empty() {
            "none listed".into()
        } else {
            online.to_string()
        },
    })
}

/// The CPUs of host node `node`.
pub fn node_cpus(root: &Path, node: u32) -> Result<CpuList, Error> {
    exists(root, node)?;
    let path = node_dir(root, node).join("cpulist");
    let text = read(&path)?;
    CpuList::parse_sysfs(&text).map_err(|e| Error::Read {
        path,
        why: e.to_string(),
    })
}

/// Memory of host node `node` a new mapping can have now: free pages and
/// the page cache the kernel can drop (bytes).
pub fn node_free_memory(root: &Path, node: u32) -> Result<u64, Error> {
    exists(root, node)?;
    let path = node_dir(root, node).join("meminfo");
    let text = read(&path)?;
    // "Node 0 MemFree:        22696488 kB"
    let field = |name: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.split_whitespace().last() == Some(name))
            .and_then(|(_, v)| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            << 10
    };
    Ok(field("MemFree") + field("Inactive(file)"))
}

/// Free huge pages of `page` bytes on `node`, and the node's pool size;
/// None when the node has no such pool.
pub fn node_huge_pages(root: &Path, node: u32, page: u64) -> Option<(u64, u64, PathBuf)> {
    let dir = node_dir(root, node)
        .join("hugepages")
        .join(format!("hugepages-{}kB", page >> 10));
    let num = |f: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((num("free_hugepages")?, num("nr_hugepages")?, dir))
}

/// Checks that every host node the ranges are bound to exists and can
/// give them their memory now: free memory, or with `huge_page` (bytes)
/// free huge pages on that node.
pub fn check(root: &Path, ranges: &[RamRange], huge_page: Option<u64>) -> Result<(), Error> {
    let mut need: BTreeMap<u32, u64> = BTreeMap::new();
    for r in ranges {
        if let Some(h) = r.host_node {
            *need.entry(h).or_default() += r.len;
        }
    }
    for (&node, &bytes) in &need {
        exists(root, node)?;
        match huge_page {
            None => {
                let free = node_free_memory(root, node)?;
                if free < bytes {
                    return Err(Error::NodeMemory {
                        node,
                        need: bytes,
                        free,
                    });
                }
            }
            Some(page) => {
                let (free, total, dir) = node_huge_pages(root, node, page)
                    .unwrap_or_else(|| (0, 0, node_dir(root, node).join("hugepages")));
                let pages = bytes.div_ceil(page);
                if free < pages {
                    return Err(Error::NodeHugePages {
                        node,
                        page,
                        need: pages,
                        free,
                        total,
                        dir,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The host's last-level caches `cpus` run under: each cache's CPU list
/// (`/sys/devices/system/cpu/cpuN/cache/indexI/shared_cpu_list` of the
/// highest level), one entry per cache. Empty where sysfs says nothing.
pub fn llc_domains(root: &Path, cpus: &CpuList) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for cpu in cpus.iter() {
        let dir = root.join(format!("sys/devices/system/cpu/cpu{cpu}/cache"));
        let best = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let level: u32 = std::fs::read_to_string(e.path().join("level"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                let shared = std::fs::read_to_string(e.path().join("shared_cpu_list")).ok()?;
                Some((level, shared.trim().to_string()))
            })
            .max_by_key(|(level, _)| *level);
        if let Some((_, shared)) = best {
            out.insert(shared);
        }
    }
    out
}

/// The kernel's MPOL_BIND (include/uapi/linux/mempolicy.h).
const MPOL_BIND: libc::c_int = 2;
/// get_mempolicy: the policy of the address given.
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
/// Words of the node masks passed to the kernel (1024 nodes).
const MASK_WORDS: usize = 16;

/// Binds `len` bytes at `addr` (a page-aligned part of one of this
/// process's mappings) to host node `node`: every page the range gets from
/// now on comes from that node, or the fault fails (`MPOL_BIND`).
pub fn bind(addr: usize, len: usize, node: u32) -> Result<(), Error> {
    let mut mask = [0 as libc::c_ulong; MASK_WORDS];
    let word = node as usize / 64;
    if word >= MASK_WORDS {
        return Err(Error::Bind {
            node,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        });
    }
    mask[word] |= 1 << (node % 64);
    // SAFETY: mbind only changes the memory policy of the caller's range
    // (no memory is read or written); the mask outlives the call and
    // holds MASK_WORDS * 64 bits, the count passed (plus one: the kernel
    // takes maxnode - 1 bits).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as *mut libc::c_void,
            len as libc::c_ulong,
            MPOL_BIND,
            mask.as_ptr(),
            (MASK_WORDS * 64 + 1) as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(Error::Bind {
            node,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The nodes `addr` is bound to (None: no binding, the process's policy).
pub fn bound_nodes(addr: usize) -> std::io::Result<Option<CpuList>> {
    let mut mode: libc::c_int = 0;
    let mut mask = [0 as libc::c_ulong; MASK_WORDS];
    // SAFETY: get_mempolicy writes the mode and at most MASK_WORDS words of
    // mask, both live locals; `addr` is only looked up, not accessed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            mask.as_mut_ptr(),
            (MASK_WORDS * 64 + 1) as libc::c_ulong,
            addr as *mut libc::c_void,
            MPOL_F_ADDR,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if mode != MPOL_BIND {
        return Ok(None);
    }
    let nodes = (0..MASK_WORDS * 64)
        .filter(|&b| mask[b / 64] & (1 << (b % 64)) != 0)
        .map(|b| b as u32)
        .collect();
    Ok(Some(CpuList::new(nodes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_host(dir: &Path) {
        let nodes = dir.join(NODE_DIR);
        for (n, cpus, free_kb, huge_free) in [(0, "0-3", 4 << 20, 2), (1, "4-7", 1 << 20, 0)] {
            let d = nodes.join(format!("node{n}"));
            let h = d.join("hugepages/hugepages-2048kB");
            std::fs::create_dir_all(&h).unwrap();
            std::fs::write(d.join("cpulist"), format!("{cpus}\n")).unwrap();
            std::fs::write(
                d.join("meminfo"),
                format!("Node {n} MemTotal: 9999999 kB\nNode {n} MemFree: {free_kb} kB\nNode {n} Inactive(file): 0 kB\n"),
            )
            .unwrap();
            std::fs::write(h.join("free_hugepages"), format!("{huge_free}\n")).unwrap();
            std::fs::write(h.join("nr_hugepages"), "2\n").unwrap();
        }
        std::fs::write(nodes.join("online"), "0-1\n").unwrap();
    }

    fn range(host_node: u32, len: u64) -> RamRange {
        RamRange {
            node: 0,
            host_node: Some(host_node),
            offset: 0,
            len,
        }
    }

    #[test]
    fn checks_nodes_memory_and_huge_pages_per_node() {
        let dir = std::env::temp_dir().join(format!("numa-host-{}", std::process::id()));
        fake_host(&dir);
        assert_eq!(node_cpus(&dir, 1).unwrap().to_string(), "4-7");
        assert!(check(&dir, &[range(0, 2 << 30), range(1, 512 << 20)], None).is_ok());
        let e = check(&dir, &[range(1, 1 << 30), range(1, 1 << 30)], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host node 1 has 1024 MiB free") && e.contains("need 2048 MiB"),
            "{e}"
        );
        let e = check(&dir, &[range(2, 1 << 20)], None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host node 2 does not exist (this host has node(s) 0-1)"),
            "{e}"
        );
        assert!(check(&dir, &[range(0, 4 << 20)], Some(2 << 20)).is_ok());
        let e = check(&dir, &[range(1, 4 << 20)], Some(2 << 20))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("0 free 2048 KiB huge pages") && e.contains("echo 4 >"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_the_last_level_caches_of_cpus() {
        let dir = std::env::temp_dir().join(format!("numa-llc-{}", std::process::id()));
        for (cpu, l2, l3) in [(0, "0", "0-1"), (1, "1", "0-1"), (2, "2", "2-3")] {
            for (i, level, shared) in [(2, 2, l2), (3, 3, l3)] {
                let d = dir.join(format!("sys/devices/system/cpu/cpu{cpu}/cache/index{i}"));
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("level"), format!("{level}\n")).unwrap();
                std::fs::write(d.join("shared_cpu_list"), format!("{shared}\n")).unwrap();
            }
        }
        let l = |s: &str| CpuList::parse(s).unwrap();
        assert_eq!(llc_domains(&dir, &l("0-1")).len(), 1);
        assert_eq!(
            llc_domains(&dir, &l("1-2")).into_iter().collect::<Vec<_>>(),
            vec!["0-1", "2-3"]
        );
        assert!(llc_domains(&dir, &l("7")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binds_a_mapping_to_a_node() {
        let len = 4 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as usize;
        assert_eq!(bound_nodes(addr).unwrap(), None);
        bind(addr + (2 << 20), 2 << 20, 0).unwrap();
        assert_eq!(
            bound_nodes(addr).unwrap(),
            None,
            "the first half is not bound"
        );
        assert_eq!(
            bound_nodes(addr + (2 << 20)).unwrap().unwrap().to_string(),
            "0"
        );
        let e = bind(addr, 2 << 20, 1000).unwrap_err().to_string();
        assert!(e.contains("host node 1000"), "{e}");
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, len) };
    }
}
