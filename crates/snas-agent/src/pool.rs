//! The per-node job address pool.
//!
//! Owns the carving of `job_pool` into job subnets and which of them are in use. Pure: no I/O;
//! the agent restores the in-use set from its job records at start ([`SubnetPool::reserve`]).
//!
//! # Layout of one job subnet
//! - /30: network `n`, gateway (host veth, also the job's DNS stub address) `n+1`, sandbox `n+2`,
//!   broadcast `n+3`.
//! - /31 (RFC 3021 point-to-point): gateway `n`, sandbox `n+1`.
//!
//! # Invariants
//! - A slot is handed out at most once until released.
//! - Allocation picks the lowest free slot at or after a rotating cursor, so a just-freed
//!   subnet is not reused at once (late packets of an old job do not reach a new one).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Errors from the address pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Every job subnet of the pool is in use.
    #[error("job address pool {pool} is exhausted ({slots} subnets in use)")]
    Exhausted { pool: Ipv4Net, slots: u32 },
    /// A slot outside the pool (corrupt record).
    #[error("slot {slot} is outside the pool {pool} ({slots} subnets)")]
    OutOfRange {
        pool: Ipv4Net,
        slot: u32,
        slots: u32,
    },
    /// A slot reserved twice (two records claim the same subnet).
    #[error("slot {slot} of {pool} is already in use")]
    InUse { pool: Ipv4Net, slot: u32 },
}

/// The addresses of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobAddrs {
    /// Index of the subnet within the pool.
    pub slot: u32,
    /// Host-side address: the sandbox's default gateway and DNS stub address.
    pub gateway: Ipv4Addr,
    /// The sandbox's own address.
    pub sandbox: Ipv4Addr,
    /// Prefix length of the job subnet (30 or 31).
    pub prefix_len: u8,
}

/// Allocator of job subnets within one pool.
#[derive(Debug, Clone)]
pub struct SubnetPool {
    pool: Ipv4Net,
    prefix_len: u8,
    used: Vec<bool>,
    in_use: u32,
    cursor: u32,
}

impl SubnetPool {
    /// A pool of `/prefix_len` subnets in `pool`. `prefix_len` must be 30 or 31 and not shorter
    /// than the pool's own prefix (the config validation guarantees both).
    pub fn new(pool: Ipv4Net, prefix_len: u8) -> SubnetPool {
        let prefix_len = prefix_len.clamp(30, 31);
        let bits = u32::from(prefix_len.saturating_sub(pool.prefix_len()));
        let slots = 1usize << bits.min(31);
        SubnetPool {
            pool: pool.trunc(),
            prefix_len,
            used: vec![false; slots],
            in_use: 0,
            cursor: 0,
        }
    }

    fn slots(&self) -> u32 {
        u32::try_from(self.used.len()).unwrap_or(u32::MAX)
    }

    /// Number of subnets in use.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Whether every subnet is in use.
    pub fn is_full(&self) -> bool {
        self.in_use >= self.slots()
    }

    /// The addresses of `slot` (whether or not it is in use).
    pub fn addrs(&self, slot: u32) -> Result<JobAddrs, PoolError> {
        if slot >= self.slots() {
            return Err(PoolError::OutOfRange {
                pool: self.pool,
                slot,
                slots: self.slots(),
            });
        }
        let base = u32::from(self.pool.network()) + (slot << (32 - u32::from(self.prefix_len)));
        let (gw, sb) = if self.prefix_len == 31 {
            (base, base + 1)
        } else {
            (base + 1, base + 2)
        };
        Ok(JobAddrs {
            slot,
            gateway: Ipv4Addr::from(gw),
            sandbox: Ipv4Addr::from(sb),
            prefix_len: self.prefix_len,
        })
    }

    /// Hands out a free subnet.
    pub fn allocate(&mut self) -> Result<JobAddrs, PoolError> {
        let n = self.slots();
        for i in 0..n {
            let slot = (self.cursor + i) % n;
            if !self.used[slot as usize] {
                self.used[slot as usize] = true;
                self.in_use += 1;
                self.cursor = (slot + 1) % n;
                return self.addrs(slot);
            }
        }
        Err(PoolError::Exhausted {
            pool: self.pool,
            slots: n,
        })
    }

