//! The gossip bulletin board (design brief, "Gossip bulletin board").
//!
//! Every node keeps one entry per node: what that node last said about
//! itself (its [`NodeInfo`] in the daemon) and when it said it. Time is the
//! node's own clock in gossip intervals ("time units"); an entry's *age*
//! is the time since its origin produced it. Once per time unit, at its own
//! phase, a node refreshes its own entry (age 0), selects every entry whose
//! age is at most the window T (or all of them: [`Window::Whole`]) and
//! sends them to one node chosen uniformly at random. A receiver keeps, per
//! entry, the fresher copy (a newer incarnation always wins: a restarted
//! node is not mistaken for a stale one). Messages carry ages, not
//! timestamps, so clocks need not agree; the receiver adds the transit time
//! it assumes.
//!
//! Entries live in *slots*. In the daemon slot = node index; the simulator
//! may track a sample of origins only (a slot per tracked origin), which
//! keeps 1,048,576-node colonies in memory with the same code.

/// Time in gossip intervals (the node's own clock).
pub type Time = f64;

/// Which entries a node sends.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Window {
    /// Entries of age at most this many time units.
    Age(f64),
    /// The whole vector.
    Whole,
}

impl Window {
    pub fn admits(&self, age: Time) -> bool {
        match self {
            Window::Age(t) => age <= *t,
            Window::Whole => true,
        }
    }
}

impl std::str::FromStr for Window {
    type Err = String;
    fn from_str(s: &str) -> Result<Window, String> {
        match s {
            "whole" | "inf" | "all" => Ok(Window::Whole),
            _ => s
                .parse::<f64>()
                .ok()
                .filter(|t| *t >= 0.0 && t.is_finite())
                .map(Window::Age)
                .ok_or_else(|| {
                    format!("'{s}' is not a window (a number of time units >= 0, or whole)")
                }),
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Window::Age(t) => write!(f, "{t}"),
            Window::Whole => f.write_str("whole"),
        }
    }
}

/// One entry as held by a node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry<I> {
    /// When its origin produced it, on this node's clock (-inf: never heard).
    pub produced: Time,
    pub incarnation: u32,
    pub info: I,
    /// On the fresh list (may be within the window).
    fresh: bool,
}

/// One entry on the wire: its slot, its age when sent, and the payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sent<I> {
    pub slot: u32,
    pub age: f32,
    pub incarnation: u32,
    pub info: I,
}

/// A node's bulletin board.
pub struct Board<I> {
    entries: Vec<Entry<I>>,
    /// This node's own slot (None: a simulator node whose origin is not tracked).
    me: Option<usize>,
    window: Window,
    /// Slots that may be within the window; pruned when selecting, so a
    /// send costs the window's size, not the vector's.
    fresh: Vec<u32>,
}

impl<I: Copy + Default> Board<I> {
    /// A board with `slots` unknown entries.
    pub fn new(slots: usize, me: Option<usize>, window: Window) -> Self {
        Board {
            entries: vec![
                Entry {
                    produced: Time::NEG_INFINITY,
                    incarnation: 0,
                    info: I::default(),
                    fresh: false,
                };
                slots
            ],
            me,
            window,
            fresh: Vec::new(),
        }
    }

    pub fn entries(&self) -> &[Entry<I>] {
        &self.entries
    }

    pub fn entry(&self, slot: usize) -> Option<&Entry<I>> {
        self.entries.get(slot).filter(|e| e.produced.is_finite())
    }

    pub fn me(&self) -> Option<usize> {
        self.me
    }

    fn mark_fresh(&mut self, slot: usize) {
        let e = &mut self.entries[slot];
        if !e.fresh {
            e.fresh = true;
            self.fresh.push(slot as u32);
        }
    }

    /// Sets every entry as known at `at` (a colony that starts with
    /// everyone knowing everyone).
    pub fn know_all(&mut self, at: Time) {
        for slot in 0..self.entries.len() {
            self.entries[slot].produced = at;
            self.mark_fresh(slot);
        }
    }

    /// Refreshes this node's own entry at `now`. Returns the previous
    /// `produced` of the slot (for callers that keep sums).
    pub fn refresh(&mut self, now: Time, incarnation: u32, info: I) -> Option<(usize, Time)> {
        let me = self.me?;
        let old = self.entries[me].produced;
        let e = &mut self.entries[me];
        e.produced = now;
        e.incarnation = incarnation;
        e.info = info;
        self.mark_fresh(me);
        Some((me, old))
    }

