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

#include "access/htup_details.h"
#include "funcapi.h"
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
	RbrRowSet  *rs = rbr_rowset_state(fcinfo, 0, "rbr_pair_accuracy");

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
	PG_RETURN_DATUM(RbrRowSetGetDatum(rs));
}

/* Called for each ordered pair of a group: a is the better row. */
typedef void (*PairVisitor) (const RbrSortedRows *s, int64 a, int64 b, void *arg);

/*
 * Visit every ordered pair: two rows of one group with different tiers.
 * Rows of a group are sorted by tier, so the better row comes first.
 */
static void
for_each_pair(const RbrSortedRows *s, PairVisitor visit, void *arg)
{
	for (int64 g = 0; g < s->ngroups; g++)
	{
		for (int64 a = s->group_start[g]; a < s->group_start[g + 1]; a++)
		{
			for (int64 b = a + 1; b < s->group_start[g + 1]; b++)
				if (s->tier[a] != s->tier[b])
					visit(s, a, b, arg);
			CHECK_FOR_INTERRUPTS();
		}
	}
}

/* Counts of rbr_pair_accuracy and rbr_pair_counts. */
typedef struct PairCounts
{
	int64		pairs;
	int64		right;
	int64		tied;
} PairCounts;

/* Pair visitor of rbr_pair_accuracy: right when the better side scores higher. */
static void
count_right(const RbrSortedRows *s, int64 a, int64 b, void *arg)
{
	PairCounts *c = arg;

	c->pairs++;
	c->right += s->base[a] > s->base[b];
	c->tied += s->base[a] == s->base[b];
}

PG_FUNCTION_INFO_V1(rbr_pair_accuracy_finalfn);
/* rbr_pair_accuracy final: share of ordered pairs ranked right (ties wrong). */
Datum
rbr_pair_accuracy_finalfn(PG_FUNCTION_ARGS)
{
	PairCounts	c = {0, 0, 0};

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	for_each_pair(rbr_rowset_sort(rbr_rowset_read(PG_GETARG_DATUM(0)), true), count_right, &c);
	if (c.pairs == 0)
		PG_RETURN_NULL();
	PG_RETURN_FLOAT8((double) c.right / (double) c.pairs);
}

PG_FUNCTION_INFO_V1(rbr_pair_counts_finalfn);
/*
 * rbr_pair_counts final: (correct, tied, pairs), the ordered pairs a score
 * ranks right, ties, and all of them; plain sum() adds them across groups.
 */
Datum
rbr_pair_counts_finalfn(PG_FUNCTION_ARGS)
{
	PairCounts	c = {0, 0, 0};
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "rbr_pair_counts must return a composite type");
	for_each_pair(rbr_rowset_sort(rbr_rowset_read(PG_GETARG_DATUM(0)), true), count_right, &c);
	values[0] = Int64GetDatum(c.right);
	values[1] = Int64GetDatum(c.tied);
	values[2] = Int64GetDatum(c.pairs);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls)));
}

PG_FUNCTION_INFO_V1(rbr_pair_errors_transfn);
/* rbr_pair_errors transition: (group_key, tier, label, rm, rbr). */
Datum
rbr_pair_errors_transfn(PG_FUNCTION_ARGS)
{
	RbrRowSet  *rs = rbr_rowset_state(fcinfo, 0, "rbr_pair_errors");

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
	PG_RETURN_DATUM(RbrRowSetGetDatum(rs));
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

/* State of rbr_pair_errors' pair visitor: totals and per label pair. */
typedef struct ErrorTally
{
	PairErrors	all;
	PairErrors *by;
	int			nby;
	int			capby;
} ErrorTally;

/* The entry of a (better, worse) label pair, added if new. */
static PairErrors *
tally_entry(ErrorTally *t, const char *better, const char *worse)
{
	PairErrors *e;

	for (int i = 0; i < t->nby; i++)
		if (strcmp(t->by[i].better, better) == 0 && strcmp(t->by[i].worse, worse) == 0)
			return &t->by[i];
	if (t->nby == t->capby)
	{
		t->capby = Max(16, t->capby * 2);
		t->by = t->by ? repalloc(t->by, sizeof(PairErrors) * t->capby)
			: palloc(sizeof(PairErrors) * t->capby);
	}
	e = &t->by[t->nby++];
	memset(e, 0, sizeof(*e));
	e->better = (char *) better;
	e->worse = (char *) worse;
	return e;
}

/* Add one pair's outcome to an entry. */
static inline void
tally_add(PairErrors *e, bool wrong_rm, bool wrong_rm_rbr, bool wrong_rbr)
{
	e->pairs++;
	e->err_rm += wrong_rm;
	e->err_rm_rbr += wrong_rm_rbr;
	e->err_rbr += wrong_rbr;
}

/* Pair visitor of rbr_pair_errors: base is rm, x[0] is rbr. */
static void
count_errors(const RbrSortedRows *s, int64 a, int64 b, void *arg)
{
	ErrorTally *t = arg;
	bool		wrong_rm = !(s->base[a] > s->base[b]);
	bool		wrong_rm_rbr = !(s->base[a] + s->x[a] > s->base[b] + s->x[b]);
	bool		wrong_rbr = !(s->x[a] > s->x[b]);

	tally_add(&t->all, wrong_rm, wrong_rm_rbr, wrong_rbr);
	tally_add(tally_entry(t, s->label[a] ? s->label[a] : "", s->label[b] ? s->label[b] : ""),
			  wrong_rm, wrong_rm_rbr, wrong_rbr);
}

PG_FUNCTION_INFO_V1(rbr_pair_errors_finalfn);
/* rbr_pair_errors final: error rates overall and per (better, worse) label pair. */
Datum
rbr_pair_errors_finalfn(PG_FUNCTION_ARGS)
{
	ErrorTally	t;
	StringInfoData buf;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	memset(&t, 0, sizeof(t));
	for_each_pair(rbr_rowset_sort(rbr_rowset_read(PG_GETARG_DATUM(0)), true), count_errors, &t);
	if (t.all.pairs == 0)
		PG_RETURN_NULL();

	if (t.nby > 1)
		qsort(t.by, t.nby, sizeof(PairErrors), cmp_pair_errors);
	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"all\": ");
	append_errors(&buf, &t.all);
	appendStringInfoString(&buf, ", \"by_label_pair\": {");
	for (int i = 0; i < t.nby; i++)
	{
		if (i)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, psprintf("%s > %s", t.by[i].better, t.by[i].worse));
		appendStringInfoString(&buf, ": ");
		append_errors(&buf, &t.by[i]);
	}
	appendStringInfoString(&buf, "}}");
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}
