//! The runtime: one UDP endpoint per host, driving a [`Node`] for every
//! broadcast it takes part in.
//!
//! - A broadcast goes to a *group*: a name every host resolves the same way
//!   to the list of endpoint addresses, in rank order ([`Resolve`]; for
//!   ffmk-node a host list such as `node[03-07]`). A host not in the group
//!   ignores the message.
//! - A local client asks for one with an `originate` datagram (accepted
//!   only from this host's own addresses); the endpoint becomes its root.
//! - Sends are paced: at most one datagram per `gap` per broadcast. Tree
//!   children go first; a node informed by the tree starts correcting at
//!   the origin's start time plus the tree's failure-free completion time
//!   for the configured latency and gap (wall clocks: hosts should be
//!   NTP-synchronized; a skew costs messages or time, never a missed
//!   node).
//! - The first message of a broadcast delivers its payload (once); a
//!   broadcast is remembered for `linger` after its node finished, so late
//!   duplicates are not delivered again.
use crate::wire::{Message, What, MAX_PAYLOAD};
use crate::{Kind, Node, Tree};
use cluster_auth::datagram::{Opener, Sealer};
use cluster_auth::Secret;
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Group name -> endpoint addresses in rank order.
pub type Resolve = dyn Fn(&str) -> Result<Vec<SocketAddr>, String> + Send;

pub struct Config {
    /// This endpoint's address (as the groups list it).
    pub me: SocketAddr,
    pub tree: Tree,
    /// Pause between two sends of one broadcast.
    pub gap: Duration,
    /// One-way network latency the correction start is computed with.
    pub latency: Duration,
    /// How long a finished broadcast is remembered.
    pub linger: Duration,
}

/// A payload this endpoint delivered.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Delivery {
    pub id: u64,
    pub group: String,
    pub origin: u32,
    pub rank: u32,
    pub from: u32,
    pub via: Kind,
    pub payload: String,
    /// From the origin's send to this delivery (wall clocks).
    pub latency_us: f64,
}

/// What an endpoint did, for logs and tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub delivered: u64,
    pub sent_tree: u64,
    pub sent_correction: u64,
    pub received: u64,
    pub rejected: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("group {group}: {why}")]
    Group { group: String, why: String },
    #[error("group {group} has no host")]
    EmptyGroup { group: String },
    #[error("this host ({me}) is not in group {group}")]
    NotMember { me: SocketAddr, group: String },
    #[error("command of {0} bytes (at most {MAX_PAYLOAD})")]
    TooLong(usize),
    #[error("empty command")]
    Empty,
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

struct Active {
    node: Node,
    peers: Vec<SocketAddr>,
    msg: Message,
    /// Wall-clock ns when a tree-informed node starts correcting.
    correct_at: u64,
    /// Monotonic deadline of the next send.
    next: std::time::Instant,
    finished: Option<std::time::Instant>,
}

pub struct Endpoint {
    socket: UdpSocket,
    cfg: Config,
    resolve: Box<Resolve>,
    active: HashMap<u64, Active>,
    pub stats: Stats,
    /// With a cluster key: every datagram sealed and opened (integrity,
    /// replay protection; see `cluster_auth::datagram`).
    seal: Option<Seal>,
}

/// The channel name of broadcast datagrams.
pub const CHANNEL: &str = "broadcast";

