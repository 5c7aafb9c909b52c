//! `snas flows`: the live flows of the proxies (`GET /v1/flows`), named from the agents' jobs.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use snas_agent::api::JobView;

use super::jobs::collect_jobs;
use super::sources::sources;
use super::table::{dash, human_secs, now_unix, print_json, table, JsonRow};
use super::{fail, finish, ObserveArgs};
use crate::cmd::human_bytes;

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The first of `names` present (and not null) in `o`, as text.
fn field(o: &Map<String, Value>, names: &[&str]) -> Option<String> {
    names
        .iter()
        .filter_map(|n| o.get(*n))
        .find(|v| !v.is_null())
        .and_then(text)
}

/// An `ip:port` from one combined field or separate ip and port fields.
fn endpoint(
    o: &Map<String, Value>,
    combined: &[&str],
    ip: &[&str],
    port: &[&str],
) -> Option<String> {
    if let Some(c) = field(o, combined) {
        return Some(c);
    }
    let ip = field(o, ip)?;
    Some(match field(o, port) {
        Some(p) if ip.contains(':') => format!("[{ip}]:{p}"),
        Some(p) => format!("{ip}:{p}"),
        None => ip,
    })
}

fn number(o: &Map<String, Value>, names: &[&str]) -> Option<f64> {
    names
        .iter()
        .filter_map(|n| o.get(*n))
        .find_map(|v| match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        })
}

/// One live flow as a proxy reports it, normalised.
#[derive(Debug, Clone, PartialEq)]
struct FlowRow {
    proxy: String,
    job: Option<String>,
    tenant: Option<String>,
    job_key: Option<String>,
    proto: Option<String>,
    src: Option<String>,
    dst: Option<String>,
    hostname: Option<String>,
    egress: Option<String>,
    state: Option<String>,
    age_secs: Option<f64>,
    idle_secs: Option<f64>,
    /// Bytes from the job toward the destination, and back (what the proxy moved so far).
    bytes_out: Option<u64>,
    bytes_in: Option<u64>,
}

/// Parses a `/v1/flows` body: a JSON array of flow objects, or an object with a `flows` array.
fn parse_flows(proxy: &str, body: &[u8], now_unix: f64) -> anyhow::Result<Vec<FlowRow>> {
    let v: Value = serde_json::from_slice(body).context("/v1/flows is not JSON")?;
    let list = match &v {
        Value::Array(a) => a,
        Value::Object(o) => match o.get("flows") {
            Some(Value::Array(a)) => a,
            _ => bail!("/v1/flows: object without a `flows` array"),
        },
        _ => bail!("/v1/flows: neither an array nor an object"),
    };
    let mut rows = Vec::with_capacity(list.len());
    for f in list {
        let Value::Object(o) = f else {
            bail!("/v1/flows: a flow is not an object");
        };
        let age_secs = number(o, &["age_secs", "age_s", "age"])
            .or_else(|| number(o, &["age_ms"]).map(|ms| ms / 1000.0))
            .or_else(|| {
                number(o, &["created_unix", "started_at", "created"])
                    .map(|t| (now_unix - t).max(0.0))
            });
        let hostname = match o.get("hostnames") {
            Some(Value::Array(a)) if !a.is_empty() => {
                Some(a.iter().filter_map(text).collect::<Vec<_>>().join(","))
            }
            _ => field(o, &["hostname", "host", "name"]),
        };
        rows.push(FlowRow {
            proxy: proxy.to_owned(),
            job: field(o, &["job", "job_name"]),
            tenant: field(o, &["tenant"]),
            job_key: field(o, &["job_key"]),
            proto: field(o, &["proto", "protocol"]),
            src: endpoint(
                o,
                &["src", "source", "sandbox"],
                &["src_ip", "sandbox_ip"],
                &["src_port", "sport", "sandbox_port"],
            ),
            dst: endpoint(
                o,
                &["dst", "destination", "remote"],
                &["dst_ip", "remote_ip"],
                &["dst_port", "dport", "port", "remote_port"],
            ),
            hostname,
            egress: endpoint(
                o,
                &["egress", "nat", "snat"],
                &["egress_ip", "nat_ip"],
                &["egress_port", "nat_port"],
            ),
            state: field(o, &["state"]),
            age_secs,
            idle_secs: number(o, &["idle_secs", "idle_s"])
                .or_else(|| number(o, &["idle_ms"]).map(|ms| ms / 1000.0)),
            bytes_out: o.get("bytes_out").and_then(Value::as_u64),
            bytes_in: o.get("bytes_in").and_then(Value::as_u64),
        });
    }
    Ok(rows)
}

