/*
 * endpoint.h: the HTTP engine (http.c) and the interface its clients (the
 * grader, grader.c; the generator, generator.c; the next ones, such as a
 * batch API) implement. The engine sends jobs concurrently with retries,
 * backoff, a rate limit and cancellation; it knows nothing of what a job
 * asks: the client builds each request body, reads each answer and
 * classifies each failure through the callbacks of its RbrEndpoint.
 *
 * Every job ends either 'ok' with a result or 'error' with a reason. A
 * failure the client classifies as final (a bad key, no quota, a request
 * field the endpoint rejects) stops the batch: nothing more is sent and the
 * jobs not sent end with that reason.
 */
#ifndef RBR_ENDPOINT_H
#define RBR_ENDPOINT_H

#include "postgres.h"

#include "lib/stringinfo.h"

#include "ratelimit.h"

/* Largest response body accepted (a one-token answer with logprobs is ~3 kB). */
#define RBR_MAX_RESPONSE_BYTES (1024 * 1024)

/* Longest wait a Retry-After header may impose, and the backoff cap (ms). */
#define RBR_MAX_RETRY_AFTER_MS 60000
#define RBR_MAX_BACKOFF_MS 30000

/* What the jobs of a batch ask: a grading question or a generation. */
typedef enum RbrJobKind
{
	RBR_JOB_GRADE,				/* one yes/no question: P(yes) from logprobs */
	RBR_JOB_GENERATE			/* one sampled completion: text, finish_reason */
} RbrJobKind;

typedef struct RbrGradeJob RbrGradeJob;
typedef struct RbrGradeResult RbrGradeResult;

/*
 * The endpoint a batch talks to and how, filled by a client
 * (rbr_grader_endpoint(), rbr_generator_endpoint()): where, with which
 * credentials, the engine's limits, and the client's callbacks.
 */
typedef struct RbrEndpoint
{
	RbrJobKind	kind;
	const char *url;
	const char *api_key;
	const char *azure_api_version;	/* "" unless Azure style */
	const char *extra_headers;
	const char *ca_file;		/* "" = the system's trust store */
	const char *model;
	int			timeout_ms;
	const char *path;			/* "chat/completions" or "responses" */

	/* the engine's limits (rbr.grader_* settings) */
	int			max_in_flight;
	int			max_retries;
	int			retry_base_ms;
	double		requests_per_second;

	/* the client: what the engine calls, knowing nothing of the job's kind */
	char	   *(*build_body) (RbrGradeJob *job, int token_param);
	bool		(*read_answer) (const char *body, size_t len, RbrGradeResult *res,
								void **json_holder);
	int			(*token_param) (void);
	/*
	 * A 4xx/5xx answer: its reason, *retry_now when the client changed its
	 * request (a rejected parameter) and the job is to be sent again at once,
	 * *final when no other job can succeed either (bad key, no quota).
	 */
	char	   *(*classify_failure) (long status, const char *body, size_t len,
									 int body_param, bool *retry_now, bool *final,
									 void **json_holder);
	/* a message with the client's secrets replaced, bounded in size */
	char	   *(*scrub) (const char *msg);
} RbrEndpoint;

/* The outcome of one job. Strings are palloc'd in the caller's context. */
struct RbrGradeResult
{
	bool		ok;
	double		probability;	/* P(yes), when ok */
	const char *method;			/* "logprobs" or "sampled" ("text": 0.1.0 cache rows) */
	double		yes_no_mass;	/* observed yes+no probability mass; NaN for text */
	char	   *model;			/* model that answered (or the setting) */
	char	   *error;			/* reason, when not ok */
	int			attempts;		/* HTTP attempts made (0: from the cache) */
	int			prompt_tokens;	/* -1 when unknown */
	int			completion_tokens;
	bool		cached;
	char	   *text;			/* generation: the completion, when ok */
	char	   *finish_reason;	/* generation: as the endpoint said, or NULL */
	int			samples;		/* sampled: answers counted (k) */
	int			cached_tokens;	/* prompt tokens served from the provider's cache, -1 unknown */
	int			reasoning_tokens;	/* completion tokens spent reasoning, -1 unknown */
	bool		final;			/* error that no retry nor other job can fix */
	bool		retry;			/* a 200 answer that is malformed: retried like a 5xx */
	bool		again;			/* a 200 answer read; the client wants another one */
	bool		pending;		/* batch mode: asked through the Batch API, no answer yet */
	/* sampled, one sample per request: what the answers so far counted */
	int			acc_yes;
	int			acc_no;
	int			acc_answers;
	int			acc_tokens[4];	/* prompt, completion, cached, reasoning */
};

/* One question to the grader, with its request and outcome. */
struct RbrGradeJob
{
	char	   *messages_json;	/* the "messages" array, JSON text */
	int			sample;			/* generation: sample index, sent as "seed" */
	uint8		key[32];		/* cache key: sha256 of what decides the answer */
	RbrGradeResult result;

	/* engine state (http.c) */
	char	   *body;			/* full request body for body_param */
	int			body_param;		/* token parameter the body was built with */
	void	   *easy;			/* CURL *, while in flight */
	char	   *resp;			/* malloc'd response body */
	size_t		resp_len;
	size_t		resp_cap;
	bool		resp_too_big;
	long		retry_after_ms; /* from the last response's headers, or -1 */
	int64		not_before;		/* earliest start of the next attempt (us) */
	int			retries;		/* retries used (token-parameter switch excluded) */
	char		errbuf[256];	/* curl's error text of the last attempt */
	bool		done;
	/* the rate budget (ratelimit.c) */
	bool		admitted;		/* counted in the budget, not yet reported */
	int			rate_cost;		/* tokens estimated for this attempt */
	int64		sent_at;		/* when this attempt started (us) */
	RbrRateSeen rate_seen;		/* x-ratelimit-* headers of its answer */
};

/*
 * How rbr_http_run() gets jobs ready while others are in flight, and hands
 * back the ones that ended, so that building, hashing, cache look-ups and
 * cache writes overlap with the network instead of preceding or following it.
 */
typedef struct RbrHttpFeed
{
	/* make the next few jobs from *ready on ready to send; advance *ready */
	void		(*prepare) (void *arg, int *ready);
	/* jobs[idx[0 .. n-1]] ended (ok or error) */
	void		(*ended) (void *arg, const int *idx, int n);
	void	   *arg;
} RbrHttpFeed;

/* The answer of one plain request (rbr_http_request()). */
typedef struct RbrHttpReply
{
	long		status;			/* HTTP status; 0 when no answer came */
	char	   *body;			/* palloc'd, NUL-terminated */
	size_t		len;
	char	   *error;			/* transport failure, when status is 0 */
} RbrHttpReply;

/* http.c */
extern void rbr_http_request(const RbrEndpoint *ep, const char *method, const char *url,
							 const char *json_body, const char *file_name, const char *file_data,
							 size_t file_len, size_t max_bytes, long timeout_ms, RbrHttpReply *reply);
extern void rbr_http_run(const RbrEndpoint *ep, RbrGradeJob *jobs, int njobs,
						 const RbrHttpFeed *feed);
extern void rbr_http_stats(StringInfo buf);

/*
 * The base URL of an endpoint, palloc'd: rbr.*_url without trailing slashes
 * and, for Azure, without a trailing /openai or /openai/v1 (the path to each
 * resource is added by its caller).
 */
extern char *rbr_endpoint_base(const RbrEndpoint *ep);

#endif							/* RBR_ENDPOINT_H */
