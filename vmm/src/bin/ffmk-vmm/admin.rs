//! Host and administration commands that need no running VMM: cluster
//! keys, snapshot directories, VFIO and InfiniBand functions, host checks.
use crate::failure::{runtime, usage, Failure};
use anyhow::Context;
use vmm::cli::KeyAction;

/// `ffmk-vmm key ...`: create, derive and check key files.
pub fn key(action: KeyAction) -> Result<u8, Failure> {
    use cluster_auth::key::{self, Key};
    match action {
        KeyAction::Generate { path, json } => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))
                    .map_err(usage)?;
            }
            let k = Key::Cluster(key::generate().map_err(runtime)?);
            key::write(&path, &k).map_err(usage)?;
            let fp = k.cluster().map_err(runtime)?.fingerprint();
            if json {
                return print_json(&serde_json::json!({
                    "path": path, "kind": "cluster", "fingerprint": fp,
                }));
            }
            say!(
                "wrote cluster key {fp} to {} (mode 0600): copy it to every node of \
                 the cluster, to the same path, as the user that runs ffmk-vmm and ffmk-node",
                path.display()
            );
            Ok(0)
        }
        KeyAction::Job {
            job,
            out,
            plane,
            json,
        } => {
            let (k, _) = Key::find(plane.cluster_key.as_deref()).map_err(usage)?;
            let jk = k.job_key(&job).map_err(usage)?;
            let fp = jk.fingerprint();
            key::write(
                &out,
                &Key::Job {
                    job: job.clone(),
                    key: jk,
                },
            )
            .map_err(usage)?;
            if json {
                return print_json(&serde_json::json!({
                    "path": out, "kind": "job", "job": job, "fingerprint": fp,
                }));
            }
            say!(
                "wrote job {job:?}'s key {fp} to {}: it opens that job's checkpoint \
                 copies and nothing else",
                out.display()
            );
            Ok(0)
        }
        KeyAction::Show { path, json } => {
            let (k, path) = Key::find(path.as_deref()).map_err(usage)?;
            if json {
                return print_json(&match &k {
                    Key::Cluster(s) => serde_json::json!({
                        "path": path, "kind": "cluster", "fingerprint": s.fingerprint(),
                    }),
                    Key::Job { job, key } => serde_json::json!({
                        "path": path, "kind": "job", "job": job, "fingerprint": key.fingerprint(),
                    }),
                });
            }
            match &k {
                Key::Cluster(s) => println!("{}: cluster key {}", path.display(), s.fingerprint()),
                Key::Job { job, key } => {
                    println!(
                        "{}: job {job:?}'s key {}",
                        path.display(),
                        key.fingerprint()
                    )
                }
            }
            Ok(0)
        }
    }
}

/// `snapshot compact DIR`: the chain folded into one full layer.
pub fn compact(dir: &std::path::Path, json: bool) -> Result<u8, Failure> {
    let m = snapshot::store::compact(dir).map_err(usage)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m).map_err(runtime)?);
        return Ok(0);
    }
    println!(
        "compacted {} into one full layer: {} pages, {:.1} MiB",
        dir.display(),
        m.layers[0].pages_defined,
        m.layers[0].data_bytes as f64 / f64::from(1 << 20)
    );
    Ok(0)
}

/// `snapshot inspect DIR`.
pub fn inspect(dir: &std::path::Path, verify: bool, json: bool) -> Result<u8, Failure> {
    let s = snapshot::Snapshot::open(dir).map_err(usage)?;
    if verify {
        s.verify().map_err(usage)?;
    }
    let m = &s.manifest;
    if json {
        println!("{}", serde_json::to_string_pretty(m).map_err(runtime)?);
        return Ok(0);
    }
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!("snapshot     {}", dir.display());
    println!("format       {} v{}", m.format, m.version);
    println!("chain        {} generation {}", m.chain_id, m.generation);
    println!(
        "taken on     {} CPU, {} host, profile {}, TSC {} kHz",
        m.host.cpu_vendor, m.host.host_kind, m.host.cpu_profile, m.host.tsc_khz
    );
    println!("memory       {:.0} MiB", mib(m.memory_bytes));
    println!("stored       {:.1} MiB", mib(m.stored_bytes()));
    println!("state        {} ({} bytes)", m.state.name, m.state.bytes);
    println!("layers       kind         pages   data MiB  pause ms  file");
    for l in &m.layers {
        println!(
            "             {:<11} {:>7} {:>10.1} {:>9.2}  {}{}",
            format!("{:?}", l.kind).to_lowercase(),
            l.pages_defined,
            mib(l.data_bytes),
            l.pause_ms,
            l.memory.name,
            if l.live { " (live)" } else { "" }
        );
    }
    if verify {
        println!("checksums    ok");
    }
    Ok(0)
}

