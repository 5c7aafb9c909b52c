/* SPDX-License-Identifier: Apache-2.0 */
/* drop_reasons.h - C twin of snas_wire::Reason (crates/snas-wire/src/reason.rs).
 *
 * Stable numbers: never renumber or reuse. A test in crates/snas-bpf/tests/drop_reasons.rs
 * parses this file and checks every line against snas_wire::Reason::ALL (number and name).
 * SNAS_DROP_<NAME> is the upper-case form of Reason::name(). 0 is not a reason: counter
 * slot 0 counts forwarded packets. */
#ifndef SNAS_DROP_REASONS_H
#define SNAS_DROP_REASONS_H

#define SNAS_DROP_NOT_IP 1
#define SNAS_DROP_MALFORMED 2
#define SNAS_DROP_FRAGMENT 3
#define SNAS_DROP_IP_OPTIONS 4
#define SNAS_DROP_SPOOFED_SOURCE 5
#define SNAS_DROP_SPOOFED_MAC 6
#define SNAS_DROP_UNKNOWN_JOB 7
#define SNAS_DROP_DESTINATION_DENIED 8
#define SNAS_DROP_PORT_DENIED 9
#define SNAS_DROP_ALWAYS_DENIED 10
#define SNAS_DROP_NEW_CONNECTION_RATE 11
#define SNAS_DROP_CONNECTION_LIMIT 12
#define SNAS_DROP_PACING_HORIZON 13
#define SNAS_DROP_NO_PROXY 14
#define SNAS_DROP_ENCAP_FAILED 15
#define SNAS_DROP_IPV6_DENIED 16
#define SNAS_DROP_GENEVE_MALFORMED 17
#define SNAS_DROP_GENEVE_OPTION 18
#define SNAS_DROP_GENEVE_UNKNOWN_JOB 19
#define SNAS_DROP_UNTRUSTED_SOURCE 20
#define SNAS_DROP_POLICY_EXPIRED 21
#define SNAS_DROP_POLICY_INVALID 22
#define SNAS_DROP_NODE_MISMATCH 23
#define SNAS_DROP_PORT_QUOTA 24
#define SNAS_DROP_PORTS_EXHAUSTED 25
#define SNAS_DROP_DESTINATION_PORT_CAP 26
#define SNAS_DROP_NO_CONNTRACK 27
#define SNAS_DROP_DRAINING 28
#define SNAS_DROP_MTU_EXCEEDED 29
#define SNAS_DROP_DNS_REFUSED 30
#define SNAS_DROP_DNS_RATE 31
#define SNAS_DROP_OVERLAY_TARGET 32
#define SNAS_DROP_TENANT_PORT_QUOTA 33
#define SNAS_DROP_INFRASTRUCTURE_DENIED 34
#define SNAS_DROP_HOLD_QUEUE_FULL 35
#define SNAS_DROP_TENANT_QUEUE_FULL 36
#define SNAS_DROP_POLICY_REVOKED 37
#define SNAS_DROP_KEY_UNTRUSTED 38
#define SNAS_DROP_DENY_RULE 39
#define SNAS_DROP_SNI_MISMATCH 40
#define SNAS_DROP_HOST_MISMATCH 41

/* One past the largest reason: size of per-reason counter ranges. */
#define SNAS_DROP_COUNT 42

#endif
