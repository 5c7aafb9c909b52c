/* SPDX-License-Identifier: Apache-2.0 */
/* maps.h - every map and map value type of tier 1. Both entry objects include this file so
 * that their map definitions are identical; the loader pins each map under the node's pin
 * directory and the second object reuses the pins (see docs/tier1.md "Pinning").
 *
 * Invariants:
 * - Structs have explicit padding only (no implicit holes), so the Rust types generated from
 *   BTF by libbpf-cargo can be written as bytes.
 * - Every map has bounded size with eviction (LRU) or is cleaned by the agent on detach_job.
 * - Addresses are stored in network byte order, ports in host byte order. */
#ifndef SNAS_MAPS_H
#define SNAS_MAPS_H

#include "common.h"

#define MAX_JOBS 4096
#define MAX_PROXIES 64
/* Maglev table size: a prime, small enough that a rebuild is one map update. */
#define MAGLEV_M 4099
/* Port rules one destination entry holds: the union of every allowed name's rules for a
 * DNS-learned address (Tier1::allow_ip merges them). */
#define MAX_PORT_RULES 16
/* Infrastructure prefixes (node-wide, every job): IPv4 and IPv6. */
#define MAX_INFRA 16384
#define MAX_INFRA6 4096

/* The policy has IPv6 rules: IPv6 from sandbox_ip6 goes through the IPv6 maps. Without it
 * every IPv6 frame is dropped as IPV6_DENIED. */
#define JOB_F_IPV6_RULES 1
/* Set by userspace when the program is attached to the veth (not read by BPF). */
#define JOB_F_ATTACHED 2
/* The policy's mode is "audit": a destination denied only because no rule allows it
 * (destination_denied, port_denied) passes, audited AUDIT_WOULD_DENY once per new flow;
 * infrastructure, always-denied ranges and deny rules stay denied. */
#define JOB_F_AUDIT 4

/* Per-job configuration, keyed by the host-side veth ifindex (u32). */
struct job_cfg {
	__u64 job_key;
	__u32 tenant_id;
	__u32 policy_serial;
	__u32 sandbox_ip;	/* network order */
	__u32 gateway_ip;	/* network order; the DNS stub listens here */
	__u8 sandbox_mac[6];
	__u8 host_mac[6];	/* host side of the veth: source MAC of decapsulated frames */
	__u16 dns_port;		/* DNS stub port, host order */
	__u16 flags;		/* JOB_F_* */
	__u32 ifindex;		/* host-side veth */
	__u64 egress_bps;	/* bits per second; 0 = no EDT stamping */
	__u64 horizon_ns;	/* 0 = node default */
	__u64 conn_rate;	/* new connections per second; 0 = no rate limit */
	__u64 conn_burst;
	__u32 max_connections;	/* 0 = no limit */
	__u32 _pad0;
	__u8 sandbox_ip6[16];	/* meaningful only with JOB_F_IPV6_RULES */
	__u64 ingress_bps;	/* bits per second toward the sandbox; 0 = not policed here */
	__u64 expires_ns;	/* policy expiry, bpf_ktime_get_ns domain; 0 = none */
	__u32 dns_rate;		/* DNS packets per second to the stub; 0 = not limited here */
	__u32 dns_burst;
};

/* Mutable per-job state, keyed by the host-side veth ifindex. Written only by BPF once
 * userspace has created it (configure_job), so that no userspace write can clobber clocks and
 * buckets BPF moved in between. */
struct job_state {
	struct bpf_spin_lock lock;
	__u32 _pad0;
	__u64 t_last;		/* EDT: departure time of the last stamped packet (mono ns) */
	__u64 conn_tokens;	/* new-connection bucket, in 1e-9 tokens */
	__u64 conn_ts;
	__u64 audit_tokens;	/* audit bucket, in 1e-9 events */
	__u64 audit_ts;
	__u64 audit_suppressed;
	__u64 t_last_in;	/* ingress policer: when the sandbox may next receive (mono ns) */
	__u64 icmp_tokens;	/* ICMP/ICMPv6 unreachable bucket, in 1e-9 messages */
	__u64 icmp_ts;
	__u64 icmp_suppressed;	/* denied UDP left unanswered by the ICMP bucket */
	__u64 dns_tokens;	/* DNS packet bucket, in 1e-9 packets */
	__u64 dns_ts;
};

