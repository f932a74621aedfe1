//! Control commands for many hosts at once, spread by the fault-tolerant
//! broadcast of crate `broadcast` (corrected trees over UDP).
//!
//! `ffmk-node broadcast [--group HOSTS] COMMAND` hands the command to the
//! local daemon's broadcast endpoint, which becomes the root of a
//! broadcast to the group (a host list such as `node[03-07]`, or `all`:
//! the cluster's whole list). Every live daemon in the group runs it once:
//!
//! - `echo TEXT`: nothing but the log line (to test the plumbing);
//! - `pause VM-GLOB` / `resume VM-GLOB`: pause or resume the local VMs
//!   whose names match (`*` and `?`), e.g. all VMs of job 7 (`job7-*`);
//! - `drain HOST-GLOB` / `undrain HOST-GLOB`: a daemon whose own host name
//!   matches announces itself as draining (takes no VMs) or stops doing so.
//!
//! Each delivery is logged (`broadcast` event: id, origin, how it came,
//! latency from the origin's send, what was done).
use super::{lock, Daemon};
use broadcast::udp::{Config as EndpointConfig, Delivery, Endpoint, Resolve};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A command every daemon of a group runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Echo(String),
    Pause(String),
    Resume(String),
    Drain(String),
    Undrain(String),
}

pub const USAGE: &str =
    "echo TEXT | pause VM-GLOB | resume VM-GLOB | drain HOST-GLOB | undrain HOST-GLOB";

impl std::str::FromStr for Command {
    type Err = String;
    fn from_str(s: &str) -> Result<Command, String> {
        let s = s.trim();
        let (verb, arg) = s.split_once(char::is_whitespace).unwrap_or((s, ""));
        let arg = arg.trim().to_string();
        let need = |c: fn(String) -> Command| {
            if arg.is_empty() || arg.contains(char::is_whitespace) {
                Err(format!("{verb} takes one pattern ({USAGE})"))
            } else {
                Ok(c(arg.clone()))
            }
        };
        match verb {
            "echo" => Ok(Command::Echo(arg.clone())),
            "pause" => need(Command::Pause),
            "resume" => need(Command::Resume),
            "drain" => need(Command::Drain),
            "undrain" => need(Command::Undrain),
            "" => Err(format!("no command ({USAGE})")),
            other => Err(format!("unknown command {other:?} ({USAGE})")),
        }
    }
}

/// `*` matches any run of characters, `?` any one.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// Group -> broadcast endpoints in rank order: `all`, or a host list
/// whose every host is in the cluster's list.
pub fn resolver(names: Vec<String>, addrs: Vec<SocketAddr>) -> Box<Resolve> {
    Box::new(move |group: &str| {
        let hosts = if group == "all" {
            names.clone()
        } else {
            balance::hostlist::expand(group).map_err(|e| e.to_string())?
        };
        hosts
            .iter()
            .map(|h| {
                names
                    .iter()
                    .position(|n| n == h)
                    .map(|i| addrs[i])
                    .ok_or_else(|| format!("{h} is not in the cluster's host list"))
            })
            .collect()
    })
}

/// The broadcast endpoint addresses of every host (gossip IP, broadcast
/// port).
pub fn addresses(d: &Daemon) -> Vec<SocketAddr> {
    d.r.gossip
        .iter()
        .map(|g| SocketAddr::new(g.ip(), d.r.config.broadcast_port))
        .collect()
}

/// Binds this host's endpoint and serves it on its own thread.
pub fn spawn(d: &Arc<Daemon>) -> Result<(), super::Error> {
    let addrs = addresses(d);
    let me = addrs[d.r.slot];
    let c = &d.r.config;
    let cfg = EndpointConfig {
        me,
        tree: broadcast::Tree::Interleaved,
        gap: Duration::from_micros(c.broadcast_gap_us),
        latency: Duration::from_micros(c.broadcast_latency_us),
        linger: Duration::from_secs(60),
    };
    let mut ep = Endpoint::bind(cfg, resolver(d.r.names.clone(), addrs))
        .map_err(|e| super::Error::Broadcast(me, e.to_string()))?;
    if let cluster_auth::Trust::Key(k) = &d.plane.trust {
        let cluster = k
            .cluster()
            .map_err(|e| super::Error::Broadcast(me, e.to_string()))?;
        ep = ep
            .with_key(cluster)
            .map_err(|e| super::Error::Broadcast(me, e.to_string()))?;
    }
    let d = d.clone();
    std::thread::Builder::new()
        .name("broadcast".into())
        .spawn(move || {
            let d2 = d.clone();
            let mut deliver = move |x: Delivery| delivered(&d2, x);
            if let Err(e) = ep.serve(&mut deliver, &|| d.stop.load(Ordering::Acquire)) {
                d.log.event(
                    "broadcast-error",
                    serde_json::json!({"error": e.to_string()}),
                );
            }
        })
        .map_err(super::Error::Thread)?;
    Ok(())
}

