/* SPDX-License-Identifier: Apache-2.0 */
/* conntrack.h - the per-node flow table (LRU) and the new-flow admission checks.
 *
 * A flow is the (veth, 5-tuple) of packets leaving a sandbox. A miss in the table is a new
 * flow (TCP SYN, first UDP datagram, or any packet of a flow evicted or older than this
 * program): it must take a token from the job's new-connection bucket and fit under
 * max_connections, then it is pinned to the proxy the Maglev table names. A hit keeps its
 * proxy while that proxy is alive, else it is re-picked (its old proxy is gone anyway).
 *
 * Limits: job_state.live_flows is an estimate (the proxy enforces max_connections exactly):
 * it grows on every admitted flow and shrinks when the sandbox sends a RST; LRU evictions and
 * FIN-closed flows are not seen, so the agent recounts it from the table
 * (snas_bpf::Tier1::resync_live_flows) periodically. */
#ifndef SNAS_CONNTRACK_H
#define SNAS_CONNTRACK_H

#include "maps.h"
#include "parse.h"
#include "ratelimit.h"
#include "maglev.h"
#include "audit.h"

/* The admission logic over one flow table (`flows`, keyed by `key`). Always inlined, so
 * the map pointer is a constant for the verifier. Returns 0 and sets *proxy, or a drop
 * reason. */
static __always_inline int flow_admit_in(void *flows, const void *key, struct job_state *st,
					 const struct job_cfg *cfg, const struct pkt *p, __u32 hash,
					 __u64 now, __u32 *proxy)
{
	struct flow_val *fv = bpf_map_lookup_elem(flows, key);
	struct flow_val nv = {};
	int pick, reason = 0;

	if (fv) {
		fv->last_seen = now;
		if (!proxy_alive(fv->proxy)) {
			pick = maglev_pick(hash);
			if (pick < 0)
				return SNAS_DROP_NO_PROXY;
			fv->proxy = pick;
		}
		*proxy = fv->proxy;
		if (p->proto == IPPROTO_TCP && (p->tcp_flags & TCPF_RST)) {
			bpf_map_delete_elem(flows, key);
			if (st->live_flows)
				__sync_fetch_and_add(&st->live_flows, -1);
		}
		return 0;
	}

	pick = maglev_pick(hash);
	if (pick < 0)
		return SNAS_DROP_NO_PROXY;

	bpf_spin_lock(&st->lock);
	if (!bucket_take(&st->conn_tokens, &st->conn_ts, cfg->conn_rate, cfg->conn_burst, now))
		reason = SNAS_DROP_NEW_CONNECTION_RATE;
	else if (cfg->max_connections && st->live_flows >= cfg->max_connections)
		reason = SNAS_DROP_CONNECTION_LIMIT;
	else
		st->live_flows++;
	bpf_spin_unlock(&st->lock);
	if (reason)
		return reason;

	nv.last_seen = now;
	nv.proxy = pick;
	bpf_map_update_elem(flows, key, &nv, BPF_ANY);
	*proxy = pick;
	audit(st, cfg->job_key, AUDIT_NEW_FLOW, 0, p, now);
	return 0;
}

static __always_inline int flow_admit(struct job_state *st, const struct job_cfg *cfg,
				      __u32 ifindex, const struct pkt *p, __u32 hash, __u64 now,
				      __u32 *proxy)
{
	struct flow_key fk = {
		.ifindex = ifindex,
		.saddr = p->saddr,
		.daddr = p->daddr,
		.sport = p->sport,
		.dport = p->dport,
		.proto = p->proto,
	};

	return flow_admit_in(&snas_flows, &fk, st, cfg, p, hash, now, proxy);
}

static __always_inline int flow_admit6(struct job_state *st, const struct job_cfg *cfg,
				       __u32 ifindex, const struct pkt *p, __u32 hash, __u64 now,
				       __u32 *proxy)
{
	struct flow6_key fk = {
		.ifindex = ifindex,
		.sport = p->sport,
		.dport = p->dport,
		.proto = p->proto,
	};

	__builtin_memcpy(fk.saddr, p->saddr6, 16);
	__builtin_memcpy(fk.daddr, p->daddr6, 16);
	return flow_admit_in(&snas_flows6, &fk, st, cfg, p, hash, now, proxy);
}

#endif
