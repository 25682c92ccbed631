//! The per-endpoint delivery policies, as plain state machines driven by the worker:
//! the retry schedule with jitter, the circuit breaker and the token-bucket rate limit.
//! They take the current time as an argument and must not sleep, spawn or do I/O, so
//! they are tested without a clock.

use rand::Rng;
use std::time::{Duration, Instant};

/// `[retry]`: N steps mean N retries after the first attempt.
#[derive(Debug, Clone)]
pub struct RetrySchedule {
    pub steps: Vec<Duration>,
    pub jitter: f64,
}

impl RetrySchedule {
    /// The wait before the retry that follows `failed_attempts` failures, or `None` when
    /// the schedule is exhausted and the event is dead. A receiver's `Retry-After` may
    /// lengthen the wait, up to the schedule's longest step, never shorten it: a
    /// `Retry-After: 0` (or a date past) would spend the whole schedule in seconds.
    pub fn delay(&self, failed_attempts: u32, retry_after: Option<Duration>) -> Option<Duration> {
        let step = *self.steps.get(failed_attempts.checked_sub(1)? as usize)?;
        if let Some(asked) = retry_after {
            let cap = self.steps.iter().max().copied().unwrap_or(step);
            // The step is one of the steps, so never past the cap.
            return Some(asked.clamp(step, cap));
        }
        if self.jitter <= 0.0 {
            return Some(step);
        }
        let factor = 1.0 + rand::thread_rng().gen_range(-self.jitter..=self.jitter);
        Some(step.mul_f64(factor.max(0.0)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

/// Opens after `threshold` consecutive failures; after `cooldown` lets one probe through;
/// the probe's success closes it, its failure reopens it for a full cooldown.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    consecutive: u32,
    open_until: Option<Instant>,
    probe_in_flight: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold,
            cooldown,
            consecutive: 0,
            open_until: None,
            probe_in_flight: false,
        }
    }

    pub fn state(&self, now: Instant) -> CircuitState {
        match self.open_until {
            None => CircuitState::Closed,
            Some(until) if now < until => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// Whether a new request may start now: `Some(true)` when it is a half-open circuit's
    /// one probe, whose result alone closes or reopens the circuit.
    pub fn try_acquire(&mut self, now: Instant) -> Option<bool> {
        match self.state(now) {
            CircuitState::Closed => Some(false),
            CircuitState::Open => None,
            CircuitState::HalfOpen if self.probe_in_flight => None,
            CircuitState::HalfOpen => {
                self.probe_in_flight = true;
                Some(true)
            }
        }
    }

    /// When the circuit will let a probe through, if it is open.
    pub fn reopens_at(&self, now: Instant) -> Option<Instant> {
        self.open_until.filter(|until| now < *until)
    }

    /// When the circuit opened last lets (or let) its probe through; `None` while closed.
    /// [`Breaker::state`] follows from it alone.
    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    /// A request [`Breaker::try_acquire`] let through that never went out: a half-open
    /// circuit's probe is still to be sent, and nothing else changes.
    pub fn release(&mut self, probe: bool) {
        if probe {
            self.probe_in_flight = false;
        }
    }

    pub fn on_success(&mut self) {
        self.consecutive = 0;
        self.open_until = None;
        self.probe_in_flight = false;
    }

    /// Records a failure (`probe`: of the half-open circuit's probe); returns true when
    /// it opened (or reopened) the circuit. A late failure of a request sent before the
    /// circuit opened leaves an open or half-open circuit, and its probe, alone.
    pub fn on_failure(&mut self, now: Instant, probe: bool) -> bool {
        self.consecutive = self.consecutive.saturating_add(1);
        if probe {
            self.probe_in_flight = false;
        }
        if probe || (self.open_until.is_none() && self.consecutive >= self.threshold) {
            self.open_until = Some(now + self.cooldown);
            return true;
        }
        false
    }
}

/// Requests per second with a burst of at most one second's worth.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, now: Instant) -> Self {
        TokenBucket {
            rate: per_second as f64,
            tokens: per_second as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        self.last = now;
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the next token will be there.
    pub fn next_token_at(&self, now: Instant) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        now + Duration::from_secs_f64(missing / self.rate.max(f64::MIN_POSITIVE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> RetrySchedule {
        RetrySchedule {
            steps: vec![Duration::from_secs(1), Duration::from_secs(5)],
            jitter: 0.0,
        }
    }

    #[test]
    fn n_steps_mean_n_retries() {
        let s = schedule();
        assert_eq!(s.delay(1, None), Some(Duration::from_secs(1)));
        assert_eq!(s.delay(2, None), Some(Duration::from_secs(5)));
        assert_eq!(s.delay(3, None), None);
    }

    #[test]
    fn retry_after_lengthens_the_wait_up_to_the_longest_step_and_never_shortens_it() {
        let s = schedule();
        assert_eq!(s.delay(1, Some(Duration::from_secs(3))), Some(Duration::from_secs(3)));
        assert_eq!(s.delay(1, Some(Duration::ZERO)), Some(Duration::from_secs(1)));
        assert_eq!(s.delay(2, Some(Duration::from_secs(2))), Some(Duration::from_secs(5)));
        assert_eq!(
            s.delay(1, Some(Duration::from_secs(3600))),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let s = RetrySchedule {
            steps: vec![Duration::from_secs(10)],
            jitter: 0.2,
        };
        for _ in 0..200 {
            let d = s.delay(1, None).unwrap();
            assert!(d >= Duration::from_secs(8) && d <= Duration::from_secs(12), "{d:?}");
        }
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(30));
        assert!(!b.on_failure(t0, false));
        assert!(!b.on_failure(t0, false));
        assert!(b.on_failure(t0, false));
        assert_eq!(b.state(t0), CircuitState::Open);
        assert_eq!(b.try_acquire(t0 + Duration::from_secs(29)), None);
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.try_acquire(t1), Some(true), "one probe after the cooldown");
        assert_eq!(b.try_acquire(t1), None, "only one probe");
        // A request sent before the circuit opened fails late: the probe is still the probe.
        assert!(!b.on_failure(t1, false));
        assert_eq!(b.state(t1), CircuitState::HalfOpen);
        assert_eq!(b.try_acquire(t1), None, "still only one probe");
        assert!(b.on_failure(t1, true), "a failed probe reopens");
        assert_eq!(b.state(t1 + Duration::from_secs(29)), CircuitState::Open);
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(b.try_acquire(t2), Some(true));
        b.on_success();
        assert_eq!(b.state(t2), CircuitState::Closed);
        assert_eq!((b.try_acquire(t2), b.try_acquire(t2)), (Some(false), Some(false)));
    }

    #[test]
    fn bucket_bursts_one_second_then_paces() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, t0);
        let burst = (0..100).filter(|_| bucket.try_take(t0)).count();
        assert_eq!(burst, 10);
        assert!(!bucket.try_take(t0));
        let next = bucket.next_token_at(t0);
        assert!(bucket.try_take(next + Duration::from_millis(1)));
    }
}
