//! Hashed timer wheel: items become due at a time point and are handed out in due order, at
//! slot granularity.
//!
//! Used by the pacer (packets, 10 µs slots) and by conntrack (flow expiry checks, 1 s slots).
//!
//! # Invariants
//! - `slots.len()` is a power of two; an item due at `t` sits in slot `(t / granularity) mod
//!   slots`. Items due further ahead than one revolution share a slot with nearer ones and are
//!   skipped (kept) until their time comes, so any due time is accepted; the cost of that is a
//!   re-scan per revolution, which is why the wheel should span the usual delays.
//! - `pop_due(now)` hands out every item with `due ≤ now`. Within one slot items keep insertion
//!   order; across slots, slot order. So items inserted with non-decreasing due times come out
//!   in insertion order (the pacer relies on this to keep a flow's packets in order).
//! - An item inserted with a due time already past goes into the current slot and is handed out
//!   by the next `pop_due`.
//!
//! # Limits
//! Precision is one slot: an item is handed out at the first `pop_due` call whose `now` is at
//! or after its due time, never earlier. `pop_due` visits at most one revolution of slots per
//! call, so its cost is O(slots walked + items handed out + far-future items re-scanned).

use std::time::Duration;

use crate::clock::{duration_to_nanos, Nanos};

/// Invalid wheel parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WheelError {
    /// granularity must be at least one nanosecond
    #[error("timer wheel granularity must be at least 1 ns")]
    ZeroGranularity,
    /// the wheel must have at least one and at most 2^24 slots
    #[error("timer wheel needs between 1 and 2^24 slots, asked for {0}")]
    SlotCount(usize),
}

/// A hashed timer wheel of items of type `T`.
#[derive(Debug)]
pub struct TimerWheel<T> {
    granularity_ns: u64,
    mask: u64,
    slots: Vec<Vec<(Nanos, T)>>,
    /// The next tick `pop_due` has not fully processed.
    cursor: u64,
    len: usize,
    scratch: Vec<(Nanos, T)>,
}

impl<T> TimerWheel<T> {
    /// A wheel whose slots are `granularity` wide and that spans at least `span` (rounded up to a
    /// power-of-two slot count), starting at `now`.
    pub fn new(granularity: Duration, span: Duration, now: Nanos) -> Result<Self, WheelError> {
        let g = duration_to_nanos(granularity);
        if g == 0 {
            return Err(WheelError::ZeroGranularity);
        }
        let wanted = duration_to_nanos(span).div_ceil(g).max(1);
        let count = usize::try_from(wanted)
            .unwrap_or(usize::MAX)
            .checked_next_power_of_two()
            .unwrap_or(usize::MAX);
        if count > 1 << 24 {
            return Err(WheelError::SlotCount(count));
        }
        let mut slots = Vec::with_capacity(count);
        slots.resize_with(count, Vec::new);
        Ok(TimerWheel {
            granularity_ns: g,
            mask: count as u64 - 1,
            slots,
            cursor: now.as_nanos() / g,
            len: 0,
            scratch: Vec::new(),
        })
    }

    /// Number of items held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no item is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Time spanned by one revolution.
    pub fn span(&self) -> Duration {
        Duration::from_nanos(self.granularity_ns.saturating_mul(self.mask + 1))
    }

    /// Adds `item`, due at `due`.
    pub fn insert(&mut self, due: Nanos, item: T) {
        let tick = (due.as_nanos() / self.granularity_ns).max(self.cursor);
        let slot = (tick & self.mask) as usize;
        self.slots[slot].push((due, item));
        self.len += 1;
    }

    /// Moves every item due at or before `now` into `out`, in due order (at slot granularity).
    pub fn pop_due<E: Extend<T>>(&mut self, now: Nanos, out: &mut E) {
        let now_tick = now.as_nanos() / self.granularity_ns;
        if now_tick < self.cursor || self.len == 0 {
            self.cursor = self.cursor.max(now_tick);
            return;
        }
        // One revolution visits every slot; more would only revisit them.
        let first = self.cursor.max(now_tick.saturating_sub(self.mask));
        for tick in first..=now_tick {
            if self.len == 0 {
                break;
            }
            let slot = (tick & self.mask) as usize;
            if self.slots[slot].is_empty() {
                continue;
            }
            let mut items = std::mem::take(&mut self.slots[slot]);
            let mut keep = std::mem::take(&mut self.scratch);
            for (due, item) in items.drain(..) {
                if due <= now {
                    self.len -= 1;
                    out.extend(std::iter::once(item));
                } else {
                    keep.push((due, item));
                }
            }
            // Reuse both allocations: `keep` becomes the slot, the drained vector the scratch.
            self.slots[slot] = keep;
            self.scratch = items;
        }
        // The current tick may still hold items due later within it: revisit it next time.
        self.cursor = now_tick;
    }

