//! A snapshot directory as a restore finds it: the manifest, the state
//! file and each layer's page bitmap and memory file come from the input
//! (pieces with u16 lengths after a flag byte). With flag bit 0 the harness
//! first fixes sizes and checksums in the manifest, as a careless or
//! malicious writer with the right tools would, so the checks behind the
//! checksums run too. Then: open (format, shape, sizes), verify
//! (checksums, no data outside defined pages), apply every layer into guest
//! memory laid out as the manifest says, and parse the machine state.
//! What must hold: no panic; a snapshot that verifies restores only pages
//! its layers define.
#![no_main]
use ffmk_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAX_MEMORY: u64 = 16 << 20;

fn simple_name(v: &Value) -> Option<String> {
    let n = v.as_str()?;
    let ok = !n.is_empty()
        && n.len() < 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !n.starts_with('.');
    ok.then(|| n.to_string())
}

/// Writes `data` as file `entry.name` (the memory file is sparse: the data
/// goes at `at`, the file is as long as the manifest says) and, when
/// `fix`, records its true size and checksum in the entry.
fn put(dir: &Path, entry: &mut Value, data: &[u8], at: u64, len: Option<u64>, fix: bool, crc: u32) {
    // Only a JSON object names a file (and can take fixed fields).
    let Some(entry) = entry.as_object_mut() else {
        return;
    };
    let Some(name) = entry.get("name").and_then(simple_name) else {
        return;
    };
    let path = dir.join(name);
    let Ok(f) = std::fs::File::create(&path) else {
        return;
    };
    use std::os::unix::fs::FileExt;
    let _ = f.write_all_at(data, at);
    if let Some(len) = len {
        let _ = f.set_len(len.max(at + data.len() as u64).min(MAX_MEMORY));
    }
    if fix {
        if let Ok(m) = f.metadata() {
            entry.insert("bytes".into(), m.len().into());
        }
        entry.insert("crc32".into(), crc.into());
    }
}

fuzz_target!(|data: &[u8]| {
    static N: AtomicU64 = AtomicU64::new(0);
    let mut input = Input::new(data);
    let flags = input.u8();
    let fix = flags & 1 != 0;
    let manifest_len = usize::from(input.u16());
    let Ok(mut manifest) = serde_json::from_slice::<Value>(input.bytes(manifest_len)) else {
        return;
    };
    if !manifest.is_object() {
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "ffmk-fuzz-snap-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::create_dir(&dir).is_err() {
        return;
    }
    let memory_bytes = manifest["memory_bytes"]
        .as_u64()
        .unwrap_or(0)
        .min(MAX_MEMORY);
    let state_len = usize::from(input.u16());
    let state = input.bytes(state_len);
    put(
        &dir,
        &mut manifest["state"],
        state,
        0,
        None,
        fix,
        crc32fast::hash(state),
    );
    let layers = manifest["layers"].as_array().map(|l| l.len()).unwrap_or(0);
    for i in 0..layers.min(4) {
        let bits_len = usize::from(input.u16());
        let bits = input.bytes(bits_len);
        let layer = &mut manifest["layers"][i];
        put(
            &dir,
            &mut layer["pages"],
            bits,
            0,
            None,
            fix,
            crc32fast::hash(bits),
        );
        let at = u64::from(input.u8()) * 4096;
        let mem_len = usize::from(input.u16());
        let page_data = input.bytes(mem_len);
        // A memory file's checksum covers the pages its bitmap defines,
        // in page order (bit i of little-endian u64 words = page i).
        let crc = defined_crc(bits, at, page_data);
        put(
            &dir,
            &mut layer["memory"],
            page_data,
            at,
            Some(memory_bytes),
            fix,
            crc,
        );
    }
    if let Ok(text) = serde_json::to_vec(&manifest) {
        let _ = std::fs::write(dir.join(snapshot::store::MANIFEST), text);
    }
    check(&dir);
    let _ = std::fs::remove_dir_all(&dir);
});

/// CRC-32 of the defined pages of a memory file holding `data` at `at`
/// and zeros elsewhere.
fn defined_crc(bits: &[u8], at: u64, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut page = vec![0u8; 4096];
    for (i, byte) in bits.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            let start = (i as u64 * 8 + bit) * 4096;
            if start >= MAX_MEMORY {
                return h.finalize();
            }
            page.fill(0);
            let end = at + data.len() as u64;
            let (from, to) = (start.max(at), (start + 4096).min(end));
            if from < to {
                page[(from - start) as usize..(to - start) as usize]
                    .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
            }
            h.update(&page);
        }
    }
    h.finalize()
}

fn check(dir: &Path) {
    let Ok(snap) = snapshot::Snapshot::open(dir) else {
        return;
    };
    let m = &snap.manifest;
    if snap.verify().is_err() || m.memory_bytes > MAX_MEMORY {
        return;
    }
    let ranges: Vec<(vm_memory::GuestAddress, usize)> = m
        .regions
        .iter()
        .map(|&(a, l)| (vm_memory::GuestAddress(a), l as usize))
        .collect();
    // Regions the memory layer refuses (overlap, zero length) end here.
    let Ok(mem) = snapshot::memory::GuestMemory::from_ranges(&ranges) else {
        return;
    };
    if snap.apply_layers(0, &mem).is_ok() {
        if let Ok(state) = snap.read_state() {
            let _ = vmm::machine::parse_state(&state);
        }
    }
}
