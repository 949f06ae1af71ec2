/*
 * synth.c: synthetic comparison data (the paper's D_RBR). What each candidate
 * completion of a prompt should be, and the instruction the generator gets.
 *
 * For a response type, a candidate's traits are a full assignment of the
 * simple propositions its classes need (RbrRespType.needed):
 *   ideal       an assignment the best class (first in completion_class_order)
 *               holds for: the class's literals forced, derived propositions
 *               wanted true expanded into their literals, derived ones wanted
 *               false broken by setting their first free literal the other
 *               way; everything else false
 *   flawed      the ideal assignment with one needed proposition flipped,
 *               chosen by a hash of (seed, slot) among those whose flip gives
 *               a class other than the best and the worst; the intended class
 *               is the class that assignment has
 *   disallowed  an assignment of the worst class (last in the order), built
 *               like the ideal one from all-false
 * Every assignment is checked: exactly its intended class must hold.
 *
 * The instruction (format "rbr-generate/1", documented in
 * doc/synthetic-data.md; the test server parses it):
 *   rbr-generate/1
 *   <one paragraph: write the next assistant message; intended class, type>
 *
 *   The reply MUST have each of these traits:
 *   - NAME: first line of NAME's grader prompt (a short heading such as
 *     "Objective:" joined with the next line; at most 300 bytes)
 *   ...
 *   The reply must NOT have any of these traits:
 *   - NAME: first line of NAME's grader prompt
 *   ...
 *
 *   <closing line: the reply only>
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"

#include "classes.h"
#include "jsonutil.h"
#include "policy.h"

#define RBR_GENERATE_MARKER "rbr-generate/1"

/* An assignment being built: values and which are fixed. */
typedef struct Assign
{
	RbrPolicy  *pol;
	double	   *v;				/* per prop (simple only used): 0 or 1 */
	bool	   *fixed;
	bool		ok;
} Assign;

static void force_lit(Assign *a, const RbrLiteral *lit);

/* Value (0/1) of a literal under the assignment. */
static bool
lit_holds(Assign *a, const RbrLiteral *lit)
{
	return rbr_literal_prob(a->pol, lit, a->v) > 0.5;
}

/* Make a derived proposition false: its first free literal the other way. */
static void
break_derived(Assign *a, int prop)
{
	RbrProp    *d = &a->pol->props[prop];

	for (int i = 0; i < d->nlits; i++)
		if (!lit_holds(a, &d->lits[i]))
			return;				/* already false */
	for (int i = 0; i < d->nlits; i++)
	{
		RbrLiteral	neg = d->lits[i];
		RbrProp    *p = &a->pol->props[neg.prop];

		if (!p->derived && a->fixed[neg.prop])
			continue;
		neg.value = !neg.value;
		force_lit(a, &neg);
		return;
	}
	a->ok = false;
}

/* Force a literal: set (and fix) a simple one, expand or break a derived one. */
static void
force_lit(Assign *a, const RbrLiteral *lit)
{
	RbrProp    *p = &a->pol->props[lit->prop];

	if (!p->derived)
	{
		if (a->fixed[lit->prop] && (a->v[lit->prop] > 0.5) != lit->value)
			a->ok = false;
		a->v[lit->prop] = lit->value ? 1.0 : 0.0;
		a->fixed[lit->prop] = true;
	}
	else if (lit->value)
	{
		for (int i = 0; i < p->nlits; i++)
			force_lit(a, &p->lits[i]);
	}
	else
		break_derived(a, lit->prop);
}

/* The one class holding for a 0/1 assignment, or -1 (none or several). */
static int
hard_class(RbrPolicy *pol, RbrRespType *rt, const double *v)
{
	int			found = -1;

	for (int c = 0; c < pol->nclasses; c++)
	{
		RbrClassDef *def = &rt->classes[c];
		bool		holds = true;

		for (int i = 0; i < def->nlits && holds; i++)
			holds = rbr_literal_prob(pol, &def->lits[i], v) > 0.5;
		if (holds)
		{
			if (found >= 0)
				return -1;
			found = c;
		}
	}
	return found;
}

