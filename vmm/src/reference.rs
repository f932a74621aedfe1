//! docs/config.md, generated from the code so it cannot drift: the keys
//! are [`VmSpec`]'s (an example with every key set, which the compiler
//! keeps complete), each explained by the `run` flag of the same name.
//! A test compares the file with [`config_reference`].
use crate::config::{DiskEntry, NetEntry, VmSpec, VsockEntry};
use clap::CommandFactory;

/// A spec with every key set: the example file of the reference. A struct
/// literal without `..`, so a new key cannot be left out.
pub fn example() -> VmSpec {
    VmSpec {
        kernel: Some("/images/vmlinux".into()),
        initrd: Some("/images/initrd.img".into()),
        cmdline: Some("console=ttyS0 root=/dev/vda ro".into()),
        cpus: "service=1,compute=3".parse().ok(),
        pin: "service=0,compute=1-3,io=0".parse().ok(),
        exits: "auto".parse().ok(),
        halt_poll_ns: Some(200_000),
        realtime: Some(10),
        topology: "sockets=2,cores=2,threads=1".parse().ok(),
        numa: [
            "node=0,cpus=0-1,memory=2G,host-node=0",
            "node=1,cpus=2-3,memory=2G,host-node=1,distance=0:21",
        ]
        .iter()
        .map(|t| t.parse().ok())
        .collect(),
        memory: Some("4G".into()),
        hugepages: Some(crate::memory::HugePages::Size2M),
        prefault: Some(true),
        console: Some("file=/var/log/ffmk/vm0.console".into()),
        api_socket: Some("/run/ffmk/vm0.sock".into()),
        test_exit_port: Some(crate::config::TEST_EXIT_PORT),
        cpu_profile: Some(crate::host::CpuProfile::Host),
        disk: Some(vec![DiskEntry {
            path: "/images/root.raw".into(),
            readonly: true,
            direct: false,
            serial: Some("root".into()),
            queues: Some(2),
            bw: Some("200M".into()),
            iops: Some(5000),
        }]),
        net: Some(vec![NetEntry {
            tap: "tap0".into(),
            mac: Some("52:54:00:12:34:56".into()),
            bridge: Some("br0".into()),
            announce: Some(true),
        }]),
        rng: Some(true),
        virtio_console: Some("/var/log/ffmk/vm0.hvc".into()),
        vsock: Some(VsockEntry {
            cid: 3,
            socket: "/run/ffmk/vm0.vsock".into(),
        }),
        device: "vfio=0000:3b:00.2".parse().ok().map(|d| vec![d]),
        seccomp: Some(sandbox::Mode::On),
        snapshot_dirs: Some(vec!["/bb/ckpt".into()]),
        migrate_to: Some(vec!["node17".into()]),
        hotplug_slots: Some(2),
        hotplug_allow: "vfio-user=/run/ffmk/cx0.sock".parse().ok().map(|d| vec![d]),
        api_group: Some("hpc".into()),
        landlock: "auto".parse().ok(),
    }
}

/// What a key takes in TOML beyond the flag's own text.
fn toml_value(key: &str, v: &serde_json::Value) -> &'static str {
    match (key, v) {
        ("memory", _) => "number (MiB) or string (`\"2G\"`, `\"4Gi\"`, `\"512M\"`)",
        ("cpus", _) => "number or string (`\"service=S,compute=C\"`)",
        ("test-exit-port", _) => "`true` (port 0xf4), a number, or `\"0xf4\"`",
        ("disk", _) => "tables (`[[disk]]`), or the flag's text, one or a list",
        ("net", _) => "tables (`[[net]]`), or the flag's text, one or a list",
        ("vsock", _) => "a table (`[vsock]`) or the flag's text",
        ("hugepages", _) => "`true` (2 MiB pages), `\"2M\"`, `\"1G\"` or `false`",
        ("numa", _) => "tables (`[[numa]]`, the flag's keys), or the flag's text, one or a list",
        (_, serde_json::Value::Array(_)) => "string or list of strings",
        (_, serde_json::Value::Bool(_)) => "boolean",
        (_, serde_json::Value::Number(_)) => "number",
        _ => "string",
    }
}

/// A key as TOML files write it: the flag's name (`api_socket` ->
/// `api-socket`, `snapshot_dirs` -> `snapshot-dir`).
fn toml_key(field: &str) -> String {
    match field {
        "snapshot_dirs" => "snapshot-dir".into(),
        f => f.replace('_', "-"),
    }
}

