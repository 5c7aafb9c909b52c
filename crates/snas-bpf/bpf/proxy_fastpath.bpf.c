// SPDX-License-Identifier: Apache-2.0
/* proxy_fastpath.bpf.c - the egress proxy's in-kernel fast path for established flows.
 *
 * Two TC ingress programs in the proxy's namespace (docs/proxy.md "Fast path"):
 *
 * - snas_fp_from_node, on the underlay interface: a GENEVE datagram to this proxy from a
 *   trusted node whose inner IPv4 TCP/UDP flow (job key from the option) has an entry, whose
 *   option names the entry's tenant and serial, that is not SYN/FIN/RST and whose job's and
 *   tenant's egress clocks are neither ahead nor bound (lib/fastpath.h, fp_clock_bind) and
 *   with nothing of its job held by the userspace pacer: decapsulated (a GSO super-packet
 *   stays whole), source
 *   NATed to the entry's egress address and port, TTL decremented, counted, and redirected to
 *   the interface the FIB names for its destination.
 * - snas_fp_from_internet, on the interface the egress pool is routed in on: a packet to an
 *   egress address:port with an entry, not SYN/FIN/RST, ingress clocks not ahead, fitting the
 *   underlay: destination NATed back to the sandbox, TTL decremented, encapsulated in the
 *   job's GENEVE header (UDP-tunnel GSO for super-packets), counted, redirected to the node.
 *
 * Everything else returns TC_ACT_OK untouched and takes the userspace path, which is where
 * every decision is made: the programs never create, change or remove an entry. A packet of
 * a fast flow is charged to its clocks either way (a diverted one as the pacer will charge
 * it), so the clocks run as the pacer's do. A packet is
 * only modified once it is certain to leave fast (route, MTU and clocks checked first). */
#define SNAS_GENEVE_WIRE_ONLY
#include "lib/common.h"
#include "lib/geneve.h"
#include "lib/fastpath.h"

char LICENSE[] SEC("license") = "GPL";

#define ETH_LEN 14
#define IP_CSUM_OFF (ETH_LEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_LEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_LEN + offsetof(struct iphdr, daddr))
#define IP_TTL_OFF (ETH_LEN + offsetof(struct iphdr, ttl))
#define L4_START (ETH_LEN + sizeof(struct iphdr))
#define TCP_CSUM_OFF (L4_START + offsetof(struct tcphdr, check))
#define UDP_CSUM_OFF (L4_START + offsetof(struct udphdr, check))

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04

static __always_inline int divert(__u32 why)
{
	fp_stat(why, 1);
	return TC_ACT_OK;
}

/* The wire bytes of a packet whose IP packet is inner_len long: a super-packet pays for the
 * headers each of its segments repeats (what the userspace pacers charge, gso::wire_len). */
static __always_inline __u64 wire_bytes(struct __sk_buff *skb, __u32 inner_len, __u32 hdrs)
{
	__u32 segs = skb->gso_segs;

	if (skb->gso_size && segs > 1)
		return (__u64)inner_len + (__u64)(segs - 1) * hdrs;
	return inner_len;
}

/* The FIB's next hop for daddr (as if the packet had been received on skb's device), into
 * fib. 0 when the packet can be redirected, else the divert slot. */
static __always_inline int route(struct __sk_buff *skb, struct bpf_fib_lookup *fib, __u32 saddr,
				 __u32 daddr)
{
	long rc;

	if (cfg_fp_test_ifindex) {
		fib->ifindex = cfg_fp_test_ifindex;
		return 0;
	}
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = 2;	/* AF_INET */
	fib->l4_protocol = IPPROTO_UDP;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = skb->ingress_ifindex;
	/* tot_len 0: the kernel checks the MTU against the skb (a GSO skb fits). */
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return FP_ST_DIVERT_ROUTE;	/* NO_NEIGH included: userspace's path resolves it */
	return 0;
}

static __always_inline int set_macs(struct __sk_buff *skb, const struct bpf_fib_lookup *fib)
{
	if (cfg_fp_test_ifindex)
		return 0;
	if (bpf_skb_store_bytes(skb, 0, fib->dmac, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, fib->smac, ETH_ALEN, 0))
		return -1;
	return 0;
}

static __always_inline int redirect(__u32 ifindex)
{
	__u32 slot = FP_ST_LAST_REDIRECT;
	__u64 *v = bpf_map_lookup_elem(&snas_fp_stats, &slot);

	if (v)
		*v = ifindex;
	return bpf_redirect(ifindex, 0);
}

/* Rewrites the address at addr_off and the port at port_off of an IPv4 TCP/UDP packet at
 * offset ETH_LEN, with its checksums. The L4 checksum may be CHECKSUM_PARTIAL (a job's veth
 * offloads it): bpf_l4_csum_replace then updates only the pseudo-header part, as it must. A
 * UDP checksum of 0 (none) stays 0. */
