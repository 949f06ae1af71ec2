/*
 * cache.c: the answer caches: grader answers (table rbr.grade_cache) and
 * generated completions (table rbr.generation_cache, at the end).
 *
 * The key of a grader answer (rbr_grader_cache_key(), grader.c) is the
 * sha256 of everything that decides it: the endpoint kind (openai or azure),
 * the model, the method and number of samples, the API, and the whole
 * request body. Not in the key: the URL, the key, the token-limit
 * parameter's name (max_tokens and max_completion_tokens ask for the same
 * limit). Only successful answers are stored; errors never are.
 *
 * No role but the extension's owner may read or write the caches: every
 * lookup and insert here runs as that owner (owner.c), so a role can neither
 * plant answers that others receive as cached nor read what others graded.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "common/cryptohash.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"

#include "grader.h"
#include "owner.h"

/* A bytea Datum holding a 32-byte cache key. */
Datum
rbr_cache_key_datum(const uint8 *key)
{
	bytea	   *b = palloc(VARHDRSZ + 32);

	SET_VARSIZE(b, VARHDRSZ + 32);
	memcpy(VARDATA(b), key, 32);
	return PointerGetDatum(b);
}

/* Fills a job from a cached row; false if the row is unusable. */
typedef bool (*CachedRowFill) (RbrGradeJob *job, HeapTuple tup, TupleDesc td, MemoryContext caller);

/* An entry of the index of jobs by cache key: the first job with the key. */
typedef struct KeyEntry
{
	uint8		key[32];
	int			first;
} KeyEntry;

/*
 * Look up every job's key with sql (a SELECT whose first column is the key
 * and whose $1 is the array of keys). For each row found, fill() every job
 * that has its key and is not done yet; such jobs end done, ok, cached, with
 * no attempts or tokens. Several jobs may share a key; a hash index finds
 * them without scanning all jobs per row.
 */
static void
cache_lookup(RbrGradeJob *jobs, int njobs, const char *sql, const char *what, CachedRowFill fill)
{
	MemoryContext caller = CurrentMemoryContext;
	Datum	   *keys;
	int		   *next;
	HTAB	   *index;
	HASHCTL		ctl;
	Oid			argtypes[1] = {BYTEAARRAYOID};
	Datum		args[1];
	int			ret;

	if (njobs == 0)
		return;
	keys = palloc(sizeof(Datum) * njobs);
	next = palloc(sizeof(int) * njobs);
	ctl.keysize = 32;
	ctl.entrysize = sizeof(KeyEntry);
	ctl.hcxt = CurrentMemoryContext;
	index = hash_create("rbr cache lookup", njobs, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	for (int i = njobs - 1; i >= 0; i--)
	{
		bool		found;
		KeyEntry   *e = hash_search(index, jobs[i].key, HASH_ENTER, &found);

		next[i] = found ? e->first : -1;
		e->first = i;
		keys[i] = rbr_cache_key_datum(jobs[i].key);
	}
	args[0] = PointerGetDatum(construct_array(keys, njobs, BYTEAOID, -1, false, TYPALIGN_INT));

	SPI_connect();
	ret = rbr_spi_execute_as_owner(sql, 1, argtypes, args, NULL, true, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "rbr: %s lookup failed: %s", what, SPI_result_code_string(ret));
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	tup = SPI_tuptable->vals[r];
		TupleDesc	td = SPI_tuptable->tupdesc;
		bool		isnull;
		bytea	   *k = DatumGetByteaPP(SPI_getbinval(tup, td, 1, &isnull));
		KeyEntry   *e;

		if (isnull || VARSIZE_ANY_EXHDR(k) != 32 ||
			(e = hash_search(index, VARDATA_ANY(k), HASH_FIND, NULL)) == NULL)
			continue;
		for (int i = e->first; i >= 0; i = next[i])
		{
			RbrGradeResult *res = &jobs[i].result;

			if (jobs[i].done || !fill(&jobs[i], tup, td, caller))
				continue;
			jobs[i].done = true;
			res->ok = true;
			res->cached = true;
			res->attempts = 0;
			res->prompt_tokens = 0;
			res->completion_tokens = 0;
		}
	}
	SPI_finish();
	hash_destroy(index);
	pfree(next);
	pfree(keys);
	pfree(DatumGetPointer(args[0]));
}

/* Fill a grading job from a row of rbr.grade_cache (key, probability, method, yes_no_mass, model, samples). */
static bool
fill_grade(RbrGradeJob *job, HeapTuple tup, TupleDesc td, MemoryContext caller)
{
	RbrGradeResult *res = &job->result;
	bool		isnull;
	double		p = DatumGetFloat8(SPI_getbinval(tup, td, 2, &isnull));
	char	   *method = SPI_getvalue(tup, td, 3);
	Datum		massd = SPI_getbinval(tup, td, 4, &isnull);
	char	   *model = SPI_getvalue(tup, td, 5);
	bool		nosamples;
	Datum		samplesd = SPI_getbinval(tup, td, 6, &nosamples);

	res->samples = nosamples ? 1 : DatumGetInt32(samplesd);
	res->probability = p;
	res->method = (method && strcmp(method, "text") == 0) ? "text"
		: (method && strcmp(method, "sampled") == 0) ? "sampled" : "logprobs";
	res->yes_no_mass = isnull ? NAN : DatumGetFloat8(massd);
	res->model = model ? MemoryContextStrdup(caller, model) : NULL;
	return true;
}

