/*
 * evaluate.c: how well a score ranks completions: rbr_pair_accuracy (share of
 * ordered pairs ranked right) and rbr_pair_errors (the paper's error rates
 * for RM only, RM + RBR and RBR only, per label pair).
 *
 * Both collect their rows in an RbrRowSet (rowset.c) like rbr_fit, and form
 * pairs within each group in the final function.
 */
#include "postgres.h"

#include <math.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/json.h"
#include "utils/jsonb.h"

#include "rbr.h"
#include "rowset.h"

PG_FUNCTION_INFO_V1(rbr_pair_accuracy_transfn);
/* rbr_pair_accuracy transition: (group_key, tier, score). */
Datum
rbr_pair_accuracy_transfn(PG_FUNCTION_ARGS)
{
	RbrRowSet  *rs = PG_ARGISNULL(0) ? rbr_rowset_create(fcinfo, "rbr_pair_accuracy") : (RbrRowSet *) PG_GETARG_POINTER(0);

	if (PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3))
		rs->skipped++;
	else
	{
		text	   *key = PG_GETARG_TEXT_PP(1);
		int32		tier = PG_GETARG_INT32(2);
		double		score = PG_GETARG_FLOAT8(3);

		rbr_check_tier(tier);
		rbr_check_finite(score, "score");
		rbr_rowset_add(rs, VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key), NULL, 0, tier, score, NULL, 0);
	}
	PG_RETURN_POINTER(rs);
}

PG_FUNCTION_INFO_V1(rbr_pair_accuracy_finalfn);
/* rbr_pair_accuracy final: share of ordered pairs ranked right (ties wrong). */
Datum
rbr_pair_accuracy_finalfn(PG_FUNCTION_ARGS)
{
	RbrRowSet  *rs;
	RbrSortedRows *s;
	int64		pairs = 0,
				right = 0;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	rs = (RbrRowSet *) PG_GETARG_POINTER(0);
	s = rbr_rowset_sort(rs);
	for (int64 g = 0; g < s->ngroups; g++)
	{
		/* rows of a group are sorted by tier: a better row comes first */
		for (int64 a = s->group_start[g]; a < s->group_start[g + 1]; a++)
		{
			for (int64 b = a + 1; b < s->group_start[g + 1]; b++)
			{
				if (s->tier[a] == s->tier[b])
					continue;
				pairs++;
				right += s->base[a] > s->base[b];
			}
			CHECK_FOR_INTERRUPTS();
		}
	}
	if (pairs == 0)
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8((double) right / (double) pairs);
}

PG_FUNCTION_INFO_V1(rbr_pair_errors_transfn);
/* rbr_pair_errors transition: (group_key, tier, label, rm, rbr). */
Datum
rbr_pair_errors_transfn(PG_FUNCTION_ARGS)
{
	RbrRowSet  *rs = PG_ARGISNULL(0) ? rbr_rowset_create(fcinfo, "rbr_pair_errors") : (RbrRowSet *) PG_GETARG_POINTER(0);

	if (PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(4) || PG_ARGISNULL(5))
		rs->skipped++;
	else
	{
		text	   *key = PG_GETARG_TEXT_PP(1);
		int32		tier = PG_GETARG_INT32(2);
		text	   *label = PG_ARGISNULL(3) ? NULL : PG_GETARG_TEXT_PP(3);
		double		rm = PG_GETARG_FLOAT8(4);
		double		rbr = PG_GETARG_FLOAT8(5);

		rbr_check_tier(tier);
		rbr_check_finite(rm, "rm");
		rbr_check_finite(rbr, "rbr");
		rbr_rowset_add(rs, VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key),
					   label ? VARDATA_ANY(label) : NULL, label ? VARSIZE_ANY_EXHDR(label) : 0,
					   tier, rm, &rbr, 1);
	}
	PG_RETURN_POINTER(rs);
}

/* Pair and error counts of one label pair (or of all pairs). */
typedef struct PairErrors
{
	char	   *better;
	char	   *worse;
	int64		pairs;
	int64		err_rm;
	int64		err_rm_rbr;
	int64		err_rbr;
} PairErrors;