/// The example as TOML with the flags' names for keys.
fn example_toml(example: &VmSpec) -> String {
    let renamed: serde_json::Map<String, serde_json::Value> = match serde_json::to_value(example) {
        Ok(serde_json::Value::Object(m)) => m.into_iter().map(|(k, v)| (toml_key(&k), v)).collect(),
        _ => serde_json::Map::new(),
    };
    toml::to_string(&renamed).unwrap_or_default()
}

/// One line of a flag's help (clap's text joined, `[default: ...]` kept).
fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// The whole of docs/config.md.
pub fn config_reference() -> String {
    let cmd = crate::cli::Cli::command();
    let run = cmd
        .find_subcommand("run")
        .expect("ffmk-vmm has a run subcommand");
    let flag = |key: &str| {
        run.get_arguments()
            .find(|a| a.get_long() == Some(key))
            .map(|a| {
                one_line(
                    &a.get_long_help()
                        .or(a.get_help())
                        .map(|h| h.to_string())
                        .unwrap_or_default(),
                )
            })
    };
    let example = example();
    let toml_text = example_toml(&example);
    let json = serde_json::to_value(&example).unwrap_or_default();
    let mut rows = String::new();
    let mut keys = Vec::new();
    if let serde_json::Value::Object(map) = &json {
        let mut map: Vec<(String, &serde_json::Value)> =
            map.iter().map(|(k, v)| (toml_key(k), v)).collect();
        map.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, v) in map {
            let key = &key;
            keys.push(key.clone());
            let help = flag(key).unwrap_or_else(|| "(no flag of this name)".into());
            rows.push_str(&format!(
                "| `{key}` | `--{key}` | {} | {help} |\n",
                toml_value(key, v)
            ));
        }
    }
    let only_flags: Vec<String> = run
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !keys.iter().any(|k| k == l) && *l != "help")
        .map(|l| format!("`--{l}`"))
        .collect();
    format!(
        "# Configuration file reference\n\n\
         <!-- Generated by `vmm::reference::config_reference` from the code \
         (VmSpec and `run`'s flags); `FFMK_BLESS=1 cargo test -p vmm --lib \
         reference` rewrites it, and the test fails when it is stale. -->\n\n\
         `ffmk-vmm run --config FILE` reads a TOML file. Its keys are the \
         flags of `run` without the dashes in front (`api-socket`, \
         `snapshot-dir`); a flag given on the command line overrides the \
         file's key. Relative paths are taken relative to the file's \
         directory. An unknown key, a wrong type or a bad value is refused \
         with the file, line and column. The snake_case names of earlier \
         versions (`api_socket`, `snapshot_dirs`, `test_exit_port`) are read \
         too.\n\n\
         Sizes take B, K/KiB/Ki, M/MiB/Mi, G/GiB/Gi, T/TiB/Ti; a plain number \
         is MiB, as on the command line. Keys a flag repeats (`--disk`, \
         `--device`, `--snapshot-dir`) take one value or a list.\n\n\
         ## Example (every key)\n\n```toml\n{toml_text}```\n\n\
         ## Keys\n\n\
         | key | flag | TOML value | meaning (the flag's help) |\n\
         |---|---|---|---|\n{rows}\n\
         ## Flags that are not keys\n\n\
         These belong to one start, not to a VM's description: {}.\n",
        only_flags.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/config.md is what the code generates (`FFMK_BLESS=1` rewrites it).
    #[test]
    fn docs_config_md_is_generated_from_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let want = config_reference();
        if std::env::var_os("FFMK_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/config.md is stale: run FFMK_BLESS=1 cargo test -p vmm --lib reference"
        );
    }

    #[test]
    fn every_key_is_a_flag_and_the_example_reads_back() {
        let example = example();
        // The flags' names read back to the same spec...
        let text = example_toml(&example);
        assert!(
            text.contains("api-socket = ") && text.contains("snapshot-dir = "),
            "{text}"
        );
        let back: VmSpec = toml::from_str(&text).unwrap();
        assert_eq!(back, example);
        // ... and so do the snake_case names a saved spec holds.
        let saved = toml::to_string(&example).unwrap();
        assert!(saved.contains("api_socket = "), "{saved}");
        let back: VmSpec = toml::from_str(&saved).unwrap();
        assert_eq!(back, example);
        let reference = config_reference();
        assert!(!reference.contains("(no flag of this name)"), "{reference}");
    }
}
