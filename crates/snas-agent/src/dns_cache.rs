//! The DNS stub's per-job answer cache (pure: time is passed in as a monotonic offset).
//!
//! Owns which proxy answers the stub keeps, for how long, and how they are given back
//! ([`cached_answer`]). Keyed by
//! (job, lower-case name, query type): a repeat within the answer's lifetime is answered here —
//! no forward, no query budget spent — with the *remaining* TTL, so a sandbox never caches an
//! address longer than the stub would, and never longer than tier 1 holds it (tier 1 holds an
//! installed address for the clamped TTL plus [`crate::dns::BINDING_GRACE`] from the
//! moment it was installed, and an entry lives only for the clamped TTL from that moment).
//!
//! # What is cached, for how long
//! - NOERROR with a record of the asked type (for CNAME queries: a CNAME): the smallest clamped
//!   TTL of the answer section (CNAMEs included), [`crate::dns::DNS_TTL_MIN`] at least.
//! - NXDOMAIN, and NOERROR without a record of the asked type (NODATA): RFC 2308's negative TTL,
//!   `min(SOA TTL, SOA MINIMUM)` of the authority section, bounded to
//!   [[`NEGATIVE_TTL_MIN`], [`NEGATIVE_TTL_MAX`]]; [`NEGATIVE_TTL_MIN`] without an SOA.
//! - Nothing else: SERVFAIL, REFUSED (a proxy that could not verify the job yet), other codes
//!   and truncated answers are asked upstream again next time.
//!
//! # Invariants
//! - An entry is never returned at or after its expiry; returned records carry the entry's
//!   remaining lifetime (whole seconds, rounded down) as TTL.
//! - Per job at most [`CacheLimits::job_entries`] entries and [`CacheLimits::job_bytes`]
//!   bytes; node-wide at most [`CacheLimits::node_entries`] and [`CacheLimits::node_bytes`].
//!   When a job is at its bound, its least recently used entry goes (expired ones first); when
//!   the node is at its bound, the least recently used entry of the job holding the most bytes
//!   goes, so one job's churn cannot empty another job's cache below its share.
//! - A job's entries are dropped with [`DnsCache::forget_job`] (job gone, policy serial
//!   changed: the names it may resolve and their ports may differ).
//!
//! # Limits
//! - Sizes are the wire size of the relayed answer plus a fixed per-entry overhead; an answer
//!   larger than the per-job byte bound is not cached.
//! - Eviction scans one job's entries (at most `job_entries`) and, at the node bound, the job
//!   list: only on insert, which happens at most at the job's upstream query rate.

use snas_wire::JobKey;
use std::collections::HashMap;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};

use crate::dns::{clamp_ttl, Question, DNS_TTL_MIN};

/// Shortest negative-answer lifetime (also the lifetime of a negative answer without an SOA).
pub const NEGATIVE_TTL_MIN: Duration = DNS_TTL_MIN;
/// Longest negative-answer lifetime: a name that starts to exist is seen within this time.
pub const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(30);
/// Bytes counted per entry beyond its answer (key, bookkeeping).
const ENTRY_OVERHEAD: usize = 128;

/// Bounds of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Entries per job.
    pub job_entries: usize,
    /// Bytes per job.
    pub job_bytes: usize,
    /// Entries on the node.
    pub node_entries: usize,
    /// Bytes on the node.
    pub node_bytes: usize,
}

impl Default for CacheLimits {
    /// 512 entries and 256 KiB per job; 65 536 entries and 32 MiB per node.
    fn default() -> CacheLimits {
        CacheLimits {
            job_entries: 512,
            job_bytes: 256 * 1024,
            node_entries: 65_536,
            node_bytes: 32 * 1024 * 1024,
        }
    }
}

/// A cached answer as handed back: records with their TTL set to the remaining lifetime.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAnswer {
    /// NOERROR or NXDOMAIN.
    pub rcode: ResponseCode,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of a negative answer).
    pub authority: Vec<Record>,
}