/* Mark every job whose answer is in the cache as done (cached, 0 attempts). */
void
rbr_cache_lookup(RbrGradeJob *jobs, int njobs, const char *const *props pg_attribute_unused())
{
	cache_lookup(jobs, njobs,
				 "SELECT key, probability, method, yes_no_mass, model, samples "
				 "FROM rbr.grade_cache WHERE key OPERATOR(pg_catalog.=) ANY ($1)", "cache", fill_grade);
}

/* Rows for one INSERT, gathered column by column; see batch_insert(). */
typedef struct ColumnBatch
{
	int			ncols;
	int			nrows;
	const Oid  *elemtypes;		/* element type of each column */
	Datum	  **v;				/* v[column][row] */
	bool	  **nulls;
} ColumnBatch;

/* Room for up to maxrows rows of ncols columns of the given types. */
static void
batch_init(ColumnBatch *b, int ncols, const Oid *elemtypes, int maxrows)
{
	b->ncols = ncols;
	b->nrows = 0;
	b->elemtypes = elemtypes;
	b->v = palloc(sizeof(Datum *) * ncols);
	b->nulls = palloc(sizeof(bool *) * ncols);
	for (int c = 0; c < ncols; c++)
	{
		b->v[c] = palloc(sizeof(Datum) * Max(maxrows, 1));
		b->nulls[c] = palloc0(sizeof(bool) * Max(maxrows, 1));
	}
}

/*
 * Run sql (an INSERT ... SELECT FROM ROWS FROM (unnest($1), ...)) with one
 * array parameter per column holding the gathered rows, then free them.
 */
static void
batch_insert(ColumnBatch *b, const char *sql, const char *what)
{
	Oid		   *argtypes = palloc(sizeof(Oid) * b->ncols);
	Datum	   *args = palloc(sizeof(Datum) * b->ncols);
	int			ret;

	for (int c = 0; c < b->ncols; c++)
	{
		int16		len;
		bool		byval;
		char		align;
		int			dims[1] = {b->nrows};
		int			lbs[1] = {1};

		get_typlenbyvalalign(b->elemtypes[c], &len, &byval, &align);
		argtypes[c] = get_array_type(b->elemtypes[c]);
		args[c] = PointerGetDatum(construct_md_array(b->v[c], b->nulls[c], 1, dims, lbs,
													 b->elemtypes[c], len, byval, align));
		if (!byval)
			for (int r = 0; r < b->nrows; r++)
				if (!b->nulls[c][r])
					pfree(DatumGetPointer(b->v[c][r]));
	}
	SPI_connect();
	ret = rbr_spi_execute_as_owner(sql, b->ncols, argtypes, args, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "rbr: %s insert failed: %s", what, SPI_result_code_string(ret));
	SPI_finish();
	for (int c = 0; c < b->ncols; c++)
	{
		pfree(DatumGetPointer(args[c]));
		pfree(b->v[c]);
		pfree(b->nulls[c]);
	}
	pfree(argtypes);
	pfree(args);
	pfree(b->v);
	pfree(b->nulls);
}

/*
 * Store the answers just received (ok and not from the cache) of the jobs
 * jobs[idx[0 .. n-1]]: one INSERT of them all.
 */
void
rbr_cache_store(RbrGradeJob *jobs, const int *idx, int n, const char *const *props)
{
	static const Oid types[9] = {BYTEAOID, TEXTOID, TEXTOID, FLOAT8OID, TEXTOID, FLOAT8OID, INT4OID, INT4OID, INT4OID};
	ColumnBatch b;

	batch_init(&b, 9, types, n);
	for (int k = 0; k < n; k++)
	{
		RbrGradeJob *job = &jobs[idx[k]];
		RbrGradeResult *r = &job->result;
		int			m = b.nrows;

		if (!r->ok || r->cached)
			continue;
		b.v[0][m] = rbr_cache_key_datum(job->key);
		b.v[1][m] = CStringGetTextDatum(r->model ? r->model : rbr_grader_model);
		b.v[2][m] = CStringGetTextDatum(props[idx[k]]);
		b.v[3][m] = Float8GetDatum(r->probability);
		b.v[4][m] = CStringGetTextDatum(r->method);
		b.v[5][m] = Float8GetDatum(r->yes_no_mass);
		b.nulls[5][m] = isnan(r->yes_no_mass);
		b.v[6][m] = Int32GetDatum(r->prompt_tokens);
		b.nulls[6][m] = r->prompt_tokens < 0;
		b.v[7][m] = Int32GetDatum(r->completion_tokens);
		b.nulls[7][m] = r->completion_tokens < 0;
		b.v[8][m] = Int32GetDatum(r->samples);
		b.nulls[8][m] = r->samples <= 0;
		b.nrows++;
	}
	if (b.nrows == 0)
		return;
	batch_insert(&b, "INSERT INTO rbr.grade_cache "
				 "(key, model, proposition, probability, method, yes_no_mass, prompt_tokens, completion_tokens, samples) "
				 "SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), "
				 "pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), "
				 "pg_catalog.unnest($6), pg_catalog.unnest($7), pg_catalog.unnest($8), pg_catalog.unnest($9)) "
				 "ON CONFLICT (key) DO NOTHING", "cache");
}

