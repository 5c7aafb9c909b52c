/* SPDX-License-Identifier: Apache-2.0 */
/* policy.h - the (job, destination, port, protocol) decision.
 *
 * Owns: the job's deny CIDR rules (snas_deny_cidr/snas_deny6_cidr: checked first, before any
 * allow entry, for established flows too; a match is deny_rule), the node's infrastructure set (snas_infra/snas_infra6, checked before any job entry
 * and opened by none: infrastructure_denied), the always-denied ranges (a fixed check in C, so
 * that a wrong map entry cannot open them: only an entry carrying DST_F_ALLOW_PRIVATE, which
 * the agent sets only for signed `allow_private` CIDR rules, overrides it), the exact-IP
 * lookup (DNS-learned; every port rule has its own expiry) and the LPM lookup (CIDR rules, no
 * expiry), then the port/protocol match.
 *
 * Expiry applies to new connections only: for a packet of an established flow (`est`, a flow
 * table entry that is not closed) an expired rule still matches, so that a TTL never cuts an
 * established flow; a revoked entry (deleted) does cut it. An entry whose rules have all
 * expired counts as absent for new connections.
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

#define PM_NONE 0		/* no live rule: the entry counts as absent */
#define PM_NO_PORT 1		/* live rules, none for this port/protocol */
#define PM_MATCH 2

/* now_s: whole seconds of the packet's bpf_ktime_get_ns (rule expiries are rounded up to
 * whole seconds by userspace, so a rule never ends before its expiry). */
static __always_inline int ports_match(const struct dst_val *v, const struct pkt *p, __u32 now_s,
				       int est)
{
	int transport = p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP;
	__u32 n = v->nrules;
	int live = 0;

#pragma unroll
	for (int i = 0; i < MAX_PORT_RULES; i++) {
		const struct port_rule *r = &v->rules[i];

		if (i >= n)
			break;
		if (!est && r->expires_s && now_s >= r->expires_s)
			continue;
		live = 1;
		if (!transport || (r->proto && r->proto != p->proto))
			continue;
		if (p->dport >= r->lo && p->dport <= r->hi)
			return PM_MATCH;
	}
	return live ? PM_NO_PORT : PM_NONE;
}

/* Weighs one destination entry (exact IP or CIDR; NULL or without a live rule counts as
 * absent): returns 0 when it allows the packet's port, else 1 after updating `*found` and
 * `*reason`. An always-denied (`priv`) destination is opened only by an entry with
 * DST_F_ALLOW_PRIVATE. Shared by the IPv4 and IPv6 checks, which look the CIDR map up only if
 * the exact entry did not already allow the packet. */
static __always_inline int dst_entry(const struct dst_val *v, const struct pkt *p, __u32 now_s,
				     int est, int priv, int *found, int *reason)
{
	int m;

	if (!v)
		return 1;
	m = ports_match(v, p, now_s, est);
	if (m == PM_NONE)
		return 1;
	if (priv && !(v->flags & DST_F_ALLOW_PRIVATE)) {
		if (!*found)
			*reason = SNAS_DROP_ALWAYS_DENIED;
	} else if (m == PM_MATCH) {
		return 0;
	} else {
		*reason = SNAS_DROP_PORT_DENIED;
	}
	*found = 1;
	return 1;
}

/* The destination is in the node's infrastructure set. */
static __always_inline int infra_denied(__u32 daddr)
{
	struct infra_key k = { .prefixlen = 32, .ip = daddr };

	return bpf_map_lookup_elem(&snas_infra, &k) != 0;
}

static __always_inline int infra_denied6(const __u8 *daddr)
{
	struct infra6_key k = { .prefixlen = 128 };

	__builtin_memcpy(k.ip, daddr, 16);
	return bpf_map_lookup_elem(&snas_infra6, &k) != 0;
}

/* A deny entry (found by LPM; it carries the rules of every deny prefix containing it)
 * matches the packet's port and protocol. */
static __always_inline int deny_match(const struct dst_val *v, const struct pkt *p)
{
	return v && ports_match(v, p, 0, 1) == PM_MATCH;
}

