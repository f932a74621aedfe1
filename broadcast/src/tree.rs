//! Binomial broadcast trees over ranks 0..n, rooted anywhere: ranks are
//! taken relative to the root (`(rank - root) mod n`).
//!
//! - [`Tree::Interleaved`]: relative rank `i` sends to `i + 2^j` for every
//!   `j` above its highest set bit. The subtree of `2^j` is every rank
//!   congruent to `2^j` modulo `2^(j+1)`: spread evenly around the ring.
//! - [`Tree::Contiguous`]: relative rank `i` sends to `i + 2^j` for every
//!   `j` below its lowest set bit (the root: every `j`). The subtree of a
//!   node is one contiguous run of ranks, so a dead node leaves one hole as
//!   large as its subtree (kept to show why interleaving matters).
//!
//! Children come largest subtree first: the order they should be sent to.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tree {
    Interleaved,
    Contiguous,
}

impl std::str::FromStr for Tree {
    type Err = String;
    fn from_str(s: &str) -> Result<Tree, String> {
        match s {
            "interleaved" => Ok(Tree::Interleaved),
            "contiguous" => Ok(Tree::Contiguous),
            _ => Err(format!("{s}: not a tree (interleaved or contiguous)")),
        }
    }
}

impl Tree {
    /// Children of `rank` in the tree over `n` ranks rooted at `root`, in
    /// sending order (largest subtree first).
    pub fn children(self, rank: u32, root: u32, n: u32) -> Vec<u32> {
        if n == 0 || rank >= n || root >= n {
            return Vec::new();
        }
        let n64 = u64::from(n);
        let i = (u64::from(rank) + n64 - u64::from(root)) % n64;
        let mut out = Vec::new();
        match self {
            Tree::Interleaved => {
                // j above the highest set bit of i (every j for the root).
                let mut j = if i == 0 { 0 } else { 64 - i.leading_zeros() };
                while j < 63 && i + (1u64 << j) < n64 {
                    out.push(i + (1u64 << j));
                    j += 1;
                }
            }
            Tree::Contiguous => {
                // j below the lowest set bit of i, largest first.
                let top = if i == 0 {
                    64 - (n64 - 1).max(1).leading_zeros()
                } else {
                    i.trailing_zeros()
                };
                for j in (0..top).rev() {
                    if i + (1u64 << j) < n64 {
                        out.push(i + (1u64 << j));
                    }
                }
            }
        }
        out.into_iter()
            .map(|c| ((c + u64::from(root)) % n64) as u32)
            .collect()
    }
}

impl Tree {
    /// When the last node would get the message without failures, if
    /// every node sends one message per `overhead` (its children in order)
    /// and each takes `latency` to arrive: the end of the tree phase, in
    /// the unit of the arguments. Depends on n, not on the root.
    pub fn completion(self, n: u32, latency: f64, overhead: f64) -> f64 {
        let mut end = 0.0f64;
        let mut todo = vec![(0u32, 0.0f64)];
        while let Some((r, t)) = todo.pop() {
            end = end.max(t);
            for (k, c) in self.children(r, 0, n).into_iter().enumerate() {
                todo.push((c, t + (k as f64 + 1.0) * overhead + latency));
            }
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rank is reached exactly once from the root.
    fn spans(tree: Tree, n: u32, root: u32) {
        let mut seen = vec![0u32; n as usize];
        let mut todo = vec![root];
        seen[root as usize] += 1;
        while let Some(r) = todo.pop() {
            for c in tree.children(r, root, n) {
                seen[c as usize] += 1;
                todo.push(c);
            }
        }
        assert!(
            seen.iter().all(|&s| s == 1),
            "{tree:?} n={n} root={root}: {seen:?}"
        );
    }

    #[test]
    fn both_trees_span_every_rank_once_from_any_root() {
        for n in [1, 2, 3, 7, 8, 13, 64, 100] {
            for root in [0, n / 2, n - 1] {
                spans(Tree::Interleaved, n, root);
                spans(Tree::Contiguous, n, root);
            }
        }
    }

    #[test]
    fn completion_is_the_slowest_path_through_the_tree() {
        // n = 4: 0 -> 1 at o+L, 0 -> 2 at 2o+L, 1 -> 3 at (o+L)+(o+L).
        assert_eq!(Tree::Interleaved.completion(4, 1.0, 0.5), 3.0);
        assert_eq!(Tree::Interleaved.completion(1, 1.0, 0.5), 0.0);
        // log2(n) levels at least.
        assert!(Tree::Contiguous.completion(1024, 1.0, 0.1) >= 10.0 * 1.1 - 1e-9);
    }

    #[test]
    fn interleaved_subtrees_are_spread_and_contiguous_ones_are_runs() {
        let sub = |tree: Tree, top: u32| {
            let mut all = vec![top];
            let mut i = 0;
            while i < all.len() {
                all.extend(tree.children(all[i], 0, 16));
                i += 1;
            }
            all.sort();
            all
        };
        assert_eq!(Tree::Interleaved.children(0, 0, 16), vec![1, 2, 4, 8]);
        assert_eq!(sub(Tree::Interleaved, 1), vec![1, 3, 5, 7, 9, 11, 13, 15]);
        assert_eq!(sub(Tree::Interleaved, 2), vec![2, 6, 10, 14]);
        assert_eq!(Tree::Contiguous.children(0, 0, 16), vec![8, 4, 2, 1]);
        assert_eq!(sub(Tree::Contiguous, 8), (8..16).collect::<Vec<_>>());
        // Rooted elsewhere: the same shape, shifted around the ring.
        assert_eq!(Tree::Interleaved.children(5, 5, 16), vec![6, 7, 9, 13]);
        assert_eq!(
            Tree::Interleaved.children(15, 5, 16),
            vec![],
            "relative 10 is a leaf"
        );
        assert!(Tree::Interleaved.children(3, 0, 0).is_empty());
        assert!(Tree::Interleaved.children(9, 0, 4).is_empty(), "not a rank");
    }
}
