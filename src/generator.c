/*
 * generator.c: the generator of synthetic completions. Its settings
 * (rbr.generator_*), the request it sends, and the SQL functions
 * rbr_generate_many() and rbr_generator_request().
 *
 * A generation job is one sampled completion for (conversation, instruction,
 * sample index). It runs through the grader's libcurl multi engine (http.c)
 * with the generator's endpoint: same retries, backoff, concurrency, rate
 * limit and cancellation; only the body and the reading of the answer
 * differ. Request layout:
 *   messages[0] system: the instruction (see synth.c for how rbr_synthesize
 *     builds it from the policy)
 *   messages[1..] the conversation, roles in lower case, content as text
 *   temperature rbr.generator_temperature, rbr.generator_max_tokens through
 *   the token parameter in use (shared with the grader), "seed" = the sample
 *   index, so that sample k of a question is a different request from sample
 *   k+1 and, on endpoints that honour seeds, reproducible.
 * Answers (choices[0].message.content, finish_reason, usage) are cached in
 * rbr.generation_cache under the sha256 of everything that decides them,
 * sample index included; errors are never cached.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/jsonb.h"

#include "batch.h"
#include "grader.h"

char	   *rbr_generator_model = NULL;
double		rbr_generator_temperature = 1.0;
int			rbr_generator_max_tokens = 1024;
int			rbr_generator_timeout_ms = 120000;
int			rbr_generator_token_parameter = RBR_TOKENS_MAX_COMPLETION_TOKENS;
char	   *rbr_generator_request_options = NULL;

/* The automatic switch: parameter to use while the setting is 'switched_from'. */
static int	gen_token_switched_from = -1;

static const struct config_enum_entry gen_token_parameter_options[] = {
	{"max_completion_tokens", RBR_TOKENS_MAX_COMPLETION_TOKENS, false},
	{"max_tokens", RBR_TOKENS_MAX_TOKENS, false},
	{NULL, 0, false}
};

static char *generator_classify_failure(long status, const char *body, size_t len, int body_param,
										bool *retry_now, bool *final, void **json_holder);

