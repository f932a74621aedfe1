//! The guest's NUMA nodes: what `--numa` says ([`NodeSpec`], one per node)
//! and the checked whole ([`Layout`]): every vCPU in exactly one node,
//! node memory adding up to the VM's, distances symmetric.
//!
//! Guest memory is laid out node after node in guest-physical order (node
//! 0 from address 0, the next node where it ends, the MMIO hole skipped as
//! for any guest), so a node is a range of the VM's RAM offsets.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use vcpu_decouple::CpuList;

/// The most guest nodes a VM may have.
pub const MAX_NODES: u32 = 64;
/// ACPI SLIT: the distance of a node to itself.
pub const LOCAL_DISTANCE: u8 = 10;
/// The distance between two nodes when `--numa` gives none (as Linux and
/// QEMU assume).
pub const REMOTE_DISTANCE: u8 = 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid --numa '{spec}': {why} (node=N,cpus=LIST,memory=SIZE[,host-node=N][,distance=NODE:D])")]
    Spec { spec: String, why: String },
    #[error("--numa: node {0} is given twice")]
    NodeTwice(u32),
    #[error("--numa: nodes must be numbered 0 to {last} without gaps (node {missing} is missing)", last = .count - 1)]
    NodeGap { count: u32, missing: u32 },
    #[error("--numa: at most {MAX_NODES} nodes (got {0})")]
    TooManyNodes(usize),
    #[error("--numa: vCPU {cpu} is in node {a} and node {b}")]
    CpuTwice { cpu: u32, a: u32, b: u32 },
    #[error("--numa: node {node} lists vCPU {cpu}, but the VM has {vcpus} vCPU(s) (0-{last})", last = .vcpus - 1)]
    NoSuchCpu { node: u32, cpu: u32, vcpus: u32 },
    #[error("--numa: vCPU(s) {0} are in no node; every vCPU needs one")]
    CpusUncovered(CpuList),
    #[error("--numa: node {0} has no memory= (every node needs memory)")]
    NoMemory(u32),
    #[error("--numa: node {node}'s memory ({bytes} bytes) must be a multiple of {align_mib} MiB", align_mib = .align >> 20)]
    Alignment { node: u32, bytes: u64, align: u64 },
    #[error("--numa: the nodes' memory adds up to {nodes_mib} MiB but --memory is {memory_mib} MiB", nodes_mib = .nodes >> 20, memory_mib = .memory >> 20)]
    MemorySum { nodes: u64, memory: u64 },
    #[error("--numa: distance {from}->{to} is {there} but {to}->{from} is {back}; distances must be symmetric")]
    Asymmetric {
        from: u32,
        to: u32,
        there: u8,
        back: u8,
    },
    #[error("--numa: node {node} gives a distance to node {to}, which does not exist")]
    DistanceToNowhere { node: u32, to: u32 },
    #[error("--numa: distance {from}->{to} is {d}; a remote distance must be 11-254 (10 is a node to itself)")]
    DistanceRange { from: u32, to: u32, d: u8 },
    #[error("--numa node={node}: {why}")]
    Remap { node: u32, why: String },
}

/// Parses "512M", "2G", "1GiB", "1024" (MiB), "65536K", "4096B" into
/// bytes (the VMM's `--memory` sizes); None for anything else or zero.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mi" | "mib" => 20,
        "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return None,
    };
    n.checked_mul(1 << shift).filter(|b| *b > 0)
}

/// One `--numa` as written; what it leaves out comes from elsewhere (the
/// node number from its position, the host node from the restoring host).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSpec {
    pub node: Option<u32>,
    /// Guest CPUs (= vCPU numbers).
    pub cpus: Option<CpuList>,
    pub memory: Option<u64>,
    /// The host node whose memory backs this node and whose CPUs run its vCPUs.
    pub host_node: Option<u32>,
    /// Distances to other nodes, (node, distance).
    pub distances: Vec<(u32, u8)>,
}

