/*
 * fit.c: the rbr_fit aggregate, which fits one weight vector (per response
 * type, with GROUP BY) over ranked completions.
 *
 * Rows are collected in an RbrRowSet (rowset.c: append, combine across
 * parallel workers or Citus shards, serialize); the final function sorts
 * them canonically, so the result is the same whatever order or process the
 * rows came through. The optimisation itself is fit_solver.c, a pure C
 * library with its own unit tests.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "fit_options.h"
#include "fit_solver.h"
#include "jsonutil.h"
#include "rbr.h"
#include "rowset.h"

/* Options rbr_fit understands (see doc/reference.md). */
static const char *const fit_option_keys[] = {
	"solver", "margin", "tier_margin", "l2", "fixed_zero", "feature_names",
	"validation_fraction", "seed", "tol", "max_iter", "lr", "steps",
	"weight_decay", "beta1", "beta2", "eps", NULL
};

/* ---------------------------------------------------------------------------
 * Transition, combine, serialize
 * ------------------------------------------------------------------------- */

/* Read the float8[] features of a row; false if it holds a NULL. */
static bool
row_features(ArrayType *a, const double **x, int *d)
{
	if (ARR_NDIM(a) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("features must be a one-dimensional array")));
	if (ARR_HASNULL(a))
		return false;
	*d = ARR_NDIM(a) == 0 ? 0 : ARR_DIMS(a)[0];
	*x = (const double *) ARR_DATA_PTR(a);
	{
		/* v * 0 is 0 for a finite v, NaN otherwise: one test per row */
		double		z = 0;

		for (int i = 0; i < *d; i++)
			z += (*x)[i] * 0.0;
		if (z == 0.0)
			return true;
	}
	for (int i = 0; i < *d; i++)
		if (isnan((*x)[i]) || isinf((*x)[i]))
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("feature %d is %s", i + 1, isnan((*x)[i]) ? "NaN" : "infinite"),
					 errhint("Features are probabilities in [0,1]; regrade or drop the row.")));
	return true;
}

PG_FUNCTION_INFO_V1(rbr_fit_transfn);
/* rbr_fit transition: (group_key, tier, features, base_reward [, options]). */
Datum
rbr_fit_transfn(PG_FUNCTION_ARGS)
{
	RbrRowSet  *rs = rbr_rowset_state(fcinfo, 0, "rbr_fit");
	const double *x = NULL;
	int			d = 0;

	if (PG_NARGS() > 5 && !PG_ARGISNULL(5) && rs->options == NULL)
		rs->options = MemoryContextStrdup(rs->mcxt,
										  JsonbToCString(NULL, &PG_GETARG_JSONB_P(5)->root, 0));

	if (PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3) || PG_ARGISNULL(4) ||
		!row_features(PG_GETARG_ARRAYTYPE_P(3), &x, &d))
	{
		rs->skipped++;
		PG_RETURN_DATUM(RbrRowSetGetDatum(rs));
	}
	else
	{
		text	   *key = PG_GETARG_TEXT_PP(1);
		int32		tier = PG_GETARG_INT32(2);
		double		base = PG_GETARG_FLOAT8(4);

		rbr_check_tier(tier);
		rbr_check_finite(base, "base_reward");
		rbr_rowset_add(rs, VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key), NULL, 0, tier, base, x, d);
	}
	PG_RETURN_DATUM(RbrRowSetGetDatum(rs));
}

/* ---------------------------------------------------------------------------
 * Options
 * ------------------------------------------------------------------------- */

/* Options of one rbr_fit call, parsed, with what is echoed in the report. */
typedef struct FitOptions
{
	RbrFitOptions solver;
	double		validation_fraction;
	uint64		seed;
	int			nnames;
	char	  **names;			/* feature_names, or NULL */
	double	   *tier_margin;
	bool	   *fixed_zero;
} FitOptions;

