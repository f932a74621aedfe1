//! `ffmk-node run`: the per-host balancing daemon.
//!
//! Threads: the main loop (one gossip period per turn: find the local VMs,
//! check health, refresh and gossip the own board entry, decide), a gossip
//! receiver (UDP), a load sampler (/proc, ten times a period), the control
//! service (TCP: peers hand VMs over, operators ask for status) and at
//! most one outgoing migration at a time.
//!
//! A move: the overloaded host's policy picks a VM and a neighbour
//! ([`policy::decide`]); it asks that neighbour's daemon to `prepare`
//! (the receiver re-checks health, memory and its own load, then starts
//! `ffmk-vmm run --incoming` and answers with its address); then it asks
//! the VM's VMM to migrate there (`PUT /vm/migrate`) and follows `GET
//! /vm/migration` to the end. A refusal or failure leaves the VM where it
//! was (the VMM guarantees that), tells the receiver to `abort`, and backs
//! off from that host. Every decision and step goes to the JSON log.
pub mod arriving;
pub mod bcast;
pub mod config;
pub mod control;
pub mod follow;
pub mod job;
pub mod policy;
pub mod vms;

use balance::gossip::wire::{self, Health, NodeInfo};
use balance::gossip::{Board, Sent};
use config::Resolved;
use control::{Reply, Request};
use policy::{Decision, HostView, PolicyParams, VmView};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vmm_api::model::{MigrateRequest, MigrationStatus, State};
use vms::LocalVm;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind the gossip socket {0}: {1}")]
    Gossip(SocketAddr, std::io::Error),
    #[error("cannot listen for control requests on {0}: {1}")]
    Control(SocketAddr, std::io::Error),
    #[error("cannot open the log {0}: {1}")]
    Log(PathBuf, std::io::Error),
    #[error("VM directory {0}: {1}")]
    VmDir(PathBuf, std::io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot start the broadcast endpoint on {0}: {1}")]
    Broadcast(SocketAddr, String),
    #[error("cluster key: {0}")]
    Plane(String),
    #[error("cannot serve metrics on metrics_listen = {0:?}: {1}")]
    Metrics(String, std::io::Error),
}

/// The JSON decision log: one object per line, with time and host.
pub struct Log {
    host: String,
    file: Option<Mutex<std::fs::File>>,
}

impl Log {
    fn open(host: &str, path: Option<&Path>) -> Result<Log, Error> {
        let file = match path {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| Error::Log(p.into(), e))?,
            )),
            None => None,
        };
        Ok(Log {
            host: host.into(),
            file,
        })
    }

    pub fn event(&self, event: &str, fields: serde_json::Value) {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut v = serde_json::json!({"t": t, "host": self.host, "event": event});
        if let (Some(o), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
            o.extend(f);
        }
        let line = v.to_string();
        match &self.file {
            Some(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = writeln!(f, "{line}");
                }
            }
            None => eprintln!("{line}"),
        }
    }
}

/// A VMM this daemon started to receive a VM.
struct Incoming {
    /// None while its VMM is being started.
    pid: Option<u32>,
    /// What the peer that asked for it must show to abort it.
    token: String,
    from: usize,
    since: Instant,
    to: String,
    /// Functions of the VF pool promised to it.
    devices: Vec<String>,
}

/// Whether the VMM waiting for `name` has a peer's authenticated
/// migration under way (its log says so).
fn incoming_in_use(vm_dir: &std::path::Path, name: &str) -> bool {
    std::fs::read_to_string(vm_dir.join(format!("{name}.vmm.log")))
        .is_ok_and(|t| t.contains("authenticated, receiving"))
}

/// The pool functions that no local VM has and no arriving one was
/// promised.
fn free_functions(pool: &[String], l: &Local) -> Vec<String> {
    let taken: std::collections::HashSet<&str> = l
        .vms
        .iter()
        .flat_map(|v| v.passthrough.iter())
        .chain(l.incoming.values().flat_map(|i| i.devices.iter()))
        .map(String::as_str)
        .collect();
    pool.iter()
        .filter(|f| !taken.contains(f.as_str()))
        .cloned()
        .collect()
}

/// What the daemon knows about its own host.
#[derive(Default)]
struct Local {
    vms: Vec<LocalVm>,
    /// Sockets that did not answer (name, why).
    errors: Vec<(String, String)>,
    /// VMs that arrived here, and when (they settle before moving on).
    arrived: HashMap<String, Instant>,
    incoming: HashMap<String, Incoming>,
    info: NodeInfo,
    health_why: Vec<String>,
    /// VMMs this daemon started (receiving VMMs, restored VMs), reaped
    /// when they end.
    children: Vec<(String, std::process::Child)>,
    /// How VMs ended here (their VMM's exit status), and where VMs this
    /// daemon moved went: what `vm-watch` tells a Slurm task following its
    /// VM (`ffmk-node slurm-vm`).
    ended: HashMap<String, (i32, Instant)>,
    moved: HashMap<String, (usize, Instant)>,
}

/// What `ended` and `moved` remember, at most.
const FATES_KEPT: usize = 1024;

impl Local {
    /// Kills a VMM this daemon started and waits for it to be gone (its
    /// API socket free for the next VMM of the name).
    fn stop(&mut self, pid: Option<u32>) {
        kill(pid);
        let Some(pid) = pid else { return };
        if let Some(i) = self.children.iter().position(|(_, c)| c.id() == pid) {
            let (name, mut child) = self.children.swap_remove(i);
            if let Ok(st) = child.wait() {
                use std::os::unix::process::ExitStatusExt;
                let code = st.code().unwrap_or(128 + st.signal().unwrap_or(0));
                self.ended.insert(name, (code, Instant::now()));
            }
        }
    }

    /// Reaps the VMMs this daemon started that have ended.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.children.len() {
            match self.children[i].1.try_wait() {
                Ok(Some(st)) => {
                    use std::os::unix::process::ExitStatusExt;
                    let code = st.code().unwrap_or(128 + st.signal().unwrap_or(0));
                    let (name, _) = self.children.swap_remove(i);
                    self.ended.insert(name, (code, now));
                }
                Ok(None) => i += 1,
                Err(_) => {
                    self.children.swap_remove(i);
                }
            }
        }
        for m in [&mut self.ended as &mut dyn Forget, &mut self.moved] {
            m.forget_oldest(FATES_KEPT);
        }
    }
}

/// A map of names to what happened to them and when, kept short.
trait Forget {
    fn forget_oldest(&mut self, keep: usize);
}

