/* SPDX-License-Identifier: Apache-2.0 */
/* parse.h - bounds-checked header parsing for frames leaving a sandbox.
 *
 * Owns: the packet summary (struct pkt) and the checks that need nothing but the bytes:
 * IPv4 version/IHL/lengths, options, fragments, L4 header presence. Policy (who may send
 * what) is elsewhere. Offsets are relative to skb->data; data/data_end are re-read by callers
 * after any helper that may move the packet. */
#ifndef SNAS_PARSE_H
#define SNAS_PARSE_H

#include "common.h"

struct pkt {
	__u32 saddr;		/* IPv4, network order */
	__u32 daddr;
	__u16 sport;		/* host order */
	__u16 dport;
	__u8 proto;
	__u8 tcp_flags;		/* byte 13 of the TCP header */
	__u16 l3_len;		/* IPv4 total length / IPv6 40 + payload length */
	__u32 tcp_seq;		/* host order */
	__u32 tcp_ack;		/* host order */
	__u16 l4_payload;	/* TCP payload length (for the RST's ACK) */
	__u8 family;		/* 4 or 6 */
	__u8 icmp_type;		/* ICMPv6 type */
	__u8 saddr6[16];	/* IPv6 */
	__u8 daddr6[16];
};

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

#define L3_OFF ((int)sizeof(struct ethhdr))
#define L4_OFF (L3_OFF + (int)sizeof(struct iphdr))
#define L4_OFF6 (L3_OFF + (int)sizeof(struct ipv6hdr))

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif

/* Parses an IPv4 packet without options behind the Ethernet header. Returns 0 or a drop
 * reason. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + L3_OFF;

	if ((void *)(ip + 1) > data_end)
		return SNAS_DROP_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return SNAS_DROP_MALFORMED;
	if (ip->ihl > 5)
		return SNAS_DROP_IP_OPTIONS;
	p->l3_len = bpf_ntohs(ip->tot_len);
	if (p->l3_len < sizeof(*ip) || p->l3_len > skb->len - L3_OFF)
		return SNAS_DROP_MALFORMED;
	/* MF set or a non-zero offset: first and later fragments alike. */
	if (ip->frag_off & bpf_htons(0x3fff))
		return SNAS_DROP_FRAGMENT;
	p->family = 4;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;

	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = data + L4_OFF;
		__u32 doff;

		if ((void *)(th + 1) > data_end)
			return SNAS_DROP_MALFORMED;
		doff = th->doff * 4;
		if (doff < sizeof(*th) || doff > p->l3_len - sizeof(*ip))
			return SNAS_DROP_MALFORMED;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		p->tcp_flags = ((__u8 *)th)[13];
		p->tcp_seq = bpf_ntohl(th->seq);
		p->tcp_ack = bpf_ntohl(th->ack_seq);
		p->l4_payload = p->l3_len - sizeof(*ip) - doff;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = data + L4_OFF;

		if ((void *)(uh + 1) > data_end)
			return SNAS_DROP_MALFORMED;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
	}
	return 0;
}

/* Parses an IPv6 packet with TCP, UDP or ICMPv6 directly behind the fixed header. Any
 * extension header is refused (IP_OPTIONS; the fragment header: FRAGMENT), so that no
 * transport header can hide behind a chain. Returns 0 or a drop reason. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + L3_OFF;
	__u8 nh;

	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return SNAS_DROP_MALFORMED;
	p->l3_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	if (p->l3_len > skb->len - L3_OFF)
		return SNAS_DROP_MALFORMED;
	p->family = 6;
	__builtin_memcpy(p->saddr6, &ip6->saddr, 16);
	__builtin_memcpy(p->daddr6, &ip6->daddr, 16);
	nh = ip6->nexthdr;
	p->proto = nh;
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;

	switch (nh) {
	case IPPROTO_TCP: {
		struct tcphdr *th = data + L4_OFF6;
		__u32 doff;

		if ((void *)(th + 1) > data_end)
			return SNAS_DROP_MALFORMED;
		doff = th->doff * 4;
		if (doff < sizeof(*th) || doff > p->l3_len - sizeof(*ip6))
			return SNAS_DROP_MALFORMED;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		p->tcp_flags = ((__u8 *)th)[13];
		p->tcp_seq = bpf_ntohl(th->seq);
		p->tcp_ack = bpf_ntohl(th->ack_seq);
		p->l4_payload = p->l3_len - sizeof(*ip6) - doff;
		return 0;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = data + L4_OFF6;

		if ((void *)(uh + 1) > data_end)
			return SNAS_DROP_MALFORMED;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		return 0;
	}
	case IPPROTO_ICMPV6: {
		__u8 *t = data + L4_OFF6;

		if ((void *)(t + 4) > data_end)
			return SNAS_DROP_MALFORMED;
		p->icmp_type = t[0];
		return 0;
	}
	case 44:		/* fragment header */
		return SNAS_DROP_FRAGMENT;
	case 0:			/* hop-by-hop */
	case 43:		/* routing */
	case 50:		/* ESP */
	case 51:		/* AH */
	case 60:		/* destination options */
	case 135:		/* mobility */
	case 139:		/* HIP */
	case 140:		/* shim6 */
	case 253:
	case 254:
		return SNAS_DROP_IP_OPTIONS;
	default:
		return 0;
	}
}

#endif
