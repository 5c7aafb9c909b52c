//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for the proxy choice of new flows.
//!
//! Owns: the pure table computation. The table has [`TABLE_SIZE`] slots (a prime; the C side
//! uses the same `MAGLEV_M`), each naming a proxy index; tier 1 picks
//! `slot[flow_hash % TABLE_SIZE]` for a new flow.
//!
//! Invariants: every backend gets `TABLE_SIZE / n` slots, give or take one; a backend's
//! preference list depends only on its identity (not on its index or on the other backends),
//! so removing one backend moves its own slots and only a small fraction of the others.
//! Limits: equal weights only. 4099 slots keep a rebuild to one 8 KiB map update; with up to
//! 64 proxies (MAX_PROXIES) the imbalance stays below 2 %.
#![forbid(unsafe_code)]

/// Number of slots, equal to `MAGLEV_M` in `bpf/lib/maps.h`.
pub const TABLE_SIZE: usize = 4099;

/// Slot value meaning "no backend" (the table of an empty backend set).
pub const EMPTY: u16 = 0xffff;

/// One proxy as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Index written into the table (the proxy's slot in the proxies map).
    pub index: u16,
    /// Stable identity that seeds the preference list (e.g. the proxy's IPv4 address).
    pub id: u64,
}

fn mix64(mut z: u64) -> u64 {
    // splitmix64 finaliser: a fixed, well-distributed hash of the identity.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Computes the lookup table for `backends` (order does not matter for the result).
pub fn build(backends: &[Backend]) -> Vec<u16> {
    let m = TABLE_SIZE as u64;
    let mut table = vec![EMPTY; TABLE_SIZE];
    if backends.is_empty() {
        return table;
    }
    let mut sorted = backends.to_vec();
    sorted.sort_by_key(|b| (b.id, b.index));
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            let offset = mix64(b.id ^ 0x6d61_676c_6576_0001) % m;
            let skip = mix64(b.id ^ 0x6d61_676c_6576_0002) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut filled = 0usize;
    'outer: loop {
        for (i, b) in sorted.iter().enumerate() {
            let (offset, skip) = perms[i];
            loop {
                let slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[slot] == EMPTY {
                    table[slot] = b.index;
                    filled += 1;
                    break;
                }
            }
            if filled == TABLE_SIZE {
                break 'outer;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                index: i,
                id: u64::from(u32::from_be_bytes([198, 51, 100, 10 + i as u8])),
            })
            .collect()
    }

    #[test]
    fn empty_backend_set_gives_empty_table() {
        assert!(build(&[]).iter().all(|&s| s == EMPTY));
    }

    #[test]
    fn every_backend_gets_its_fair_share() {
        for n in [1u16, 2, 3, 5, 7, 16, 64] {
            let t = build(&backends(n));
            assert!(t.iter().all(|&s| s < n));
            let fair = TABLE_SIZE / n as usize;
            for i in 0..n {
                let c = t.iter().filter(|&&s| s == i).count();
                assert!(
                    c.abs_diff(fair) <= 1,
                    "n={n} backend {i} has {c}, fair {fair}"
                );
            }
        }
    }

    #[test]
    fn removing_a_backend_moves_only_a_few_foreign_slots() {
        let all = backends(5);
        let before = build(&all);
        let after = build(&[all[0], all[1], all[3], all[4]]);
        let mut foreign_moves = 0;
        for (b, a) in before.iter().zip(&after) {
            if *b == 2 {
                assert_ne!(*a, 2);
            } else if a != b {
                foreign_moves += 1;
            }
        }
        // Maglev's disruption bound in practice: a few percent of the table.
        assert!(
            foreign_moves * 100 < TABLE_SIZE * 3,
            "{foreign_moves} foreign slots moved"
        );
    }

    #[test]
    fn table_does_not_depend_on_input_order() {
        let mut b = backends(7);
        let t1 = build(&b);
        b.reverse();
        assert_eq!(t1, build(&b));
    }
}