impl<T> Forget for HashMap<String, (T, Instant)> {
    fn forget_oldest(&mut self, keep: usize) {
        while self.len() > keep {
            let Some(oldest) = self
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(n, _)| n.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
    }
}

#[derive(Default)]
struct Limits {
    last_start: Option<Instant>,
    /// slot -> (no moves there before, current back-off)
    backoff: HashMap<usize, (Instant, Duration)>,
    /// The VM being migrated out.
    outgoing: Option<(String, usize)>,
}

pub struct Daemon {
    r: Resolved,
    start: Instant,
    incarnation: u32,
    board: Mutex<Board<NodeInfo>>,
    local: Mutex<Local>,
    limits: Mutex<Limits>,
    log: Log,
    stop: AtomicBool,
    /// Draining (takes no VMs): from the config, or a `drain` broadcast.
    drained: AtomicBool,
    /// On the coordinator's host: the checkpoint coordinator.
    ckpt: Mutex<Option<balance::ckpt::Coordinator>>,
    /// The cluster key (or not), for every channel to other hosts.
    plane: config::Plane,
    /// Seals this daemon's gossip datagrams (None: --insecure).
    gossip_seal: Mutex<Option<cluster_auth::datagram::Sealer>>,
    /// The last broadcasts delivered here, newest last (in `status`, so
    /// that `ffmk-node broadcast` can count who ran its command).
    broadcasts: Mutex<std::collections::VecDeque<serde_json::Value>>,
    /// VMs held by job checkpoints, VMs started by job restores.
    jobs: Mutex<job::Jobs>,
}

/// How many delivered broadcasts a daemon remembers.
const BROADCASTS_KEPT: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0 / self.r.config.period_ms as f64
    }

    fn period(&self) -> Duration {
        Duration::from_millis(self.r.config.period_ms)
    }

    fn me(&self) -> &str {
        &self.r.names[self.r.slot]
    }

    /// The VMs this host is receiving (their VMMs wait for them).
    fn incoming_names(&self) -> Vec<String> {
        lock(&self.local).incoming.keys().cloned().collect()
    }

    fn params(&self) -> PolicyParams {
        let c = &self.r.config;
        PolicyParams {
            threshold: c.threshold,
            dead_after: c.dead_after,
            reserve_mib: c.reserve_mib,
        }
    }
}

/// Runs the daemon until the process is killed.
pub fn run(r: Resolved, plane: config::Plane) -> Result<(), Error> {
    std::fs::create_dir_all(&r.config.vm_dir)
        .map_err(|e| Error::VmDir(r.config.vm_dir.clone(), e))?;
    let log = Log::open(&r.names[r.slot], r.config.log.as_deref())?;
    let gossip_addr = r.gossip[r.slot];
    let udp = UdpSocket::bind(gossip_addr).map_err(|e| Error::Gossip(gossip_addr, e))?;
    let control_addr = r.control[r.slot];
    let tcp = TcpListener::bind(control_addr).map_err(|e| Error::Control(control_addr, e))?;
    let metrics = match &r.config.metrics_listen {
        Some(a) => Some(TcpListener::bind(a).map_err(|e| Error::Metrics(a.clone(), e))?),
        None => None,
    };
    // Seconds since the epoch: a restarted daemon's entry is newer than
    // anything its previous life said.
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(1);
    let r_drain = r.config.drain;
    let ckpt = (r.ckpt_coordinator() == r.slot).then(|| {
        balance::ckpt::Coordinator::new(
            r.config
                .ckpt_policy
                .parse()
                .unwrap_or(balance::ckpt::Policy::Exclusive),
            Duration::from_secs_f64(r.config.ckpt_max_delay_s),
            Duration::from_secs_f64(r.config.ckpt_lease_s),
        )
    });
    let gossip_seal = match &plane.trust {
        cluster_auth::Trust::Key(k) => Some(
            k.cluster()
                .and_then(|c| cluster_auth::datagram::Sealer::new(c, "gossip"))
                .map_err(|e| Error::Plane(e.to_string()))?,
        ),
        cluster_auth::Trust::Insecure => None,
    };
    let d = Arc::new(Daemon {
        board: Mutex::new(Board::new(r.names.len(), Some(r.slot), r.window)),
        plane,
        gossip_seal: Mutex::new(gossip_seal),
        r,
        start: Instant::now(),
        incarnation,
        local: Mutex::new(Local::default()),
        limits: Mutex::new(Limits::default()),
        log,
        stop: AtomicBool::new(false),
        drained: AtomicBool::new(r_drain),
        ckpt: Mutex::new(ckpt),
        broadcasts: Mutex::new(std::collections::VecDeque::new()),
        jobs: Mutex::new(job::Jobs::default()),
    });
    d.log.event(
        "start",
        serde_json::json!({
            "slot": d.r.slot, "hosts": d.r.names.len(), "incarnation": incarnation,
            "gossip": gossip_addr.to_string(), "control": control_addr.to_string(),
            "cores": d.r.cores, "window": d.r.window.to_string(),
            "cluster_plane": if d.plane.trust.is_insecure() { "insecure (--insecure: anyone who reaches these ports can drive this daemon)" } else { "cluster key" },
        }),
    );
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(Error::Thread)
    };
    let recv_udp = udp.try_clone().map_err(|e| Error::Gossip(gossip_addr, e))?;
    let (d1, d2, d3) = (d.clone(), d.clone(), d.clone());
    spawn(
        "gossip-recv",
        Box::new(move || gossip_receiver(&d1, recv_udp)),
    )?;
    spawn("control", Box::new(move || control_service(&d2, tcp)))?;
    if let Some(l) = metrics {
        let dm = d.clone();
        spawn("metrics", Box::new(move || metrics::serve(&dm, l)))?;
    }
    bcast::spawn(&d)?;
    let sampled: Arc<Mutex<vms::Sampler>> = Arc::default();
    let s2 = sampled.clone();
    spawn("sampler", Box::new(move || sampler(&d3, &s2)))?;
    main_loop(&d, &udp, &sampled);
    Ok(())
}

fn main_loop(d: &Arc<Daemon>, udp: &UdpSocket, sampled: &Mutex<vms::Sampler>) {
    let seed =
        d.r.config
            .seed
            .unwrap_or(u64::from(d.incarnation) ^ ((d.r.slot as u64) << 32));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Each node gossips at its own phase within the period.
    std::thread::sleep(d.period().mul_f64(rng.gen_range(0.0..1.0)));
    let mut last_decision = String::new();
    let mut out = Vec::new();
    let mut next = Instant::now();
    while !d.stop.load(Ordering::Acquire) {
        refresh_local(d, &mut lock(sampled));
        let info = lock(&d.local).info;
        let now = d.now();
        {
            let mut b = lock(&d.board);
            b.refresh(now, d.incarnation, info);
            out.clear();
            b.select(now, &mut out);
        }
        send_gossip(d, udp, &out, &mut rng);
        balance_step(d, &mut last_decision);
        next += d.period();
        let wait = next.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            next = Instant::now();
        }
        std::thread::sleep(wait);
    }
}