impl std::str::FromStr for NodeSpec {
    type Err = Error;
    /// `node=1,cpus=2-3,6,memory=2G,host-node=1,distance=0:21`: a part
    /// without `=` continues the CPU list before it.
    fn from_str(spec: &str) -> Result<NodeSpec, Error> {
        let bad = |why: String| Error::Spec {
            spec: spec.into(),
            why,
        };
        let num = |key: &str, v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| bad(format!("{key}: '{v}' is not a number")))
        };
        let mut n = NodeSpec::default();
        let mut cpus: Option<String> = None;
        let mut last_key = "";
        for part in spec.split(',').map(str::trim) {
            let Some((key, value)) = part.split_once('=') else {
                match (&mut cpus, last_key) {
                    (Some(list), "cpus") => {
                        list.push(',');
                        list.push_str(part);
                        continue;
                    }
                    _ => return Err(bad(format!("'{part}' is not KEY=VALUE"))),
                }
            };
            let twice = |set: bool| {
                if set {
                    Err(bad(format!("'{key}' is given twice")))
                } else {
                    Ok(())
                }
            };
            match key.trim() {
                "node" => {
                    twice(n.node.is_some())?;
                    n.node = Some(num(key, value)?);
                }
                "cpus" => {
                    twice(cpus.is_some())?;
                    cpus = Some(value.to_string());
                }
                "memory" | "mem" => {
                    twice(n.memory.is_some())?;
                    n.memory = Some(parse_size(value).ok_or_else(|| {
                        bad(format!("memory: '{value}' is not a size (512M, 2G)"))
                    })?);
                }
                "host-node" | "host_node" => {
                    twice(n.host_node.is_some())?;
                    n.host_node = Some(num(key, value)?);
                }
                "distance" => {
                    let (to, d) = value
                        .split_once(':')
                        .ok_or_else(|| bad(format!("distance: '{value}' is not NODE:DISTANCE")))?;
                    let to = num("distance", to)?;
                    let d = d
                        .trim()
                        .parse::<u8>()
                        .map_err(|_| bad(format!("distance: '{d}' is not 10-254")))?;
                    if n.distances.iter().any(|(t, _)| *t == to) {
                        return Err(bad(format!("the distance to node {to} is given twice")));
                    }
                    n.distances.push((to, d));
                }
                other => return Err(bad(format!("unknown key '{other}'"))),
            }
            last_key = key.trim();
        }
        if let Some(list) = cpus {
            n.cpus = Some(CpuList::parse(&list).map_err(|e| bad(format!("cpus: {e}")))?);
        }
        Ok(n)
    }
}

impl fmt::Display for NodeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(n) = self.node {
            parts.push(format!("node={n}"));
        }
        if let Some(c) = &self.cpus {
            parts.push(format!("cpus={c}"));
        }
        if let Some(m) = self.memory {
            parts.push(if m % (1 << 20) == 0 {
                format!("memory={}M", m >> 20)
            } else {
                format!("memory={m}B")
            });
        }
        if let Some(h) = self.host_node {
            parts.push(format!("host-node={h}"));
        }
        for (to, d) in &self.distances {
            parts.push(format!("distance={to}:{d}"));
        }
        f.write_str(&parts.join(","))
    }
}

/// Saved (snapshot, migration) and shown as the flag's text.
impl Serialize for NodeSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The flag's text, or a TOML table with the flag's keys
/// (`{ node = 0, cpus = "0-3", memory = "4G", host-node = 0, distance = ["1:20"] }`).
impl<'de> Deserialize<'de> for NodeSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Num(u64),
            Text(String),
            List(Vec<Value>),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Table(BTreeMap<String, Value>),
        }
        let text = match Form::deserialize(d)? {
            Form::Text(t) => t,
            Form::Table(table) => {
                let mut parts = Vec::new();
                for (key, value) in table {
                    let items = match value {
                        Value::List(items) => items,
                        one => vec![one],
                    };
                    for item in items {
                        match item {
                            Value::Num(n) => parts.push(format!("{key}={n}")),
                            Value::Text(t) => parts.push(format!("{key}={t}")),
                            Value::List(_) => {
                                return Err(serde::de::Error::custom(format!(
                                    "numa: '{key}' holds a list of lists"
                                )))
                            }
                        }
                    }
                }
                parts.join(",")
            }
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One checked guest node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub id: u32,
    pub cpus: CpuList,
    pub memory: u64,
    pub host_node: Option<u32>,
    /// Distance to every node, by node id (its own is [`LOCAL_DISTANCE`]).
    pub distances: Vec<u8>,
}

/// The guest's nodes, checked: numbered 0..n, every vCPU in one node,
/// memory adding up, distances symmetric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub nodes: Vec<Node>,
}

