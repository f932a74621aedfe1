//! Sealed datagrams (gossip, the control broadcast).
//!
//! Each sender picks a random 128-bit session when it starts; the session
//! key is HKDF(channel key, session), and datagram number `n` of the
//! session is sealed with AES-256-GCM under nonce `n`, so no nonce is ever
//! used twice under one key. On the wire:
//!
//! ```text
//! "FFMD" | version 1 | session (16) | n (u64 BE) | sent at, ms since the epoch (u64 BE) | ciphertext + tag
//! ```
//!
//! The header is authenticated with the payload. A receiver accepts a
//! datagram only if it opens, was sent within [`MAX_AGE`] of the
//! receiver's clock, and its number is new to the session (a 1024-wide
//! window behind the highest number seen), so a captured datagram cannot
//! be replayed, not even to another node after a restart of the sender.
use crate::key::Secret;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 4] = b"FFMD";
const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 16 + 8 + 8;
/// What sealing adds to a datagram.
pub const OVERHEAD: usize = HEADER + 16;
/// How far a datagram's send time may be from the receiver's clock.
pub const MAX_AGE: Duration = Duration::from_secs(60);
const WINDOW: u64 = 1024;
/// Sessions remembered per receiver (the oldest is forgotten first).
const MAX_SESSIONS: usize = 8192;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("not a sealed cluster-plane datagram")]
    NotSealed,
    #[error("failed authentication (no cluster key, another cluster, or changed)")]
    Forged,
    #[error("sent {0} s away from this host's clock (replayed, or clocks apart)")]
    Stale(u64),
    #[error("a replay of datagram {0} of its session")]
    Replayed(u64),
}

fn session_key(channel: &Secret, session: &[u8; 16]) -> LessSafeKey {
    let mut label = b"datagram:".to_vec();
    label.extend_from_slice(session);
    let k = channel.derive(&label);
    // A 32-byte key is always a valid AES-256 key.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.bytes()).expect("32-byte AES-256 key"))
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The sending side of one process's datagrams on one channel.
pub struct Sealer {
    session: [u8; 16],
    key: LessSafeKey,
    next: u64,
}

impl Sealer {
    /// `channel` names the use ("gossip", "broadcast"): a datagram sealed
    /// for one does not open as the other.
    pub fn new(cluster: &Secret, channel: &str) -> Result<Sealer, crate::Error> {
        let mut session = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut session)
            .map_err(|_| crate::Error::Key("the system's random source failed".into()))?;
        let ch = channel_key(cluster, channel);
        Ok(Sealer {
            key: session_key(&ch, &session),
            session,
            next: 0,
        })
    }

    pub fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let n = self.next;
        self.next += 1;
        let mut d = Vec::with_capacity(OVERHEAD + payload.len());
        d.extend_from_slice(MAGIC);
        d.push(VERSION);
        d.extend_from_slice(&self.session);
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&now_ms().to_be_bytes());
        let mut body = payload.to_vec();
        // Sealing fails only for payloads beyond GCM's 64 GiB limit.
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(n), Aad::from(&d[..HEADER]), &mut body)
            .expect("a datagram is far below GCM's size limit");
        d.extend_from_slice(&body);
        d.extend_from_slice(tag.as_ref());
        d
    }
}

fn channel_key(cluster: &Secret, channel: &str) -> Secret {
    let mut label = b"channel:".to_vec();
    label.extend_from_slice(channel.as_bytes());
    cluster.derive(&label)
}

struct Session {
    key: LessSafeKey,
    highest: u64,
    /// Bit i: datagram `highest - i` was seen.
    seen: [u64; (WINDOW / 64) as usize],
    used: u64,
}

/// The receiving side: opens datagrams and remembers what it has seen.
pub struct Opener {
    channel: Secret,
    sessions: HashMap<[u8; 16], Session>,
    clock: u64,
}

impl Opener {
    pub fn new(cluster: &Secret, channel: &str) -> Opener {
        Opener {
            channel: channel_key(cluster, channel),
            sessions: HashMap::new(),
            clock: 0,
        }
    }

