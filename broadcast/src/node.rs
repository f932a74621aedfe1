//! One node's part in one broadcast: which messages it sends next.
//!
//! A node becomes informed by the first message it gets (tree or
//! correction). It then sends to its tree children (largest subtree first)
//! and afterwards runs checked correction: it sends correction messages to
//! the ring neighbours at distance 1, 2, 3, ..., alternating sides, and
//! stops on a side once it has received a correction message from a node
//! on that side. That node is informed and alive and walks towards this
//! one, so the ranks between the two are covered by one of them. A node
//! it has already heard from is skipped (it is informed). A side ends at
//! the latest after `n - 1` steps (a lone survivor tells everybody).
//!
//! Correction starts once the tree phase is over: a node informed by the
//! tree waits until the time the whole tree would be done without failures
//! ([`crate::tree::Tree::completion`] after the origin's start; the driver
//! keeps the clock); one informed by a correction (its parent is dead)
//! corrects at once. Starting earlier would have the nodes informed first
//! walk far along the ring before their neighbours, informed later by the
//! tree, could answer. Timing only costs messages or time: whatever the
//! clocks say, every live node is reached.
//!
//! The drivers ([`crate::sim`], [`crate::udp`]) decide when a node may send
//! (one message per send slot), how long a round is, and deliver what it
//! receives.

/// Why a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Tree,
    Correction,
}

/// Side of the ring: towards higher ranks (`Right`) or lower (`Left`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Left,
    Right,
}

#[derive(Debug, Clone)]
pub struct Node {
    rank: u32,
    n: u32,
    tree: crate::Tree,
    informed: bool,
    /// Tree children still to send to (reversed: pop from the end).
    children: Vec<u32>,
    /// Next correction distance per side (0: not started), and whether
    /// the side is done.
    next: [u32; 2],
    done: [bool; 2],
    /// Side to try first on the next correction send.
    turn: Side,
    /// Ranks this node received from (they are informed).
    heard: Vec<u32>,
    /// Informed by a tree message (or as the origin).
    by_tree: bool,
}