    /// The earliest tick boundary at which an item may be due, scanning at most one revolution;
    /// `None` when empty. For callers that sleep until the next departure.
    pub fn next_due_hint(&self) -> Option<Nanos> {
        if self.len == 0 {
            return None;
        }
        for tick in self.cursor..=self.cursor + self.mask {
            let slot = &self.slots[(tick & self.mask) as usize];
            if let Some(min) = slot.iter().map(|(d, _)| *d).min() {
                if min.as_nanos() / self.granularity_ns <= tick {
                    return Some(min);
                }
            }
        }
        self.slots
            .iter()
            .flat_map(|s| s.iter().map(|(d, _)| *d))
            .min()
    }

    /// Bytes held by the wheel's slot vectors (capacity, not length).
    pub fn heap_bytes(&self) -> usize {
        let per = std::mem::size_of::<(Nanos, T)>();
        self.slots.capacity() * std::mem::size_of::<Vec<(Nanos, T)>>()
            + self.slots.iter().map(|s| s.capacity() * per).sum::<usize>()
            + self.scratch.capacity() * per
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Nanos {
        Nanos::from_nanos(n * 1_000)
    }

    fn wheel() -> TimerWheel<u32> {
        TimerWheel::new(Duration::from_micros(10), Duration::from_millis(1), us(0)).unwrap()
    }

    #[test]
    fn items_come_out_when_due_and_not_before() {
        let mut w = wheel();
        w.insert(us(25), 1);
        w.insert(us(15), 2);
        let mut out = Vec::new();
        w.pop_due(us(14), &mut out);
        assert!(out.is_empty());
        w.pop_due(us(15), &mut out);
        assert_eq!(out, vec![2]);
        w.pop_due(us(24), &mut out);
        assert_eq!(out, vec![2]);
        w.pop_due(us(30), &mut out);
        assert_eq!(out, vec![2, 1]);
        assert!(w.is_empty());
    }

    #[test]
    fn non_decreasing_due_times_keep_insertion_order() {
        let mut w = wheel();
        for i in 0..100u32 {
            w.insert(us(u64::from(i) * 3), i);
        }
        let mut out = Vec::new();
        w.pop_due(us(1_000), &mut out);
        assert_eq!(out, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn items_beyond_one_revolution_wait_for_their_time() {
        let mut w = wheel();
        let span_us = w.span().as_micros() as u64;
        w.insert(us(span_us + 20), 7);
        w.insert(us(20), 8);
        let mut out = Vec::new();
        w.pop_due(us(25), &mut out);
        assert_eq!(out, vec![8]);
        w.pop_due(us(span_us + 19), &mut out);
        assert_eq!(out, vec![8]);
        w.pop_due(us(span_us + 20), &mut out);
        assert_eq!(out, vec![8, 7]);
    }

    #[test]
    fn past_due_insert_comes_out_next_pop() {
        let mut w = wheel();
        let mut out = Vec::new();
        w.pop_due(us(500), &mut out);
        w.insert(us(100), 3);
        w.pop_due(us(500), &mut out);
        assert_eq!(out, vec![3]);
    }

    #[test]
    fn a_long_jump_hands_out_everything_due() {
        let mut w = wheel();
        for i in 0..1_000u32 {
            w.insert(us(u64::from(i) * 7), i);
        }
        let mut out = Vec::new();
        w.pop_due(us(1_000_000), &mut out);
        assert_eq!(out.len(), 1_000);
        assert!(w.is_empty());
    }

    #[test]
    fn next_due_hint_names_the_earliest_item() {
        let mut w = wheel();
        assert_eq!(w.next_due_hint(), None);
        w.insert(us(300), 1);
        w.insert(us(120), 2);
        assert_eq!(w.next_due_hint(), Some(us(120)));
    }

    #[test]
    fn oversized_wheel_is_rejected() {
        assert!(matches!(
            TimerWheel::<u8>::new(Duration::from_nanos(1), Duration::from_secs(1), us(0)),
            Err(WheelError::SlotCount(_))
        ));
    }

    #[test]
    fn zero_granularity_is_rejected() {
        assert_eq!(
            TimerWheel::<u8>::new(Duration::ZERO, Duration::from_secs(1), us(0)).unwrap_err(),
            WheelError::ZeroGranularity
        );
    }
}