    /// The payload of a datagram, or why it was refused.
    pub fn open(&mut self, d: &[u8]) -> Result<Vec<u8>, Refusal> {
        if d.len() < OVERHEAD || &d[..4] != MAGIC || d[4] != VERSION {
            return Err(Refusal::NotSealed);
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&d[5..21]);
        let n = u64::from_be_bytes(d[21..29].try_into().map_err(|_| Refusal::NotSealed)?);
        let sent = u64::from_be_bytes(d[29..37].try_into().map_err(|_| Refusal::NotSealed)?);
        let known = self.sessions.contains_key(&session);
        let fresh_key;
        let key = match self.sessions.get(&session) {
            Some(s) => &s.key,
            None => {
                fresh_key = session_key(&self.channel, &session);
                &fresh_key
            }
        };
        let mut body = d[HEADER..].to_vec();
        let plain_len = key
            .open_in_place(nonce(n), Aad::from(&d[..HEADER]), &mut body)
            .map_err(|_| Refusal::Forged)?
            .len();
        body.truncate(plain_len);
        let skew = now_ms().abs_diff(sent);
        if skew > MAX_AGE.as_millis() as u64 {
            return Err(Refusal::Stale(skew / 1000));
        }
        self.clock += 1;
        if !known {
            if self.sessions.len() >= MAX_SESSIONS {
                if let Some(old) = self
                    .sessions
                    .iter()
                    .min_by_key(|(_, s)| s.used)
                    .map(|(k, _)| *k)
                {
                    self.sessions.remove(&old);
                }
            }
            self.sessions.insert(
                session,
                Session {
                    key: session_key(&self.channel, &session),
                    highest: n,
                    seen: [0; (WINDOW / 64) as usize],
                    used: self.clock,
                },
            );
            let s = self.sessions.get_mut(&session).ok_or(Refusal::NotSealed)?;
            s.seen[0] |= 1;
            return Ok(body);
        }
        let s = self.sessions.get_mut(&session).ok_or(Refusal::NotSealed)?;
        s.used = self.clock;
        if n > s.highest {
            shift(&mut s.seen, n - s.highest);
            s.highest = n;
            s.seen[0] |= 1;
            return Ok(body);
        }
        let back = s.highest - n;
        if back >= WINDOW {
            return Err(Refusal::Replayed(n));
        }
        let (word, bit) = ((back / 64) as usize, back % 64);
        if s.seen[word] & (1 << bit) != 0 {
            return Err(Refusal::Replayed(n));
        }
        s.seen[word] |= 1 << bit;
        Ok(body)
    }
}

/// Moves the window `by` datagrams forward (bit i becomes bit i + by).
fn shift(seen: &mut [u64], by: u64) {
    let words = seen.len();
    if by >= (words as u64) * 64 {
        seen.iter_mut().for_each(|w| *w = 0);
        return;
    }
    let (w, b) = ((by / 64) as usize, by % 64);
    for i in (0..words).rev() {
        let lo = if i >= w { seen[i - w] << b } else { 0 };
        let carry = if b > 0 && i > w {
            seen[i - w - 1] >> (64 - b)
        } else {
            0
        };
        seen[i] = lo | carry;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_open_once_and_only_with_the_key() {
        let k = crate::key::generate().unwrap();
        let mut s = Sealer::new(&k, "gossip").unwrap();
        let mut o = Opener::new(&k, "gossip");
        let a = s.seal(b"load 0.5");
        let b = s.seal(b"load 0.7");
        assert_eq!(o.open(&b).unwrap(), b"load 0.7");
        assert_eq!(o.open(&a).unwrap(), b"load 0.5", "late but new");
        assert_eq!(o.open(&a), Err(Refusal::Replayed(0)));
        assert_eq!(o.open(&b), Err(Refusal::Replayed(1)));
        let mut other = Opener::new(&crate::key::generate().unwrap(), "gossip");
        assert_eq!(other.open(&s.seal(b"x")), Err(Refusal::Forged));
        let mut wrong_channel = Opener::new(&k, "broadcast");
        assert_eq!(wrong_channel.open(&s.seal(b"x")), Err(Refusal::Forged));
        let mut c = s.seal(b"load 0.9");
        let last = c.len() - 1;
        c[last] ^= 1;
        assert_eq!(o.open(&c), Err(Refusal::Forged));
        let mut d = s.seal(b"load 0.9");
        d[30] ^= 1; // the timestamp is authenticated too
        assert_eq!(o.open(&d), Err(Refusal::Forged));
        assert_eq!(o.open(b"FFMD"), Err(Refusal::NotSealed));
        assert_eq!(o.open(b"plain gossip"), Err(Refusal::NotSealed));
    }

    #[test]
    fn the_window_moves_and_forgets_what_is_too_old() {
        let k = crate::key::generate().unwrap();
        let mut s = Sealer::new(&k, "gossip").unwrap();
        let mut o = Opener::new(&k, "gossip");
        let all: Vec<Vec<u8>> = (0..3000u32).map(|i| s.seal(&i.to_le_bytes())).collect();
        for (i, d) in all.iter().enumerate() {
            if i % 3 != 0 {
                assert!(o.open(d).is_ok(), "{i}");
            }
        }
        // Within the window: the ones skipped open once.
        assert!(o.open(&all[2997]).is_ok());
        assert!(o.open(&all[2997]).is_err());
        assert!(o.open(&all[2002]).is_err(), "seen");
        assert!(o.open(&all[2100]).is_ok(), "skipped, inside the window");
        // Behind the window: refused even if never seen.
        assert_eq!(o.open(&all[3]), Err(Refusal::Replayed(3)));
    }

    #[test]
    fn shifting_keeps_bits_in_order() {
        let mut w = [0u64; 4];
        w[0] = 0b101;
        shift(&mut w, 70);
        assert_eq!(w[1], 0b101 << 6);
        assert_eq!(w[0], 0);
        shift(&mut w, 200);
        assert_eq!(w, [0; 4]);
    }
}
