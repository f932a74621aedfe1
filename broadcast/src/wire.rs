//! The broadcast datagram: one message per UDP packet, little-endian.
//!
//! ```text
//! 0   magic "FFBC"        4   version (1)          5   kind (0 tree, 1 correction, 2 originate)
//! 6   tree (0 interleaved, 1 contiguous)
//! 7   direction of a correction (0 none, 1 up, 2 down)
//! 8   broadcast id (u64)  16  origin rank (u32)    20  ranks n (u32)
//! 24  sender rank (u32)   28  origin's send time (u64, ns, CLOCK_MONOTONIC)
//! 36  group length (u16)  38  payload length (u16)
//! 40  group (UTF-8, at most MAX_GROUP bytes), then the payload (UTF-8, at
//!     most MAX_PAYLOAD bytes)
//! ```
//! The group names the hosts the broadcast goes to, in rank order (for
//! ffmk-node: a host list such as `node[03-07]`); every receiver resolves
//! it the same way to find the others and its own rank.
//! `originate` comes from a local client: "start a broadcast of this
//! payload from here" (its id, origin, sender and time are filled in by
//! the endpoint that takes it).
use crate::node::Dir;
use crate::{Kind, Tree};

pub const MAGIC: &[u8; 4] = b"FFBC";
pub const VERSION: u8 = 1;
pub const HEADER: usize = 40;
/// Commands are short ("pause job7", "checkpoint job7 epoch=12").
pub const MAX_PAYLOAD: usize = 1024;
pub const MAX_GROUP: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    Relay(Kind),
    Originate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub what: What,
    pub tree: Tree,
    pub dir: Option<Dir>,
    pub id: u64,
    pub origin: u32,
    pub n: u32,
    pub from: u32,
    pub sent_ns: u64,
    pub group: String,
    pub payload: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("{0} bytes: shorter than a broadcast header")]
    Short(usize),
    #[error("not a broadcast message (bad magic)")]
    Magic,
    #[error("broadcast message version {0} (this node speaks {VERSION})")]
    Version(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("unknown tree {0}")]
    Tree(u8),
    #[error("unknown direction {0}")]
    Dir(u8),
    #[error("payload of {0} bytes (at most {MAX_PAYLOAD})")]
    Payload(usize),
    #[error("group of {0} bytes (at most {MAX_GROUP})")]
    Group(usize),
    #[error("group and payload lengths say {said} bytes but {got} follow")]
    Length { said: usize, got: usize },
    #[error("payload is not UTF-8")]
    Utf8,
    #[error("rank {rank} of {n} ranks (origin {origin})")]
    Rank { rank: u32, n: u32, origin: u32 },
}

