//! Injected monotonic time for the sans-IO core.
//!
//! Owns the [`Nanos`] time point that every core call takes, the [`Clock`] trait the I/O layer
//! reads it from, a [`ManualClock`] for tests and simulations and a [`MonotonicClock`] for real
//! use.
//!
//! # Invariants
//! - `Nanos` is nanoseconds since an arbitrary, per-clock origin; only differences and order
//!   mean anything. A clock never goes backwards.
//! - Arithmetic saturates: `Nanos::MAX` stands for "never", and adding to it stays there.
//! - The core never reads a clock itself: the caller reads one and passes `now` in.

use std::fmt;
use std::time::{Duration, Instant};

/// A point on a monotonic clock, in nanoseconds since the clock's origin.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Nanos(u64);

impl Nanos {
    /// The clock's origin.
    pub const ZERO: Nanos = Nanos(0);
    /// The far future ("never").
    pub const MAX: Nanos = Nanos(u64::MAX);

    /// A time point `ns` nanoseconds after the origin.
    pub const fn from_nanos(ns: u64) -> Nanos {
        Nanos(ns)
    }

    /// Nanoseconds since the origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at [`Nanos::MAX`].
    pub fn saturating_add(self, d: Duration) -> Nanos {
        Nanos(self.0.saturating_add(duration_to_nanos(d)))
    }

    /// `self + ns` nanoseconds, saturating at [`Nanos::MAX`].
    pub const fn saturating_add_nanos(self, ns: u64) -> Nanos {
        Nanos(self.0.saturating_add(ns))
    }

    /// `self - d`, saturating at the origin.
    pub fn saturating_sub(self, d: Duration) -> Nanos {
        Nanos(self.0.saturating_sub(duration_to_nanos(d)))
    }

    /// Time from `earlier` to `self`; zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Nanos) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Debug for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nanos({})", self.0)
    }
}

/// A `Duration` in whole nanoseconds, saturating at `u64::MAX` (about 584 years).
pub(crate) fn duration_to_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Source of the current time for the I/O layer.
pub trait Clock {
    /// The current time. Never less than a value returned earlier.
    fn now(&self) -> Nanos;
}

/// A clock that only moves when told to: for tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: std::cell::Cell<Nanos>,
}

impl ManualClock {
    /// A clock reading `start`.
    pub fn new(start: Nanos) -> ManualClock {
        ManualClock {
            now: std::cell::Cell::new(start),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.set(self.now.get().saturating_add(d));
    }

    /// Sets the clock to `t`; ignored if `t` is earlier than the current reading, so the clock
    /// stays monotonic.
    pub fn set(&self, t: Nanos) {
        if t > self.now.get() {
            self.now.set(t);
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Nanos {
        self.now.get()
    }
}

/// The host's monotonic clock (`CLOCK_MONOTONIC` through [`Instant`]), origin at construction.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// A clock whose origin is now.
    pub fn new() -> MonotonicClock {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Nanos {
        Nanos(duration_to_nanos(self.origin.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_forward() {
        let c = ManualClock::new(Nanos::from_nanos(100));
        c.advance(Duration::from_nanos(50));
        assert_eq!(c.now(), Nanos::from_nanos(150));
        c.set(Nanos::from_nanos(10));
        assert_eq!(c.now(), Nanos::from_nanos(150));
        c.set(Nanos::from_nanos(1_000));
        assert_eq!(c.now(), Nanos::from_nanos(1_000));
    }

    #[test]
    fn arithmetic_saturates_at_never() {
        let t = Nanos::MAX.saturating_add(Duration::from_secs(1));
        assert_eq!(t, Nanos::MAX);
        assert_eq!(
            Nanos::from_nanos(5).saturating_sub(Duration::from_nanos(9)),
            Nanos::ZERO
        );
        assert_eq!(
            Nanos::from_nanos(5).saturating_duration_since(Nanos::from_nanos(9)),
            Duration::ZERO
        );
    }

    #[test]
    fn monotonic_clock_does_not_go_backwards() {
        let c = MonotonicClock::new();
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
    }
}
