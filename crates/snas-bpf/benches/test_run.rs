//! Per-packet cost of the tier-1 programs, measured by BPF_PROG_TEST_RUN (kernel-timed around
//! each single run). Root needed. Prints a table; `cargo bench -p snas-bpf --bench test_run`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use snas_bpf::testing::{self, SkbCtx};
use snas_bpf::{
    Bps, JobConfig, JobKey, NodeConfig, PacketBudget, PolicySerial, PortRule, ProxyEntry,
    RuleProtocol, Tier1,
};

const RUNS: u32 = 20_000;
const SANDBOX_MAC: [u8; 6] = [2, 0x53, 0x4e, 0, 0, 2];
const HOST_MAC: [u8; 6] = [2, 0x53, 0x4e, 0, 0, 1];
const JOB: JobKey = JobKey(0x1234_5678_9abc_def0);
/// 400 Gbit/s: stamps every packet without the horizon ever dropping one.
const EGRESS: Bps = match Bps::gbit(400) {
    Some(b) => b,
    None => panic!("400 Gbit/s is a rate"),
};

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        let hi = u32::from(c[0]) << 8;
        sum += hi | c.get(1).map_or(0, |&b| u32::from(b));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + TCP (flags) or UDP, `payload` zero bytes, source port `sport`.
fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let l4len = if proto == 6 { 20 } else { 8 };
    let tot = 20 + l4len + payload;
    let mut f = Vec::with_capacity(14 + tot);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&SANDBOX_MAC);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&(tot as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    let c = csum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&443u16.to_be_bytes());
    if proto == 6 {
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f.resize(14 + tot, 0);
    f
}

