//! End-to-end over real interfaces (root; fails, saying so, otherwise): a sandbox
//! namespace, a node namespace with the tier-1 programs attached by [`Tier1::attach_job`], and
//! a proxy namespace with a UDP socket on 6081. A datagram from the sandbox must arrive at the
//! proxy GENEVE-encapsulated with our option; a GENEVE reply from the proxy must arrive at the
//! sandbox socket decapsulated. All three namespaces (and with them the veths) are deleted by
//! a guard; the node's programs are detached and unpinned from inside the node namespace.

mod common;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use common::*;
use snas_bpf::{Bps, PortRule, ProxyEntry, RuleProtocol};

struct Netns {
    names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?}");
}

fn sh_in(ns: &str, cmd: &[&str]) {
    let st = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .status()
        .expect("run");
    assert!(st.success(), "{ns}: {cmd:?}");
}

fn enter(ns: &str) {
    let f = File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    // SAFETY: f is an open netns fd; setns changes only the calling thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}");
}

fn link_info(ns: &str, dev: &str) -> (u32, [u8; 6]) {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", dev])
        .output()
        .expect("ip link");
    let s = String::from_utf8_lossy(&out.stdout).to_string();
    let idx = s
        .split(':')
        .next()
        .and_then(|x| x.trim().parse().ok())
        .expect("ifindex");
    let mac = s
        .split("link/ether ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("mac");
    let mut m = [0u8; 6];
    for (i, b) in mac.split(':').enumerate() {
        m[i] = u8::from_str_radix(b, 16).expect("hex");
    }
    (idx, m)
}

/// Three namespaces wired as sandbox ↔ node ↔ proxy, with tier 1 loaded and the job attached
/// in the node namespace. Field order = drop order: the node (detach, unpin) before the
/// namespaces.
struct Topo {
    n: Node,
    node: String,
    sb: String,
    px: String,
    /// The sandbox's end of its veth (in `sb`).
    sb_dev: String,
    sb_mac: [u8; 6],
    /// The host end of the sandbox veth (in `node`).
    host_mac: [u8; 6],
    _netns: Netns,
}

fn topology(tag: &str) -> Topo {
    topology_with(tag, true)
}

/// `offloads_off`: what the agent does to a sandbox veth (tx checksum, TSO, GSO off).
fn topology_with(tag: &str, offloads_off: bool) -> Topo {
    let id = format!("{}{tag}", std::process::id() % 100_000);
    let (node, sb, px) = (format!("snn{id}"), format!("sns{id}"), format!("snp{id}"));
    let netns = Netns {
        names: vec![node.clone(), sb.clone(), px.clone()],
    };
    for n in [&node, &sb, &px] {
        ip(&["netns", "add", n]);
    }
    let (h, s, u, p) = (
        format!("h{id}"),
        format!("s{id}"),
        format!("u{id}"),
        format!("p{id}"),
    );
    ip(&[
        "-n", &node, "link", "add", &h, "type", "veth", "peer", "name", &s, "netns", &sb,
    ]);
    ip(&[
        "-n", &node, "link", "add", &u, "type", "veth", "peer", "name", &p, "netns", &px,
    ]);
    ip(&["-n", &node, "addr", "add", "10.88.0.1/24", "dev", &h]);
    ip(&["-n", &node, "addr", "add", "192.0.2.10/24", "dev", &u]);
    ip(&["-n", &sb, "addr", "add", "10.88.0.2/24", "dev", &s]);
    ip(&["-n", &px, "addr", "add", "192.0.2.20/24", "dev", &p]);
    ip(&["-n", &sb, "link", "set", &s, "mtu", "1444"]);
    for (ns, dev) in [(&node, &h), (&node, &u), (&sb, &s), (&px, &p)] {
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    ip(&["-n", &sb, "link", "set", "lo", "up"]);
    ip(&["-n", &sb, "route", "add", "default", "via", "10.88.0.1"]);
    ip(&[
        "-n",
        &node,
        "-6",
        "addr",
        "add",
        "fd53:4e41::1/64",
        "dev",
        &h,
        "nodad",
    ]);
    ip(&[
        "-n",
        &sb,
        "-6",
        "addr",
        "add",
        "fd53:4e41::2/64",
        "dev",
        &s,
        "nodad",
    ]);
    ip(&[
        "-n",
        &sb,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd53:4e41::1",
    ]);
    if offloads_off {
        sh_in(
            &sb,
            &["ethtool", "-K", &s, "tx", "off", "tso", "off", "gso", "off"],
        );
    }

    let (h_idx, h_mac) = link_info(&node, &h);
    let (u_idx, _) = link_info(&node, &u);
    let (_, s_mac) = link_info(&sb, &s);
    let s = s.clone();

    let node2 = node.clone();
    let tag = tag.to_string();
    let n = std::thread::spawn(move || {
        enter(&node2);
        let mut cfg = node_config(&format!("netns{tag}"));
        cfg.uplink_ifindex = u_idx;
        cfg.attach_uplink = true;
        cfg.uplink_mtu = 1500;
        let mut n = load(&cfg);
        n.netns = Some(node2.clone());
        let mut j = job();
        j.veth_ifindex = h_idx;
        j.sandbox_mac = s_mac;
        j.host_mac = h_mac;
        j.egress = Some(Bps::new(100_000_000).expect("a rate is not zero"));
        j.ipv6_rules = true;
        j.sandbox_ip6 = Some("fd53:4e41::2".parse().expect("addr"));
        n.t1().attach_job(&j).expect("attach job");
        n.t1()
            .set_proxies(&[ProxyEntry::active(Ipv4Addr::new(192, 0, 2, 20))])
            .expect("proxies");
        let net = "203.0.113.0/24".parse().expect("net");
        n.t1()
            .allow_cidr(
                JOB_KEY,
                net,
                &[PortRule::port(RuleProtocol::Udp, 7000)],
                false,
            )
            .expect("cidr");
        let net6 = "2001:db8::/32".parse().expect("net");
        n.t1()
            .allow_cidr6(
                JOB_KEY,
                net6,
                &[PortRule::port(RuleProtocol::Udp, 7000)],
                false,
            )
            .expect("cidr6");
        n
    })
    .join()
    .expect("node thread");
    Topo {
        n,
        node,
        sb,
        px,
        sb_dev: s,
        sb_mac: s_mac,
        host_mac: h_mac,
        _netns: netns,
    }
}

#[test]
fn sandbox_traffic_reaches_the_proxy_encapsulated_and_replies_come_back() {
    require_root("netns end-to-end");
    let t = topology("a");

    // Proxy side: a UDP socket on 6081.
    let px2 = t.px.clone();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let proxy = std::thread::spawn(move || {
        enter(&px2);
        let sock = UdpSocket::bind("0.0.0.0:6081").expect("bind 6081");
        bound_tx.send(()).expect("signal");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        let (len, from) = sock
            .recv_from(&mut buf)
            .expect("GENEVE datagram at the proxy");
        (buf[..len].to_vec(), from, sock)
    });

    // Sandbox: send one datagram, then wait for the reply.
    bound_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("proxy bound");
    let sb2 = t.sb.clone();
    let sandbox = std::thread::spawn(move || {
        enter(&sb2);
        let sock = UdpSocket::bind("10.88.0.2:40000").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        sock.send_to(b"hello proxy", "203.0.113.7:7000")
            .expect("send");
        let mut buf = [0u8; 2048];
        let got = sock
            .recv_from(&mut buf)
            .map(|(len, from)| (buf[..len].to_vec(), from));
        got.expect("reply at the sandbox")
    });

    let (dgram, from, psock) = proxy.join().expect("proxy thread");
    assert_eq!(from.ip().to_string(), "192.0.2.10");
    assert!(
        from.port() >= 0xC000,
        "outer source port from the flow hash"
    );
    let inner_len = dgram.len() - 28;
    let outer = expected_outer(
        NODE_IP,
        Ipv4Addr::new(192, 0, 2, 20),
        u32::from(from.port()),
        inner_len,
        JOB_KEY,
    );
    assert_eq!(
        &dgram[..28],
        &outer[28..],
        "GENEVE header and option as the contract says"
    );
    let inner = &dgram[28..];
    assert_eq!(&inner[12..20], &[10, 88, 0, 2, 203, 0, 113, 7]);
    assert!(
        ipv4_header_ok(inner) && l4_ok(inner),
        "inner checksums finished"
    );
    assert_eq!(&inner[28..], b"hello proxy");

    // The proxy answers through the overlay.
    let reply = Pkt {
        src: Ipv4Addr::new(203, 0, 113, 7),
        dst: SANDBOX_IP,
        sport: 7000,
        dport: 40000,
        ..Pkt::udp(SANDBOX_IP, 40000, b"hello sandbox")
    }
    .ip();
    let mut out = outer[28..].to_vec();
    out.extend_from_slice(&reply);
    psock
        .send_to(&out, SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 6081))
        .expect("send reply");

    let (payload, rfrom) = sandbox.join().expect("sandbox thread");
    assert_eq!(payload, b"hello sandbox");
    assert_eq!(rfrom.to_string(), "203.0.113.7:7000");

    let c = t.n.t1().counters(JOB_KEY).expect("counters");
    assert!(c.from_sandbox.forwarded.packets >= 1);
    assert_eq!(c.to_sandbox.forwarded.packets, 1);

    let dir = t.n.dir.clone();
    drop(t);
    assert!(!dir.exists(), "teardown removed the pins");
}

#[test]
fn denied_connect_fails_at_once_and_captured_dns_is_answered_by_the_stub() {
    require_root("netns RST and DNS");
    let t = topology("b");

    // The job's DNS stub on the gateway, port 5353 (JobConfig::dns_port of the test job).
    let node2 = t.node.clone();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let stub = std::thread::spawn(move || {
        enter(&node2);
        let sock = UdpSocket::bind("10.88.0.1:5353").expect("bind stub");
        bound_tx.send(()).expect("signal");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        let (len, from) = sock.recv_from(&mut buf).expect("query at the stub");
        let mut answer = buf[..len].to_vec();
        answer[2] |= 0x80; // QR
        sock.send_to(&answer, from).expect("answer");
        from
    });

    let sb2 = t.sb.clone();
    let (connect, answer) = std::thread::spawn(move || {
        enter(&sb2);
        let started = std::time::Instant::now();
        let connect = TcpStream::connect_timeout(
            &"198.51.100.9:443".parse().expect("addr"),
            Duration::from_secs(3),
        )
        .map(|_| ())
        .map_err(|e| (e.kind(), started.elapsed()));
        bound_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("stub bound");
        // A connected socket accepts answers only from the resolver it asked.
        let sock = UdpSocket::bind("10.88.0.2:0").expect("bind");
        sock.connect("198.51.100.9:53").expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        sock.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00")
            .expect("query");
        let mut buf = [0u8; 512];
        let answer = sock.recv(&mut buf).map(|len| buf[..len].to_vec());
        (connect, answer)
    })
    .join()
    .expect("sandbox thread");

    let (kind, _elapsed) = connect.expect_err("denied destination");
    assert_eq!(
        kind,
        std::io::ErrorKind::ConnectionRefused,
        "RST from tier 1, not a timeout"
    );
    let answer = answer.expect("answer from the resolver address");
    assert_eq!(&answer[..4], b"\x12\x34\x81\x00");
    let from = stub.join().expect("stub thread");
    assert_eq!(from.ip().to_string(), "10.88.0.2");

    let c = t.n.t1().counters(JOB_KEY).expect("counters");
    assert!(
        c.from_sandbox
            .dropped(snas_wire::Reason::DestinationDenied)
            .packets
            >= 1
    );
}

#[test]
fn udp_gso_packets_cannot_be_encapsulated_and_are_counted() {
    require_root("netns UDP GSO");
    // Offloads left on: the sandbox veth accepts UDP GSO, as a misconfigured node would.
    let t = topology_with("c", false);
    let sb2 = t.sb.clone();
    std::thread::spawn(move || {
        enter(&sb2);
        let sock = UdpSocket::bind("10.88.0.2:0").expect("bind");
        let seg: libc::c_int = 1000;
        // SAFETY: valid socket fd, option value points to a live c_int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&seg as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "UDP_SEGMENT");
        sock.send_to(&[7u8; 3000], "203.0.113.7:7000")
            .expect("send");
    })
    .join()
    .expect("sandbox thread");
    // The veth may hand the frame over in a softirq: wait for the counter (bounded).
    let mut c = t.n.t1().counters(JOB_KEY).expect("counters");
    for _ in 0..200 {
        if c.from_sandbox
            .dropped(snas_wire::Reason::EncapFailed)
            .packets
            > 0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        c = t.n.t1().counters(JOB_KEY).expect("counters");
    }
    assert!(
        c.from_sandbox
            .dropped(snas_wire::Reason::EncapFailed)
            .packets
            >= 1,
        "{c:?}"
    );
}

#[test]
fn ipv6_sandbox_traffic_is_carried_over_the_ipv4_underlay_both_ways() {
    require_root("netns IPv6");
    let t = topology("d");
    let px2 = t.px.clone();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let proxy = std::thread::spawn(move || {
        enter(&px2);
        let sock = UdpSocket::bind("0.0.0.0:6081").expect("bind 6081");
        bound_tx.send(()).expect("signal");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        loop {
            let (len, from) = sock
                .recv_from(&mut buf)
                .expect("GENEVE datagram at the proxy");
            // Skip anything that is not our IPv6 datagram (e.g. IPv4 traffic of the sandbox).
            if len > 28 + 40 && buf[2..4] == [0x86, 0xdd] {
                return (buf[..len].to_vec(), from, sock);
            }
        }
    });
    bound_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("proxy bound");
    let sb2 = t.sb.clone();
    let sandbox = std::thread::spawn(move || {
        enter(&sb2);
        let sock = UdpSocket::bind("[fd53:4e41::2]:40000").expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        sock.send_to(b"hello v6", "[2001:db8::7]:7000")
            .expect("send");
        let mut buf = [0u8; 2048];
        let got = sock
            .recv_from(&mut buf)
            .map(|(len, from)| (buf[..len].to_vec(), from));
        got.expect("reply at the sandbox")
    });

    let (dgram, _from, psock) = proxy.join().expect("proxy thread");
    assert_eq!(&dgram[..8], &[0x05, 0x40, 0x86, 0xdd, 0, 0, 0, 0]);
    let inner = &dgram[28..];
    assert_eq!(inner[0] >> 4, 6);
    let src: std::net::Ipv6Addr = <[u8; 16]>::try_from(&inner[8..24]).expect("16").into();
    let dst: std::net::Ipv6Addr = <[u8; 16]>::try_from(&inner[24..40]).expect("16").into();
    assert_eq!(
        (src.to_string(), dst.to_string()),
        ("fd53:4e41::2".into(), "2001:db8::7".into())
    );
    assert_eq!(&inner[48..], b"hello v6");

    // Reply: the same header around an IPv6 UDP datagram 2001:db8::7:7000 -> sandbox:40000.
    let payload = b"hello sandbox v6";
    let mut udp = Vec::new();
    udp.extend_from_slice(&7000u16.to_be_bytes());
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut sum = 0u32;
    for a in [dst.octets(), src.octets()] {
        for w in a.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
    }
    sum += udp.len() as u32 + 17;
    let c = csum(&udp, sum);
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut reply = dgram[..28].to_vec();
    reply.extend_from_slice(&[0x60, 0, 0, 0]);
    reply.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[17, 64]);
    reply.extend_from_slice(&dst.octets());
    reply.extend_from_slice(&src.octets());
    reply.extend_from_slice(&udp);
    psock
        .send_to(
            &reply,
            SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 10), 6081),
        )
        .expect("send reply");
    let (got, rfrom) = sandbox.join().expect("sandbox thread");
    assert_eq!(got, payload);
    assert_eq!(rfrom.to_string(), "[2001:db8::7]:7000");
}

