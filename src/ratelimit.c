/*
 * ratelimit.c: one rate budget per endpoint for the whole cluster.
 *
 * A provider limits requests and tokens per minute per organisation and
 * model, whatever number of sessions send them. With rbr in
 * shared_preload_libraries, every backend paces itself through one slot of a
 * small table in shared memory, keyed by a hash of (client kind, endpoint
 * URL, model), so that four sessions grading one table together stay within
 * rbr.grader_requests_per_minute and rbr.grader_tokens_per_minute (the
 * generator's settings for generation requests). Without preloading the same
 * table lives in each backend: the limits are per session.
 *
 * Each slot holds:
 *  - two GCRA buckets (a token bucket in its "theoretical arrival time"
 *    form): requests, and tokens estimated before sending from the request
 *    body (a quarter of its bytes) and corrected from the answer's usage;
 *    a tenth of a second's worth (at least one request) may start at once;
 *  - the provider's own view, from the x-ratelimit-remaining-* / -reset-* /
 *    -limit-* headers of the last answer, refilled at the announced rate:
 *    when it says nothing is left, nobody starts until it has refilled;
 *  - an adaptive in-flight window (AIMD): none until the first 429; then
 *    0.7 of what was in flight, shrinking by 0.7 again on each later 429 (at
 *    most once per round trip), growing while it is what holds requests back
 *    by 5 % per second for 5 s after a 429, then twice as fast each second up
 *    to doubling per second; requests start at most window / round trip per
 *    second, so a fractional window is a rate. It is lifted after 5 s with
 *    neither a 429 nor a request held back. A provider without x-ratelimit-*
 *    headers is so approached from below and probed gently: a run settles
 *    just under its limit instead of oscillating;
 *  - a pause of every session until the time a 429's retry-after named
 *    (at most 1 s; the request that got the 429 waits all of it).
 * rbr.grader_requests_per_second and rbr.grader_max_in_flight still bound
 * each backend on top of this.
 *
 * The settings are PGC_SIGHUP: one value for the cluster, set in
 * postgresql.conf or with ALTER SYSTEM by a superuser. A role cannot raise
 * its share of the budget by setting its own (SET, PGOPTIONS, ALTER ROLE are
 * refused), nor disturb the others with a different value.
 *
 * When every slot is taken by endpoints used in the last minute (a role
 * can choose many model names), the endpoints without a slot share the last
 * one, with a WARNING once per session: slower, never above a budget.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_authid.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "endpoint.h"
#include "ratelimit.h"

/* Settings (PGC_SIGHUP). */
static double grader_rpm = 0;
static double grader_tpm = 0;
static double generator_rpm = 0;
static double generator_tpm = 0;

/* A slot not used for this long may be given to another endpoint (us): its
 * buckets are full again by then, the provider's view and the window expired. */
#define RATE_IDLE_US ((int64) 60 * 1000000)
/* The provider's view is forgotten after a minute without an answer. */
#define RATE_SEEN_US ((int64) 60 * 1000000)
/* The key of the shared slot of the endpoints that found no slot of their own. */
#define RATE_OVERFLOW_KEY ((uint64) 1)
/* Longest pause a 429's retry-after imposes on the other sessions (ms). */
#define RATE_MAX_PAUSE_MS 1000L
/* The window is lifted after this long without a 429 (us). */
#define RATE_WINDOW_QUIET_US ((int64) 5 * 1000000)
/*
 * The window grows by this share per second while it limits (slowly: the
 * provider's bucket is drained gently, so a 429 comes seldom), and shrinks by
 * this factor on a 429 (once per round trip).
 */
#define RATE_GROWTH 0.05
#define RATE_DECREASE 0.7
#define RATE_MIN_WINDOW 0.1
/* The largest in-flight window. */
#define RATE_MAX_WINDOW 1024.0

