/* SPDX-License-Identifier: Apache-2.0 */
/* geneve.h - the SNAS overlay header (shared contract, docs/tier1.md "Overlay bytes").
 *
 * Outer IPv4 (20 B, DF, TTL 64, UDP) + UDP (8 B, sport 0xC000 | (flow_hash & 0x3FFF),
 * dport 6081, checksum 0) + GENEVE (8 B: ver 0, opt_len 5 words, O=0, C=1, protocol 0x0800,
 * VNI 0) + one option (class 0xFF53, type 0x81, length 4 words: tenant u32, job key u64,
 * policy serial u32, all big-endian). 56 bytes in all; no inner Ethernet. */
#ifndef SNAS_GENEVE_H
#define SNAS_GENEVE_H

/* SNAS_GENEVE_WIRE_ONLY: the header layout alone, without tier 1's maps and encapsulation
 * (the proxy's fast path, which has maps of its own). */
#ifndef SNAS_GENEVE_WIRE_ONLY
#include "maps.h"
#endif
#include "csum.h"

#define GENEVE_OVERHEAD 56
#define GENEVE_OPT_CLASS 0xFF53
#define GENEVE_OPT_TYPE 0x81
#define GENEVE_HDR_LEN 28	/* GENEVE base + option: the "L2" of the encapsulation */

struct geneve_opt_hdr {
	__u8 ver_optlen;	/* version << 6 | opt_len (4-byte words) */
	__u8 flags;		/* O << 7 | C << 6 */
	__be16 proto;
	__u8 vni[3];
	__u8 rsvd;
	__be16 opt_class;
	__u8 opt_type;
	__u8 opt_len;		/* reserved << 5 | length (4-byte words) */
	__be32 tenant;
	__be32 job_hi;
	__be32 job_lo;
	__be32 serial;
};

struct geneve_outer {
	struct iphdr ip;
	struct udphdr udp;
	struct geneve_opt_hdr gnv;
};

_Static_assert(sizeof(struct geneve_opt_hdr) == GENEVE_HDR_LEN, "GENEVE + option is 28 bytes");
_Static_assert(sizeof(struct geneve_outer) == GENEVE_OVERHEAD, "overlay is 56 bytes");

#ifndef SNAS_GENEVE_WIRE_ONLY
/* Grows the frame by 56 bytes behind the Ethernet header and writes the outer headers.
 * inner_len = length of the inner packet as carried (skb->len - ETH_HLEN); inner_proto =
 * ETH_P_IP or ETH_P_IPV6 (the GENEVE protocol type). */
static __always_inline int geneve_encap(struct __sk_buff *skb, const struct job_cfg *cfg,
					__u32 proxy_ip, __u32 hash, __u32 inner_len, __u16 inner_proto)
{
	struct geneve_outer o = {};
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2(GENEVE_HDR_LEN);

	o.ip.version = 4;
	o.ip.ihl = 5;
	o.ip.tot_len = bpf_htons(inner_len + GENEVE_OVERHEAD);
	o.ip.frag_off = bpf_htons(0x4000);
	o.ip.ttl = 64;
	o.ip.protocol = IPPROTO_UDP;
	o.ip.saddr = cfg_node_ip;
	o.ip.daddr = proxy_ip;
	o.ip.check = ipv4_csum(&o.ip);
	o.udp.source = bpf_htons(0xC000 | (hash & 0x3FFF));
	o.udp.dest = bpf_htons(cfg_geneve_port);
	o.udp.len = bpf_htons(inner_len + GENEVE_OVERHEAD - sizeof(struct iphdr));
	o.udp.check = 0;
	o.gnv.ver_optlen = 5;
	o.gnv.flags = 0x40;
	o.gnv.proto = bpf_htons(inner_proto);
	o.gnv.opt_class = bpf_htons(GENEVE_OPT_CLASS);
	o.gnv.opt_type = GENEVE_OPT_TYPE;
	o.gnv.opt_len = 4;
	o.gnv.tenant = bpf_htonl(cfg->tenant_id);
	o.gnv.job_hi = bpf_htonl(cfg->job_key >> 32);
	o.gnv.job_lo = bpf_htonl((__u32)cfg->job_key);
	o.gnv.serial = bpf_htonl(cfg->policy_serial);

	if (bpf_skb_adjust_room(skb, GENEVE_OVERHEAD, BPF_ADJ_ROOM_MAC, flags))
		return SNAS_DROP_ENCAP_FAILED;
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &o, sizeof(o), 0))
		return SNAS_DROP_ENCAP_FAILED;
	if (inner_proto != ETH_P_IP) {
		/* adjust_room switched skb->protocol to the outer IPv4; the frame must say so. */
		__be16 outer = bpf_htons(ETH_P_IP);

		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &outer,
					sizeof(outer), 0))
			return SNAS_DROP_ENCAP_FAILED;
	}
	return 0;
}
#endif

#endif