/* Define the generator's settings. Called from _PG_init. */
void
rbr_generator_init_settings(void)
{
	DefineCustomStringVariable("rbr.generator_model",
							   "Model that generates synthetic completions (a helpful-only model).",
							   NULL, &rbr_generator_model, "gpt-4o-mini",
							   PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("rbr.generator_temperature",
							 "Sampling temperature of generation requests.",
							 NULL, &rbr_generator_temperature, 1.0, 0.0, 2.0,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.generator_max_tokens",
							"Most tokens of one generated completion.",
							NULL, &rbr_generator_max_tokens, 1024, 1, 100000,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.generator_timeout_ms",
							"Timeout of one generation request attempt.",
							NULL, &rbr_generator_timeout_ms, 120000, 100, 600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomEnumVariable("rbr.generator_token_parameter",
							 "Request parameter that limits the length of a generated completion.",
							 "A backend switches to the other one once if the endpoint rejects it.",
							 &rbr_generator_token_parameter, RBR_TOKENS_MAX_COMPLETION_TOKENS,
							 gen_token_parameter_options, PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("rbr.generator_request_options",
							   "JSON object merged into every generation request body; a key set to null removes rbr's own field.",
							   NULL, &rbr_generator_request_options, "",
							   PGC_USERSET, 0, rbr_check_request_options, NULL, NULL);
}

/* The generator's token parameter in use: the setting, or the other after a switch. */
static int
generator_token_param(void)
{
	if (gen_token_switched_from == rbr_generator_token_parameter)
		return 1 - rbr_generator_token_parameter;
	return rbr_generator_token_parameter;
}

/* The endpoint rejected parameter 'from': the generator uses the other from now on. */
void
rbr_generator_switch_token_param(int from)
{
	if (from == rbr_generator_token_parameter)
	{
		gen_token_switched_from = from;
		ereport(NOTICE,
				(errmsg("the generator endpoint rejected \"%s\"; this session now sends \"%s\"",
						from == RBR_TOKENS_MAX_TOKENS ? "max_tokens" : "max_completion_tokens",
						from == RBR_TOKENS_MAX_TOKENS ? "max_completion_tokens" : "max_tokens"),
				 errhint("Set rbr.generator_token_parameter to avoid the first rejected request.")));
	}
	else
		gen_token_switched_from = -1;
}

/* The generator's classification of a failed answer (token-parameter switch). */
static char *
generator_classify_failure(long status, const char *body, size_t len, int body_param,
						   bool *retry_now, bool *final, void **json_holder)
{
	bool		token_switch;
	char	   *reason = rbr_error_classify(status, body, len, body_param, retry_now, final,
											json_holder, &token_switch);

	if (token_switch)
	{
		if (generator_token_param() == body_param)
			rbr_generator_switch_token_param(body_param);
		*retry_now = true;
		*final = false;
	}
	return reason;
}

/* The generator's endpoint, from the rbr.generator_* settings. */
void
rbr_generator_endpoint(RbrEndpoint *ep)
{
	ep->kind = RBR_JOB_GENERATE;
	rbr_secrets_endpoint(ep);
	ep->model = rbr_generator_model;
	ep->timeout_ms = rbr_generator_timeout_ms;
	ep->path = "chat/completions";
	ep->build_body = rbr_generator_body;
	ep->read_answer = rbr_generator_parse_answer;
	ep->token_param = generator_token_param;
	ep->classify_failure = generator_classify_failure;
	ep->scrub = rbr_grader_scrub;
	ep->max_in_flight = rbr_grader_max_in_flight;
	ep->max_retries = rbr_grader_max_retries;
	ep->retry_base_ms = rbr_grader_retry_base_ms;
	ep->requests_per_second = rbr_grader_requests_per_second;
}

/* The "messages" JSON array: the instruction, then the conversation. */
static char *
generator_messages_json(Jsonb *prompt, const char *instruction)
{
	char	  **roles,
			  **contents;
	int			n = rbr_prompt_messages(prompt, &roles, &contents);
	StringInfoData out;

	initStringInfo(&out);
	appendStringInfoString(&out, "[{\"role\": \"system\", \"content\": ");
	escape_json(&out, instruction);
	appendStringInfoChar(&out, '}');
	for (int i = 0; i < n; i++)
	{
		for (char *p = roles[i]; *p; p++)
			*p = pg_tolower((unsigned char) *p);
		appendStringInfoString(&out, ", {\"role\": ");
		escape_json(&out, roles[i]);
		appendStringInfoString(&out, ", \"content\": ");
		escape_json(&out, contents[i]);
		appendStringInfoChar(&out, '}');
	}
	appendStringInfoChar(&out, ']');
	return out.data;
}

/* The "messages" JSON array of a generation request (for cost.c's plans). */
char *
rbr_generator_messages_json(Jsonb *prompt, const char *instruction)
{
	return generator_messages_json(prompt, instruction);
}

/* The full request body of a generation job with the given token parameter. */
char *
rbr_generator_body(RbrGradeJob *job, int token_param)
{
	StringInfoData b;
	char		temp[32];

	snprintf(temp, sizeof(temp), "%g", rbr_generator_temperature);
	initStringInfo(&b);
	appendStringInfoString(&b, "{\"model\": ");
	escape_json(&b, rbr_generator_model);
	appendStringInfo(&b, ", \"messages\": %s, \"temperature\": %s, \"%s\": %d, \"seed\": %d}",
					 job->messages_json, temp,
					 token_param == RBR_TOKENS_MAX_TOKENS ? "max_tokens" : "max_completion_tokens",
					 rbr_generator_max_tokens, job->sample);
	return rbr_merge_request_options(b.data, rbr_generator_request_options);
}

/* A cache key seen in one call, and the job that asks it. */
typedef struct GenSeenKey
{
	uint8		key[32];
	int			job;
} GenSeenKey;

/*
 * Generate n completions: answers from the cache cost nothing, identical
 * requests (same cache key: conversation, instruction, sample index and
 * settings) are asked once, the rest go to the generator concurrently; new
 * answers are cached. Returns the jobs; a repeated request gets its first
 * occurrence's answer with 0 attempts and cached = true when it succeeded,
 * as rbr_grade_many does.
 */
static RbrGradeJob *
generate_all(int n, Jsonb **prompts, char **instructions, const int *samples)
{
	RbrGradeJob *jobs = palloc0(sizeof(RbrGradeJob) * Max(n, 1));
	RbrGradeJob *uniq = palloc0(sizeof(RbrGradeJob) * Max(n, 1));
	int		   *leader = palloc(sizeof(int) * Max(n, 1));	/* index in uniq */
	bool	   *first = palloc(sizeof(bool) * Max(n, 1));
	int			m = 0;
	HASHCTL		hctl;
	HTAB	   *seen;
	RbrEndpoint ep;

	memset(&hctl, 0, sizeof(hctl));
	hctl.keysize = 32;
	hctl.entrysize = sizeof(GenSeenKey);
	hctl.hcxt = CurrentMemoryContext;
	seen = hash_create("rbr generation keys", Max(n, 16), &hctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	for (int i = 0; i < n; i++)
	{
		GenSeenKey *e;
		bool		found;

		jobs[i].messages_json = generator_messages_json(prompts[i], instructions[i]);
		jobs[i].sample = samples[i];
		jobs[i].result.prompt_tokens = jobs[i].result.completion_tokens = -1;
		rbr_gen_cache_key(&jobs[i]);
		e = hash_search(seen, jobs[i].key, HASH_ENTER, &found);
		first[i] = !found;
		if (!found)
		{
			e->job = m;
			uniq[m++] = jobs[i];
		}
		leader[i] = e->job;
	}
	hash_destroy(seen);
	rbr_gen_cache_lookup(uniq, m);
	/* batch mode: the cache only; what is missing goes to (or is in) a batch */
	if (rbr_batch_active())
		rbr_batch_prepare_gen_jobs(uniq, m);
	rbr_generator_endpoint(&ep);
	rbr_http_run(&ep, uniq, m, NULL);
	rbr_gen_cache_store(uniq, m);
	for (int i = 0; i < n; i++)
	{
		RbrGradeResult *r = &jobs[i].result;

		*r = uniq[leader[i]].result;
		if (!first[i])
		{
			r->attempts = 0;
			r->prompt_tokens = r->completion_tokens = 0;
			r->cached = r->ok;
		}
		if (r->model == NULL)
			r->model = pstrdup(rbr_generator_model);
	}
	return jobs;
}

/* A sample index: 0 .. 1e9. */
static int
check_sample(int s)
{
	if (s < 0 || s > 1000000000)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("sample index %d is out of range", s),
				 errhint("Sample indexes are 0 to 1000000000.")));
	return s;
}

PG_FUNCTION_INFO_V1(rbr_generate_many);
/*
 * rbr_generate_many(prompts jsonb[], instructions text[], samples int[]):
 * one row per completion asked (ord = 1-based position), errors as rows.
 */
Datum
rbr_generate_many(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	ArrayType  *a_prompts = PG_GETARG_ARRAYTYPE_P(0);
	ArrayType  *a_instr = PG_GETARG_ARRAYTYPE_P(1);
	ArrayType  *a_samples = PG_GETARG_ARRAYTYPE_P(2);
	Datum	   *d_prompts,
			   *d_instr,
			   *d_samples;
	bool	   *n_prompts,
			   *n_instr,
			   *n_samples;
	int			n,
				n2,
				n3;
	Jsonb	  **prompts;
	char	  **instructions;
	int		   *samples;
	RbrGradeJob *jobs;

	InitMaterializedSRF(fcinfo, 0);
	deconstruct_array(a_prompts, JSONBOID, -1, false, TYPALIGN_INT, &d_prompts, &n_prompts, &n);
	deconstruct_array(a_instr, TEXTOID, -1, false, TYPALIGN_INT, &d_instr, &n_instr, &n2);
	deconstruct_array(a_samples, INT4OID, 4, true, TYPALIGN_INT, &d_samples, &n_samples, &n3);
	if (n != n2 || n != n3)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("prompts, instructions and samples must have the same length"),
				 errdetail("They have %d, %d and %d elements.", n, n2, n3)));
	prompts = palloc(sizeof(Jsonb *) * Max(n, 1));
	instructions = palloc(sizeof(char *) * Max(n, 1));
	samples = palloc(sizeof(int) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		if (n_prompts[i] || n_instr[i] || n_samples[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("element %d of the arguments is NULL", i + 1)));
		prompts[i] = DatumGetJsonbP(d_prompts[i]);
		instructions[i] = TextDatumGetCString(d_instr[i]);
		samples[i] = check_sample(DatumGetInt32(d_samples[i]));
	}
	jobs = generate_all(n, prompts, instructions, samples);

	for (int i = 0; i < n; i++)
	{
		RbrGradeResult *r = &jobs[i].result;
		Datum		v[10];
		bool		nulls[10] = {0};

		/* batch mode: asked through the Batch API, no answer yet: no row */
		if (r->pending)
			continue;

		v[0] = Int32GetDatum(i + 1);
		v[1] = CStringGetTextDatum(r->ok ? "ok" : "error");
		v[2] = r->ok ? CStringGetTextDatum(r->text) : (Datum) 0;
		nulls[2] = !r->ok;
		v[3] = r->finish_reason ? CStringGetTextDatum(r->finish_reason) : (Datum) 0;
		nulls[3] = r->finish_reason == NULL;
		v[4] = CStringGetTextDatum(r->model);
		v[5] = r->error ? CStringGetTextDatum(r->error) : (Datum) 0;
		nulls[5] = r->ok || r->error == NULL;
		v[6] = Int32GetDatum(r->attempts);
		v[7] = Int32GetDatum(r->prompt_tokens);
		nulls[7] = r->prompt_tokens < 0;
		v[8] = Int32GetDatum(r->completion_tokens);
		nulls[8] = r->completion_tokens < 0;
		v[9] = BoolGetDatum(r->cached);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
	PG_RETURN_NULL();
}

PG_FUNCTION_INFO_V1(rbr_generator_request);
/* rbr_generator_request(prompt, instruction, sample): the body sent, no network. */
Datum
rbr_generator_request(PG_FUNCTION_ARGS)
{
	RbrGradeJob job = {0};

	job.messages_json = generator_messages_json(PG_GETARG_JSONB_P(0),
												text_to_cstring(PG_GETARG_TEXT_PP(1)));
	job.sample = check_sample(PG_GETARG_INT32(2));
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in,
										CStringGetDatum(rbr_generator_body(&job, generator_token_param()))));
}
