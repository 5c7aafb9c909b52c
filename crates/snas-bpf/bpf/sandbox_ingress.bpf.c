// SPDX-License-Identifier: Apache-2.0
/* sandbox_ingress.bpf.c - TC ingress on the host side of a sandbox veth: every frame the
 * sandbox sends. Order of checks (each drop is counted per job and reason):
 *   job attribution (veth ifindex) -> Ethernet -> source MAC -> VLAN tag (not_ip) ->
 *   ARP passes (sender checked) -> IPv6 (own pipeline, or ipv6_denied) -> not IP ->
 *   IPv4 sanity, options, fragments -> source IP -> policy expiry (refused: audit, RST for any
 *   TCP segment, ICMP for UDP) -> DNS packet budget and capture to the job's stub ->
 *   overlay target -> infrastructure set -> destination policy (deny rules first; deny: audit,
 *   RST for a TCP SYN, ICMP for UDP; in audit mode a destination no rule allows passes, audited
 *   would_deny on its flow's first packet) -> flow state and admission (rate, max_connections, proxy pinning) ->
 *   MTU -> EDT -> GENEVE encap -> redirect_neigh to the uplink. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/policy.h"
#include "lib/ratelimit.h"
#include "lib/audit.h"
#include "lib/maglev.h"
#include "lib/conntrack.h"
#include "lib/edt.h"
#include "lib/geneve.h"
#include "lib/reply.h"

char LICENSE[] SEC("license") = "GPL";

/* 802.1ad and the older QinQ outer tag (802.1Q is ETH_P_8021Q). */
#ifndef ETH_P_8021AD
#define ETH_P_8021AD 0x88A8
#endif
#define ETH_P_QINQ1 0x9100

/* Rewrites the destination of a DNS query to the job's stub (gateway_ip:dns_port) and lets
 * the host stack deliver it; remembers the original destination so that sandbox_egress can
 * give the answer the address the sandbox asked. */
static __always_inline int dns_redirect(struct __sk_buff *skb, const struct job_cfg *cfg,
					const struct pkt *p)
{
	__u32 old_ip = p->daddr, new_ip = cfg->gateway_ip;
	__u16 old_port = bpf_htons(p->dport), new_port = bpf_htons(cfg->dns_port);
	int tcp = p->proto == IPPROTO_TCP;
	int csum_off = L4_OFF + (tcp ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check));
	__u64 mangled = tcp ? 0 : BPF_F_MARK_MANGLED_0;

	if (old_ip != new_ip || old_port != new_port) {
		struct dns_nat_key k = { .ifindex = skb->ifindex, .sport = p->sport, .proto = p->proto };
		struct dns_nat_val v = { .orig_daddr = old_ip, .orig_dport = p->dport };

		bpf_map_update_elem(&snas_dns_nat, &k, &v, BPF_ANY);
	}
	if (old_ip != new_ip) {
		if (bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip,
					BPF_F_PSEUDO_HDR | mangled | sizeof(new_ip)))
			return SNAS_DROP_MALFORMED;
		if (bpf_l3_csum_replace(skb, L3_OFF + offsetof(struct iphdr, check), old_ip, new_ip,
					sizeof(new_ip)))
			return SNAS_DROP_MALFORMED;
		if (bpf_skb_store_bytes(skb, L3_OFF + offsetof(struct iphdr, daddr), &new_ip,
					sizeof(new_ip), 0))
			return SNAS_DROP_MALFORMED;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled | sizeof(new_port)))
			return SNAS_DROP_MALFORMED;
		if (bpf_skb_store_bytes(skb, L4_OFF + offsetof(struct udphdr, dest), &new_port,
					sizeof(new_port), 0))
			return SNAS_DROP_MALFORMED;
	}
	return 0;
}

static __always_inline int drop(__u64 job_key, __u32 reason, __u32 len)
{
	count(job_key, 0, reason, len);
	return TC_ACT_SHOT;
}

/* A refused packet: counted, audited (rate limited) and answered (reply.h: a RST for a TCP
 * SYN, or for any TCP segment when `rst_any`; ICMP unreachable for UDP). */
static __always_inline int refuse(struct __sk_buff *skb, struct job_state *st, __u64 job,
				  const struct pkt *p, __u32 reason, __u32 len, __u64 now,
				  int rst_any)
{
	count(job, 0, reason, len);
	audit(st, job, AUDIT_DENY, reason, p, now);
	return reply_refused(skb, st, p, reason, now, rst_any);
}

