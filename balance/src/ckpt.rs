//! Checkpoint coordination between jobs that share a burst buffer.
//!
//! Every job checkpoints on its own schedule (its interval from the
//! Young/Daly formula for its own cost and failure rate); when two jobs
//! write to the burst buffer at the same time they split its bandwidth and
//! both take longer - the time lost to checkpointing grows for both. A
//! coordinator hands out write grants instead:
//!
//! - [`Policy::Exclusive`]: one job writes at a time, in the order they
//!   asked; a job that has waited `max_delay` is let in anyway and shares
//!   the bandwidth with the one writing (its checkpoint is never delayed
//!   beyond the bound: a later checkpoint means more work lost if a
//!   failure comes first);
//! - [`Policy::None`]: every request is granted at once (what happens
//!   without coordination; kept for comparison).
//!
//! Grants are leases: one not released within `lease` (its holder died)
//! is dropped. The same state machine runs in the `ffmk-node` coordinator
//! (`ffmk-node`, requests `ckpt-acquire` / `ckpt-release`) and in the
//! simulator (`balance-sim`'s `ckpt_sim`).
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    None,
    Exclusive,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "none" => Ok(Policy::None),
            "exclusive" => Ok(Policy::Exclusive),
            _ => Err(format!("{s}: not a checkpoint policy (exclusive or none)")),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Grant {
    pub job: String,
    pub bytes: u64,
    /// Seconds (coordinator clock) when it was granted and asked for.
    pub since: f64,
    pub asked: f64,
    /// Let in beside another writer (the delay bound ran out).
    pub shared: bool,
    /// What the holder shows to release it (not in status output).
    #[serde(skip)]
    pub token: String,
}

