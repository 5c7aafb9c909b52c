//! `snas drops`: drop counters per job, reason and tier — tier 1 from each job's counters on
//! its agent, tier 2 from the proxies' `GET /v1/drops` per tenant and reason (for all of a
//! tenant's jobs together: the rows show job `*`; the tenant is named from the agents' jobs
//! when one of them has it, else shown by id; `unknown` holds drops before a job was
//! verified, `other` the tenants beyond the proxy's series bound).

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde_json::{json, Value};
use snas_agent::api::{JobDrops, JobView};
use snas_proxy::api::{DropCounts, DropTenant};
use snas_wire::{JobKey, TenantId};

use super::jobs::collect_jobs;
use super::sources::sources;
use super::table::{print_json, table, JsonRow};
use super::{fail, finish, DropsArgs};

/// One row of `snas drops`.
#[derive(Debug, Clone, PartialEq)]
struct DropRow {
    source: String,
    tier: u8,
    job: String,
    tenant: String,
    /// `None` for a tier-2 row (counted for all jobs together).
    job_key: Option<JobKey>,
    reason: String,
    packets: u64,
}

/// Tier-2 drop rows from a proxy's drop counters: one row per tenant and reason, for all of
/// the tenant's jobs (`*`). Tenants are named from `names` (tenant id → name) when known. A
/// proxy older than the tenant split gives one row per reason, tenant `*`.
fn proxy_drops(
    proxy: &str,
    counts: &DropCounts,
    names: &BTreeMap<TenantId, String>,
) -> Vec<DropRow> {
    let row = |tenant: String, reason: &String, n: &u64| DropRow {
        source: proxy.to_owned(),
        tier: 2,
        job: "*".into(),
        tenant,
        job_key: None,
        reason: reason.clone(),
        packets: *n,
    };
    if counts.tenants.is_empty() {
        return counts
            .drops
            .iter()
            .map(|(reason, n)| row("*".into(), reason, n))
            .collect();
    }
    counts
        .tenants
        .iter()
        .flat_map(|(who, t)| {
            let tenant = match who {
                DropTenant::Tenant(id) => names.get(id).cloned().unwrap_or_else(|| id.to_string()),
                other => other.to_string(),
            };
            t.drops
                .iter()
                .map(move |(reason, n)| row(tenant.clone(), reason, n))
        })
        .collect()
}

/// Tier-1 rows from an agent's counters answer.
fn agent_drops(node: &str, job: &JobView, counters: &JobDrops, all: bool) -> Vec<DropRow> {
    counters
        .drops
        .iter()
        .filter(|(_, n)| all || **n > 0)
        .map(|(reason, n)| DropRow {
            source: node.to_owned(),
            tier: 1,
            job: job.job.clone(),
            tenant: job.tenant.clone(),
            job_key: Some(job.job_key),
            reason: reason.clone(),
            packets: *n,
        })
        .collect()
}

impl DropRow {
    /// The job key, or `*` for a row of all jobs.
    fn key_cell(&self) -> String {
        self.job_key
            .map_or_else(|| "*".to_owned(), |k| k.to_string())
    }
}

impl JsonRow for DropRow {
    fn to_json(&self) -> Value {
        json!({
            "source": self.source, "tier": self.tier, "job": self.job, "tenant": self.tenant,
            "job_key": self.key_cell(), "reason": self.reason, "packets": self.packets,
        })
    }
}

