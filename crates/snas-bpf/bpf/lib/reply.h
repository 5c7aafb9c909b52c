/* SPDX-License-Identifier: Apache-2.0 */
/* reply.h - answers tier 1 sends back into the sandbox instead of a silent drop, so that the
 * application fails at once instead of waiting for a timeout.
 *
 * Owns: the TCP RST of RFC 793 "Reset Generation" for a refused segment, and ICMP
 * destination unreachable (IPv4: type 3; IPv6: ICMPv6 type 1) for refused UDP. Each answer
 * replaces the frame in place (bpf_skb_change_tail, one store of the new headers) with the
 * MACs, addresses and ports swapped, so its source is the packet's destination (a connected
 * socket matches it), and leaves through the host veth's egress, i.e. into the sandbox.
 *
 * Limits: ICMP messages are rate limited per job (cfg_icmp_rate/cfg_icmp_burst, bucket in
 * job_state); beyond the bucket the packet is only dropped (it is counted under its reason
 * by the caller either way) and job_state.icmp_suppressed grows. RSTs are not limited: one per
 * refused segment, never for a RST. ICMP quotes the offending IP header and the first 8 bytes
 * of its payload (the UDP header), which is what both stacks need to find the socket. */
#ifndef SNAS_REPLY_H
#define SNAS_REPLY_H

#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "ratelimit.h"

#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define ICMP_PKT_FILTERED 13	/* communication administratively prohibited */
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_ADM_PROHIBITED 1
#define ICMPV6_PORT_UNREACH 4
#ifndef IPPROTO_ICMP
#define IPPROTO_ICMP 1
#endif

/* Bytes of the offending packet an ICMP error quotes: its IP header + 8. */
#define ICMP_QUOTE4 (20 + 8)
#define ICMP_QUOTE6 (40 + 8)

struct rst_l3 {
	struct iphdr ip;
	struct tcphdr tcp;
};

struct rst6_l3 {
	struct ipv6hdr ip6;
	struct tcphdr tcp;
};

struct icmp_err {
	__u8 type;
	__u8 code;
	__be16 check;
	__be32 unused;
};

struct icmp4_l3 {
	struct iphdr ip;
	struct icmp_err icmp;
	__u8 quote[ICMP_QUOTE4];
};

struct icmp6_l3 {
	struct ipv6hdr ip6;
	struct icmp_err icmp;
	__u8 quote[ICMP_QUOTE6];
};

_Static_assert(sizeof(struct icmp4_l3) == 56, "ICMP reply is 56 bytes of IPv4");
_Static_assert(sizeof(struct icmp6_l3) == 96, "ICMPv6 reply is 96 bytes of IPv6");

/* The frame's MACs swapped, for an answer that goes back where the frame came from. */
static __always_inline int swapped_macs(struct __sk_buff *skb, __u8 macs[2 * ETH_ALEN])
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -1;
	__builtin_memcpy(macs, eth->h_source, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, eth->h_dest, ETH_ALEN);
	return 0;
}

/* RFC 793 "Reset Generation" for a segment that has no connection: with ACK,
 * <SEQ=SEG.ACK><CTL=RST>; without, <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>, where SEG.LEN
 * counts the payload, SYN and FIN. Checksum left to the caller. */
static __always_inline void rst_for(struct tcphdr *tcp, const struct pkt *p)
{
	__u32 seg_len = p->l4_payload;

	tcp->source = bpf_htons(p->dport);
	tcp->dest = bpf_htons(p->sport);
	tcp->doff = 5;
	tcp->rst = 1;
	if (p->tcp_flags & TCPF_ACK) {
		tcp->seq = bpf_htonl(p->tcp_ack);
		return;
	}
	if (p->tcp_flags & TCPF_SYN)
		seg_len++;
	if (p->tcp_flags & TCPF_FIN)
		seg_len++;
	tcp->seq = 0;
	tcp->ack_seq = bpf_htonl(p->tcp_seq + seg_len);
	tcp->ack = 1;
}

