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
 * end cleanly give their slot back. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/geneve.h"
#include "lib/edt.h"
#include "lib/conntrack.h"

char LICENSE[] SEC("license") = "GPL";

/* BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (Linux 6.3); the build host's uapi headers may predate it. */
#define SNAS_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)

static __always_inline int drop_in(__u64 job_key, __u32 reason, __u32 len)
{
	count(job_key, 1, reason, len);
	return TC_ACT_SHOT;
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
