/* SPDX-License-Identifier: Apache-2.0 */
/* common.h - includes, load-time node constants (.rodata) and small helpers shared by every
 * entry object. Node constants are set once by the loader (snas_bpf::Tier1::load) before the
 * object is loaded; per-job values live in maps (maps.h). */
#ifndef SNAS_COMMON_H
#define SNAS_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "drop_reasons.h"

#ifndef ETH_P_ARP
#define ETH_P_ARP 0x0806
#endif

#define NSEC_PER_SEC 1000000000ULL

/* Underlay ifindex that encapsulated packets are redirected to. */
const volatile __u32 cfg_uplink_ifindex = 0;
/* This node's underlay IPv4 address (network byte order). */
const volatile __u32 cfg_node_ip = 0;
/* Underlay L3 MTU: an encapsulated packet (outer IPv4 header included) must fit. */
const volatile __u32 cfg_uplink_mtu = 1500;
/* Default EDT horizon (queueing-delay budget) when a job sets none. */
const volatile __u64 cfg_horizon_ns = 20000000ULL;
/* GENEVE UDP port, host byte order. */
const volatile __u16 cfg_geneve_port = 6081;
/* Audit events per second per job (token bucket, burst = rate). */
const volatile __u32 cfg_audit_rate = 100;
/* ICMP/ICMPv6 unreachable messages per second per job for denied UDP, and their burst. */
const volatile __u32 cfg_icmp_rate = 100;
const volatile __u32 cfg_icmp_burst = 200;
/* Record the last redirect in the debug map (tests only: test_run does not report targets). */
const volatile __u8 cfg_record_debug = 0;

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

#endif
