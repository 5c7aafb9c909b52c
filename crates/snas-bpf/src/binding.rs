//! The port rules one DNS-learned address holds for a job: the union of every allowed name's
//! rules on that address, each with its own expiry.
//!
//! Owns the merge [`crate::Tier1::allow_ip`] applies to the entry already in the map (pure;
//! the caller does the map I/O):
//! - an identical `(proto, lo, hi)` rule is refreshed to the later of both expiries (no expiry
//!   is the latest);
//! - other rules stay, expired or not: BPF ignores expired rules for new connections but still
//!   honours them for the packets of established flows, so that a TTL never cuts a flow;
//! - new rules are added.
//!
//! Bound: an entry holds [`MAX_PORT_RULES`]. When the union is larger, expired rules go first
//! (earliest expiry first), then the live rule that expires first; each live rule that goes is
//! counted as displaced (`Tier1::displaced_port_rules`). Tier 2 holds the full union, so a
//! displaced rule costs a refusal at tier 1 only until the name is resolved again.
#![forbid(unsafe_code)]

use crate::config::{PortRule, MAX_PORT_RULES};

/// A rule and its expiry in whole CLOCK_MONOTONIC seconds (`None`: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimedRule {
    pub rule: PortRule,
    pub expires_s: Option<u32>,
}

/// The later of two expiries; `None` (never) is the latest.
fn later(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

/// The result of a merge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Merged {
    /// The rules to write, at most [`MAX_PORT_RULES`].
    pub rules: Vec<TimedRule>,
    /// Live rules that did not fit.
    pub displaced: u64,
}

/// Merges `new` rules valid until `expires_s` into `existing` at `now_s`.
pub(crate) fn merge(
    existing: &[TimedRule],
    new: &[PortRule],
    expires_s: Option<u32>,
    now_s: u32,
) -> Merged {
    let mut rules: Vec<TimedRule> = existing.to_vec();
    for r in new {
        match rules.iter_mut().find(|t| t.rule == *r) {
            Some(t) => t.expires_s = later(t.expires_s, expires_s),
            None => rules.push(TimedRule {
                rule: *r,
                expires_s,
            }),
        }
    }
    let mut displaced = 0;
    while rules.len() > MAX_PORT_RULES {
        let expired = |t: &TimedRule| t.expires_s.is_some_and(|e| now_s >= e);
        // Expired rules first, then the earliest expiry; `None` sorts last.
        let victim = rules
            .iter()
            .enumerate()
            .min_by_key(|(_, t)| {
                (
                    !expired(t),
                    t.expires_s.unwrap_or(u32::MAX),
                    t.expires_s.is_none(),
                )
            })
            .map(|(i, _)| i);
        let Some(i) = victim else { break };
        if !expired(&rules[i]) {
            displaced += 1;
        }
        rules.remove(i);
    }
    Merged { rules, displaced }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleProtocol;

    fn tcp(port: u16) -> PortRule {
        PortRule::port(RuleProtocol::Tcp, port)
    }

    fn timed(rule: PortRule, expires_s: Option<u32>) -> TimedRule {
        TimedRule { rule, expires_s }
    }

    #[test]
    fn a_second_name_on_the_address_adds_its_rules() {
        let m = merge(&[timed(tcp(80), Some(100))], &[tcp(7)], Some(50), 10);
        assert_eq!(
            m.rules,
            vec![timed(tcp(80), Some(100)), timed(tcp(7), Some(50))]
        );
        assert_eq!(m.displaced, 0);
    }

    #[test]
    fn an_identical_rule_is_refreshed_to_the_later_expiry() {
        let m = merge(&[timed(tcp(80), Some(100))], &[tcp(80)], Some(200), 10);
        assert_eq!(m.rules, vec![timed(tcp(80), Some(200))]);
        let m = merge(&[timed(tcp(80), Some(100))], &[tcp(80)], Some(50), 10);
        assert_eq!(m.rules, vec![timed(tcp(80), Some(100))], "never shortened");
        let m = merge(&[timed(tcp(80), Some(100))], &[tcp(80)], None, 10);
        assert_eq!(
            m.rules,
            vec![timed(tcp(80), None)],
            "no expiry is the latest"
        );
    }

    #[test]
    fn expired_rules_stay_while_there_is_room() {
        let m = merge(&[timed(tcp(80), Some(5))], &[tcp(7)], Some(50), 10);
        assert_eq!(
            m.rules.len(),
            2,
            "an established flow may still use port 80"
        );
    }

    #[test]
    fn overflow_drops_expired_rules_first_then_the_earliest_expiry_and_counts_live_ones() {
        let mut existing: Vec<TimedRule> = (0..MAX_PORT_RULES as u16)
            .map(|i| timed(tcp(1000 + i), Some(100 + u32::from(i))))
            .collect();
        existing[3].expires_s = Some(5); // expired at now = 10
        let m = merge(&existing, &[tcp(7)], Some(500), 10);
        assert_eq!(m.rules.len(), MAX_PORT_RULES);
        assert!(!m.rules.iter().any(|t| t.rule == tcp(1003)));
        assert_eq!(m.displaced, 0, "an expired rule is not a loss");

        let m = merge(&m.rules, &[tcp(8)], Some(500), 10);
        assert_eq!(m.rules.len(), MAX_PORT_RULES);
        assert!(
            !m.rules.iter().any(|t| t.rule == tcp(1000)),
            "the rule that expires first (100) goes"
        );
        assert!(m.rules.iter().any(|t| t.rule == tcp(8)));
        assert_eq!(m.displaced, 1);
    }

    #[test]
    fn rules_without_expiry_are_displaced_last() {
        let existing: Vec<TimedRule> = (0..MAX_PORT_RULES as u16)
            .map(|i| timed(tcp(1000 + i), None))
            .collect();
        let m = merge(&existing, &[tcp(7)], Some(500), 10);
        assert!(
            !m.rules.iter().any(|t| t.rule == tcp(7)),
            "the new rule expires first"
        );
        assert_eq!(m.displaced, 1);
    }

    #[test]
    fn the_union_never_exceeds_the_bound_whatever_comes() {
        let mut rules = Vec::new();
        for round in 0u16..200 {
            let new: Vec<PortRule> = (0..(round % 5 + 1)).map(|i| tcp(round * 7 + i)).collect();
            let m = merge(
                &rules,
                &new,
                Some(u32::from(round % 13) + 1),
                u32::from(round % 17),
            );
            assert!(m.rules.len() <= MAX_PORT_RULES);
            rules = m.rules;
        }
    }
}
