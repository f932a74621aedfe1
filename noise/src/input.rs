//! Reading sample sets: `ffmk-fwq` output (one value per line, `#` comments)
//! or a probe guest's console log (`fwq_raw cpu=N v v v ...` lines).
use crate::stats::Kind;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: '{text}' is not a sample")]
    Bad {
        path: String,
        line: usize,
        text: String,
    },
    #[error("{path} holds no samples (probe logs need raw=1)")]
    Empty { path: String },
}

/// The samples of one CPU in one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub cpu: Option<u32>,
    pub kind: Kind,
    pub samples: Vec<u64>,
}

/// Every series in `text` (`path` names it in errors).
pub fn parse(path: &str, text: &str) -> Result<Vec<Series>, Error> {
    let ftq = text
        .lines()
        .any(|l| l.contains("mode=ftq") || l.starts_with("# ffmk-fwq ftq"));
    let kind = if ftq { Kind::Ftq } else { Kind::Fwq };
    let mut out: Vec<Series> = Vec::new();
    let probe = text
        .lines()
        .any(|l| l.starts_with("fwq_raw ") || l.starts_with("probe="));
    for (i, line) in text.lines().enumerate() {
        let bad = || Error::Bad {
            path: path.into(),
            line: i + 1,
            text: line.chars().take(60).collect(),
        };
        if probe {
            let Some(rest) = line.strip_prefix("fwq_raw cpu=") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let cpu: u32 = words.next().and_then(|c| c.parse().ok()).ok_or_else(bad)?;
            let values = words
                .map(|w| w.parse::<u64>().map_err(|_| bad()))
                .collect::<Result<Vec<_>, _>>()?;
            match out.iter_mut().find(|s| s.cpu == Some(cpu)) {
                Some(s) => s.samples.extend(values),
                None => out.push(Series {
                    cpu: Some(cpu),
                    kind,
                    samples: values,
                }),
            }
        } else {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let v: u64 = t.parse().map_err(|_| bad())?;
            if out.is_empty() {
                out.push(Series {
                    cpu: None,
                    kind,
                    samples: Vec::new(),
                });
            }
            out[0].samples.push(v);
        }
    }
    if out.iter().all(|s| s.samples.is_empty()) {
        return Err(Error::Empty { path: path.into() });
    }
    Ok(out)
}

pub fn load(path: &Path) -> Result<Vec<Series>, Error> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: name.clone(),
        source,
    })?;
    parse(&name, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_probe_logs_and_plain_files() {
        let log = "probe=ring3\nfwq_cpus=1 samples=4 work=16 mode=fwq\nfwq_raw cpu=1 10 11\nfwq_raw cpu=1 12 13\nfwq cpu=1 min=10\n";
        let s = parse("log", log).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].cpu, s[0].kind, s[0].samples.clone()),
            (Some(1), Kind::Fwq, vec![10, 11, 12, 13])
        );
        let plain = "# ffmk-fwq ftq cpu=1\n5\n6\n\n7\n";
        let s = parse("f", plain).unwrap();
        assert_eq!(
            (s[0].cpu, s[0].kind, s[0].samples.len()),
            (None, Kind::Ftq, 3)
        );
        assert!(parse("x", "1\nabc\n")
            .unwrap_err()
            .to_string()
            .contains("x line 2"));
        assert!(parse("y", "probe=ring3\n")
            .unwrap_err()
            .to_string()
            .contains("no samples"));
    }
}