/// A node's share of guest RAM, as offsets into the VM's RAM (node after
/// node, in id order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    pub node: u32,
    pub host_node: Option<u32>,
    pub offset: u64,
    pub len: u64,
}

impl Layout {
    /// Checks `specs` for a VM of `vcpus` vCPUs and `memory` bytes (None:
    /// the nodes' sum), each node's memory a multiple of `align` (the page
    /// size that backs it, 2 MiB at least).
    pub fn new(
        specs: &[NodeSpec],
        vcpus: u32,
        memory: Option<u64>,
        align: u64,
    ) -> Result<Layout, Error> {
        if specs.len() > MAX_NODES as usize {
            return Err(Error::TooManyNodes(specs.len()));
        }
        let mut by_id: BTreeMap<u32, &NodeSpec> = BTreeMap::new();
        for (i, s) in specs.iter().enumerate() {
            let id = s.node.unwrap_or(i as u32);
            if by_id.insert(id, s).is_some() {
                return Err(Error::NodeTwice(id));
            }
        }
        let count = specs.len() as u32;
        if let Some(missing) = (0..count).find(|i| !by_id.contains_key(i)) {
            return Err(Error::NodeGap { count, missing });
        }
        let mut owner: BTreeMap<u32, u32> = BTreeMap::new();
        let mut nodes = Vec::new();
        for (&id, s) in &by_id {
            let cpus = s.cpus.clone().unwrap_or_default();
            for cpu in cpus.iter() {
                if cpu >= vcpus {
                    return Err(Error::NoSuchCpu {
                        node: id,
                        cpu,
                        vcpus,
                    });
                }
                if let Some(a) = owner.insert(cpu, id) {
                    return Err(Error::CpuTwice { cpu, a, b: id });
                }
            }
            let mem = s.memory.ok_or(Error::NoMemory(id))?;
            let align = align.max(2 << 20);
            if mem % align != 0 {
                return Err(Error::Alignment {
                    node: id,
                    bytes: mem,
                    align,
                });
            }
            nodes.push(Node {
                id,
                cpus: cpus.sorted(),
                memory: mem,
                host_node: s.host_node,
                distances: Vec::new(),
            });
        }
        let uncovered: Vec<u32> = (0..vcpus).filter(|c| !owner.contains_key(c)).collect();
        if !uncovered.is_empty() {
            return Err(Error::CpusUncovered(CpuList::new(uncovered)));
        }
        let sum: u64 = nodes.iter().map(|n| n.memory).sum();
        if let Some(memory) = memory {
            if memory != sum {
                return Err(Error::MemorySum { nodes: sum, memory });
            }
        }
        // Distances: given on either side (or both, then equal), 20 when
        // given on neither.
        let mut given: BTreeMap<(u32, u32), u8> = BTreeMap::new();
        for (&id, s) in &by_id {
            for &(to, d) in &s.distances {
                if to >= count {
                    return Err(Error::DistanceToNowhere { node: id, to });
                }
                if to == id {
                    if d != LOCAL_DISTANCE {
                        return Err(Error::Spec {
                            spec: s.to_string(),
                            why: format!("a node's distance to itself is {LOCAL_DISTANCE}"),
                        });
                    }
                    continue;
                }
                if !(11..=254).contains(&d) {
                    return Err(Error::DistanceRange { from: id, to, d });
                }
                given.insert((id, to), d);
            }
        }
        for (&(from, to), &there) in &given {
            if let Some(&back) = given.get(&(to, from)) {
                if back != there {
                    return Err(Error::Asymmetric {
                        from,
                        to,
                        there,
                        back,
                    });
                }
            }
        }
        for n in nodes.iter_mut() {
            n.distances = (0..count)
                .map(|to| {
                    if to == n.id {
                        LOCAL_DISTANCE
                    } else {
                        given
                            .get(&(n.id, to))
                            .or_else(|| given.get(&(to, n.id)))
                            .copied()
                            .unwrap_or(REMOTE_DISTANCE)
                    }
                })
                .collect();
        }
        Ok(Layout { nodes })
    }

    pub fn total_memory(&self) -> u64 {
        self.nodes.iter().map(|n| n.memory).sum()
    }

