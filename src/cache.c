/*
 * cache.c: the answer cache, table rbr.grade_cache.
 *
 * The key is the sha256 of everything that decides an answer: the endpoint
 * kind (openai or azure), the model, the request's messages (template,
 * proposition prompt, conversation, completion) and the answer-shaping
 * request parameters. Not in the key: the URL, the key, the token-limit
 * parameter's name (max_tokens and max_completion_tokens ask for the same
 * one token). Only successful answers are stored; errors never are.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "common/cryptohash.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "grader.h"

/* Version of the key layout; bump it when the request format changes. */
#define RBR_CACHE_KEY_PREFIX "rbr-grade-cache-v1\n"
#define RBR_CACHE_PARAMS "temperature=0 logprobs=true top_logprobs=20 output_tokens=1"

/* Compute job->key from the current settings and job->messages_json. */
void
rbr_cache_key(RbrGradeJob *job)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	const char *kind = rbr_grader_azure_api_version[0] ? "azure" : "openai";
	const char *parts[] = {RBR_CACHE_KEY_PREFIX, kind, "\n", rbr_grader_model, "\n",
	RBR_CACHE_PARAMS, "\n", job->messages_json};
	bool		ok = ctx != NULL && pg_cryptohash_init(ctx) == 0;

	for (int i = 0; ok && i < (int) lengthof(parts); i++)
		ok = pg_cryptohash_update(ctx, (const uint8 *) parts[i], strlen(parts[i])) == 0;
	ok = ok && pg_cryptohash_final(ctx, job->key, sizeof(job->key)) == 0;
	pg_cryptohash_free(ctx);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute the sha256 of a grader request")));
}

/* A bytea Datum holding a 32-byte key. */
static Datum
key_datum(const uint8 *key)
{
	bytea	   *b = palloc(VARHDRSZ + 32);

	SET_VARSIZE(b, VARHDRSZ + 32);
	memcpy(VARDATA(b), key, 32);
	return PointerGetDatum(b);
}

/* Mark every job whose answer is in the cache as done (cached, 0 attempts). */
void
rbr_cache_lookup(RbrGradeJob *jobs, int njobs, const char *const *props pg_attribute_unused())
{
	MemoryContext caller = CurrentMemoryContext;
	Datum	   *keys = palloc(sizeof(Datum) * Max(njobs, 1));
	Oid			argtypes[1] = {BYTEAARRAYOID};
	Datum		args[1];
	int			ret;

	if (njobs == 0)
		return;
	for (int i = 0; i < njobs; i++)
		keys[i] = key_datum(jobs[i].key);
	args[0] = PointerGetDatum(construct_array(keys, njobs, BYTEAOID, -1, false, TYPALIGN_INT));

	SPI_connect();
	ret = SPI_execute_with_args("SELECT key, probability, method, yes_no_mass, model "
								"FROM rbr.grade_cache WHERE key = ANY ($1)",
								1, argtypes, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "rbr: cache lookup failed: %s", SPI_result_code_string(ret));
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	td = SPI_tuptable->tupdesc;
		bool		isnull;
		bytea	   *k = DatumGetByteaPP(SPI_getbinval(tup, td, 1, &isnull));
		double		p = DatumGetFloat8(SPI_getbinval(tup, td, 2, &isnull));
		char	   *method = SPI_getvalue(tup, td, 3);
		Datum		massd = SPI_getbinval(tup, td, 4, &isnull);
		double		mass = isnull ? NAN : DatumGetFloat8(massd);
		char	   *model = SPI_getvalue(tup, td, 5);

		if (VARSIZE_ANY_EXHDR(k) != 32)
			continue;
		for (int i = 0; i < njobs; i++)
		{
			RbrGradeResult *res = &jobs[i].result;

			if (jobs[i].done || memcmp(jobs[i].key, VARDATA_ANY(k), 32) != 0)
				continue;
			jobs[i].done = true;
			res->ok = true;
			res->cached = true;
			res->probability = p;
			res->method = (method && strcmp(method, "text") == 0) ? "text" : "logprobs";
			res->yes_no_mass = mass;
			res->model = model ? MemoryContextStrdup(caller, model) : NULL;
			res->attempts = 0;
			res->prompt_tokens = 0;
			res->completion_tokens = 0;
		}
	}
	SPI_finish();
}

/* Store the answers just received (ok and not from the cache). */
void
rbr_cache_store(RbrGradeJob *jobs, int njobs, const char *const *props)
{
	Oid			argtypes[8] = {BYTEAOID, TEXTOID, TEXTOID, FLOAT8OID, TEXTOID, FLOAT8OID, INT4OID, INT4OID};
	SPIPlanPtr	plan = NULL;
	bool		any = false;

	for (int i = 0; i < njobs; i++)
		any |= jobs[i].result.ok && !jobs[i].result.cached;
	if (!any)
		return;
	SPI_connect();
	plan = SPI_prepare("INSERT INTO rbr.grade_cache "
					   "(key, model, proposition, probability, method, yes_no_mass, prompt_tokens, completion_tokens) "
					   "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key) DO NOTHING",
					   8, argtypes);
	if (plan == NULL)
		elog(ERROR, "rbr: could not prepare the cache insert: %s", SPI_result_code_string(SPI_result));
	for (int i = 0; i < njobs; i++)
	{
		RbrGradeResult *r = &jobs[i].result;
		Datum		v[8];
		char		nulls[8] = "        ";
		int			ret;

		if (!r->ok || r->cached)
			continue;
		v[0] = key_datum(jobs[i].key);
		v[1] = CStringGetTextDatum(r->model ? r->model : rbr_grader_model);
		v[2] = CStringGetTextDatum(props[i]);
		v[3] = Float8GetDatum(r->probability);
		v[4] = CStringGetTextDatum(r->method);
		v[5] = Float8GetDatum(r->yes_no_mass);
		if (isnan(r->yes_no_mass))
			nulls[5] = 'n';
		v[6] = Int32GetDatum(r->prompt_tokens);
		if (r->prompt_tokens < 0)
			nulls[6] = 'n';
		v[7] = Int32GetDatum(r->completion_tokens);
		if (r->completion_tokens < 0)
			nulls[7] = 'n';
		ret = SPI_execute_plan(plan, v, nulls, false, 0);
		if (ret != SPI_OK_INSERT)
			elog(ERROR, "rbr: cache insert failed: %s", SPI_result_code_string(ret));
	}
	SPI_finish();
}