impl Message {
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let p = self.payload.as_bytes();
        let g = self.group.as_bytes();
        if p.len() > MAX_PAYLOAD {
            return Err(WireError::Payload(p.len()));
        }
        if g.len() > MAX_GROUP {
            return Err(WireError::Group(g.len()));
        }
        let mut b = Vec::with_capacity(HEADER + p.len());
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.push(match self.what {
            What::Relay(Kind::Tree) => 0,
            What::Relay(Kind::Correction) => 1,
            What::Originate => 2,
        });
        b.push(match self.tree {
            Tree::Interleaved => 0,
            Tree::Contiguous => 1,
        });
        b.push(match self.dir {
            None => 0,
            Some(Dir::Up) => 1,
            Some(Dir::Down) => 2,
        });
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.origin.to_le_bytes());
        b.extend_from_slice(&self.n.to_le_bytes());
        b.extend_from_slice(&self.from.to_le_bytes());
        b.extend_from_slice(&self.sent_ns.to_le_bytes());
        b.extend_from_slice(&(g.len() as u16).to_le_bytes());
        b.extend_from_slice(&(p.len() as u16).to_le_bytes());
        b.extend_from_slice(g);
        b.extend_from_slice(p);
        Ok(b)
    }

    /// Decodes and checks one datagram: every field in range, ranks
    /// below n (relayed messages), the payload exactly as long as said.
    pub fn decode(b: &[u8]) -> Result<Message, WireError> {
        if b.len() < HEADER {
            return Err(WireError::Short(b.len()));
        }
        if &b[0..4] != MAGIC {
            return Err(WireError::Magic);
        }
        if b[4] != VERSION {
            return Err(WireError::Version(b[4]));
        }
        let what = match b[5] {
            0 => What::Relay(Kind::Tree),
            1 => What::Relay(Kind::Correction),
            2 => What::Originate,
            k => return Err(WireError::Kind(k)),
        };
        let tree = match b[6] {
            0 => Tree::Interleaved,
            1 => Tree::Contiguous,
            t => return Err(WireError::Tree(t)),
        };
        let dir = match b[7] {
            0 => None,
            1 => Some(Dir::Up),
            2 => Some(Dir::Down),
            d => return Err(WireError::Dir(d)),
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let glen = usize::from(u16::from_le_bytes([b[36], b[37]]));
        let len = usize::from(u16::from_le_bytes([b[38], b[39]]));
        if glen > MAX_GROUP {
            return Err(WireError::Group(glen));
        }
        if len > MAX_PAYLOAD {
            return Err(WireError::Payload(len));
        }
        if b.len() - HEADER != glen + len {
            return Err(WireError::Length {
                said: glen + len,
                got: b.len() - HEADER,
            });
        }
        let text = |r: std::ops::Range<usize>| {
            std::str::from_utf8(&b[r])
                .map(String::from)
                .map_err(|_| WireError::Utf8)
        };
        let group = text(HEADER..HEADER + glen)?;
        let payload = text(HEADER + glen..b.len())?;
        let m = Message {
            what,
            tree,
            dir,
            id: u64_at(8),
            origin: u32_at(16),
            n: u32_at(20),
            from: u32_at(24),
            sent_ns: u64_at(28),
            group,
            payload,
        };
        if matches!(m.what, What::Relay(_)) && (m.origin >= m.n || m.from >= m.n) {
            return Err(WireError::Rank {
                rank: m.from.max(m.origin),
                n: m.n,
                origin: m.origin,
            });
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        Message {
            what: What::Relay(Kind::Correction),
            tree: Tree::Interleaved,
            dir: Some(Dir::Down),
            id: 0x1122_3344_5566_7788,
            origin: 3,
            n: 16,
            from: 9,
            sent_ns: 42,
            group: "node[01-16]".into(),
            payload: "pause job7".into(),
        }
    }

    #[test]
    fn messages_round_trip_and_bad_ones_are_named() {
        let b = msg().encode().unwrap();
        assert_eq!(b.len(), HEADER + 11 + 10);
        assert_eq!(Message::decode(&b).unwrap(), msg());
        assert_eq!(Message::decode(&b[..10]), Err(WireError::Short(10)));
        let mut x = b.clone();
        x[0] = b'X';
        assert_eq!(Message::decode(&x), Err(WireError::Magic));
        let mut x = b.clone();
        x[5] = 9;
        assert_eq!(Message::decode(&x), Err(WireError::Kind(9)));
        let mut x = b.clone();
        x[7] = 3;
        assert_eq!(Message::decode(&x), Err(WireError::Dir(3)));
        let mut x = b.clone();
        x.push(b'!');
        assert!(matches!(Message::decode(&x), Err(WireError::Length { .. })));
        let mut x = b.clone();
        x[24] = 16; // from = 16 of 16 ranks
        assert!(matches!(Message::decode(&x), Err(WireError::Rank { .. })));
        let mut x = b.clone();
        x[HEADER + 11] = 0xff;
        assert_eq!(Message::decode(&x), Err(WireError::Utf8));
        let mut x = b.clone();
        x[36] = 0xff; // group length past the end
        assert!(Message::decode(&x).is_err());
        let long = Message {
            group: "g".repeat(MAX_GROUP + 1),
            ..msg()
        };
        assert_eq!(long.encode(), Err(WireError::Group(MAX_GROUP + 1)));
        let big = Message {
            payload: "x".repeat(MAX_PAYLOAD + 1),
            ..msg()
        };
        assert_eq!(big.encode(), Err(WireError::Payload(MAX_PAYLOAD + 1)));
    }
}