    /// The node vCPU `cpu` belongs to.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.cpus.contains(cpu))
    }

    /// Each node's share of guest RAM.
    pub fn ram_ranges(&self) -> Vec<RamRange> {
        let mut offset = 0;
        self.nodes
            .iter()
            .map(|n| {
                let r = RamRange {
                    node: n.id,
                    host_node: n.host_node,
                    offset,
                    len: n.memory,
                };
                offset += n.memory;
                r
            })
            .collect()
    }

    /// The layout as specs again (what a snapshot keeps).
    pub fn specs(&self) -> Vec<NodeSpec> {
        self.nodes
            .iter()
            .map(|n| NodeSpec {
                node: Some(n.id),
                cpus: (!n.cpus.is_empty()).then(|| n.cpus.clone()),
                memory: Some(n.memory),
                host_node: n.host_node,
                distances: n
                    .distances
                    .iter()
                    .enumerate()
                    .filter(|&(to, &d)| to as u32 != n.id && d != REMOTE_DISTANCE)
                    .map(|(to, &d)| (to as u32, d))
                    .collect(),
            })
            .collect()
    }

    /// What the guest sees of the layout (no host nodes), as text: two
    /// VMs with the same text show their guests the same nodes.
    pub fn guest_view(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let d: Vec<String> = n.distances.iter().map(u8::to_string).collect();
                format!(
                    "node={},cpus={},memory={}B,distances={}",
                    n.id,
                    n.cpus,
                    n.memory,
                    d.join(":")
                )
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    /// This layout on another host: `over` may give a node a different
    /// host node (`--numa node=1,host-node=0` on `restore` or on a
    /// migration's destination); anything else it gives must be what the
    /// guest already has.
    pub fn remapped(&self, over: &[NodeSpec]) -> Result<Layout, Error> {
        let mut out = self.clone();
        for (i, o) in over.iter().enumerate() {
            let id = o.node.unwrap_or(i as u32);
            let remap = |why: String| Error::Remap { node: id, why };
            let n = out
                .nodes
                .get_mut(id as usize)
                .ok_or_else(|| remap(format!("the guest has {} node(s)", self.nodes.len())))?;
            if o.cpus.as_ref().is_some_and(|c| c.sorted() != n.cpus) {
                return Err(remap(format!(
                    "the guest's node has cpus={} (a restored or arriving guest keeps its nodes; only host-node= may change)",
                    n.cpus
                )));
            }
            if o.memory.is_some_and(|m| m != n.memory) {
                return Err(remap(format!(
                    "the guest's node has {} MiB (a restored or arriving guest keeps its nodes; only host-node= may change)",
                    n.memory >> 20
                )));
            }
            for &(to, d) in &o.distances {
                if n.distances.get(to as usize) != Some(&d) {
                    return Err(remap(format!(
                        "the guest's distance to node {to} is not {d}; only host-node= may change"
                    )));
                }
            }
            if o.host_node.is_some() {
                n.host_node = o.host_node;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(texts: &[&str]) -> Vec<NodeSpec> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn parses_and_prints_node_specs() {
        let n: NodeSpec = "node=1,cpus=2-3,6,memory=2G,host-node=1,distance=0:21"
            .parse()
            .unwrap();
        assert_eq!(n.node, Some(1));
        assert_eq!(n.cpus.as_ref().unwrap().as_slice(), &[2, 3, 6]);
        assert_eq!(n.memory, Some(2 << 30));
        assert_eq!(n.host_node, Some(1));
        assert_eq!(n.distances, vec![(0, 21)]);
        assert_eq!(
            n.to_string(),
            "node=1,cpus=2-3,6,memory=2048M,host-node=1,distance=0:21"
        );
        assert_eq!(n.to_string().parse::<NodeSpec>().unwrap(), n);
        for (bad, want) in [
            ("node=x", "not a number"),
            ("cpus=0,cpus=1", "given twice"),
            ("memory=lots", "not a size"),
            ("distance=1", "NODE:DISTANCE"),
            ("distance=1:300", "10-254"),
            ("socket=1", "unknown key 'socket'"),
            ("3,node=1", "not KEY=VALUE"),
            ("cpus=3-1", "backwards"),
        ] {
            let e = bad.parse::<NodeSpec>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn reads_toml_tables_and_text() {
        #[derive(Deserialize)]
        struct F {
            numa: Vec<NodeSpec>,
        }
        let f: F = serde_json::from_str(
            r#"{"numa": [{"node": 0, "cpus": "0-1", "memory": "1G", "host-node": 0},
                         "node=1,cpus=2-3,memory=1G,distance=0:30"]}"#,
        )
        .unwrap();
        assert_eq!(f.numa[0].memory, Some(1 << 30));
        assert_eq!(f.numa[0].host_node, Some(0));
        assert_eq!(f.numa[1].distances, vec![(0, 30)]);
        let f: Result<F, _> = serde_json::from_str(r#"{"numa": [{"memory": "x"}]}"#);
        assert!(f.is_err());
    }

    #[test]
    fn a_layout_covers_every_vcpu_and_all_memory() {
        let l = Layout::new(
            &specs(&[
                "cpus=0-1,memory=1G,host-node=0",
                "cpus=2-3,memory=512M,host-node=1,distance=0:31",
            ]),
            4,
            Some(1536 << 20),
            2 << 20,
        )
        .unwrap();
        assert_eq!(l.nodes[1].distances, vec![31, 10]);
        assert_eq!(l.nodes[0].distances, vec![10, 31], "mirrored");
        assert_eq!(l.node_of_cpu(3).unwrap().id, 1);
        let r = l.ram_ranges();
        assert_eq!((r[1].offset, r[1].len), (1 << 30, 512 << 20));
        let again = Layout::new(&l.specs(), 4, None, 2 << 20).unwrap();
        assert_eq!(again, l);
        assert!(l.guest_view().contains("node=1,cpus=2-3,memory=536870912B"));
    }

    #[test]
    fn refuses_layouts_that_do_not_add_up() {
        for (texts, vcpus, mem, want) in [
            (
                &["cpus=0,memory=1G", "cpus=0-1,memory=1G"][..],
                2,
                None,
                "vCPU 0 is in node 0 and node 1",
            ),
            (
                &["cpus=0,memory=1G"][..],
                2,
                None,
                "vCPU(s) 1 are in no node",
            ),
            (&["cpus=0-2,memory=1G"][..], 2, None, "the VM has 2 vCPU(s)"),
            (
                &["cpus=0-1,memory=1G"][..],
                2,
                Some(2 << 30),
                "adds up to 1024 MiB but --memory is 2048 MiB",
            ),
            (&["cpus=0-1"][..], 2, None, "no memory="),
            (&["cpus=0-1,memory=3M"][..], 2, None, "multiple of 2 MiB"),
            (
                &["node=1,cpus=0-1,memory=1G"][..],
                2,
                None,
                "node 0 is missing",
            ),
            (
                &["node=0,cpus=0,memory=1G", "node=0,cpus=1,memory=1G"][..],
                2,
                None,
                "given twice",
            ),
            (
                &[
                    "cpus=0,memory=1G,distance=1:20",
                    "cpus=1,memory=1G,distance=0:30",
                ][..],
                2,
                None,
                "must be symmetric",
            ),
            (
                &["cpus=0-1,memory=1G,distance=3:20"][..],
                2,
                None,
                "does not exist",
            ),
            (
                &["cpus=0,memory=1G,distance=1:5", "cpus=1,memory=1G"][..],
                2,
                None,
                "11-254",
            ),
        ] {
            let e = Layout::new(&specs(texts), vcpus, mem, 2 << 20)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{texts:?}: {e}");
        }
        let e = Layout::new(&specs(&["cpus=0,memory=1G"]), 1, None, 1 << 30);
        assert!(e.is_ok());
        let e = Layout::new(&specs(&["cpus=0,memory=1536M"]), 1, None, 1 << 30)
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 1024 MiB"), "{e}");
    }

    #[test]
    fn a_restored_guest_keeps_its_nodes_but_may_change_host_nodes() {
        let l = Layout::new(
            &specs(&[
                "cpus=0,memory=1G,host-node=0",
                "cpus=1,memory=1G,host-node=1",
            ]),
            2,
            None,
            2 << 20,
        )
        .unwrap();
        let m = l
            .remapped(&specs(&["node=0,host-node=1", "node=1,host-node=0"]))
            .unwrap();
        assert_eq!(m.nodes[0].host_node, Some(1));
        assert_eq!(m.guest_view(), l.guest_view());
        let e = l
            .remapped(&specs(&["node=1,memory=2G"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only host-node= may change"), "{e}");
        assert!(l.remapped(&specs(&["node=5,host-node=0"])).is_err());
    }
}