/* Replaces the frame with `macs` + the `l3_len` bytes at `l3` and sends it back into the
 * sandbox (egress of the host veth). */
static __always_inline int send_back(struct __sk_buff *skb, const __u8 macs[2 * ETH_ALEN],
				     const void *l3, __u32 l3_len)
{
	if (bpf_skb_change_tail(skb, L3_OFF + l3_len, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, 0, macs, 2 * ETH_ALEN, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, L3_OFF, l3, l3_len, 0))
		return TC_ACT_SHOT;
	debug_redirect(skb->ifindex, 1, 0, 0);
	return bpf_redirect(skb->ifindex, 0);
}

/* Answers a refused IPv4 TCP segment with its RST (never a RST for a RST: the caller checks). */
static __always_inline int reply_rst(struct __sk_buff *skb, const struct pkt *p)
{
	struct rst_l3 f = {};
	__u8 macs[2 * ETH_ALEN];

	if (swapped_macs(skb, macs))
		return TC_ACT_SHOT;
	f.ip.version = 4;
	f.ip.ihl = 5;
	f.ip.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct tcphdr));
	f.ip.ttl = 64;
	f.ip.protocol = IPPROTO_TCP;
	f.ip.saddr = p->daddr;
	f.ip.daddr = p->saddr;
	f.ip.check = ipv4_csum(&f.ip);
	rst_for(&f.tcp, p);
	f.tcp.check = tcp_csum_nopayload(f.ip.saddr, f.ip.daddr, &f.tcp);
	return send_back(skb, macs, &f, sizeof(f));
}

/* reply_rst for IPv6: the same RST with the addresses swapped, hop limit 64. */
static __always_inline int reply_rst6(struct __sk_buff *skb, const struct pkt *p)
{
	struct rst6_l3 f = {};
	__u8 macs[2 * ETH_ALEN];

	if (swapped_macs(skb, macs))
		return TC_ACT_SHOT;
	f.ip6.version = 6;
	f.ip6.payload_len = bpf_htons(sizeof(struct tcphdr));
	f.ip6.nexthdr = IPPROTO_TCP;
	f.ip6.hop_limit = 64;
	__builtin_memcpy(&f.ip6.saddr, p->daddr6, 16);
	__builtin_memcpy(&f.ip6.daddr, p->saddr6, 16);
	rst_for(&f.tcp, p);
	f.tcp.check = tcp6_csum_nopayload(p->daddr6, p->saddr6, &f.tcp);
	return send_back(skb, macs, &f, sizeof(f));
}

/* Takes a token from the job's ICMP bucket; counts what it refuses. */
static __always_inline int icmp_allowed(struct job_state *st, __u64 now)
{
	int ok;

	bpf_spin_lock(&st->lock);
	ok = bucket_take(&st->icmp_tokens, &st->icmp_ts, cfg_icmp_rate, cfg_icmp_burst, now);
	if (!ok)
		st->icmp_suppressed++;
	bpf_spin_unlock(&st->lock);
	return ok;
}

/* The ICMP code for a refusal: port unreachable when only the port was refused, else
 * administratively prohibited. */
static __always_inline __u8 icmp_code(__u32 reason)
{
	return reason == SNAS_DROP_PORT_DENIED ? ICMP_PORT_UNREACH : ICMP_PKT_FILTERED;
}

static __always_inline __u8 icmp6_code(__u32 reason)
{
	return reason == SNAS_DROP_PORT_DENIED ? ICMPV6_PORT_UNREACH : ICMPV6_ADM_PROHIBITED;
}

