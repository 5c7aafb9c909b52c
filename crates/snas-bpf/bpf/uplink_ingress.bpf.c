// SPDX-License-Identifier: Apache-2.0
/* uplink_ingress.bpf.c - TC ingress on the node's underlay interface.
 *
 * GENEVE (UDP to cfg_geneve_port, IPv4 without options, not a fragment) addressed to this
 * node (cfg_node_ip) from an address in the proxy table is ours. It must carry exactly our
 * option naming a job attached on this node, and an inner packet addressed to that job's
 * sandbox (IPv6 only for jobs with IPv6 rules). Then the 56 overlay bytes are stripped, the
 * MACs set (sandbox MAC <- host veth MAC) and the frame goes into the job's netns with
 * bpf_redirect_peer. Violations are dropped and counted (direction 1). Everything else
 * (other traffic, GENEVE from other sources) passes untouched.
 *
 * A proxy may send a TCP super-packet whole (UDP-tunnel GSO, one skb for up to 64 KiB of the
 * stream): it is decapsulated whole with its segment size kept (BPF_F_ADJ_ROOM_FIXED_GSO: the
 * size is the inner MSS, which the 56 bytes stripped do not change) and reaches the sandbox
 * as one packet, as a GRO-merged one would.
 *
 * A delivered TCP or UDP packet (inner IPv4 without options, or IPv6 with the transport header
 * right behind the fixed header) is also the reply side of a flow: its entry in the flow table
 * (reversed tuple) records REPLIED, FIN in and RST in (conntrack.h), so that connections that
 * end cleanly give their slot back.
 *
 * An ICMP or ICMPv6 error (IPv4: destination unreachable, source quench, redirect, time
 * exceeded, parameter problem; ICMPv6: destination unreachable, packet too big, time exceeded,
 * parameter problem) reaches the sandbox only when the packet it quotes is one of the job's
 * own flows: quoted source = the sandbox's address, and the quoted tuple (ports of a quoted
 * TCP/UDP header, else 0, as the flow table keys them) in the flow table. The proxy checks the
 * same before translating an error from the internet; this check keeps a hostile sender on the
 * proxies' side, or a corrupt proxy, from feeding a job errors about connections it does not
 * have (tearing down or shrinking the path MTU of others' connections, or probing the job's
 * stack). Others are dropped as no_conntrack. The outer source of an error is not checked: a
 * router on the path answers from its own address. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/geneve.h"
#include "lib/edt.h"
#include "lib/conntrack.h"

#ifndef IPPROTO_ICMP
#define IPPROTO_ICMP 1
#endif

char LICENSE[] SEC("license") = "GPL";

/* BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (Linux 6.3); the build host's uapi headers may predate it. */
#define SNAS_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

static __always_inline int drop_in(__u64 job_key, __u32 reason, __u32 len)
{
	count(job_key, 1, reason, len);
	return TC_ACT_SHOT;
}

/* ICMP error types (RFC 792/1122): unreachable, source quench, redirect, time exceeded,
 * parameter problem. ICMPv6 errors are types 1-4 (RFC 4443: below 128). */
static __always_inline int icmp4_is_error(__u8 type)
{
	return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
}

/* IPv6 extension headers (parse.h refuses the same list on the way out). */
static __always_inline int ipv6_ext_header(__u8 nh)
{
	switch (nh) {
	case 0: case 43: case 44: case 50: case 51: case 60: case 135: case 139: case 140:
	case 253: case 254:
		return 1;
	default:
		return 0;
	}
}

/* Offsets in the frame: the inner packet starts behind Ethernet + outer IPv4 + UDP + GENEVE. */
#define INNER_OFF (L4_OFF + (int)sizeof(struct udphdr) + GENEVE_HDR_LEN)
#define QUOTE4_OFF (INNER_OFF + (int)sizeof(struct iphdr) + 8)
#define QUOTE6_OFF (INNER_OFF + (int)sizeof(struct ipv6hdr) + 8)

/* An inner IPv4 ICMP error for the job on `ifindex`: 0 when it quotes a flow of the job, else
 * the drop reason. */
static __always_inline int icmp4_quotes_a_flow(struct __sk_buff *skb, const struct job_cfg *cfg,
					       __u32 ifindex)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *q = data + QUOTE4_OFF;
	struct flow_key k = {};
	__u16 *ports;

	if ((void *)(q + 1) > data_end || q->version != 4)
		return SNAS_DROP_MALFORMED;
	/* The job's packets carry no options and are not fragments (sandbox_ingress refuses
	 * both), so no quote of theirs does. */
	if (q->ihl != 5 || (q->frag_off & bpf_htons(0x1fff)) || q->saddr != cfg->sandbox_ip)
		return SNAS_DROP_NO_CONNTRACK;
	k.ifindex = ifindex;
	k.saddr = q->saddr;
	k.daddr = q->daddr;
	k.proto = q->protocol;
	if (q->protocol == IPPROTO_TCP || q->protocol == IPPROTO_UDP) {
		ports = (void *)(q + 1);
		if ((void *)(ports + 2) > data_end)
			return SNAS_DROP_MALFORMED;
		k.sport = bpf_ntohs(ports[0]);
		k.dport = bpf_ntohs(ports[1]);
	}
	return bpf_map_lookup_elem(&snas_flows, &k) ? 0 : SNAS_DROP_NO_CONNTRACK;
}

