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

/* One start-time EDT clock of a job (*t_last, a field of st, guarded by st->lock): the packet
 * starts at *start = max(now, *t_last); if that is more than `horizon` ahead it is refused
 * (SNAS_DROP_PACING_HORIZON) and the clock does not move; otherwise the clock moves on by the
 * packet's transmission time at `bps`. */
static __always_inline int edt_clock(struct job_state *st, __u64 *t_last, __u64 bps,
				     __u64 horizon, __u32 len, __u64 now, __u64 *start)
{
	__u64 delay = (__u64)len * 8 * NSEC_PER_SEC / bps;
	int reason = 0;
	__u64 t;

	bpf_spin_lock(&st->lock);
	t = *t_last > now ? *t_last : now;
	if (t - now > horizon)
		reason = SNAS_DROP_PACING_HORIZON;
	else
		*t_last = t + delay;
	bpf_spin_unlock(&st->lock);
	*start = t;
	return reason;
}

static __always_inline __u64 job_horizon(const struct job_cfg *cfg)
{
	return cfg->horizon_ns ? cfg->horizon_ns : cfg_horizon_ns;
}

/* Returns 0 and sets *tstamp (0 = do not stamp) or a drop reason. */
static __always_inline int edt_stamp(struct job_state *st, const struct job_cfg *cfg, __u32 len,
				     __u64 now, __u64 *tstamp)
{
	__u64 start;
	int reason;

	*tstamp = 0;
	if (!cfg->egress_bps)
		return 0;
	reason = edt_clock(st, &st->t_last, cfg->egress_bps, job_horizon(cfg), len, now, &start);
	if (!reason)
		*tstamp = start;
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
	__u64 horizon = job_horizon(cfg);
	__u64 burst, start;

	if (!bps)
		return 0;
	/* A split 64 KiB super-packet arrives at once: never refuse one whole burst. */
	burst = 65536ULL * 8 * NSEC_PER_SEC / bps;
	if (horizon < burst)
		horizon = burst;
	return edt_clock(st, &st->t_last_in, bps, horizon, len, now, &start);
}

#endif