#[derive(Debug, Clone)]
struct Entry {
    rcode: ResponseCode,
    answers: Vec<Record>,
    authority: Vec<Record>,
    expires: Duration,
    bytes: usize,
    used: u64,
}

#[derive(Debug, Default)]
struct JobCache {
    map: HashMap<Question, Entry>,
    bytes: usize,
}

impl JobCache {
    /// The least recently used entry, expired ones first.
    fn victim(&self, now: Duration) -> Option<Question> {
        self.map
            .iter()
            .min_by_key(|(_, e)| (e.expires > now, e.used))
            .map(|(q, _)| q.clone())
    }
}

/// Cache figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries held.
    pub entries: usize,
    /// Bytes held.
    pub bytes: usize,
    /// Entries evicted to respect a bound.
    pub evictions: u64,
}

/// The answer cache of every job on the node.
#[derive(Debug, Default)]
pub struct DnsCache {
    limits: CacheLimits,
    jobs: HashMap<JobKey, JobCache>,
    entries: usize,
    bytes: usize,
    evictions: u64,
    tick: u64,
}

/// How long `answer` to `q` may be served from the cache; `None`: not at all.
pub fn cache_lifetime(q: &Question, answer: &Message) -> Option<Duration> {
    if answer.truncated() {
        return None;
    }
    let wanted = |r: &Record| {
        r.record_type() == q.qtype || (q.qtype == RecordType::CNAME && r.data().is_cname())
    };
    match answer.response_code() {
        ResponseCode::NoError if answer.answers().iter().any(wanted) => {
            answer.answers().iter().map(|r| clamp_ttl(r.ttl())).min()
        }
        ResponseCode::NoError | ResponseCode::NXDomain => Some(negative_lifetime(answer)),
        _ => None,
    }
}

/// RFC 2308: the negative TTL is the smaller of the SOA record's TTL and its MINIMUM field.
fn negative_lifetime(answer: &Message) -> Duration {
    answer
        .name_servers()
        .iter()
        .find_map(|r| match r.data() {
            RData::SOA(soa) => Some(Duration::from_secs(u64::from(r.ttl().min(soa.minimum())))),
            _ => None,
        })
        .unwrap_or(NEGATIVE_TTL_MIN)
        .clamp(NEGATIVE_TTL_MIN, NEGATIVE_TTL_MAX)
}

impl DnsCache {
    /// An empty cache with `limits`.
    pub fn new(limits: CacheLimits) -> DnsCache {
        DnsCache {
            limits,
            ..DnsCache::default()
        }
    }

