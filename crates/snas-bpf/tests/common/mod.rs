//! Shared helpers of the privileged BPF tests: root check, a guard that tears the node down,
//! and small frame builders (Ethernet + IPv4 + TCP/UDP with valid checksums).
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use snas_bpf::testing::{self, RunOutput, SkbCtx};
use snas_bpf::{JobConfig, NodeConfig, PortRule, ProxyEntry, RuleProtocol, Tier1};
pub use snas_bpf::{JobKey, PolicySerial};
use snas_wire::Reason;

pub const SANDBOX_MAC: [u8; 6] = [0x02, 0x53, 0x4e, 0x00, 0x00, 0x02];
pub const HOST_MAC: [u8; 6] = [0x02, 0x53, 0x4e, 0x00, 0x00, 0x01];
pub const SANDBOX_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const PROXY_IPS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(192, 0, 2, 20),
    Ipv4Addr::new(192, 0, 2, 21),
    Ipv4Addr::new(192, 0, 2, 22),
];
pub const ALLOWED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
pub const JOB_KEY: JobKey = JobKey(0x0123_4567_89ab_cdef);
pub const TENANT: snas_bpf::TenantId = snas_bpf::TenantId(0xfeed_beef);
pub const SERIAL: PolicySerial = PolicySerial(7);
/// test_run needs a real device; the loopback device always exists (ifindex 1).
pub const VETH: u32 = 1;
pub const UPLINK: u32 = 1;
pub const UPLINK_MTU: u32 = 1500;

/// Fails the test, saying why, unless it runs as root: a privileged test that cannot run must
/// never pass (these binaries are `privileged_*`; `cargo nextest run --profile unprivileged`
/// leaves them out and lists them as skipped).
pub fn require_root(test: &str) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "privileged test {test}: needs root (BPF_PROG_TEST_RUN, bpffs); run it as root, or run \
         the unprivileged tests only: cargo nextest run --profile unprivileged"
    );
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A loaded node under a unique pin directory, torn down on drop.
pub struct Node {
    pub t1: Option<Tier1>,
    pub dir: PathBuf,
    /// Network namespace the programs were attached in (ifindexes are that namespace's).
    pub netns: Option<String>,
}

impl Node {
    pub fn t1(&self) -> &Tier1 {
        self.t1.as_ref().expect("loaded")
    }

    pub fn run_sandbox(&self, frame: &[u8]) -> RunOutput {
        testing::run(
            self.t1().sandbox_prog(),
            frame,
            &SkbCtx {
                ifindex: VETH,
                ..Default::default()
            },
        )
        .expect("test run")
    }

    pub fn run_sandbox_egress(&self, frame: &[u8]) -> RunOutput {
        testing::run(
            self.t1().sandbox_egress_prog(),
            frame,
            &SkbCtx {
                ifindex: VETH,
                ..Default::default()
            },
        )
        .expect("test run")
    }

    pub fn run_uplink(&self, frame: &[u8]) -> RunOutput {
        testing::run(
            self.t1().uplink_prog(),
            frame,
            &SkbCtx {
                ifindex: UPLINK,
                ..Default::default()
            },
        )
        .expect("test run")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(t1) = self.t1.take() {
            match self.netns.clone() {
                None => {
                    let _ = t1.teardown();
                }
                Some(ns) => {
                    // Detach from inside the namespace so that no other namespace's device
                    // with the same ifindex is touched.
                    let _ = std::thread::spawn(move || {
                        if let Ok(f) = std::fs::File::open(format!("/var/run/netns/{ns}")) {
                            use std::os::fd::AsRawFd;
                            // SAFETY: f is an open netns fd; only this thread moves.
                            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
                                let _ = t1.teardown();
                            }
                        }
                    })
                    .join();
                }
            }
        }
        let _ = snas_bpf::remove_pins(&self.dir);
    }
}

pub fn node_config(name: &str) -> NodeConfig {
    snas_bpf::ensure_bpffs().expect("bpffs");
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/snas-test-{}-{}-{name}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cfg = NodeConfig::new(name, UPLINK, NODE_IP, UPLINK_MTU);
    cfg.attach_uplink = false;
    cfg.pin_dir = dir;
    cfg.record_debug = true;
    cfg
}

pub fn load(cfg: &NodeConfig) -> Node {
    // The guard exists before loading so that a failed load leaves no pins behind.
    let mut node = Node {
        t1: None,
        dir: cfg.pin_dir.clone(),
        netns: None,
    };
    node.t1 = Some(Tier1::load(cfg).expect("load tier1"));
    node
}

