//! The authoritative DNS logic of the testbed internet: a pure function from a query message to
//! a response message, over the static table of [`crate::topology::zone_records`].
//!
//! Owns: name lookup (case-insensitive), CNAME chasing inside our zones, NXDOMAIN/NODATA with the
//! zone's SOA in the authority section, REFUSED for names outside our zones, and truncation over
//! UDP (header and question only, TC set) when the answer exceeds the client's payload size (512
//! bytes, or its EDNS size). Written on hickory-proto's message codec rather than hickory-server
//! so the truncation behaviour that tests rely on is explicit here and cannot change with a
//! server release.
//!
//! Limits: no wildcards, no zone transfers, no DNSSEC; one question per message.

use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::topology::{zone_records, ZoneData, ZoneRecord, DEFAULT_TTL, ZONES};

/// Largest UDP answer without EDNS (RFC 1035).
pub const UDP_PLAIN_MAX: usize = 512;

/// Transport the query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: answers are limited in size.
    Udp,
    /// TCP: no size limit.
    Tcp,
}

/// The zone data, lower-cased and ready for lookups.
#[derive(Debug, Clone)]
pub struct Zones {
    records: Vec<ZoneRecord>,
}

impl Default for Zones {
    fn default() -> Self {
        Zones::new(zone_records())
    }
}

fn lower_fqdn(name: &Name) -> String {
    let s = name.to_lowercase().to_ascii();
    s.trim_end_matches('.').to_owned()
}

fn zone_of(name: &str) -> Option<&'static str> {
    ZONES
        .iter()
        .copied()
        .find(|z| name == *z || name.ends_with(&format!(".{z}")))
}

fn soa_record(zone: &str) -> Option<Record> {
    let origin = Name::from_ascii(format!("{zone}.")).ok()?;
    let mname = Name::from_ascii("ns.example.com.").ok()?;
    let rname = Name::from_ascii(format!("hostmaster.{zone}.")).ok()?;
    Some(Record::from_rdata(
        origin,
        DEFAULT_TTL,
        RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86_400, DEFAULT_TTL)),
    ))
}

impl Zones {
    /// Zones over an explicit record list (tests).
    pub fn new(records: Vec<ZoneRecord>) -> Zones {
        let records = records
            .into_iter()
            .map(|mut r| {
                r.name = r.name.to_ascii_lowercase();
                r
            })
            .collect();
        Zones { records }
    }

    fn records_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ZoneRecord> + 'a {
        self.records.iter().filter(move |r| r.name == name)
    }

    /// Answers one query message (wire bytes). `None` when the bytes are not a query at all
    /// (nothing sensible to answer).
    pub fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let req = Message::from_vec(query).ok()?;
        if req.message_type() != MessageType::Query {
            return None;
        }
        let mut resp = Message::new();
        resp.set_id(req.id())
            .set_message_type(MessageType::Response)
            .set_op_code(req.op_code())
            .set_recursion_desired(req.recursion_desired())
            .set_recursion_available(false);
        let max = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => req
                .extensions()
                .as_ref()
                .map(|e| usize::from(e.max_payload()).max(UDP_PLAIN_MAX))
                .unwrap_or(UDP_PLAIN_MAX),
        };
        if req.op_code() != OpCode::Query || req.queries().len() != 1 {
            resp.set_response_code(ResponseCode::NotImp);
            return resp.to_vec().ok();
        }
        let q = req.queries()[0].clone();
        resp.add_query(q.clone());
        let qname = lower_fqdn(q.name());
        let Some(zone) = zone_of(&qname) else {
            resp.set_response_code(ResponseCode::Refused);
            return resp.to_vec().ok();
        };
        resp.set_authoritative(true);
        let (answers, found) = self.resolve(&qname, q.query_type());
        if answers.is_empty() {
            resp.set_response_code(if found {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            });
            if let Some(soa) = soa_record(zone) {
                resp.add_name_server(soa);
            }
        } else {
            resp.add_answers(answers);
        }
        let bytes = resp.to_vec().ok()?;
        if bytes.len() <= max {
            return Some(bytes);
        }
        // Too big for this transport: header and question only, TC set; the client retries
        // over TCP.
        resp.take_answers();
        resp.take_name_servers();
        resp.set_truncated(true);
        resp.to_vec().ok()
    }

    /// Records answering `qname`/`qtype`, following CNAMEs inside our data (at most 8 links).
    /// The flag says whether the name exists at all (NODATA vs NXDOMAIN).
    fn resolve(&self, qname: &str, qtype: RecordType) -> (Vec<Record>, bool) {
        let mut out = Vec::new();
        let mut name = qname.to_owned();
        let mut exists = false;
        for _ in 0..8 {
            let mut next = None;
            for r in self.records_of(&name) {
                exists = true;
                let Ok(owner) = Name::from_ascii(format!("{}.", r.name)) else {
                    continue;
                };
                match &r.data {
                    ZoneData::A(ip) if matches!(qtype, RecordType::A | RecordType::ANY) => {
                        out.push(Record::from_rdata(owner, r.ttl, RData::A(A(*ip))));
                    }
                    ZoneData::Aaaa(ip) if matches!(qtype, RecordType::AAAA | RecordType::ANY) => {
                        out.push(Record::from_rdata(owner, r.ttl, RData::AAAA(AAAA(*ip))));
                    }
                    ZoneData::Cname(target) => {
                        if let Ok(t) = Name::from_ascii(format!("{target}.")) {
                            out.push(Record::from_rdata(owner, r.ttl, RData::CNAME(CNAME(t))));
                            if qtype != RecordType::CNAME {
                                next = Some(target.to_ascii_lowercase());
                            }
                        }
                    }
                    _ => {}
                }
            }
            match next {
                Some(n) if zone_of(&n).is_some() => name = n,
                _ => break,
            }
        }
        (out, exists)
    }
}

