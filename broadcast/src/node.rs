//! One node's part in one broadcast: which messages it sends next.
//!
//! A node becomes informed by the first message it gets (tree or
//! correction). It sends to its tree children (largest subtree first) and
//! then runs checked correction: correction messages to the ring
//! neighbours at distance 1, 2, 3, ..., alternating sides (a neighbour it
//! has heard from is skipped: it is informed). Every correction message
//! says which way it travels. A side is done once a correction travelling
//! towards this node arrives from that side: its sender is informed and
//! alive and either walked here from there (so everything in between got
//! the message from it) or answered this node's own walk (so everything
//! in between got it from this node).
//!
//! The answer makes it terminate: a node that gets a correction from a
//! node it has not sent one to answers it once, so a walker stops one
//! round trip after reaching the first live node. (Without answers two
//! nodes can each stop because of a third and leave a fourth walking the
//! whole ring.) A side ends at the latest after `n - 1` steps.
//!
//! Correction starts once the tree phase is over: a node informed by the
//! tree waits until the time the whole tree would be done without failures
//! ([`crate::tree::Tree::completion`] after the origin's start; the driver
//! keeps the clock); one informed by a correction (its parent is dead)
//! corrects at once. Then corrections and the tree children still left
//! alternate, correction first, so a node informed late tells its ring
//! neighbours at once (they stop walking towards it) and still spreads its
//! subtree. Timing only costs messages or time: whatever the clocks say,
//! every live node is reached.
//!
//! The drivers ([`crate::sim`], [`crate::udp`]) decide when a node may send
//! (one message per send slot) and deliver what it receives.

/// Why a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Tree,
    Correction,
}

/// Which way a correction message travels around the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Towards higher ranks: the receiver's left neighbour side sent it.
    Up,
    /// Towards lower ranks.
    Down,
}

/// One message to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    pub to: u32,
    pub kind: Kind,
    /// For corrections: the way it travels.
    pub dir: Option<Dir>,
}

#[derive(Debug, Clone)]
pub struct Node {
    rank: u32,
    n: u32,
    tree: crate::Tree,
    informed: bool,
    /// Tree children still to send to (reversed: pop from the end).
    children: Vec<u32>,
    /// Next correction distance going down / up, and whether that side is
    /// done.
    next: [u32; 2],
    done: [bool; 2],
    /// Side to try first on the next correction send (0 down, 1 up).
    turn: usize,
    /// Ranks this node received from (they are informed).
    heard: Vec<u32>,
    /// Ranks it sent a correction to.
    corrected: Vec<u32>,
    /// Answers owed to nodes that corrected this one.
    answers: Vec<Send>,
    /// Informed by a tree message (or as the origin).
    by_tree: bool,
    /// While correcting with tree children left: whether the next send is
    /// a correction (they alternate, correction first).
    correction_turn: bool,
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
            turn: 0,
            heard: Vec::new(),
            corrected: Vec::new(),
            answers: Vec::new(),
            by_tree: false,
            correction_turn: true,
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

    /// Takes in a message from `from` about the broadcast rooted at `root`
    /// (`dir`: the way a correction travels). Returns true if it informed
    /// this node (the first message).
    pub fn receive(&mut self, from: u32, root: u32, kind: Kind, dir: Option<Dir>) -> bool {
        if from >= self.n || root >= self.n || from == self.rank {
            return false;
        }
        let first = !self.informed;
        self.inform(root, kind);
        if !self.heard.contains(&from) {
            self.heard.push(from);
        }
        if let (Kind::Correction, Some(d)) = (kind, dir) {
            // Travelling up, it came from the side below.
            let side = match d {
                Dir::Up => 0,
                Dir::Down => 1,
            };
            self.done[side] = true;
            let back = match d {
                Dir::Up => Dir::Down,
                Dir::Down => Dir::Up,
            };
            if !self.corrected.contains(&from) && !self.answers.iter().any(|a| a.to == from) {
                self.answers.push(Send {
                    to: from,
                    kind: Kind::Correction,
                    dir: Some(back),
                });
            }
        }
        first
    }

    /// The next message to send. Answers first; during the tree phase
    /// (`correcting` false: the driver decides) tree children only; after
    /// it, corrections and the tree children still left alternate,
    /// correction first. None: nothing to send now.
    pub fn next_send(&mut self, correcting: bool) -> Option<Send> {
        if !self.informed {
            return None;
        }
        if let Some(a) = self.answers.pop() {
            self.corrected.push(a.to);
            return Some(a);
        }
        let tree = |c: u32| Send {
            to: c,
            kind: Kind::Tree,
            dir: None,
        };
        if !correcting {
            return self.children.pop().map(tree);
        }
        let correction_first = self.correction_turn;
        self.correction_turn = !self.correction_turn;
        if correction_first {
            if let Some(s) = self.next_correction() {
                return Some(s);
            }
        }
        if let Some(c) = self.children.pop() {
            return Some(tree(c));
        }
        self.next_correction()
    }