/// Logs a delivery and runs its command (on a thread of its own: VM API
/// calls must not hold up the endpoint).
fn delivered(d: &Arc<Daemon>, x: Delivery) {
    let d = d.clone();
    let _ = std::thread::Builder::new()
        .name("broadcast-cmd".into())
        .spawn(move || {
            let origin =
                d.r.names
                    .get(x.origin as usize)
                    .cloned()
                    .unwrap_or_default();
            let result = match x.payload.parse::<Command>() {
                Ok(c) => run(&d, &c),
                Err(e) => format!("refused: {e}"),
            };
            let id = format!("{:016x}", x.id);
            {
                let mut kept = super::lock(&d.broadcasts);
                if kept.len() == super::BROADCASTS_KEPT {
                    kept.pop_front();
                }
                kept.push_back(serde_json::json!({
                    "id": id, "command": x.payload, "result": result,
                }));
            }
            d.log.event(
                "broadcast",
                serde_json::json!({
                    "id": id, "group": x.group, "origin": origin,
                    "rank": x.rank, "via": x.via, "from": x.from,
                    "latency_us": x.latency_us, "command": x.payload, "result": result,
                }),
            );
        });
}

fn run(d: &Daemon, c: &Command) -> String {
    match c {
        Command::Echo(_) => "ok".into(),
        Command::Pause(g) | Command::Resume(g) => {
            let pause = matches!(c, Command::Pause(_));
            let verb = if pause { "paused" } else { "resumed" };
            // The VMs there now (the sampler's last look may have missed
            // one whose VMM was busy, e.g. writing a job's snapshot).
            // A VM in a job checkpoint's cut: its snapshot (which keeps
            // its VMM's API busy) pauses and resumes it.
            let mut done = lock(&d.jobs).cut_signals(g, pause, &glob);
            let mut skip = d.incoming_names();
            skip.extend(done.iter().cloned());
            let (vms, errors) =
                crate::vms::discover_matching(&d.r.config.vm_dir, &skip, &|n| glob(g, n));
            let vms: Vec<(String, std::path::PathBuf)> =
                vms.into_iter().map(|v| (v.name, v.sock)).collect();
            let mut failed: Vec<String> = errors
                .into_iter()
                .map(|(n, e)| format!("{n}: does not answer: {e}"))
                .collect();
            for (name, sock) in vms {
                let api = crate::vms::api(&sock, Duration::from_secs(5));
                match if pause { api.pause() } else { api.resume() } {
                    Ok(_) => {
                        let mut j = lock(&d.jobs);
                        if pause {
                            j.note_paused(&name);
                        } else {
                            j.note_resumed(&name);
                        }
                        done.push(name)
                    }
                    Err(e) => failed.push(match e.status() {
                        Some(st) => format!("{name}: {st} {}", e.message()),
                        None => format!("{name}: {e}"),
                    }),
                }
            }
            let mut out = format!("{verb} [{}]", done.join(","));
            if !failed.is_empty() {
                out.push_str(&format!("; failed: {}", failed.join("; ")));
            }
            out
        }
        Command::Drain(g) | Command::Undrain(g) => {
            if !glob(g, d.me()) {
                return "not this host".into();
            }
            let on = matches!(c, Command::Drain(_));
            d.drained.store(on, Ordering::Release);
            if on { "draining" } else { "taking VMs again" }.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_or_say_why_not() {
        assert_eq!("pause job7-*".parse(), Ok(Command::Pause("job7-*".into())));
        assert_eq!(
            "echo hello world".parse(),
            Ok(Command::Echo("hello world".into()))
        );
        assert_eq!(
            " drain node07 ".parse(),
            Ok(Command::Drain("node07".into()))
        );
        assert!("reboot all"
            .parse::<Command>()
            .unwrap_err()
            .contains("unknown command"));
        assert!("pause"
            .parse::<Command>()
            .unwrap_err()
            .contains("one pattern"));
        assert!("pause a b"
            .parse::<Command>()
            .unwrap_err()
            .contains("one pattern"));
        assert!("".parse::<Command>().unwrap_err().contains("no command"));
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob("job7-*", "job7-rank3"));
        assert!(!glob("job7-*", "job70-rank3"));
        assert!(glob("*", ""));
        assert!(glob("node0?", "node07"));
        assert!(!glob("node0?", "node17"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
    }

    #[test]
    fn groups_resolve_within_the_cluster_only() {
        let names: Vec<String> = (1..=4).map(|i| format!("node{i:02}")).collect();
        let addrs: Vec<SocketAddr> = (1..=4)
            .map(|i| format!("10.0.0.{i}:7402").parse().unwrap())
            .collect();
        let r = resolver(names, addrs.clone());
        assert_eq!(r("all").unwrap(), addrs);
        assert_eq!(r("node[02-03]").unwrap(), addrs[1..3].to_vec());
        assert!(r("node[04-05]")
            .unwrap_err()
            .contains("node05 is not in the cluster's host list"));
        assert!(r("node[").is_err());
    }
}
