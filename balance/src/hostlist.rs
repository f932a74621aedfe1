//! Slurm-style host lists: `node[01-04,07],login1`, `10.77.0.[1-3]`.
//! Ranges keep their zero padding (`[08-10]` gives 08, 09, 10); one
//! bracket per name, as in `SLURM_JOB_NODELIST` for flat names.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("host list {0:?}: unbalanced brackets")]
    Brackets(String),
    #[error("host list {0:?}: bad range {1:?}")]
    Range(String, String),
    #[error("host list is empty")]
    Empty,
    #[error("host list {0:?} expands to more than {1} hosts")]
    TooMany(String, usize),
}

/// Hosts in one list at most (the gossip slots are u32; this keeps a typo
/// like `[1-999999999]` from eating memory).
pub const MAX_HOSTS: usize = 1 << 20;

/// Splits at commas outside brackets.
fn split_top(list: &str) -> Result<Vec<&str>, Error> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(Error::Brackets(list.into()));
        }
    }
    if depth != 0 {
        return Err(Error::Brackets(list.into()));
    }
    out.push(&list[start..]);
    Ok(out)
}

/// Expands a host list into names, in order.
pub fn expand(list: &str) -> Result<Vec<String>, Error> {
    let mut hosts = Vec::new();
    for item in split_top(list.trim())? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let Some(open) = item.find('[') else {
            hosts.push(item.to_string());
            continue;
        };
        let close = item.find(']').ok_or_else(|| Error::Brackets(list.into()))?;
        let (prefix, ranges, suffix) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
        if suffix.contains('[') || ranges.is_empty() {
            return Err(Error::Brackets(list.into()));
        }
        for r in ranges.split(',') {
            let bad = || Error::Range(list.into(), r.into());
            let (lo, hi) = r.split_once('-').unwrap_or((r, r));
            let width = lo.trim().len();
            let a: u64 = lo.trim().parse().map_err(|_| bad())?;
            let b: u64 = hi.trim().parse().map_err(|_| bad())?;
            if a > b || (b - a) as usize >= MAX_HOSTS {
                return Err(bad());
            }
            for n in a..=b {
                hosts.push(format!("{prefix}{n:0width$}{suffix}"));
                if hosts.len() > MAX_HOSTS {
                    return Err(Error::TooMany(list.into(), MAX_HOSTS));
                }
            }
        }
    }
    if hosts.is_empty() {
        return Err(Error::Empty);
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_ranges_padding_and_plain_names() {
        assert_eq!(
            expand("node[08-10,3],login1").unwrap(),
            vec!["node08", "node09", "node10", "node3", "login1"]
        );
        assert_eq!(
            expand("10.77.0.[1-3]").unwrap(),
            vec!["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        );
        assert_eq!(expand("a").unwrap(), vec!["a"]);
    }

    #[test]
    fn refuses_malformed_lists() {
        assert!(matches!(expand("node[1-3"), Err(Error::Brackets(_))));
        assert!(matches!(expand("node[3-1]"), Err(Error::Range(..))));
        assert!(matches!(expand("node[x]"), Err(Error::Range(..))));
        assert!(matches!(expand("node[[1]]"), Err(Error::Brackets(_))));
        assert_eq!(expand(" , "), Err(Error::Empty));
        assert!(expand("n[0-99999999]").is_err());
    }
}
