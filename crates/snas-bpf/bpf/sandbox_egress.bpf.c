// SPDX-License-Identifier: Apache-2.0
/* sandbox_egress.bpf.c - TC egress on the host side of a sandbox veth: frames the host
 * stack sends into the sandbox (DNS stub answers, ARP replies, RSTs built by
 * sandbox_ingress). Decapsulated proxy traffic does not pass here (bpf_redirect_peer goes
 * straight to the sandbox side).
 *
 * Job: undo the DNS capture. An answer from the job's stub (gateway_ip:dns_port) to a port
 * that sandbox_ingress recorded in snas_dns_nat gets the resolver address and port the
 * sandbox originally asked, so resolvers that check the answer's source accept it.
 * Everything else passes untouched. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"

char LICENSE[] SEC("license") = "GPL";

SEC("tc")
int snas_sandbox_egress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct job_cfg *cfg = bpf_map_lookup_elem(&snas_jobs, &ifindex);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct dns_nat_key k = {};
	struct dns_nat_val *v;
	__u32 old_ip, new_ip;
	__u16 old_port, new_port;
	__u16 sport, dport;
	int csum_off;
	__u64 mangled;

	if (!cfg)
		return TC_ACT_OK;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = data + L3_OFF;
	if ((void *)(ip + 1) > data_end || ip->ihl != 5 || ip->saddr != cfg->gateway_ip ||
	    (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = data + L4_OFF;

		if ((void *)(uh + 1) > data_end)
			return TC_ACT_OK;
		sport = bpf_ntohs(uh->source);
		dport = bpf_ntohs(uh->dest);
		csum_off = L4_OFF + offsetof(struct udphdr, check);
		mangled = BPF_F_MARK_MANGLED_0;
	} else if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = data + L4_OFF;

		if ((void *)(th + 1) > data_end)
			return TC_ACT_OK;
		sport = bpf_ntohs(th->source);
		dport = bpf_ntohs(th->dest);
		csum_off = L4_OFF + offsetof(struct tcphdr, check);
		mangled = 0;
	} else {
		return TC_ACT_OK;
	}
	if (sport != cfg->dns_port)
		return TC_ACT_OK;
	k.ifindex = ifindex;
	k.sport = dport;
	k.proto = ip->protocol;
	v = bpf_map_lookup_elem(&snas_dns_nat, &k);
	if (!v)
		return TC_ACT_OK;

	old_ip = ip->saddr;
	new_ip = v->orig_daddr;
	old_port = bpf_htons(sport);
	new_port = bpf_htons(v->orig_dport);
	if (old_ip != new_ip) {
		if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip,
					BPF_F_PSEUDO_HDR | mangled | sizeof(new_ip)) ||
		    bpf_l3_csum_replace(skb, L3_OFF + offsetof(struct iphdr, check), old_ip, new_ip,
					sizeof(new_ip)) ||
		    bpf_skb_store_bytes(skb, L3_OFF + offsetof(struct iphdr, saddr), &new_ip,
					sizeof(new_ip), 0))
			return TC_ACT_SHOT;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(new_port)) ||
		    bpf_skb_store_bytes(skb, L4_OFF + offsetof(struct udphdr, source), &new_port,
					sizeof(new_port), 0))
			return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}
