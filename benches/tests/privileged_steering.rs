//! Privileged test of the benchmark's receive steering (root, two online CPUs or more): what
//! `proxy_pps` relies on — `rps_cpus` written in one namespace moves a veth's receive
//! processing to the named CPU, the per-CPU counters see it there, and every value is written
//! back. It checks where packets are processed, never how fast.
#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::process::Command;

use snas_bench::steering::{CpuSnapshot, Steering};
use snas_testbed::netns;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Two namespaces joined by a veth pair, removed when dropped (also when the test fails).
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn new() -> Pair {
        let tag: u32 = rand::random();
        let p = Pair {
            a: format!("snasrps{tag:08x}a"),
            b: format!("snasrps{tag:08x}b"),
        };
        netns::add_netns(&p.a).unwrap();
        netns::add_netns(&p.b).unwrap();
        let ip = |args: &[&str]| netns::ip(args).unwrap();
        ip(&[
            "-n", &p.a, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", &p.b,
        ]);
        ip(&["-n", &p.a, "addr", "add", "192.0.2.1/24", "dev", "v0"]);
        ip(&["-n", &p.b, "addr", "add", "192.0.2.2/24", "dev", "v1"]);
        ip(&["-n", &p.a, "link", "set", "v0", "up"]);
        ip(&["-n", &p.b, "link", "set", "v1", "up"]);
        p
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = netns::del_netns(&self.a);
        let _ = netns::del_netns(&self.b);
    }
}

/// `rps_cpus` of `dev`'s first receive queue in `ns`, as a number.
fn rps_mask(ns: &str, dev: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{dev}/queues/rx-0/rps_cpus"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .replace(',', "");
    u64::from_str_radix(&text, 16).unwrap()
}

#[test]
fn steered_veth_is_received_on_the_named_cpu_and_restored_after() {
    assert!(
        is_root(),
        "privileged test: namespaces and rps_cpus need root; run it as root, or run the \
         unprivileged tests only: cargo nextest run --profile unprivileged"
    );
    let cpus = snas_bench::machine::online_cpus().unwrap();
    assert!(
        cpus.len() >= 2,
        "steering needs two online CPUs; this machine has {cpus:?}"
    );
    let (sender_cpu, steered_cpu) = (cpus[0], *cpus.last().unwrap());
    let pair = Pair::new();
    let before = (rps_mask(&pair.a, "v0"), rps_mask(&pair.b, "v1"));

    let steer = Steering::apply(
        std::slice::from_ref(&pair.b),
        &[steered_cpu],
        std::slice::from_ref(&pair.a),
        &[sender_cpu],
    )
    .unwrap();
    // v1 and lo in b, v0 and lo in a.
    assert_eq!(steer.queues(), 4);
    assert_eq!(rps_mask(&pair.b, "v1"), 1 << steered_cpu);
    assert_eq!(rps_mask(&pair.a, "v0"), 1 << sender_cpu);

    const DATAGRAMS: u64 = 20_000;
    let s0 = CpuSnapshot::read().unwrap();
    netns::in_netns(&pair.a, move || {
        // SAFETY: cpu_set_t is plain bits; CPU_SET stays inside it (the CPU is an online one,
        // below CPU_SETSIZE on any machine this runs on); sched_setaffinity(0) pins this
        // thread only.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(sender_cpu, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
        let s = UdpSocket::bind("192.0.2.1:0").unwrap();
        for _ in 0..DATAGRAMS {
            s.send_to(&[0u8; 36], "192.0.2.2:9").unwrap();
        }
    })
    .unwrap();
    // The steered CPU may still be working through its backlog when the sender is done: read
    // until it has caught up (or a second has passed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    let d = loop {
        let d = CpuSnapshot::read().unwrap().since(&s0);
        let received = d
            .iter()
            .find(|x| x.cpu == steered_cpu)
            .map_or(0, |x| x.packets);
        if received >= DATAGRAMS || std::time::Instant::now() >= deadline {
            break d;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let on = |cpu: usize| d.iter().find(|x| x.cpu == cpu).unwrap().packets;
    // Every datagram was received by v1 on the steered CPU (other traffic on the machine can
    // only add to it); without the steering they would be received on the sender's CPU.
    assert!(
        on(steered_cpu) >= DATAGRAMS,
        "CPU {steered_cpu} received {} packets, CPU {sender_cpu} {}, of {DATAGRAMS} sent",
        on(steered_cpu),
        on(sender_cpu)
    );

    steer.restore().unwrap();
    assert_eq!((rps_mask(&pair.a, "v0"), rps_mask(&pair.b, "v1")), before);
}

#[test]
fn steering_a_namespace_that_does_not_exist_fails_and_leaves_the_others_as_they_were() {
    assert!(is_root(), "privileged test: run it as root");
    let pair = Pair::new();
    let before = rps_mask(&pair.a, "v0");
    let missing = format!("{}-missing", pair.b);
    let r = Steering::apply(
        std::slice::from_ref(&pair.a),
        &[0],
        std::slice::from_ref(&missing),
        &[0],
    );
    let err = r.unwrap_err().to_string();
    assert!(err.contains(&missing), "{err}");
    assert_eq!(rps_mask(&pair.a, "v0"), before);
}
