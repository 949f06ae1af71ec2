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
#include "endpoint.h"
#include "secrets.h"

/* Settings (defined in rbr_grader_init_settings). */
extern char *rbr_grader_model;
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
extern char *rbr_error_classify(long status, const char *body, size_t len,
								int body_param, bool *retry_now, bool *final,
								void **json_holder, bool *token_switch);
extern void rbr_generator_switch_token_param(int from);
extern char *rbr_grader_scrub(const char *msg);
extern void rbr_grader_endpoint(RbrEndpoint *ep);
extern int	rbr_prompt_messages(Jsonb *prompt, char ***roles, char ***contents);
extern void rbr_grader_cache_key(RbrGradeJob *job);
extern bool rbr_grader_one_sample_per_request(void);

/* cost.c */
extern int	rbr_estimate_prompt_tokens(const char *body);
extern double rbr_grader_p_yes(const char *const *tokens, const double *logprobs, int n,
							   double *mass, bool *found);


/* cache.c */
extern Datum rbr_cache_key_datum(const uint8 *key);
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
extern int	rbr_generator_token_parameter;
extern char *rbr_generator_request_options;
extern char *rbr_merge_request_options(const char *body, const char *options);
extern bool rbr_check_request_options(char **newval, void **extra, GucSource source);
extern void rbr_generator_init_settings(void);
extern void rbr_generator_endpoint(RbrEndpoint *ep);
extern char *rbr_generator_body(RbrGradeJob *job, int token_param);
extern char *rbr_generator_messages_json(Jsonb *prompt, const char *instruction);
/* grader.c reads the generator's answers too (same JSON helpers) */
extern bool rbr_generator_parse_answer(const char *body, size_t len, RbrGradeResult *res,
									   void **json_holder);

#endif							/* RBR_GRADER_H */