/* ERROR about one option; a number option within [lo, hi]. */
#define option_error(key, ...) rbr_fit_option_error("rbr_fit", (key), __VA_ARGS__)
#define option_number(c, key, dflt, lo, hi) rbr_fit_option_number((c), "rbr_fit", (key), (dflt), (lo), (hi))

/* Parse the options text of the first row into o (d features). */
static void
parse_fit_options(const char *text, int d, FitOptions *o)
{
	Jsonb	   *jb;
	JsonbContainer *c;
	JsonbValue *v;

	memset(o, 0, sizeof(*o));
	rbr_fit_options_default(&o->solver);
	o->validation_fraction = 0.05;
	if (text == NULL)
	{
		o->solver.val_fraction = o->validation_fraction;
		return;
	}
	jb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(text)));
	c = rbr_fit_check_option_keys(jb, "rbr_fit", fit_option_keys,
								  "Options: solver, margin, tier_margin, l2, fixed_zero, feature_names, validation_fraction, seed, tol, max_iter, lr, steps, weight_decay, beta1, beta2, eps.");

	if ((v = rbr_obj_get(c, "solver")) != NULL)
	{
		char	   *s = v->type == jbvString ? rbr_jbv_cstring(v) : "";

		if (strcmp(s, "exact") == 0)
			o->solver.solver = RBR_SOLVER_EXACT;
		else if (strcmp(s, "adamw") == 0)
			o->solver.solver = RBR_SOLVER_ADAMW;
		else
			option_error("solver", "use \"exact\" (the default) or \"adamw\" (the paper's released fitter)");
	}
	o->solver.margin = option_number(c, "margin", o->solver.margin, 0, 1e6);
	o->solver.l2 = option_number(c, "l2", o->solver.l2, 0, 1e6);
	o->validation_fraction = option_number(c, "validation_fraction", o->validation_fraction, 0, 1);
	o->solver.val_fraction = o->validation_fraction;
	o->seed = (uint64) option_number(c, "seed", 0, 0, 9007199254740992.0);
	o->solver.seed = o->seed;
	o->solver.tol = option_number(c, "tol", o->solver.tol, 1e-15, 1);
	o->solver.max_iter = (int) option_number(c, "max_iter", o->solver.max_iter, 1, 1e6);
	o->solver.lr = option_number(c, "lr", o->solver.lr, 1e-12, 1e3);
	o->solver.steps = (int) option_number(c, "steps", o->solver.steps, 1, 1e8);
	o->solver.weight_decay = option_number(c, "weight_decay", o->solver.weight_decay, 0, 1e3);
	o->solver.beta1 = option_number(c, "beta1", o->solver.beta1, 0, 0.999999);
	o->solver.beta2 = option_number(c, "beta2", o->solver.beta2, 0, 0.99999999);
	o->solver.eps = option_number(c, "eps", o->solver.eps, 1e-300, 1);

	{
		RbrFitSharedOptions sh;

		rbr_fit_parse_shared_options(c, "rbr_fit", d, &sh);
		o->nnames = sh.nnames;
		o->names = sh.names;
		if (sh.fixed_zero != NULL)
		{
			o->fixed_zero = sh.fixed_zero;
			o->solver.fixed_zero = o->fixed_zero;
		}
		if (sh.tier_margin != NULL)
		{
			o->solver.n_tier_margin = sh.n_tier_margin;
			o->tier_margin = sh.tier_margin;
			o->solver.tier_margin = o->tier_margin;
		}
	}

}

/* ---------------------------------------------------------------------------
 * Final functions
 * ------------------------------------------------------------------------- */

/* Allocator callbacks for fit_solver.c: palloc in the current context. */
static void *
solver_alloc(void *ctx pg_attribute_unused(), size_t size)
{
	return MemoryContextAllocHuge(CurrentMemoryContext, Max(size, 1));
}

/* Free callback for fit_solver.c. */
static void
solver_free(void *ctx pg_attribute_unused(), void *ptr)
{
	if (ptr)
		pfree(ptr);
}

