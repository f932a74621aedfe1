//! The level configuration (a TOML file):
//!
//! ```toml
//! job = "lulesh.rank3"     # names this VM's checkpoints at every level
//! mtti_s = 86400           # mean time to interrupt (default for all levels)
//! full_every = 8           # a new full chain after this many layers
//! live = true              # live snapshots (pause only for the last pages)
//!
//! [[level]]                # the first level must be local: the VMM writes it
//! kind = "local"
//! dir = "/dev/shm/ffmk-ckpt"
//!
//! [[level]]
//! kind = "partner"
//! peer = "10.0.0.2:7070"   # the peer's `ffmk-vmm checkpoint serve`
//!
//! [[level]]
//! kind = "xor"
//! group = "rack7"
//! members = ["10.0.0.1:7070", "10.0.0.2:7070", "10.0.0.3:7070"]
//! index = 0                # this host's place in members
//!
//! [[level]]
//! kind = "burst-buffer"    # or "pfs"
//! dir = "/bb/ckpt"
//! keep = 2                 # chains kept at this level (default 2)
//! ```
use crate::{Error, Result};
use serde::Deserialize;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LevelKind {
    Local,
    Partner,
    Xor,
    BurstBuffer,
    Pfs,
}

impl LevelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LevelKind::Local => "local",
            LevelKind::Partner => "partner",
            LevelKind::Xor => "xor",
            LevelKind::BurstBuffer => "burst-buffer",
            LevelKind::Pfs => "pfs",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLevel {
    kind: LevelKind,
    name: Option<String>,
    dir: Option<PathBuf>,
    peer: Option<String>,
    group: Option<String>,
    members: Option<Vec<String>>,
    index: Option<usize>,
    keep: Option<usize>,
    mtti_s: Option<f64>,
    cost_s: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    job: String,
    mtti_s: Option<f64>,
    full_every: Option<u64>,
    live: Option<bool>,
    #[serde(default)]
    level: Vec<FileLevel>,
}

