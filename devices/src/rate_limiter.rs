//! Token-bucket rate limiting for device I/O (bandwidth and operations).
//!
//! Each bucket holds at most one second's worth of tokens (the burst) and
//! refills continuously. A request takes its tokens from every configured
//! bucket or from none; when it cannot, the caller learns how long to wait.
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` tokens per second, bursting up to one second's worth.
    pub fn new(rate: u64) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1),
            capacity: rate.max(1),
            tokens: rate.max(1) as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.capacity as f64);
        self.last = now;
    }

    /// How long until `n` tokens are there (zero if they are). A request
    /// larger than the burst waits until the bucket is full and then takes
    /// it all (the bucket goes negative), so big requests are not starved.
    fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let need = (n.min(self.capacity)) as f64;
        if self.tokens >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / self.rate as f64)
        }
    }

    fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }
}

/// Bandwidth (bytes/s) and operations (ops/s) limits; either may be absent.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: Option<u64>, ops_per_sec: Option<u64>) -> RateLimiter {
        RateLimiter {
            bytes: bytes_per_sec.map(TokenBucket::new),
            ops: ops_per_sec.map(TokenBucket::new),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Takes one operation of `bytes` if both buckets allow it now; else
    /// takes nothing and returns how long to wait.
    pub fn consume(&mut self, bytes: u64) -> Result<(), Duration> {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let wait_b = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(bytes, now));
        let wait_o = self
            .ops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(1, now));
        let wait = wait_b.max(wait_o);
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.take(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_paces_to_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(Some(1000), None);
        r.bytes.as_mut().unwrap().last = t0;
        assert!(r.consume_at(600, t0).is_ok());
        assert!(r.consume_at(400, t0).is_ok(), "one second's burst");
        let wait = r.consume_at(500, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert!(r.consume_at(500, t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn ops_limit_and_all_or_nothing() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(Some(10_000), Some(2));
        for b in [r.bytes.as_mut().unwrap(), r.ops.as_mut().unwrap()] {
            b.last = t0;
        }
        assert!(r.consume_at(100, t0).is_ok());
        assert!(r.consume_at(100, t0).is_ok());
        let before = r.bytes.as_ref().unwrap().tokens;
        let wait = r.consume_at(100, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6);
        assert_eq!(r.bytes.as_ref().unwrap().tokens, before, "nothing taken");
    }

    #[test]
    fn oversized_requests_wait_for_a_full_bucket_then_pass() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(Some(1000), None);
        r.bytes.as_mut().unwrap().last = t0;
        assert!(
            r.consume_at(5000, t0).is_ok(),
            "full bucket: goes, into debt"
        );
        let wait = r.consume_at(1, t0).unwrap_err();
        assert!(wait >= Duration::from_secs(4), "{wait:?}");
        assert!(RateLimiter::default().is_unlimited());
        assert!(RateLimiter::default().consume(u64::MAX).is_ok());
    }
}