/// Sends the selected entries to one other node chosen uniformly at
/// random (in datagrams of at most [`wire::MAX_ENTRIES`] entries).
fn send_gossip(
    d: &Daemon,
    udp: &UdpSocket,
    out: &[Sent<NodeInfo>],
    rng: &mut rand_chacha::ChaCha8Rng,
) {
    let n = d.r.names.len();
    if n < 2 {
        return;
    }
    let mut peer = rng.gen_range(0..n - 1);
    if peer >= d.r.slot {
        peer += 1;
    }
    let mut seal = lock(&d.gossip_seal);
    for chunk in out.chunks(wire::MAX_ENTRIES) {
        let mut msg = wire::encode(d.r.slot as u32, d.incarnation, chunk);
        if let Some(s) = seal.as_mut() {
            msg = s.seal(&msg);
        }
        // A dead peer is what gossip tolerates: errors are not fatal.
        let _ = udp.send_to(&msg, d.r.gossip[peer]);
    }
}

/// Merges one gossip datagram from a peer into `board` (this host is slot
/// `me`): a datagram that does not decode, or that claims to come from this
/// host or from a slot the board does not have, is refused with the reason;
/// entries for slots the board does not have are dropped.
pub fn take_gossip(
    board: &mut Board<NodeInfo>,
    me: usize,
    now: balance::gossip::Time,
    datagram: &[u8],
) -> Result<(), String> {
    let m = wire::decode(datagram).map_err(|e| e.to_string())?;
    let slots = board.entries().len();
    if m.sender as usize >= slots || m.sender as usize == me {
        return Err(format!("sender slot {}", m.sender));
    }
    let entries: Vec<Sent<NodeInfo>> = m
        .entries
        .into_iter()
        .filter(|e| (e.slot as usize) < slots)
        .collect();
    board.merge(now, 0.0, &entries, |_, _, _| {});
    Ok(())
}

fn gossip_receiver(d: &Daemon, udp: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    let mut bad = 0u64;
    let mut opener = match &d.plane.trust {
        cluster_auth::Trust::Key(k) => k
            .cluster()
            .ok()
            .map(|c| cluster_auth::datagram::Opener::new(c, "gossip")),
        cluster_auth::Trust::Insecure => None,
    };
    loop {
        let Ok((len, from)) = udp.recv_from(&mut buf) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let now = d.now();
        let taken = match opener.as_mut() {
            Some(o) => o
                .open(&buf[..len])
                .map_err(|e| format!("refused: {e}"))
                .and_then(|m| take_gossip(&mut lock(&d.board), d.r.slot, now, &m)),
            None => take_gossip(&mut lock(&d.board), d.r.slot, now, &buf[..len]),
        };
        if let Err(why) = taken {
            bad += 1;
            if bad.is_power_of_two() {
                d.log.event(
                    "gossip-rejected",
                    serde_json::json!({"from": from.to_string(), "why": why, "count": bad}),
                );
            }
        }
    }
}

fn sampler(d: &Daemon, sampled: &Mutex<vms::Sampler>) {
    let every = (d.period() / 10).max(Duration::from_millis(20));
    loop {
        let targets: Vec<(String, u32, Vec<i32>)> = lock(&d.local)
            .vms
            .iter()
            .map(|v| (v.name.clone(), v.pid, v.vcpu_tids.clone()))
            .collect();
        lock(sampled).sample(&targets);
        std::thread::sleep(every);
    }
}