impl JsonRow for FlowRow {
    fn to_json(&self) -> Value {
        json!({
            "proxy": self.proxy, "job": self.job, "tenant": self.tenant, "job_key": self.job_key,
            "proto": self.proto, "src": self.src, "dst": self.dst, "hostname": self.hostname,
            "egress": self.egress, "state": self.state, "age_secs": self.age_secs,
            "idle_secs": self.idle_secs, "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
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
    let by_key: BTreeMap<String, JobView> = jobs
        .into_iter()
        .map(|j| (j.job.job_key.clone(), j.job))
        .collect();
    let now = now_unix();
    let mut rows = Vec::new();
    for p in &s.proxies {
        match p
            .get("/v1/flows")
            .and_then(|b| parse_flows(&p.label, &b, now))
        {
            Ok(mut r) => {
                for f in &mut r {
                    if let Some(j) = f.job_key.as_ref().and_then(|k| by_key.get(k)) {
                        f.job.get_or_insert_with(|| j.job.clone());
                        f.tenant.get_or_insert_with(|| j.tenant.clone());
                    }
                }
                rows.extend(r);
            }
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
        // The age and byte columns appear only when some proxy reports them; idle time always.
        let with_age = rows.iter().any(|r| r.age_secs.is_some());
        let with_bytes = rows
            .iter()
            .any(|r| r.bytes_out.is_some() || r.bytes_in.is_some());
        let secs = |v: Option<f64>| v.map_or("-".into(), human_secs);
        let bytes = |v: Option<u64>| v.map_or("-".into(), human_bytes);
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let mut c = vec![
                    r.proxy.clone(),
                    dash(&r.tenant),
                    dash(&r.job),
                    dash(&r.proto),
                    dash(&r.src),
                    dash(&r.dst),
                    dash(&r.hostname),
                    dash(&r.egress),
                    dash(&r.state),
                ];
                if with_age {
                    c.push(secs(r.age_secs));
                }
                c.push(secs(r.idle_secs));
                if with_bytes {
                    c.push(bytes(r.bytes_out));
                    c.push(bytes(r.bytes_in));
                }
                c
            })
            .collect();
        let mut headers = vec![
            "PROXY", "TENANT", "JOB", "PROTO", "SRC", "DST", "HOSTNAME", "EGRESS", "STATE",
        ];
        if with_age {
            headers.push("AGE");
        }
        headers.push("IDLE");
        if with_bytes {
            headers.extend(["OUT", "IN"]);
        }
        print!("{}", table(&headers, &cells));
    }
    finish(&errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_accept_combined_or_split_endpoints_and_both_envelopes() {
        let body = br#"{"flows":[{"job_key":"00000000000000aa","tenant":"acme","proto":"tcp",
            "src":"10.255.1.2:40000","dst_ip":"203.0.113.10","dst_port":80,
            "hostnames":["api.example.com"],"egress_ip":"198.51.100.64","egress_port":2000,
            "state":"established","age_ms":1500,"idle_ms":250,"bytes_out":812,"bytes_in":1048576}]}"#;
        let rows = parse_flows("p1", body, 0.0).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.src.as_deref(), Some("10.255.1.2:40000"));
        assert_eq!(r.dst.as_deref(), Some("203.0.113.10:80"));
        assert_eq!(r.egress.as_deref(), Some("198.51.100.64:2000"));
        assert_eq!(r.hostname.as_deref(), Some("api.example.com"));
        assert_eq!(r.age_secs, Some(1.5));
        assert_eq!(r.idle_secs, Some(0.25));
        assert_eq!((r.bytes_out, r.bytes_in), (Some(812), Some(1_048_576)));
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(1_048_576), "1.0 MB");
        assert_eq!(human_bytes(2_500_000_000), "2.5 GB");
        assert_eq!(r.job, None);

        let rows = parse_flows(
            "p2",
            br#"[{"job":"j","dst":"[2001:db8::10]:443","created_unix":90}]"#,
            100.0,
        )
        .unwrap();
        assert_eq!(rows[0].dst.as_deref(), Some("[2001:db8::10]:443"));
        assert_eq!(rows[0].age_secs, Some(10.0));
        assert!(parse_flows("p", b"{\"x\":1}", 0.0).is_err());
        assert!(parse_flows("p", b"not json", 0.0).is_err());
    }
}