/* Answers a refused IPv4 UDP datagram with ICMP destination unreachable (rate limited). */
static __always_inline int reply_icmp(struct __sk_buff *skb, struct job_state *st,
				      const struct pkt *p, __u32 reason, __u64 now)
{
	struct icmp4_l3 f = {};
	__u8 macs[2 * ETH_ALEN];

	if (!icmp_allowed(st, now))
		return TC_ACT_SHOT;
	if (swapped_macs(skb, macs))
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, L3_OFF, f.quote, sizeof(f.quote)))
		return TC_ACT_SHOT;
	f.ip.version = 4;
	f.ip.ihl = 5;
	f.ip.tos = 0xc0;	/* precedence "internetwork control", as the kernel's ICMP */
	f.ip.tot_len = bpf_htons(sizeof(f));
	f.ip.ttl = 64;
	f.ip.protocol = IPPROTO_ICMP;
	f.ip.saddr = p->daddr;
	f.ip.daddr = p->saddr;
	f.ip.check = ipv4_csum(&f.ip);
	f.icmp.type = ICMP_DEST_UNREACH;
	f.icmp.code = icmp_code(reason);
	f.icmp.check = csum_fold(csum_words((__u8 *)&f + offsetof(struct icmp4_l3, icmp),
						(sizeof(f) - sizeof(f.ip)) / 2, 0));
	return send_back(skb, macs, &f, sizeof(f));
}

/* reply_icmp for IPv6: ICMPv6 destination unreachable, checksum over the pseudo-header. */
static __always_inline int reply_icmp6(struct __sk_buff *skb, struct job_state *st,
				       const struct pkt *p, __u32 reason, __u64 now)
{
	struct icmp6_l3 f = {};
	__u8 macs[2 * ETH_ALEN];
	__u64 sum = 0;

	if (!icmp_allowed(st, now))
		return TC_ACT_SHOT;
	if (swapped_macs(skb, macs))
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, L3_OFF, f.quote, sizeof(f.quote)))
		return TC_ACT_SHOT;
	f.ip6.version = 6;
	f.ip6.payload_len = bpf_htons(sizeof(f) - sizeof(f.ip6));
	f.ip6.nexthdr = IPPROTO_ICMPV6;
	f.ip6.hop_limit = 64;
	__builtin_memcpy(&f.ip6.saddr, p->daddr6, 16);
	__builtin_memcpy(&f.ip6.daddr, p->saddr6, 16);
	f.icmp.type = ICMPV6_DEST_UNREACH;
	f.icmp.code = icmp6_code(reason);
	sum = csum_words(p->daddr6, 8, sum);
	sum = csum_words(p->saddr6, 8, sum);
	sum += bpf_htons(sizeof(f) - sizeof(f.ip6));
	sum += bpf_htons(IPPROTO_ICMPV6);
	f.icmp.check = csum_fold(csum_words((__u8 *)&f + offsetof(struct icmp6_l3, icmp),
						(sizeof(f) - sizeof(f.ip6)) / 2, sum));
	return send_back(skb, macs, &f, sizeof(f));
}

/* The answer to a refused packet: a RST for a TCP segment when `rst_any` (any segment but a
 * RST) or for a SYN without ACK otherwise; ICMP for UDP; nothing for anything else. */
static __always_inline int reply_refused(struct __sk_buff *skb, struct job_state *st,
					 const struct pkt *p, __u32 reason, __u64 now, int rst_any)
{
	if (p->proto == IPPROTO_TCP) {
		int rst = rst_any ? !(p->tcp_flags & TCPF_RST) :
				    (p->tcp_flags & (TCPF_SYN | TCPF_ACK | TCPF_RST)) == TCPF_SYN;

		if (!rst)
			return TC_ACT_SHOT;
		return p->family == 6 ? reply_rst6(skb, p) : reply_rst(skb, p);
	}
	if (p->proto == IPPROTO_UDP)
		return p->family == 6 ? reply_icmp6(skb, st, p, reason, now) :
					reply_icmp(skb, st, p, reason, now);
	return TC_ACT_SHOT;
}

#endif