/// The set-up most tests start from: requires root, loads a node named `name` (its config
/// edited by `node_edit`), configures the test job (edited by `job_edit`) and sets `proxies`.
pub fn node_with_job(
    name: &str,
    node_edit: impl FnOnce(&mut NodeConfig),
    job_edit: impl FnOnce(&mut JobConfig),
    proxies: &[ProxyEntry],
) -> Node {
    require_root(name);
    let mut cfg = node_config(name);
    node_edit(&mut cfg);
    let n = load(&cfg);
    let mut j = job();
    job_edit(&mut j);
    n.t1().configure_job(&j).expect("configure job");
    n.t1().set_proxies(proxies).expect("proxies");
    n
}

/// The first `n` test proxies, all active.
pub fn proxies(n: usize) -> Vec<ProxyEntry> {
    PROXY_IPS[..n]
        .iter()
        .map(|&ip| ProxyEntry::active(ip))
        .collect()
}

/// What most tests allow on 203.0.113.0/24: TCP 443 and UDP 4000-4999.
pub fn tcp_443_and_udp_4000s() -> [PortRule; 2] {
    [
        PortRule::port(RuleProtocol::Tcp, 443),
        PortRule {
            proto: RuleProtocol::Udp,
            lo: 4000,
            hi: 4999,
        },
    ]
}

/// Allows the test job 203.0.113.0/24 (where [`ALLOWED_IP`] is) with `rules`.
pub fn allow_test_net(n: &Node, rules: &[PortRule]) {
    n.t1()
        .allow_cidr(
            JOB_KEY,
            "203.0.113.0/24".parse().expect("net"),
            rules,
            false,
        )
        .expect("cidr");
}

/// Sandbox-side drops of the test job for `r`.
pub fn sandbox_drops(n: &Node, r: Reason) -> u64 {
    n.t1()
        .counters(JOB_KEY)
        .expect("counters")
        .from_sandbox
        .dropped(r)
        .packets
}

/// Runs `frame` through the sandbox program and checks it is dropped and counted once under
/// `r`.
pub fn assert_drop(n: &Node, frame: &[u8], r: Reason) {
    let before = sandbox_drops(n, r);
    let out = n.run_sandbox(frame);
    assert_eq!(out.retval, testing::TC_ACT_SHOT, "expected drop for {r}");
    assert_eq!(sandbox_drops(n, r), before + 1, "counter of {r}");
}

/// The test job: identity and addresses, no limits, no expiry, no DNS budget.
pub fn job() -> JobConfig {
    JobConfig {
        veth_ifindex: VETH,
        job_key: JOB_KEY,
        tenant_id: TENANT,
        policy_serial: SERIAL,
        sandbox_ip: SANDBOX_IP,
        sandbox_mac: SANDBOX_MAC,
        host_mac: HOST_MAC,
        gateway_ip: GATEWAY_IP,
        dns_port: 5353,
        ..JobConfig::default()
    }
}

pub fn csum(data: &[u8], init: u32) -> u16 {
    let mut sum = init;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    let mut sum = 0u32;
    for w in [[s[0], s[1]], [s[2], s[3]], [d[0], d[1]], [d[2], d[3]]] {
        sum += u32::from(u16::from_be_bytes(w));
    }
    sum + u32::from(proto) + len as u32
}

#[derive(Clone, Debug)]
pub struct Pkt {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
    pub frag_off: u16,
    pub ip_options: Vec<u8>,
}

impl Pkt {
    pub fn tcp_syn(dst: Ipv4Addr, dport: u16) -> Pkt {
        Pkt {
            src_mac: SANDBOX_MAC,
            dst_mac: HOST_MAC,
            src: SANDBOX_IP,
            dst,
            proto: 6,
            sport: 40000,
            dport,
            tcp_flags: 0x02,
            seq: 1000,
            ack: 0,
            payload: vec![],
            frag_off: 0,
            ip_options: vec![],
        }
    }

