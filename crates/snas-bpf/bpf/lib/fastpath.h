/* SPDX-License-Identifier: Apache-2.0 */
/* fastpath.h - maps and constants of the egress proxy's in-kernel fast path
 * (proxy_fastpath.bpf.c; Rust side: snas_bpf::fastpath, docs/proxy.md "Fast path").
 *
 * Userspace (the tier-2 engine) owns every entry: it installs a flow once it is established
 * and its first client payload went through userspace, and removes it when the flow leaves
 * that state (FIN/RST seen, expiry, job end) — before the flow's NAT port can be reused. The
 * programs only read entries, count into them, and run the pacing clocks.
 *
 * Each field of a clock has one writer: userspace creates a clock and sets its rate (a new
 * rate rewrites the whole value); from then on only the programs move its time, and they
 * charge every packet of a fast flow they see — the ones they send and the ones they hand to
 * the userspace pacer — so the clock follows the pacer's without userspace writing it (a
 * read-modify-write from userspace lost the programs' charges and binds in between, and cost
 * four system calls per batch). What the pacer still holds is userspace's to say, in its own
 * map (snas_fp_holds).
 *
 * Layouts are explicit (every padding byte is a named field): the Rust side writes the
 * generated types byte for byte. */
#ifndef SNAS_FASTPATH_H
#define SNAS_FASTPATH_H

#include "common.h"

/* One load of a field the other CPU may be changing (the compiler neither repeats nor tears it). */
#define FP_READ_ONCE(x) (*(volatile __typeof__(x) *)&(x))

/* Forward key: what a decapsulated packet from a node carries (inner IPv4 + the option's job). */
struct fp_fwd_key {
	__u64 job_key;
	__u32 saddr;		/* sandbox, network order */
	__u32 daddr;		/* remote, network order */
	__u16 sport;		/* network order */
	__u16 dport;		/* network order */
	__u8 proto;		/* IPPROTO_TCP / IPPROTO_UDP */
	__u8 _pad[7];
};

/* Reply key: what a packet from the internet to an egress address carries. */
struct fp_rev_key {
	__u32 remote_addr;	/* network order */
	__u32 egress_addr;	/* network order */
	__u16 remote_port;	/* network order */
	__u16 egress_port;	/* network order */
	__u8 proto;
	__u8 _pad[3];
};

/* Counters one direction of a fast flow accumulated since it was installed. */
struct fp_counts {
	__u64 packets;		/* a GSO super-packet counts once */
	__u64 bytes;		/* wire bytes: the segments' IP lengths */
	__u64 last_seen_ns;	/* bpf_ktime_get_ns of the last packet, 0: none */
};

/* Both directions share one value layout (the forward map's and the reverse map's entries
 * of a flow are written together). */
struct fp_flow {
	__u64 job_key;
	__u32 tenant_id;	/* host order: compared with the option's */
	__u32 serial;		/* host order: the option's serial must be this */
	__u32 node_addr;	/* the job's node, network order */
	__u32 sandbox_addr;	/* network order */
	__u32 egress_addr;	/* network order */
	__u16 sandbox_port;	/* network order */
	__u16 egress_port;	/* network order */
	__u64 expires_ns;	/* bpf_ktime_get_ns after which the policy has expired */
	struct fp_counts counts;
};

/* A pacing clock: a job's or a tenant's, one direction. */
#define FP_CLOCK_JOB 0
#define FP_CLOCK_TENANT 1
#define FP_DIR_EGRESS 0
#define FP_DIR_INGRESS 1

struct fp_clock_key {
	__u64 id;		/* job key or tenant id */
	__u8 kind;		/* FP_CLOCK_* */
	__u8 dir;		/* FP_DIR_* */
	__u8 _pad[6];
};

/* How a clock's rate is to be read (the pacer's PaceRate). */
#define FP_RATE_LIMITED 0
#define FP_RATE_UNLIMITED 1
#define FP_RATE_BLOCKED 2