/* From the policy's `exp` on, the job may send nothing but ARP and neighbour discovery. */
static __always_inline int expired(const struct job_cfg *cfg, __u64 now)
{
	return cfg->expires_ns && now >= cfg->expires_ns;
}

/* Takes a token from the job's DNS packet bucket (before the capture rewrite, so that one
 * job's flood cannot fill the stub's shared socket for the others). */
static __always_inline int dns_budget(struct job_state *st, const struct job_cfg *cfg, __u64 now)
{
	int ok;

	if (!cfg->dns_rate)
		return 1;
	bpf_spin_lock(&st->lock);
	ok = bucket_take(&st->dns_tokens, &st->dns_ts, cfg->dns_rate, cfg->dns_burst, now);
	bpf_spin_unlock(&st->lock);
	return ok;
}

/* The end of the allowed path, shared by IPv4 and IPv6: the flow's proxy must be alive, the
 * encapsulated packet must fit the uplink, EDT stamps the departure (or drops beyond the
 * horizon), then GENEVE encapsulation toward the proxy and redirect to the uplink. */
static __always_inline int forward_to_proxy(struct __sk_buff *skb, const struct job_cfg *cfg,
					    struct job_state *st, __u32 proxy_idx, __u32 hash,
					    __u32 len, __u64 now, __u16 ethertype)
{
	__u64 job = cfg->job_key, tstamp = 0;
	struct proxy *px = proxy_alive(proxy_idx);
	int reason;

	if (!px)
		return drop(job, SNAS_DROP_NO_PROXY, len);

	/* Super-packets (TCP GSO) are split after encapsulation; their segments fit. */
	if (!skb->gso_segs || skb->gso_segs == 1) {
		if (len - L3_OFF + GENEVE_OVERHEAD > cfg_uplink_mtu)
			return drop(job, SNAS_DROP_MTU_EXCEEDED, len);
	}

	reason = edt_stamp(st, cfg, len - L3_OFF, now, &tstamp);
	if (reason)
		return drop(job, reason, len);

	reason = geneve_encap(skb, cfg, px->ip, hash, len - L3_OFF, ethertype);
	if (reason)
		return drop(job, reason, len);
	if (tstamp)
		bpf_skb_set_tstamp(skb, tstamp, BPF_SKB_TSTAMP_DELIVERY_MONO);

	count(job, 0, 0, len);
	debug_redirect(cfg_uplink_ifindex, 2, proxy_idx, hash);
	return bpf_redirect_neigh(cfg_uplink_ifindex, NULL, 0, 0);
}

/* An MLD listener report or done (RFC 3810 type 143, RFC 2710 types 131/132) as the sandbox's
 * own kernel sends them for the solicited-node groups of its addresses when its interface
 * comes up: hop limit 1, to a link-scope multicast address (ff02::/16), from a link-local
 * address or :: (before one is ready), behind a Hop-by-Hop header of exactly one Router Alert
 * option (value 0: MLD) and padding. Such a report goes to the host like neighbour discovery
 * (the host is no multicast router and ignores it) instead of counting as an ip_options drop
 * that would alarm users after every clean run; any other Hop-by-Hop header is still dropped
 * as ip_options by parse_ipv6. Never forwarded to a proxy. */
static __always_inline int mld_report(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + L3_OFF;
	__u8 *h = data + L4_OFF6;
	const __u8 *src, *dst;
	__u8 t;
	int i;

	if ((void *)(h + 8 + 4) > data_end)
		return 0;
	if (ip6->nexthdr != 0 || ip6->hop_limit != 1)
		return 0;
	src = ip6->saddr.in6_u.u6_addr8;
	dst = ip6->daddr.in6_u.u6_addr8;
	if (dst[0] != 0xff || dst[1] != 0x02)
		return 0;
	if (!(src[0] == 0xfe && (src[1] & 0xc0) == 0x80)) {
		for (i = 0; i < 16; i++)
			if (src[i])
				return 0;
	}
	/* Next header ICMPv6, length 0 (8 bytes): Router Alert (type 5, length 2, value 0), then
	 * PadN of length 0 or two Pad1. */
	if (h[0] != IPPROTO_ICMPV6 || h[1] != 0 || h[2] != 5 || h[3] != 2 || h[4] != 0 ||
	    h[5] != 0 || !((h[6] == 1 && h[7] == 0) || (h[6] == 0 && h[7] == 0)))
		return 0;
	t = h[8];
	return t == 143 || t == 131 || t == 132;
}