/// Finds the local VMs, takes their sampled load, notices arrivals,
/// checks health, and fills in this host's board entry.
fn refresh_local(d: &Daemon, sampled: &mut vms::Sampler) {
    let dir = &d.r.config.vm_dir;
    let incoming: Vec<String> = lock(&d.local).incoming.keys().cloned().collect();
    let outgoing: Vec<String> = lock(&d.limits)
        .outgoing
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    // An incoming VMM binds its API socket but answers only once the VM
    // has arrived: those sockets get a short look until then. The VM
    // migrating out keeps its last description.
    let (mut found, errors) = vms::discover(dir, &incoming, &outgoing);
    found.extend(
        lock(&d.local)
            .vms
            .iter()
            .filter(|v| outgoing.contains(&v.name))
            .cloned(),
    );
    let loads = sampled.take();
    for v in found.iter_mut() {
        v.load = loads
            .get(&v.name)
            .copied()
            .unwrap_or(v.vcpu_tids.len() as f64);
    }
    let mut health_why = Vec::new();
    if std::fs::File::open("/dev/kvm").is_err() {
        health_why.push("cannot open /dev/kvm".to_string());
    }
    let free = vms::free_mib().unwrap_or(0);
    if free < d.r.config.reserve_mib {
        health_why.push(format!(
            "{free} MiB free, below the reserve of {}",
            d.r.config.reserve_mib
        ));
    }
    let mut l = lock(&d.local);
    l.reap();
    for name in &incoming {
        if let Some(vm) = found
            .iter()
            .find(|v| &v.name == name && v.state == State::Running)
        {
            if let Some(inc) = l.incoming.remove(name) {
                d.log.event(
                    "arrived",
                    serde_json::json!({"vm": vm.name, "from": inc.from, "after_s": inc.since.elapsed().as_secs_f64()}),
                );
            }
            l.arrived.insert(name.clone(), Instant::now());
        }
    }
    // An incoming VMM that waited too long is stopped; so is one whose
    // peer never started the migration (a reservation nobody uses must
    // not hold this host's only incoming slot).
    let timeout = Duration::from_secs_f64(d.r.config.migration_timeout_s);
    let unused = Duration::from_secs_f64(d.r.config.incoming_unused_s);
    let vm_dir = d.r.config.vm_dir.clone();
    let stale: Vec<(String, &'static str)> = l
        .incoming
        .iter()
        .filter_map(|(n, i)| {
            let age = i.since.elapsed();
            if age > timeout {
                Some((n.clone(), "incoming-timeout"))
            } else if i.pid.is_some() && age > unused && !incoming_in_use(&vm_dir, n) {
                Some((n.clone(), "incoming-unused"))
            } else {
                None
            }
        })
        .collect();
    for (n, why) in stale {
        if let Some(i) = l.incoming.remove(&n) {
            l.stop(i.pid);
            d.log.event(
                why,
                serde_json::json!({"vm": n, "from": i.from, "listening": i.to}),
            );
        }
    }
    let health = if !health_why.is_empty() {
        Health::Degraded
    } else if d.drained.load(Ordering::Acquire) {
        Health::Draining
    } else {
        Health::Ok
    };
    if health_why != l.health_why {
        d.log.event(
            "health",
            serde_json::json!({"health": health, "why": health_why}),
        );
    }
    l.info = NodeInfo {
        // (+ 0.0: an empty float sum is -0.0.)
        load: (found.iter().map(|v| v.load).sum::<f64>() + 0.0) as f32,
        free_mib: free.min(u64::from(u32::MAX)) as u32,
        vms: found.len() as u32,
        health,
        cores: d.r.cores,
    };
    l.vms = found;
    l.errors = errors;
    l.health_why = health_why;
}

/// Kills a VMM this daemon started (nothing while it is being started:
/// never pid 0, which would mean the daemon's own process group).
fn kill(pid: Option<u32>) {
    let Some(pid) = pid.filter(|p| *p > 0) else {
        return;
    };
    // SAFETY: kill(2) on a positive pid this daemon started; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The neighbourhood as the board shows it now.
fn views(d: &Daemon) -> (HostView, Vec<HostView>) {
    let now = d.now();
    let b = lock(&d.board);
    let view = |slot: usize| {
        let e = b.entry(slot);
        HostView {
            slot,
            load: e.map(|e| f64::from(e.info.load)).unwrap_or(0.0),
            cores: e.map(|e| e.info.cores).unwrap_or(1),
            free_mib: e.map(|e| u64::from(e.info.free_mib)).unwrap_or(0),
            health: e.map(|e| e.info.health).unwrap_or_default(),
            age: b.age(slot, now).unwrap_or(f64::INFINITY),
        }
    };
    let hood = policy::neighbours(d.r.slot, d.r.names.len(), d.r.config.neighbours)
        .into_iter()
        .map(view)
        .collect();
    (view(d.r.slot), hood)
}

fn balance_step(d: &Arc<Daemon>, last: &mut String) {
    let c = &d.r.config;
    {
        let l = lock(&d.limits);
        if l.outgoing.is_some() {
            return;
        }
        if let Some(t) = l.last_start {
            if t.elapsed().as_secs_f64() < c.min_interval_s {
                return;
            }
        }
    }
    let (me, mut hood) = views(d);
    // Until the board has had time to hear from every live neighbour, a
    // decision would rest on part of the picture.
    if d.now() < c.dead_after {
        let reason = "warming up: the board is not complete yet".to_string();
        if *last != reason {
            d.log.event(
                "decision",
                serde_json::json!({"decision": "stay", "reason": reason, "load": me.load}),
            );
            *last = reason;
        }
        return;
    }
    {
        let l = lock(&d.limits);
        // Hosts we back off from are left out of the neighbourhood.
        hood.retain(|h| {
            l.backoff
                .get(&h.slot)
                .is_none_or(|(until, _)| Instant::now() >= *until)
        });
    }
    let vms: Vec<(VmView, LocalVm)> = {
        let jobs = lock(&d.jobs);
        let l = lock(&d.local);
        l.vms
            .iter()
            .map(|v| {
                let held = if let Some(why) = &v.unmovable {
                    Some(why.clone())
                } else if v.migrating {
                    Some("is migrating".into())
                } else if let Some(why) = jobs.holds(&v.name) {
                    Some(why)
                } else if v.state != State::Running {
                    Some(format!("is {}", v.state))
                } else {
                    l.arrived
                        .get(&v.name)
                        .filter(|t| t.elapsed().as_secs_f64() < c.settle_s)
                        .map(|t| format!("arrived {:.0} s ago", t.elapsed().as_secs_f64()))
                };
                (
                    VmView {
                        name: v.name.clone(),
                        load: v.load,
                        memory_mib: v.memory_mib,
                        held,
                    },
                    v.clone(),
                )
            })
            .collect()
    };
    let mut views: Vec<VmView> = vms.iter().map(|(v, _)| v.clone()).collect();
    // A VM of a Slurm job moves only within the job's allocation (Slurm
    // accounts for the nodes it gave the job): one whose chosen host is
    // outside it is held, and the choice made again.
    let decision = loop {
        let decision = policy::decide(&me, &hood, &views, &d.params());
        let Decision::Move { vm, to, .. } = &decision else {
            break decision;
        };
        let outside = vms
            .iter()
            .find(|(v, _)| &v.name == vm)
            .and_then(|(_, l)| l.allocation.as_deref())
            .filter(|list| {
                !balance::hostlist::expand(list).is_ok_and(|hosts| hosts.contains(&d.r.names[*to]))
            })
            .map(str::to_string);
        let Some(list) = outside else {
            break decision;
        };
        let Some(v) = views.iter_mut().find(|v| &v.name == vm) else {
            break decision;
        };
        v.held = Some(format!("moves only within its Slurm allocation {list}"));
    };
    match &decision {
        Decision::Stay { reason, imbalance } => {
            // Log a decision when its kind of reason changes, not every period.
            let key: String = reason
                .chars()
                .filter(|c| !c.is_ascii_digit() && *c != '.' && *c != '-')
                .collect();
            if key != *last {
                d.log.event(
                    "decision",
                    serde_json::json!({"decision": "stay", "reason": reason, "imbalance": imbalance, "load": me.load, "neighbours": hood}),
                );
                *last = key;
            }
        }
        Decision::Move { vm, to, .. } => {
            last.clear();
            let Some((_, local)) = vms.iter().find(|(v, _)| &v.name == vm) else {
                return;
            };
            d.log.event(
                "decision",
                serde_json::json!({"decision": decision, "load": me.load, "neighbours": hood}),
            );
            {
                let mut l = lock(&d.limits);
                l.outgoing = Some((vm.clone(), *to));
                l.last_start = Some(Instant::now());
            }
            let (d2, local, decision) = (d.clone(), local.clone(), decision.clone());
            let started = std::thread::Builder::new()
                .name("migrate-out".into())
                .spawn(move || migrate_out(&d2, &local, &decision));
            if let Err(e) = started {
                lock(&d.limits).outgoing = None;
                d.log.event(
                    "migration-failed",
                    serde_json::json!({"vm": vm, "to": to, "error": format!("cannot start a thread: {e}")}),
                );
            }
        }
    }
}

/// Moves `vm` as `decision` says; always clears the outgoing slot.
fn migrate_out(d: &Daemon, vm: &LocalVm, decision: &Decision) {
    let Decision::Move {
        to,
        vm_load,
        me_after,
        ..
    } = decision
    else {
        return;
    };
    let to = *to;
    let result = hand_over(d, vm, to, *vm_load, *me_after);
    if result.is_ok() {
        // (Before the limits: `status` takes the local lock first.)
        lock(&d.local)
            .moved
            .insert(vm.name.clone(), (to, Instant::now()));
    }
    let mut l = lock(&d.limits);
    l.outgoing = None;
    match result {
        Ok(outcome) => {
            l.backoff.remove(&to);
            d.log.event(
                "migration-done",
                serde_json::json!({"vm": vm.name, "to": to, "to_host": d.r.names[to], "outcome": outcome}),
            );
        }
        Err(e) => {
            let base = Duration::from_secs_f64(d.r.config.backoff_s);
            let max = Duration::from_secs_f64(d.r.config.backoff_max_s);
            let next = l
                .backoff
                .get(&to)
                .map(|(_, b)| (*b * 2).min(max))
                .unwrap_or(base);
            l.backoff.insert(to, (Instant::now() + next, next));
            d.log.event(
                "migration-failed",
                serde_json::json!({"vm": vm.name, "to": to, "to_host": d.r.names[to], "error": e, "backoff_s": next.as_secs_f64()}),
            );
        }
    }
}

fn hand_over(
    d: &Daemon,
    vm: &LocalVm,
    to: usize,
    vm_load: f64,
    me_after: f64,
) -> Result<serde_json::Value, String> {
    // The VM must still be here, running and not moving.
    let now = vms::describe(&vm.name, &vm.sock, Duration::from_secs(5))
        .map_err(|e| format!("the VM is gone or does not answer: {e}"))?;
    if now.state != State::Running || now.migrating {
        return Err(format!(
            "the VM is {}{}",
            now.state,
            if now.migrating { " and migrating" } else { "" }
        ));
    }
    let ctl = d.r.control[to];
    let reply = control::call(
        ctl,
        &d.plane.trust,
        &Request::Prepare {
            name: vm.name.clone(),
            memory_mib: vm.memory_mib,
            cpus: vm.cpus.clone(),
            cpu_profile: vm.cpu_profile.clone(),
            from: d.r.slot,
            vm_load,
            sender_after: me_after,
            hotplug_slots: now.hotplug_slots,
            functions: now.passthrough.len(),
            disks: now.disks.clone(),
            nets: now.nets.clone(),
        },
        Duration::from_secs(20),
    )
    .map_err(|e| e.to_string())?;
    let token = reply.token.clone().unwrap_or_default();
    let dest = match (reply.ok, reply.to) {
        (true, Some(t)) => t,
        _ => {
            return Err(format!(
                "host {} refused: {}",
                d.r.names[to],
                reply.error.unwrap_or_default()
            ))
        }
    };
    d.log.event(
        "migration-start",
        serde_json::json!({"vm": vm.name, "to": to, "listening": dest}),
    );
    let abort = |why: String| -> String {
        let _ = control::call(
            ctl,
            &d.plane.trust,
            &Request::Abort {
                name: vm.name.clone(),
                token: token.clone(),
            },
            Duration::from_secs(5),
        );
        why
    };
    let api = vms::api(&vm.sock, Duration::from_secs(5));
    let mut req = MigrateRequest::to(dest);
    req.max_downtime_ms = d.r.config.max_downtime_ms;
    vms::api(&vm.sock, Duration::from_secs(10))
        .migrate(&req)
        .map_err(|e| match e.status() {
            Some(_) => abort(format!("the VMM refused to migrate: {}", e.message())),
            None => abort(e.to_string()),
        })?;
    let deadline = Instant::now() + Duration::from_secs_f64(d.r.config.migration_timeout_s);
    let mut cancelled = false;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let s = match api.migration() {
            Ok(s) => s,
            // The source exits soon after a completed migration. A source
            // gone without telling us: the destination says whether the VM
            // runs there; it is never aborted (the VM may run there).
            Err(e) => {
                return arrived_at(d, ctl, &vm.name)
                    .ok_or_else(|| format!("lost the source VMM during the migration: {e}"))
            }
        };
        match s {
            MigrationStatus::Completed(_) => {
                return serde_json::to_value(&s).map_err(|e| e.to_string())
            }
            MigrationStatus::Failed {
                error,
                vm_running_here,
                ..
            } => {
                let why = format!("{error} (VM running here: {vm_running_here})");
                // Unconfirmed switch-over: the VM may run at the
                // destination, which must keep it.
                return Err(if vm_running_here { abort(why) } else { why });
            }
            MigrationStatus::Running { .. } if Instant::now() > deadline && !cancelled => {
                let _ = api.cancel_migration();
                cancelled = true;
            }
            _ => {}
        }
    }
}

/// The VM as the destination daemon sees it once it runs there.
fn arrived_at(d: &Daemon, ctl: SocketAddr, name: &str) -> Option<serde_json::Value> {
    for _ in 0..25 {
        let st = control::call(
            ctl,
            &d.plane.trust,
            &Request::Status {},
            Duration::from_secs(5),
        )
        .ok()
        .and_then(|r| r.status)?;
        let vm = st["vms"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == name && v["state"] == "running");
        if let Some(vm) = vm {
            return Some(
                serde_json::json!({"state": "completed", "confirmed_by": "destination", "vm": vm}),
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// Control connections served at once; more are closed at once.
const MAX_CONTROL_CONNECTIONS: usize = 64;

fn control_service(d: &Arc<Daemon>, tcp: TcpListener) {
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in tcp.incoming() {
        let Ok(s) = conn else { continue };
        if busy.load(Ordering::Acquire) >= MAX_CONTROL_CONNECTIONS {
            d.log.event(
                "control-refused",
                serde_json::json!({"from": s.peer_addr().map(|a| a.to_string()).unwrap_or_default(), "why": "too many connections"}),
            );
            continue;
        }
        busy.fetch_add(1, Ordering::AcqRel);
        let (d, mine) = (d.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                control_connection(&d, s);
                mine.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One control connection: the handshake (a peer without the cluster key
/// gets it closed and nothing else), one request, one reply.
fn control_connection(d: &Arc<Daemon>, s: std::net::TcpStream) {
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut s = match cluster_auth::accept(
        s,
        &d.plane.trust,
        &[control::CHANNEL],
        Duration::from_secs(5),
    ) {
        Ok((s, _)) => s,
        Err(e) => {
            d.log.event(
                "control-refused",
                serde_json::json!({"from": peer, "why": e.to_string()}),
            );
            return;
        }
    };
    let _ = s.tcp().set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.tcp().set_write_timeout(Some(Duration::from_secs(5)));
    let reply = match control::read_request(&mut s) {
        Ok(Request::Status {}) => Reply {
            status: Some(status(d)),
            ..Reply::ok()
        },
        Ok(Request::Prepare {
            name,
            memory_mib,
            cpus,
            cpu_profile,
            from,
            vm_load,
            sender_after,
            hotplug_slots,
            functions,
            disks,
            nets,
        }) => {
            let r = prepare(
                d,
                &Arriving {
                    name: &name,
                    memory_mib,
                    cpus: &cpus,
                    cpu_profile: cpu_profile.as_deref(),
                    hotplug_slots,
                    functions,
                    disks: &disks,
                    nets: &nets,
                },
                from,
                vm_load,
                sender_after,
            );
            d.log.event(
                "prepare",
                serde_json::json!({"vm": name, "from": from, "ok": r.is_ok(), "to": r.as_ref().ok().map(|(to, _)| to), "error": r.as_ref().err()}),
            );
            match r {
                Ok((to, token)) => Reply {
                    to: Some(to),
                    token: Some(token),
                    ..Reply::ok()
                },
                Err(e) => Reply::refuse(e.to_string()),
            }
        }
        Ok(Request::Abort { name, token }) => abort(d, &name, &token),
        Ok(Request::CkptAcquire { job, bytes }) => ckpt_request(d, &job, Ok(bytes)),
        Ok(Request::CkptRelease { job, token }) => ckpt_request(d, &job, Err(&token)),
        Ok(
            r @ (Request::JobPrecopy { .. }
            | Request::JobCapture { .. }
            | Request::JobCommit { .. }
            | Request::JobDiscard { .. }
            | Request::JobList { .. }
            | Request::JobMembers { .. }
            | Request::JobCheck { .. }
            | Request::JobStart { .. }
            | Request::JobStop { .. }),
        ) => job::serve(d, r),
        Ok(Request::VmWatch { name }) => watch(d, &name),
        Ok(Request::VmSignal { name, signal }) => signal_vm(d, &name, &signal),
        Err(e) => Reply::refuse(e.to_string()),
    };
    let _ = control::write_reply(&mut s, &reply);
}

/// `vm-watch`: where VM `name` is, as this host knows it.
fn watch(d: &Daemon, name: &str) -> Reply {
    if !safe_name(name) {
        return Reply::refuse(format!("{name:?} is not a usable VM name"));
    }
    let sock = d.r.config.vm_dir.join(format!("{name}.sock"));
    let here = vms::api(&sock, Duration::from_secs(2)).vm();
    let v = match here {
        Ok(info) if info.state != State::Incoming => serde_json::json!({
            "state": info.state, "host": d.me(), "pid": info.pid,
        }),
        _ if lock(&d.limits)
            .outgoing
            .as_ref()
            .is_some_and(|(n, _)| n == name) =>
        {
            serde_json::json!({"state": "moving"})
        }
        _ => {
            let l = lock(&d.local);
            match (l.moved.get(name), l.ended.get(name)) {
                (Some((to, t)), e) if e.is_none_or(|(_, te)| te <= t) => serde_json::json!({
                    "state": "moved", "to": d.r.names[*to],
                }),
                (_, Some((code, _))) => serde_json::json!({"state": "ended", "exit": code}),
                _ => serde_json::json!({"state": "unknown"}),
            }
        }
    };
    Reply {
        status: Some(v),
        ..Reply::ok()
    }
}

/// `vm-signal`: a signal for the VMM of VM `name` here.
fn signal_vm(d: &Daemon, name: &str, signal: &str) -> Reply {
    let sig = match signal.trim_start_matches("SIG") {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "CONT" => libc::SIGCONT,
        other => return Reply::refuse(format!("signal {other:?} is not forwarded")),
    };
    if !safe_name(name) {
        return Reply::refuse(format!("{name:?} is not a usable VM name"));
    }
    let sock = d.r.config.vm_dir.join(format!("{name}.sock"));
    let pid = match vms::api(&sock, Duration::from_secs(2)).vm() {
        Ok(info) if info.pid > 1 => info.pid,
        Ok(_) => return Reply::refuse(format!("{name} has no process to signal")),
        Err(e) => return Reply::refuse(format!("no VM {name} runs here: {e}")),
    };
    // SAFETY: kill(2) on the process the VM's own API names as its VMM.
    let r = unsafe { libc::kill(pid as i32, sig) };
    d.log.event(
        "vm-signal",
        serde_json::json!({"vm": name, "signal": signal, "pid": pid, "ok": r == 0}),
    );
    if r != 0 {
        return Reply::refuse(format!(
            "cannot signal {name} ({pid}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Reply::ok()
}

/// Stops waiting for `name`, unless its VM already runs here: a VM that
/// arrived is never killed on a peer's word.
fn abort(d: &Daemon, name: &str, token: &str) -> Reply {
    let sock = d.r.config.vm_dir.join(format!("{name}.sock"));
    let holder = lock(&d.local).incoming.get(name).map(|i| i.token == token);
    match holder {
        None => return Reply::ok(),
        Some(false) => {
            d.log.event(
                "abort-refused",
                serde_json::json!({"vm": name, "why": "not the token of the prepare"}),
            );
            return Reply::refuse("only the host that asked for this reservation may abort it");
        }
        Some(true) => {}
    }
    if let Ok(vm) = vms::describe(name, &sock, Duration::from_millis(300)) {
        if vm.state == State::Running {
            d.log.event(
                "abort-refused",
                serde_json::json!({"vm": name, "why": "the VM runs here"}),
            );
            return Reply::refuse("the VM runs here");
        }
    }
    let mut l = lock(&d.local);
    let i = l.incoming.remove(name);
    if let Some(i) = i {
        l.stop(i.pid);
        d.log
            .event("abort", serde_json::json!({"vm": name, "from": i.from}));
    }
    Reply::ok()
}

/// A name safe as a file name in the VM directory.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

/// What a peer says of the VM it wants to hand over.
struct Arriving<'a> {
    name: &'a str,
    memory_mib: u64,
    cpus: &'a str,
    cpu_profile: Option<&'a str>,
    hotplug_slots: u8,
    /// Passthrough functions it had: as many come from the VF pool.
    functions: usize,
    disks: &'a [vmm_api::model::DiskConfig],
    nets: &'a [vmm_api::model::NetConfig],
}

fn prepare(
    d: &Daemon,
    a: &Arriving,
    from: usize,
    vm_load: f64,
    sender_after: f64,
) -> Result<(String, String), String> {
    let c = &d.r.config;
    let name = a.name;
    if !safe_name(name) {
        return Err(format!("{name:?} is not a usable VM name"));
    }
    for (what, v) in [("vm_load", vm_load), ("sender_after", sender_after)] {
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{what} {v} is not a load (a finite number >= 0)"));
        }
    }
    if a.memory_mib == 0 {
        return Err("memory_mib 0".into());
    }
    if from >= d.r.names.len() || from == d.r.slot {
        return Err(format!("host {from} is not a peer"));
    }
    // Its disks and network devices, as this host can give them.
    let mut flags = Vec::new();
    for disk in arriving::disk_flags(a.disks, &c.shared_disk_dirs)? {
        flags.extend(["--disk".to_string(), disk]);
    }
    let token = cluster_auth::token();
    let devices = {
        let mut l = lock(&d.local);
        if l.info.health != Health::Ok {
            return Err(format!(
                "this host is {:?}: {}",
                l.info.health,
                l.health_why.join("; ")
            ));
        }
        if let Some((n, _)) = l.incoming.iter().next() {
            return Err(format!("already receiving {n}"));
        }
        if l.vms.iter().any(|v| v.name == name) {
            return Err(format!("a VM named {name} runs here"));
        }
        let free = vms::free_mib().unwrap_or(0);
        if free < a.memory_mib + c.reserve_mib {
            return Err(format!(
                "{free} MiB free, {} MiB + {} MiB reserve needed",
                a.memory_mib, c.reserve_mib
            ));
        }
        let cores = f64::from(d.r.cores);
        let mine: f64 = l.vms.iter().map(|v| v.load).sum();
        let after = (mine + vm_load) / cores;
        if after > sender_after + 1e-9 {
            return Err(format!(
                "would end busier ({after:.2}/core) than the sender ({sender_after:.2}/core)"
            ));
        }
        // Its passthrough functions come from the pool, or it stays away.
        let devices: Vec<String> = free_functions(&c.vf_pool, &l)
            .into_iter()
            .take(a.functions)
            .collect();
        if devices.len() < a.functions {
            return Err(format!(
                "it has {} passthrough function(s); {} of this host's VF pool ({}) are free",
                a.functions,
                devices.len(),
                c.vf_pool.len()
            ));
        }
        // New TAPs: named while this host holds no other reservation (one
        // incoming VM at a time), so no two arrivals pick the same name.
        for net in arriving::net_flags(a.nets, &c.vm_bridges, Path::new("/sys/class/net"))? {
            flags.extend(["--net".to_string(), net]);
        }
        // Reserved: one incoming VM at a time; the VMM is started unlocked.
        // Only the asking host gets the token that aborts the reservation.
        l.incoming.insert(
            name.to_string(),
            Incoming {
                pid: None,
                token: token.clone(),
                from,
                since: Instant::now(),
                to: String::new(),
                devices: devices.clone(),
            },
        );
        devices
    };
    let started = start_incoming(d, a, &devices, &flags);
    let mut l = lock(&d.local);
    match started {
        Ok((pid, to)) => match l.incoming.get_mut(name) {
            Some(i) => {
                i.pid = Some(pid);
                i.to = to.clone();
                Ok((to, token))
            }
            // Aborted (or timed out) while it started: stop it again.
            None => {
                l.stop(Some(pid));
                Err("aborted while the receiving VMM started".into())
            }
        },
        Err(e) => {
            l.incoming.remove(name);
            Err(e)
        }
    }
}

/// Starts `ffmk-vmm run --incoming` for `name`; returns its pid and address
/// once it listens.
fn start_incoming(
    d: &Daemon,
    a: &Arriving,
    devices: &[String],
    flags: &[String],
) -> Result<(u32, String), String> {
    let name = a.name;
    let c = &d.r.config;
    let ip = d.r.gossip[d.r.slot].ip();
    let [lo, hi] = c.migration_ports;
    let port = (lo..=hi)
        .find(|p| TcpListener::bind((ip, *p)).is_ok())
        .ok_or_else(|| format!("no free migration port in {lo}-{hi}"))?;
    let to = format!("tcp://{ip}:{port}");
    let dir = &c.vm_dir;
    let log_path = dir.join(format!("{name}.vmm.log"));
    let mut cmd = Command::new(&c.vmm);
    cmd.args(["run", "--incoming", &to])
        .args(&d.plane.vmm_args)
        .arg("--memory")
        .arg(format!("{}M", a.memory_mib))
        .args(["--cpus", a.cpus, "--api-socket"])
        .arg(dir.join(format!("{name}.sock")))
        .arg("--console")
        .arg(format!(
            "file={}",
            dir.join(format!("{name}.console")).display()
        ));
    if let Some(p) = a.cpu_profile {
        cmd.args(["--cpu-profile", p]);
    }
    // The same hot-plug slots as at the source (the bus must match while
    // the state loads); the pool's functions go into them once it arrived.
    if a.hotplug_slots > 0 {
        cmd.args(["--hotplug-slots", &a.hotplug_slots.to_string()]);
    }
    for dev in devices {
        cmd.args(["--device", dev]);
    }
    cmd.args(flags);
    let mut child = spawn_vmm(cmd, &log_path, &c.vmm)?;
    // Ready once it says it waits (it binds the port first).
    wait_ready(&mut child, &log_path, Duration::from_secs(10), &|log| {
        log.contains("waiting for a migration on")
    })
    .map_err(|e| format!("the receiving VMM {e}"))?;
    let pid = child.id();
    // Reaped whenever it ends (it may run for days): `refresh_local`.
    lock(&d.local).children.push((name.to_string(), child));
    Ok((pid, to))
}

/// Starts a VMM (`cmd`, the `vmm` binary) with its output to `log_path`,
/// in a process group of its own: the VM outlives this daemon.
fn spawn_vmm(mut cmd: Command, log_path: &Path, vmm: &Path) -> Result<std::process::Child, String> {
    let out = std::fs::File::create(log_path)
        .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    cmd.spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()))
}

/// Waits until a VMM this daemon started is `ready` (given its log so
/// far), at most `within`; a VMM that exits first or takes too long is an
/// error (what it said last), and one that takes too long is killed.
fn wait_ready(
    child: &mut std::process::Child,
    log_path: &Path,
    within: Duration,
    ready: &dyn Fn(&str) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log_path).unwrap_or_default();
        if ready(&text) {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "exited ({st}): {}",
                text.lines().last().unwrap_or("")
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("was not ready within {} s", within.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's state for `ffmk-node status`.
/// The checkpoint coordinator's side of `ckpt-acquire` (`bytes`) and
/// `ckpt-release` (None).
fn ckpt_request(d: &Daemon, job: &str, what: Result<u64, &str>) -> Reply {
    let mut k = lock(&d.ckpt);
    let Some(k) = k.as_mut() else {
        return Reply::refuse(format!(
            "this host is not the checkpoint coordinator ({} is)",
            d.r.names[d.r.ckpt_coordinator()]
        ));
    };
    let now = d.start.elapsed().as_secs_f64();
    let answer = match what {
        Ok(b) => k.acquire(job, b, now).map(|a| serde_json::json!(a)),
        Err(token) => k
            .release(job, token, now)
            .map(|held| serde_json::json!({"answer": "released", "held_s": held})),
    };
    let bytes = what.ok();
    match answer {
        Ok(a) => {
            if a["answer"] != "wait" {
                let mut logged = a.clone();
                if let Some(o) = logged.as_object_mut() {
                    o.remove("token");
                }
                d.log.event(
                    "ckpt",
                    serde_json::json!({"job": job, "bytes": bytes, "answer": logged}),
                );
            }
            Reply {
                ckpt: Some(a),
                ..Reply::ok()
            }
        }
        Err(e) => Reply::refuse(e.to_string()),
    }
}

mod metrics {
    //! `GET /metrics` on `metrics_listen`: this host and what its board
    //! says of the others, in Prometheus text format.
    use super::{lock, Daemon};
    use std::sync::atomic::Ordering;
    use vmm_api::http::{self, Response};
    use vmm_api::metrics::{Kind, Page, CONTENT_TYPE};

    /// One request per connection, one at a time (a scrape is small);
    /// a client gets 5 s to send it.
    pub(super) fn serve(d: &Daemon, l: std::net::TcpListener) {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
            let _ = s.set_write_timeout(Some(std::time::Duration::from_secs(5)));
            let answer = match http::read_request(&mut s) {
                Ok(r) if r.method == "GET" && r.path.split('?').next() == Some("/metrics") => {
                    Response::text(page(d), CONTENT_TYPE)
                }
                Ok(r) => {
                    Response::error(404, format!("{} {}: only GET /metrics", r.method, r.path))
                }
                Err(e) => Response::error(400, e.to_string()),
            };
            let _ = http::write_response(&mut s, &answer);
        }
    }

    pub(super) fn page(d: &Daemon) -> String {
        let mut p = Page::new();
        let l = lock(&d.local);
        let info = l.info;
        p.one("ffmk_node_up", Kind::Gauge, "1: the daemon answers", 1.0);
        p.one(
            "ffmk_node_uptime_seconds",
            Kind::Gauge,
            "Seconds since the daemon started",
            d.start.elapsed().as_secs_f64(),
        );
        p.one(
            "ffmk_node_load",
            Kind::Gauge,
            "Runnable vCPU demand of this host's VMs",
            f64::from(info.load),
        );
        p.one(
            "ffmk_node_cores",
            Kind::Gauge,
            "Host cores VMs may use here",
            f64::from(info.cores),
        );
        p.one(
            "ffmk_node_free_memory_bytes",
            Kind::Gauge,
            "Host memory free for VMs",
            f64::from(info.free_mib) * f64::from(1 << 20),
        );
        p.one(
            "ffmk_node_vms",
            Kind::Gauge,
            "VMs on this host",
            f64::from(info.vms),
        );
        p.one(
            "ffmk_node_unreachable_vms",
            Kind::Gauge,
            "VM API sockets that did not answer",
            l.errors.len() as f64,
        );
        p.one(
            "ffmk_node_incoming_vms",
            Kind::Gauge,
            "VMMs waiting here for a migration",
            l.incoming.len() as f64,
        );
        let health = serde_json::to_value(info.health)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        p.family("ffmk_node_health", Kind::Gauge, "1 for this host's health");
        p.sample("ffmk_node_health", &[("health", &health)], 1.0);
        p.one(
            "ffmk_node_drained",
            Kind::Gauge,
            "1: this host takes no VMs",
            f64::from(u8::from(d.drained.load(Ordering::Acquire))),
        );
        drop(l);
        p.one(
            "ffmk_node_migrating_out",
            Kind::Gauge,
            "1: a VM is being migrated away from here",
            f64::from(u8::from(lock(&d.limits).outgoing.is_some())),
        );
        let now = d.now();
        let b = lock(&d.board);
        let mut alive = 0;
        p.family(
            "ffmk_cluster_host_load",
            Kind::Gauge,
            "Each host's load as this host's board has it (gossip)",
        );
        for slot in 0..d.r.names.len() {
            let age = b.age(slot, now);
            if age.is_some_and(|a| a <= d.r.config.dead_after) {
                alive += 1;
            }
            if let Some(e) = b.entry(slot) {
                p.sample(
                    "ffmk_cluster_host_load",
                    &[("host", &d.r.names[slot])],
                    f64::from(e.info.load),
                );
            }
        }
        p.one(
            "ffmk_cluster_hosts",
            Kind::Gauge,
            "Hosts in the cluster list",
            d.r.names.len() as f64,
        );
        p.one(
            "ffmk_cluster_hosts_alive",
            Kind::Gauge,
            "Hosts whose board entry is fresh",
            f64::from(alive),
        );
        p.finish()
    }
}

fn status(d: &Daemon) -> serde_json::Value {
    let now = d.now();
    let board: Vec<serde_json::Value> = {
        let b = lock(&d.board);
        (0..d.r.names.len())
            .map(|slot| {
                let e = b.entry(slot);
                let age = b.age(slot, now);
                serde_json::json!({
                    "slot": slot,
                    "host": d.r.names[slot],
                    "incarnation": e.map(|e| e.incarnation),
                    "age": age,
                    "alive": age.is_some_and(|a| a <= d.r.config.dead_after),
                    "info": e.map(|e| e.info),
                })
            })
            .collect()
    };
    let l = lock(&d.local);
    let lim = lock(&d.limits);
    serde_json::json!({
        "host": d.me(),
        "slot": d.r.slot,
        "incarnation": d.incarnation,
        "uptime_s": d.start.elapsed().as_secs_f64(),
        "period_ms": d.r.config.period_ms,
        "window": d.r.window.to_string(),
        "health": l.info.health,
        "health_why": l.health_why,
        "board": board,
        "vms": l.vms,
        "unreachable_vms": l.errors,
        "incoming": l.incoming.iter().map(|(n, i)| serde_json::json!({"vm": n, "from": i.from, "listening": i.to, "waiting_s": i.since.elapsed().as_secs_f64(), "devices": i.devices})).collect::<Vec<_>>(),
        "ckpt_coordinator": lock(&d.ckpt).as_ref().map(|k| serde_json::json!(k)),
        "broadcasts": lock(&d.broadcasts).iter().cloned().collect::<Vec<_>>(),
        "vf_pool": {
            "functions": d.r.config.vf_pool,
            "free": free_functions(&d.r.config.vf_pool, &l),
        },
        "outgoing": lim.outgoing.as_ref().map(|(vm, to)| serde_json::json!({"vm": vm, "to": to})),
        "backoff": lim.backoff.iter().map(|(s, (until, b))| serde_json::json!({"host": s, "for_s": until.saturating_duration_since(Instant::now()).as_secs_f64(), "backoff_s": b.as_secs_f64()})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_become_files() {
        assert!(safe_name("rank-01.a_b"));
        for bad in ["", "../x", "a/b", ".hidden", "x y", &"a".repeat(65)] {
            assert!(!safe_name(bad), "{bad}");
        }
    }
}