    pub fn udp(dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Pkt {
        Pkt {
            proto: 17,
            tcp_flags: 0,
            payload: payload.to_vec(),
            ..Pkt::tcp_syn(dst, dport)
        }
    }

    /// The same flow's packet with other TCP flags.
    pub fn with_flags(&self, tcp_flags: u8) -> Pkt {
        Pkt {
            tcp_flags,
            ..self.clone()
        }
    }

    /// The packet the far side sends back on this flow (addresses, ports and MACs swapped),
    /// with `tcp_flags`.
    pub fn reply(&self, tcp_flags: u8) -> Pkt {
        Pkt {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            tcp_flags,
            payload: vec![],
            ..self.clone()
        }
    }

    /// The IPv4 packet (no Ethernet).
    pub fn ip(&self) -> Vec<u8> {
        let l4 = match self.proto {
            6 => {
                let mut t = vec![0u8; 20];
                t[0..2].copy_from_slice(&self.sport.to_be_bytes());
                t[2..4].copy_from_slice(&self.dport.to_be_bytes());
                t[4..8].copy_from_slice(&self.seq.to_be_bytes());
                t[8..12].copy_from_slice(&self.ack.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = self.tcp_flags;
                t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&self.payload);
                let c = csum(&t, pseudo(self.src, self.dst, 6, t.len()));
                t[16..18].copy_from_slice(&c.to_be_bytes());
                t
            }
            17 => {
                let mut u = vec![0u8; 8];
                u[0..2].copy_from_slice(&self.sport.to_be_bytes());
                u[2..4].copy_from_slice(&self.dport.to_be_bytes());
                u[4..6].copy_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                u.extend_from_slice(&self.payload);
                let c = csum(&u, pseudo(self.src, self.dst, 17, u.len()));
                u[6..8].copy_from_slice(&c.to_be_bytes());
                u
            }
            _ => self.payload.clone(),
        };
        let ihl = 20 + self.ip_options.len();
        let mut ip = vec![0u8; 20];
        ip[0] = 0x40 | (ihl / 4) as u8;
        ip[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag_off.to_be_bytes());
        ip[8] = 64;
        ip[9] = self.proto;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = csum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&self.ip());
        f
    }
}

/// Length of an Ethernet header.
pub const ETH: usize = 14;

/// Whether an IPv4 header checksums to zero.
pub fn ipv4_header_ok(h: &[u8]) -> bool {
    csum(&h[..20], 0) == 0
}

/// Whether a TCP/UDP segment in an IPv4 packet has a valid checksum.
pub fn l4_ok(ip: &[u8]) -> bool {
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    csum(&ip[ihl..tot], pseudo(src, dst, ip[9], tot - ihl)) == 0
}

/// The C flow hash (bpf/lib/maglev.h), reimplemented to check outer source ports and proxy
/// choice independently of the program.
pub fn flow_hash(p: &Pkt) -> u32 {
    fn fmix32(mut h: u32) -> u32 {
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
    let ne = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
    let mut h = fmix32(ne(p.src) ^ 0x534e_4153);
    h = fmix32(h ^ ne(p.dst));
    h = fmix32(h ^ ((u32::from(p.sport) << 16) | u32::from(p.dport)));
    fmix32(h ^ u32::from(p.proto))
}

/// The 56 overlay bytes the shared contract prescribes for `inner_len` bytes of inner IPv4.
pub fn expected_outer(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    hash: u32,
    inner_len: usize,
    job_key: JobKey,
) -> Vec<u8> {
    let mut o = Vec::with_capacity(56);
    let tot = (inner_len + 56) as u16;
    o.extend_from_slice(&[0x45, 0x00]);
    o.extend_from_slice(&tot.to_be_bytes());
    o.extend_from_slice(&[0, 0, 0x40, 0x00, 64, 17, 0, 0]);
    o.extend_from_slice(&src.octets());
    o.extend_from_slice(&dst.octets());
    let c = csum(&o[..20], 0);
    o[10..12].copy_from_slice(&c.to_be_bytes());
    o.extend_from_slice(&(0xC000u16 | (hash & 0x3fff) as u16).to_be_bytes());
    o.extend_from_slice(&6081u16.to_be_bytes());
    o.extend_from_slice(&(tot - 20).to_be_bytes());
    o.extend_from_slice(&[0, 0]);
    // GENEVE: ver 0 | opt_len 5, C=1, proto 0x0800, VNI 0.
    o.extend_from_slice(&[0x05, 0x40, 0x08, 0x00, 0, 0, 0, 0]);
    // Option: class 0xFF53, type 0x81, length 4 words.
    o.extend_from_slice(&[0xff, 0x53, 0x81, 0x04]);
    o.extend_from_slice(&TENANT.get().to_be_bytes());
    o.extend_from_slice(&job_key.get().to_be_bytes());
    o.extend_from_slice(&SERIAL.get().to_be_bytes());
    o
}

pub const UNDERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
pub const PROXY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];

/// A reply as a proxy sends it: outer headers per the contract around the IPv4 packet `inner`.
pub fn geneve_frame(from: Ipv4Addr, job_key: JobKey, inner: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&UNDERLAY_MAC);
    f.extend_from_slice(&PROXY_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&expected_outer(from, NODE_IP, 0x1234, inner.len(), job_key));
    f.extend_from_slice(inner);
    f
}

/// Reads a big-endian u16 / u32 of a frame.
pub fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

pub fn be32(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]])
}