static __always_inline int nat(struct __sk_buff *skb, __u8 proto, __u32 addr_off, __u32 from_addr,
			       __u32 to_addr, __u32 port_off, __u16 from_port, __u16 to_port,
			       int udp_has_csum)
{
	__u32 csum_off = proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF;
	__u64 pseudo = BPF_F_PSEUDO_HDR | sizeof(__u32);
	int l4 = proto == IPPROTO_TCP || udp_has_csum;

	if (proto == IPPROTO_UDP && l4)
		pseudo |= BPF_F_MARK_MANGLED_0;
	if (from_addr != to_addr) {
		if (l4 && bpf_l4_csum_replace(skb, csum_off, from_addr, to_addr, pseudo))
			return -1;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, from_addr, to_addr, sizeof(__u32)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &to_addr, sizeof(to_addr), 0))
			return -1;
	}
	if (from_port != to_port) {
		__u64 f = sizeof(__u16);

		if (proto == IPPROTO_UDP)
			f |= BPF_F_MARK_MANGLED_0;
		if (l4 && bpf_l4_csum_replace(skb, csum_off, from_port, to_port, f))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &to_port, sizeof(to_port), 0))
			return -1;
	}
	return 0;
}

/* TTL - 1 with the header checksum (the userspace path's kernel forwarding does the same). */
static __always_inline int dec_ttl(struct __sk_buff *skb, __u8 ttl, __u8 proto)
{
	__u16 old = bpf_htons(((__u16)ttl << 8) | proto);
	__u16 new = bpf_htons(((__u16)(ttl - 1) << 8) | proto);

	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old, new, sizeof(__u16)))
		return -1;
	ttl -= 1;
	return bpf_skb_store_bytes(skb, IP_TTL_OFF, &ttl, 1, 0) ? -1 : 0;
}

static __always_inline int clocks_ok(__u64 job, __u32 tenant, __u8 dir, __u64 now,
				     struct fp_clock **jc, struct fp_clock **tc)
{
	struct fp_clock_key k = {};
	__u64 *held, hold = 0;

	k.id = job;
	k.kind = FP_CLOCK_JOB;
	k.dir = dir;
	*jc = bpf_map_lookup_elem(&snas_fp_clocks, &k);
	held = bpf_map_lookup_elem(&snas_fp_holds, &k);
	if (held)
		hold = FP_READ_ONCE(*held);
	k.id = tenant;
	k.kind = FP_CLOCK_TENANT;
	*tc = bpf_map_lookup_elem(&snas_fp_clocks, &k);
	return fp_clock_ok(*jc, hold, now) && fp_clock_ok(*tc, 0, now);
}

/* A packet the clocks send to the userspace pacer: they bind (or stay bound), the job's
 * hand-off hold starts, and both are charged for it as the pacer will charge its own. */
static __always_inline int divert_paced(struct fp_clock *jc, struct fp_clock *tc, __u64 wire,
					__u64 now)
{
	fp_clock_bind(jc, now);
	fp_clock_bind(tc, now);
	fp_clock_hold(jc, now);
	fp_clock_charge(jc, wire, now, 1);
	fp_clock_charge(tc, wire, now, 1);
	return divert(FP_ST_DIVERT_PACED);
}

