//! Putting threads on host cores: CPU affinity, real-time scheduling, and
//! a per-core claim so two VMs never book the same compute core.
use crate::cpulist::CpuList;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot pin {what} to host cores {cores}: {source}")]
    Affinity {
        what: String,
        cores: CpuList,
        source: std::io::Error,
    },
    #[error("real-time scheduling (SCHED_FIFO priority {prio}) for {what} is not permitted: {source}; run with CAP_SYS_NICE or raise RLIMIT_RTPRIO (ulimit -r), or leave out --realtime")]
    RealtimeRefused {
        what: String,
        prio: i32,
        source: std::io::Error,
    },
    #[error("host core {core} is already a compute core of another ffmk-vmm ({holder}); pick another core with --pin compute=")]
    CoreTaken { core: u32, holder: String },
    #[error("cannot claim host core {core} ({path}): {source}")]
    Claim {
        core: u32,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Pins the calling thread to `cores` (a core beyond what the kernel's
/// CPU set can name leaves the set empty, which the kernel refuses).
pub fn pin_current_thread(cores: &CpuList, what: &str) -> Result<(), Error> {
    pin_thread(0, cores, what)
}

/// Pins thread `tid` (of any process we may change) to `cores`.
pub fn pin_thread(tid: i32, cores: &CpuList, what: &str) -> Result<(), Error> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cores
        .iter()
        .filter(|c| (*c as usize) < 8 * std::mem::size_of::<libc::cpu_set_t>())
    {
        // SAFETY: `c` is below the set's capacity (filtered above).
        unsafe { libc::CPU_SET(c as usize, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the given size; `tid` a thread id.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::Affinity {
            what: what.into(),
            cores: cores.clone(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Switches the calling thread to SCHED_FIFO at `prio` (1-99).
pub fn make_current_thread_realtime(prio: i32, what: &str) -> Result<(), Error> {
    make_thread_realtime(0, prio, what)
}

/// Switches thread `tid` (0: the caller) to SCHED_FIFO at `prio`.
pub fn make_thread_realtime(tid: i32, prio: i32, what: &str) -> Result<(), Error> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: `tid` is a thread id (0: the caller); `param` is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        return Err(Error::RealtimeRefused {
            what: what.into(),
            prio,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The calling thread's kernel thread id.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// One thread as `/proc/<pid>/task/<tid>/` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ThreadInfo {
    pub tid: i32,
    pub name: String,
    /// `Cpus_allowed_list` from `status`.
    pub cpus_allowed: CpuList,
    /// The core it last ran on (`stat` field 39).
    pub last_cpu: Option<u32>,
    /// Scheduling policy (`stat` field 41): 0 other, 1 FIFO, 2 RR.
    pub policy: Option<u32>,
    pub voluntary_switches: Option<u64>,
    pub involuntary_switches: Option<u64>,
}

/// Reads one thread of process `pid` from `<proc_root>/<pid>/task/<tid>`.
pub fn thread_info(proc_root: &Path, pid: u32, tid: i32) -> Option<ThreadInfo> {
    let dir = proc_root.join(format!("{pid}/task/{tid}"));
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
    };
    let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // `after[0]` is field 3 (state), so field N is after[N - 3].
    let stat_field = |n: usize| after.get(n - 3).and_then(|v| v.parse().ok());
    Some(ThreadInfo {
        tid,
        name: field("Name:").unwrap_or_default(),
        cpus_allowed: CpuList::parse_sysfs(&field("Cpus_allowed_list:")?).ok()?,
        last_cpu: stat_field(39),
        policy: stat_field(41),
        voluntary_switches: field("voluntary_ctxt_switches:").and_then(|v| v.parse().ok()),
        involuntary_switches: field("nonvoluntary_ctxt_switches:").and_then(|v| v.parse().ok()),
    })
}

/// Every thread of process `pid`.
pub fn threads(proc_root: &Path, pid: u32) -> Vec<ThreadInfo> {
    let Ok(dir) = std::fs::read_dir(proc_root.join(format!("{pid}/task"))) else {
        return Vec::new();
    };
    let mut v: Vec<ThreadInfo> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|tid| thread_info(proc_root, pid, tid))
        .collect();
    v.sort_by_key(|t| t.tid);
    v
}

/// Exclusive claims on host cores, held (flock) for the life of the VMM:
/// a second ffmk-vmm asking for one of them as a compute core is refused.
/// The kernel drops the locks when the process dies, so nothing goes stale.
#[derive(Debug)]
pub struct CoreClaims {
    _files: Vec<File>,
}

/// Where claims live: `$FFMK_RUN_DIR/cores`, else `/run/ffmk-vmm/cores`
/// when it can be made, else the temporary directory's `ffmk-vmm-cores`.
pub fn claims_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FFMK_RUN_DIR") {
        return PathBuf::from(d).join("cores");
    }
    let run = PathBuf::from("/run/ffmk-vmm/cores");
    if std::fs::create_dir_all(&run).is_ok() {
        return run;
    }
    std::env::temp_dir().join("ffmk-vmm-cores")
}

impl CoreClaims {
    pub fn claim(dir: &Path, cores: &CpuList) -> Result<CoreClaims, Error> {
        let mut files = Vec::new();
        for core in cores.iter() {
            let path = dir.join(format!("core{core}"));
            let failed = |source: std::io::Error| Error::Claim {
                core,
                path: path.clone(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(failed)?;
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(failed)?;
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| "unknown process".into());
                    return Err(Error::CoreTaken { core, holder });
                }
                return Err(failed(e));
            }
            file.set_len(0).map_err(failed)?;
            write!(file, "pid {}", std::process::id()).map_err(failed)?;
            files.push(file);
        }
        Ok(CoreClaims { _files: files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_a_thread_and_reads_it_back_from_proc() {
        let online = crate::placement::HostCpus::read(Path::new("/"))
            .unwrap()
            .online;
        let core = online.as_slice()[online.len() - 1];
        let info = std::thread::spawn(move || {
            pin_current_thread(&CpuList::new(vec![core]), "test thread").unwrap();
            thread_info(Path::new("/proc"), std::process::id(), current_tid()).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(info.cpus_allowed.as_slice(), &[core]);
        assert_eq!(info.last_cpu, Some(core));
        assert!(!threads(Path::new("/proc"), std::process::id()).is_empty());
        let e = pin_current_thread(&CpuList::new(vec![4000]), "x").unwrap_err();
        assert!(
            e.to_string().contains("cannot pin x to host cores 4000"),
            "{e}"
        );
    }

    #[test]
    fn a_core_can_be_claimed_once() {
        let dir = std::env::temp_dir().join(format!("ffmk-claims-{}", std::process::id()));
        let cores = CpuList::parse("1,3").unwrap();
        let held = CoreClaims::claim(&dir, &cores).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        let e = CoreClaims::claim(&dir, &CpuList::new(vec![3]))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("host core 3 is already a compute core"),
            "{e}"
        );
        assert!(e
            .to_string()
            .contains(&format!("pid {}", std::process::id())));
        drop(held);
        let again = CoreClaims::claim(&dir, &CpuList::new(vec![3]));
        assert!(again.is_ok());
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
