//! Summary statistics over benchmark samples: percentiles, median, Jain's fairness index,
//! range and safe ratios.
//!
//! Owns only arithmetic; no I/O, no clock. Every function takes a slice of samples in whatever
//! unit the caller measured and answers in the same unit.
//!
//! Invariants:
//! - An empty input (after dropping NaNs, where stated) gives `None`, never a made-up zero, so
//!   a path that produced no samples cannot look infinitely fast in a table.
//! - Nothing here panics, whatever the input: NaNs are filtered out where order matters, and
//!   the sort uses [`f64::total_cmp`].
//!
//! Percentile definition (nearest rank): for `n` sorted samples `x[1..=n]` and a fraction
//! `p` in (0, 1], the `p`-percentile is `x[ceil(p·n)]` (rank clamped to `1..=n`). It is always
//! an observed sample, never an interpolation, so p99 of 50 samples is the maximum — readers of
//! a p999 column must look at `n` before trusting it.
//!
//! Limits: one pass with a sort (O(n log n), one copy of the input); fine for the up to a few
//! million samples a scenario keeps.

use serde::{Deserialize, Serialize};

/// The usual latency summary of one set of samples (serialisable, so scenarios can keep it in
/// their `raw` JSON).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Samples counted (NaNs excluded).
    pub n: usize,
    pub min: f64,
    /// Nearest-rank percentiles (see the module doc).
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Summarises `samples`. NaN samples are dropped (they carry no order); `n` counts what
    /// is left. `None` when nothing is left. Infinities are kept and sort to the ends; the
    /// mean is then infinite (or NaN with both signs), which is what the data says.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let sorted = sorted_without_nan(samples);
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        Some(Summary {
            n: sorted.len(),
            min,
            p50: nearest_rank(&sorted, 0.50)?,
            p90: nearest_rank(&sorted, 0.90)?,
            p99: nearest_rank(&sorted, 0.99)?,
            p999: nearest_rank(&sorted, 0.999)?,
            max,
            mean,
        })
    }
}

/// The median by nearest rank (the lower middle sample for an even count, so the answer is
/// always an observed value). NaNs are dropped; `None` when nothing is left.
pub fn median(xs: &[f64]) -> Option<f64> {
    nearest_rank(&sorted_without_nan(xs), 0.5)
}

/// Jain's fairness index `(Σx)² / (n·Σx²)`: 1 when all shares are equal, `1/n` when one
/// takes everything. `None` for an empty input, when all values are zero (fairness of
/// nothing is undefined), or when a value is negative or not finite (shares are rates, so
/// such an input is a caller bug that must not print as a plausible index).
pub fn jain_index(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() || xs.iter().any(|x| !x.is_finite() || *x < 0.0) {
        return None;
    }
    let sum: f64 = xs.iter().sum();
    let sum_sq: f64 = xs.iter().map(|x| x * x).sum();
    if sum_sq == 0.0 {
        return None;
    }
    // Rounding can push a perfectly fair index a hair above 1; the definition caps it.
    Some((sum * sum / (xs.len() as f64 * sum_sq)).min(1.0))
}

/// The smallest and the largest sample, NaNs ignored; `None` when nothing is left.
pub fn min_max(xs: &[f64]) -> Option<(f64, f64)> {
    xs.iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(None, |acc, x| match acc {
            None => Some((x, x)),
            Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
        })
}

/// `a / b`, or `None` when `b` is zero or not finite, or `a` is NaN — so "SNAS vs direct"
/// columns show "n/a" instead of `inf` when a baseline is missing.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    if b == 0.0 || !b.is_finite() || a.is_nan() {
        return None;
    }
    Some(a / b)
}

