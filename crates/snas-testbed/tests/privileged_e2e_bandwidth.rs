//! End-to-end (root; `cargo build -p snas` first): bandwidth limits. With `egress_bps` and
//! `ingress_bps` at 20 Mbit/s, a bulk transfer in each direction runs at 20 Mbit/s ± 5 %, and
//! two jobs with equal limits downloading at the same time each get their rate.
//!
//! Rates are measured inside the job over 3 s after a 0.5 s warm-up: for downloads from the
//! bytes received, for uploads from the bytes the server acknowledged (`TCP_INFO`
//! `tcpi_bytes_acked`), so data still queued in socket buffers is not counted. The limits count
//! IP bytes (what the pacers charge), so the payload rate is scaled by full-sized packets'
//! IP length over their payload: MTU 1444, 20 B IPv4 + 32 B TCP with timestamps.
#![allow(clippy::unwrap_used)]

mod e2e_support;

use e2e_support::*;

const RATE: f64 = 20e6;

const LIMITS: &str = r#"
[[egress]]
host = "bulk.example.com:5201"
[limits]
egress_bps = "20Mbit"
ingress_bps = "20Mbit"
"#;

/// `down` or `up` against bulk.example.com:5201; prints the rate in bit/s.
const PY_BULK: &str = r#"
import socket, sys, time, struct, threading
mode = sys.argv[1]
WARM, WINDOW = 0.5, 3.0
s = socket.create_connection(("bulk.example.com", 5201), timeout=10)
if mode == "down":
    s.sendall(b"SEND %d\n" % int(20e6 / 8 * 6))
    got, t0, a, b = 0, None, None, None
    while True:
        d = s.recv(1 << 16)
        if not d:
            break
        now = time.monotonic()
        if t0 is None:
            t0 = now
        got += len(d)
        if a is None and now - t0 >= WARM:
            a = (now, got)
        if a is not None and now - a[0] >= WINDOW:
            b = (now, got)
            break
    print((b[1] - a[1]) * 8 / (b[0] - a[0]))
else:
    s.sendall(b"RECV\n")
    stop = threading.Event()
    def pump():
        buf = b"\0" * (1 << 16)
        while not stop.is_set():
            try:
                s.send(buf)
            except socket.timeout:
                pass
    t = threading.Thread(target=pump); t.start()
    def acked():
        return struct.unpack_from("Q", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232), 120)[0]
    time.sleep(WARM)
    a = (time.monotonic(), acked())
    time.sleep(WINDOW)
    b = (time.monotonic(), acked())
    stop.set(); t.join()
    print((b[1] - a[1]) * 8 / (b[0] - a[0]))
"#;

/// Job MTU (underlay 1500 − 56).
const MTU: f64 = 1444.0;
/// IPv4 + TCP header with the timestamp option (Linux's default).
const HEADERS: f64 = 52.0;

/// Payload rate → IP-level rate of full-sized segments.
fn ip_rate(payload_bps: f64) -> f64 {
    payload_bps * MTU / (MTU - HEADERS)
}

fn rate(job: &Job, mode: &str) -> f64 {
    ip_rate(job.python(PY_BULK, &[mode]).trim().parse().unwrap())
}

fn assert_within_5_percent(what: &str, r: f64) {
    let err = (r - RATE) / RATE;
    assert!(
        err.abs() <= 0.05,
        "{what}: {:.2} Mbit/s is {:+.1} % off 20 Mbit/s",
        r / 1e6,
        err * 100.0
    );
}

#[test]
fn bulk_transfers_run_at_the_policy_rate_in_both_directions() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let job = Job::start(&tb, 1, &policy("acme", LIMITS));
    let down = rate(&job, "down");
    let up = rate(&job, "up");
    eprintln!(
        "IP-level: download {:.2} Mbit/s, upload {:.2} Mbit/s",
        down / 1e6,
        up / 1e6
    );
    assert_within_5_percent("download (ingress_bps)", down);
    assert_within_5_percent("upload (egress_bps)", up);
}

#[test]
fn two_jobs_with_equal_limits_get_equal_shares() {
    let _s = serial();
    let tb = testbed_with_proxies();
    let _logs = LogsOnFailure(&tb);
    let a = Job::start(&tb, 1, &policy("acme", LIMITS));
    // Both on node 1: they share its uplink (and the proxies' links).
    let b = Job::start(&tb, 1, &policy("acme", LIMITS));
    let mut pa = a.command("python3", &["-c", PY_BULK, "down"]);
    let mut pb = b.command("python3", &["-c", PY_BULK, "down"]);
    let ca = pa.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let cb = pb.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let oa = ca.wait_with_output().unwrap();
    let ob = cb.wait_with_output().unwrap();
    assert!(oa.status.success() && ob.status.success());
    let ra = ip_rate(String::from_utf8_lossy(&oa.stdout).trim().parse().unwrap());
    let rb = ip_rate(String::from_utf8_lossy(&ob.stdout).trim().parse().unwrap());
    eprintln!(
        "IP-level: job a {:.2} Mbit/s, job b {:.2} Mbit/s",
        ra / 1e6,
        rb / 1e6
    );
    assert_within_5_percent("job a", ra);
    assert_within_5_percent("job b", rb);
    let share = ra / (ra + rb);
    assert!(
        (0.475..=0.525).contains(&share),
        "unequal shares: {:.1} % / {:.1} %",
        share * 100.0,
        (1.0 - share) * 100.0
    );
}