struct fp_clock {
	/* Earliest departure of the next packet (start-time EDT), charged by the programs alone
	 * (fp_clock_charge, atomic). */
	__u64 next_ns;
	__u64 rate_bps;		/* bits per second when FP_RATE_LIMITED (never 0 then) */
	/* Hand-off hold (fp_clock_hold): a packet just diverted to the pacer has not reached it
	 * yet; until then none of its job's may leave fast, or it would overtake that one (TCP
	 * takes reordering for loss: measured, an upload under a 20 Mbit/s limit fell to
	 * 2 Mbit/s). What the pacer holds after that is in snas_fp_holds. */
	__u64 slow_until_ns;
	__u32 mode;		/* FP_RATE_* */
	__u32 _pad;
	/* Until then the owner's packets all take the userspace path: its rate bound (a packet
	 * found the clock beyond the slack) and has kept binding (packets found it ahead of now)
	 * within the last cfg_fp_bound_hold_ns. A limit that binds is enforced by one pacer, the
	 * exact one, and never by two at once: a job whose packets alternated between the fast
	 * path (which can only hand a packet over) and the pacer (which delays it) got line-rate
	 * bursts of the slack's worth, unseen by the pacer, each time the pacer's queue emptied,
	 * and fast packets could overtake ones on their way to it. (It did not bring a 1 Gbit/s
	 * limit within 3%: docs/benchmarks.md, "A limit that binds on the fast path".) */
	__u64 bound_until_ns;
};

/* Statistics (per-CPU array slots). */
#define FP_ST_FAST_FROM_NODE_PKTS 0
#define FP_ST_FAST_FROM_NODE_BYTES 1
#define FP_ST_FAST_TO_NODE_PKTS 2
#define FP_ST_FAST_TO_NODE_BYTES 3
/* Diverts to userspace, by reason (packets the fast path looked at and left alone). */
#define FP_ST_DIVERT_NO_ENTRY 4		/* no fast entry for the flow */
#define FP_ST_DIVERT_FLAGS 5		/* SYN, FIN or RST: conntrack state stays in userspace */
#define FP_ST_DIVERT_SERIAL 6		/* the option's tenant or serial is not the entry's */
#define FP_ST_DIVERT_PACED 7		/* a job or tenant clock is ahead: the pacer decides */
#define FP_ST_DIVERT_ROUTE 8		/* no route or neighbour yet, TTL, MTU */
#define FP_ST_DIVERT_OTHER 9		/* IPv6, IP options, fragments, not TCP/UDP, expired */
#define FP_ST_FAILED 10			/* rewrite failed after the decision: dropped */
#define FP_ST_LAST_REDIRECT 11		/* ifindex of the last redirect (tests) */
#define FP_ST_COUNT 12

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fp_fwd_key);
	__type(value, struct fp_flow);
} snas_fp_fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fp_rev_key);
	__type(value, struct fp_flow);
} snas_fp_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fp_clock_key);
	__type(value, struct fp_clock);
} snas_fp_clocks SEC(".maps");

/* Written by userspace alone (blind updates, no read-modify-write): the latest departure
 * (bpf_ktime_get_ns) of a packet of the key's owner that the userspace pacer holds. Until then
 * no packet of the owner leaves fast, or it would overtake that one. Removed with the clock. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct fp_clock_key);
	__type(value, __u64);
} snas_fp_holds SEC(".maps");

/* Trusted nodes (network order address -> 1). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} snas_fp_nodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FP_ST_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} snas_fp_stats SEC(".maps");

/* This proxy's underlay address (network order): outer destination from nodes, outer source
 * toward them. */
const volatile __u32 cfg_fp_proxy_ip = 0;
/* Underlay MTU: an encapsulated packet (or each segment of a super-packet) must fit. */
const volatile __u32 cfg_fp_underlay_mtu = 1500;
/* A packet is fast while its clocks are at most this far ahead of now. */
const volatile __u64 cfg_fp_slack_ns = 1000000ULL;
/* How long a clock that bound keeps its owner on the userspace path after the last packet
 * that found it ahead of now (hysteresis, struct fp_clock.bound_until_ns). */
const volatile __u64 cfg_fp_bound_hold_ns = 1000000000ULL;
/* Tests only (BPF_PROG_TEST_RUN has no routes): when set, redirect here instead of the FIB's
 * choice, with the MACs left as they are. */
