/*
 * cost.c: what grading will cost before it is sent: rbr.grade_plan(), the
 * requests and estimated tokens of a batch of questions, for dry runs
 * (rbr_featurize_estimate) and request/token budgets (rbr.featurize_budget).
 *
 * Each question's request body is built by the grader's own builder
 * (rbr_grader_messages_json, rbr_grader_body) and keyed like a real request
 * (rbr_grader_cache_key), so a question counts as free exactly when
 * rbr_grade_many would answer it without sending anything: from the cache,
 * or because an identical question came earlier in the same batch.
 *
 * Prompt tokens are estimated from the body that would be sent, with the
 * estimator of rbr_estimate_prompt_tokens(): characters of the messages'
 * text / 4 (rounded up), plus 3 tokens per message and 3 per request (the
 * chat format's overhead as OpenAI documents it for its tokenizers).
 * Completion tokens are the upper bound rbr.grader_max_answer_tokens per
 * answer counted.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
/* PostgreSQL's SQL function json_object() and json-c's type share a name */
#define json_object pg_sql_json_object
#include "utils/builtins.h"
#undef json_object
#include "utils/hsearch.h"
#include "utils/jsonb.h"

#include <json-c/json.h>

#include "grader.h"

/* Characters (not bytes) of a UTF-8 string. */
static int64
utf8_chars(const char *s)
{
	int64		n = 0;

	for (const unsigned char *p = (const unsigned char *) s; *p; p++)
		n += (*p & 0xC0) != 0x80;
	return n;
}

/*
 * Estimated prompt tokens of a chat (or Responses API) request body: the
 * text of its messages' content in characters / 4, rounded up, plus 3 per
 * message and 3 for the request. A body that is not such JSON counts as its
 * length / 4.
 */
int
rbr_estimate_prompt_tokens(const char *body)
{
	json_object *b = json_tokener_parse(body);
	json_object *msgs = NULL;
	int64		chars = 0;
	int			nmsg = 0;
	int64		tokens;

	if (b == NULL)
		return (int) ((strlen(body) + 3) / 4);
	if (!json_object_object_get_ex(b, "messages", &msgs))
		json_object_object_get_ex(b, "input", &msgs);
	if (msgs != NULL && json_object_is_type(msgs, json_type_array))
	{
		nmsg = (int) json_object_array_length(msgs);
		for (int i = 0; i < nmsg; i++)
		{
			json_object *m = json_object_array_get_idx(msgs, i);
			json_object *c = NULL;

			if (m == NULL || !json_object_object_get_ex(m, "content", &c) || c == NULL)
				continue;
			if (json_object_is_type(c, json_type_string))
				chars += utf8_chars(json_object_get_string(c));
			else if (json_object_is_type(c, json_type_array))
				for (size_t k = 0; k < json_object_array_length(c); k++)
				{
					json_object *t = NULL;

					if (json_object_object_get_ex(json_object_array_get_idx(c, k), "text", &t) &&
						json_object_is_type(t, json_type_string))
						chars += utf8_chars(json_object_get_string(t));
				}
		}
	}
	else
		chars = (int64) strlen(body);
	json_object_put(b);
	tokens = (chars + 3) / 4 + 3 * (int64) nmsg + 3;
	return (int) Min(tokens, PG_INT32_MAX);
}

/* A cache key seen in one call. */
typedef struct PlanSeenKey
{
	uint8		key[32];
} PlanSeenKey;