    /// Marks `slot` as in use (restoring state after a restart).
    pub fn reserve(&mut self, slot: u32) -> Result<JobAddrs, PoolError> {
        let addrs = self.addrs(slot)?;
        if self.used[slot as usize] {
            return Err(PoolError::InUse {
                pool: self.pool,
                slot,
            });
        }
        self.used[slot as usize] = true;
        self.in_use += 1;
        self.cursor = self.cursor.max((slot + 1) % self.slots());
        Ok(addrs)
    }

    /// Returns `slot` to the pool; releasing a free slot does nothing.
    pub fn release(&mut self, slot: u32) {
        if let Some(u) = self.used.get_mut(slot as usize) {
            if *u {
                *u = false;
                self.in_use -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn slash30_layout_is_gateway_plus_one_sandbox_plus_two() {
        let mut p = SubnetPool::new(net("10.255.0.0/16"), 30);
        let a = p.allocate().unwrap();
        assert_eq!(a.gateway, Ipv4Addr::new(10, 255, 0, 1));
        assert_eq!(a.sandbox, Ipv4Addr::new(10, 255, 0, 2));
        let b = p.allocate().unwrap();
        assert_eq!(b.gateway, Ipv4Addr::new(10, 255, 0, 5));
        assert_eq!(b.sandbox, Ipv4Addr::new(10, 255, 0, 6));
        assert_eq!(
            p.addrs(16383).unwrap().sandbox,
            Ipv4Addr::new(10, 255, 255, 254)
        );
    }

    #[test]
    fn slash31_layout_is_point_to_point() {
        let mut p = SubnetPool::new(net("10.255.0.0/24"), 31);
        let a = p.allocate().unwrap();
        assert_eq!(
            (a.gateway, a.sandbox),
            (Ipv4Addr::new(10, 255, 0, 0), Ipv4Addr::new(10, 255, 0, 1))
        );
        assert_eq!(
            p.addrs(127).unwrap().sandbox,
            Ipv4Addr::new(10, 255, 0, 255)
        );
        assert!(p.addrs(128).is_err());
    }

    #[test]
    fn pool_exhausts_then_recovers_after_release() {
        let mut p = SubnetPool::new(net("192.0.2.0/28"), 30);
        let got: Vec<_> = (0..4).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(p.in_use(), 4);
        assert!(matches!(
            p.allocate(),
            Err(PoolError::Exhausted { slots: 4, .. })
        ));
        p.release(got[2].slot);
        assert_eq!(p.allocate().unwrap().slot, got[2].slot);
    }

    #[test]
    fn freed_subnet_is_not_reused_immediately() {
        let mut p = SubnetPool::new(net("192.0.2.0/28"), 30);
        let a = p.allocate().unwrap();
        p.release(a.slot);
        assert_ne!(p.allocate().unwrap().slot, a.slot);
    }

    #[test]
    fn reserve_restores_and_refuses_double_claims() {
        let mut p = SubnetPool::new(net("192.0.2.0/28"), 30);
        p.reserve(1).unwrap();
        assert!(matches!(
            p.reserve(1),
            Err(PoolError::InUse { slot: 1, .. })
        ));
        assert!(matches!(p.reserve(9), Err(PoolError::OutOfRange { .. })));
        let fresh: HashSet<u32> = (0..3).map(|_| p.allocate().unwrap().slot).collect();
        assert!(!fresh.contains(&1));
        assert_eq!(p.in_use(), 4);
    }

    proptest::proptest! {
        #[test]
        fn allocations_never_overlap(ops in proptest::collection::vec(0u8..3, 1..200)) {
            let mut p = SubnetPool::new(net("198.51.100.0/26"), 30);
            let mut live: Vec<JobAddrs> = Vec::new();
            for op in ops {
                if op < 2 {
                    if let Ok(a) = p.allocate() {
                        proptest::prop_assert!(live.iter().all(|l| l.slot != a.slot));
                        proptest::prop_assert!(net("198.51.100.0/26").contains(&a.sandbox));
                        live.push(a);
                    } else {
                        proptest::prop_assert_eq!(live.len(), 16);
                    }
                } else if let Some(a) = live.pop() {
                    p.release(a.slot);
                }
                proptest::prop_assert_eq!(p.in_use() as usize, live.len());
            }
        }
    }
}