/* Interrupt callback for fit_solver.c: query cancel and statement_timeout. */
static void
solver_check_interrupts(void *ctx pg_attribute_unused())
{
	CHECK_FOR_INTERRUPTS();
}

/* True if a group is held out for validation (deterministic by key). */
static bool
group_is_validation(const char *key, uint64 seed, double fraction)
{
	uint64		h = hash_bytes_extended((const unsigned char *) key, strlen(key), seed);

	return (double) (h >> 11) * (1.0 / 9007199254740992.0) < fraction;
}

PG_FUNCTION_INFO_V1(rbr_fit_finalfn);
/* rbr_fit final: sort the rows, fit, and report as jsonb. */
Datum
rbr_fit_finalfn(PG_FUNCTION_ARGS)
{
	const RbrRowSet *rs;
	RbrSortedRows *s;
	FitOptions	o;
	RbrFitData	data;
	RbrFitResult res;
	RbrFitAlloc alloc = {NULL, solver_alloc, solver_free, solver_check_interrupts};
	bool	   *is_train;
	int64		groups_without_pairs = 0;
	char		errbuf[512];
	int			rc;
	StringInfoData buf;
	MemoryContext work,
				old;
	Datum		result;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	rs = rbr_rowset_read(PG_GETARG_DATUM(0));
	if (rs->nrows == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("rbr_fit has no complete rows"),
				 errdetail("All %lld rows had a NULL group key, tier, base reward or feature.", (long long) rs->skipped),
				 errhint("Grade the missing features first, or filter the rows.")));

	work = AllocSetContextCreate(CurrentMemoryContext, "rbr_fit", ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(work);

	parse_fit_options(rs->options, rs->d, &o);
	s = rbr_rowset_sort(rs, false);
	is_train = palloc(sizeof(bool) * Max(s->ngroups, 1));
	for (int64 g = 0; g < s->ngroups; g++)
	{
		bool		two_tiers = s->tier[s->group_start[g]] != s->tier[s->group_start[g + 1] - 1];

		groups_without_pairs += !two_tiers;
		is_train[g] = !group_is_validation(s->group_key[g], o.seed, o.validation_fraction);
	}

	data.d = s->d;
	data.nrows = s->nrows;
	data.x = s->x;
	data.base = s->base;
	data.tier = s->tier;
	data.ngroups = s->ngroups;
	data.group_start = s->group_start;
	data.group_is_train = is_train;
	memset(&res, 0, sizeof(res));
	res.w = palloc0(sizeof(double) * Max(s->d, 1));

	rc = rbr_fit_solve_rows(&data, s->x_row, &o.solver, &alloc, &res, errbuf, sizeof(errbuf));
	if (rc == RBR_FIT_ENOPAIRS)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("rbr_fit found no pairs to train on"),
				 errdetail("%s (%lld rows in %lld groups, %lld groups with a single tier).", errbuf,
						   (long long) s->nrows, (long long) s->ngroups, (long long) groups_without_pairs),
				 errhint("Pairs are formed within a group (prompt) between different tiers; give each prompt completions of at least two tiers, or lower validation_fraction.")));
	if (rc != RBR_FIT_OK)
		ereport(ERROR,
				(errcode(rc == RBR_FIT_ENOMEM ? ERRCODE_OUT_OF_MEMORY : ERRCODE_DATA_EXCEPTION),
				 errmsg("rbr_fit failed: %s", errbuf)));

	initStringInfo(&buf);
	rbr_fit_json_weights(&buf, res.w, s->d, o.names, o.nnames);
	appendStringInfo(&buf, ", \"rows\": %lld, \"rows_skipped_null\": %lld, \"groups\": %lld, \"groups_without_pairs\": %lld",
					 (long long) s->nrows, (long long) rs->skipped, (long long) s->ngroups,
					 (long long) groups_without_pairs);
	appendStringInfo(&buf, ", \"pairs\": {\"train\": %lld, \"validation\": %lld}",
					 (long long) res.train_pairs, (long long) res.val_pairs);
	appendStringInfoString(&buf, ", \"loss\": {\"train\": ");
	rbr_fit_json_number(&buf, res.train_loss);
	appendStringInfoString(&buf, ", \"validation\": ");
	rbr_fit_json_number(&buf, res.val_loss);
	appendStringInfoString(&buf, "}, \"objective\": ");
	rbr_fit_json_number(&buf, res.objective);
	appendStringInfoString(&buf, ", \"zero_loss_share\": ");
	rbr_fit_json_number(&buf, res.zero_loss_share);
	appendStringInfoString(&buf, ", \"accuracy\": {\"train\": ");
	rbr_fit_json_number(&buf, res.train_accuracy);
	appendStringInfoString(&buf, ", \"validation\": ");
	rbr_fit_json_number(&buf, res.val_accuracy);
	appendStringInfo(&buf, "}, \"solver\": \"%s\", \"iterations\": %d, \"converged\": %s, \"gap\": ",
					 o.solver.solver == RBR_SOLVER_EXACT ? "exact" : "adamw",
					 res.iterations, res.converged ? "true" : "false");
	rbr_fit_json_number(&buf, res.gap);
	appendStringInfo(&buf, ", \"passes\": %lld, \"options\": {\"margin\": ", (long long) res.passes);
	rbr_fit_json_number(&buf, o.solver.margin);
	appendStringInfoString(&buf, ", \"tier_margin\": {");
	for (int i = 0, k = 0; i < o.solver.n_tier_margin; i++)
		if (!isnan(o.tier_margin[i]))
		{
			appendStringInfo(&buf, "%s\"%d\": ", k++ ? ", " : "", i);
			rbr_fit_json_number(&buf, o.tier_margin[i]);
		}
	appendStringInfoString(&buf, "}, \"l2\": ");
	rbr_fit_json_number(&buf, o.solver.l2);
	appendStringInfoString(&buf, ", \"l2_used\": ");
	rbr_fit_json_number(&buf, res.l2_used);
	appendStringInfoString(&buf, ", \"fixed_zero\": [");
	for (int i = 0, k = 0; o.fixed_zero && i < s->d; i++)
		if (o.fixed_zero[i])
			appendStringInfo(&buf, "%s%d", k++ ? ", " : "", i + 1);
	appendStringInfoString(&buf, "], \"validation_fraction\": ");
	rbr_fit_json_number(&buf, o.validation_fraction);
	appendStringInfo(&buf, ", \"validation_split\": \"%s\", \"seed\": %llu",
					 o.solver.solver == RBR_SOLVER_EXACT ? "groups" : "pairs",
					 (unsigned long long) o.seed);
	if (o.solver.solver == RBR_SOLVER_EXACT)
	{
		appendStringInfoString(&buf, ", \"tol\": ");
		rbr_fit_json_number(&buf, o.solver.tol);
		appendStringInfo(&buf, ", \"max_iter\": %d", o.solver.max_iter);
	}
	else
	{
		appendStringInfoString(&buf, ", \"lr\": ");
		rbr_fit_json_number(&buf, o.solver.lr);
		appendStringInfo(&buf, ", \"steps\": %d, \"weight_decay\": ", o.solver.steps);
		rbr_fit_json_number(&buf, o.solver.weight_decay);
		appendStringInfoString(&buf, ", \"beta1\": ");
		rbr_fit_json_number(&buf, o.solver.beta1);
		appendStringInfoString(&buf, ", \"beta2\": ");
		rbr_fit_json_number(&buf, o.solver.beta2);
		appendStringInfoString(&buf, ", \"eps\": ");
		rbr_fit_json_number(&buf, o.solver.eps);
	}
	appendStringInfoString(&buf, "}}");

	MemoryContextSwitchTo(old);
	result = DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
	MemoryContextDelete(work);
	PG_RETURN_DATUM(result);
}
