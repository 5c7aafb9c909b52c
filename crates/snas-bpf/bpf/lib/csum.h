/* SPDX-License-Identifier: Apache-2.0 */
/* csum.h - Internet checksums over small stack buffers (headers we build ourselves).
 * Only whole 16-bit words; callers pass even lengths. */
#ifndef SNAS_CSUM_H
#define SNAS_CSUM_H

#include "common.h"

/* Sum of nwords 16-bit words as they lie in memory (network order in, network order out). */
static __always_inline __u64 csum_words(const void *buf, int nwords, __u64 sum)
{
	const __u16 *w = buf;

#pragma unroll
	for (int i = 0; i < nwords; i++)
		sum += w[i];
	return sum;
}

/* IPv4 header checksum over a 20-byte header whose check field is zero. */
static __always_inline __u16 ipv4_csum(const struct iphdr *ip)
{
	return csum_fold(csum_words(ip, 10, 0));
}

/* TCP checksum of a header without payload or options (check field zero). */
static __always_inline __u16 tcp_csum_nopayload(__u32 saddr, __u32 daddr, const struct tcphdr *th)
{
	__u64 sum = 0;

	sum += saddr & 0xffff;
	sum += saddr >> 16;
	sum += daddr & 0xffff;
	sum += daddr >> 16;
	sum += bpf_htons(IPPROTO_TCP);
	sum += bpf_htons(sizeof(*th));
	return csum_fold(csum_words(th, sizeof(*th) / 2, sum));
}

/* TCP checksum over IPv6 of a header without payload or options (check field zero). */
static __always_inline __u16 tcp6_csum_nopayload(const __u8 *saddr, const __u8 *daddr,
						 const struct tcphdr *th)
{
	__u64 sum = 0;

	sum = csum_words(saddr, 8, sum);
	sum = csum_words(daddr, 8, sum);
	sum += bpf_htons(IPPROTO_TCP);
	sum += bpf_htons(sizeof(*th));
	return csum_fold(csum_words(th, sizeof(*th) / 2, sum));
}

#endif