const volatile __u32 cfg_fp_test_ifindex = 0;

static __always_inline void fp_stat(__u32 slot, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&snas_fp_stats, &slot);

	if (v)
		*v += n;
}

static __always_inline void fp_count(struct fp_counts *c, __u64 bytes, __u64 now)
{
	__sync_fetch_and_add(&c->packets, 1);
	__sync_fetch_and_add(&c->bytes, bytes);
	c->last_seen_ns = now;
}

/* Whether a clock lets a packet go now: not bound (see fp_clock_bind), at most
 * cfg_fp_slack_ns ahead, and nothing of its owner still on its way to or waiting in the
 * userspace pacer (hold: the snas_fp_holds entry, 0 when none). */
static __always_inline int fp_clock_ok(const struct fp_clock *c, __u64 hold, __u64 now)
{
	if (!c || c->mode == FP_RATE_BLOCKED)
		return 0;
	if (c->slow_until_ns > now || hold > now || c->bound_until_ns > now)
		return 0;
	if (c->mode == FP_RATE_UNLIMITED)
		return 1;
	return FP_READ_ONCE(c->next_ns) <= now + cfg_fp_slack_ns;
}

/* Hysteresis of a limited clock, at each packet that meets it: the clock binds when a packet
 * finds it beyond the slack, and stays bound while packets find it ahead of now at all (the
 * pacer, which the userspace path's packets charge it for, is delaying them) and for
 * cfg_fp_bound_hold_ns after. While bound, every packet of the owner takes the userspace
 * path, so the pacer alone meets the limit: no packet leaves fast between paced ones. */
static __always_inline void fp_clock_bind(struct fp_clock *c, __u64 now)
{
	if (!c || c->mode != FP_RATE_LIMITED)
		return;
	__u64 next = FP_READ_ONCE(c->next_ns);

	if (next > now + cfg_fp_slack_ns || (c->bound_until_ns > now && next > now))
		c->bound_until_ns = now + cfg_fp_bound_hold_ns;
}

/* A packet diverted because a clock is ahead reaches the userspace pacer some microseconds
 * later; until that pacer has stamped it (and said when it leaves, slow_until_ns) no packet of
 * the job may leave fast, or it would overtake it. */
#define FP_HANDOFF_NS 2000000ULL

static __always_inline void fp_clock_hold(struct fp_clock *c, __u64 now)
{
	if (c && c->slow_until_ns < now + FP_HANDOFF_NS)
		c->slow_until_ns = now + FP_HANDOFF_NS;
}

/* The userspace pacer's horizon for a rate: the slack (the daemon passes the pacing horizon),
 * but never less than one 64 KiB super-packet takes at the rate (pacer.rs, BURST_BYTES). */
#define FP_BURST_BYTES 65536ULL

/* Start-time EDT, as the userspace pacer: next = max(now, next) + bytes * 8 / rate, with a
 * compare-and-swap so that the two CPUs' charges all count. Every packet of a fast flow is
 * charged, whichever way it goes (`diverted`: to the pacer), so the clock runs as the pacer's
 * does; a diverted packet whose start lies beyond the pacer's horizon is one the pacer drops
 * without moving its clocks, and moves none here either. A few lost races in a row leave one
 * packet uncharged rather than loop. */
static __always_inline void fp_clock_charge(struct fp_clock *c, __u64 bytes, __u64 now,
					    int diverted)
{
	__u64 old, start, cost, horizon, burst;
	int i;

	if (!c || c->mode != FP_RATE_LIMITED || !c->rate_bps)
		return;
	cost = bytes * 8ULL * NSEC_PER_SEC / c->rate_bps;
	horizon = cfg_fp_slack_ns;
	burst = FP_BURST_BYTES * 8ULL * NSEC_PER_SEC / c->rate_bps;
	if (burst > horizon)
		horizon = burst;
	for (i = 0; i < 4; i++) {
		old = FP_READ_ONCE(c->next_ns);
		start = old > now ? old : now;
		if (diverted && start - now > horizon)
			return;
		if (__sync_val_compare_and_swap(&c->next_ns, old, start + cost) == old)
			return;
	}
}

#endif