/* ---------------------------------------------------------------------------
 * Generation cache, table rbr.generation_cache: the completions of the
 * generator by the sha256 of what decides them (model, sampling parameters,
 * messages, sample index). Not in the key: URL, key, token parameter name.
 * ------------------------------------------------------------------------- */

#define RBR_GEN_CACHE_KEY_PREFIX "rbr-generation-cache-v1\n"

/* Compute job->key of a generation from the current settings. */
void
rbr_gen_cache_key(RbrGradeJob *job)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	const char *opts = rbr_generator_request_options ? rbr_generator_request_options : "";
	char	   *params = psprintf("temperature=%g max_tokens=%d seed=%d\n%s%s",
								  rbr_generator_temperature, rbr_generator_max_tokens, job->sample,
								  opts, opts[0] ? "\n" : "");
	const char *parts[] = {RBR_GEN_CACHE_KEY_PREFIX, "openai\n", rbr_generator_model, "\n",
	params, job->messages_json};
	bool		ok = ctx != NULL && pg_cryptohash_init(ctx) == 0;

	for (int i = 0; ok && i < (int) lengthof(parts); i++)
		ok = pg_cryptohash_update(ctx, (const uint8 *) parts[i], strlen(parts[i])) == 0;
	ok = ok && pg_cryptohash_final(ctx, job->key, sizeof(job->key)) == 0;
	pg_cryptohash_free(ctx);
	pfree(params);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute the sha256 of a generation request")));
}

/* Fill a generation job from a row of rbr.generation_cache (key, completion, finish_reason, model). */
static bool
fill_generation(RbrGradeJob *job, HeapTuple tup, TupleDesc td, MemoryContext caller)
{
	RbrGradeResult *res = &job->result;
	char	   *text = SPI_getvalue(tup, td, 2);
	char	   *finish = SPI_getvalue(tup, td, 3);
	char	   *model = SPI_getvalue(tup, td, 4);

	if (text == NULL)
		return false;
	res->text = MemoryContextStrdup(caller, text);
	res->finish_reason = finish ? MemoryContextStrdup(caller, finish) : NULL;
	res->model = model ? MemoryContextStrdup(caller, model) : NULL;
	return true;
}

/* Mark every generation whose answer is cached as done (cached, 0 attempts). */
void
rbr_gen_cache_lookup(RbrGradeJob *jobs, int njobs)
{
	cache_lookup(jobs, njobs,
				 "SELECT key, completion, finish_reason, model "
				 "FROM rbr.generation_cache WHERE key OPERATOR(pg_catalog.=) ANY ($1)", "generation cache", fill_generation);
}

/* Store the new successful generations of jobs[0 .. njobs-1]: one INSERT. */
void
rbr_gen_cache_store(RbrGradeJob *jobs, int njobs)
{
	static const Oid types[6] = {BYTEAOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, INT4OID};
	ColumnBatch b;

	batch_init(&b, 6, types, njobs);
	for (int i = 0; i < njobs; i++)
	{
		RbrGradeResult *r = &jobs[i].result;
		int			m = b.nrows;

		if (!r->ok || r->cached)
			continue;
		b.v[0][m] = rbr_cache_key_datum(jobs[i].key);
		b.v[1][m] = CStringGetTextDatum(r->model ? r->model : rbr_generator_model);
		b.v[2][m] = CStringGetTextDatum(r->text);
		b.v[3][m] = r->finish_reason ? CStringGetTextDatum(r->finish_reason) : (Datum) 0;
		b.nulls[3][m] = r->finish_reason == NULL;
		b.v[4][m] = Int32GetDatum(r->prompt_tokens);
		b.nulls[4][m] = r->prompt_tokens < 0;
		b.v[5][m] = Int32GetDatum(r->completion_tokens);
		b.nulls[5][m] = r->completion_tokens < 0;
		b.nrows++;
	}
	if (b.nrows == 0)
		return;
	batch_insert(&b, "INSERT INTO rbr.generation_cache "
				 "(key, model, completion, finish_reason, prompt_tokens, completion_tokens) "
				 "SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), "
				 "pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), "
				 "pg_catalog.unnest($6)) "
				 "ON CONFLICT (key) DO NOTHING", "generation cache");
}
