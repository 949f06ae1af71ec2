/*
 * ratelimit.h: the rate budget of an endpoint (ratelimit.c), shared by every
 * session of the cluster when rbr is preloaded, per session otherwise.
 *
 * One budget per (client kind, endpoint URL, model): a requests-per-minute
 * and a tokens-per-minute bucket (rbr.grader_requests_per_minute,
 * rbr.grader_tokens_per_minute, the generator's equivalents), the
 * provider's own view read from its x-ratelimit-* headers, and an in-flight
 * window that adapts to 429s (additive increase, multiplicative decrease).
 * The HTTP engine (http.c) asks before each attempt and reports each answer.
 */
#ifndef RBR_RATELIMIT_H
#define RBR_RATELIMIT_H

#include "postgres.h"

/* What one answer's headers said about the provider's limits (-1: absent). */
typedef struct RbrRateSeen
{
	int64		limit_requests; /* x-ratelimit-limit-requests (per minute) */
	int64		limit_tokens;
	int64		remaining_requests; /* x-ratelimit-remaining-requests */
	int64		remaining_tokens;
	int64		reset_requests_ms;	/* x-ratelimit-reset-requests, as ms */
	int64		reset_tokens_ms;
} RbrRateSeen;

/* A batch's handle on its endpoint's budget (http.c keeps one per batch). */
typedef struct RbrRate
{
	int			slot;			/* index in the table, -1 before the first use */
	bool		shared;			/* the slot is in shared memory */
	int			kind;			/* RbrJobKind of the batch */
	double		requests_per_minute;	/* the settings at the batch's start */
	double		tokens_per_minute;
	int			held;			/* requests admitted and not yet reported */
	int64		waits;			/* admissions refused (the engine waited) */
} RbrRate;

/* Budget slots in shared memory: one per (kind, endpoint, model) in use. */
#define RBR_RATE_SLOTS 64

extern void rbr_ratelimit_init(bool preloading);
extern void rbr_rate_begin(RbrRate *r, int kind);
extern void rbr_rate_open(RbrRate *r, const char *url, const char *model);
extern int64 rbr_rate_admit(RbrRate *r, int64 now, int cost);
extern void rbr_rate_done(RbrRate *r, int64 now, int64 sent_at, long status,
						  long retry_after_ms, const RbrRateSeen *seen, int cost,
						  int used_tokens);
extern void rbr_rate_tokens(RbrRate *r, int64 now, int cost, int used_tokens);
extern void rbr_rate_end(RbrRate *r);
extern void rbr_rate_seen_reset(RbrRateSeen *s);
extern bool rbr_rate_header(RbrRateSeen *s, const char *line, size_t len);
extern bool rbr_rate_shared(void);

#endif							/* RBR_RATELIMIT_H */