    /// The entries to send at `now`: every one within the window.
    pub fn select(&mut self, now: Time, out: &mut Vec<Sent<I>>) {
        out.clear();
        if self.window == Window::Whole {
            for (slot, e) in self.entries.iter().enumerate() {
                if e.produced.is_finite() {
                    out.push(Sent {
                        slot: slot as u32,
                        age: (now - e.produced) as f32,
                        incarnation: e.incarnation,
                        info: e.info,
                    });
                }
            }
            return;
        }
        let window = self.window;
        let entries = &mut self.entries;
        self.fresh.retain(|&slot| {
            let e = &mut entries[slot as usize];
            let age = now - e.produced;
            if window.admits(age) {
                out.push(Sent {
                    slot,
                    age: age as f32,
                    incarnation: e.incarnation,
                    info: e.info,
                });
                true
            } else {
                e.fresh = false;
                false
            }
        });
    }

    /// Takes in a message received at `now` that spent `transit` time units
    /// on the way. For every entry that changed, `changed(slot, old, new)`
    /// is told the old and new `produced`. The node's own entry is only
    /// ever replaced by a newer incarnation (someone remembers a later life
    /// of this node: it must not go back in time).
    pub fn merge(
        &mut self,
        now: Time,
        transit: Time,
        msg: &[Sent<I>],
        mut changed: impl FnMut(usize, Time, Time),
    ) {
        for s in msg {
            let slot = s.slot as usize;
            let Some(e) = self.entries.get_mut(slot) else {
                continue;
            };
            let produced = now - transit - f64::from(s.age);
            let newer = s.incarnation > e.incarnation
                || (s.incarnation == e.incarnation
                    && produced > e.produced
                    && Some(slot) != self.me);
            if newer {
                let old = e.produced;
                e.produced = produced;
                e.incarnation = s.incarnation;
                e.info = s.info;
                changed(slot, old, produced);
                if self.window.admits(now - produced) {
                    self.mark_fresh(slot);
                }
            }
        }
    }

    /// Age of `slot` at `now` (None: never heard of).
    pub fn age(&self, slot: usize, now: Time) -> Option<Time> {
        self.entry(slot).map(|e| now - e.produced)
    }
}

/// The wire format of a gossip message (UDP datagram): a header, then
/// fixed-size entries. Little-endian.
pub mod wire {
    use super::Sent;

    /// magic "FFGB", version, sender slot, sender incarnation, entry count.
    pub const HEADER_BYTES: usize = 20;
    /// slot, incarnation, age (f32 time units), load (f32), free memory
    /// (MiB), VMs, health (u8), 1 byte reserved, cores (u16).
    pub const ENTRY_BYTES: usize = 28;
    pub const MAGIC: u32 = 0x4247_4646;
    pub const VERSION: u32 = 1;
    /// Entries per datagram, so a message fits a 1500-byte MTU.
    pub const MAX_ENTRIES: usize = 49;

    /// Bytes of a message with `n` entries.
    pub fn message_bytes(n: usize) -> usize {
        HEADER_BYTES + n * ENTRY_BYTES
    }

