//! What the distributor measures of each instance, lock-free on the
//! request path: requests by status class, in flight, a latency histogram
//! (cumulative for Prometheus, and per interval for the WLM's p50/p99),
//! and a smoothed latency for least-loaded choices.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Latency bucket bounds, seconds: 100 µs to 60 s, about ×2 apart.
pub const BUCKETS: [f64; 20] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
    0.512, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0,
];

/// Status classes counted apart: 1xx..5xx, and "failed" (no response: the
/// distributor answered 502/504 itself).
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "failed"];

/// A histogram with [`BUCKETS`] (+ one past the last).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn record(&self, seconds: f64) {
        let i = BUCKETS.partition_point(|b| *b < seconds);
        self.counts[i].fetch_add(1, Relaxed);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a latency in microseconds"
        )]
        self.sum_us.fetch_add((seconds * 1e6) as u64, Relaxed);
    }

    /// Counts per bucket (not cumulative) and the sum in seconds.
    #[must_use]
    pub fn snapshot(&self) -> ([u64; BUCKETS.len() + 1], f64) {
        let counts = std::array::from_fn(|i| self.counts[i].load(Relaxed));
        #[expect(clippy::cast_precision_loss, reason = "a sum of latencies")]
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        (counts, sum)
    }
}

/// The `q` quantile (0..1) of per-bucket `counts`, as the bucket's upper
/// bound (the last, open bucket reports the last bound); `None` if empty.
#[must_use]
pub fn quantile(counts: &[u64; BUCKETS.len() + 1], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank among the counts"
    )]
    let rank = ((total as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(BUCKETS[i.min(BUCKETS.len() - 1)]);
        }
    }
    Some(BUCKETS[BUCKETS.len() - 1])
}

/// One instance's measurements.
#[derive(Debug, Default)]
pub struct InstanceStats {
    pub in_flight: AtomicU64,
    /// Requests by [`CLASSES`].
    pub by_class: [AtomicU64; CLASSES.len()],
    pub latency: Histogram,
    /// Smoothed latency (head), milliseconds, as f64 bits.
    ewma_ms: AtomicU64,
    /// Request and response body bytes relayed.
    pub bytes: AtomicU64,
    /// The histogram as the last interval ended (for its p50/p99).
    last: std::sync::Mutex<[u64; BUCKETS.len() + 1]>,
    last_requests: AtomicU64,
    last_errors: AtomicU64,
}

/// What the WLM element of an instance hears from the distributor.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Interval {
    pub requests: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub in_flight: u64,
    /// Failed and 5xx answers over all answers, in the interval.
    pub error_rate: Option<f64>,
}

impl InstanceStats {
    /// A response's head arrived after `seconds` (or the request failed:
    /// `status` None).
    pub fn answered(&self, status: Option<u16>, seconds: f64) {
        let class = status.map_or(5, |s| usize::from((s / 100).clamp(1, 5)) - 1);
        self.by_class[class].fetch_add(1, Relaxed);
        if status.is_none() {
            return;
        }
        self.latency.record(seconds);
        let ms = seconds * 1e3;
        // EWMA, weight 1/8: a slow instance shows within a few requests. A
        // lost update under contention only delays that a little.
        let old = f64::from_bits(self.ewma_ms.load(Relaxed));
        let new = if old == 0.0 {
            ms
        } else {
            old + (ms - old) / 8.0
        };
        self.ewma_ms.store(new.to_bits(), Relaxed);
    }

    #[must_use]
    pub fn load(&self) -> super::route::Load {
        super::route::Load {
            in_flight: self.in_flight.load(Relaxed),
            latency_ms: f64::from_bits(self.ewma_ms.load(Relaxed)),
        }
    }

    /// Requests answered or failed, ever.
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.by_class.iter().map(|c| c.load(Relaxed)).sum()
    }

    fn errors(&self) -> u64 {
        self.by_class[4].load(Relaxed) + self.by_class[5].load(Relaxed)
    }

    /// What happened since the last call.
    pub fn interval(&self) -> Interval {
        let (now, _) = self.latency.snapshot();
        let mut last = self.last.lock().expect("stats lock");
        let delta: [u64; BUCKETS.len() + 1] =
            std::array::from_fn(|i| now[i].saturating_sub(last[i]));
        *last = now;
        let errors = self.errors();
        let new_errors = errors.saturating_sub(self.last_errors.swap(errors, Relaxed));
        let total = self.requests();
        let requests = total.saturating_sub(self.last_requests.swap(total, Relaxed));
        #[expect(clippy::cast_precision_loss, reason = "a ratio")]
        let error_rate = (requests > 0).then(|| new_errors as f64 / requests as f64);
        Interval {
            requests,
            latency_p50_ms: quantile(&delta, 0.5).map(|s| s * 1e3),
            latency_p99_ms: quantile(&delta, 0.99).map(|s| s * 1e3),
            in_flight: self.in_flight.load(Relaxed),
            error_rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds() {
        let h = Histogram::default();
        for _ in 0..98 {
            h.record(0.0015);
        }
        h.record(0.3);
        h.record(0.3);
        let (c, sum) = h.snapshot();
        assert_eq!(quantile(&c, 0.5), Some(0.002));
        assert_eq!(quantile(&c, 0.99), Some(0.512));
        assert!((sum - (98.0 * 0.0015 + 0.6)).abs() < 1e-3, "{sum}");
        assert_eq!(quantile(&[0; BUCKETS.len() + 1], 0.5), None);
        let huge = Histogram::default();
        huge.record(1000.0);
        assert_eq!(quantile(&huge.snapshot().0, 0.5), Some(60.0));
    }

    #[test]
    fn an_interval_counts_only_its_own_requests() {
        let s = InstanceStats::default();
        for _ in 0..10 {
            s.answered(Some(200), 0.001);
        }
        let first = s.interval();
        assert_eq!(first.requests, 10);
        assert_eq!(first.error_rate, Some(0.0));
        s.answered(Some(503), 0.2);
        s.answered(None, 0.0);
        s.answered(Some(200), 0.2);
        let second = s.interval();
        assert_eq!(second.requests, 3);
        assert_eq!(second.latency_p50_ms, Some(256.0));
        let rate = second.error_rate.unwrap();
        assert!((rate - 2.0 / 3.0).abs() < 1e-9, "{rate}");
        assert_eq!(s.interval().requests, 0);
        assert_eq!(s.requests(), 13);
    }

    #[test]
    fn a_slow_instance_shows_in_its_load() {
        let fast = InstanceStats::default();
        let slow = InstanceStats::default();
        for _ in 0..20 {
            fast.answered(Some(200), 0.001);
            slow.answered(Some(200), 0.05);
        }
        assert!(slow.load().cost() > 10.0 * fast.load().cost());
    }
}
