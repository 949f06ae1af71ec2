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

/* Settings (defined in rbr_grader_init_settings). */
extern char *rbr_grader_url;
extern char *rbr_grader_model;
extern char *rbr_grader_api_key;
extern char *rbr_grader_azure_api_version;
extern char *rbr_grader_extra_headers;
extern char *rbr_grader_ca_file;
extern int	rbr_grader_timeout_ms;
extern int	rbr_grader_max_in_flight;
extern int	rbr_grader_max_retries;
extern int	rbr_grader_retry_base_ms;
extern double rbr_grader_requests_per_second;
extern int	rbr_grader_token_parameter;
extern bool rbr_grader_strict_logprobs;	/* deprecated, no effect */
extern int	rbr_grader_method;
extern int	rbr_grader_samples;
extern int	rbr_grader_top_logprobs;
extern int	rbr_grader_max_answer_tokens;
extern char *rbr_grader_temperature;
extern char *rbr_grader_request_options;
extern int	rbr_grader_api;

/* Values of rbr.grader_method. */
#define RBR_METHOD_LOGPROBS 0
#define RBR_METHOD_SAMPLED 1
#define RBR_METHOD_AUTO 2

/* Values of rbr.grader_api. */
#define RBR_API_CHAT 0
#define RBR_API_RESPONSES 1

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

typedef struct RbrGradeJob RbrGradeJob;
typedef struct RbrGradeResult RbrGradeResult;

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
	const char *path;			/* "chat/completions" or "responses" */

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
};

/* grader.c */
extern void rbr_grader_init_settings(void);
extern bool rbr_check_http_url(char **newval, void **extra, GucSource source);
extern bool rbr_check_headers(char **newval, void **extra, GucSource source);
extern bool rbr_check_api_key(char **newval, void **extra, GucSource source);
extern const char *rbr_show_api_key(void);
extern char *rbr_grader_messages_json(RbrPolicy *pol, int prop, Jsonb *prompt,
									  const char *completion);
extern char *rbr_grader_body(RbrGradeJob *job, int token_param);
extern int	rbr_grader_token_param(void);
extern void rbr_grader_switch_token_param(int from);
extern bool rbr_grader_parse_answer(const char *body, size_t len, RbrGradeResult *res,
									void **json_holder);
extern char *rbr_grader_error_reason(long status, const char *body, size_t len,
									 char **param, void **json_holder);
extern char *rbr_error_classify(long status, const char *body, size_t len,
								int body_param, bool *retry_now, bool *final,
								void **json_holder, bool *token_switch);
extern void rbr_generator_switch_token_param(int from);
extern char *rbr_grader_scrub(const char *msg);
extern void rbr_grader_endpoint(RbrEndpoint *ep);
extern int	rbr_prompt_messages(Jsonb *prompt, char ***roles, char ***contents);
extern void rbr_grader_cache_key(RbrGradeJob *job);
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
extern char *rbr_generator_url;
extern char *rbr_generator_model;
extern char *rbr_generator_api_key;
extern char *rbr_generator_extra_headers;
extern double rbr_generator_temperature;
extern int	rbr_generator_max_tokens;
extern int	rbr_generator_timeout_ms;
extern int	rbr_generator_token_parameter;
extern char *rbr_generator_request_options;
extern char *rbr_merge_request_options(const char *body, const char *options);
extern bool rbr_check_request_options(char **newval, void **extra, GucSource source);
extern void rbr_generator_init_settings(void);
extern void rbr_generator_endpoint(RbrEndpoint *ep);
extern char *rbr_generator_body(RbrGradeJob *job, int token_param);
/* grader.c reads the generator's answers too (same JSON helpers) */
extern bool rbr_generator_parse_answer(const char *body, size_t len, RbrGradeResult *res,
									   void **json_holder);

#endif							/* RBR_GRADER_H */
