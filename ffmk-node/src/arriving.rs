//! What a VM brings to the host it moves to besides its memory and vCPUs:
//! read-only disks (the same files here, under a directory every host
//! shares: `shared_disk_dirs`) and network devices on bridges (a new TAP
//! on this host's bridge of the same name, in `vm_bridges`, with the VM's
//! MAC). A peer's request is checked against this host's settings before
//! any VMM starts, and turned into the `--disk` and `--net` flags of the
//! receiving `ffmk-vmm run --incoming`.
use std::path::{Path, PathBuf};
use vmm_api::model::{DiskConfig, NetConfig};

/// A usable network interface name (Linux: at most 15 bytes; here only
/// letters, digits, `-`, `_` and `.`, so that it is a plain file name in
/// /sys/class/net and a plain word in a `--net` spec).
pub fn interface_name(n: &str) -> bool {
    (1..=15).contains(&n.len())
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
        && n != "."
        && n != ".."
}

/// `--disk` flags for `disks` on this host: each read-only, its file
/// under one of `dirs` (after resolving links and `..`) and present here.
pub fn disk_flags(disks: &[DiskConfig], dirs: &[PathBuf]) -> Result<Vec<String>, String> {
    disks.iter().map(|d| disk_flag(d, dirs)).collect()
}

fn disk_flag(d: &DiskConfig, dirs: &[PathBuf]) -> Result<String, String> {
    let shown = d.path.display();
    if !d.readonly {
        return Err(format!(
            "its disk {shown} is read-write (only read-only disks move)"
        ));
    }
    if dirs.is_empty() {
        return Err(format!(
            "it has a disk ({shown}) and this host shares no disk directory (shared_disk_dirs)"
        ));
    }
    // A path not even spelled under a shared directory is refused before
    // the file system is asked: a peer learns nothing of other files.
    if !dirs.iter().any(|dir| d.path.starts_with(dir)) {
        return Err(format!(
            "its disk {shown} is outside this host's shared_disk_dirs"
        ));
    }
    let real = d
        .path
        .canonicalize()
        .map_err(|e| format!("its disk {shown} is not on this host: {e}"))?;
    if !real.is_file() {
        return Err(format!("its disk {shown} is not a file here"));
    }
    let shared = dirs
        .iter()
        .filter_map(|dir| dir.canonicalize().ok())
        .any(|dir| real.starts_with(dir));
    if !shared {
        return Err(format!(
            "its disk {shown} is outside this host's shared_disk_dirs"
        ));
    }
    let path = real.to_str().filter(|p| !p.contains(',')).ok_or_else(|| {
        format!("its disk {shown} has a name --disk cannot take (a comma, or not UTF-8)")
    })?;
    let mut spec = format!("path={path},readonly");
    if d.direct {
        spec.push_str(",direct");
    }
    if let Some(serial) = &d.serial {
        if serial.contains(',') || serial.contains('=') {
            return Err(format!(
                "its disk {shown} has serial {serial:?}, which --disk cannot take"
            ));
        }
        spec.push_str(&format!(",serial={serial}"));
    }
    spec.push_str(&format!(",queues={}", d.queues.max(1)));
    if let Some(b) = d.bandwidth {
        spec.push_str(&format!(",bw={b}B"));
    }
    if let Some(n) = d.iops {
        spec.push_str(&format!(",iops={n}"));
    }
    Ok(spec)
}

