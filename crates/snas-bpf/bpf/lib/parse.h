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
	__u32 saddr;		/* network order */
	__u32 daddr;
	__u16 sport;		/* host order */
	__u16 dport;
	__u8 proto;
	__u8 tcp_flags;		/* byte 13 of the TCP header */
	__u16 l3_len;		/* IPv4 total length */
	__u32 tcp_seq;		/* host order */
	__u16 l4_payload;	/* TCP payload length (for the RST's ACK) */
	__u16 _pad;
};

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

#define L3_OFF ((int)sizeof(struct ethhdr))
#define L4_OFF (L3_OFF + (int)sizeof(struct iphdr))

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

#endif
