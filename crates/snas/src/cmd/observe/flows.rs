//! `snas flows`: the live flows of the proxies (`GET /v1/flows`), named from the agents' jobs.

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde_json::{json, Value};

use snas_agent::api::JobView;
use snas_proxy::api::FlowView;
use snas_wire::JobKey;

use super::jobs::collect_jobs;
use super::sources::sources;
use super::table::{dash, human_secs, print_json, table, JsonRow};
use super::{fail, finish, ObserveArgs};
use crate::cmd::human_bytes;

/// One live flow as a proxy reports it, named from the agents' jobs when the proxy does not
/// hold the job's policy.
#[derive(Debug, Clone, PartialEq)]
struct FlowRow {
    proxy: String,
    job: Option<String>,
    tenant: Option<String>,
    flow: FlowView,
}

impl FlowRow {
    /// The row of `flow` read from `proxy`; names the proxy lacks come from `jobs`.
    fn new(proxy: &str, flow: FlowView, jobs: &BTreeMap<JobKey, JobView>) -> FlowRow {
        let known = jobs.get(&flow.job_key);
        FlowRow {
            proxy: proxy.to_owned(),
            job: flow.job.clone().or_else(|| known.map(|j| j.job.clone())),
            tenant: flow
                .tenant
                .clone()
                .or_else(|| known.map(|j| j.tenant.clone())),
            flow,
        }
    }

    fn hostname(&self) -> Option<String> {
        (!self.flow.hostnames.is_empty()).then(|| self.flow.hostnames.join(","))
    }
}

impl JsonRow for FlowRow {
    fn to_json(&self) -> Value {
        let f = &self.flow;
        json!({
            "proxy": self.proxy, "job": self.job, "tenant": self.tenant, "job_key": f.job_key.to_string(),
            "proto": f.proto, "src": f.src.to_string(), "dst": f.dst.to_string(),
            "hostname": self.hostname(), "egress": f.egress.to_string(), "state": f.state,
            "age_secs": f.age().as_secs_f64(), "idle_secs": f.idle().as_secs_f64(),
            "bytes_out": f.bytes_out, "bytes_in": f.bytes_in,
        })
    }
}

/// `snas flows`.
pub fn flows(a: &ObserveArgs) -> ExitCode {
    let s = match sources(a) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let (jobs, mut errors) = collect_jobs(&s, false);
    let by_key: BTreeMap<JobKey, JobView> =
        jobs.into_iter().map(|j| (j.job.job_key, j.job)).collect();
    let mut rows = Vec::new();
    for p in &s.proxies {
        match p.call(|c| c.flows()) {
            Ok(list) => rows.extend(
                list.flows
                    .into_iter()
                    .map(|f| FlowRow::new(&p.label, f, &by_key)),
            ),
            Err(e) => errors.push(format!("{} ({}): {e:#}", p.label, p.addr)),
        }
    }
    if s.proxies.is_empty() {
        errors.push("no proxy to read flows from (give --proxy ADDR:PORT)".into());
    }
    if a.json {
        if let Err(e) = print_json(&rows) {
            return fail(&e);
        }
    } else {
        let secs = |d: std::time::Duration| human_secs(d.as_secs_f64());
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let f = &r.flow;
                vec![
                    r.proxy.clone(),
                    dash(&r.tenant),
                    dash(&r.job),
                    f.proto.clone(),
                    f.src.to_string(),
                    f.dst.to_string(),
                    dash(&r.hostname()),
                    f.egress.to_string(),
                    f.state.clone(),
                    secs(f.age()),
                    secs(f.idle()),
                    human_bytes(f.bytes_out),
                    human_bytes(f.bytes_in),
                ]
            })
            .collect();
        let headers = [
            "PROXY", "TENANT", "JOB", "PROTO", "SRC", "DST", "HOSTNAME", "EGRESS", "STATE", "AGE",
            "IDLE", "OUT", "IN",
        ];
        print!("{}", table(&headers, &cells));
    }
    finish(&errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(tenant: Option<&str>) -> FlowView {
        FlowView {
            job_key: JobKey(0xaa),
            tenant: tenant.map(str::to_owned),
            job: None,
            tenant_id: snas_wire::TenantId(1),
            proto: "tcp".into(),
            src: "10.255.1.2:40000".parse().unwrap(),
            dst: "[2001:db8::10]:443".parse().unwrap(),
            hostnames: vec!["api.example.com".into(), "www.example.com".into()],
            egress: "198.51.100.64:2000".parse().unwrap(),
            state: "tcp_established".into(),
            idle_ms: 250,
            age_ms: 1500,
            bytes_out: 812,
            bytes_in: 1_048_576,
            packets_out: 9,
            packets_in: 800,
        }
    }

    #[test]
    fn rows_take_names_from_the_agents_when_the_proxy_has_none_and_show_the_age() {
        let mut jobs = BTreeMap::new();
        let mut j = super::super::drops::tests::job("build", JobKey(0xaa));
        j.tenant = "from-agent".into();
        jobs.insert(j.job_key, j);
        let r = FlowRow::new("proxy-1", flow(None), &jobs);
        assert_eq!(
            (r.job.as_deref(), r.tenant.as_deref()),
            (Some("build"), Some("from-agent"))
        );
        // The proxy's own names win.
        let r2 = FlowRow::new("proxy-1", flow(Some("acme")), &jobs);
        assert_eq!(r2.tenant.as_deref(), Some("acme"));
        let v = r.to_json();
        assert_eq!(v["age_secs"], 1.5);
        assert_eq!(v["idle_secs"], 0.25);
        assert_eq!(v["dst"], "[2001:db8::10]:443");
        assert_eq!(v["job_key"], "00000000000000aa");
        assert_eq!(v["hostname"], "api.example.com,www.example.com");
        assert_eq!(
            (v["bytes_out"].as_u64(), v["bytes_in"].as_u64()),
            (Some(812), Some(1_048_576))
        );
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(1_048_576), "1.0 MB");
        assert_eq!(human_bytes(2_500_000_000), "2.5 GB");
        let unknown = FlowRow::new("proxy-1", flow(None), &BTreeMap::new());
        assert_eq!((unknown.job, unknown.tenant), (None, None));
    }
}
