/* SPDX-License-Identifier: Apache-2.0 */
/* edt.h - Earliest Departure Time stamping per job.
 *
 * Start-time EDT (as Cilium and fq's other users do): the packet departs at
 * t = max(now, t_last) and t_last becomes t + len * 8e9 / egress_bps, len = the inner IPv4
 * packet length (what the sandbox sent; the 56 bytes of overlay are not charged). A packet of
 * an idle job thus leaves at once and its transmission time delays the next one: pacing adds
 * no latency below the rate, and a burst is one packet. If t - now exceeds the horizon (the
 * queueing-delay budget, default 20 ms) the packet is dropped and t_last is not advanced.
 * The stamp is written with bpf_skb_set_tstamp(..., BPF_SKB_TSTAMP_DELIVERY_MONO) so that it
 * survives the redirect to the uplink, where fq (if the kernel has it) paces by it. Without
 * fq the stamp is carried and ignored; the horizon drop still bounds each job's rate. */
#ifndef SNAS_EDT_H
#define SNAS_EDT_H

#include "maps.h"

/* Returns 0 and sets *tstamp (0 = do not stamp) or a drop reason. */
static __always_inline int edt_stamp(struct job_state *st, const struct job_cfg *cfg, __u32 len,
				     __u64 now, __u64 *tstamp)
{
	__u64 bps = cfg->egress_bps;
	__u64 horizon = cfg->horizon_ns ? cfg->horizon_ns : cfg_horizon_ns;
	__u64 delay, t;
	int reason = 0;

	*tstamp = 0;
	if (!bps)
		return 0;
	delay = (__u64)len * 8 * NSEC_PER_SEC / bps;
	bpf_spin_lock(&st->lock);
	t = st->t_last > now ? st->t_last : now;
	if (t - now > horizon) {
		reason = SNAS_DROP_PACING_HORIZON;
	} else {
		st->t_last = t + delay;
		*tstamp = t;
	}
	bpf_spin_unlock(&st->lock);
	return reason;
}

/* The node's ingress policer (decapsulated traffic toward the sandbox), the same clock as the
 * EDT above but without a stamp: the veth toward the sandbox has no fq, so a packet that would
 * have to wait longer than the horizon is dropped (SNAS_DROP_PACING_HORIZON) and the clock is
 * not advanced. Proxies pace each job's downloads, but each only for the flows it carries;
 * this bounds the sum at the job's node, whatever the number of proxies. */
static __always_inline int ingress_police(struct job_state *st, const struct job_cfg *cfg,
					  __u32 len, __u64 now)
{
	__u64 bps = cfg->ingress_bps;
	__u64 horizon = cfg->horizon_ns ? cfg->horizon_ns : cfg_horizon_ns;
	__u64 delay, t;
	int reason = 0;

	if (!bps)
		return 0;
	delay = (__u64)len * 8 * NSEC_PER_SEC / bps;
	/* A split 64 KiB super-packet arrives at once: never refuse one whole burst. */
	if (horizon < 65536ULL * 8 * NSEC_PER_SEC / bps)
		horizon = 65536ULL * 8 * NSEC_PER_SEC / bps;
	bpf_spin_lock(&st->lock);
	t = st->t_last_in > now ? st->t_last_in : now;
	if (t - now > horizon)
		reason = SNAS_DROP_PACING_HORIZON;
	else
		st->t_last_in = t + delay;
	bpf_spin_unlock(&st->lock);
	return reason;
}

#endif
