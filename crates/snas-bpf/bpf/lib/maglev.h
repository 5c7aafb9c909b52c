/* SPDX-License-Identifier: Apache-2.0 */
/* maglev.h - flow hash and proxy choice.
 *
 * The Maglev table (MAGLEV_M slots of proxy indices) is computed in Rust
 * (snas_bpf::maglev::build) from the healthy proxies and written as one map value, so a
 * reader sees the old or the new table. Established flows do not consult it again: the flow
 * table (conntrack.h) pins them to their proxy while it is alive. */
#ifndef SNAS_MAGLEV_H
#define SNAS_MAGLEV_H

#include "maps.h"
#include "parse.h"

static __always_inline __u32 fmix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* 32-bit hash of the inner 5-tuple (murmur3 finaliser chain). */
static __always_inline __u32 flow_hash(const struct pkt *p)
{
	__u32 h = fmix32(p->saddr ^ 0x534e4153);

	h = fmix32(h ^ p->daddr);
	h = fmix32(h ^ (((__u32)p->sport << 16) | p->dport));
	return fmix32(h ^ p->proto);
}

/* The same over IPv6 addresses. */
static __always_inline __u32 flow_hash6(const struct pkt *p)
{
	__u32 w[8];
	__u32 h = 0x534e4136;

	__builtin_memcpy(w, p->saddr6, 16);
	__builtin_memcpy(w + 4, p->daddr6, 16);
#pragma unroll
	for (int i = 0; i < 8; i++)
		h = fmix32(h ^ w[i]);
	h = fmix32(h ^ (((__u32)p->sport << 16) | p->dport));
	return fmix32(h ^ p->proto);
}

static __always_inline struct proxy *proxy_alive(__u32 idx)
{
	struct proxy *pr = bpf_map_lookup_elem(&snas_proxies, &idx);

	if (!pr || !(pr->flags & PROXY_F_ALIVE))
		return 0;
	return pr;
}

/* Proxy index for a new flow, or -1 if the table is empty or names a dead proxy. */
static __always_inline int maglev_pick(__u32 hash)
{
	__u32 zero = 0, slot = hash % MAGLEV_M;
	struct maglev_table *t = bpf_map_lookup_elem(&snas_maglev, &zero);
	__u32 idx;

	/* The verifier does not bound a modulo; hide the compiler's knowledge so that the
	 * explicit check survives. */
	asm volatile("" : "+r"(slot));
	if (!t || slot >= MAGLEV_M)
		return -1;
	idx = t->slot[slot];
	if (idx >= MAX_PROXIES || !proxy_alive(idx))
		return -1;
	return idx;
}

#endif
