//! End-to-end (root; `cargo build --release -p snas`, `SNAS_BIN`): names on the wire (issue 17),
//! natively and from gVisor, in one testbed. A job allowed `api.example.com` on 80 and 443:
//! - gets its page over HTTP and over HTTPS (the handshake verifies against the testbed CA);
//! - a request with `Host: blocked.example.com` to that address is reset, audited
//!   `host_mismatch` with the name on the wire;
//! - a ClientHello with SNI `evil.example.net` to that address is reset, audited
//!   `sni_mismatch`;
//! - a ClientHello padded to ~1.6 KB, written in two segments, with the allowed SNI gets the
//!   server's ServerHello;
//! - a new connection from the source port of a closed, checked connection (the sandbox picks
//!   its ports) is checked again: `Host: blocked.example.com` on it is reset;
//! - the allowed name still works afterwards.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use serde_json::Value;

use e2e_support::*;
use snas_testbed::Testbed;

const POLICY: &str =
    "[[egress]]\nhost = \"api.example.com:80\"\n[[egress]]\nhost = \"api.example.com:443\"\n";

/// argv: the CA certificate (PEM text: a gVisor job need not see the testbed's files).
/// Prints one `CASE OUTCOME` line per case: `OK` when the server answered as the allowed
/// name, `SERVERHELLO`, or how it failed (`ECONNRESET`, `EMPTY`, `SSLError`, ...).
const PY_NAMES: &str = r#"
import socket, ssl, sys, errno, os, struct, time, random
ca = sys.argv[1]
ip = socket.getaddrinfo("api.example.com", 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
WANT = b"hello from api.example.com"
def err(e):
    if isinstance(e, ssl.SSLError):
        return "SSLError"
    n = getattr(e, "errno", None)
    return errno.errorcode.get(n, type(e).__name__) if n else type(e).__name__
def read_all(s):
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            return data
        data += b
def http(host, bind_port=None, linger=False):
    s = socket.socket(); s.settimeout(5)
    try:
        if bind_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", bind_port))
        s.connect((ip, 80))
        s.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
        return "OK" if WANT in read_all(s) else "EMPTY"
    except OSError as e:
        return err(e)
    finally:
        s.close()
def https(sni, verify=True):
    ctx = ssl.create_default_context(cadata=ca)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    s = socket.create_connection((ip, 443), timeout=5)
    try:
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(b"GET / HTTP/1.1\r\nHost: " + sni.encode() + b"\r\nConnection: close\r\n\r\n")
        data = b""
        try:
            data = read_all(t)
        except ssl.SSLError:
            pass
        return "OK" if WANT in data else "EMPTY"
    except OSError as e:
        return err(e)
    finally:
        s.close()
def ext(t, d):
    return struct.pack("!HH", t, len(d)) + d
def hello(sni, size):
    n = sni.encode()
    exts = (ext(0, struct.pack("!HBH", len(n) + 3, 0, len(n)) + n)
            + ext(10, struct.pack("!HH", 2, 0x001d))
            + ext(13, struct.pack("!HHHHH", 8, 0x0403, 0x0804, 0x0401, 0x0503))
            + ext(43, b"\x02\x03\x04")
            + ext(51, struct.pack("!HHH", 36, 0x001d, 32) + os.urandom(32)))
    def build(exts):
        body = (b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
                + struct.pack("!HH", 2, 0x1301) + b"\x01\x00" + struct.pack("!H", len(exts)) + exts)
        hs = b"\x01" + len(body).to_bytes(3, "big") + body
        return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs
    pad = size - len(build(exts)) - 4
    return build(exts + ext(21, b"\x00" * pad))
def raw_hello(sni, size):
    rec = hello(sni, size)
    s = socket.create_connection((ip, 443), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        s.sendall(rec[:1000])
        time.sleep(0.05)
        s.sendall(rec[1000:])
        got = b""
        while len(got) < 6:
            b = s.recv(4096)
            if not b:
                break
            got += b
        if len(got) >= 6 and got[0] == 0x16 and got[5] == 0x02:
            return "SERVERHELLO %d" % len(rec)
        return "EMPTY"
    except OSError as e:
        return err(e)
    finally:
        s.close()
print("http-allowed", http("api.example.com"))
print("https-allowed", https("api.example.com"))
print("http-wrong-host", http("blocked.example.com"))
print("tls-wrong-sni", https("evil.example.net", verify=False))
print("tls-padded-hello", raw_hello("api.example.com", 1600))
port = random.randint(40000, 59000)
print("reuse-first", http("api.example.com", bind_port=port))
time.sleep(0.2)
print("reuse-second-wrong-host", http("blocked.example.com", bind_port=port))
print("https-allowed-after", https("api.example.com"))
"#;

/// The JSON lines of the proxies' audit logs.
fn proxy_audit(tb: &Testbed) -> Vec<Value> {
    (1..=2)
        .flat_map(|n| {
            let p = tb.topology().proxy_dir(n).join("audit.jsonl");
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<Value>>()
        })
        .collect()
}

fn outcomes(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Asserts the outcomes of one run of [`PY_NAMES`] and the audit lines of `job` (its name).
fn assert_names_checked(tb: &Testbed, out: &str, job: &str, how: &str) {
    let o = outcomes(out);
    let get = |k: &str| o.get(k).map(String::as_str).unwrap_or("(missing)");
    assert_eq!(get("http-allowed"), "OK", "{how}: {out}");
    assert_eq!(get("https-allowed"), "OK", "{how}: {out}");
    let reset = |v: &str| ["ECONNRESET", "EMPTY", "SSLError", "EPIPE"].contains(&v);
    assert!(reset(get("http-wrong-host")), "{how}: {out}");
    assert!(reset(get("tls-wrong-sni")), "{how}: {out}");
    let padded = get("tls-padded-hello");
    assert!(padded.starts_with("SERVERHELLO 16"), "{how}: {out}");
    assert_eq!(get("reuse-first"), "OK", "{how}: {out}");
    assert!(
        reset(get("reuse-second-wrong-host")),
        "{how}: a reused 5-tuple skipped the check: {out}"
    );
    assert_eq!(get("https-allowed-after"), "OK", "{how}: {out}");

    let mut lines = Vec::new();
    wait_until(
        std::time::Duration::from_secs(5),
        "the proxies' audit lines of the mismatches",
        || {
            lines = proxy_audit(tb)
                .into_iter()
                .filter(|l| l["job"] == job && l["kind"] == "flow" && l["action"] == "deny")
                .collect();
            lines.len() >= 3
        },
    );
    let by = |reason: &str, name: &str| {
        lines
            .iter()
            .filter(|l| l["reason"] == reason && l["hostname"] == name)
            .count()
    };
    assert_eq!(
        by("host_mismatch", "blocked.example.com"),
        2,
        "{how}: {lines:?}"
    );
    assert_eq!(
        by("sni_mismatch", "evil.example.net"),
        1,
        "{how}: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["dst"] == "203.0.113.10" && l["rule"].is_u64()),
        "{how}: {lines:?}"
    );
}

#[test]
fn a_name_on_the_wire_that_the_address_was_not_resolved_for_is_reset_natively_and_in_gvisor() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let ca = std::fs::read_to_string(snas_testbed::tls::ca_path(&snas_testbed::tls::dir(
        tb.topology(),
    )))
    .unwrap();
    let before: f64 = (1..=2)
        .map(|n| proxy_drops(&tb, n, "host_mismatch") + proxy_drops(&tb, n, "sni_mismatch"))
        .sum();

    // Native.
    let native = policy("acme", POLICY);
    let job_name = native
        .lines()
        .find_map(|l| l.strip_prefix("job = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let job = Job::start(&tb, 1, &native);
    let out = job.python(PY_NAMES, &[&ca]);
    eprintln!("native:\n{out}");
    assert_names_checked(&tb, &out, &job_name, "native");
    drop(job);

    // gVisor (`snas run`: runsc with the job's network).
    let gv = policy("acme", POLICY);
    let gv_name = gv
        .lines()
        .find_map(|l| l.strip_prefix("job = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let token = tb.sign_policy(&gv).unwrap();
    let run = run_python_in_gvisor(&tb, &token, "120s", PY_NAMES, &[&ca]);
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "snas run failed ({}):\n{out}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    eprintln!("gVisor:\n{out}");
    assert_names_checked(&tb, &out, &gv_name, "gVisor");

    let after: f64 = (1..=2)
        .map(|n| proxy_drops(&tb, n, "host_mismatch") + proxy_drops(&tb, n, "sni_mismatch"))
        .sum();
    assert!(after >= before + 6.0, "drops {before} -> {after}");
}
