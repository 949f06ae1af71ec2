/*
 * model.c: scoring with a stored model, rbr_reward(model, response_type,
 * features, base_reward).
 *
 * A model is one fitted weight vector per response type, stored in
 * rbr.model by rbr_model_save(). Weights are cached per backend and reloaded
 * when rbr.model changes (rbr_tables_generation()).
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "rbr.h"

#define MODEL_KEY_MAX (2 * NAMEDATALEN + 2)

typedef struct ModelCacheEntry
{
	char		key[MODEL_KEY_MAX];	/* "model\x1fresponse_type" */
	uint64		generation;
	int			d;
	double	   *weights;		/* in CacheMemoryContext */
} ModelCacheEntry;

static HTAB *model_cache = NULL;

static void model_row_error(const char *model, const char *rt, const char *why) pg_attribute_noreturn();

/* ERROR: a stored model row cannot be scored with. */
static void
model_row_error(const char *model, const char *rt, const char *why)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("model \"%s\" has unusable weights for response type \"%s\": %s", model, rt, why),
			 errhint("Store the model again with rbr_model_save(); weights must be finite numbers, one per feature.")));
}

/* Read a model's weights for a response type from rbr.model. */
static void
load_model(ModelCacheEntry *entry, const char *model, const char *rt)
{
	Datum		args[2] = {CStringGetTextDatum(model), CStringGetTextDatum(rt)};
	Oid			argtypes[2] = {TEXTOID, TEXTOID};
	int			ret;

	SPI_connect();
	ret = SPI_execute_with_args("SELECT weights FROM rbr.model "
								"WHERE name OPERATOR(pg_catalog.=) $1 AND response_type OPERATOR(pg_catalog.=) $2",
								2, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "rbr: reading rbr.model failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
	{
		SPI_finish();
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("model \"%s\" has no weights for response type \"%s\"", model, rt),
				 errhint("Fit and store it with rbr_model_save(); rbr.model lists the stored models.")));
	}
	else
	{
		bool		isnull;
		Datum		wd = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		ArrayType  *w;
		int			d;
		const double *wv;

		/* a stored row is data: check it before reading a weight of it */
		if (isnull)
			model_row_error(model, rt, "its weights are NULL");
		w = DatumGetArrayTypeP(wd);
		if (ARR_ELEMTYPE(w) != FLOAT8OID || ARR_NDIM(w) > 1)
			model_row_error(model, rt, "its weights are not a one-dimensional float8 array");
		if (ARR_HASNULL(w))
			model_row_error(model, rt, "a weight is NULL");
		d = ARR_NDIM(w) == 0 ? 0 : ARR_DIMS(w)[0];
		if (d < 0 || ARR_SIZE(w) < ARR_DATA_OFFSET(w) + (Size) d * sizeof(double))
			model_row_error(model, rt, "its weights array is shorter than its dimension");
		wv = (const double *) ARR_DATA_PTR(w);
		for (int i = 0; i < d; i++)
			if (isnan(wv[i]) || isinf(wv[i]))
				model_row_error(model, rt, psprintf("weight %d is %g", i + 1, wv[i]));

		if (entry->weights)
			pfree(entry->weights);
		entry->weights = MemoryContextAlloc(CacheMemoryContext, sizeof(double) * Max(d, 1));
		memcpy(entry->weights, wv, sizeof(double) * d);
		entry->d = d;
	}
	SPI_finish();
}

/*
 * What one call site (fn_extra) scored with recently: per (model, response
 * type) argument pair, the raw arguments, the generation of rbr's tables then,
 * and a copy of the weights. Scoring a table (whose rows mix a few response
 * types) then costs a few comparisons per row instead of a hash look-up.
 */
#define MODEL_MEMO_SLOTS 8

typedef struct ModelMemo
{
	uint64		generation;		/* 0: slot unused */
	int			model_len;
	int			rt_len;
	char		model_raw[NAMEDATALEN];
	char		rt_raw[NAMEDATALEN];
	char		model[NAMEDATALEN];	/* as given */
	char		rt[NAMEDATALEN];	/* folded */
	int			d;
	double	   *weights;		/* in fn_mcxt */
} ModelMemo;

typedef struct ModelMemos
{
	int			next;			/* slot to replace next (round robin) */
	ModelMemo	slot[MODEL_MEMO_SLOTS];
} ModelMemos;

