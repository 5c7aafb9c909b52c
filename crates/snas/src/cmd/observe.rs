//! `snas jobs`, `snas flows`, `snas drops`: what the agents and proxies know, for a person.
//!
//! # What it owns
//! Reading the node agents' API (Unix socket: `GET /v1/jobs`, `GET /v1/jobs/{key}/counters`)
//! and the proxies' control endpoint (TCP: `GET /v1/flows`, `GET /metrics`), joining them by
//! job key, and printing aligned tables (or `--json` rows with the same fields, for machines).
//! See `docs/observability.md`.
//!
//! # Sources
//! `--agent-socket PATH` and `--proxy ADDR:PORT` are repeatable; when any is given, only those
//! are read. When none is given, the testbed named by `--prefix` (default `snastb`) supplies
//! them: the agent sockets of its
//! nodes that exist, and its proxies' control addresses, which live inside the proxies'
//! namespaces and are therefore read from a thread that entered that namespace. Without a
//! testbed, the agent default is `/run/snas/agent.sock` if it exists.
//!
//! # Invariants
//! - A source that cannot be read is named on stderr and makes the exit status 1; the rows of
//!   the other sources are still printed (an operator chasing an outage wants what there is).
//! - The parsers of the proxy's answers are pure functions of the body (tested below) and
//!   accept the field spellings listed in `docs/observability.md`; unknown fields are ignored.
//!
//! # Limits
//! Plain HTTP/1.1, one request per connection, 3 s per exchange; no TLS (the control port is
//! on the underlay).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde_json::{json, Map, Value};
use snas_testbed::topology::{NODES, PROXIES};
use snas_testbed::{AgentClient, Topology, DEFAULT_PREFIX};

use super::human_bytes;

/// Time allowed for one HTTP exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest answer read from a proxy.
const MAX_BODY: usize = 64 << 20;

/// Where to read from, and how to print.
#[derive(Debug, Args)]
pub struct ObserveArgs {
    /// Testbed supplying default sources (its agent sockets and proxies).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// A node agent's API socket (repeatable). Default: the testbed's agents.
    #[arg(long = "agent-socket", value_name = "PATH")]
    agent_sockets: Vec<PathBuf>,
    /// A proxy's control address (repeatable). Default: the testbed's proxies.
    #[arg(long = "proxy", value_name = "ADDR:PORT")]
    proxies: Vec<SocketAddr>,
    /// Print one JSON array of rows instead of a table.
    #[arg(long)]
    json: bool,
}

/// `snas drops` arguments.
#[derive(Debug, Args)]
pub struct DropsArgs {
    #[command(flatten)]
    src: ObserveArgs,
    /// Also list reasons whose count is zero.
    #[arg(long)]
    all: bool,
}

/// A node agent to read.
#[derive(Debug, Clone)]
struct AgentSource {
    label: String,
    socket: PathBuf,
}

/// A proxy to read; `netns` set when it must be reached from inside a testbed namespace.
#[derive(Debug, Clone)]
struct ProxySource {
    label: String,
    addr: SocketAddr,
    netns: Option<String>,
}

#[derive(Debug, Default)]
struct Sources {
    agents: Vec<AgentSource>,
    proxies: Vec<ProxySource>,
}

fn sources(a: &ObserveArgs) -> anyhow::Result<Sources> {
    let mut s = Sources::default();
    // Explicit sources replace every default: an operator pointing at one proxy does not
    // want a local testbed mixed in.
    let explicit = !a.agent_sockets.is_empty() || !a.proxies.is_empty();
    let testbed = Topology::new(&a.prefix)
        .ok()
        .filter(|t| !explicit && t.state_dir().exists());
    if a.agent_sockets.is_empty() {
        if let Some(t) = &testbed {
            for n in 1..=NODES {
                let socket = t.agent_socket(n);
                if socket.exists() {
                    s.agents.push(AgentSource {
                        label: format!("node-{n}"),
                        socket,
                    });
                }
            }
        } else if !explicit {
            let socket = PathBuf::from("/run/snas/agent.sock");
            if socket.exists() {
                s.agents.push(AgentSource {
                    label: "local".into(),
                    socket,
                });
            }
        }
    } else {
        s.agents = a
            .agent_sockets
            .iter()
            .map(|p| AgentSource {
                label: p.display().to_string(),
                socket: p.clone(),
            })
            .collect();
    }
    if a.proxies.is_empty() {
        if let Some(t) = &testbed {
            for n in 1..=PROXIES {
                if snas_testbed::netns::netns_path(&t.proxy_ns(n)).exists() {
                    s.proxies.push(ProxySource {
                        label: format!("proxy-{n}"),
                        addr: t.proxy_control(n),
                        netns: Some(t.proxy_ns(n)),
                    });
                }
            }
        }
    } else {
        s.proxies = a
            .proxies
            .iter()
            .map(|addr| ProxySource {
                label: addr.to_string(),
                addr: *addr,
                netns: None,
            })
            .collect();
    }
    if s.agents.is_empty() && s.proxies.is_empty() {
        bail!(
            "nothing to read: no testbed `{}` and no --agent-socket/--proxy given",
            a.prefix
        );
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// HTTP

fn decode_chunked(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_txt = std::str::from_utf8(&body[..end]).ok()?;
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        body = &body[end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// Splits a raw HTTP/1.x response into status and (de-chunked) body.
fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP answer: no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed HTTP answer: no status line"))?;
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = decode_chunked(&body).ok_or_else(|| anyhow!("malformed chunked body"))?;
    } else if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok((status, body))
}

fn tcp_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, EXCHANGE_TIMEOUT)?;
    s.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    s.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: snas\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.take(MAX_BODY as u64).read_to_end(&mut raw)?;
    parse_response(&raw)
}