/// `--net` flags for `nets` on this host: each on a bridge that is in
/// `bridges` and exists under `sys_net` (/sys/class/net), on a new TAP
/// named `ffmkN` (the first numbers no interface under `sys_net` has).
pub fn net_flags(
    nets: &[NetConfig],
    bridges: &[String],
    sys_net: &Path,
) -> Result<Vec<String>, String> {
    let mut flags = Vec::new();
    let mut next = 0u32;
    for n in nets {
        let mac = n
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let Some(bridge) = &n.bridge else {
            return Err(format!(
                "its network device {mac} is on TAP {} without a bridge (only bridged TAPs move)",
                n.tap
            ));
        };
        if !bridges.contains(bridge) {
            return Err(format!(
                "its network device {mac} is on bridge {bridge:?}, which is not among this host's vm_bridges"
            ));
        }
        if !sys_net.join(bridge).join("bridge").is_dir() {
            return Err(format!("bridge {bridge} does not exist on this host"));
        }
        let tap = loop {
            let name = format!("ffmk{next}");
            next += 1;
            if !sys_net.join(&name).exists() {
                break name;
            }
            if next > 10_000 {
                return Err("no free TAP name ffmkN".into());
            }
        };
        let mut spec = format!("tap={tap},bridge={bridge},mac={mac}");
        if n.announce == Some(false) {
            spec.push_str(",announce=off");
        }
        flags.push(spec);
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &Path, readonly: bool) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            readonly,
            direct: false,
            serial: Some("base".into()),
            queues: 2,
            bandwidth: Some(4 << 20),
            iops: None,
        }
    }

    fn net(bridge: Option<&str>) -> NetConfig {
        NetConfig {
            tap: "t0".into(),
            mac: [0x52, 0x54, 0, 1, 2, 3],
            announce: None,
            bridge: bridge.map(str::to_string),
        }
    }

    #[test]
    fn read_only_disks_under_a_shared_directory_move_others_do_not() {
        let dir = std::env::temp_dir().join(format!("ffmk-arriving-{}", std::process::id()));
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        let img = shared.join("base.ext4");
        std::fs::write(&img, b"x").unwrap();
        let outside = dir.join("own.ext4");
        std::fs::write(&outside, b"x").unwrap();
        let dirs = vec![shared.clone()];
        let real = img.canonicalize().unwrap();
        assert_eq!(
            disk_flags(&[disk(&img, true)], &dirs).unwrap(),
            vec![format!(
                "path={},readonly,serial=base,queues=2,bw=4194304B",
                real.display()
            )]
        );
        // Through `..` it is the same file, still under the directory.
        let dotted = shared.join("../shared/base.ext4");
        assert!(disk_flags(&[disk(&dotted, true)], &dirs).is_ok());
        let err = |d: DiskConfig, dirs: &[PathBuf]| disk_flags(&[d], dirs).unwrap_err();
        assert!(err(disk(&img, false), &dirs).contains("read-write"));
        assert!(err(disk(&outside, true), &dirs).contains("outside"));
        assert!(err(disk(&shared.join("../own.ext4"), true), &dirs).contains("outside"));
        assert!(err(disk(&shared.join("gone.ext4"), true), &dirs).contains("not on this host"));
        assert!(err(disk(&img, true), &[]).contains("shares no disk directory"));
        assert!(err(disk(&shared, true), &dirs).contains("not a file"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bridged_taps_move_onto_new_taps_of_listed_bridges() {
        let sys = std::env::temp_dir().join(format!("ffmk-arriving-net-{}", std::process::id()));
        std::fs::create_dir_all(sys.join("br0/bridge")).unwrap();
        std::fs::create_dir_all(sys.join("ffmk0")).unwrap();
        std::fs::create_dir_all(sys.join("eth0")).unwrap();
        let bridges = vec!["br0".to_string(), "br9".to_string()];
        let two = [net(Some("br0")), net(Some("br0"))];
        assert_eq!(
            net_flags(&two, &bridges, &sys).unwrap(),
            vec![
                "tap=ffmk1,bridge=br0,mac=52:54:00:01:02:03".to_string(),
                "tap=ffmk2,bridge=br0,mac=52:54:00:01:02:03".to_string()
            ]
        );
        let mut quiet = net(Some("br0"));
        quiet.announce = Some(false);
        assert!(net_flags(&[quiet], &bridges, &sys).unwrap()[0].ends_with(",announce=off"));
        let err = |n: NetConfig| net_flags(&[n], &bridges, &sys).unwrap_err();
        assert!(err(net(None)).contains("without a bridge"));
        assert!(err(net(Some("br1"))).contains("not among this host's vm_bridges"));
        assert!(err(net(Some("br9"))).contains("does not exist"));
        // eth0 is no bridge.
        assert!(net_flags(&[net(Some("eth0"))], &["eth0".into()], &sys)
            .unwrap_err()
            .contains("does not exist"));
        std::fs::remove_dir_all(sys).unwrap();
    }

    #[test]
    fn interface_names_are_short_plain_words() {
        assert!(interface_name("br0"));
        assert!(interface_name("vm-br.1_a"));
        for bad in ["", "a/b", "..", "br 0", "sixteen-chars-xx", "br0,mac=1"] {
            assert!(!interface_name(bad), "{bad:?}");
        }
    }
}