/* An assignment of class c from all-false: positive literals first. */
static bool
build_class(RbrPolicy *pol, RbrRespType *rt, int c, double *v)
{
	Assign		a;
	RbrClassDef *def = &rt->classes[c];

	a.pol = pol;
	a.v = v;
	a.fixed = palloc0(sizeof(bool) * pol->nprops);
	a.ok = true;
	for (int i = 0; i < pol->nprops; i++)
		v[i] = 0.0;
	/* simple literals and derived ones wanted true, then the ones to break */
	for (int pass = 0; pass < 2; pass++)
		for (int i = 0; i < def->nlits; i++)
		{
			bool		breaks = pol->props[def->lits[i].prop].derived && !def->lits[i].value;

			if (breaks == (pass == 1))
				force_lit(&a, &def->lits[i]);
		}
	pfree(a.fixed);
	return a.ok && hard_class(pol, rt, v) == c;
}

/* The non-empty line at *s, trimmed: [start, end); *s moves past it. */
static void
next_line(const char **s, const char **start, const char **end)
{
	const char *p = *s;
	const char *e;

	while (*p == '\n' || *p == '\r' || *p == ' ' || *p == '\t')
		p++;
	e = p;
	while (*e && *e != '\n' && *e != '\r')
		e++;
	*s = e;
	while (e > p && (e[-1] == ' ' || e[-1] == '\t'))
		e--;
	*start = p;
	*end = e;
}

/*
 * First non-empty line of a grader prompt, trimmed; a short heading ending in
 * ':' ("Objective:") is joined with the line after it. At most 300 bytes.
 */
static char *
first_line(const char *prompt)
{
	const char *s = prompt;
	const char *a,
			   *e;
	StringInfoData out;

	initStringInfo(&out);
	next_line(&s, &a, &e);
	appendBinaryStringInfo(&out, a, e - a);
	if (e - a > 0 && e - a < 40 && e[-1] == ':')
	{
		next_line(&s, &a, &e);
		if (e > a)
		{
			appendStringInfoChar(&out, ' ');
			appendBinaryStringInfo(&out, a, e - a);
		}
	}
	if (out.len > 300)
	{
		int			len = rbr_clip_len(out.data, out.len, 300);

		out.data[len] = '\0';
		out.len = len;
		appendStringInfoString(&out, "...");
	}
	return out.data;
}

/* The instruction for an assignment of the needed propositions. */
static char *
instruction(RbrPolicy *pol, RbrRespType *rt, int cls, const double *v)
{
	StringInfoData s;

	initStringInfo(&s);
	appendStringInfo(&s, "%s\n"
					 "Write the next assistant message of the conversation below. It is an example for a "
					 "data set of rated replies: it is meant to be a reply of class \"%s\" for the "
					 "response type \"%s\", so it must have exactly the traits listed here, whether "
					 "or not they make a good reply.\n",
					 RBR_GENERATE_MARKER, pol->classes[cls], rt->name);
	for (int want = 1; want >= 0; want--)
	{
		bool		any = false;

		for (int k = 0; k < rt->nneeded; k++)
		{
			int			p = rt->needed[k];

			if ((v[p] > 0.5) != (want == 1))
				continue;
			if (!any)
				appendStringInfoString(&s, want ? "\nThe reply MUST have each of these traits:\n"
									   : "\nThe reply must NOT have any of these traits:\n");
			any = true;
			appendStringInfo(&s, "- %s: %s\n", pol->props[p].name, first_line(pol->props[p].prompt));
		}
	}
	appendStringInfoString(&s, "\nAnswer with the assistant message only: no preamble, no notes about "
						   "these instructions.");
	return s.data;
}

/* The traits as jsonb text {"name": true/false, ...}. */
static char *
traits_json(RbrPolicy *pol, RbrRespType *rt, const double *v)
{
	StringInfoData s;

	initStringInfo(&s);
	appendStringInfoChar(&s, '{');
	for (int k = 0; k < rt->nneeded; k++)
	{
		int			p = rt->needed[k];

		if (k > 0)
			appendStringInfoString(&s, ", ");
		escape_json(&s, pol->props[p].name);
		appendStringInfoString(&s, v[p] > 0.5 ? ": true" : ": false");
	}
	appendStringInfoChar(&s, '}');
	return s.data;
}

/* One output row of rbr_synth_plan. */
static void
put_slot(ReturnSetInfo *rsinfo, RbrPolicy *pol, RbrRespType *rt, int slot, const char *kind,
		 int flaw, int cls, const double *v)
{
	Datum		d[6];
	bool		nulls[6] = {0};

	d[0] = Int32GetDatum(slot);
	d[1] = CStringGetTextDatum(kind);
	d[2] = flaw >= 0 ? CStringGetTextDatum(pol->props[flaw].name) : (Datum) 0;
	nulls[2] = flaw < 0;
	d[3] = CStringGetTextDatum(pol->classes[cls]);
	d[4] = DirectFunctionCall1(jsonb_in, CStringGetDatum(traits_json(pol, rt, v)));
	d[5] = CStringGetTextDatum(instruction(pol, rt, cls, v));
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, d, nulls);
}