    /// The cached answer to `q` for `job`, with TTLs set to what remains of its lifetime.
    /// Expired entries are removed.
    pub fn lookup(&mut self, job: JobKey, q: &Question, now: Duration) -> Option<CachedAnswer> {
        self.tick += 1;
        let tick = self.tick;
        let jc = self.jobs.get_mut(&job)?;
        let e = jc.map.get_mut(q)?;
        if e.expires <= now {
            self.remove(job, q);
            return None;
        }
        e.used = tick;
        let remaining = u32::try_from((e.expires - now).as_secs()).unwrap_or(u32::MAX);
        let with_ttl = |rs: &[Record]| {
            rs.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.set_ttl(remaining);
                    r
                })
                .collect()
        };
        Some(CachedAnswer {
            rcode: e.rcode,
            answers: with_ttl(&e.answers),
            authority: with_ttl(&e.authority),
        })
    }

    /// Keeps `answer` (as relayed to the sandbox; `wire_len` bytes) to `q` for `job` if it is
    /// cacheable; returns whether it was kept.
    pub fn insert(
        &mut self,
        job: JobKey,
        q: &Question,
        answer: &Message,
        wire_len: usize,
        now: Duration,
    ) -> bool {
        let Some(lifetime) = cache_lifetime(q, answer) else {
            return false;
        };
        let bytes = wire_len + q.name.len() + ENTRY_OVERHEAD;
        if bytes > self.limits.job_bytes || bytes > self.limits.node_bytes {
            return false;
        }
        self.remove(job, q);
        // Make room in the job, then on the node.
        while self.jobs.get(&job).is_some_and(|jc| {
            jc.map.len() >= self.limits.job_entries || jc.bytes + bytes > self.limits.job_bytes
        }) {
            if !self.evict_from(job, now) {
                break;
            }
        }
        while self.entries >= self.limits.node_entries
            || self.bytes + bytes > self.limits.node_bytes
        {
            let Some(biggest) = self
                .jobs
                .iter()
                .filter(|(_, jc)| !jc.map.is_empty())
                .max_by_key(|(_, jc)| jc.bytes)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if !self.evict_from(biggest, now) {
                break;
            }
        }
        if self.entries >= self.limits.node_entries || self.bytes + bytes > self.limits.node_bytes {
            return false;
        }
        self.tick += 1;
        let entry = Entry {
            rcode: answer.response_code(),
            answers: answer.answers().to_vec(),
            authority: answer.name_servers().to_vec(),
            expires: now + lifetime,
            bytes,
            used: self.tick,
        };
        let jc = self.jobs.entry(job).or_default();
        jc.map.insert(q.clone(), entry);
        jc.bytes += bytes;
        self.entries += 1;
        self.bytes += bytes;
        true
    }

    fn remove(&mut self, job: JobKey, q: &Question) {
        let Some(jc) = self.jobs.get_mut(&job) else {
            return;
        };
        if let Some(e) = jc.map.remove(q) {
            jc.bytes -= e.bytes;
            self.entries -= 1;
            self.bytes -= e.bytes;
        }
        if jc.map.is_empty() {
            self.jobs.remove(&job);
        }
    }

    fn evict_from(&mut self, job: JobKey, now: Duration) -> bool {
        let Some(victim) = self.jobs.get(&job).and_then(|jc| jc.victim(now)) else {
            return false;
        };
        self.remove(job, &victim);
        self.evictions += 1;
        true
    }

    /// Drops every entry of `job`.
    pub fn forget_job(&mut self, job: JobKey) {
        if let Some(jc) = self.jobs.remove(&job) {
            self.entries -= jc.map.len();
            self.bytes -= jc.bytes;
        }
    }

    /// Jobs with entries.
    pub fn jobs(&self) -> impl Iterator<Item = JobKey> + '_ {
        self.jobs.keys().copied()
    }

    /// Entries of one job.
    pub fn job_entries(&self, job: JobKey) -> usize {
        self.jobs.get(&job).map_or(0, |jc| jc.map.len())
    }

    /// Figures for metrics.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries,
            bytes: self.bytes,
            evictions: self.evictions,
        }
    }
}