/* A job's open connections as BPF counts them (conntrack.h): +1 on admission, -1 on the one
 * transition of a flow to closed. Keyed by veth ifindex; written only by BPF after creation.
 * The ageing pass corrects drift through snas_job_conns_bias instead of writing this. */
struct job_conns {
	struct bpf_spin_lock lock;
	__u32 _pad0;
	__s64 open;
};

/* (proto, port range) allowed on a destination until expires_s. proto 0 = TCP or UDP. */
struct port_rule {
	__u8 proto;
	__u8 _pad0;
	__u16 lo;
	__u16 hi;
	__u16 _pad1;
	__u32 expires_s;	/* whole seconds of bpf_ktime_get_ns, rounded up; 0 = no expiry */
};

#define DST_F_ALLOW_PRIVATE 1

struct dst_val {
	__u32 nrules;
	__u32 flags;		/* DST_F_* */
	struct port_rule rules[MAX_PORT_RULES];
};

struct dst_key {
	__u64 job_key;
	__u32 ip;		/* network order */
	__u32 _pad0;
};

struct dst6_key {
	__u64 job_key;
	__u8 ip[16];
};

/* LPM key: 64 bits of job key (always fully matched) then the IPv6 prefix. */
struct cidr6_key {
	__u32 prefixlen;	/* 64 + IPv6 prefix length */
	__u32 job_hi;		/* big-endian */
	__u32 job_lo;
	__u8 ip[16];
};

/* LPM key: 64 bits of job key (always fully matched) then the IPv4 prefix. */
struct cidr_key {
	__u32 prefixlen;	/* 64 + IPv4 prefix length */
	__u32 job_hi;		/* job_key >> 32, big-endian */
	__u32 job_lo;		/* job_key & 0xffffffff, big-endian */
	__u32 ip;		/* network order */
};

struct proxy {
	__u32 ip;		/* network order */
	__u32 flags;		/* PROXY_F_* */
};
#define PROXY_F_ALIVE 1

struct maglev_table {
	__u32 generation;
	__u32 _pad0;
	__u16 slot[MAGLEV_M];	/* proxy index; 0xffff = empty */
	__u16 _pad1;
};

struct flow_key {
	__u32 ifindex;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 _pad0[3];
};

/* Flow state bits (flow_val.flags), set with atomic fetch-or (conntrack.h). */
#define FLOW_F_REPLIED 1	/* a packet came back through the uplink */
#define FLOW_F_FIN_OUT 2	/* the sandbox sent a FIN */
#define FLOW_F_FIN_IN 4		/* the far side sent a FIN */
#define FLOW_F_RST 8		/* a RST either way */
#define FLOW_F_CLOSED 16	/* FIN both ways or a RST: the job's slot was given back */

struct flow_val {
	__u64 last_seen;	/* mono ns of the last packet (replies: at most 1 s stale) */
	__u64 admitted;		/* mono ns, taken after the connection was counted */
	__u32 proxy;
	__u32 flags;		/* FLOW_F_* */
};

struct flow6_key {
	__u32 ifindex;
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 _pad0[3];
};

/* Counter key: (job, direction, reason). Reason 0 = forwarded. */
struct counter_key {
	__u64 job_key;
	__u32 dir;		/* 0 = from the sandbox, 1 = to the sandbox */
	__u32 reason;
};

struct counter_val {
	__u64 packets;
	__u64 bytes;
};

#define AUDIT_DENY 1
#define AUDIT_NEW_FLOW 2
#define AUDIT_WOULD_DENY 3	/* audit mode: `reason` is why it would have been denied */
/* Deny CIDR prefixes per job (MAX_DENY / MAX_DENY6 entries node-wide). */
#define MAX_DENY 16384
#define MAX_DENY6 4096

struct audit_event {
	__u64 ts_ns;
	__u64 job_key;
	__u32 kind;		/* AUDIT_* */
	__u32 reason;
	__u8 saddr[16];		/* IPv4: first 4 bytes */
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;		/* 4 or 6 */
	__u8 _pad0[2];
};

struct debug_rec {
	__u32 redirect_ifindex;
	__u32 redirect_kind;	/* 1 = redirect, 2 = redirect_neigh, 3 = redirect_peer */
	__u32 proxy;
	__u32 flow_hash;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_JOBS);
	__type(key, __u32);
	__type(value, struct job_cfg);
} snas_jobs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_JOBS);
	__type(key, __u32);
	__type(value, struct job_state);
} snas_job_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_JOBS);
	__type(key, __u32);
	__type(value, struct job_conns);
} snas_job_conns SEC(".maps");