/* Audit mode lets through what no rule allows, nothing else. */
static __always_inline int audit_relaxes(const struct job_cfg *cfg, int reason)
{
	return (cfg->flags & JOB_F_AUDIT) &&
	       (reason == SNAS_DROP_DESTINATION_DENIED || reason == SNAS_DROP_PORT_DENIED);
}

/* Returns 0 when allowed, else the drop reason. `est`: the packet belongs to an established
 * flow (expiry does not apply, see above). */
static __always_inline int policy_check(__u64 job_key, const struct pkt *p, __u64 now, int est)
{
	__u32 now_s = now / NSEC_PER_SEC;
	int priv = always_denied(p->daddr);
	struct dst_key dk = { .job_key = job_key, .ip = p->daddr };
	struct cidr_key ck = {
		.prefixlen = 64 + 32,
		.job_hi = bpf_htonl(job_key >> 32),
		.job_lo = bpf_htonl((__u32)job_key),
		.ip = p->daddr,
	};
	int found = 0, reason = SNAS_DROP_DESTINATION_DENIED;

	if (deny_match(bpf_map_lookup_elem(&snas_deny_cidr, &ck), p))
		return SNAS_DROP_DENY_RULE;
	if (!dst_entry(bpf_map_lookup_elem(&snas_dst_exact, &dk), p, now_s, est, priv, &found,
		       &reason))
		return 0;
	if (!dst_entry(bpf_map_lookup_elem(&snas_dst_cidr, &ck), p, now_s, est, priv, &found,
		       &reason))
		return 0;
	if (!found && priv)
		reason = SNAS_DROP_ALWAYS_DENIED;
	return reason;
}

/* IPv6 always-denied: unspecified, loopback, IPv4-compatible and IPv4-mapped (::/96,
 * ::ffff:0:0/96: they would bypass the IPv4 checks), NAT64 64:ff9b::/32, discard 100::/64,
 * Teredo 2001::/32, 6to4 2002::/16, ULA fc00::/7, link-local fe80::/10, site-local
 * fec0::/10, multicast ff00::/8. */
static __always_inline int always_denied6(const __u8 *a)
{
	__u32 w[4];

	__builtin_memcpy(w, a, 16);
	if (w[0] == 0 && w[1] == 0 && (w[2] == 0 || w[2] == bpf_htonl(0xffff)))
		return 1;
	if (w[0] == bpf_htonl(0x0064ff9b))
		return 1;
	if (w[0] == bpf_htonl(0x01000000) && w[1] == 0)
		return 1;
	if (w[0] == bpf_htonl(0x20010000))
		return 1;
	if (a[0] == 0x20 && a[1] == 0x02)
		return 1;
	if ((a[0] & 0xfe) == 0xfc || a[0] == 0xff)
		return 1;
	if (a[0] == 0xfe && (a[1] & 0x80) == 0x80)
		return 1;
	return 0;
}

/* Returns 0 when allowed, else the drop reason. Same rules as policy_check over the IPv6
 * maps. */
static __always_inline int policy_check6(__u64 job_key, const struct pkt *p, __u64 now, int est)
{
	__u32 now_s = now / NSEC_PER_SEC;
	int priv = always_denied6(p->daddr6);
	struct dst6_key dk = { .job_key = job_key };
	struct cidr6_key ck = {
		.prefixlen = 64 + 128,
		.job_hi = bpf_htonl(job_key >> 32),
		.job_lo = bpf_htonl((__u32)job_key),
	};
	__builtin_memcpy(dk.ip, p->daddr6, 16);
	__builtin_memcpy(ck.ip, p->daddr6, 16);
	int found = 0, reason = SNAS_DROP_DESTINATION_DENIED;

	if (deny_match(bpf_map_lookup_elem(&snas_deny6_cidr, &ck), p))
		return SNAS_DROP_DENY_RULE;
	if (!dst_entry(bpf_map_lookup_elem(&snas_dst6_exact, &dk), p, now_s, est, priv, &found,
		       &reason))
		return 0;
	if (!dst_entry(bpf_map_lookup_elem(&snas_dst6_cidr, &ck), p, now_s, est, priv, &found,
		       &reason))
		return 0;
	if (!found && priv)
		reason = SNAS_DROP_ALWAYS_DENIED;
	return reason;
}

#endif