    /// The next ring neighbour to correct, alternating sides.
    fn next_correction(&mut self) -> Option<Send> {
        for _ in 0..2 {
            let side = self.turn;
            self.turn = 1 - side;
            if let Some(to) = self.correction_target(side) {
                self.corrected.push(to);
                return Some(Send {
                    to,
                    kind: Kind::Correction,
                    dir: Some(if side == 0 { Dir::Down } else { Dir::Up }),
                });
            }
        }
        None
    }

    /// The next neighbour on `side` (0 down, 1 up) not known to be
    /// informed.
    fn correction_target(&mut self, side: usize) -> Option<u32> {
        let n = u64::from(self.n);
        while !self.done[side] {
            let d = self.next[side];
            if d >= self.n {
                self.done[side] = true;
                return None;
            }
            self.next[side] += 1;
            let r = u64::from(self.rank);
            let t = if side == 1 {
                (r + u64::from(d)) % n
            } else {
                (r + n - u64::from(d)) % n
            } as u32;
            if !self.heard.contains(&t) {
                return Some(t);
            }
        }
        None
    }

    /// Whether it has something to send now or later: answers, tree
    /// children, or a side not done (a driver that went idle wakes a node
    /// that has).
    pub fn has_work(&self) -> bool {
        self.informed
            && !(self.answers.is_empty() && self.children.is_empty() && self.done == [true, true])
    }

    /// True once it has nothing more to send (an answer may still come up
    /// if another node corrects it).
    pub fn finished(&self) -> bool {
        self.informed && !self.has_work()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tree;

    fn c(to: u32, dir: Dir) -> Option<Send> {
        Some(Send {
            to,
            kind: Kind::Correction,
            dir: Some(dir),
        })
    }

    fn t(to: u32) -> Option<Send> {
        Some(Send {
            to,
            kind: Kind::Tree,
            dir: None,
        })
    }

    #[test]
    fn the_origin_sends_its_tree_then_corrects_both_sides_until_answered() {
        let mut o = Node::new(0, 8, Tree::Interleaved);
        assert_eq!(o.next_send(true), None, "uninformed nodes are silent");
        o.originate();
        let tree: Vec<_> = (0..4).filter_map(|_| o.next_send(false)).collect();
        assert_eq!(tree, vec![t(1).unwrap(), t(2).unwrap(), t(4).unwrap()]);
        assert_eq!(o.next_send(true), c(7, Dir::Down), "down first");
        assert_eq!(o.next_send(true), c(1, Dir::Up));
        // Rank 1 corrects downwards to 0: the side above is done, and 0
        // owes no answer (it corrected 1 already).
        o.receive(1, 0, Kind::Correction, Some(Dir::Down));
        assert_eq!(o.next_send(true), c(6, Dir::Down));
        // Rank 5 walks up to 0 (round the ring): answered, side below done.
        o.receive(5, 0, Kind::Correction, Some(Dir::Up));
        assert_eq!(o.next_send(true), c(5, Dir::Down), "the answer");
        assert_eq!(o.next_send(true), None);
        assert!(o.finished());
    }

    #[test]
    fn a_late_node_corrects_first_then_spreads_its_subtree() {
        let mut a = Node::new(3, 8, Tree::Interleaved);
        assert!(a.receive(1, 0, Kind::Tree, None));
        assert!(!a.receive(1, 0, Kind::Tree, None), "only the first informs");
        assert!(a.by_tree() && a.tree_pending() && a.has_work());
        assert_eq!(a.next_send(true), c(2, Dir::Down));
        assert_eq!(a.next_send(true), t(7));
        assert_eq!(a.next_send(true), c(4, Dir::Up));
        // 1 is known informed (heard from): skipped going down.
        assert_eq!(a.next_send(true), c(0, Dir::Down));
        assert!(!a.finished());
        assert!(!a.receive(9, 0, Kind::Tree, None), "not a rank");
    }

    #[test]
    fn a_lone_survivor_tells_everybody_and_ends() {
        let mut a = Node::new(2, 5, Tree::Contiguous);
        a.originate();
        assert!(a.next_send(false).is_some_and(|s| s.kind == Kind::Tree));
        let mut targets = vec![];
        while let Some(s) = a.next_send(true) {
            targets.push(s.to);
        }
        targets.sort();
        // Two more tree children and every other rank once per side.
        assert!(targets.len() <= 2 + 2 * 4, "{targets:?}");
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