impl ProxySource {
    /// `GET path`; the body of a 200 answer.
    fn get(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let addr = self.addr;
        let p = path.to_owned();
        let (status, body) = match &self.netns {
            Some(ns) => snas_testbed::netns::in_netns(ns, move || tcp_get(addr, &p))
                .with_context(|| format!("entering {ns}"))??,
            None => tcp_get(addr, path)?,
        };
        if status != 200 {
            bail!(
                "GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(body)
    }
}

impl AgentSource {
    fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, body) = AgentClient::new(&self.socket).request("GET", path, b"")?;
        if status != 200 {
            bail!(
                "GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
    }
}

// ---------------------------------------------------------------------------------------
// Pure parsing

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

/// One Prometheus sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses one line of the Prometheus text format (comments and blank lines give `None`).
fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return None;
                    }
                    let mut val = String::new();
                    loop {
                        match chars.next()? {
                            (_, '"') => break,
                            (_, '\\') => match chars.next()?.1 {
                                'n' => val.push('\n'),
                                other => val.push(other),
                            },
                            (_, c) => val.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), val);
                }
                c => key.push(c),
            }
        }
        rest = &r[end?..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name, labels, value))
}

/// One row of `snas drops`.
#[derive(Debug, Clone, PartialEq)]
struct DropRow {
    source: String,
    tier: u8,
    job: String,
    tenant: String,
    job_key: String,
    reason: String,
    packets: u64,
}

/// Tier-2 drop rows from a proxy's `/metrics`: the `snas_proxy_drops_total` family, per job
/// when the proxy labels samples with `job_key`, else one row per reason for all jobs (`*`).
fn proxy_drops(proxy: &str, metrics: &str, jobs: &BTreeMap<String, JobRow>) -> Vec<DropRow> {
    let mut rows = Vec::new();
    for (name, labels, value) in metrics.lines().filter_map(parse_sample) {
        if name != "snas_proxy_drops_total" {
            continue;
        }
        let key = labels.get("job_key").cloned();
        let known = key.as_ref().and_then(|k| jobs.get(k));
        rows.push(DropRow {
            source: proxy.to_owned(),
            tier: 2,
            job: known
                .map(|j| j.job.clone())
                .or_else(|| labels.get("job").cloned())
                .unwrap_or_else(|| "*".into()),
            tenant: known
                .map(|j| j.tenant.clone())
                .or_else(|| labels.get("tenant").cloned())
                .unwrap_or_else(|| "*".into()),
            job_key: key.unwrap_or_else(|| "*".into()),
            reason: labels
                .get("reason")
                .cloned()
                .unwrap_or_else(|| "unknown".into()),
            packets: value as u64,
        });
    }
    rows
}

/// Tier-1 rows from an agent's counters answer.
fn agent_drops(node: &str, job: &JobRow, counters: &Value, all: bool) -> Vec<DropRow> {
    let Some(Value::Object(drops)) = counters.get("drops") else {
        return Vec::new();
    };
    drops
        .iter()
        .filter_map(|(reason, n)| Some((reason, n.as_u64()?)))
        .filter(|(_, n)| all || *n > 0)
        .map(|(reason, n)| DropRow {
            source: node.to_owned(),
            tier: 1,
            job: job.job.clone(),
            tenant: job.tenant.clone(),
            job_key: job.job_key.clone(),
            reason: reason.clone(),
            packets: n,
        })
        .collect()
}