    /// How a node says it is doing.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Health {
        /// Unknown (never heard).
        #[default]
        Unknown,
        Ok,
        /// Its own checks fail (VMM API, KVM, memory): send it nothing.
        Degraded,
        /// The operator drains it: it takes no VMs.
        Draining,
    }

    impl Health {
        fn code(self) -> u8 {
            match self {
                Health::Unknown => 0,
                Health::Ok => 1,
                Health::Degraded => 2,
                Health::Draining => 3,
            }
        }
        fn from_code(c: u8) -> Option<Health> {
            Some(match c {
                0 => Health::Unknown,
                1 => Health::Ok,
                2 => Health::Degraded,
                3 => Health::Draining,
                _ => return None,
            })
        }
    }

    /// What a node says about itself.
    #[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
    pub struct NodeInfo {
        /// Runnable vCPU demand of its VMs (vCPUs that want to run).
        pub load: f32,
        pub free_mib: u32,
        pub vms: u32,
        pub health: Health,
        /// Host cores its VMs may use.
        pub cores: u16,
    }

    /// A decoded datagram.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Message {
        pub sender: u32,
        pub incarnation: u32,
        pub entries: Vec<Sent<NodeInfo>>,
    }

    #[derive(Debug, thiserror::Error, PartialEq)]
    pub enum WireError {
        #[error("{0} bytes is not a gossip message (header {HEADER_BYTES} + n x {ENTRY_BYTES})")]
        Length(usize),
        #[error("bad magic {0:#x}")]
        Magic(u32),
        #[error("unsupported version {0}")]
        Version(u32),
        #[error("entry count {count} does not match {len} bytes")]
        Count { count: u32, len: usize },
        #[error("entry {0}: bad value (age, load, health or reserved byte)")]
        Value(usize),
    }

    /// Encodes `entries` (at most [`MAX_ENTRIES`] are taken).
    pub fn encode(sender: u32, incarnation: u32, entries: &[Sent<NodeInfo>]) -> Vec<u8> {
        let entries = &entries[..entries.len().min(MAX_ENTRIES)];
        let mut b = Vec::with_capacity(message_bytes(entries.len()));
        for v in [MAGIC, VERSION, sender, incarnation, entries.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for e in entries {
            b.extend_from_slice(&e.slot.to_le_bytes());
            b.extend_from_slice(&e.incarnation.to_le_bytes());
            b.extend_from_slice(&e.age.to_le_bytes());
            b.extend_from_slice(&e.info.load.to_le_bytes());
            b.extend_from_slice(&e.info.free_mib.to_le_bytes());
            b.extend_from_slice(&e.info.vms.to_le_bytes());
            b.push(e.info.health.code());
            b.push(0);
            b.extend_from_slice(&e.info.cores.to_le_bytes());
        }
        b
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[at..at + 4]);
        u32::from_le_bytes(w)
    }

    /// Decodes one datagram, checking every field; never panics.
    pub fn decode(b: &[u8]) -> Result<Message, WireError> {
        if b.len() < HEADER_BYTES || (b.len() - HEADER_BYTES) % ENTRY_BYTES != 0 {
            return Err(WireError::Length(b.len()));
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(WireError::Magic(magic));
        }
        let version = u32_at(b, 4);
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        let count = u32_at(b, 16);
        if message_bytes(count as usize) != b.len() {
            return Err(WireError::Count {
                count,
                len: b.len(),
            });
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let e = &b[HEADER_BYTES + i * ENTRY_BYTES..HEADER_BYTES + (i + 1) * ENTRY_BYTES];
            let age = f32::from_bits(u32_at(e, 8));
            let load = f32::from_bits(u32_at(e, 12));
            let health = Health::from_code(e[24]).ok_or(WireError::Value(i))?;
            // The reserved byte must be zero, so a later version can use it.
            if !(age.is_finite() && age >= 0.0 && load.is_finite() && load >= 0.0) || e[25] != 0 {
                return Err(WireError::Value(i));
            }
            entries.push(Sent {
                slot: u32_at(e, 0),
                incarnation: u32_at(e, 4),
                age,
                info: NodeInfo {
                    load,
                    free_mib: u32_at(e, 16),
                    vms: u32_at(e, 20),
                    health,
                    cores: u16::from_le_bytes([e[26], e[27]]),
                },
            });
        }
        Ok(Message {
            sender: u32_at(b, 8),
            incarnation: u32_at(b, 12),
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(slot: u32, age: f32, inc: u32) -> Sent<()> {
        Sent {
            slot,
            age,
            incarnation: inc,
            info: (),
        }
    }

    #[test]
    fn receivers_keep_the_fresher_copy() {
        let mut b: Board<()> = Board::new(3, Some(0), Window::Age(4.0));
        b.merge(10.0, 0.0, &[sent(1, 2.0, 0)], |_, _, _| {});
        assert_eq!(b.age(1, 10.0), Some(2.0));
        // An older copy does not replace it; a fresher one does.
        b.merge(11.0, 0.0, &[sent(1, 5.0, 0)], |_, _, _| {
            panic!("older copy taken")
        });
        assert_eq!(b.age(1, 11.0), Some(3.0));
        let mut seen = vec![];
        b.merge(11.0, 0.0, &[sent(1, 1.0, 0)], |s, old, new| {
            seen.push((s, old, new))
        });
        assert_eq!(seen, vec![(1, 8.0, 10.0)]);
        // Transit time counts: a copy 0.5 units on the way is that much older.
        b.merge(12.0, 0.5, &[sent(2, 1.0, 0)], |_, _, _| {});
        assert_eq!(b.age(2, 12.0), Some(1.5));
        // Ages keep growing everywhere.
        assert_eq!(b.age(1, 20.0), Some(10.0));
        assert_eq!(b.age(0, 20.0), None);
    }

    #[test]
    fn a_newer_incarnation_wins_even_when_older_looking() {
        let mut b: Board<()> = Board::new(2, Some(0), Window::Whole);
        b.merge(5.0, 0.0, &[sent(1, 0.5, 3)], |_, _, _| {});
        // The restarted node (incarnation 4) has an entry that looks older.
        b.merge(5.0, 0.0, &[sent(1, 2.0, 4)], |_, _, _| {});
        assert_eq!(b.entry(1).unwrap().incarnation, 4);
        // A stale copy of the old life never comes back.
        b.merge(6.0, 0.0, &[sent(1, 0.0, 3)], |_, _, _| {
            panic!("old incarnation taken")
        });
        // Nobody overwrites a node's own entry with an older life of it.
        b.refresh(6.0, 7, ());
        b.merge(6.0, 0.0, &[sent(0, 0.0, 7)], |_, _, _| {
            panic!("own entry replaced")
        });
    }

    #[test]
    fn the_window_selects_entries_by_age() {
        let mut b: Board<()> = Board::new(4, Some(0), Window::Age(2.0));
        b.merge(
            0.0,
            0.0,
            &[sent(1, 0.0, 0), sent(2, 1.5, 0), sent(3, 5.0, 0)],
            |_, _, _| {},
        );
        b.refresh(0.5, 0, ());
        let mut out = vec![];
        b.select(0.5, &mut out);
        let mut slots: Vec<u32> = out.iter().map(|s| s.slot).collect();
        slots.sort();
        // Slot 2 is exactly 2.0 old at 0.5 (admitted); slot 3 never was fresh.
        assert_eq!(slots, vec![0, 1, 2]);
        let ages: Vec<f32> = out.iter().map(|s| s.age).collect();
        assert!(ages.contains(&0.0) && ages.contains(&0.5) && ages.contains(&2.0));
        b.select(3.0, &mut out);
        assert_eq!(
            out.iter().map(|s| s.slot).collect::<Vec<_>>(),
            Vec::<u32>::new()
        );
        let mut whole: Board<()> = Board::new(3, Some(0), Window::Whole);
        whole.know_all(0.0);
        whole.select(100.0, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(wire::message_bytes(3), 20 + 3 * 28);
    }

    #[test]
    fn windows_parse() {
        assert_eq!("whole".parse::<Window>(), Ok(Window::Whole));
        assert_eq!("4".parse::<Window>(), Ok(Window::Age(4.0)));
        assert!("-1".parse::<Window>().is_err());
        assert!("x".parse::<Window>().is_err());
    }

    #[test]
    fn wire_round_trip_and_rejects_garbage() {
        use wire::*;
        let e = Sent {
            slot: 2,
            age: 1.5,
            incarnation: 7,
            info: NodeInfo {
                load: 2.25,
                free_mib: 4096,
                vms: 3,
                health: Health::Ok,
                cores: 16,
            },
        };
        let b = encode(1, 9, &[e, e]);
        assert_eq!(b.len(), message_bytes(2));
        let m = decode(&b).expect("decodes");
        assert_eq!((m.sender, m.incarnation), (1, 9));
        assert_eq!(m.entries, vec![e, e]);
        assert_eq!(
            decode(&b[..b.len() - 1]),
            Err(WireError::Length(b.len() - 1))
        );
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(decode(&bad), Err(WireError::Magic(_))));
        let mut bad = b.clone();
        bad[16] = 3; // count 3, 2 entries
        assert!(matches!(decode(&bad), Err(WireError::Count { .. })));
        let mut bad = b.clone();
        bad[HEADER_BYTES + 8..HEADER_BYTES + 12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode(&bad), Err(WireError::Value(0)));
        let mut bad = b.clone();
        bad[HEADER_BYTES + 24] = 9;
        assert_eq!(decode(&bad), Err(WireError::Value(0)));
        // Found by fuzzing: a set reserved byte was taken (and lost).
        let mut bad = b;
        bad[HEADER_BYTES + ENTRY_BYTES + 25] = 0x4c;
        assert_eq!(decode(&bad), Err(WireError::Value(1)));
        assert!(encode(0, 0, &vec![e; 100]).len() == message_bytes(MAX_ENTRIES));
    }
}
