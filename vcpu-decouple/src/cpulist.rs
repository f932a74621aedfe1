//! CPU lists in the kernel's notation: `0-3,8,10-11`.
use std::collections::BTreeSet;
use std::fmt;

/// An ordered list of CPU numbers (host cores or guest CPUs). Order is kept
/// as written, because `--pin compute=3,1` maps compute vCPU 0 to core 3.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct CpuList(Vec<u32>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("'{0}' is not a CPU number or range (examples: 3, 0-3, 0-3,8)")]
    Bad(String),
    #[error("range '{0}' runs backwards")]
    Backwards(String),
    #[error("CPU {0} is listed twice")]
    Duplicate(u32),
    #[error("empty CPU list")]
    Empty,
}

/// The largest CPU number accepted (the kernel's NR_CPUS ceiling).
pub const MAX_CPU: u32 = 8191;

impl CpuList {
    pub fn new(cpus: Vec<u32>) -> Self {
        CpuList(cpus)
    }

    pub fn range(from: u32, to_exclusive: u32) -> Self {
        CpuList((from..to_exclusive).collect())
    }

    /// Parses a list; duplicates are an error (a core cannot be booked twice).
    pub fn parse(s: &str) -> Result<CpuList, ParseError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ParseError::Empty);
        }
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for part in s.split(',') {
            let part = part.trim();
            let num = |t: &str| {
                t.parse::<u32>()
                    .ok()
                    .filter(|n| *n <= MAX_CPU)
                    .ok_or_else(|| ParseError::Bad(part.into()))
            };
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if hi < lo {
                return Err(ParseError::Backwards(part.into()));
            }
            for c in lo..=hi {
                if !seen.insert(c) {
                    return Err(ParseError::Duplicate(c));
                }
                out.push(c);
            }
        }
        Ok(CpuList(out))
    }

    /// Parses what the kernel writes in sysfs, where an empty file means
    /// "no CPUs" (e.g. `/sys/devices/system/cpu/isolated`).
    /// `nohz_full` reads `(null)` on a kernel booted without it.
    pub fn parse_sysfs(s: &str) -> Result<CpuList, ParseError> {
        if s.trim().is_empty() || s.trim() == "(null)" {
            Ok(CpuList::default())
        } else {
            CpuList::parse(s)
        }
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// CPUs in both lists (in `self`'s order).
    pub fn intersection(&self, other: &CpuList) -> CpuList {
        CpuList(self.iter().filter(|c| other.contains(*c)).collect())
    }

    /// CPUs of `self` that are not in `other`.
    pub fn difference(&self, other: &CpuList) -> CpuList {
        CpuList(self.iter().filter(|c| !other.contains(*c)).collect())
    }

    /// The CPUs in ascending order without duplicates.
    pub fn sorted(&self) -> CpuList {
        let set: BTreeSet<u32> = self.0.iter().copied().collect();
        CpuList(set.into_iter().collect())
    }
}

impl fmt::Display for CpuList {
    /// Compact form of the sorted list: `0-3,8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sorted = self.sorted();
        let mut first = true;
        let mut i = 0;
        let v = &sorted.0;
        while i < v.len() {
            let mut j = i;
            while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j == i {
                write!(f, "{}", v[i])?;
            } else {
                write!(f, "{}-{}", v[i], v[j])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

impl std::str::FromStr for CpuList {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        CpuList::parse(s)
    }
}

impl From<CpuList> for String {
    fn from(c: CpuList) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for CpuList {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        CpuList::parse_sysfs(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_ranges() {
        let l = CpuList::parse("0-3,8,10-11").unwrap();
        assert_eq!(l.as_slice(), &[0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(l.to_string(), "0-3,8,10-11");
        assert_eq!(CpuList::parse("3,1").unwrap().as_slice(), &[3, 1]);
        assert_eq!(CpuList::parse("3,1").unwrap().to_string(), "1,3");
        assert_eq!(CpuList::parse(" 5 ").unwrap().to_string(), "5");
    }

    #[test]
    fn rejects_bad_lists() {
        assert_eq!(CpuList::parse(""), Err(ParseError::Empty));
        assert_eq!(CpuList::parse("1,1"), Err(ParseError::Duplicate(1)));
        assert_eq!(CpuList::parse("0-2,2"), Err(ParseError::Duplicate(2)));
        assert!(matches!(
            CpuList::parse("3-1"),
            Err(ParseError::Backwards(_))
        ));
        for bad in ["a", "1-", "-1", "1,,2", "99999", "1.5"] {
            assert!(CpuList::parse(bad).is_err(), "{bad}");
        }
        assert!(CpuList::parse_sysfs("\n").unwrap().is_empty());
        assert!(CpuList::parse_sysfs("(null)\n").unwrap().is_empty());
    }

    #[test]
    fn set_operations_keep_order() {
        let a = CpuList::parse("4,0-2").unwrap();
        let b = CpuList::parse("1,4").unwrap();
        assert_eq!(a.intersection(&b).as_slice(), &[4, 1]);
        assert_eq!(a.difference(&b).as_slice(), &[0, 2]);
    }
}