impl Node {
    pub fn new(rank: u32, n: u32, tree: crate::Tree) -> Node {
        Node {
            rank,
            n,
            tree,
            informed: false,
            children: Vec::new(),
            next: [1, 1],
            done: [n <= 1, n <= 1],
            turn: Side::Left,
            heard: Vec::new(),
            by_tree: false,
        }
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn informed(&self) -> bool {
        self.informed
    }

    /// The origin starts the broadcast: informed, its whole tree to send.
    pub fn originate(&mut self) {
        self.inform(self.rank, Kind::Tree);
    }

    fn inform(&mut self, root: u32, kind: Kind) {
        if self.informed {
            return;
        }
        self.informed = true;
        let mut c = self.tree.children(self.rank, root, self.n);
        c.reverse();
        self.children = c;
        self.by_tree = kind == Kind::Tree;
    }

    /// Informed by the tree (it waits for the tree phase to end before
    /// correcting) rather than by a correction (it corrects at once).
    pub fn by_tree(&self) -> bool {
        self.by_tree
    }

    /// Whether it still has tree children to send to.
    pub fn tree_pending(&self) -> bool {
        !self.children.is_empty()
    }

    /// Ring side of `other` as seen from here: the shorter way round
    /// (ties go right).
    fn side_of(&self, other: u32) -> Side {
        let n = u64::from(self.n);
        let right = (u64::from(other) + n - u64::from(self.rank)) % n;
        if right <= n - right {
            Side::Right
        } else {
            Side::Left
        }
    }

    /// Takes in a message from `from` about the broadcast rooted at `root`.
    /// Returns true if it informed this node (the first message).
    pub fn receive(&mut self, from: u32, root: u32, kind: Kind) -> bool {
        if from >= self.n || root >= self.n || from == self.rank {
            return false;
        }
        let first = !self.informed;
        self.inform(root, kind);
        if !self.heard.contains(&from) {
            self.heard.push(from);
        }
        if kind == Kind::Correction {
            let s = self.side_of(from);
            self.done[s as usize] = true;
        }
        first
    }

    /// The next message to send (target, kind): a tree child, else (when
    /// `correcting`: the driver decided the tree phase is over) a ring
    /// neighbour. None: nothing to send now.
    pub fn next_send(&mut self, correcting: bool) -> Option<(u32, Kind)> {
        if !self.informed {
            return None;
        }
        if let Some(c) = self.children.pop() {
            return Some((c, Kind::Tree));
        }
        if !correcting {
            return None;
        }
        for _ in 0..2 {
            let side = self.turn;
            self.turn = match side {
                Side::Left => Side::Right,
                Side::Right => Side::Left,
            };
            if let Some(t) = self.correction_target(side) {
                return Some((t, Kind::Correction));
            }
        }
        None
    }

    /// The next neighbour on `side` not known to be informed.
    fn correction_target(&mut self, side: Side) -> Option<u32> {
        let s = side as usize;
        let n = u64::from(self.n);
        while !self.done[s] {
            let d = self.next[s];
            if d >= self.n {
                self.done[s] = true;
                return None;
            }
            self.next[s] += 1;
            let r = u64::from(self.rank);
            let t = match side {
                Side::Right => (r + u64::from(d)) % n,
                Side::Left => (r + n - u64::from(d) % n) % n,
            } as u32;
            if !self.heard.contains(&t) {
                return Some(t);
            }
        }
        None
    }

    /// True once it has nothing more to send.
    pub fn finished(&self) -> bool {
        self.informed && self.children.is_empty() && self.done == [true, true]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tree;

    #[test]
    fn the_origin_sends_its_tree_then_corrects_both_sides_until_told() {
        let mut o = Node::new(0, 8, Tree::Interleaved);
        assert_eq!(o.next_send(true), None, "uninformed nodes are silent");
        o.originate();
        let tree: Vec<_> = (0..3).filter_map(|_| o.next_send(true)).collect();
        assert_eq!(
            tree,
            vec![(1, Kind::Tree), (2, Kind::Tree), (4, Kind::Tree)]
        );
        assert_eq!(o.next_send(true), Some((7, Kind::Correction)), "left first");
        assert_eq!(o.next_send(true), Some((1, Kind::Correction)));
        // Rank 1 corrects towards 0: the right side is done.
        o.receive(1, 0, Kind::Correction);
        assert_eq!(o.next_send(true), Some((6, Kind::Correction)));
        o.receive(7, 0, Kind::Correction);
        assert_eq!(o.next_send(true), None);
        assert!(o.finished());
    }

    #[test]
    fn a_tree_message_informs_and_does_not_stop_correction() {
        let mut a = Node::new(3, 8, Tree::Interleaved);
        assert!(a.receive(1, 0, Kind::Tree));
        assert!(!a.receive(1, 0, Kind::Tree), "only the first informs");
        assert!(a.by_tree() && a.tree_pending());
        // Relative 3 has child 7 in the tree rooted at 0.
        assert_eq!(a.next_send(false), Some((7, Kind::Tree)));
        assert_eq!(a.next_send(false), None, "not correcting yet");
        assert_eq!(a.next_send(true), Some((2, Kind::Correction)));
        assert_eq!(a.next_send(true), Some((4, Kind::Correction)));
        // 1 is known informed (heard from): skipped on the left.
        assert_eq!(a.next_send(true), Some((0, Kind::Correction)));
        assert!(!a.finished());
        assert!(!a.receive(9, 0, Kind::Tree), "not a rank");
    }

    #[test]
    fn a_lone_survivor_tells_everybody_and_ends() {
        let mut a = Node::new(2, 5, Tree::Contiguous);
        a.originate();
        let mut targets = vec![];
        while let Some((t, _)) = a.next_send(true) {
            targets.push(t);
        }
        targets.sort();
        // Three tree children, then every other rank once per side.
        assert!(targets.len() <= 3 + 2 * 4, "{targets:?}");
        for r in [0, 1, 3, 4] {
            assert!(targets.contains(&r), "{r}: {targets:?}");
        }
        assert!(a.finished());
        let mut one = Node::new(0, 1, Tree::Interleaved);
        one.originate();
        assert_eq!(one.next_send(true), None);
        assert!(one.finished());
    }
}