/// Where a level keeps its copies.
#[derive(Debug, Clone)]
pub enum Target {
    Dir(PathBuf),
    Partner(SocketAddr),
    Xor {
        group: String,
        members: Vec<SocketAddr>,
        index: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Level {
    /// Unique name (the kind unless configured, `kind-2` for a second one).
    pub name: String,
    pub kind: LevelKind,
    pub target: Target,
    pub keep: usize,
    /// Mean time to an interruption this level is there for (seconds).
    pub mtti_s: Option<f64>,
    /// Checkpoint cost at this level if not yet measured (seconds).
    pub cost_s: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub job: String,
    pub full_every: u64,
    pub live: bool,
    pub levels: Vec<Level>,
    /// How levels on other hosts are reached (not in the file: the
    /// command line's cluster key; none until [`Config::with_peers`]).
    pub peers: crate::wire::Peers,
}

/// `host:port` (an optional `tcp://` in front), resolved once.
pub fn parse_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    let bare = s.strip_prefix("tcp://").unwrap_or(s);
    bare.to_socket_addrs()
        .map_err(|e| format!("bad address '{s}': {e}"))?
        .next()
        .ok_or_else(|| format!("address '{s}' does not resolve"))
}

impl Config {
    /// This configuration, reaching other hosts' endpoints as `peers` says.
    pub fn with_peers(self, peers: crate::wire::Peers) -> Config {
        Config { peers, ..self }
    }

    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.into(),
            detail: format!("cannot read: {e}"),
        })?;
        Config::parse(&text).map_err(|detail| Error::Config {
            path: path.into(),
            detail,
        })
    }

    pub fn parse(text: &str) -> std::result::Result<Config, String> {
        let f: FileConfig = toml::from_str(text).map_err(|e| e.message().to_string())?;
        crate::check_name("job", &f.job).map_err(|e| e.to_string())?;
        let positive = |what: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => {
                Err(format!("{what} must be a positive number of seconds"))
            }
            _ => Ok(v),
        };
        let mtti = positive("mtti_s", f.mtti_s)?;
        let mut levels: Vec<Level> = Vec::new();
        for (i, l) in f.level.into_iter().enumerate() {
            let n = i + 1;
            let name = match l.name {
                Some(s) => s,
                None => {
                    let same = levels.iter().filter(|x| x.kind == l.kind).count();
                    if same == 0 {
                        l.kind.as_str().to_string()
                    } else {
                        format!("{}-{}", l.kind.as_str(), same + 1)
                    }
                }
            };
            crate::check_name("level", &name).map_err(|e| e.to_string())?;
            if levels.iter().any(|x| x.name == name) {
                return Err(format!("two levels are named '{name}'"));
            }
            let only = |allowed: &[&str]| -> std::result::Result<(), String> {
                let set = [
                    ("dir", l.dir.is_some()),
                    ("peer", l.peer.is_some()),
                    ("group", l.group.is_some()),
                    ("members", l.members.is_some()),
                    ("index", l.index.is_some()),
                ];
                for (key, present) in set {
                    if present && !allowed.contains(&key) {
                        return Err(format!(
                            "level {n} ({}): '{key}' does not apply to this kind",
                            l.kind.as_str()
                        ));
                    }
                }
                Ok(())
            };
            let target = match l.kind {
                LevelKind::Local | LevelKind::BurstBuffer | LevelKind::Pfs => {
                    only(&["dir"])?;
                    let dir = l.dir.clone().ok_or(format!(
                        "level {n} ({}) needs dir = \"...\"",
                        l.kind.as_str()
                    ))?;
                    Target::Dir(std::path::absolute(&dir).map_err(|e| e.to_string())?)
                }
                LevelKind::Partner => {
                    only(&["peer"])?;
                    let p = l
                        .peer
                        .as_deref()
                        .ok_or(format!("level {n} (partner) needs peer = \"HOST:PORT\""))?;
                    Target::Partner(parse_addr(p)?)
                }
                LevelKind::Xor => {
                    only(&["group", "members", "index"])?;
                    let group = l
                        .group
                        .clone()
                        .ok_or(format!("level {n} (xor) needs group = \"NAME\""))?;
                    crate::check_name("group", &group).map_err(|e| e.to_string())?;
                    let members = l
                        .members
                        .as_ref()
                        .ok_or(format!(
                            "level {n} (xor) needs members = [\"HOST:PORT\", ...]"
                        ))?
                        .iter()
                        .map(|m| parse_addr(m))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    if !(2..=64).contains(&members.len()) {
                        return Err(format!("level {n} (xor): a group has 2 to 64 members"));
                    }
                    for (a, m) in members.iter().enumerate() {
                        if members[..a].contains(m) {
                            return Err(format!("level {n} (xor): member {m} listed twice"));
                        }
                    }
                    let index = l.index.ok_or(format!(
                        "level {n} (xor) needs index = this host's place in members"
                    ))?;
                    if index >= members.len() {
                        return Err(format!(
                            "level {n} (xor): index {index} but only {} members",
                            members.len()
                        ));
                    }
                    Target::Xor {
                        group,
                        members,
                        index,
                    }
                }
            };
            if (i == 0) != (l.kind == LevelKind::Local) {
                return Err(
                    "the first level (and only the first) must be kind = \"local\": the VMM \
                     writes the checkpoint there, the other levels copy it"
                        .into(),
                );
            }
            let keep = l.keep.unwrap_or(2);
            if keep == 0 {
                return Err(format!("level {n}: keep must be at least 1"));
            }
            levels.push(Level {
                name,
                kind: l.kind,
                target,
                keep,
                mtti_s: positive("mtti_s", l.mtti_s)?.or(mtti),
                cost_s: positive("cost_s", l.cost_s)?,
            });
        }
        if levels.is_empty() {
            return Err("no [[level]]: at least a local one is needed".into());
        }
        let full_every = f.full_every.unwrap_or(8);
        if full_every == 0 {
            return Err("full_every must be at least 1".into());
        }
        Ok(Config {
            job: f.job,
            full_every,
            live: f.live.unwrap_or(true),
            levels,
            peers: crate::wire::Peers::none(),
        })
    }

    /// The local level's job directory (`DIR/JOB`).
    pub fn local_root(&self) -> PathBuf {
        match &self.levels[0].target {
            Target::Dir(d) => d.join(&self.job),
            _ => unreachable!("parse() makes the first level a local directory"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_configuration_parses() {
        let c = Config::parse(
            r#"
            job = "j1"
            mtti_s = 3600
            [[level]]
            kind = "local"
            dir = "/tmp/a"
            [[level]]
            kind = "partner"
            peer = "127.0.0.1:7070"
            [[level]]
            kind = "xor"
            group = "g"
            members = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
            index = 1
            [[level]]
            kind = "pfs"
            dir = "/tmp/p"
            keep = 3
            mtti_s = 100000
            "#,
        )
        .unwrap();
        assert_eq!(c.levels.len(), 4);
        assert_eq!(c.levels[3].keep, 3);
        assert_eq!(c.levels[1].mtti_s, Some(3600.0));
        assert_eq!(c.levels[3].mtti_s, Some(100000.0));
        assert_eq!(c.local_root(), Path::new("/tmp/a/j1"));
    }

    #[test]
    fn mistakes_get_one_clear_reason() {
        let cases = [
            ("job = \"../x\"\n[[level]]\nkind=\"local\"\ndir=\"/a\"", "bad job name"),
            ("job = \"j\"", "at least a local"),
            ("job=\"j\"\n[[level]]\nkind=\"pfs\"\ndir=\"/a\"", "must be kind = \"local\""),
            ("job=\"j\"\n[[level]]\nkind=\"local\"", "needs dir"),
            ("job=\"j\"\n[[level]]\nkind=\"local\"\ndir=\"/a\"\npeer=\"x:1\"", "does not apply"),
            (
                "job=\"j\"\n[[level]]\nkind=\"local\"\ndir=\"/a\"\n[[level]]\nkind=\"xor\"\ngroup=\"g\"\nmembers=[\"127.0.0.1:1\",\"127.0.0.1:2\"]\nindex=2",
                "index 2",
            ),
            ("job=\"j\"\n[[level]]\nkind=\"tape\"\ndir=\"/a\"", "unknown variant"),
            ("job=\"j\"\nmtti_s=-1\n[[level]]\nkind=\"local\"\ndir=\"/a\"", "positive"),
        ];
        for (text, want) in cases {
            let e = Config::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