/// What a request gets back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "answer", rename_all = "kebab-case")]
pub enum Answer {
    Granted {
        waited_s: f64,
        shared: bool,
        /// Give it back with the release.
        token: String,
    },
    Wait {
        position: usize,
        writing: Vec<String>,
    },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Coordinator {
    pub policy: Policy,
    pub max_delay: f64,
    pub lease: f64,
    pub writing: Vec<Grant>,
    /// Jobs waiting, in the order they asked: (job, bytes, asked at,
    /// last asked at).
    pub waiting: Vec<(String, u64, f64, f64)>,
    /// Grants given and dropped (lease ran out), for status.
    pub granted: u64,
    pub expired: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CkptError {
    #[error("job {0:?} holds no checkpoint grant")]
    NotHolding(String),
    #[error("job {0:?}'s grant is not released without its token (only its holder has it)")]
    NotHolder(String),
    #[error("{0:?} is not a job name (1-64 of A-Z a-z 0-9 . _ -)")]
    BadJob(String),
}

/// Job names travel in requests and logs.
pub fn valid_job(job: &str) -> bool {
    !job.is_empty()
        && job.len() <= 64
        && job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Coordinator {
    pub fn new(policy: Policy, max_delay: Duration, lease: Duration) -> Coordinator {
        Coordinator {
            policy,
            max_delay: max_delay.as_secs_f64(),
            lease: lease.as_secs_f64(),
            writing: Vec::new(),
            waiting: Vec::new(),
            granted: 0,
            expired: 0,
        }
    }

    /// Job `job` (writing `bytes`) asks to write at time `now` (seconds).
    /// Asking again while waiting keeps its place; asking again while
    /// holding a grant gets the grant.
    pub fn acquire(&mut self, job: &str, bytes: u64, now: f64) -> Result<Answer, CkptError> {
        if !valid_job(job) {
            return Err(CkptError::BadJob(job.into()));
        }
        self.expire(now);
        if let Some(g) = self.writing.iter().find(|g| g.job == job) {
            return Ok(Answer::Granted {
                waited_s: g.since - g.asked,
                shared: g.shared,
                token: g.token.clone(),
            });
        }
        let asked = match self.waiting.iter().position(|w| w.0 == job) {
            Some(i) => {
                self.waiting[i].3 = now;
                self.waiting[i].2
            }
            None => {
                self.waiting.push((job.to_string(), bytes, now, now));
                now
            }
        };
        let position = self.waiting.iter().position(|w| w.0 == job).unwrap_or(0);
        let first_free = position == 0 && self.writing.is_empty();
        // (A tolerance: a caller that comes back exactly at the bound
        // may compute it a rounding error short.)
        let overdue = now - asked >= self.max_delay - 1e-6;
        if self.policy == Policy::None || first_free || overdue {
            self.waiting.remove(position);
            let shared = !self.writing.is_empty();
            let token = cluster_auth::token();
            self.writing.push(Grant {
                job: job.to_string(),
                bytes,
                since: now,
                asked,
                shared,
                token: token.clone(),
            });
            self.granted += 1;
            return Ok(Answer::Granted {
                waited_s: now - asked,
                shared,
                token,
            });
        }
        Ok(Answer::Wait {
            position,
            writing: self.writing.iter().map(|g| g.job.clone()).collect(),
        })
    }

    /// Job `job` is done writing (`token`: its grant's); returns how long
    /// it held the grant.
    pub fn release(&mut self, job: &str, token: &str, now: f64) -> Result<f64, CkptError> {
        if !valid_job(job) {
            return Err(CkptError::BadJob(job.into()));
        }
        self.expire(now);
        let i = self
            .writing
            .iter()
            .position(|g| g.job == job)
            .ok_or_else(|| CkptError::NotHolding(job.into()))?;
        if self.writing[i].token != token {
            return Err(CkptError::NotHolder(job.into()));
        }
        let g = self.writing.remove(i);
        Ok(now - g.since)
    }

    /// Drops grants whose lease ran out (their holders are gone) and
    /// waiters that stopped asking for as long.
    pub fn expire(&mut self, now: f64) {
        let lease = self.lease;
        let before = self.writing.len();
        self.writing.retain(|g| now - g.since < lease);
        self.expired += (before - self.writing.len()) as u64;
        self.waiting.retain(|w| now - w.3 < lease);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(policy: Policy) -> Coordinator {
        Coordinator::new(policy, Duration::from_secs(30), Duration::from_secs(600))
    }

    #[test]
    fn one_job_writes_at_a_time_in_order_until_the_delay_bound() {
        let mut k = c(Policy::Exclusive);
        let granted = |a: Answer| matches!(a, Answer::Granted { .. });
        assert!(granted(k.acquire("a", 10, 0.0).unwrap()));
        assert_eq!(
            k.acquire("b", 10, 1.0).unwrap(),
            Answer::Wait {
                position: 0,
                writing: vec!["a".into()]
            }
        );
        assert!(matches!(
            k.acquire("c", 10, 2.0).unwrap(),
            Answer::Wait { position: 1, .. }
        ));
        // Asking again keeps the place; the holder asking again holds.
        assert!(!granted(k.acquire("b", 10, 3.0).unwrap()));
        let Answer::Granted { token, .. } = k.acquire("a", 10, 3.0).unwrap() else {
            panic!("a holds the grant");
        };
        // Only the holder's token gives the grant back.
        assert_eq!(
            k.release("a", "guessed", 4.0),
            Err(CkptError::NotHolder("a".into()))
        );
        assert_eq!(k.release("a", &token, 5.0), Ok(5.0));
        assert!(matches!(
            k.acquire("b", 10, 5.5).unwrap(),
            Answer::Granted {
                waited_s: 4.5,
                shared: false,
                ..
            }
        ));
        // c has waited 30 s at 32: let in beside b, shared.
        assert!(!granted(k.acquire("c", 10, 31.0).unwrap()));
        assert!(matches!(
            k.acquire("c", 10, 32.0).unwrap(),
            Answer::Granted {
                waited_s: 30.0,
                shared: true,
                ..
            }
        ));
        assert_eq!(
            k.release("x", "", 33.0),
            Err(CkptError::NotHolding("x".into()))
        );
        assert_eq!(k.acquire("", 1, 0.0), Err(CkptError::BadJob("".into())));
        assert!(k.acquire("a b", 1, 0.0).is_err());
    }

    #[test]
    fn without_coordination_everyone_writes_at_once() {
        let mut k = c(Policy::None);
        assert!(matches!(
            k.acquire("a", 1, 0.0).unwrap(),
            Answer::Granted { shared: false, .. }
        ));
        assert!(matches!(
            k.acquire("b", 1, 0.0).unwrap(),
            Answer::Granted { shared: true, .. }
        ));
    }

    #[test]
    fn a_dead_holder_loses_its_grant_after_the_lease() {
        let mut k = Coordinator::new(
            Policy::Exclusive,
            Duration::from_secs(1000),
            Duration::from_secs(60),
        );
        k.acquire("a", 1, 0.0).unwrap();
        assert!(matches!(
            k.acquire("b", 1, 10.0).unwrap(),
            Answer::Wait { .. }
        ));
        assert!(matches!(
            k.acquire("b", 1, 61.0).unwrap(),
            Answer::Granted { shared: false, .. }
        ));
        assert_eq!(k.expired, 1);
        assert!(k.release("a", "", 62.0).is_err());
    }
}