/* qsort comparator: label pairs by better label, then worse label. */
static int
cmp_pair_errors(const void *a, const void *b)
{
	const PairErrors *x = a;
	const PairErrors *y = b;
	int			c = strcmp(x->better, y->better);

	return c != 0 ? c : strcmp(x->worse, y->worse);
}

/* Append {"pairs": n, "rm": e, "rm_rbr": e, "rbr": e} (error rates). */
static void
append_errors(StringInfo buf, const PairErrors *e)
{
	appendStringInfo(buf, "{\"pairs\": " INT64_FORMAT ", \"rm\": %s, \"rm_rbr\": %s, \"rbr\": %s}",
					 e->pairs,
					 float8out_internal((double) e->err_rm / (double) e->pairs),
					 float8out_internal((double) e->err_rm_rbr / (double) e->pairs),
					 float8out_internal((double) e->err_rbr / (double) e->pairs));
}

PG_FUNCTION_INFO_V1(rbr_pair_errors_finalfn);
/* rbr_pair_errors final: error rates overall and per (better, worse) label pair. */
Datum
rbr_pair_errors_finalfn(PG_FUNCTION_ARGS)
{
	RbrRowSet  *rs;
	RbrSortedRows *s;
	PairErrors	all = {"", "", 0, 0, 0, 0};
	PairErrors *by = NULL;
	int			nby = 0,
				capby = 0;
	StringInfoData buf;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	rs = (RbrRowSet *) PG_GETARG_POINTER(0);
	s = rbr_rowset_sort(rs);
	for (int64 g = 0; g < s->ngroups; g++)
	{
		for (int64 a = s->group_start[g]; a < s->group_start[g + 1]; a++)
		{
			for (int64 b = a + 1; b < s->group_start[g + 1]; b++)
			{
				const char *la = s->label[a] ? s->label[a] : "";
				const char *lb = s->label[b] ? s->label[b] : "";
				bool		wrong_rm,
							wrong_rm_rbr,
							wrong_rbr;
				PairErrors *e = NULL;

				if (s->tier[a] == s->tier[b])
					continue;
				/* rows are sorted by tier: a is the better side */
				wrong_rm = !(s->base[a] > s->base[b]);
				wrong_rm_rbr = !(s->base[a] + s->x[a] > s->base[b] + s->x[b]);
				wrong_rbr = !(s->x[a] > s->x[b]);
				for (int i = 0; i < nby && e == NULL; i++)
					if (strcmp(by[i].better, la) == 0 && strcmp(by[i].worse, lb) == 0)
						e = &by[i];
				if (e == NULL)
				{
					if (nby == capby)
					{
						capby = Max(16, capby * 2);
						by = by ? repalloc(by, sizeof(PairErrors) * capby) : palloc(sizeof(PairErrors) * capby);
					}
					e = &by[nby++];
					memset(e, 0, sizeof(*e));
					e->better = (char *) la;
					e->worse = (char *) lb;
				}
				e->pairs++;
				e->err_rm += wrong_rm;
				e->err_rm_rbr += wrong_rm_rbr;
				e->err_rbr += wrong_rbr;
				all.pairs++;
				all.err_rm += wrong_rm;
				all.err_rm_rbr += wrong_rm_rbr;
				all.err_rbr += wrong_rbr;
			}
			CHECK_FOR_INTERRUPTS();
		}
	}
	if (all.pairs == 0)
		PG_RETURN_NULL();

	if (nby > 1)
		qsort(by, nby, sizeof(PairErrors), cmp_pair_errors);
	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"all\": ");
	append_errors(&buf, &all);
	appendStringInfoString(&buf, ", \"by_label_pair\": {");
	for (int i = 0; i < nby; i++)
	{
		if (i)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, psprintf("%s > %s", by[i].better, by[i].worse));
		appendStringInfoString(&buf, ": ");
		append_errors(&buf, &by[i]);
	}
	appendStringInfoString(&buf, "}}");
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}
