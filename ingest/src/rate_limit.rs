//! Per-key rate limit: one token bucket per API key.
//!
//! Every key has its own bucket behind its own lock, sized when the keys are
//! loaded, so a key that floods the edge spends only its own tokens and never
//! waits on another key's lock: tenant A's flood cannot stop tenant B. The
//! bucket arithmetic is pure (time is passed in) and tested without a clock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How fast a key may send, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second; `None` = no limit.
    per_second: Option<f64>,
    /// Most tokens a bucket holds: requests a key may make at once after idling.
    burst: f64,
}

impl RateLimit {
    /// `per_second == 0` turns the limit off. Errors name the field.
    pub fn new(per_second: f64, burst: u32) -> Result<Self, String> {
        if !per_second.is_finite() || per_second < 0.0 {
            return Err(format!("rate_limit_per_second must be a number >= 0, not {per_second}"));
        }
        if per_second == 0.0 {
            return Ok(Self { per_second: None, burst: 0.0 });
        }
        if burst == 0 {
            return Err("rate_limit_burst must be at least 1 when rate_limit_per_second > 0".into());
        }
        Ok(Self { per_second: Some(per_second), burst: f64::from(burst) })
    }

    pub fn unlimited() -> Self {
        Self { per_second: None, burst: 0.0 }
    }
}

/// A token bucket at one instant. Pure: every method takes `now`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A bucket that starts full, so a new key may burst at once.
    pub fn full(limit: &RateLimit, now: Instant) -> Self {
        Self { tokens: limit.burst, updated: now }
    }

    /// Takes one token, or says how long until one will be there.
    pub fn try_take(&mut self, limit: &RateLimit, now: Instant) -> Result<(), Duration> {
        let Some(rate) = limit.per_second else {
            return Ok(());
        };
        // `saturating_duration_since`: a caller that read the clock before
        // another took the lock may pass an instant slightly in the past.
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(limit.burst);
        self.updated = self.updated.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// The buckets of every key, indexed by [`crate::auth::Caller::key_index`].
pub struct RateLimiter {
    limit: RateLimit,
    buckets: Vec<Mutex<TokenBucket>>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit, keys: usize) -> Self {
        let now = Instant::now();
        Self { limit, buckets: (0..keys).map(|_| Mutex::new(TokenBucket::full(&limit, now))).collect() }
    }

    /// Spends one token of `key`, or says how long it must wait.
    pub fn check(&self, key: usize) -> Result<(), Duration> {
        if self.limit.per_second.is_none() {
            return Ok(());
        }
        let Some(bucket) = self.buckets.get(key) else {
            return Ok(());
        };
        // A poisoned lock only means another request panicked mid-update of
        // two numbers; the bucket is still usable.
        let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket.try_take(&self.limit, Instant::now())
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }
}

/// The `Retry-After` value for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

impl std::fmt::Display for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.per_second {
            Some(rate) => write!(f, "{rate} requests/s, burst {}", self.burst),
            None => write!(f, "no limit"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_its_burst_then_refills_at_the_rate() {
        let limit = RateLimit::new(10.0, 3).unwrap();
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(&limit, t0);
        for _ in 0..3 {
            bucket.try_take(&limit, t0).unwrap();
        }
        let wait = bucket.try_take(&limit, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // 50 ms later half a token has come back: still not enough.
        let wait = bucket.try_take(&limit, t0 + Duration::from_millis(50)).unwrap_err();
        assert!(wait <= Duration::from_millis(51) && wait >= Duration::from_millis(49), "{wait:?}");
        bucket.try_take(&limit, t0 + Duration::from_millis(100)).unwrap();
        // A long idle refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            bucket.try_take(&limit, later).unwrap();
        }
        assert!(bucket.try_take(&limit, later).is_err());
    }

    #[test]
    fn an_instant_from_before_the_last_update_does_not_panic_or_refill() {
        let limit = RateLimit::new(1.0, 1).unwrap();
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(&limit, t0 + Duration::from_secs(1));
        bucket.try_take(&limit, t0).unwrap();
        assert!(bucket.try_take(&limit, t0).is_err());
    }

    #[test]
    fn keys_have_buckets_of_their_own() {
        let limiter = RateLimiter::new(RateLimit::new(1.0, 2).unwrap(), 2);
        assert!(limiter.check(0).is_ok() && limiter.check(0).is_ok());
        assert!(limiter.check(0).is_err(), "key 0 spent its burst");
        assert!(limiter.check(1).is_ok(), "key 1 is untouched by key 0's flood");
    }

    #[test]
    fn zero_turns_the_limit_off_and_bad_values_are_named() {
        let limiter = RateLimiter::new(RateLimit::new(0.0, 0).unwrap(), 1);
        assert!((0..10_000).all(|_| limiter.check(0).is_ok()));
        assert!(RateLimit::new(-1.0, 1).unwrap_err().contains("rate_limit_per_second"));
        assert!(RateLimit::new(f64::NAN, 1).unwrap_err().contains("rate_limit_per_second"));
        assert!(RateLimit::new(5.0, 0).unwrap_err().contains("rate_limit_burst"));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
    }
}