/// Waits (bounded) until the job's drop counter of `reason` from the sandbox reaches `want`.
fn wait_drops(t: &Topo, reason: snas_wire::Reason, want: u64) -> u64 {
    let mut got = 0;
    for _ in 0..200 {
        got =
            t.n.t1()
                .counters(JOB_KEY)
                .expect("counters")
                .from_sandbox
                .dropped(reason)
                .packets;
        if got >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    got
}

/// Sends raw Ethernet frames out of `dev` (AF_PACKET), from the calling thread's namespace.
fn send_raw(dev: &str, frames: &[Vec<u8>]) {
    let ifindex = {
        let name = std::ffi::CString::new(dev).expect("name");
        // SAFETY: name is a valid C string.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    };
    assert_ne!(ifindex, 0, "device {dev}");
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set next.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    for f in frames {
        addr.sll_addr[..6].copy_from_slice(&f[..6]);
        // SAFETY: f is a live buffer of f.len() bytes; addr is a valid sockaddr_ll of its size.
        let rc = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            rc,
            f.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn a_vlan_tagged_frame_from_the_sandbox_is_not_ip_and_never_reaches_the_proxy() {
    require_root("netns VLAN");
    let t = topology("v");
    let px2 = t.px.clone();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let proxy = std::thread::spawn(move || {
        enter(&px2);
        let sock = UdpSocket::bind("0.0.0.0:6081").expect("bind 6081");
        bound_tx.send(()).expect("signal");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut seen = Vec::new();
        let mut buf = [0u8; 2048];
        // Until the untagged twin (sent after the tagged frames) arrives.
        loop {
            let (len, _) = sock
                .recv_from(&mut buf)
                .expect("the untagged frame arrives");
            let payload = buf[28 + 28..len].to_vec();
            let done = payload == b"untagged";
            seen.push(payload);
            if done {
                return seen;
            }
        }
    });
    bound_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("proxy bound");

    let datagram = |payload: &[u8]| Pkt {
        src_mac: t.sb_mac,
        dst_mac: t.host_mac,
        sport: 40001,
        ..Pkt::udp(Ipv4Addr::new(203, 0, 113, 7), 7000, payload)
    };
    let tag = |frame: Vec<u8>, tpid: u16| {
        let mut f = frame[..12].to_vec();
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&5u16.to_be_bytes()); // VLAN 5
        f.extend_from_slice(&frame[12..]);
        f
    };
    let tagged = vec![
        tag(datagram(b"tagged 802.1Q").frame(), 0x8100),
        tag(datagram(b"tagged 802.1ad").frame(), 0x88a8),
        // QinQ: an 802.1ad tag around an 802.1Q tag.
        tag(tag(datagram(b"tagged QinQ").frame(), 0x8100), 0x88a8),
    ];
    let untagged = datagram(b"untagged").frame();
    let (sb, dev) = (t.sb.clone(), t.sb_dev.clone());
    std::thread::spawn(move || {
        enter(&sb);
        send_raw(&dev, &tagged);
        send_raw(&dev, &[untagged]);
    })
    .join()
    .expect("sandbox thread");

    let seen = proxy.join().expect("proxy thread");
    assert_eq!(
        seen,
        vec![b"untagged".to_vec()],
        "only the untagged frame arrives"
    );
    assert_eq!(wait_drops(&t, snas_wire::Reason::NotIp, 3), 3);
}

#[test]
fn a_connected_udp_socket_learns_of_a_refusal_at_once() {
    require_root("netns ICMP");
    let t = topology("i");
    let sb2 = t.sb.clone();
    let results = std::thread::spawn(move || {
        enter(&sb2);
        // 203.0.113.7 allows UDP 7000 only: 7001 is port_denied. 198.51.100.9 is not allowed.
        ["203.0.113.7:7001", "198.51.100.9:7000"].map(|to| {
            let sock = UdpSocket::bind("10.88.0.2:0").expect("bind");
            sock.connect(to).expect("connect");
            sock.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let started = std::time::Instant::now();
            sock.send(b"hello").expect("send");
            let mut buf = [0u8; 64];
            let err = sock.recv(&mut buf).expect_err("no answer but an error");
            (err.raw_os_error(), started.elapsed())
        })
    })
    .join()
    .expect("sandbox thread");
    let [(port, port_took), (dest, dest_took)] = results;
    eprintln!("ECONNREFUSED after {port_took:?}, EHOSTUNREACH after {dest_took:?}");
    assert_eq!(port, Some(libc::ECONNREFUSED), "port unreachable");
    assert_eq!(
        dest,
        Some(libc::EHOSTUNREACH),
        "administratively prohibited"
    );
    assert_eq!(wait_drops(&t, snas_wire::Reason::PortDenied, 1), 1);
    assert_eq!(wait_drops(&t, snas_wire::Reason::DestinationDenied, 1), 1);
}