/* veth ifindex -> the ageing pass's correction: a job's open connections are
 * job_conns.open - bias. Written only by userspace (Tier1::age_flows). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_JOBS);
	__type(key, __u32);
	__type(value, __s64);
} snas_job_conns_bias SEC(".maps");

/* job_key -> host-side veth ifindex (uplink side attribution). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_JOBS);
	__type(key, __u64);
	__type(value, __u32);
} snas_job_by_key SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct dst_key);
	__type(value, struct dst_val);
} snas_dst_exact SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_key);
	__type(value, struct dst_val);
} snas_dst_cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, struct dst6_key);
	__type(value, struct dst_val);
} snas_dst6_exact SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr6_key);
	__type(value, struct dst_val);
} snas_dst6_cidr SEC(".maps");

/* A job's deny CIDR rules (`[[deny]]`), checked before any allow entry: a match on the port and
 * protocol drops as deny_rule. An LPM lookup finds only the longest prefix, so userspace
 * writes into every entry the port rules of the job's deny prefixes that contain it
 * (Tier1::set_deny); no expiry. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_DENY);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_key);
	__type(value, struct dst_val);
} snas_deny_cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_DENY6);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr6_key);
	__type(value, struct dst_val);
} snas_deny6_cidr SEC(".maps");

/* Node-wide infrastructure prefixes: denied for every job whatever its rules say. */
struct infra_key {
	__u32 prefixlen;
	__u32 ip;		/* network order */
};

struct infra6_key {
	__u32 prefixlen;
	__u8 ip[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_INFRA);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct infra_key);
	__type(value, __u32);
} snas_infra SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MAX_INFRA6);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct infra6_key);
	__type(value, __u32);
} snas_infra6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PROXIES);
	__type(key, __u32);
	__type(value, struct proxy);
} snas_proxies SEC(".maps");

/* proxy underlay IP (network order) -> proxy index; for the uplink source check. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROXIES);
	__type(key, __u32);
	__type(value, __u32);
} snas_proxy_by_ip SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct maglev_table);
} snas_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} snas_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 32768);
	__type(key, struct flow6_key);
	__type(value, struct flow_val);
} snas_flows6 SEC(".maps");

/* Removed by the agent on detach_job (keys carry the job key). Not preallocated: only the
 * (job, direction, reason) triples that occur take memory. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct counter_key);
	__type(value, struct counter_val);
} snas_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} snas_audit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct debug_rec);
} snas_debug SEC(".maps");

/* DNS capture: the original destination of a query the sandbox sent to another resolver,
 * so that the stub's answer can be given that resolver's address again (sandbox_egress). */
struct dns_nat_key {
	__u32 ifindex;
	__u16 sport;		/* sandbox source port, host order */
	__u8 proto;
	__u8 _pad0;
};

struct dns_nat_val {
	__u32 orig_daddr;	/* network order */
	__u16 orig_dport;	/* host order */
	__u16 _pad0;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct dns_nat_key);
	__type(value, struct dns_nat_val);
} snas_dns_nat SEC(".maps");

/* Node facts for userspace (the loader writes them; no program reads them): lets a restarted
 * agent find what to detach (snas_bpf::Tier1::open_pinned). */
struct node_info {
	__u32 uplink_ifindex;
	__u32 node_ip;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_info);
} snas_node SEC(".maps");

/* Keep the event type in BTF so that the skeleton generates it for userspace. */
struct audit_event _snas_audit_event_btf = {};

static __always_inline void count(__u64 job_key, __u32 dir, __u32 reason, __u32 len)
{
	struct counter_key k = { .job_key = job_key, .dir = dir, .reason = reason };
	struct counter_val *v = bpf_map_lookup_elem(&snas_counters, &k);

	if (!v) {
		struct counter_val zero = {};

		bpf_map_update_elem(&snas_counters, &k, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&snas_counters, &k);
		if (!v)
			return;
	}
	v->packets += 1;
	v->bytes += len;
}

static __always_inline void debug_redirect(__u32 ifindex, __u32 kind, __u32 proxy, __u32 hash)
{
	__u32 zero = 0;
	struct debug_rec *d;

	if (!cfg_record_debug)
		return;
	d = bpf_map_lookup_elem(&snas_debug, &zero);
	if (!d)
		return;
	d->redirect_ifindex = ifindex;
	d->redirect_kind = kind;
	d->proxy = proxy;
	d->flow_hash = hash;
}

#endif
