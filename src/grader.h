/*
 * grader.h: the LLM grader. Settings, request building, P(yes) parsing
 * (grader.c), the libcurl multi engine with retries (http.c) and the answer
 * cache (cache.c).
 *
 * One "job" is one (proposition, conversation, completion) question, or (in
 * a generation batch, generator.c) one (conversation, instruction, sample)
 * completion. A batch of jobs is sent concurrently (rbr.grader_max_in_flight
 * at a time) through one libcurl multi handle per backend; every job ends
 * either 'ok' with a probability (or text) or 'error' with a reason, never
 * as a made-up "no".
 */
#ifndef RBR_GRADER_H
#define RBR_GRADER_H

#include "rbr.h"

#include "utils/guc.h"

#include "policy.h"
#include "secrets.h"

/* Settings (defined in rbr_grader_init_settings). */
extern char *rbr_grader_model;
extern int	rbr_grader_timeout_ms;
extern int	rbr_grader_max_in_flight;
extern int	rbr_grader_max_retries;
extern int	rbr_grader_retry_base_ms;
extern double rbr_grader_requests_per_second;
extern int	rbr_grader_token_parameter;
extern bool rbr_grader_strict_logprobs;

/* Values of rbr.grader_token_parameter. */
#define RBR_TOKENS_MAX_COMPLETION_TOKENS 0
#define RBR_TOKENS_MAX_TOKENS 1

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

/*
 * The endpoint a batch talks to and how: the grader's or the generator's
 * settings (rbr_grader_endpoint(), rbr_generator_endpoint()). Retries,
 * backoff, concurrency and the rate limit are the engine's (rbr.grader_*).
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
} RbrEndpoint;

/* The outcome of one job. Strings are palloc'd in the caller's context. */
typedef struct RbrGradeResult
{
	bool		ok;
	double		probability;	/* P(yes), when ok */
	const char *method;			/* "logprobs" or "text", when ok */
	double		yes_no_mass;	/* observed yes+no probability mass; NaN for text */
	char	   *model;			/* model that answered (or the setting) */
	char	   *error;			/* reason, when not ok */
	int			attempts;		/* HTTP attempts made (0: from the cache) */
	int			prompt_tokens;	/* -1 when unknown */
	int			completion_tokens;
	bool		cached;
	char	   *text;			/* generation: the completion, when ok */
	char	   *finish_reason;	/* generation: as the endpoint said, or NULL */
} RbrGradeResult;

/* One question to the grader, with its request and outcome. */
typedef struct RbrGradeJob
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
} RbrGradeJob;

/* grader.c */
extern void rbr_grader_init_settings(void);
extern char *rbr_grader_messages_json(RbrPolicy *pol, int prop, Jsonb *prompt,
									  const char *completion);
extern char *rbr_grader_body(RbrGradeJob *job, int token_param);
extern int	rbr_grader_token_param(void);
extern void rbr_grader_switch_token_param(int from);
extern bool rbr_grader_parse_answer(const char *body, size_t len, RbrGradeResult *res,
									void **json_holder);
extern char *rbr_grader_error_reason(long status, const char *body, size_t len,
									 char **param, void **json_holder);
extern char *rbr_grader_scrub(const char *msg);
extern void rbr_grader_endpoint(RbrEndpoint *ep);
extern int	rbr_prompt_messages(Jsonb *prompt, char ***roles, char ***contents);
extern double rbr_grader_p_yes(const char *const *tokens, const double *logprobs, int n,
							   double *mass, bool *found);

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

/* http.c */
extern void rbr_http_run(const RbrEndpoint *ep, RbrGradeJob *jobs, int njobs,
						 const RbrHttpFeed *feed);
extern void rbr_http_stats(StringInfo buf);

/* cache.c */
extern void rbr_cache_key(RbrGradeJob *job);
extern void rbr_cache_lookup(RbrGradeJob *jobs, int njobs, const char *const *props);
extern void rbr_cache_store(RbrGradeJob *jobs, const int *idx, int n, const char *const *props);
extern void rbr_gen_cache_key(RbrGradeJob *job);
extern void rbr_gen_cache_lookup(RbrGradeJob *jobs, int njobs);
extern void rbr_gen_cache_store(RbrGradeJob *jobs, int njobs);

/* generator.c: the generator of synthetic completions */
extern char *rbr_generator_model;
extern double rbr_generator_temperature;
extern int	rbr_generator_max_tokens;
extern int	rbr_generator_timeout_ms;
extern void rbr_generator_init_settings(void);
extern void rbr_generator_endpoint(RbrEndpoint *ep);
extern char *rbr_generator_body(RbrGradeJob *job, int token_param);
/* grader.c reads the generator's answers too (same JSON helpers) */
extern bool rbr_generator_parse_answer(const char *body, size_t len, RbrGradeResult *res,
									   void **json_holder);

#endif							/* RBR_GRADER_H */