/// Report commands end quietly when their reader goes away (`| head`).
pub fn quiet_on_closed_stdout() {
    // SAFETY: restores the default action for SIGPIPE; only called by
    // commands that write a report and no sockets.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

pub fn print_json(v: &impl serde::Serialize) -> Result<u8, Failure> {
    println!("{}", serde_json::to_string_pretty(v).map_err(runtime)?);
    Ok(0)
}

fn pci_address(s: &str) -> Result<vfio_ib::PciAddress, Failure> {
    s.parse().map_err(|e: String| usage(anyhow::anyhow!(e)))
}

pub fn vfio(action: vmm::cli::VfioAction) -> Result<u8, Failure> {
    use vfio_ib::sysfs;
    use vmm::cli::VfioAction;
    quiet_on_closed_stdout();
    match action {
        VfioAction::List { json, root } => {
            let v = sysfs::functions(&root);
            let rows: Vec<_> = v
                .iter()
                .map(|a| {
                    let (vendor, device) = sysfs::ids(&root, a).unwrap_or((0xffff, 0xffff));
                    serde_json::json!({
                        "address": a.to_string(),
                        "id": format!("{vendor:04x}:{device:04x}"),
                        "driver": sysfs::driver(&root, a),
                        "iommu_group": sysfs::iommu_group(&root, a),
                    })
                })
                .collect();
            if json {
                return print_json(&rows);
            }
            if !sysfs::has_iommu(&root) {
                println!("# no IOMMU groups: this host cannot pass devices through");
            }
            for r in rows {
                println!(
                    "{}  {}  driver={}  iommu_group={}",
                    r["address"].as_str().unwrap_or(""),
                    r["id"].as_str().unwrap_or(""),
                    r["driver"].as_str().unwrap_or("-"),
                    r["iommu_group"]
                        .as_u64()
                        .map_or("-".into(), |g| g.to_string()),
                );
            }
            Ok(0)
        }
        VfioAction::Bind {
            address,
            json,
            root,
        } => {
            let a = pci_address(&address)?;
            sysfs::bind_vfio(&root, &a).map_err(|e| usage(anyhow::anyhow!(e)))?;
            let group =
                vfio_ib::kernel::preflight(&root, &a).map_err(|e| usage(anyhow::anyhow!(e)))?;
            if json {
                return print_json(&serde_json::json!({
                    "address": a.to_string(), "driver": "vfio-pci", "iommu_group": group,
                }));
            }
            println!(
                "{a} is bound to vfio-pci (IOMMU group {group}); pass it with --device vfio={a}"
            );
            Ok(0)
        }
        VfioAction::Unbind {
            address,
            json,
            root,
        } => {
            let a = pci_address(&address)?;
            sysfs::unbind_vfio(&root, &a).map_err(|e| usage(anyhow::anyhow!(e)))?;
            if json {
                return print_json(&serde_json::json!({
                    "address": a.to_string(), "driver": sysfs::driver(&root, &a),
                }));
            }
            println!(
                "{a} is back with the host (driver: {})",
                sysfs::driver(&root, &a).as_deref().unwrap_or("none")
            );
            Ok(0)
        }
    }
}

pub fn ib(action: vmm::cli::IbAction) -> Result<u8, Failure> {
    use vfio_ib::ib;
    use vmm::cli::IbAction;
    quiet_on_closed_stdout();
    let fail = |e: String| usage(anyhow::anyhow!(e));
    let refused = |e: &dyn std::fmt::Display| usage(anyhow::anyhow!(e.to_string()));
    match action {
        IbAction::List { json, root } => {
            let hcas = ib::list(&root);
            if json {
                return print_json(&hcas);
            }
            if hcas.is_empty() {
                println!("no InfiniBand HCAs on this host");
            }
            for h in hcas {
                let addr = h.address.as_ref().map_or("-".into(), |a| a.to_string());
                let vfs = h.sriov.as_ref().map_or("no SR-IOV".into(), |s| {
                    format!("{}/{} VFs", s.num_vfs, s.total_vfs)
                });
                println!(
                    "{} {addr} driver={} fw={} node_guid={} {vfs}",
                    h.name,
                    h.driver.as_deref().unwrap_or("-"),
                    h.fw_ver,
                    h.node_guid
                );
                for p in &h.ports {
                    println!(
                        "  port {} {} ({}) lid={:#x} sm_lid={:#x} {} {} pkeys={}",
                        p.number,
                        p.state,
                        p.phys_state,
                        p.lid,
                        p.sm_lid,
                        p.link_layer,
                        p.rate,
                        p.pkeys.join(",")
                    );
                }
                for v in &h.vfs {
                    println!(
                        "  vf {} {} driver={} node={} port={} policy={}",
                        v.index,
                        v.address,
                        v.driver.as_deref().unwrap_or("-"),
                        v.node_guid.as_deref().unwrap_or("-"),
                        v.port_guid.as_deref().unwrap_or("-"),
                        v.policy.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(0)
        }
        IbAction::CreateVfs {
            hca,
            count,
            json,
            root,
        } => {
            let vfs = ib::create_vfs(&root, &hca, count).map_err(|e| refused(&e))?;
            if json {
                let vfs: Vec<String> = vfs.iter().map(|v| v.to_string()).collect();
                return print_json(&serde_json::json!({"hca": hca, "vfs": vfs}));
            }
            println!("{hca}: {} VFs", vfs.len());
            for v in vfs {
                println!("  {v}");
            }
            Ok(0)
        }
        IbAction::SetGuid {
            hca,
            vf,
            node,
            port,
            json,
            root,
        } => {
            ib::set_guids(&root, &hca, vf, &node, &port).map_err(|e| refused(&e))?;
            if json {
                return print_json(&serde_json::json!({
                    "hca": hca, "vf": vf, "node_guid": node, "port_guid": port,
                }));
            }
            println!("{hca} VF {vf}: node GUID {node}, port GUID {port}");
            Ok(0)
        }
        IbAction::SetPolicy {
            hca,
            vf,
            policy,
            json,
            root,
        } => {
            ib::set_policy(&root, &hca, vf, &policy).map_err(|e| refused(&e))?;
            if json {
                return print_json(&serde_json::json!({"hca": hca, "vf": vf, "policy": policy}));
            }
            println!("{hca} VF {vf}: policy {policy}");
            Ok(0)
        }
        IbAction::Bind {
            hca,
            vf,
            json,
            root,
        } => {
            let h =
                ib::hca(&root, &hca).ok_or_else(|| fail(format!("no InfiniBand HCA '{hca}'")))?;
            let v = h.vfs.get(vf as usize).ok_or_else(|| {
                fail(format!(
                    "{hca} has {} VFs; there is no VF {vf}",
                    h.vfs.len()
                ))
            })?;
            vfio_ib::sysfs::bind_vfio(&root, &v.address).map_err(|e| refused(&e))?;
            if json {
                return print_json(&serde_json::json!({
                    "hca": hca, "vf": vf, "address": v.address.to_string(), "driver": "vfio-pci",
                }));
            }
            println!("{}", v.address);
            Ok(0)
        }
        IbAction::Check { hca, json, root } => {
            let problems = ib::problems(&root, &hca).map_err(|e| refused(&e))?;
            if json {
                print_json(&serde_json::json!({
                    "hca": hca, "ready": problems.is_empty(), "problems": problems,
                }))?;
                return Ok(u8::from(!problems.is_empty()));
            }
            if problems.is_empty() {
                println!("{hca}: ready to give VMs VFs");
                return Ok(0);
            }
            for p in &problems {
                println!("{p}");
            }
            Ok(1)
        }
    }
}

pub fn host_check(
    compute: Option<vcpu_decouple::CpuList>,
    json: bool,
    root: &std::path::Path,
) -> Result<u8, Failure> {
    quiet_on_closed_stdout();
    let report = vcpu_decouple::hostcheck::check(root, compute.as_ref()).map_err(runtime)?;
    // A host with warnings is not ready for compute: exit 1 (scripts and
    // Slurm health checks act on it).
    let code = u8::from(report.warnings() > 0);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(runtime)?
        );
        return Ok(code);
    }
    println!(
        "compute cores: {} ({})",
        report.compute, report.compute_from
    );
    for f in &report.findings {
        let v = match f.verdict {
            vcpu_decouple::hostcheck::Verdict::Ok => "ok",
            vcpu_decouple::hostcheck::Verdict::Info => "info",
            vcpu_decouple::hostcheck::Verdict::Warn => "WARN",
        };
        println!("{v:>4}  {:<13} {}", f.item, f.detail);
        if let Some(s) = &f.suggestion {
            println!("      {:<13} -> {s}", "");
        }
    }
    println!(
        "{} warning(s): {}",
        report.warnings(),
        if report.warnings() == 0 {
            "the compute cores look quiet"
        } else {
            "expect host noise on the compute cores until they are fixed (exit 1)"
        }
    );
    Ok(code)
}

pub fn host_info(json: bool, profile: Option<vmm::host::CpuProfile>) -> Result<u8, Failure> {
    quiet_on_closed_stdout();
    let kvm = crate::open_kvm()?;
    let info = vmm::host::HostInfo::gather(&kvm, profile)
        .context("cannot query KVM")
        .map_err(runtime)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info).map_err(runtime)?);
    } else {
        info.print_text();
    }
    Ok(0)
}