/// Times `RUNS` runs of `frames(i)`; every verdict must be one of `want`.
fn measure(name: &str, t1: &Tier1, prog: &str, frames: &dyn Fn(u32) -> Vec<u8>, want: &[i32]) {
    let fd = if prog == "uplink" {
        t1.uplink_prog()
    } else {
        t1.sandbox_prog()
    };
    let ctx = SkbCtx {
        ifindex: 1,
        ..Default::default()
    };
    let mut ns = Vec::with_capacity(RUNS as usize);
    for i in 0..RUNS {
        let out = testing::run(fd, &frames(i), &ctx).expect("test run");
        assert!(
            want.contains(&out.retval),
            "{name}: unexpected verdict {}",
            out.retval
        );
        ns.push(out.duration_ns);
    }
    ns.sort_unstable();
    let mean = ns.iter().map(|&x| u64::from(x)).sum::<u64>() / u64::from(RUNS);
    println!(
        "{name:<44} {mean:>8} {:>8} {:>8}",
        ns[ns.len() / 2],
        ns[ns.len() * 99 / 100]
    );
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP test_run bench: needs root");
        return;
    }
    snas_bpf::ensure_bpffs().expect("bpffs");
    let mut node = NodeConfig::new("bench", 1, Ipv4Addr::new(192, 0, 2, 10), 9000);
    node.attach_uplink = false;
    node.pin_dir = PathBuf::from(format!("/sys/fs/bpf/snas-bench-{}", std::process::id()));
    // Every denied UDP datagram of the first UDP path is answered; the next path runs with
    // the bucket empty (it refills by one a second: a few answers may still slip in).
    node.icmp_budget = PacketBudget::new(1, RUNS).expect("budget");
    let t1 = Tier1::load(&node).expect("load");
    let job = JobConfig {
        veth_ifindex: 1,
        job_key: JOB,
        tenant_id: snas_wire::TenantId(1),
        policy_serial: PolicySerial(1),
        sandbox_ip: Ipv4Addr::new(10, 88, 0, 2),
        sandbox_mac: SANDBOX_MAC,
        host_mac: HOST_MAC,
        gateway_ip: Ipv4Addr::new(10, 88, 0, 1),
        dns_port: 53,
        egress: Some(EGRESS),
        ..JobConfig::default()
    };
    t1.configure_job(&job).expect("job");
    let proxies: Vec<_> = (20..28)
        .map(|i| ProxyEntry::active(Ipv4Addr::new(192, 0, 2, i)))
        .collect();
    t1.set_proxies(&proxies).expect("proxies");
    t1.allow_cidr(
        JOB,
        "203.0.113.0/24".parse().expect("net"),
        &[PortRule::port(RuleProtocol::Tcp, 443)],
        false,
    )
    .expect("cidr");
    for i in 0..1000u32 {
        let ip = Ipv4Addr::from(0xc633_6400 + (i % 250)); // 198.51.100.x
        t1.allow_ip(
            JobKey(JOB.get() + u64::from(i)),
            ip,
            &[PortRule::all(RuleProtocol::Any)],
            None,
        )
        .expect("ip");
    }
    let sb = [10, 88, 0, 2];
    let dst = [203, 0, 113, 7];
    println!("BPF_PROG_TEST_RUN, {RUNS} single runs each, ns per packet (kernel-timed)");
    println!("{:<44} {:>8} {:>8} {:>8}", "path", "mean", "p50", "p99");
    for size in [64usize, 1400] {
        let payload = size - 40;
        measure(
            &format!("encap, established TCP flow, {size} B IP"),
            &t1,
            "sandbox",
            &|_| frame(sb, dst, 6, 40000, 0x10, payload),
            &[7],
        );
    }
    measure(
        "encap, new TCP flow (SYN, unique port)",
        &t1,
        "sandbox",
        &|i| frame(sb, dst, 6, 1 + (i % 60000) as u16, 0x02, 0),
        &[7],
    );
    measure(
        "deny: no rule, UDP (audit + ICMP reply)",
        &t1,
        "sandbox",
        &|_| frame(sb, [198, 51, 100, 1], 17, 5000, 0, 32),
        &[7],
    );
    measure(
        "deny: no rule, UDP beyond the ICMP budget",
        &t1,
        "sandbox",
        &|_| frame(sb, [198, 51, 100, 1], 17, 5000, 0, 32),
        &[2, 7],
    );
    measure(
        "deny: no rule, TCP SYN (RST reply)",
        &t1,
        "sandbox",
        &|_| frame(sb, [198, 51, 100, 1], 6, 5000, 0x02, 0),
        &[7],
    );
    measure(
        "drop: spoofed source",
        &t1,
        "sandbox",
        &|_| frame([10, 88, 0, 3], dst, 6, 40000, 0x10, 0),
        &[2],
    );
    let decap = {
        let inner = frame(dst, sb, 6, 443, 0x10, 1360);
        let mut f = Vec::new();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
        let tot = (inner.len() - 14 + 56) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&tot.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 20, 192, 0, 2, 10]);
        let c = csum(&ip, 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&0xc001u16.to_be_bytes());
        f.extend_from_slice(&6081u16.to_be_bytes());
        f.extend_from_slice(&(tot - 20).to_be_bytes());
        f.extend_from_slice(&[
            0, 0, 0x05, 0x40, 0x08, 0x00, 0, 0, 0, 0, 0xff, 0x53, 0x81, 0x04,
        ]);
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&JOB.get().to_be_bytes());
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&inner[14..]);
        f
    };
    measure(
        "decap on the uplink, 1400 B inner + flow",
        &t1,
        "uplink",
        &|_| decap.clone(),
        &[7],
    );
    measure(
        "uplink pass-through (not GENEVE)",
        &t1,
        "uplink",
        &|_| frame(dst, sb, 17, 5000, 0, 100),
        &[0],
    );
    age_flows_cost(&t1);
    println!();
    println!(
        "{:<20} {:>10} {:>12}",
        "pinned map", "entries", "memlock KiB"
    );
    let mut pins: Vec<_> = std::fs::read_dir(&node.pin_dir)
        .expect("pin dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("snas_"))
        })
        .collect();
    pins.sort();
    let mut sum = 0;
    for p in pins {
        use libbpf_rs::MapCore;
        let m = libbpf_rs::MapHandle::from_pinned_path(&p).expect("open pin");
        let info = m.query_fdinfo().expect("fdinfo");
        let kib = info.memlock.unwrap_or(0) / 1024;
        sum += kib;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!("{name:<20} {:>10} {kib:>12}", info.max_entries);
    }
    println!("{:<20} {:>10} {sum:>12}", "total", "");
    t1.teardown().expect("teardown");
}

/// Wall time of the agent's periodic ageing pass over a flow table of 60,000 then 200,000
/// open connections (the SYN path above left 60,000).
fn age_flows_cost(t1: &Tier1) {
    let ctx = SkbCtx {
        ifindex: 1,
        ..Default::default()
    };
    println!();
    println!(
        "{:<44} {:>8} {:>8}",
        "ageing pass (Tier1::age_flows)", "flows", "ms"
    );
    let mut filled = 0u32;
    for target in [0u32, 140_000] {
        while filled < target {
            // Distinct destinations x ports: new flows that all stay open.
            let dst = [203, 0, 113, (filled / 60_000) as u8 + 10];
            let f = frame(
                [10, 88, 0, 2],
                dst,
                6,
                1 + (filled % 60_000) as u16,
                0x02,
                0,
            );
            let out = testing::run(t1.sandbox_prog(), &f, &ctx).expect("test run");
            assert_eq!(out.retval, 7, "flow {filled} admitted");
            filled += 1;
        }
        let started = std::time::Instant::now();
        let r = t1
            .age_flows(&snas_bpf::FlowTimeouts::default())
            .expect("age flows");
        let ms = started.elapsed().as_secs_f64() * 1e3;
        println!("{:<44} {:>8} {ms:>8.1}", "", r.kept);
    }
}