/* A count argument: 0 .. 100. */
static int
check_count(int n, const char *what)
{
	if (n < 0 || n > 100)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be between 0 and 100, not %d", what, n)));
	return n;
}

PG_FUNCTION_INFO_V1(rbr_synth_plan);
/*
 * rbr_synth_plan(policy, response_type, ideal, flawed, disallowed, seed):
 * the candidates to generate for one prompt: slot (1-based), kind, the
 * proposition flipped (flawed), the intended class, the traits and the
 * generator's instruction.
 */
Datum
rbr_synth_plan(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	RbrRespType *rt = rbr_policy_resptype(pol, text_to_cstring(PG_GETARG_TEXT_PP(1)));
	int			n_ideal = check_count(PG_GETARG_INT32(2), "the number of ideal completions");
	int			n_flawed = check_count(PG_GETARG_INT32(3), "the number of flawed completions");
	int			n_disallowed = check_count(PG_GETARG_INT32(4), "the number of disallowed completions");
	char	   *seed = text_to_cstring(PG_GETARG_TEXT_PP(5));
	int			best = 0;
	int			worst = pol->nclasses - 1;
	double	   *ideal = palloc(sizeof(double) * pol->nprops);
	double	   *v = palloc(sizeof(double) * pol->nprops);
	int		   *cand = palloc(sizeof(int) * Max(rt->nneeded, 1));
	int		   *cand_cls = palloc(sizeof(int) * Max(rt->nneeded, 1));
	int			ncand = 0;
	int			slot = 0;

	InitMaterializedSRF(fcinfo, 0);
	if (!build_class(pol, rt, best, ideal))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("cannot find traits for class \"%s\" of response type \"%s\" in policy \"%s\"",
						pol->classes[best], rt->name, pol->name),
				 errdetail("Forcing the class's literals (derived ones broken at their first free literal) does not give that class alone."),
				 errhint("Check the class definitions with rbr_classify().")));
	for (int i = 0; i < n_ideal; i++)
		put_slot(rsinfo, pol, rt, ++slot, "ideal", -1, best, ideal);

	/* flips of the ideal assignment that give a flawed class */
	for (int k = 0; k < rt->nneeded; k++)
	{
		int			p = rt->needed[k];
		int			c;

		memcpy(v, ideal, sizeof(double) * pol->nprops);
		v[p] = 1.0 - v[p];
		c = hard_class(pol, rt, v);
		if (c >= 0 && c != best && c != worst)
		{
			cand_cls[ncand] = c;
			cand[ncand++] = p;
		}
	}
	if (n_flawed > 0 && ncand == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("no single flaw of the ideal traits gives a flawed class for response type \"%s\" in policy \"%s\"",
						rt->name, pol->name),
				 errhint("Ask for no flawed completions ({\"flawed\": 0}).")));
	if (n_flawed > 0)
	{
		/* a permutation of the candidates from the seed: distinct flaws first */
		uint64		h = hash_bytes_extended((const unsigned char *) seed, strlen(seed), 0x5eed);

		for (int i = ncand - 1; i > 0; i--)
		{
			int			j;
			int			t;

			h = hash_bytes_uint32_extended((uint32) i, h);
			j = (int) (h % (uint64) (i + 1));
			t = cand[i], cand[i] = cand[j], cand[j] = t;
			t = cand_cls[i], cand_cls[i] = cand_cls[j], cand_cls[j] = t;
		}
		for (int i = 0; i < n_flawed; i++)
		{
			int			p = cand[i % ncand];

			memcpy(v, ideal, sizeof(double) * pol->nprops);
			v[p] = 1.0 - v[p];
			put_slot(rsinfo, pol, rt, ++slot, "flawed", p, cand_cls[i % ncand], v);
		}
	}

	if (n_disallowed > 0)
	{
		if (!build_class(pol, rt, worst, v))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("cannot find traits for class \"%s\" of response type \"%s\" in policy \"%s\"",
							pol->classes[worst], rt->name, pol->name),
					 errhint("Ask for no disallowed completions ({\"disallowed\": 0}).")));
		for (int i = 0; i < n_disallowed; i++)
			put_slot(rsinfo, pol, rt, ++slot, "disallowed", -1, worst, v);
	}
	PG_RETURN_NULL();
}
