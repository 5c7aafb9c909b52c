/* SPDX-License-Identifier: Apache-2.0 */
/* conntrack.h - the per-node flow table (LRU), flow state and the new-connection admission.
 *
 * A flow is the (veth, 5-tuple) of packets leaving a sandbox. Its entry holds the proxy it is
 * pinned to and its state bits (FLOW_F_*): REPLIED, FIN_OUT, FIN_IN, RST, CLOSED. The sandbox
 * side (sandbox_ingress) records FIN/RST out; the reply side (uplink_ingress, after
 * attributing a decapsulated TCP/UDP packet to the job) looks the entry up by the reversed
 * tuple and records REPLIED, FIN in and RST in.
 *
 * Admission: a packet without a live entry opens a connection: it must take a token from the
 * job's new-connection bucket and fit under max_connections; then it is pinned to the proxy
 * the Maglev table names. That is a table miss (TCP SYN, first UDP datagram, or any packet of
 * a flow evicted or aged out) or a SYN without ACK on a CLOSED entry (a new connection on the
 * same 5-tuple). A RST that misses is forwarded without an entry (it closes nothing here). A
 * hit keeps its proxy while that proxy is alive, else it is re-picked.
 *
 * Closing: FIN both ways or a RST either way sets CLOSED; the transition is taken with atomic
 * fetch-or, so exactly one CPU sees it and gives the job's slot back. A closed entry stays
 * until the ageing pass removes it (snas_bpf::Tier1::age_flows, 30 s after its last packet),
 * so late ACKs and FIN retransmits pass without admission.
 *
 * Counting: job_conns.open (own spin lock, written only by BPF) counts admissions minus
 * closes; the job's open connections are open - bias, where the bias (snas_job_conns_bias,
 * written only by userspace) is the ageing pass's correction for flows that left the table
 * without closing (idle timeout, LRU eviction). The pass never writes `open`, so nothing BPF
 * counted in between is lost. Invariant: tier 1 may over-admit briefly (a count that is low
 * until the next pass), never under-admit; the proxy enforces max_connections exactly. */
#ifndef SNAS_CONNTRACK_H
#define SNAS_CONNTRACK_H

#include "maps.h"
#include "parse.h"
#include "ratelimit.h"
#include "maglev.h"
#include "audit.h"

static __always_inline void conns_release(__u32 ifindex)
{
	struct job_conns *jc = bpf_map_lookup_elem(&snas_job_conns, &ifindex);

	if (!jc)
		return;
	bpf_spin_lock(&jc->lock);
	jc->open--;
	bpf_spin_unlock(&jc->lock);
}

/* Takes a new-connection token and a connection slot. Returns 0 or a drop reason. */
static __always_inline int conn_admit(struct job_state *st, const struct job_cfg *cfg,
				      __u32 ifindex, __u64 now)
{
	struct job_conns *jc = bpf_map_lookup_elem(&snas_job_conns, &ifindex);
	__s64 *biasp = bpf_map_lookup_elem(&snas_job_conns_bias, &ifindex);
	__s64 bias = biasp ? *biasp : 0;
	int reason = 0;

	if (!jc)
		return SNAS_DROP_UNKNOWN_JOB;
	bpf_spin_lock(&st->lock);
	if (!bucket_take(&st->conn_tokens, &st->conn_ts, cfg->conn_rate, cfg->conn_burst, now))
		reason = SNAS_DROP_NEW_CONNECTION_RATE;
	bpf_spin_unlock(&st->lock);
	if (reason)
		return reason;

	bpf_spin_lock(&jc->lock);
	if (cfg->max_connections && jc->open - bias >= (__s64)cfg->max_connections)
		reason = SNAS_DROP_CONNECTION_LIMIT;
	else
		jc->open++;
	bpf_spin_unlock(&jc->lock);
	return reason;
}

/* Records state bits on a flow; the transition to CLOSED (FIN both ways, or a RST) happens
 * once and gives the job's slot back. Used by both directions. */
static __always_inline void flow_mark(struct flow_val *fv, __u32 bits, __u32 ifindex)
{
	__u32 old, f;

	if ((fv->flags & bits) == bits)
		return;
	old = __sync_fetch_and_or(&fv->flags, bits);
	f = old | bits;
	if (f & FLOW_F_CLOSED)
		return;
	if (!(f & FLOW_F_RST) && (f & (FLOW_F_FIN_OUT | FLOW_F_FIN_IN)) !=
					 (FLOW_F_FIN_OUT | FLOW_F_FIN_IN))
		return;
	old = __sync_fetch_and_or(&fv->flags, FLOW_F_CLOSED);
	if (!(old & FLOW_F_CLOSED))
		conns_release(ifindex);
}

static __always_inline int tcp_new_syn(const struct pkt *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCPF_SYN | TCPF_ACK | TCPF_RST)) == TCPF_SYN;
}