/// One row of `snas jobs`.
#[derive(Debug, Clone, PartialEq)]
struct JobRow {
    node: String,
    job: String,
    tenant: String,
    job_key: String,
    serial: Option<u64>,
    sandbox_ip: String,
    netns: String,
    expires_at: Option<u64>,
    /// `running` or `expired` (the agent's view; absent from older agents).
    state: Option<String>,
    tier1_drops: Option<u64>,
}

fn job_row(node: &str, v: &Value) -> Option<JobRow> {
    let o = v.as_object()?;
    Some(JobRow {
        node: node.to_owned(),
        job: field(o, &["job"])?,
        tenant: field(o, &["tenant"]).unwrap_or_default(),
        job_key: field(o, &["job_key"])?,
        serial: o.get("serial").and_then(Value::as_u64),
        sandbox_ip: field(o, &["sandbox_ip"]).unwrap_or_default(),
        netns: field(o, &["netns"]).unwrap_or_default(),
        expires_at: o.get("expires_at").and_then(Value::as_u64),
        state: field(o, &["state"]),
        tier1_drops: None,
    })
}

// ---------------------------------------------------------------------------------------
// Printing

/// Human duration: `45s`, `3m05s`, `2h01m`, `0.4s`.
fn human_secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "-".into();
    }
    if s < 10.0 {
        return format!("{s:.1}s");
    }
    let t = s as u64;
    match t {
        0..=59 => format!("{t}s"),
        60..=3599 => format!("{}m{:02}s", t / 60, t % 60),
        _ => format!("{}h{:02}m", t / 3600, (t % 3600) / 60),
    }
}