fn sorted_without_nan(xs: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// Nearest rank on an already sorted slice: `x[ceil(p·n)]`, 1-based, clamped.
fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    // `p·n` in f64 can land a hair above an integer (0.9·10 = 9.000000000000002), which
    // would bump the rank by one; rounding to 9 decimals first removes that artefact
    // without changing any genuine fractional rank at realistic sample counts.
    let exact = ((p * n as f64) * 1e9).round() / 1e9;
    let rank = (exact.ceil() as usize).clamp(1, n);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_to(n: usize) -> Vec<f64> {
        (1..=n).map(|i| i as f64).collect()
    }

    #[test]
    fn summary_of_empty_input_is_none() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN, f64::NAN]), None);
    }

    #[test]
    fn summary_uses_nearest_rank_percentiles() {
        let s = Summary::of(&one_to(1000)).unwrap();
        assert_eq!(s.n, 1000);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.p50, 500.0);
        assert_eq!(s.p90, 900.0);
        assert_eq!(s.p99, 990.0);
        assert_eq!(s.p999, 999.0);
        assert_eq!(s.max, 1000.0);
        assert_eq!(s.mean, 500.5);
    }

    #[test]
    fn percentiles_of_few_samples_are_observed_values() {
        // 10 samples: p90 is rank 9 (no float artefact bumping it to 10), p99 is the max.
        let s = Summary::of(&one_to(10)).unwrap();
        assert_eq!(s.p50, 5.0);
        assert_eq!(s.p90, 9.0);
        assert_eq!(s.p99, 10.0);
        assert_eq!(s.p999, 10.0);
    }

    #[test]
    fn summary_ignores_unsorted_order_and_nan() {
        let s = Summary::of(&[3.0, f64::NAN, 1.0, 2.0]).unwrap();
        assert_eq!(s.n, 3);
        assert_eq!((s.min, s.p50, s.max), (1.0, 2.0, 3.0));
        assert_eq!(s.mean, 2.0);
    }

    #[test]
    fn median_of_even_count_is_lower_middle() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.0));
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn jain_is_one_for_equal_shares_and_one_over_n_for_a_hog() {
        assert_eq!(jain_index(&[5.0, 5.0, 5.0, 5.0]), Some(1.0));
        let hog = jain_index(&[10.0, 0.0, 0.0, 0.0]).unwrap();
        assert!((hog - 0.25).abs() < 1e-12, "{hog}");
    }

    #[test]
    fn jain_rejects_empty_zero_negative_and_infinite_input() {
        assert_eq!(jain_index(&[]), None);
        assert_eq!(jain_index(&[0.0, 0.0]), None);
        assert_eq!(jain_index(&[1.0, -1.0]), None);
        assert_eq!(jain_index(&[1.0, f64::INFINITY]), None);
        assert_eq!(jain_index(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn min_max_skips_nan() {
        assert_eq!(min_max(&[f64::NAN, 2.0, -1.0, 5.0]), Some((-1.0, 5.0)));
        assert_eq!(min_max(&[f64::NAN]), None);
        assert_eq!(min_max(&[]), None);
    }

    #[test]
    fn ratio_refuses_zero_and_non_finite_denominators() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        assert_eq!(ratio(3.0, -0.0), None);
        assert_eq!(ratio(3.0, f64::INFINITY), None);
        assert_eq!(ratio(3.0, f64::NAN), None);
        assert_eq!(ratio(f64::NAN, 1.0), None);
    }

    proptest! {
        #[test]
        fn percentiles_are_ordered_and_within_range(
            xs in proptest::collection::vec(-1e9f64..1e9, 1..500)
        ) {
            let s = Summary::of(&xs).unwrap();
            prop_assert_eq!(s.n, xs.len());
            prop_assert!(s.min <= s.p50);
            prop_assert!(s.p50 <= s.p90);
            prop_assert!(s.p90 <= s.p99);
            prop_assert!(s.p99 <= s.p999);
            prop_assert!(s.p999 <= s.max);
            prop_assert!(s.min <= s.mean + 1e-6 * s.mean.abs().max(1.0));
            prop_assert!(s.mean <= s.max + 1e-6 * s.max.abs().max(1.0));
            prop_assert!(xs.contains(&s.p50) && xs.contains(&s.p99));
        }

        #[test]
        fn jain_index_is_in_unit_interval(
            xs in proptest::collection::vec(0f64..1e6, 1..100)
        ) {
            if let Some(j) = jain_index(&xs) {
                let n = xs.len() as f64;
                prop_assert!(j > 0.0 && j <= 1.0, "{}", j);
                prop_assert!(j >= 1.0 / n - 1e-12, "{} < 1/{}", j, n);
            } else {
                prop_assert!(xs.iter().all(|x| *x == 0.0));
            }
        }

        #[test]
        fn summary_never_panics_on_arbitrary_floats(
            xs in proptest::collection::vec(proptest::num::f64::ANY, 0..50)
        ) {
            let s = Summary::of(&xs);
            let finite_or_inf = xs.iter().filter(|x| !x.is_nan()).count();
            prop_assert_eq!(s.map(|s| s.n), (finite_or_inf > 0).then_some(finite_or_inf));
        }
    }
}