/* The packet's own state bits (sandbox side). */
static __always_inline __u32 out_bits(const struct pkt *p)
{
	__u32 bits = 0;

	if (p->proto != IPPROTO_TCP)
		return 0;
	if (p->tcp_flags & TCPF_FIN)
		bits |= FLOW_F_FIN_OUT;
	if (p->tcp_flags & TCPF_RST)
		bits |= FLOW_F_RST;
	return bits;
}

/* The flow is established for the policy check: an entry that is not closed. */
static __always_inline int flow_established(const struct flow_val *fv)
{
	return fv && !(fv->flags & FLOW_F_CLOSED);
}

/* Admission and state over one flow table (`flows`, keyed by `key`; `fv` = the caller's
 * lookup of key, possibly NULL). Always inlined, so the map pointer is a constant for the
 * verifier. Returns 0 and sets *proxy, or a drop reason. */
static __always_inline int flow_track_in(void *flows, const void *key, struct flow_val *fv,
					 struct job_state *st, const struct job_cfg *cfg,
					 __u32 ifindex, const struct pkt *p, __u32 hash, __u64 now,
					 __u32 *proxy)
{
	struct flow_val nv = {};
	__u32 cur;
	int pick, reason;

	if (fv && !((fv->flags & FLOW_F_CLOSED) && tcp_new_syn(p))) {
		fv->last_seen = now;
		if (!proxy_alive(fv->proxy)) {
			pick = maglev_pick(hash);
			if (pick < 0)
				return SNAS_DROP_NO_PROXY;
			fv->proxy = pick;
		}
		*proxy = fv->proxy;
		if (out_bits(p))
			flow_mark(fv, out_bits(p), ifindex);
		return 0;
	}

	pick = maglev_pick(hash);
	if (pick < 0)
		return SNAS_DROP_NO_PROXY;
	*proxy = pick;
	/* A RST of a flow tier 1 no longer knows: nothing to open or close here. */
	if (!fv && p->proto == IPPROTO_TCP && (p->tcp_flags & TCPF_RST))
		return 0;

	if (fv) {
		/* A new connection on the 5-tuple of a closed one. */
		cur = fv->flags;
		reason = conn_admit(st, cfg, ifindex, now);
		if (reason)
			return reason;
		if (__sync_val_compare_and_swap(&fv->flags, cur, 0) != cur) {
			/* Another CPU changed the entry meanwhile (a late FIN/RST of the old
			 * connection, or the same SYN): this SYN is not the one that reopens. */
			conns_release(ifindex);
		} else {
			fv->admitted = bpf_ktime_get_ns();
			fv->proxy = pick;
		}
		fv->last_seen = now;
		audit(st, cfg->job_key, AUDIT_NEW_FLOW, 0, p, now);
		return 0;
	}

	reason = conn_admit(st, cfg, ifindex, now);
	if (reason)
		return reason;
	nv.last_seen = now;
	nv.proxy = pick;
	nv.flags = out_bits(p);
	/* Stamped after the count went up: the ageing pass counts an entry only if it was
	 * admitted before the pass read the counter. */
	nv.admitted = bpf_ktime_get_ns();
	if (bpf_map_update_elem(flows, key, &nv, BPF_NOEXIST))
		/* Another CPU admitted the same flow first: count it once. */
		conns_release(ifindex);
	audit(st, cfg->job_key, AUDIT_NEW_FLOW, 0, p, now);
	return 0;
}

static __always_inline void flow_key4(struct flow_key *fk, __u32 ifindex, const struct pkt *p)
{
	fk->ifindex = ifindex;
	fk->saddr = p->saddr;
	fk->daddr = p->daddr;
	fk->sport = p->sport;
	fk->dport = p->dport;
	fk->proto = p->proto;
}

static __always_inline void flow_key6(struct flow6_key *fk, __u32 ifindex, const struct pkt *p)
{
	fk->ifindex = ifindex;
	__builtin_memcpy(fk->saddr, p->saddr6, 16);
	__builtin_memcpy(fk->daddr, p->daddr6, 16);
	fk->sport = p->sport;
	fk->dport = p->dport;
	fk->proto = p->proto;
}

/* The reply side: a decapsulated packet of (veth, reversed 5-tuple) `key` with TCP flags
 * `tcp_flags` (0 for UDP). Records REPLIED, FIN in and RST in; keeps last_seen fresh to the
 * second (replies need not write the shared entry on every packet). */
static __always_inline void flow_reply(void *flows, const void *key, __u32 ifindex, __u8 proto,
				       __u8 tcp_flags, __u64 now)
{
	struct flow_val *fv = bpf_map_lookup_elem(flows, key);
	__u32 bits = FLOW_F_REPLIED;

	if (!fv)
		return;
	if (proto == IPPROTO_TCP) {
		if (tcp_flags & TCPF_FIN)
			bits |= FLOW_F_FIN_IN;
		if (tcp_flags & TCPF_RST)
			bits |= FLOW_F_RST;
	}
	if (now > fv->last_seen + NSEC_PER_SEC)
		fv->last_seen = now;
	flow_mark(fv, bits, ifindex);
}

#endif
