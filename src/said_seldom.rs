//! Warnings said at most once per interval, with how many times they were due between:
//! a failing disk or a dead endpoint must not flood the journal. It owns only the
//! counting; what is said, and at which level, stays with the caller.

use std::sync::atomic::{AtomicU64, Ordering};

/// A warning said at most once per interval, with how many times it was due meanwhile.
pub struct RateLimited {
    every_ms: u64,
    /// When it was last said (0: never).
    last_ms: AtomicU64,
    due: AtomicU64,
}

impl RateLimited {
    pub const fn new(every_ms: u64) -> RateLimited {
        RateLimited {
            every_ms,
            last_ms: AtomicU64::new(0),
            due: AtomicU64::new(0),
        }
    }

    /// Counts one occasion; `Some(occasions since the last time)` when it is to be said.
    pub fn due(&self, now_ms: u64) -> Option<u64> {
        let due = self.due.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) < self.every_ms {
            return None;
        }
        // One caller wins the turn; the others count toward the next.
        self.last_ms
            .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        self.due.fetch_sub(due, Ordering::Relaxed);
        Some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_warning_is_said_once_per_interval_with_the_count_between() {
        let warning = RateLimited::new(1_000);
        assert_eq!(warning.due(5_000), Some(1));
        assert_eq!(warning.due(5_500), None);
        assert_eq!(warning.due(5_900), None);
        assert_eq!(warning.due(6_000), Some(3), "this one and the two held back");
        assert_eq!(warning.due(6_001), None);
    }
}
