/* SPDX-License-Identifier: Apache-2.0 */
/* ratelimit.h - token buckets in integer arithmetic (no floating point in BPF).
 *
 * Tokens are kept in units of 1e-9 token so that refill = elapsed_ns * rate exactly. Callers
 * hold the job_state spin lock (exact per job across CPUs). A bucket whose timestamp is 0 is
 * full (first use). */
#ifndef SNAS_RATELIMIT_H
#define SNAS_RATELIMIT_H

#include "common.h"

/* Takes one token; returns 1 on success. rate is per second (0 = unlimited), burst in
 * tokens (>= 1). */
static __always_inline int bucket_take(__u64 *tokens, __u64 *ts, __u64 rate, __u64 burst,
				       __u64 now)
{
	__u64 cap, el;

	if (rate == 0)
		return 1;
	if (burst == 0)
		burst = 1;
	cap = burst * NSEC_PER_SEC;
	el = now > *ts ? now - *ts : 0;
	if (*ts == 0 || el >= cap / rate)
		*tokens = cap;
	else if (*tokens + el * rate >= cap)
		*tokens = cap;
	else
		*tokens += el * rate;
	*ts = now;
	if (*tokens < NSEC_PER_SEC)
		return 0;
	*tokens -= NSEC_PER_SEC;
	return 1;
}

#endif