/// `snas drops`.
pub fn drops(a: &DropsArgs) -> ExitCode {
    let s = match sources(&a.src) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let (jobs, mut errors) = collect_jobs(&s, false);
    let mut rows = Vec::new();
    for j in &jobs {
        let Some(agent) = s.agents.iter().find(|x| x.label == j.node) else {
            continue;
        };
        match agent.client().counters(&j.job.job_key.to_string()) {
            Ok(c) => rows.extend(agent_drops(&agent.label, &j.job, &c, a.all)),
            Err(e) => errors.push(format!("{}: {e:#}", agent.label)),
        }
    }
    let names: BTreeMap<TenantId, String> = jobs
        .iter()
        .map(|j| (j.job.tenant_id, j.job.tenant.clone()))
        .collect();
    for p in &s.proxies {
        match p.call(|c| c.drops()) {
            Ok(counts) => rows.extend(proxy_drops(&p.label, &counts, &names)),
            Err(e) => errors.push(format!("{} ({}): {e:#}", p.label, p.addr)),
        }
    }
    rows.sort_by(|x, y| {
        (&x.tenant, &x.job, x.tier, &x.reason, &x.source)
            .cmp(&(&y.tenant, &y.job, y.tier, &y.reason, &y.source))
    });
    if a.src.json {
        if let Err(e) = print_json(&rows) {
            return fail(&e);
        }
    } else {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.tenant.clone(),
                    r.job.clone(),
                    r.key_cell(),
                    r.tier.to_string(),
                    r.source.clone(),
                    r.reason.clone(),
                    r.packets.to_string(),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &["TENANT", "JOB", "JOB KEY", "TIER", "WHERE", "REASON", "PACKETS"],
                &cells
            )
        );
    }
    finish(&errors)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use snas_proxy::api::TenantDrops;

    fn reasons(r: &[(&str, u64)]) -> BTreeMap<String, u64> {
        r.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn proxy_drops_are_one_row_per_tenant_and_reason_named_from_the_agents() {
        let acme = TenantId(287_346_201);
        let stranger = TenantId(7);
        let counts = DropCounts {
            total: 9,
            drops: reasons(&[("port_denied", 7), ("untrusted_source", 2)]),
            tenants: BTreeMap::from([
                (
                    DropTenant::Unknown,
                    TenantDrops {
                        total: 2,
                        drops: reasons(&[("untrusted_source", 2)]),
                    },
                ),
                (
                    DropTenant::Tenant(acme),
                    TenantDrops {
                        total: 4,
                        drops: reasons(&[("port_denied", 4)]),
                    },
                ),
                (
                    DropTenant::Tenant(stranger),
                    TenantDrops {
                        total: 3,
                        drops: reasons(&[("port_denied", 3)]),
                    },
                ),
            ]),
        };
        let names = BTreeMap::from([(acme, "acme".to_owned())]);
        let rows = proxy_drops("proxy-1", &counts, &names);
        let got: Vec<(&str, &str, u64)> = rows
            .iter()
            .map(|r| (r.tenant.as_str(), r.reason.as_str(), r.packets))
            .collect();
        assert_eq!(
            got,
            [
                ("unknown", "untrusted_source", 2),
                ("7", "port_denied", 3),
                ("acme", "port_denied", 4),
            ]
        );
        assert!(rows
            .iter()
            .all(|r| r.job == "*" && r.tier == 2 && r.job_key.is_none()));
        assert_eq!(rows[2].to_json()["job_key"], "*");
    }

    #[test]
    fn a_proxy_without_the_tenant_split_gives_one_row_per_reason() {
        let counts = DropCounts {
            total: 6,
            drops: reasons(&[("port_denied", 4), ("untrusted_source", 2)]),
            tenants: BTreeMap::new(),
        };
        let rows = proxy_drops("proxy-1", &counts, &BTreeMap::new());
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].reason.as_str(), rows[0].packets, rows[0].tier),
            ("port_denied", 4, 2)
        );
        assert!(rows.iter().all(|r| r.job == "*" && r.tenant == "*"));
    }

    #[test]
    fn agent_drops_list_nonzero_reasons_unless_all_are_asked_for() {
        let j = job("build", JobKey(0xaa));
        let c = JobDrops {
            job_key: j.job_key,
            total: 3,
            drops: BTreeMap::from([
                ("destination_denied".to_owned(), 3),
                ("port_denied".to_owned(), 0),
            ]),
        };
        let rows = agent_drops("node-1", &j, &c, false);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].reason.as_str(), rows[0].packets, rows[0].tier),
            ("destination_denied", 3, 1)
        );
        assert_eq!(
            (rows[0].job.as_str(), rows[0].tenant.as_str()),
            ("build", "acme")
        );
        assert_eq!(agent_drops("node-1", &j, &c, true).len(), 2);
    }

    pub(in crate::cmd::observe) fn job(name: &str, key: JobKey) -> JobView {
        JobView {
            job: name.into(),
            tenant: "acme".into(),
            job_key: key,
            tenant_id: TenantId(1),
            jti: "p".into(),
            serial: snas_wire::PolicySerial(1),
            expires_at: 0,
            state: snas_agent::api::JobState::Running,
            netns: "ns".into(),
            netns_path: "/run/netns/ns".into(),
            sandbox_ip: [10, 255, 1, 2].into(),
            gateway_ip: [10, 255, 1, 1].into(),
            dns_ip: [10, 255, 1, 1].into(),
            prefix_len: 30,
            veth: "v".into(),
            sandbox_ifname: "eth0".into(),
            mtu: 1444,
            sandbox_ip6: None,
            gateway_ip6: None,
        }
    }
}