/// The addresses a name resolves to in the table (A records after CNAMEs); for status output
/// and tests.
pub fn lookup_v4(zones: &Zones, name: &str) -> Vec<Ipv4Addr> {
    let (records, _) = zones.resolve(&name.to_ascii_lowercase(), RecordType::A);
    records
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// Builds a query message (wire bytes) for tests and clients.
pub fn build_query(id: u16, name: &str, qtype: RecordType) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    let n = Name::from_ascii(format!("{}.", name.trim_end_matches('.'))).ok()?;
    m.add_query(hickory_proto::op::Query::query(n, qtype));
    m.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn ask(name: &str, qtype: RecordType, t: Transport) -> Message {
        let z = Zones::default();
        let q = build_query(7, name, qtype).unwrap();
        Message::from_vec(&z.answer(&q, t).unwrap()).unwrap()
    }

    fn v4(m: &Message) -> Vec<Ipv4Addr> {
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_record_is_answered_authoritatively() {
        let m = ask("API.example.com", RecordType::A, Transport::Udp);
        assert_eq!(m.id(), 7);
        assert!(m.authoritative());
        assert_eq!(v4(&m), vec![Ipv4Addr::new(203, 0, 113, 10)]);
        assert_eq!(m.answers()[0].ttl(), DEFAULT_TTL);
    }

    #[test]
    fn cname_chain_is_followed_into_other_zone() {
        let m = ask("chain.example.org", RecordType::A, Transport::Udp);
        let kinds: Vec<RecordType> = m.answers().iter().map(|r| r.record_type()).collect();
        assert_eq!(
            kinds,
            vec![RecordType::CNAME, RecordType::CNAME, RecordType::A]
        );
        assert_eq!(v4(&m), vec![Ipv4Addr::new(203, 0, 113, 30)]);
    }

    #[test]
    fn aaaa_is_answered_and_a_query_for_v6_only_name_is_nodata() {
        let m = ask("v6.example.com", RecordType::AAAA, Transport::Udp);
        match m.answers()[0].data() {
            RData::AAAA(a) => assert_eq!(a.0, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10)),
            other => panic!("{other:?}"),
        }
        let m = ask("v6.example.com", RecordType::A, Transport::Udp);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.answers().is_empty());
        assert_eq!(m.name_servers().len(), 1);
    }

    #[test]
    fn unknown_name_is_nxdomain_and_foreign_zone_is_refused() {
        let m = ask("nope.example.com", RecordType::A, Transport::Udp);
        assert_eq!(m.response_code(), ResponseCode::NXDomain);
        let m = ask("www.example.invalid", RecordType::A, Transport::Udp);
        assert_eq!(m.response_code(), ResponseCode::Refused);
        assert!(!m.authoritative());
    }

    #[test]
    fn large_answer_is_truncated_over_udp_and_complete_over_tcp() {
        let m = ask("many.example.com", RecordType::A, Transport::Udp);
        assert!(m.truncated());
        assert!(m.answers().is_empty());
        let m = ask("many.example.com", RecordType::A, Transport::Tcp);
        assert!(!m.truncated());
        assert_eq!(
            m.answers().len(),
            usize::from(crate::topology::MANY_RECORDS)
        );
    }

    #[test]
    fn lookup_follows_cname() {
        let z = Zones::default();
        assert_eq!(
            lookup_v4(&z, "cdn.example.com"),
            vec![Ipv4Addr::new(203, 0, 113, 30)]
        );
    }

    #[test]
    fn garbage_is_not_answered() {
        assert!(Zones::default()
            .answer(&[1, 2, 3], Transport::Udp)
            .is_none());
    }
}