/* icmp4_quotes_a_flow for an inner ICMPv6 error. */
static __always_inline int icmp6_quotes_a_flow(struct __sk_buff *skb, const struct job_cfg *cfg,
					       __u32 ifindex)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *q = data + QUOTE6_OFF;
	struct flow6_key k = {};
	__u16 *ports;

	if ((void *)(q + 1) > data_end || q->version != 6)
		return SNAS_DROP_MALFORMED;
	if (__builtin_memcmp(&q->saddr, cfg->sandbox_ip6, 16))
		return SNAS_DROP_NO_CONNTRACK;
	k.ifindex = ifindex;
	__builtin_memcpy(k.saddr, &q->saddr, 16);
	__builtin_memcpy(k.daddr, &q->daddr, 16);
	k.proto = q->nexthdr;
	if (q->nexthdr == IPPROTO_TCP || q->nexthdr == IPPROTO_UDP) {
		ports = (void *)(q + 1);
		if ((void *)(ports + 2) > data_end)
			return SNAS_DROP_MALFORMED;
		k.sport = bpf_ntohs(ports[0]);
		k.dport = bpf_ntohs(ports[1]);
	}
	return bpf_map_lookup_elem(&snas_flows6, &k) ? 0 : SNAS_DROP_NO_CONNTRACK;
}

