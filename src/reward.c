/*
 * reward.c: the total reward R_tot = R_rm + w . phi of one completion.
 *
 * rbr_reward(weights, features, base_reward) is the per-row hot path of
 * scoring queries, so it reads both arrays in place (no deconstruction into
 * Datums) and does nothing but checks and one dot product.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "utils/array.h"

#include "rbr.h"

/* Reject NaN and infinite values with a message naming what was wrong. */
void
rbr_check_finite(double v, const char *what)
{
	if (isnan(v) || isinf(v))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("%s is %s", what, isnan(v) ? "NaN" : "infinite"),
				 errhint("Rewards are computed from finite numbers only.")));
}

/* Check a float8[] is one-dimensional; returns its length. */
static inline int
float8_vector_length(ArrayType *a, const char *what)
{
	if (ARR_NDIM(a) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a one-dimensional array", what),
				 errdetail("It has %d dimensions.", ARR_NDIM(a))));
	Assert(ARR_ELEMTYPE(a) == FLOAT8OID);
	return ARR_NDIM(a) == 0 ? 0 : ARR_DIMS(a)[0];
}

PG_FUNCTION_INFO_V1(rbr_reward);
/* rbr_reward(weights, features, base_reward): base_reward + weights . features. */
Datum
rbr_reward(PG_FUNCTION_ARGS)
{
	ArrayType  *w = PG_GETARG_ARRAYTYPE_P(0);
	ArrayType  *x = PG_GETARG_ARRAYTYPE_P(1);
	double		base = PG_GETARG_FLOAT8(2);
	int			nw = float8_vector_length(w, "weights");
	int			nx = float8_vector_length(x, "features");
	const double *wv;
	const double *xv;
	double		sum = 0.0;

	if (nw != nx)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("weights and features differ in length"),
				 errdetail("There are %d weights and %d features.", nw, nx),
				 errhint("Use the feature list of the response type the weights were fitted for: rbr_feature_names().")));
	if (ARR_HASNULL(w))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("weights contain NULL"),
				 errhint("Every feature needs a weight; use 0 for a feature that should not count.")));
	/* a feature that was not graded yet makes the reward unknown, as in SQL */
	if (ARR_HASNULL(x))
		PG_RETURN_NULL();

	rbr_check_finite(base, "base_reward");
	wv = (const double *) ARR_DATA_PTR(w);
	xv = (const double *) ARR_DATA_PTR(x);
	for (int i = 0; i < nw; i++)
		sum += wv[i] * xv[i];
	/* one check of the sum catches any NaN or infinite weight or feature */
	if (unlikely(isnan(sum) || isinf(sum)))
	{
		for (int i = 0; i < nw; i++)
		{
			rbr_check_finite(wv[i], psprintf("weight %d", i + 1));
			rbr_check_finite(xv[i], psprintf("feature %d", i + 1));
		}
		rbr_check_finite(sum, "the weighted sum of the features");
	}
	sum += base;
	if (unlikely(isinf(sum)))
		rbr_check_finite(sum, "the reward");
	PG_RETURN_FLOAT8(sum);
}