/* The budget of one (kind, endpoint, model). */
typedef struct RateSlot
{
	uint64		key;			/* 0: free */
	int			kind;
	char		host[64];		/* scheme://host:port, no credentials */
	char		model[64];
	double		rpm;			/* settings it was last paced with */
	double		tpm;
	int64		req_tat;		/* GCRA: theoretical arrival time (us) */
	int64		tok_tat;
	double		window;			/* 0: none yet (no 429 seen) */
	int64		win_tat;		/* the window's pacing: window / rtt per us */
	double		rtt;			/* answers' round trip, smoothed (us) */
	int64		last_limited;	/* when a start last waited for the window */
	int64		last_growth;	/* when the window last grew (or was asked) */
	int64		last_decrease;
	int64		last_throttled;
	int			in_flight;
	int64		paused_until;
	/* the provider's view, from the last answer's headers */
	int64		seen_at;
	double		prov_req;		/* requests left at seen_at, less those in flight */
	double		prov_req_rate;	/* refill per us (0: unknown) */
	int64		prov_req_full_at;	/* when its bucket is full again */
	double		prov_tok;
	double		prov_tok_rate;
	int64		prov_tok_full_at;
	int64		started_since;	/* requests started since seen_at */
	int64		tokens_since;	/* tokens those were estimated at */
	/* for rbr_rate_status() */
	int64		remaining_requests;
	int64		remaining_tokens;
	int64		requests;
	int64		ok;
	int64		throttled;
	int64		waits;
	int64		last_used;
} RateSlot;

typedef struct RateTable
{
	RateSlot	slots[RBR_RATE_SLOTS];
} RateTable;

static RateTable *shared_table = NULL;	/* in shared memory, when preloaded */
static LWLock *shared_lock = NULL;
static RateTable local_table;	/* this backend's, otherwise (or as a fallback) */
static bool warned_full = false;
static bool exit_registered = false;
static RbrRate *active_rate = NULL; /* the batch holding admissions */

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Reserve the table and its lock (shmem_request_hook). */
static void
rate_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(RateTable)));
	RequestNamedLWLockTranche("rbr_rate", 1);
}

/* Attach to (or create) the table (shmem_startup_hook). */
static void
rate_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared_table = ShmemInitStruct("rbr rate budget", sizeof(RateTable), &found);
	if (!found)
		memset(shared_table, 0, sizeof(RateTable));
	shared_lock = &(GetNamedLWLockTranche("rbr_rate"))->lock;
	LWLockRelease(AddinShmemInitLock);
}