SEC("tc")
int snas_uplink_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 len = skb->len;
	struct ethhdr *eth = data;
	struct iphdr *ip, *inner;
	struct udphdr *uh;
	struct geneve_opt_hdr *g;
	struct job_cfg *cfg;
	struct job_state *st;
	__u32 *ifp, ifindex;
	int reason;
	__u64 job, decap_flags = 0, now;
	struct ethhdr eth_out;
	struct flow_key rk = {};
	struct flow6_key rk6 = {};
	__u8 l4_proto = 0, tcp_flags = 0;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = data + L3_OFF;
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl != 5 ||
	    ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(0x3fff)) ||
	    ip->daddr != cfg_node_ip)
		return TC_ACT_OK;
	uh = data + L4_OFF;
	if ((void *)(uh + 1) > data_end || uh->dest != bpf_htons(cfg_geneve_port))
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&snas_proxy_by_ip, &ip->saddr))
		return TC_ACT_OK;

	g = (void *)(uh + 1);
	if ((void *)(g + 1) > data_end)
		return drop_in(0, SNAS_DROP_GENEVE_MALFORMED, len);
	if ((g->ver_optlen >> 6) != 0 ||
	    (g->proto != bpf_htons(ETH_P_IP) && g->proto != bpf_htons(ETH_P_IPV6)))
		return drop_in(0, SNAS_DROP_GENEVE_MALFORMED, len);
	if ((g->ver_optlen & 0x3f) != 5 || !(g->flags & 0x40) ||
	    g->opt_class != bpf_htons(GENEVE_OPT_CLASS) || g->opt_type != GENEVE_OPT_TYPE ||
	    (g->opt_len & 0x1f) != 4)
		return drop_in(0, SNAS_DROP_GENEVE_OPTION, len);

	job = ((__u64)bpf_ntohl(g->job_hi) << 32) | bpf_ntohl(g->job_lo);
	ifp = bpf_map_lookup_elem(&snas_job_by_key, &job);
	if (!ifp)
		return drop_in(0, SNAS_DROP_GENEVE_UNKNOWN_JOB, len);
	ifindex = *ifp;
	cfg = bpf_map_lookup_elem(&snas_jobs, &ifindex);
	if (!cfg || cfg->job_key != job || cfg->tenant_id != bpf_ntohl(g->tenant))
		return drop_in(0, SNAS_DROP_GENEVE_UNKNOWN_JOB, len);

	if (g->proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *inner6 = (void *)(g + 1);

		if (!(cfg->flags & JOB_F_IPV6_RULES))
			return drop_in(job, SNAS_DROP_IPV6_DENIED, len);
		if ((void *)(inner6 + 1) > data_end || inner6->version != 6)
			return drop_in(job, SNAS_DROP_MALFORMED, len);
		if (__builtin_memcmp(&inner6->daddr, cfg->sandbox_ip6, 16))
			return drop_in(job, SNAS_DROP_DESTINATION_DENIED, len);
		eth_out.h_proto = bpf_htons(ETH_P_IPV6);
		decap_flags = SNAS_ADJ_ROOM_DECAP_L3_IPV6;
		if (inner6->nexthdr == IPPROTO_TCP || inner6->nexthdr == IPPROTO_UDP) {
			__u16 *ports = (void *)(inner6 + 1);

			if ((void *)(ports + 2) <= data_end) {
				l4_proto = inner6->nexthdr;
				rk6.ifindex = ifindex;
				__builtin_memcpy(rk6.saddr, &inner6->daddr, 16);
				__builtin_memcpy(rk6.daddr, &inner6->saddr, 16);
				rk6.sport = bpf_ntohs(ports[1]);
				rk6.dport = bpf_ntohs(ports[0]);
				rk6.proto = l4_proto;
			}
			if (l4_proto == IPPROTO_TCP && (void *)ports + 14 <= data_end)
				tcp_flags = ((__u8 *)ports)[13];
		} else if (ipv6_ext_header(inner6->nexthdr)) {
			/* The proxies send none; an ICMPv6 error could hide behind one. */
			return drop_in(job,
				       inner6->nexthdr == 44 ? SNAS_DROP_FRAGMENT : SNAS_DROP_IP_OPTIONS,
				       len);
		} else if (inner6->nexthdr == IPPROTO_ICMPV6) {
			__u8 *icmp = (void *)(inner6 + 1);

			if ((void *)(icmp + 1) > data_end)
				return drop_in(job, SNAS_DROP_MALFORMED, len);
			if (icmp[0] < 128) {
				reason = icmp6_quotes_a_flow(skb, cfg, ifindex);
				if (reason)
					return drop_in(job, reason, len);
			}
		}
	} else {
		inner = (void *)(g + 1);
		if ((void *)(inner + 1) > data_end || inner->version != 4 || inner->ihl < 5)
			return drop_in(job, SNAS_DROP_MALFORMED, len);
		if (inner->daddr != cfg->sandbox_ip)
			return drop_in(job, SNAS_DROP_DESTINATION_DENIED, len);
		eth_out.h_proto = bpf_htons(ETH_P_IP);
		if (inner->ihl == 5 && !(inner->frag_off & bpf_htons(0x3fff)) &&
		    (inner->protocol == IPPROTO_TCP || inner->protocol == IPPROTO_UDP)) {
			__u16 *ports = (void *)(inner + 1);

			if ((void *)(ports + 2) <= data_end) {
				l4_proto = inner->protocol;
				rk.ifindex = ifindex;
				rk.saddr = inner->daddr;
				rk.daddr = inner->saddr;
				rk.sport = bpf_ntohs(ports[1]);
				rk.dport = bpf_ntohs(ports[0]);
				rk.proto = l4_proto;
			}
			if (l4_proto == IPPROTO_TCP && (void *)ports + 14 <= data_end)
				tcp_flags = ((__u8 *)ports)[13];
		} else if (inner->protocol == IPPROTO_ICMP) {
			__u8 *icmp = (void *)(inner + 1);

			/* No error could be checked behind options or in a fragment. */
			if (inner->ihl != 5)
				return drop_in(job, SNAS_DROP_IP_OPTIONS, len);
			if (inner->frag_off & bpf_htons(0x3fff))
				return drop_in(job, SNAS_DROP_FRAGMENT, len);

			if ((void *)(icmp + 1) > data_end)
				return drop_in(job, SNAS_DROP_MALFORMED, len);
			if (icmp4_is_error(icmp[0])) {
				reason = icmp4_quotes_a_flow(skb, cfg, ifindex);
				if (reason)
					return drop_in(job, reason, len);
			}
		}
	}

	/* Charged like the proxies' pacers: the inner IP packet. */
	st = bpf_map_lookup_elem(&snas_job_state, &ifindex);
	if (!st)
		return drop_in(job, SNAS_DROP_UNKNOWN_JOB, len);
	now = bpf_ktime_get_ns();
	reason = ingress_police(st, cfg, len - L3_OFF - GENEVE_OVERHEAD, now);
	if (reason)
		return drop_in(job, reason, len);
	if (l4_proto && decap_flags)
		flow_reply(&snas_flows6, &rk6, ifindex, l4_proto, tcp_flags, now);
	else if (l4_proto)
		flow_reply(&snas_flows, &rk, ifindex, l4_proto, tcp_flags, now);

	__builtin_memcpy(eth_out.h_dest, cfg->sandbox_mac, ETH_ALEN);
	__builtin_memcpy(eth_out.h_source, cfg->host_mac, ETH_ALEN);
	if (bpf_skb_adjust_room(skb, -GENEVE_OVERHEAD, BPF_ADJ_ROOM_MAC,
				decap_flags | BPF_F_ADJ_ROOM_FIXED_GSO))
		return drop_in(job, SNAS_DROP_ENCAP_FAILED, len);
	if (bpf_skb_store_bytes(skb, 0, &eth_out, sizeof(eth_out), 0))
		return drop_in(job, SNAS_DROP_ENCAP_FAILED, len);

	count(job, 1, 0, len - GENEVE_OVERHEAD);
	debug_redirect(ifindex, 3, 0, 0);
	return bpf_redirect_peer(ifindex, 0);
}