/// Left-aligned columns separated by two spaces; numbers right-aligned.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let n = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..n)
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| r.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
        })
        .collect();
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            if i > 0 {
                l.push_str("  ");
            }
            if numeric[i] {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                if i + 1 < n {
                    l.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A row that `--json` prints as one object.
trait JsonRow {
    fn to_json(&self) -> Value;
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

impl JsonRow for DropRow {
    fn to_json(&self) -> Value {
        json!({
            "source": self.source, "tier": self.tier, "job": self.job, "tenant": self.tenant,
            "job_key": self.job_key, "reason": self.reason, "packets": self.packets,
        })
    }
}

impl JsonRow for JobRow {
    fn to_json(&self) -> Value {
        json!({
            "node": self.node, "job": self.job, "tenant": self.tenant, "job_key": self.job_key,
            "serial": self.serial, "sandbox_ip": self.sandbox_ip, "netns": self.netns,
            "expires_at": self.expires_at, "state": self.state, "tier1_drops": self.tier1_drops,
        })
    }
}

fn print_json<T: JsonRow>(rows: &[T]) -> anyhow::Result<()> {
    let v = Value::Array(rows.iter().map(JsonRow::to_json).collect());
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Commands

/// Collects jobs from every agent (with failures).
fn collect_jobs(s: &Sources, with_counters: bool) -> (Vec<JobRow>, Vec<String>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for a in &s.agents {
        match a.get_json("/v1/jobs") {
            Ok(Value::Array(list)) => {
                for v in &list {
                    let Some(mut row) = job_row(&a.label, v) else {
                        errors.push(format!("{}: a job without `job`/`job_key`: {v}", a.label));
                        continue;
                    };
                    if with_counters {
                        match a.get_json(&format!("/v1/jobs/{}/counters", row.job_key)) {
                            Ok(c) => row.tier1_drops = c.get("total").and_then(Value::as_u64),
                            Err(e) => errors.push(format!("{}: {e:#}", a.label)),
                        }
                    }
                    rows.push(row);
                }
            }
            Ok(other) => errors.push(format!("{}: /v1/jobs is not an array: {other}", a.label)),
            Err(e) => errors.push(format!("{} ({}): {e:#}", a.label, a.socket.display())),
        }
    }
    (rows, errors)
}

fn finish(errors: &[String]) -> ExitCode {
    for e in errors {
        eprintln!("snas: {e}");
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("snas: {e:#}");
    ExitCode::from(2)
}

/// `snas jobs`.
pub fn jobs(a: &ObserveArgs) -> ExitCode {
    let s = match sources(a) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let (rows, errors) = collect_jobs(&s, true);
    if a.json {
        if let Err(e) = print_json(&rows) {
            return fail(&e);
        }
    } else {
        let now = now_unix();
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.node.clone(),
                    r.tenant.clone(),
                    r.job.clone(),
                    r.job_key.clone(),
                    r.serial.map_or("-".into(), |s| s.to_string()),
                    r.sandbox_ip.clone(),
                    r.netns.clone(),
                    dash(&r.state),
                    r.expires_at.map_or("-".into(), |t| {
                        let left = t as f64 - now;
                        if left > 0.0 {
                            human_secs(left)
                        } else {
                            format!("{} ago", human_secs(-left))
                        }
                    }),
                    r.tier1_drops.map_or("-".into(), |d| d.to_string()),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "NODE",
                    "TENANT",
                    "JOB",
                    "JOB KEY",
                    "SERIAL",
                    "SANDBOX",
                    "NETNS",
                    "STATE",
                    "EXPIRES IN",
                    "DROPS"
                ],
                &cells
            )
        );
    }
    finish(&errors)
}

/// `snas flows`.
pub fn flows(a: &ObserveArgs) -> ExitCode {
    let s = match sources(a) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let (jobs, mut errors) = collect_jobs(&s, false);
    let by_key: BTreeMap<String, JobRow> =
        jobs.into_iter().map(|j| (j.job_key.clone(), j)).collect();
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
        match agent.get_json(&format!("/v1/jobs/{}/counters", j.job_key)) {
            Ok(c) => rows.extend(agent_drops(&agent.label, j, &c, a.all)),
            Err(e) => errors.push(format!("{}: {e:#}", agent.label)),
        }
    }
    let by_key: BTreeMap<String, JobRow> =
        jobs.into_iter().map(|j| (j.job_key.clone(), j)).collect();
    for p in &s.proxies {
        match p.get("/metrics") {
            Ok(b) => rows.extend(proxy_drops(&p.label, &String::from_utf8_lossy(&b), &by_key)),
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
                    r.job_key.clone(),
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
mod tests {
    use super::*;

    #[test]
    fn response_with_length_chunks_or_close_is_split() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"hi"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"abcd"[..]));
        let (_, b) = parse_response(b"HTTP/1.0 200 OK\r\n\r\nuntil close").unwrap();
        assert_eq!(b, b"until close");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

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

    #[test]
    fn prometheus_samples_with_escaped_labels_parse() {
        let (n, l, v) =
            parse_sample(r#"snas_proxy_drops_total{reason="port_denied",job_key="a\"b"} 7"#)
                .unwrap();
        assert_eq!(n, "snas_proxy_drops_total");
        assert_eq!(l.get("reason").map(String::as_str), Some("port_denied"));
        assert_eq!(l.get("job_key").map(String::as_str), Some("a\"b"));
        assert_eq!(v, 7.0);
        let (n, l, v) = parse_sample("snas_proxy_flows 3").unwrap();
        assert_eq!((n.as_str(), l.len(), v), ("snas_proxy_flows", 0, 3.0));
        assert!(parse_sample("# HELP x y").is_none());
        assert!(parse_sample("broken{reason=x} 1").is_none());
    }

    #[test]
    fn proxy_drops_name_known_jobs_and_aggregate_unlabelled_ones() {
        let mut jobs = BTreeMap::new();
        jobs.insert(
            "00000000000000aa".to_owned(),
            JobRow {
                node: "node-1".into(),
                job: "build".into(),
                tenant: "acme".into(),
                job_key: "00000000000000aa".into(),
                serial: Some(1),
                sandbox_ip: "10.255.1.2".into(),
                netns: "ns".into(),
                expires_at: None,
                state: Some("running".into()),
                tier1_drops: None,
            },
        );
        let m = "# TYPE snas_proxy_drops_total counter\n\
                 snas_proxy_drops_total{reason=\"port_denied\",job_key=\"00000000000000aa\"} 4\n\
                 snas_proxy_drops_total{reason=\"untrusted_source\"} 2\n\
                 snas_proxy_flows 1\n";
        let rows = proxy_drops("proxy-1", m, &jobs);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].job.as_str(), rows[0].packets, rows[0].tier),
            ("build", 4, 2)
        );
        assert_eq!(
            (rows[1].job.as_str(), rows[1].reason.as_str()),
            ("*", "untrusted_source")
        );
    }

    #[test]
    fn table_aligns_text_left_and_numbers_right() {
        let t = table(
            &["JOB", "N"],
            &[
                vec!["a".into(), "5".into()],
                vec!["long-name".into(), "120".into()],
            ],
        );
        assert_eq!(t, "JOB          N\na            5\nlong-name  120\n");
    }

    #[test]
    fn durations_read_like_a_person_writes_them() {
        assert_eq!(human_secs(0.42), "0.4s");
        assert_eq!(human_secs(59.0), "59s");
        assert_eq!(human_secs(185.0), "3m05s");
        assert_eq!(human_secs(7260.0), "2h01m");
        assert_eq!(human_secs(-1.0), "-");
    }
}
