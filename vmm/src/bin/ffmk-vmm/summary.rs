//! Human summaries of API answers, printed by the client commands without
//! `--json` (with it they print the answer itself).
use vmm_api::migration::Outcome;
use vmm_api::model::{SnapshotReply, State, VmInfo};

/// `512 MiB`, `4 GiB`, `1.5 GiB`, `300 KiB`, `17 B`.
pub fn bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if b >= size {
            let v = b as f64 / size as f64;
            return if b % size == 0 {
                format!("{} {unit}", b / size)
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{b} B")
}

/// `3 h 2 min`, `4 min 10 s`, `12.3 s`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{:.1} s", ms as f64 / 1e3),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// `info`: one `key: value` line per fact, as `virsh dominfo` prints.
pub fn vm(v: &VmInfo) -> String {
    let mut out: Vec<(&str, String)> = Vec::new();
    let c = &v.config;
    out.push(("State", v.state.to_string().replace('_', " ")));
    out.push(("PID", v.pid.to_string()));
    if let Some(inc) = &v.incoming {
        out.push((
            "Waiting",
            format!(
                "for a migration on {} ({})",
                inc.listen,
                duration_ms(inc.waiting_ms)
            ),
        ));
    } else {
        out.push(("Uptime", duration_ms(v.uptime_ms)));
    }
    out.push((
        "vCPUs",
        if c.topology.compute == 0 {
            c.cpus.to_string()
        } else {
            format!(
                "{} ({} service, {} compute)",
                c.cpus, c.topology.service, c.topology.compute
            )
        },
    ));
    if let Some(p) = &c.pin {
        let parts: Vec<String> = [
            ("service", &p.service),
            ("compute", &p.compute),
            ("io", &p.io),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
        out.push(("Pinned", parts.join(" ")));
    }
    out.push((
        "Memory",
        format!(
            "{}{}",
            bytes(v.memory.bytes),
            match (v.memory.hugepages, v.memory.page_bytes) {
                (false, _) => String::new(),
                (true, 0) => " (huge pages)".into(),
                (true, p) => format!(" ({} huge pages)", bytes(p)),
            }
        ),
    ));
    out.push((
        "CPU profile",
        if v.tsc_khz > 0 {
            format!(
                "{} on a {} host, TSC {:.3} GHz",
                v.cpu_profile,
                v.host_kind,
                f64::from(v.tsc_khz) / 1e6
            )
        } else {
            format!("{} on a {} host", v.cpu_profile, v.host_kind)
        },
    ));
    let boot = match &v.boot {
        Some(b) => format!(" ({}, {} entry)", b.format, b.mode),
        None => String::new(),
    };
    out.push(("Kernel", format!("{}{boot}", c.kernel.display())));
    if !c.cmdline.is_empty() {
        out.push(("Command line", c.cmdline.clone()));
    }
    for d in &v.disks {
        out.push((
            "Disk",
            format!(
                "{} {} {}{}",
                d.index,
                d.path.display(),
                bytes(d.size_bytes),
                if d.readonly { " read-only" } else { "" }
            ),
        ));
    }
    for n in &c.nets {
        let mac: Vec<String> = n.mac.iter().map(|b| format!("{b:02x}")).collect();
        out.push(("Network", format!("tap {} mac {}", n.tap, mac.join(":"))));
    }
    if let Some(vs) = &c.vsock {
        out.push((
            "vsock",
            format!("cid {} at {}", vs.cid, vs.socket.display()),
        ));
    }
    for p in &v.passthrough {
        out.push((
            "Passthrough",
            format!(
                "{} at {} ({})",
                p.device,
                p.bdf,
                serde_json::to_value(p.state)
                    .ok()
                    .and_then(|s| s.as_str().map(String::from))
                    .unwrap_or_default()
            ),
        ));
    }
    if v.dma_mapped_bytes > 0 {
        out.push(("DMA mapped", bytes(v.dma_mapped_bytes)));
    }
    if !v.vcpus.is_empty() {
        let exits: u64 = v.vcpus.iter().map(|c| c.exits).sum();
        let states: Vec<String> = v
            .vcpus
            .iter()
            .map(|c| format!("{}:{}/{}", c.id, c.role, c.state))
            .collect();
        out.push(("vCPU states", states.join(" ")));
        out.push(("vCPU exits", exits.to_string()));
        let assists: u64 = v.vcpus.iter().map(|c| c.pvm_assists).sum();
        if assists > 0 {
            out.push(("PVM assists", assists.to_string()));
        }
    }
    if v.state == State::Incoming {
        out.push((
            "Note",
            "no VM yet: only info and shutdown are served until it arrives".into(),
        ));
    }
    let width = out.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    out.iter()
        .map(|(k, v)| format!("{:<width$} {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `snapshot`.
pub fn snapshot(r: &SnapshotReply) -> String {
    let kind = serde_json::to_value(r.kind)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    let mut line = format!(
        "{} snapshot{} in {}: generation {}, {} layer(s), {} pages ({}) written in {:.0} ms, \
         guest paused {:.1} ms",
        kind,
        if r.live {
            format!(" (live, {} rounds)", r.rounds)
        } else {
            String::new()
        },
        r.dest.display(),
        r.generation,
        r.layers,
        r.pages_written,
        bytes(r.data_bytes),
        r.total_ms,
        r.pause_ms
    );
    if !r.unplugged.is_empty() {
        line.push_str(&format!("; {} left and came back", r.unplugged.join(", ")));
    }
    line
}

/// `migrate`, at the end.
pub fn migrated(o: &Outcome) -> String {
    let mut line = format!(
        "migrated to {} in {:.0} ms: downtime {:.1} ms, {} rounds, {} sent ({} pages, {} zero) of {}",
        o.to,
        o.total_ms,
        o.downtime_ms,
        o.rounds,
        bytes(o.sent_bytes),
        o.pages_sent,
        o.zero_pages,
        bytes(o.memory_bytes)
    );
    if o.throttle_pct > 0 {
        line.push_str(&format!(", vCPUs throttled {}%", o.throttle_pct));
    }
    if let Some(pc) = &o.postcopy {
        line.push_str(&format!(
            "; post-copy: {} pages missing at the switch-over, {} asked for, {:.0} ms",
            pc.missing_pages, pc.requested_pages, pc.postcopy_ms
        ));
    }
    if let Some(n) = o.verified_pages {
        line.push_str(&format!("; all {n} pages verified"));
    }
    if let Some(s) = &o.switch_over {
        line.push_str(&format!(
            "; switch-over: pause {:.1} ms, last pages {:.1} ms, state {:.1} ms, destination {:.1} ms, resume {:.1} ms",
            s.pause_ms, s.last_pages_ms, s.state_ms, s.destination_ms, s.resume_ms
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes(512 << 20), "512 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(bytes(17), "17 B");
        assert_eq!(duration_ms(12_345), "12.3 s");
        assert_eq!(duration_ms(250_000), "4 min 10 s");
        assert_eq!(duration_ms(3 * 3_600_000 + 120_000), "3 h 2 min");
    }
}