/// An answer from the cache: the sandbox's ID, question (as it spelt it) and RD flag, the
/// cached records (whose owner, where it is the asked name, is spelt as the sandbox spelt it:
/// clients that randomise the case of names compare it), EDNS only if the sandbox used it.
pub fn cached_answer(query: &Message, cached: CachedAnswer) -> Message {
    let mut m = crate::dns::empty_answer(query, cached.rcode);
    let asked = query.queries().first().map(|q| q.name().clone());
    let spelt = |mut r: hickory_proto::rr::Record| {
        if let Some(n) = &asked {
            if r.name() == n {
                r.set_name(n.clone());
            }
        }
        r
    };
    m.insert_answers(cached.answers.into_iter().map(spelt).collect());
    m.insert_name_servers(cached.authority.into_iter().map(spelt).collect());
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, Query};
    use hickory_proto::rr::rdata::{A, CNAME, SOA};
    use hickory_proto::rr::Name;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    fn q(name: &str, t: RecordType) -> Question {
        Question {
            name: name.to_owned(),
            qtype: t,
        }
    }

    fn answer(name: &str, rcode: ResponseCode, ttls: &[u32]) -> Message {
        let mut m = Message::new();
        let n = Name::from_str(&format!("{name}.")).unwrap();
        m.set_message_type(MessageType::Response)
            .set_response_code(rcode)
            .add_query(Query::query(n.clone(), RecordType::A));
        for (i, ttl) in ttls.iter().enumerate() {
            m.add_answer(Record::from_rdata(
                n.clone(),
                *ttl,
                RData::A(A(Ipv4Addr::new(203, 0, 113, i as u8))),
            ));
        }
        m
    }

    fn soa(m: &mut Message, ttl: u32, minimum: u32) {
        let zone = Name::from_str("example.com.").unwrap();
        m.add_name_server(Record::from_rdata(
            zone.clone(),
            ttl,
            RData::SOA(SOA::new(zone.clone(), zone, 1, 3600, 600, 86_400, minimum)),
        ));
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_positive_answer_lives_for_its_smallest_clamped_ttl() {
        let qa = q("api.example.com", RecordType::A);
        assert_eq!(
            cache_lifetime(
                &qa,
                &answer("api.example.com", ResponseCode::NoError, &[60, 90])
            ),
            Some(S(60))
        );
        assert_eq!(
            cache_lifetime(&qa, &answer("api.example.com", ResponseCode::NoError, &[0])),
            Some(DNS_TTL_MIN),
            "a TTL-0 answer still serves the loop that asked"
        );
        assert_eq!(
            cache_lifetime(
                &qa,
                &answer("api.example.com", ResponseCode::NoError, &[86_400])
            ),
            Some(crate::dns::DNS_TTL_MAX)
        );
        let mut chain = answer("api.example.com", ResponseCode::NoError, &[]);
        chain.add_answer(Record::from_rdata(
            Name::from_str("api.example.com.").unwrap(),
            20,
            RData::CNAME(CNAME(Name::from_str("edge.example.net.").unwrap())),
        ));
        chain.add_answer(Record::from_rdata(
            Name::from_str("edge.example.net.").unwrap(),
            120,
            RData::A(A(Ipv4Addr::new(203, 0, 113, 9))),
        ));
        assert_eq!(
            cache_lifetime(&qa, &chain),
            Some(S(20)),
            "the CNAME's TTL counts"
        );
    }

    #[test]
    fn negative_answers_live_for_the_soa_minimum_within_bounds() {
        let qa = q("nx.example.com", RecordType::A);
        let mut nx = answer("nx.example.com", ResponseCode::NXDomain, &[]);
        assert_eq!(cache_lifetime(&qa, &nx), Some(NEGATIVE_TTL_MIN), "no SOA");
        soa(&mut nx, 3600, 12);
        assert_eq!(cache_lifetime(&qa, &nx), Some(S(12)));
        let mut long = answer("nx.example.com", ResponseCode::NXDomain, &[]);
        soa(&mut long, 3600, 3600);
        assert_eq!(cache_lifetime(&qa, &long), Some(NEGATIVE_TTL_MAX));
        let mut nodata = answer("nx.example.com", ResponseCode::NoError, &[]);
        soa(&mut nodata, 8, 600);
        assert_eq!(
            cache_lifetime(&qa, &nodata),
            Some(S(8)),
            "SOA TTL is smaller"
        );
    }

    #[test]
    fn failures_and_truncated_answers_are_not_cached() {
        let qa = q("api.example.com", RecordType::A);
        for rc in [
            ResponseCode::ServFail,
            ResponseCode::Refused,
            ResponseCode::FormErr,
        ] {
            assert_eq!(
                cache_lifetime(&qa, &answer("api.example.com", rc, &[])),
                None
            );
        }
        let mut tc = answer("api.example.com", ResponseCode::NoError, &[60]);
        tc.set_truncated(true);
        assert_eq!(cache_lifetime(&qa, &tc), None);
    }

    #[test]
    fn a_hit_carries_the_remaining_ttl_and_the_entry_expires_on_time() {
        let mut c = DnsCache::new(CacheLimits::default());
        let qa = q("api.example.com", RecordType::A);
        let a = answer("api.example.com", ResponseCode::NoError, &[60]);
        assert!(c.insert(JobKey(7), &qa, &a, 60, S(100)));
        let hit = c
            .lookup(JobKey(7), &qa, S(100) + Duration::from_millis(10_500))
            .unwrap();
        assert_eq!(hit.answers[0].ttl(), 49, "60 s - 10.5 s, rounded down");
        assert!(
            c.lookup(JobKey(8), &qa, S(101)).is_none(),
            "another job's entry"
        );
        assert!(c
            .lookup(JobKey(7), &q("api.example.com", RecordType::AAAA), S(101))
            .is_none());
        assert!(c.lookup(JobKey(7), &qa, S(159)).is_some());
        assert!(
            c.lookup(JobKey(7), &qa, S(160)).is_none(),
            "expired at 60 s"
        );
        assert_eq!(c.stats().entries, 0, "an expired entry is removed when met");
    }

    #[test]
    fn a_job_at_its_bound_evicts_its_least_recently_used_entry() {
        let limits = CacheLimits {
            job_entries: 3,
            ..CacheLimits::default()
        };
        let mut c = DnsCache::new(limits);
        let names = ["a.example.com", "b.example.com", "c.example.com"];
        for n in names {
            c.insert(
                JobKey(1),
                &q(n, RecordType::A),
                &answer(n, ResponseCode::NoError, &[60]),
                50,
                S(0),
            );
        }
        assert!(c
            .lookup(JobKey(1), &q("a.example.com", RecordType::A), S(1))
            .is_some());
        let d = "d.example.com";
        c.insert(
            JobKey(1),
            &q(d, RecordType::A),
            &answer(d, ResponseCode::NoError, &[60]),
            50,
            S(2),
        );
        assert_eq!(c.job_entries(JobKey(1)), 3);
        assert!(
            c.lookup(JobKey(1), &q("b.example.com", RecordType::A), S(3))
                .is_none(),
            "LRU"
        );
        assert!(c
            .lookup(JobKey(1), &q("a.example.com", RecordType::A), S(3))
            .is_some());
        assert_eq!(c.stats().evictions, 1);
    }

    #[test]
    fn the_node_bound_takes_from_the_biggest_job_not_from_a_small_one() {
        let limits = CacheLimits {
            job_entries: 100,
            job_bytes: 1 << 20,
            node_entries: 10,
            node_bytes: 1 << 20,
        };
        let mut c = DnsCache::new(limits);
        let small = "quiet.example.com";
        c.insert(
            JobKey(1),
            &q(small, RecordType::A),
            &answer(small, ResponseCode::NoError, &[300]),
            50,
            S(0),
        );
        for i in 0..50 {
            let n = format!("n{i}.example.com");
            c.insert(
                JobKey(2),
                &q(&n, RecordType::A),
                &answer(&n, ResponseCode::NoError, &[300]),
                50,
                S(1),
            );
        }
        assert_eq!(c.stats().entries, 10);
        assert_eq!(c.job_entries(JobKey(1)), 1, "the quiet job keeps its entry");
        assert_eq!(c.job_entries(JobKey(2)), 9);
    }

    #[test]
    fn forgetting_a_job_frees_its_share() {
        let mut c = DnsCache::new(CacheLimits::default());
        let n = "api.example.com";
        c.insert(
            JobKey(1),
            &q(n, RecordType::A),
            &answer(n, ResponseCode::NoError, &[60]),
            80,
            S(0),
        );
        c.insert(
            JobKey(2),
            &q(n, RecordType::A),
            &answer(n, ResponseCode::NoError, &[60]),
            80,
            S(0),
        );
        c.forget_job(JobKey(1));
        assert_eq!(c.stats().entries, 1);
        assert!(c.lookup(JobKey(1), &q(n, RecordType::A), S(1)).is_none());
        assert!(c.lookup(JobKey(2), &q(n, RecordType::A), S(1)).is_some());
        assert_eq!(c.jobs().collect::<Vec<_>>(), vec![JobKey(2)]);
    }

    #[test]
    fn an_answer_bigger_than_a_jobs_share_is_not_cached() {
        let mut c = DnsCache::new(CacheLimits {
            job_bytes: 1000,
            ..CacheLimits::default()
        });
        let n = "big.example.com";
        assert!(!c.insert(
            JobKey(1),
            &q(n, RecordType::A),
            &answer(n, ResponseCode::NoError, &[60]),
            5000,
            S(0)
        ));
        assert_eq!(c.stats(), CacheStats::default());
    }

    proptest! {
        /// Whatever is inserted and looked up, the bounds hold and the totals are the sums of
        /// the jobs' entries.
        #[test]
        fn bounds_hold_under_any_sequence(
            ops in proptest::collection::vec((0u64..4, 0u8..40, 0u64..5, 40usize..3000, any::<bool>()), 1..400)
        ) {
            let limits = CacheLimits { job_entries: 8, job_bytes: 8000, node_entries: 20, node_bytes: 20_000 };
            let mut c = DnsCache::new(limits);
            let mut now = Duration::ZERO;
            for (job, name, step, len, look) in ops {
                now += S(step);
                let n = format!("n{name}.example.com");
                let qa = q(&n, RecordType::A);
                if look {
                    if let Some(hit) = c.lookup(JobKey(job), &qa, now) {
                        prop_assert!(hit.answers.iter().all(|r| r.ttl() <= 60));
                    }
                } else {
                    c.insert(JobKey(job), &qa, &answer(&n, ResponseCode::NoError, &[60]), len, now);
                }
                let s = c.stats();
                prop_assert!(s.entries <= limits.node_entries && s.bytes <= limits.node_bytes);
                let mut entries = 0;
                for j in c.jobs().collect::<Vec<_>>() {
                    let jc = &c.jobs[&j];
                    prop_assert!(jc.map.len() <= limits.job_entries && jc.bytes <= limits.job_bytes);
                    prop_assert_eq!(jc.bytes, jc.map.values().map(|e| e.bytes).sum::<usize>());
                    entries += jc.map.len();
                }
                prop_assert_eq!(entries, s.entries);
            }
        }
    }

    #[test]
    fn a_cached_answer_is_spelt_as_the_sandbox_asked() {
        // From the wire (as `from_ascii` keeps it): `from_str` would lower-case it (IDNA).
        let mut q = Message::new();
        q.set_id(77).add_query(Query::query(
            Name::from_ascii("API.Example.COM.").unwrap(),
            RecordType::A,
        ));
        let owner = Name::from_str("api.example.com.").unwrap();
        let edge = Name::from_str("edge.example.net.").unwrap();
        let cached = CachedAnswer {
            rcode: ResponseCode::NoError,
            answers: vec![
                Record::from_rdata(owner, 30, RData::CNAME(CNAME(edge.clone()))),
                Record::from_rdata(
                    edge,
                    30,
                    RData::A(A(std::net::Ipv4Addr::new(203, 0, 113, 9))),
                ),
            ],
            authority: vec![],
        };
        let a = cached_answer(&q, cached);
        assert_eq!(a.id(), 77);
        assert_eq!(a.queries(), q.queries());
        assert_eq!(a.answers()[0].name().to_ascii(), "API.Example.COM.");
        assert_eq!(a.answers()[1].name().to_ascii(), "edge.example.net.");
        assert!(
            a.extensions().is_none(),
            "no EDNS unless the sandbox used it"
        );
    }
}
