/* SPDX-License-Identifier: Apache-2.0 */
/* audit.h - rate-limited audit events into the snas_audit ring buffer.
 *
 * Per job at most cfg_audit_rate events per second (burst the same); the rest are counted in
 * job_state.audit_suppressed. A full ring buffer also counts as suppressed. */
#ifndef SNAS_AUDIT_H
#define SNAS_AUDIT_H

#include "maps.h"
#include "parse.h"
#include "ratelimit.h"

static __always_inline void audit(struct job_state *st, __u64 job_key, __u32 kind, __u32 reason,
				  const struct pkt *p, __u64 now)
{
	struct audit_event *e;
	int ok = 1;

	if (st) {
		bpf_spin_lock(&st->lock);
		ok = bucket_take(&st->audit_tokens, &st->audit_ts, cfg_audit_rate, cfg_audit_rate,
				 now);
		if (!ok)
			st->audit_suppressed++;
		bpf_spin_unlock(&st->lock);
	}
	if (!ok)
		return;
	e = bpf_ringbuf_reserve(&snas_audit, sizeof(*e), 0);
	if (!e) {
		if (st)
			__sync_fetch_and_add(&st->audit_suppressed, 1);
		return;
	}
	e->ts_ns = now;
	e->job_key = job_key;
	e->kind = kind;
	e->reason = reason;
	__builtin_memset(e->saddr, 0, sizeof(e->saddr));
	__builtin_memset(e->daddr, 0, sizeof(e->daddr));
	if (p->family == 6) {
		__builtin_memcpy(e->saddr, p->saddr6, 16);
		__builtin_memcpy(e->daddr, p->daddr6, 16);
	} else {
		__builtin_memcpy(e->saddr, &p->saddr, 4);
		__builtin_memcpy(e->daddr, &p->daddr, 4);
	}
	e->sport = p->sport;
	e->dport = p->dport;
	e->proto = p->proto;
	e->family = p->family;
	e->_pad0[0] = 0;
	e->_pad0[1] = 0;
	bpf_ringbuf_submit(e, 0);
}

#endif