/* The cache keys seen in one call of a plan function, for n requests. */
static HTAB *
plan_seen_create(int n)
{
	HASHCTL		hctl;

	memset(&hctl, 0, sizeof(hctl));
	hctl.keysize = 32;
	hctl.entrysize = sizeof(PlanSeenKey);
	hctl.hcxt = CurrentMemoryContext;
	return hash_create("rbr plan keys", Max(n, 16), &hctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
}

/* Mark a job free (done) when an earlier one of the same call has its key. */
static void
plan_seen_mark(HTAB *seen, RbrGradeJob *job)
{
	bool		found;

	hash_search(seen, job->key, HASH_ENTER, &found);
	if (found)
		job->done = true;
}

/*
 * The rows of a plan function: per job (ord), whether it is free (done),
 * and, when not, its requests, their estimated prompt tokens (est[i] per
 * request) and the completion tokens they may take.
 */
static void
plan_emit(ReturnSetInfo *rsinfo, const RbrGradeJob *jobs, const int *est, int n, int requests,
		  int completion_tokens)
{
	for (int i = 0; i < n; i++)
	{
		bool		free_ = jobs[i].done;
		Datum		v[5];
		bool		nulls[5] = {0};

		v[0] = Int32GetDatum(i + 1);
		v[1] = BoolGetDatum(free_);
		v[2] = Int32GetDatum(free_ ? 0 : requests);
		v[3] = Int32GetDatum(free_ ? 0 : est[i] * requests);
		v[4] = Int32GetDatum(free_ ? 0 : completion_tokens);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
}

PG_FUNCTION_INFO_V1(rbr_grade_plan);
/*
 * rbr.grade_plan(policy, propositions text[], prompts jsonb[], completions
 * text[]): per question (ord = 1-based position) whether it is free (cached,
 * or asked earlier in the arrays), the requests it would send and their
 * estimated prompt and completion tokens. Sends nothing.
 */
Datum
rbr_grade_plan(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	Datum	   *d_props,
			   *d_prompts,
			   *d_compl;
	bool	   *n_props,
			   *n_prompts,
			   *n_compl;
	int			n,
				n2,
				n3;
	RbrGradeJob *jobs;
	const char **names;
	int		   *est;
	HTAB	   *seen;
	bool		sampled = rbr_grader_method == RBR_METHOD_SAMPLED;
	int			answers = sampled ? rbr_grader_samples : 1;
	int			requests = sampled && rbr_grader_one_sample_per_request() ? rbr_grader_samples : 1;
	MemoryContext work,
				old;

	InitMaterializedSRF(fcinfo, 0);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(1), TEXTOID, -1, false, TYPALIGN_INT, &d_props, &n_props, &n);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(2), JSONBOID, -1, false, TYPALIGN_INT, &d_prompts, &n_prompts, &n2);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(3), TEXTOID, -1, false, TYPALIGN_INT, &d_compl, &n_compl, &n3);
	if (n != n2 || n != n3)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("propositions, prompts and completions must have the same length"),
				 errdetail("They have %d, %d and %d elements.", n, n2, n3)));
	jobs = palloc0(sizeof(RbrGradeJob) * Max(n, 1));
	names = palloc0(sizeof(char *) * Max(n, 1));
	est = palloc0(sizeof(int) * Max(n, 1));
	seen = plan_seen_create(n);
	work = AllocSetContextCreate(CurrentMemoryContext, "rbr grade plan", ALLOCSET_DEFAULT_SIZES);

	for (int i = 0; i < n; i++)
	{
		int			prop;
		char	   *body;

		CHECK_FOR_INTERRUPTS();
		if (n_props[i] || n_prompts[i] || n_compl[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("element %d of the arguments is NULL", i + 1)));
		names[i] = TextDatumGetCString(d_props[i]);
		prop = rbr_policy_prop_index(pol, names[i]);
		if (prop < 0 || pol->props[prop].derived)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("policy \"%s\" has no simple proposition \"%s\"", pol->name, names[i]),
					 errhint("Check the spelling against rbr_policy_info().")));
		/* the request as rbr_grade_many builds it, keyed the same way */
		old = MemoryContextSwitchTo(work);
		jobs[i].messages_json = rbr_grader_messages_json(pol, prop, DatumGetJsonbP(d_prompts[i]),
														 TextDatumGetCString(d_compl[i]));
		rbr_grader_cache_key(&jobs[i]);
		body = rbr_grader_body(&jobs[i], rbr_grader_token_param());
		est[i] = rbr_estimate_prompt_tokens(body);
		MemoryContextSwitchTo(old);
		MemoryContextReset(work);
		jobs[i].messages_json = NULL;
		plan_seen_mark(seen, &jobs[i]);
	}
	rbr_cache_lookup(jobs, n, names);

	plan_emit(rsinfo, jobs, est, n, requests, rbr_grader_max_answer_tokens * answers);
	MemoryContextDelete(work);
	hash_destroy(seen);
	PG_RETURN_NULL();
}

PG_FUNCTION_INFO_V1(rbr_generate_plan);
/*
 * rbr.generate_plan(prompts jsonb[], instructions text[], samples int[]): per
 * completion asked (ord = 1-based position) whether it is free (in the
 * generation cache, or asked earlier in the arrays), the requests it would
 * send and their estimated prompt tokens and (at most) completion tokens,
 * rbr.generator_max_tokens. Sends nothing.
 */
Datum
rbr_generate_plan(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum	   *d_prompts,
			   *d_instr,
			   *d_samples;
	bool	   *n_prompts,
			   *n_instr,
			   *n_samples;
	int			n,
				n2,
				n3;
	RbrGradeJob *jobs;
	int		   *est;
	HTAB	   *seen;
	MemoryContext work,
				old;

	InitMaterializedSRF(fcinfo, 0);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(0), JSONBOID, -1, false, TYPALIGN_INT, &d_prompts, &n_prompts, &n);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(1), TEXTOID, -1, false, TYPALIGN_INT, &d_instr, &n_instr, &n2);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(2), INT4OID, 4, true, TYPALIGN_INT, &d_samples, &n_samples, &n3);
	if (n != n2 || n != n3)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("prompts, instructions and samples must have the same length"),
				 errdetail("They have %d, %d and %d elements.", n, n2, n3)));
	jobs = palloc0(sizeof(RbrGradeJob) * Max(n, 1));
	est = palloc0(sizeof(int) * Max(n, 1));
	seen = plan_seen_create(n);
	work = AllocSetContextCreate(CurrentMemoryContext, "rbr generate plan", ALLOCSET_DEFAULT_SIZES);

	for (int i = 0; i < n; i++)
	{
		CHECK_FOR_INTERRUPTS();
		if (n_prompts[i] || n_instr[i] || n_samples[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("element %d of the arguments is NULL", i + 1)));
		/* the request as rbr_generate_many builds it, keyed the same way */
		old = MemoryContextSwitchTo(work);
		jobs[i].messages_json = rbr_generator_messages_json(DatumGetJsonbP(d_prompts[i]),
															TextDatumGetCString(d_instr[i]));
		jobs[i].sample = DatumGetInt32(d_samples[i]);
		rbr_gen_cache_key(&jobs[i]);
		est[i] = rbr_estimate_prompt_tokens(rbr_generator_body(&jobs[i], RBR_TOKENS_MAX_COMPLETION_TOKENS));
		MemoryContextSwitchTo(old);
		MemoryContextReset(work);
		jobs[i].messages_json = NULL;
		plan_seen_mark(seen, &jobs[i]);
	}
	rbr_gen_cache_lookup(jobs, n);

	plan_emit(rsinfo, jobs, est, n, 1, rbr_generator_max_tokens);
	MemoryContextDelete(work);
	hash_destroy(seen);
	PG_RETURN_NULL();
}