/* Define the settings and, when preloading, reserve shared memory. Called from _PG_init. */
void
rbr_ratelimit_init(bool preloading)
{
	DefineCustomRealVariable("rbr.grader_requests_per_minute",
							 "Grader requests per minute per endpoint and model, for the whole cluster when rbr is preloaded (0: no limit).",
							 "Without shared_preload_libraries each session has this budget to itself.",
							 &grader_rpm, 0, 0, 1e9, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("rbr.grader_tokens_per_minute",
							 "Grader tokens per minute per endpoint and model, for the whole cluster when rbr is preloaded (0: no limit).",
							 "Tokens are estimated before sending (a quarter of the request's bytes) and corrected from the answer's usage.",
							 &grader_tpm, 0, 0, 1e12, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("rbr.generator_requests_per_minute",
							 "Generator requests per minute per endpoint and model, for the whole cluster when rbr is preloaded (0: no limit).",
							 NULL, &generator_rpm, 0, 0, 1e9, PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("rbr.generator_tokens_per_minute",
							 "Generator tokens per minute per endpoint and model, for the whole cluster when rbr is preloaded (0: no limit).",
							 NULL, &generator_tpm, 0, 0, 1e12, PGC_SIGHUP, 0, NULL, NULL, NULL);
	if (preloading)
	{
		prev_shmem_request_hook = shmem_request_hook;
		shmem_request_hook = rate_shmem_request;
		prev_shmem_startup_hook = shmem_startup_hook;
		shmem_startup_hook = rate_shmem_startup;
	}
}

/* Is the budget shared by the cluster (rbr preloaded)? */
bool
rbr_rate_shared(void)
{
	return shared_table != NULL && shared_lock != NULL;
}

/* The table and slot of a handle, locked when shared. */
static RateSlot *
rate_lock(RbrRate *r)
{
	if (r->shared)
	{
		LWLockAcquire(shared_lock, LW_EXCLUSIVE);
		return &shared_table->slots[r->slot];
	}
	return &local_table.slots[r->slot];
}

static void
rate_unlock(RbrRate *r)
{
	if (r->shared)
		LWLockRelease(shared_lock);
}

/* Give back the admissions of the batch that was running (backend exit). */
static void
rate_exit(int code pg_attribute_unused(), Datum arg pg_attribute_unused())
{
	if (active_rate != NULL && active_rate->shared && active_rate->held > 0)
	{
		if (LWLockHeldByMe(shared_lock))
			LWLockRelease(shared_lock);
		rbr_rate_end(active_rate);
	}
	active_rate = NULL;
}

/* A batch starts: the settings of its client kind; no slot yet. */
void
rbr_rate_begin(RbrRate *r, int kind)
{
	memset(r, 0, sizeof(RbrRate));
	r->slot = -1;
	r->kind = kind;
	r->requests_per_minute = kind == RBR_JOB_GENERATE ? generator_rpm : grader_rpm;
	r->tokens_per_minute = kind == RBR_JOB_GENERATE ? generator_tpm : grader_tpm;
	active_rate = r;
}

/* scheme://host[:port] of a URL, without credentials, into buf. */
static void
url_host(const char *url, char *buf, size_t size)
{
	const char *p = strstr(url, "://");
	const char *start,
			   *end,
			   *at;
	size_t		n;

	if (p == NULL)
	{
		buf[0] = '\0';
		return;
	}
	start = p + 3;
	end = start + strcspn(start, "/?#");
	at = start;
	for (const char *q = start; q < end; q++)
		if (*q == '@')
			at = q + 1;
	n = Min((size_t) (p + 3 - url), size - 1);
	memcpy(buf, url, n);
	if (n + (end - at) > size - 1)
		end = at + (size - 1 - n);
	memcpy(buf + n, at, end - at);
	buf[n + (end - at)] = '\0';
}

/* Find or take the slot of key in a table; -1 when every slot is busy. */
static int
table_slot(RateTable *t, int nslots, uint64 key, int64 now, bool evict_any)
{
	int			free_slot = -1;
	int			oldest = -1;

	for (int i = 0; i < nslots; i++)
	{
		RateSlot   *s = &t->slots[i];

		if (s->key == key)
			return i;
		if (s->key == 0 && free_slot < 0)
			free_slot = i;
		else if (s->key != 0 && s->in_flight == 0 &&
				 (evict_any || s->last_used < now - RATE_IDLE_US) &&
				 (oldest < 0 || s->last_used < t->slots[oldest].last_used))
			oldest = i;
	}
	return free_slot >= 0 ? free_slot : oldest;
}

/*
 * The batch knows its URL (with the key resolved): find its slot, shared
 * when possible. A slot idle for a long time starts afresh.
 */
void
rbr_rate_open(RbrRate *r, const char *url, const char *model)
{
	StringInfoData k;
	uint64		key;
	int64		now = GetCurrentTimestamp();
	RateTable  *t;
	int			i;

	initStringInfo(&k);
	appendStringInfo(&k, "%d", r->kind);
	appendStringInfoChar(&k, '\0');
	appendStringInfoString(&k, url);
	appendStringInfoChar(&k, '\0');
	appendStringInfoString(&k, model ? model : "");
	key = hash_bytes_extended((const unsigned char *) k.data, k.len, 0);
	pfree(k.data);
	if (key <= RATE_OVERFLOW_KEY)
		key += RATE_OVERFLOW_KEY + 1;

	r->shared = rbr_rate_shared();
	if (r->shared)
	{
		if (!exit_registered)
		{
			before_shmem_exit(rate_exit, (Datum) 0);
			exit_registered = true;
		}
		LWLockAcquire(shared_lock, LW_EXCLUSIVE);
		i = table_slot(shared_table, RBR_RATE_SLOTS - 1, key, now, false);
		if (i < 0)
		{
			/* every endpoint that finds no slot shares the last one: stricter, never looser */
			i = RBR_RATE_SLOTS - 1;
			key = RATE_OVERFLOW_KEY;
			url = "";
			model = "(endpoints without a slot of their own)";
			if (!warned_full)
			{
				LWLockRelease(shared_lock);
				warned_full = true;
				ereport(WARNING,
						(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
						 errmsg("rbr's shared rate budget table is full (%d endpoints in use)", RBR_RATE_SLOTS - 1),
						 errdetail("This endpoint shares one budget with every other endpoint that found no slot, so it may be slower than rbr.%s_requests_per_minute allows.",
								   r->kind == RBR_JOB_GENERATE ? "generator" : "grader"),
						 errhint("Use fewer distinct endpoints and models at once; a slot unused for a minute is given to another.")));
				LWLockAcquire(shared_lock, LW_EXCLUSIVE);
			}
		}
	}
	else
		i = table_slot(&local_table, RBR_RATE_SLOTS, key, now, true);
	Assert(i >= 0);
	t = r->shared ? shared_table : &local_table;
	{
		RateSlot   *s = &t->slots[i];

		if (s->key != key || s->last_used < now - RATE_IDLE_US)
		{
			memset(s, 0, sizeof(RateSlot));
			s->key = key;
			s->kind = r->kind;
			url_host(url, s->host, sizeof(s->host));
			strlcpy(s->model, model ? model : "", sizeof(s->model));
		}
		s->last_used = now;
	}
	r->slot = i;
	if (r->shared)
		LWLockRelease(shared_lock);
}

/* GCRA: the wait before cost units may start at rate per_minute (0: now). */
static int64
gcra_wait(int64 tat, int64 now, double per_minute, double burst)
{
	double		interval = 60e6 / per_minute;
	double		tau = burst * interval;
	int64		start = Max(tat, now);

	if ((double) (start - now) <= tau)
		return 0;
	return (int64) ((double) (start - now) - tau) + 1;
}

/* A bucket's GCRA state after a change of its rate: at most one burst ahead. */
static int64
gcra_clamp(int64 tat, int64 now, double per_minute, double burst, int cost)
{
	double		limit = (burst + cost) * 60e6 / per_minute;

	return Min(tat, now + (int64) limit);
}

/*
 * May one request of the batch start now? 0: yes, and it is counted (in
 * flight, in both buckets); otherwise the microseconds to wait before
 * asking again. cost: its estimated tokens.
 */
int64
rbr_rate_admit(RbrRate *r, int64 now, int cost)
{
	RateSlot   *s;
	int64		wait = 0;
	double		rpm = r->requests_per_minute;
	double		tpm = r->tokens_per_minute;
	double		req_burst = Max(0.0, ceil(rpm / 600.0) - 1.0);	/* 1/10 s, >= 1 request */
	double		tok_burst = tpm / 600.0;

	Assert(r->slot >= 0);
	s = rate_lock(r);
	s->last_used = now;

	/* the settings changed since the slot was last paced: forget older debts */
	if (s->rpm != rpm)
	{
		if (rpm > 0)
			s->req_tat = gcra_clamp(s->req_tat, now, rpm, req_burst, 1);
		s->rpm = rpm;
	}
	if (s->tpm != tpm)
	{
		if (tpm > 0)
			s->tok_tat = gcra_clamp(s->tok_tat, now, tpm, tok_burst, cost);
		s->tpm = tpm;
	}

	/* neither a 429 nor a start held back by the window for a while: the window is lifted */
	if (s->window > 0 && s->last_throttled < now - RATE_WINDOW_QUIET_US &&
		s->last_limited < now - RATE_WINDOW_QUIET_US)
		s->window = 0;

	/*
	 * The window grows while it is what limits, with the time (answers or
	 * not: a provider over its limit answers 429 at once): by RATE_GROWTH
	 * per second for 5 s after a 429, then twice as fast every second, up to
	 * doubling per second. A near limit is probed gently; a far one, or a
	 * transient 429, is found again within seconds.
	 */
	if (s->window > 0 && (s->in_flight >= (int) ceil(s->window) ||
						  (s->rtt > 0 && s->win_tat > now)))
	{
		double		quiet = Min(10.0, (now - s->last_throttled) / 1e6 - 5.0);
		double		g = Min(1.0, RATE_GROWTH * pow(2.0, Max(0.0, quiet)));
		double		dt = Min(1.0, Max(0.0, (now - s->last_growth) / 1e6));

		s->window = Min(RATE_MAX_WINDOW, s->window * (1.0 + g * dt));
	}
	s->last_growth = now;

	/* a 429 asked every session to wait */
	if (now < s->paused_until)
		wait = s->paused_until - now;
	/* the adaptive window is full, or its pace says not yet */
	else if (s->window > 0 && s->in_flight >= (int) ceil(s->window))
	{
		wait = 5000;
		s->last_limited = now;
	}
	else if (s->window > 0 && s->rtt > 0 && s->win_tat > now)
	{
		wait = s->win_tat - now;
		s->last_limited = now;
	}
	/* the provider's view: nothing left until it refills */
	else if (s->seen_at > 0 && s->seen_at > now - RATE_SEEN_US)
	{
		double		dt = (double) (now - s->seen_at);

		if (s->prov_req_full_at > 0)
		{
			double		avail = s->prov_req + dt * s->prov_req_rate - s->started_since;

			if (now < s->prov_req_full_at && avail < 1.0)
				wait = s->prov_req_rate > 0
					? Min((int64) ((1.0 - avail) / s->prov_req_rate) + 1, s->prov_req_full_at - now)
					: Min(s->prov_req_full_at - now, RATE_MAX_PAUSE_MS * 1000);
		}
		if (wait == 0 && s->prov_tok_full_at > 0)
		{
			double		avail = s->prov_tok + dt * s->prov_tok_rate - s->tokens_since;

			if (now < s->prov_tok_full_at && avail < (double) cost)
				wait = s->prov_tok_rate > 0
					? Min((int64) (((double) cost - avail) / s->prov_tok_rate) + 1, s->prov_tok_full_at - now)
					: Min(s->prov_tok_full_at - now, RATE_MAX_PAUSE_MS * 1000);
		}
	}
	/* the cluster's budget */
	if (wait == 0 && rpm > 0)
		wait = gcra_wait(s->req_tat, now, rpm, req_burst);
	if (wait == 0 && tpm > 0)
		wait = gcra_wait(s->tok_tat, now, tpm, tok_burst);

	if (wait == 0)
	{
		if (s->window > 0 && s->rtt > 0)
			s->win_tat = Max(s->win_tat, now) + (int64) (s->rtt / s->window);
		if (rpm > 0)
			s->req_tat = Max(s->req_tat, now) + (int64) (60e6 / rpm);
		if (tpm > 0)
			s->tok_tat = Max(s->tok_tat, now) + (int64) (cost * 60e6 / tpm);
		s->in_flight++;
		s->requests++;
		s->started_since++;
		s->tokens_since += cost;
		r->held++;
	}
	else
	{
		s->waits++;
		r->waits++;
	}
	rate_unlock(r);
	return wait;
}

/*
 * How long what an answer said about the provider's bucket holds (us): until
 * it is full again (the reset header); without it a minute when the refill
 * rate is known (the limit header), else a second (Azure sends neither: the
 * next answer will say more).
 */
static int64
view_span(int64 reset_ms, int64 limit)
{
	if (reset_ms >= 0)
		return reset_ms * 1000;
	return limit > 0 ? RATE_SEEN_US : RATE_MAX_PAUSE_MS * 1000;
}

/*
 * One admitted request ended (status 0: no HTTP answer): the window adapts,
 * a 429 pauses everybody for its retry-after, the provider's headers update
 * its view, the token bucket is corrected from the tokens used (-1: unknown).
 * sent_at: when it was sent.
 */
void
rbr_rate_done(RbrRate *r, int64 now, int64 sent_at, long status, long retry_after_ms,
			  const RbrRateSeen *seen, int cost, int used_tokens)
{
	RateSlot   *s;
	int			in_flight;

	if (r->slot < 0 || r->held <= 0)
		return;
	s = rate_lock(r);
	in_flight = s->in_flight;
	s->in_flight = Max(0, s->in_flight - 1);
	r->held--;
	s->last_used = now;

	if (status == 429)
	{
		s->throttled++;
		/* one decrease per round trip: the 429s of requests sent before the last one do not count */
		if (sent_at >= s->last_decrease)
		{
			double		base = s->window > 0 ? s->window : (double) in_flight;

			s->window = Max(RATE_MIN_WINDOW, base * RATE_DECREASE);
			s->last_decrease = now;
		}
		if (retry_after_ms > 0)
			s->paused_until = Max(s->paused_until,
								  now + (int64) Min(retry_after_ms, RATE_MAX_PAUSE_MS) * 1000);
		s->last_throttled = now;
	}
	else if (status >= 200 && status < 300)
	{
		double		sample = (double) Max(1, now - sent_at);

		s->ok++;
		s->rtt = s->rtt > 0 ? 0.875 * s->rtt + 0.125 * sample : sample;
	}

	/* the provider's view, less what is in flight or started since */
	if (seen != NULL && (seen->remaining_requests >= 0 || seen->remaining_tokens >= 0))
	{
		s->seen_at = now;
		s->started_since = 0;
		s->tokens_since = 0;
		s->prov_req_full_at = s->prov_tok_full_at = 0;
		if (seen->remaining_requests >= 0)
		{
			s->remaining_requests = seen->remaining_requests;
			s->prov_req = (double) seen->remaining_requests - s->in_flight;
			s->prov_req_rate = seen->limit_requests > 0 ? seen->limit_requests / 60e6 : 0;
			s->prov_req_full_at = now + view_span(seen->reset_requests_ms, seen->limit_requests);
		}
		if (seen->remaining_tokens >= 0)
		{
			s->remaining_tokens = seen->remaining_tokens;
			s->prov_tok = (double) seen->remaining_tokens - (double) s->in_flight * cost;
			s->prov_tok_rate = seen->limit_tokens > 0 ? seen->limit_tokens / 60e6 : 0;
			s->prov_tok_full_at = now + view_span(seen->reset_tokens_ms, seen->limit_tokens);
		}
	}

	rate_unlock(r);
	if (used_tokens >= 0)
		rbr_rate_tokens(r, now, cost, used_tokens);
}

/* Correct the token bucket: an answer says how many tokens a request used. */
void
rbr_rate_tokens(RbrRate *r, int64 now, int cost, int used_tokens)
{
	RateSlot   *s;

	if (r->slot < 0 || used_tokens < 0 || used_tokens == cost)
		return;
	s = rate_lock(r);
	if (s->tpm > 0)
		s->tok_tat = Max(now, s->tok_tat + (int64) ((used_tokens - cost) * 60e6 / s->tpm));
	rate_unlock(r);
}

/* The batch ended (normally or by ERROR): give back what it still holds. */
void
rbr_rate_end(RbrRate *r)
{
	if (r->slot >= 0 && r->held > 0)
	{
		RateSlot   *s = rate_lock(r);

		s->in_flight = Max(0, s->in_flight - r->held);
		r->held = 0;
		rate_unlock(r);
	}
	if (active_rate == r)
		active_rate = NULL;
}

/* ---------------------------------------------------------------------------
 * Response headers (called from libcurl's header callback: never ERRORs)
 * ------------------------------------------------------------------------- */

/* Forget what an earlier attempt's headers said. */
void
rbr_rate_seen_reset(RbrRateSeen *s)
{
	s->limit_requests = s->limit_tokens = -1;
	s->remaining_requests = s->remaining_tokens = -1;
	s->reset_requests_ms = s->reset_tokens_ms = -1;
}

/* A duration as OpenAI writes it ("1s", "6m0s", "20ms", "1h2m3.5s", "0.5"): ms, or -1. */
static int64
parse_duration_ms(const char *v)
{
	double		total = 0;
	bool		any = false;

	while (*v == ' ')
		v++;
	while (*v != '\0')
	{
		char	   *end;
		double		d = strtod(v, &end);

		if (end == v || !isfinite(d) || d < 0)
			return -1;
		v = end;
		if (strncmp(v, "ms", 2) == 0)
		{
			total += d;
			v += 2;
		}
		else if (*v == 'h')
		{
			total += d * 3600000.0;
			v++;
		}
		else if (*v == 'm')
		{
			total += d * 60000.0;
			v++;
		}
		else if (*v == 's' || *v == '\0')
		{
			total += d * 1000.0;
			if (*v == 's')
				v++;
		}
		else
			return -1;
		any = true;
	}
	if (!any || total > 1e12)
		return -1;
	return (int64) ceil(total);
}

/*
 * One header line: remember it when it is one of the x-ratelimit-* headers.
 * Returns whether it was one.
 */
bool
rbr_rate_header(RbrRateSeen *s, const char *line, size_t len)
{
	static const struct
	{
		const char *name;
		bool		duration;
		size_t		offset;
	}			known[] =
	{
		{"x-ratelimit-limit-requests", false, offsetof(RbrRateSeen, limit_requests)},
		{"x-ratelimit-limit-tokens", false, offsetof(RbrRateSeen, limit_tokens)},
		{"x-ratelimit-remaining-requests", false, offsetof(RbrRateSeen, remaining_requests)},
		{"x-ratelimit-remaining-tokens", false, offsetof(RbrRateSeen, remaining_tokens)},
		{"x-ratelimit-reset-requests", true, offsetof(RbrRateSeen, reset_requests_ms)},
		{"x-ratelimit-reset-tokens", true, offsetof(RbrRateSeen, reset_tokens_ms)},
	};
	char		val[64];

	if (len < 13 || pg_strncasecmp(line, "x-ratelimit-", 12) != 0)
		return false;
	for (int i = 0; i < (int) lengthof(known); i++)
	{
		size_t		k = strlen(known[i].name);
		const char *v;
		size_t		vl;
		int64		x;

		if (len <= k || pg_strncasecmp(line, known[i].name, k) != 0 || line[k] != ':')
			continue;
		v = line + k + 1;
		vl = len - k - 1;
		while (vl > 0 && (*v == ' ' || *v == '\t'))
			v++, vl--;
		while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' ' || v[vl - 1] == '\t'))
			vl--;
		if (vl == 0 || vl >= sizeof(val))
			return true;
		memcpy(val, v, vl);
		val[vl] = '\0';
		if (known[i].duration)
			x = parse_duration_ms(val);
		else
		{
			char	   *end;
			double		d = strtod(val, &end);

			x = (end != val && *end == '\0' && isfinite(d) && d >= 0 && d < 1e15) ? (int64) d : -1;
		}
		*(int64 *) ((char *) s + known[i].offset) = x;
		return true;
	}
	return false;
}

/* ---------------------------------------------------------------------------
 * rbr_rate_status()
 * ------------------------------------------------------------------------- */

PG_FUNCTION_INFO_V1(rbr_rate_status);
/*
 * rbr_rate_status(): one row per endpoint budget in use, from shared memory
 * (rbr preloaded) or this session's. The endpoint's host is shown to
 * superusers and members of pg_read_all_settings only; URLs' paths and
 * credentials never.
 */
Datum
rbr_rate_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bool		shared = rbr_rate_shared();
	bool		see_host = superuser() || has_privs_of_role(GetUserId(), ROLE_PG_READ_ALL_SETTINGS);
	RateSlot   *copy = palloc(sizeof(RateTable));

	InitMaterializedSRF(fcinfo, 0);
	if (shared)
	{
		LWLockAcquire(shared_lock, LW_SHARED);
		memcpy(copy, shared_table->slots, sizeof(RateTable));
		LWLockRelease(shared_lock);
	}
	else
		memcpy(copy, local_table.slots, sizeof(RateTable));

	for (int i = 0; i < RBR_RATE_SLOTS; i++)
	{
		RateSlot   *s = &copy[i];
		Datum		v[16];
		bool		n[16] = {0};

		if (s->key == 0)
			continue;
		v[0] = Int32GetDatum(i + 1);
		v[1] = CStringGetTextDatum(s->kind == RBR_JOB_GENERATE ? "generator" : "grader");
		if (see_host)
			v[2] = CStringGetTextDatum(s->host);
		else
			n[2] = true;
		v[3] = CStringGetTextDatum(s->model);
		v[4] = BoolGetDatum(shared);
		v[5] = Float8GetDatum(s->rpm);
		v[6] = Float8GetDatum(s->tpm);
		v[7] = Float8GetDatum(s->window);
		n[7] = s->window <= 0;
		v[8] = Int32GetDatum(s->in_flight);
		v[9] = Int64GetDatum(s->requests);
		v[10] = Int64GetDatum(s->ok);
		v[11] = Int64GetDatum(s->throttled);
		v[12] = Int64GetDatum(s->waits);
		v[13] = Int64GetDatum(s->remaining_requests);
		n[13] = s->seen_at == 0 || s->prov_req_full_at == 0;
		v[14] = Int64GetDatum(s->remaining_tokens);
		n[14] = s->seen_at == 0 || s->prov_tok_full_at == 0;
		v[15] = TimestampTzGetDatum(s->last_used);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
	}
	pfree(copy);
	return (Datum) 0;
}