/* IPv6 from a job whose policy has IPv6 rules. Same pipeline as IPv4 with these
 * differences: no DNS capture (DNS over IPv6 is denied, resolvers fall back to the IPv4 stub),
 * and neighbour and router solicitations/advertisements and the sandbox's MLD reports
 * (mld_report) go to the host. */
static __always_inline int sandbox_ipv6(struct __sk_buff *skb, const struct job_cfg *cfg,
					__u32 ifindex, __u32 len)
{
	__u64 job = cfg->job_key, now;
	struct flow6_key fk = {};
	struct flow_val *fv;
	struct job_state *st;
	struct pkt p = {};
	__u32 hash, proxy_idx = 0;
	int reason;

	if (mld_report(skb)) {
		count(job, 0, 0, len);
		return TC_ACT_OK;
	}
	reason = parse_ipv6(skb, &p);
	if (reason)
		return drop(job, reason, len);
	if (__builtin_memcmp(p.saddr6, cfg->sandbox_ip6, 16))
		return drop(job, SNAS_DROP_SPOOFED_SOURCE, len);
	if (p.proto == IPPROTO_ICMPV6 && p.icmp_type >= 133 && p.icmp_type <= 136) {
		count(job, 0, 0, len);
		return TC_ACT_OK;
	}
	st = bpf_map_lookup_elem(&snas_job_state, &ifindex);
	if (!st)
		return drop(job, SNAS_DROP_UNKNOWN_JOB, len);
	now = bpf_ktime_get_ns();
	if (expired(cfg, now))
		return refuse(skb, st, job, &p, SNAS_DROP_POLICY_EXPIRED, len, now, 1);
	if (((p.proto == IPPROTO_UDP || p.proto == IPPROTO_TCP) && p.dport == 53) ||
	    (p.proto == IPPROTO_TCP && p.dport == 853))
		return refuse(skb, st, job, &p, SNAS_DROP_DESTINATION_DENIED, len, now, 0);
	if (p.proto == IPPROTO_UDP && p.dport == cfg_geneve_port)
		return drop(job, SNAS_DROP_OVERLAY_TARGET, len);
	if (infra_denied6(p.daddr6))
		return refuse(skb, st, job, &p, SNAS_DROP_INFRASTRUCTURE_DENIED, len, now, 0);

	flow_key6(&fk, ifindex, &p);
	fv = bpf_map_lookup_elem(&snas_flows6, &fk);
	reason = policy_check6(job, &p, now, flow_established(fv));
	if (reason && !audit_relaxes(cfg, reason))
		return refuse(skb, st, job, &p, reason, len, now, 0);
	if (reason && !flow_established(fv))
		audit(st, job, AUDIT_WOULD_DENY, reason, &p, now);
	hash = flow_hash6(&p);
	reason = flow_track_in(&snas_flows6, &fk, fv, st, cfg, ifindex, &p, hash, now, &proxy_idx);
	if (reason)
		return drop(job, reason, len);
	return forward_to_proxy(skb, cfg, st, proxy_idx, hash, len, now, ETH_P_IPV6);
}