/* The weights of (model, response type), through the call site's memo and the backend cache. */
static ModelMemo *
model_weights(FunctionCallInfo fcinfo, text *model_arg, text *rt_arg)
{
	ModelMemos *memos = (ModelMemos *) fcinfo->flinfo->fn_extra;
	ModelMemo  *memo;
	int			mlen = VARSIZE_ANY_EXHDR(model_arg);
	int			rlen = VARSIZE_ANY_EXHDR(rt_arg);
	uint64		gen = rbr_tables_generation();
	char	   *model;
	char	   *rt;
	char		key[MODEL_KEY_MAX];
	ModelCacheEntry *entry;
	bool		found;

	if (memos == NULL)
		memos = fcinfo->flinfo->fn_extra = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(ModelMemos));
	for (int i = 0; i < MODEL_MEMO_SLOTS; i++)
	{
		memo = &memos->slot[i];
		if (memo->generation == gen && memo->model_len == mlen && memo->rt_len == rlen &&
			memcmp(memo->model_raw, VARDATA_ANY(model_arg), mlen) == 0 &&
			memcmp(memo->rt_raw, VARDATA_ANY(rt_arg), rlen) == 0)
			return memo;
	}

	model = text_to_cstring(model_arg);
	rt = rbr_fold_name(text_to_cstring(rt_arg));
	if (mlen >= NAMEDATALEN || rlen >= NAMEDATALEN || strlen(rt) >= NAMEDATALEN)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("model or response type name is too long")));
	if (model_cache == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = MODEL_KEY_MAX;
		ctl.entrysize = sizeof(ModelCacheEntry);
		ctl.hcxt = CacheMemoryContext;
		model_cache = hash_create("rbr model cache", 16, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}
	snprintf(key, sizeof(key), "%s\x1f%s", model, rt);
	entry = hash_search(model_cache, key, HASH_ENTER, &found);
	if (!found)
	{
		entry->weights = NULL;
		entry->generation = 0;
	}
	if (entry->generation != gen)
	{
		load_model(entry, model, rt);
		entry->generation = gen;
	}

	memo = &memos->slot[memos->next];
	memos->next = (memos->next + 1) % MODEL_MEMO_SLOTS;
	if (memo->weights != NULL)
		pfree(memo->weights);
	memo->weights = MemoryContextAlloc(fcinfo->flinfo->fn_mcxt, sizeof(double) * Max(entry->d, 1));
	memcpy(memo->weights, entry->weights, sizeof(double) * entry->d);
	memo->d = entry->d;
	memo->generation = gen;
	memo->model_len = mlen;
	memo->rt_len = rlen;
	memcpy(memo->model_raw, VARDATA_ANY(model_arg), mlen);
	memcpy(memo->rt_raw, VARDATA_ANY(rt_arg), rlen);
	strlcpy(memo->model, model, NAMEDATALEN);
	strlcpy(memo->rt, rt, NAMEDATALEN);
	return memo;
}

PG_FUNCTION_INFO_V1(rbr_model_reward);
/* rbr_reward(model, response_type, features, base_reward): with stored weights. */
Datum
rbr_model_reward(PG_FUNCTION_ARGS)
{
	ModelMemo  *m = model_weights(fcinfo, PG_GETARG_TEXT_PP(0), PG_GETARG_TEXT_PP(1));
	ArrayType  *x = PG_GETARG_ARRAYTYPE_P(2);
	double		sum = PG_GETARG_FLOAT8(3);
	int			nx;
	const double *xv;

	if (ARR_NDIM(x) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("features must be a one-dimensional array")));
	nx = ARR_NDIM(x) == 0 ? 0 : ARR_DIMS(x)[0];
	if (nx != m->d)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("model \"%s\" has %d weights for response type \"%s\", but %d features were given",
						m->model, m->d, m->rt, nx),
				 errhint("Pass the features in the order of rbr.model.feature_names.")));
	if (ARR_HASNULL(x))
		PG_RETURN_NULL();
	rbr_check_finite(sum, "base_reward");
	xv = (const double *) ARR_DATA_PTR(x);
	for (int i = 0; i < nx; i++)
		sum += m->weights[i] * xv[i];
	if (unlikely(isnan(sum) || isinf(sum)))
	{
		for (int i = 0; i < nx; i++)
			rbr_check_finite(xv[i], psprintf("feature %d", i + 1));
		rbr_check_finite(sum, "the reward");
	}
	PG_RETURN_FLOAT8(sum);
}