SEC("tc")
int snas_fp_from_node(struct __sk_buff *skb)
{
	const __u32 need = ETH_LEN + GENEVE_OVERHEAD + sizeof(struct iphdr) + sizeof(struct tcphdr);
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *ip, *inner;
	struct udphdr *uh;
	struct geneve_opt_hdr *g;
	struct fp_fwd_key k = {};
	struct fp_flow *f;
	struct fp_clock *jc, *tc;
	struct bpf_fib_lookup fib;
	__u16 *ports;
	__u8 flags = 0, ttl, proto;
	__u32 inner_len, hdrs, tenant, serial, saddr;
	__u16 sport;
	__u64 now, wire;
	int why, udp_csum = 1;

	if (skb->len < need)
		return TC_ACT_OK;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + need > data_end) {
		if (bpf_skb_pull_data(skb, need))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + need > data_end)
			return TC_ACT_OK;
	}
	eth = data;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = data + ETH_LEN;
	if (ip->version != 4 || ip->ihl != 5 || ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & bpf_htons(0x3fff)) || ip->daddr != cfg_fp_proxy_ip)
		return TC_ACT_OK;
	uh = (void *)(ip + 1);
	if (uh->dest != bpf_htons(cfg_geneve_port))
		return TC_ACT_OK;
	/* From here on it is overlay traffic: anything not taken is a divert. */
	if (!bpf_map_lookup_elem(&snas_fp_nodes, &ip->saddr))
		return divert(FP_ST_DIVERT_OTHER);	/* userspace counts untrusted_source */
	g = (void *)(uh + 1);
	if (g->ver_optlen != 5 || (g->flags & 0xc0) != 0x40 || g->proto != bpf_htons(ETH_P_IP) ||
	    g->opt_class != bpf_htons(GENEVE_OPT_CLASS) || g->opt_type != GENEVE_OPT_TYPE ||
	    (g->opt_len & 0x1f) != 4 || g->vni[0] || g->vni[1] || g->vni[2])
		return divert(FP_ST_DIVERT_OTHER);	/* IPv6 inner, or userspace drops it */
	inner = (void *)(g + 1);
	if (inner->version != 4 || inner->ihl != 5 || (inner->frag_off & bpf_htons(0x3fff)))
		return divert(FP_ST_DIVERT_OTHER);
	proto = inner->protocol;
	ports = (void *)(inner + 1);
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(inner + 1);

		flags = ((__u8 *)th)[13];
		if (flags & (TCP_SYN | TCP_FIN | TCP_RST))
			return divert(FP_ST_DIVERT_FLAGS);
		hdrs = sizeof(struct iphdr) + th->doff * 4;
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *iu = (void *)(inner + 1);

		udp_csum = iu->check != 0;
		hdrs = sizeof(struct iphdr) + sizeof(struct udphdr);
	} else {
		return divert(FP_ST_DIVERT_OTHER);
	}

	k.job_key = ((__u64)bpf_ntohl(g->job_hi) << 32) | bpf_ntohl(g->job_lo);
	k.saddr = inner->saddr;
	k.daddr = inner->daddr;
	k.sport = ports[0];
	k.dport = ports[1];
	k.proto = proto;
	tenant = bpf_ntohl(g->tenant);
	serial = bpf_ntohl(g->serial);
	ttl = inner->ttl;
	saddr = inner->saddr;
	sport = ports[0];
	inner_len = skb->len - ETH_LEN - GENEVE_OVERHEAD;

	f = bpf_map_lookup_elem(&snas_fp_fwd, &k);
	if (!f)
		return divert(FP_ST_DIVERT_NO_ENTRY);
	if (f->tenant_id != tenant || f->serial != serial)
		return divert(FP_ST_DIVERT_SERIAL);
	now = bpf_ktime_get_ns();
	if (now >= f->expires_ns)
		return divert(FP_ST_DIVERT_OTHER);	/* userspace refuses it (policy_expired) */
	if (ttl <= 1)
		return divert(FP_ST_DIVERT_ROUTE);
	wire = wire_bytes(skb, inner_len, hdrs);
	if (!clocks_ok(k.job_key, tenant, FP_DIR_EGRESS, now, &jc, &tc))
		return divert_paced(jc, tc, wire, now);
	/* The clocks let it go: charged now, whether it leaves here or (no route yet) through
	 * the pacer, which finds its clocks no further ahead. */
	fp_clock_charge(jc, wire, now, 0);
	fp_clock_charge(tc, wire, now, 0);
	why = route(skb, &fib, f->egress_addr, k.daddr);
	if (why)
		return divert(why);

	/* Decided: from here on the packet leaves fast or is dropped. */
	fp_count(&f->counts, wire, now);

	/* The super-packet keeps its segment size: it is the inner MSS, which the 56 bytes
	 * stripped do not change. */
	if (bpf_skb_adjust_room(skb, -GENEVE_OVERHEAD, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		goto failed;
	if (nat(skb, proto, IP_SRC_OFF, saddr, f->egress_addr, L4_START, sport, f->egress_port,
		udp_csum))
		goto failed;
	if (dec_ttl(skb, ttl, proto) || set_macs(skb, &fib))
		goto failed;
	fp_stat(FP_ST_FAST_FROM_NODE_PKTS, 1);
	fp_stat(FP_ST_FAST_FROM_NODE_BYTES, wire);
	return redirect(fib.ifindex);
failed:
	fp_stat(FP_ST_FAILED, 1);
	return TC_ACT_SHOT;
}

SEC("tc")
int snas_fp_from_internet(struct __sk_buff *skb)
{
	const __u32 need = ETH_LEN + sizeof(struct iphdr) + sizeof(struct tcphdr);
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	struct fp_rev_key k = {};
	struct fp_flow *f;
	struct fp_clock *jc, *tc;
	struct bpf_fib_lookup fib;
	struct geneve_outer o = {};
	__u16 *ports;
	__u8 ttl, proto, flags;
	__u32 inner_len, hdrs, daddr, seg;
	__u16 dport;
	__u64 now, wire;
	int why, udp_csum = 1;

	if (skb->len < need)
		return TC_ACT_OK;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + need > data_end) {
		if (bpf_skb_pull_data(skb, need))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + need > data_end)
			return TC_ACT_OK;
	}
	eth = data;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = data + ETH_LEN;
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;
	proto = ip->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return TC_ACT_OK;
	ports = (void *)(ip + 1);
	k.remote_addr = ip->saddr;
	k.egress_addr = ip->daddr;
	k.remote_port = ports[0];
	k.egress_port = ports[1];
	k.proto = proto;
	f = bpf_map_lookup_elem(&snas_fp_rev, &k);
	if (!f)
		return divert(FP_ST_DIVERT_NO_ENTRY);
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)(ip + 1);

		flags = ((__u8 *)th)[13];
		if (flags & (TCP_SYN | TCP_FIN | TCP_RST))
			return divert(FP_ST_DIVERT_FLAGS);
		hdrs = sizeof(struct iphdr) + th->doff * 4;
	} else {
		struct udphdr *uh = (void *)(ip + 1);

		udp_csum = uh->check != 0;
		hdrs = sizeof(struct iphdr) + sizeof(struct udphdr);
	}
	ttl = ip->ttl;
	daddr = ip->daddr;
	dport = ports[1];
	inner_len = skb->len - ETH_LEN;
	now = bpf_ktime_get_ns();
	if (now >= f->expires_ns)
		return divert(FP_ST_DIVERT_OTHER);
	if (ttl <= 1)
		return divert(FP_ST_DIVERT_ROUTE);
	/* Every packet (every segment of a super-packet) must fit the underlay once wrapped. */
	seg = skb->gso_size ? skb->gso_size + hdrs : inner_len;
	if (seg + GENEVE_OVERHEAD > cfg_fp_underlay_mtu || inner_len + GENEVE_OVERHEAD > 0xffff)
		return divert(FP_ST_DIVERT_ROUTE);
	wire = wire_bytes(skb, inner_len, hdrs);
	if (!clocks_ok(f->job_key, f->tenant_id, FP_DIR_INGRESS, now, &jc, &tc))
		return divert_paced(jc, tc, wire, now);
	fp_clock_charge(jc, wire, now, 0);
	fp_clock_charge(tc, wire, now, 0);
	why = route(skb, &fib, cfg_fp_proxy_ip, f->node_addr);
	if (why)
		return divert(why);

	fp_count(&f->counts, wire, now);

	if (nat(skb, proto, IP_DST_OFF, daddr, f->sandbox_addr, L4_START + sizeof(__u16), dport,
		f->sandbox_port, udp_csum))
		goto failed;
	if (dec_ttl(skb, ttl, proto))
		goto failed;

	o.ip.version = 4;
	o.ip.ihl = 5;
	o.ip.tot_len = bpf_htons(inner_len + GENEVE_OVERHEAD);
	o.ip.frag_off = bpf_htons(0x4000);
	o.ip.ttl = 64;
	o.ip.protocol = IPPROTO_UDP;
	o.ip.saddr = cfg_fp_proxy_ip;
	o.ip.daddr = f->node_addr;
	o.ip.check = ipv4_csum(&o.ip);
	/* As the proxy's GENEVE sockets send: from the GENEVE port (docs/overlay.md). */
	o.udp.source = bpf_htons(cfg_geneve_port);
	o.udp.dest = bpf_htons(cfg_geneve_port);
	o.udp.len = bpf_htons(inner_len + GENEVE_OVERHEAD - sizeof(struct iphdr));
	o.gnv.ver_optlen = 5;
	o.gnv.flags = 0x40;
	o.gnv.proto = bpf_htons(ETH_P_IP);
	o.gnv.opt_class = bpf_htons(GENEVE_OPT_CLASS);
	o.gnv.opt_type = GENEVE_OPT_TYPE;
	o.gnv.opt_len = 4;
	o.gnv.tenant = bpf_htonl(f->tenant_id);
	o.gnv.job_hi = bpf_htonl(f->job_key >> 32);
	o.gnv.job_lo = bpf_htonl((__u32)f->job_key);
	o.gnv.serial = bpf_htonl(f->serial);
	/* UDP-tunnel GSO for a super-packet, its segment size kept (the inner MSS already fits
	 * the underlay, checked above). */
	if (bpf_skb_adjust_room(skb, GENEVE_OVERHEAD, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
				BPF_F_ADJ_ROOM_ENCAP_L2(GENEVE_HDR_LEN)))
		goto failed;
	if (bpf_skb_store_bytes(skb, ETH_LEN, &o, sizeof(o), 0))
		goto failed;
	if (set_macs(skb, &fib))
		goto failed;
	fp_stat(FP_ST_FAST_TO_NODE_PKTS, 1);
	fp_stat(FP_ST_FAST_TO_NODE_BYTES, wire);
	return redirect(fib.ifindex);
failed:
	fp_stat(FP_ST_FAILED, 1);
	return TC_ACT_SHOT;
}