SEC("tc")
int snas_sandbox_ingress(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex, len = skb->len;
	struct job_cfg *cfg = bpf_map_lookup_elem(&snas_jobs, &ifindex);
	struct flow_key fk = {};
	struct flow_val *fv;
	struct job_state *st;
	void *data, *data_end;
	struct ethhdr *eth;
	struct pkt p = {};
	__u64 job, now;
	__u32 hash, proxy_idx = 0;
	int reason;

	if (!cfg)
		return drop(0, SNAS_DROP_UNKNOWN_JOB, len);
	job = cfg->job_key;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return drop(job, SNAS_DROP_MALFORMED, len);
	if (__builtin_memcmp(eth->h_source, cfg->sandbox_mac, ETH_ALEN))
		return drop(job, SNAS_DROP_SPOOFED_MAC, len);
	/* A VLAN tag: the kernel moves the (outer) 802.1Q/802.1ad tag out of the frame into the
	 * skb before TC ingress, so the frame itself looks like plain IP. Tags left in the frame
	 * (QinQ's inner tag, or any tag the kernel did not strip) are refused here as well. */
	if (skb->vlan_present || eth->h_proto == bpf_htons(ETH_P_8021Q) ||
	    eth->h_proto == bpf_htons(ETH_P_8021AD) || eth->h_proto == bpf_htons(ETH_P_QINQ1))
		return drop(job, SNAS_DROP_NOT_IP, len);
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		/* Ethernet/IPv4 ARP: the sender fields must be the job's own too, so that the
		 * host's neighbour table cannot be poisoned with another address. */
		struct arp_eth {
			__be16 htype, ptype;
			__u8 hlen, plen;
			__be16 oper;
			__u8 sha[ETH_ALEN];
			__u8 spa[4];
			__u8 tha[ETH_ALEN];
			__u8 tpa[4];
		} *arp = data + L3_OFF;

		if ((void *)(arp + 1) > data_end || arp->htype != bpf_htons(1) ||
		    arp->ptype != bpf_htons(ETH_P_IP) || arp->hlen != ETH_ALEN || arp->plen != 4)
			return drop(job, SNAS_DROP_MALFORMED, len);
		if (__builtin_memcmp(arp->sha, cfg->sandbox_mac, ETH_ALEN))
			return drop(job, SNAS_DROP_SPOOFED_MAC, len);
		if (__builtin_memcmp(arp->spa, &cfg->sandbox_ip, 4))
			return drop(job, SNAS_DROP_SPOOFED_SOURCE, len);
		count(job, 0, 0, len);
		return TC_ACT_OK;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		if ((void *)(data + L3_OFF + sizeof(struct ipv6hdr)) > data_end)
			return drop(job, SNAS_DROP_MALFORMED, len);
		if (!(cfg->flags & JOB_F_IPV6_RULES))
			return drop(job, SNAS_DROP_IPV6_DENIED, len);
		return sandbox_ipv6(skb, cfg, ifindex, len);
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return drop(job, SNAS_DROP_NOT_IP, len);

	reason = parse_ipv4(skb, &p);
	if (reason)
		return drop(job, reason, len);
	if (p.saddr != cfg->sandbox_ip)
		return drop(job, SNAS_DROP_SPOOFED_SOURCE, len);

	st = bpf_map_lookup_elem(&snas_job_state, &ifindex);
	if (!st)
		return drop(job, SNAS_DROP_UNKNOWN_JOB, len);
	now = bpf_ktime_get_ns();
	if (expired(cfg, now))
		return refuse(skb, st, job, &p, SNAS_DROP_POLICY_EXPIRED, len, now, 1);

	if (((p.proto == IPPROTO_UDP || p.proto == IPPROTO_TCP) && p.dport == 53) ||
	    (p.proto == IPPROTO_TCP && p.dport == 853)) {
		if (!dns_budget(st, cfg, now)) {
			count(job, 0, SNAS_DROP_DNS_RATE, len);
			audit(st, job, AUDIT_DENY, SNAS_DROP_DNS_RATE, &p, now);
			return TC_ACT_SHOT;
		}
		reason = dns_redirect(skb, cfg, &p);
		if (reason)
			return drop(job, reason, len);
		count(job, 0, 0, len);
		return TC_ACT_OK;
	}
	if (p.daddr == cfg_node_ip || (p.proto == IPPROTO_UDP && p.dport == cfg_geneve_port))
		return drop(job, SNAS_DROP_OVERLAY_TARGET, len);
	if (infra_denied(p.daddr))
		return refuse(skb, st, job, &p, SNAS_DROP_INFRASTRUCTURE_DENIED, len, now, 0);

	flow_key4(&fk, ifindex, &p);
	fv = bpf_map_lookup_elem(&snas_flows, &fk);
	reason = policy_check(job, &p, now, flow_established(fv));
	if (reason && !audit_relaxes(cfg, reason))
		return refuse(skb, st, job, &p, reason, len, now, 0);
	if (reason && !flow_established(fv))
		audit(st, job, AUDIT_WOULD_DENY, reason, &p, now);

	hash = flow_hash(&p);
	reason = flow_track_in(&snas_flows, &fk, fv, st, cfg, ifindex, &p, hash, now, &proxy_idx);
	if (reason)
		return drop(job, reason, len);
	return forward_to_proxy(skb, cfg, st, proxy_idx, hash, len, now, ETH_P_IP);
}
