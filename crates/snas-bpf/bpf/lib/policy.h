/* SPDX-License-Identifier: Apache-2.0 */
/* policy.h - the (job, destination, port, protocol) decision.
 *
 * Owns: the always-denied ranges (a fixed check in C, so that a wrong map entry cannot open
 * them: only an entry carrying DST_F_ALLOW_PRIVATE, which the agent sets only for signed
 * `allow_private` CIDR rules, overrides it), the exact-IP lookup (DNS-learned, with expiry)
 * and the LPM lookup (CIDR rules), then the port/protocol match.
 * Only TCP and UDP are ever allowed; other protocols get PORT_DENIED. */
#ifndef SNAS_POLICY_H
#define SNAS_POLICY_H

#include "maps.h"
#include "parse.h"

static __always_inline int in_net(__u32 addr_be, __u32 net, __u32 bits)
{
	__u32 a = bpf_ntohl(addr_be);
	__u32 mask = bits ? ~0U << (32 - bits) : 0;

	return (a & mask) == net;
}

/* Loopback, RFC 1918, CGNAT, link-local (metadata), multicast, reserved, "this network",
 * broadcast. */
static __always_inline int always_denied(__u32 daddr)
{
	return in_net(daddr, 0x7f000000, 8) ||	/* 127/8 */
	       in_net(daddr, 0x0a000000, 8) ||	/* 10/8 */
	       in_net(daddr, 0xac100000, 12) ||	/* 172.16/12 */
	       in_net(daddr, 0xc0a80000, 16) ||	/* 192.168/16 */
	       in_net(daddr, 0x64400000, 10) ||	/* 100.64/10 */
	       in_net(daddr, 0xa9fe0000, 16) ||	/* 169.254/16 */
	       in_net(daddr, 0xe0000000, 4) ||	/* 224/4 */
	       in_net(daddr, 0xf0000000, 4) ||	/* 240/4, includes 255.255.255.255 */
	       in_net(daddr, 0x00000000, 8);	/* 0/8 */
}

static __always_inline int ports_match(const struct dst_val *v, const struct pkt *p)
{
	__u32 n = v->nrules;

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return 0;
#pragma unroll
	for (int i = 0; i < MAX_PORT_RULES; i++) {
		const struct port_rule *r = &v->rules[i];

		if (i >= n)
			break;
		if (r->proto && r->proto != p->proto)
			continue;
		if (p->dport >= r->lo && p->dport <= r->hi)
			return 1;
	}
	return 0;
}

/* Returns 0 when allowed, else the drop reason. */
static __always_inline int policy_check(__u64 job_key, const struct pkt *p, __u64 now)
{
	int priv = always_denied(p->daddr);
	struct dst_key dk = { .job_key = job_key, .ip = p->daddr };
	struct cidr_key ck = {
		.prefixlen = 64 + 32,
		.job_hi = bpf_htonl(job_key >> 32),
		.job_lo = bpf_htonl((__u32)job_key),
		.ip = p->daddr,
	};
	struct dst_val *v;
	int found = 0, reason = SNAS_DROP_DESTINATION_DENIED;

	v = bpf_map_lookup_elem(&snas_dst_exact, &dk);
	if (v && (v->expires_ns == 0 || now < v->expires_ns)) {
		found = 1;
		if (priv && !(v->flags & DST_F_ALLOW_PRIVATE))
			reason = SNAS_DROP_ALWAYS_DENIED;
		else if (ports_match(v, p))
			return 0;
		else
			reason = SNAS_DROP_PORT_DENIED;
	}
	v = bpf_map_lookup_elem(&snas_dst_cidr, &ck);
	if (v && (v->expires_ns == 0 || now < v->expires_ns)) {
		if (priv && !(v->flags & DST_F_ALLOW_PRIVATE)) {
			if (!found)
				reason = SNAS_DROP_ALWAYS_DENIED;
		} else if (ports_match(v, p)) {
			return 0;
		} else {
			reason = SNAS_DROP_PORT_DENIED;
		}
		found = 1;
	}
	if (!found && priv)
		reason = SNAS_DROP_ALWAYS_DENIED;
	return reason;
}

#endif