struct Seal {
    sealer: Sealer,
    opener: Opener,
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Endpoint {
    pub fn bind(cfg: Config, resolve: Box<Resolve>) -> Result<Endpoint, Error> {
        let socket = UdpSocket::bind(cfg.me)?;
        Ok(Endpoint {
            socket,
            cfg,
            resolve,
            active: HashMap::new(),
            stats: Stats::default(),
            seal: None,
        })
    }

    /// Seals what it sends and opens only what was sealed with `cluster`
    /// (the cluster key); anything else is counted as rejected.
    pub fn with_key(mut self, cluster: &Secret) -> Result<Endpoint, Error> {
        self.seal = Some(Seal {
            sealer: Sealer::new(cluster, CHANNEL)
                .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))?,
            opener: Opener::new(cluster, CHANNEL),
        });
        Ok(self)
    }

    fn send(&mut self, b: &[u8], to: SocketAddr) {
        let _ = match self.seal.as_mut() {
            Some(s) => self.socket.send_to(&s.sealer.seal(b), to),
            None => self.socket.send_to(b, to),
        };
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The group's addresses and this endpoint's rank in it.
    fn members(&self, group: &str) -> Result<(Vec<SocketAddr>, u32), Error> {
        let peers = (self.resolve)(group).map_err(|why| Error::Group {
            group: group.into(),
            why,
        })?;
        if peers.is_empty() {
            return Err(Error::EmptyGroup {
                group: group.into(),
            });
        }
        let rank = peers
            .iter()
            .position(|a| *a == self.cfg.me)
            .ok_or_else(|| Error::NotMember {
                me: self.cfg.me,
                group: group.into(),
            })?;
        Ok((peers, rank as u32))
    }

    /// Checks what a client asks for before anything is sent: a
    /// non-empty command that fits, a group this host is in.
    pub fn check(&self, group: &str, payload: &str) -> Result<(), Error> {
        if payload.trim().is_empty() {
            return Err(Error::Empty);
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::TooLong(payload.len()));
        }
        self.members(group).map(|_| ())
    }

    /// Starts a broadcast of `payload` to `group` from here (this endpoint
    /// is its root and delivers it at once). Returns its id.
    pub fn originate(
        &mut self,
        group: &str,
        payload: &str,
        deliver: &mut dyn FnMut(Delivery),
    ) -> Result<u64, Error> {
        self.check(group, payload)?;
        let (peers, rank) = self.members(group)?;
        let id = rand::random::<u64>();
        let msg = Message {
            what: What::Relay(Kind::Tree),
            tree: self.cfg.tree,
            dir: None,
            id,
            origin: rank,
            n: peers.len() as u32,
            from: rank,
            sent_ns: now_ns(),
            group: group.into(),
            payload: payload.into(),
        };
        msg.encode()?;
        let mut node = Node::new(rank, msg.n, self.cfg.tree);
        node.originate();
        self.start(node, peers, msg, rank, Kind::Tree, deliver);
        Ok(id)
    }

    fn start(
        &mut self,
        node: Node,
        peers: Vec<SocketAddr>,
        msg: Message,
        from: u32,
        via: Kind,
        deliver: &mut dyn FnMut(Delivery),
    ) {
        let tree_end = self.cfg.tree.completion(
            msg.n,
            self.cfg.latency.as_secs_f64(),
            self.cfg.gap.as_secs_f64(),
        );
        let correct_at = msg.sent_ns + (tree_end * 1e9) as u64 + self.cfg.gap.as_nanos() as u64;
        self.stats.delivered += 1;
        deliver(Delivery {
            id: msg.id,
            group: msg.group.clone(),
            origin: msg.origin,
            rank: node.rank(),
            from,
            via,
            payload: msg.payload.clone(),
            latency_us: now_ns().saturating_sub(msg.sent_ns) as f64 / 1e3,
        });
        self.active.insert(
            msg.id,
            Active {
                node,
                peers,
                msg,
                correct_at,
                next: std::time::Instant::now(),
                finished: None,
            },
        );
    }

    /// Takes in one datagram from `src`.
    fn handle(&mut self, b: &[u8], src: SocketAddr, deliver: &mut dyn FnMut(Delivery)) {
        let m = match Message::decode(b) {
            Ok(m) => m,
            Err(_) => {
                self.stats.rejected += 1;
                return;
            }
        };
        match m.what {
            What::Originate => {
                // Only from this host: the control plane's own clients.
                if src.ip() != self.cfg.me.ip() && !src.ip().is_loopback() {
                    self.stats.rejected += 1;
                    return;
                }
                let answer = match self.originate(&m.group, &m.payload, deliver) {
                    Ok(id) => format!("ok {id:016x}"),
                    Err(e) => format!("error {e}"),
                };
                self.send(answer.as_bytes(), src);
            }
            What::Relay(kind) => {
                self.stats.received += 1;
                if let Some(a) = self.active.get_mut(&m.id) {
                    if m.n == a.msg.n && m.origin == a.msg.origin {
                        a.node.receive(m.from, m.origin, kind, m.dir);
                        // It may owe an answer: awake again.
                        if a.node.has_work() && a.finished.is_some() {
                            a.finished = None;
                            a.next = std::time::Instant::now();
                        }
                    }
                    return;
                }
                let Ok((peers, rank)) = self.members(&m.group) else {
                    self.stats.rejected += 1;
                    return;
                };
                // Everybody must see the same group.
                if peers.len() as u32 != m.n || peers.get(m.from as usize) != Some(&src) {
                    self.stats.rejected += 1;
                    return;
                }
                let mut node = Node::new(rank, m.n, m.tree);
                node.receive(m.from, m.origin, kind, m.dir);
                let from = m.from;
                self.start(node, peers, m, from, kind, deliver);
            }
        }
    }

    /// Sends what is due; returns when the next send is due (None: idle).
    fn send_due(&mut self) -> Option<std::time::Instant> {
        let now = std::time::Instant::now();
        let wall = now_ns();
        let mut earliest: Option<std::time::Instant> = None;
        let mut sends = Vec::new();
        let linger = self.cfg.linger;
        self.active
            .retain(|_, a| a.finished.is_none_or(|f| now.duration_since(f) < linger));
        for a in self.active.values_mut() {
            if a.finished.is_some() {
                continue;
            }
            if a.next <= now {
                let correcting = !a.node.by_tree() || wall >= a.correct_at;
                match a.node.next_send(correcting) {
                    Some(s) => {
                        let m = Message {
                            what: What::Relay(s.kind),
                            dir: s.dir,
                            from: a.node.rank(),
                            ..a.msg.clone()
                        };
                        if let (Ok(b), Some(dst)) = (m.encode(), a.peers.get(s.to as usize)) {
                            sends.push((b, *dst));
                        }
                        match s.kind {
                            Kind::Tree => self.stats.sent_tree += 1,
                            Kind::Correction => self.stats.sent_correction += 1,
                        }
                        a.next = now + self.cfg.gap;
                    }
                    None if a.node.finished() => a.finished = Some(now),
                    None => {
                        // Waiting for the tree phase to end.
                        let wait = a.correct_at.saturating_sub(wall);
                        a.next = now + Duration::from_nanos(wait);
                    }
                }
            }
            if a.finished.is_none() {
                earliest = Some(earliest.map_or(a.next, |e| e.min(a.next)));
            }
        }
        for (b, dst) in sends {
            self.send(&b, dst);
        }
        earliest
    }

    /// Serves until `stop` returns true (checked at least every 100 ms):
    /// receives, delivers through `deliver`, sends what is due.
    pub fn serve(
        &mut self,
        deliver: &mut dyn FnMut(Delivery),
        stop: &dyn Fn() -> bool,
    ) -> Result<(), Error> {
        let mut buf = vec![
            0u8;
            crate::wire::HEADER
                + crate::wire::MAX_GROUP
                + MAX_PAYLOAD
                + cluster_auth::datagram::OVERHEAD
                + 1
        ];
        while !stop() {
            let due = self.send_due();
            let wait = due
                .map(|d| d.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or(Duration::from_millis(100))
                .clamp(Duration::from_micros(50), Duration::from_millis(100));
            self.socket.set_read_timeout(Some(wait))?;
            match self.socket.recv_from(&mut buf) {
                Ok((len, src)) => match self.seal.as_mut() {
                    Some(s) => match s.opener.open(&buf[..len]) {
                        Ok(m) => self.handle(&m, src, deliver),
                        Err(_) => self.stats.rejected += 1,
                    },
                    None => self.handle(&buf[..len], src, deliver),
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                // ICMP port unreachable from a dead peer shows up here.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Asks the endpoint at `to` (on this host) to broadcast `payload` to
/// `group`; returns its answer ("ok ID" or "error ..."). With `cluster`
/// (the cluster key) the request and the answer are sealed.
pub fn request(
    to: SocketAddr,
    group: &str,
    payload: &str,
    timeout: Duration,
    cluster: Option<&Secret>,
) -> Result<String, Error> {
    let m = Message {
        what: What::Originate,
        tree: Tree::Interleaved,
        dir: None,
        id: 0,
        origin: 0,
        n: 0,
        from: 0,
        sent_ns: now_ns(),
        group: group.into(),
        payload: payload.into(),
    };
    let b = m.encode()?;
    // From this host's address on the same network as the endpoint
    // (it takes `originate` only from its own host).
    let bind: SocketAddr = if to.is_ipv4() {
        (to.ip(), 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 2048];
    let Some(key) = cluster else {
        s.send_to(&b, to)?;
        let (n, _) = s.recv_from(&mut buf)?;
        return Ok(String::from_utf8_lossy(&buf[..n]).into_owned());
    };
    let io = |e: cluster_auth::Error| Error::Io(std::io::Error::other(e.to_string()));
    s.send_to(&Sealer::new(key, CHANNEL).map_err(io)?.seal(&b), to)?;
    let mut opener = Opener::new(key, CHANNEL);
    loop {
        let (n, _) = s.recv_from(&mut buf)?;
        if let Ok(m) = opener.open(&buf[..n]) {
            return Ok(String::from_utf8_lossy(&m).into_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    /// `n` endpoints on loopback ports; the ones in `dead` never run.
    type Cluster = (
        Vec<SocketAddr>,
        Arc<Mutex<Vec<Delivery>>>,
        Arc<AtomicBool>,
        Vec<std::thread::JoinHandle<Stats>>,
    );

    fn cluster(n: usize, dead: &[usize], key: Option<&Secret>) -> Cluster {
        let sockets: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = sockets.iter().map(|s| s.local_addr().unwrap()).collect();
        drop(sockets);
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = vec![];
        for (i, me) in addrs.iter().enumerate() {
            if dead.contains(&i) {
                continue;
            }
            let peers = addrs.clone();
            let cfg = Config {
                me: *me,
                tree: Tree::Interleaved,
                gap: Duration::from_micros(200),
                latency: Duration::from_micros(100),
                linger: Duration::from_secs(5),
            };
            let resolve: Box<Resolve> = Box::new(move |g: &str| match g {
                "all" => Ok(peers.clone()),
                "none" => Ok(vec![]),
                other => Err(format!("unknown group {other}")),
            });
            let mut ep = Endpoint::bind(cfg, resolve).unwrap();
            if let Some(k) = key {
                ep = ep.with_key(k).unwrap();
            }
            let (got, stop) = (got.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut d = |x: Delivery| got.lock().unwrap().push(x);
                ep.serve(&mut d, &|| stop.load(Ordering::Relaxed)).unwrap();
                ep.stats.clone()
            }));
        }
        (addrs, got, stop, threads)
    }

    #[test]
    fn every_live_endpoint_delivers_once_despite_dead_ones() {
        // 3 (relative 3: odd subtree) and 2 (root of every 4th) are dead.
        // Sealed with a cluster key: requests without it, or with another
        // cluster's, get no answer and start nothing.
        let key = cluster_auth::key::generate().unwrap();
        let (addrs, got, stop, threads) = cluster(16, &[2, 3, 8], Some(&key));
        let quick = Duration::from_millis(300);
        assert!(request(addrs[0], "all", "echo forged", quick, None).is_err());
        let other = cluster_auth::key::generate().unwrap();
        assert!(request(addrs[0], "all", "echo forged", quick, Some(&other)).is_err());
        let answer = request(
            addrs[0],
            "all",
            "echo hello",
            Duration::from_secs(5),
            Some(&key),
        )
        .unwrap();
        assert!(answer.starts_with("ok "), "{answer}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap().len() < 13 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let stats: Vec<Stats> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let got = got.lock().unwrap();
        let mut ranks: Vec<u32> = got.iter().map(|d| d.rank).collect();
        ranks.sort();
        let live: Vec<u32> = (0..16).filter(|r| ![2, 3, 8].contains(r)).collect();
        assert_eq!(ranks, live, "each live rank exactly once");
        assert!(got
            .iter()
            .all(|d| d.payload == "echo hello" && d.origin == 0));
        assert!(
            got.iter().any(|d| d.via == Kind::Correction),
            "some only by correction"
        );
        let sent: u64 = stats.iter().map(|s| s.sent_tree + s.sent_correction).sum();
        assert!(sent < 16 * 12, "{sent} messages");
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let (addrs, got, stop, threads) = cluster(2, &[], None);
        let ask = |g: &str, p: &str| request(addrs[0], g, p, Duration::from_secs(5), None).unwrap();
        assert_eq!(ask("none", "echo x"), "error group none has no host");
        assert!(ask("nope", "echo x").contains("unknown group nope"));
        assert_eq!(ask("all", "  "), "error empty command");
        assert!(request(
            addrs[0],
            "all",
            &"x".repeat(MAX_PAYLOAD + 1),
            Duration::from_secs(1),
            None
        )
        .is_err());
        // Garbage is counted and dropped; the endpoint goes on.
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(b"FFBC\x09garbage", addrs[1]).unwrap();
        assert!(ask("all", "echo ok").starts_with("ok "));
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let stats: Vec<Stats> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(got.lock().unwrap().len(), 2);
        assert_eq!(stats[1].rejected, 1);
    }
}
