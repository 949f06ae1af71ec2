/*
 * classes.c: the completion class of labelled rows, class probabilities and
 * feature vectors of graded rows.
 *
 * Product mode (the paper's): a class's probability is the product of its
 * literals' probabilities, where a literal on a simple proposition gives p or
 * 1-p and a literal on a derived proposition gives the product of its own
 * literals (or one minus that); the results are normalised over the classes
 * of the response type.
 *
 * Exact mode: the probability that the class formula holds when the simple
 * propositions are independent Bernoulli variables. The two agree whenever no
 * simple proposition is reached twice within one class; where one is (the
 * hard_refuse class unacceptable_completion reaches disallowed_content both
 * directly and through acceptable_refusal), product mode counts it twice.
 * Exact mode conditions on the repeated propositions (enumerating their 0/1
 * values) and evaluates the remaining read-once formula by the product rule,
 * which is then exact. With 0/1 inputs both modes give the indicator of the
 * class rbr_classify() returns.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "classes.h"

/* Parse a mode name ('product' or 'exact'); ERROR on anything else. */
RbrClassMode
rbr_class_mode(const char *name)
{
	if (strcmp(name, "product") == 0)
		return RBR_CLASS_PRODUCT;
	if (strcmp(name, "exact") == 0)
		return RBR_CLASS_EXACT;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown class probability mode \"%s\"", name),
			 errhint("Use 'product' (the paper's, the default) or 'exact'.")));
	return RBR_CLASS_PRODUCT;
}

/* Start an evaluation: forget the derived probabilities memoised so far. */
static inline void
memo_begin(RbrPolicy *pol)
{
	if (++pol->memo_gen == 0)
	{
		memset(pol->memo_stamp, 0, sizeof(uint32) * pol->nprops);
		pol->memo_gen = 1;
	}
}

/*
 * Probability of one literal within the current evaluation: p or 1-p, a
 * derived proposition's product computed once and memoised (a policy whose
 * derived propositions share sub-propositions costs linear, not exponential,
 * time). Nesting is at most the policy's derivation depth limit.
 */
static double
literal_prob_memo(RbrPolicy *pol, const RbrLiteral *lit, const double *p)
{
	RbrProp    *prop = &pol->props[lit->prop];
	double		q;

	if (!prop->derived)
		q = p[lit->prop];
	else if (pol->memo_stamp[lit->prop] == pol->memo_gen)
		q = pol->memo[lit->prop];
	else
	{
		check_stack_depth();
		q = 1.0;
		for (int i = 0; i < prop->nlits; i++)
			q *= literal_prob_memo(pol, &prop->lits[i], p);
		pol->memo[lit->prop] = q;
		pol->memo_stamp[lit->prop] = pol->memo_gen;
	}
	return lit->value ? q : 1.0 - q;
}

/* Probability of one literal: p or 1-p, recursing into derived ones. */
double
rbr_literal_prob(RbrPolicy *pol, const RbrLiteral *lit, const double *p)
{
	memo_begin(pol);
	return literal_prob_memo(pol, lit, p);
}

/* Product of a conjunction's literal probabilities. */
static double
conjunction_prob(RbrPolicy *pol, const RbrLiteral *lits, int nlits, const double *p)
{
	double		q = 1.0;

	memo_begin(pol);
	for (int i = 0; i < nlits; i++)
		q *= literal_prob_memo(pol, &lits[i], p);
	return q;
}

/* Exact probability of a class formula with independent propositions. */
static double
class_exact_prob(RbrPolicy *pol, RbrClassDef *def, const double *p)
{
	double	   *fixed;
	double		total = 0.0;
	uint32		nassign;

	if (def->nrepeated == 0)
		return conjunction_prob(pol, def->lits, def->nlits, p);

	fixed = palloc(sizeof(double) * pol->nprops);
	memcpy(fixed, p, sizeof(double) * pol->nprops);
	nassign = (uint32) 1 << def->nrepeated;
	for (uint32 mask = 0; mask < nassign; mask++)
	{
		double		weight = 1.0;

		CHECK_FOR_INTERRUPTS();
		for (int k = 0; k < def->nrepeated; k++)
		{
			int			v = def->repeated[k];
			bool		bit = (mask >> k) & 1;

			weight *= bit ? p[v] : 1.0 - p[v];
			fixed[v] = bit ? 1.0 : 0.0;
		}
		if (weight > 0.0)
			total += weight * conjunction_prob(pol, def->lits, def->nlits, fixed);
	}
	pfree(fixed);
	return total;
}

/* ERROR listing the simple propositions a response type needs but lacks. */
void
rbr_require_props(RbrPolicy *pol, RbrRespType *rt, const double *p, bool for_features)
{
	StringInfoData missing;
	int			nmissing = 0;
	/* explicit feature lists may name propositions the classes do not */
	int			nneed = for_features ? rt->ngraded : rt->nneeded;
	const int  *need = for_features ? rt->graded : rt->needed;

	initStringInfo(&missing);
	for (int i = 0; i < nneed; i++)
		if (isnan(p[need[i]]))
		{
			appendStringInfo(&missing, "%s%s", nmissing ? ", " : "", pol->props[need[i]].name);
			nmissing++;
		}
	if (nmissing > 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("missing %d proposition%s for response type \"%s\"", nmissing,
						nmissing == 1 ? "" : "s", rt->name),
				 errdetail("Missing: %s.", missing.data),
				 errhint("Give a value for every simple proposition the response type's classes and features use; rbr_policy_info() lists them.")));
}

/* True if every needed value is exactly 0 or 1. */
static bool
all_hard(RbrRespType *rt, const double *p)
{
	for (int i = 0; i < rt->nneeded; i++)
	{
		double		v = p[rt->needed[i]];

		if (v != 0.0 && v != 1.0)
			return false;
	}
	return true;
}

/* ERROR: the classes do not partition completions for these labels. */
static void
partition_error(RbrPolicy *pol, RbrRespType *rt, const double *raw)
{
	StringInfoData holding;
	int			n = 0;

	initStringInfo(&holding);
	for (int c = 0; c < pol->nclasses; c++)
		if (raw[c] > 0.5)
			appendStringInfo(&holding, "%s%s", n++ ? ", " : "", pol->classes[c]);
	ereport(ERROR,
			(errcode(ERRCODE_DATA_EXCEPTION),
			 errmsg("the classes of policy \"%s\" are not a partition for these labels", pol->name),
			 n == 0 ? errdetail("No class of response type \"%s\" holds.", rt->name)
			 : errdetail("Several classes of response type \"%s\" hold: %s.", rt->name, holding.data),
			 errhint("Exactly one class must hold for any true/false labels; check the class definitions or the labels.")));
}

/* Normalised class probabilities of a response type into out[nclasses]. */
void
rbr_class_probs_compute(RbrPolicy *pol, RbrRespType *rt, const double *p,
						RbrClassMode mode, double *out)
{
	double		sum = 0.0;

	for (int c = 0; c < pol->nclasses; c++)
	{
		RbrClassDef *def = &rt->classes[c];

		out[c] = mode == RBR_CLASS_EXACT ? class_exact_prob(pol, def, p)
			: conjunction_prob(pol, def->lits, def->nlits, p);
		sum += out[c];
	}
	if (all_hard(rt, p))
	{
		int			holding = 0;

		for (int c = 0; c < pol->nclasses; c++)
			holding += out[c] > 0.5;
		if (holding != 1)
			partition_error(pol, rt, out);
	}
	if (!(sum > 0.0))
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("every class of response type \"%s\" has probability 0", rt->name),
				 errhint("Some probabilities are exactly 0 or 1 in a combination no class allows; check the inputs.")));
	for (int c = 0; c < pol->nclasses; c++)
		out[c] /= sum;
}

/* The feature vector of a response type into out[rt->nfeatures]. */
void
rbr_features_compute(RbrPolicy *pol, RbrRespType *rt, const double *p,
					 RbrClassMode mode, double *out)
{
	double	   *cls = palloc(sizeof(double) * pol->nclasses);

	rbr_class_probs_compute(pol, rt, p, mode, cls);
	for (int f = 0; f < rt->nfeatures; f++)
	{
		RbrFeature *feat = &rt->features[f];

		if (feat->kind == RBR_FEATURE_CLASS)
			out[f] = cls[feat->index];
		else
		{
			RbrLiteral	lit = {feat->index, true};

			out[f] = rbr_literal_prob(pol, &lit, p);
		}
	}
	pfree(cls);
}

/* ---------------------------------------------------------------------------
 * Input parsing
 * ------------------------------------------------------------------------- */

/* Find a simple proposition by name (they are sorted): index or -1. */
static int
find_simple(RbrPolicy *pol, const char *name, int len)
{
	int			lo = 0,
				hi = pol->nsimple - 1;

	while (lo <= hi)
	{
		int			mid = (lo + hi) / 2;
		const char *m = pol->props[mid].name;
		int			cmp = strncmp(m, name, len);

		if (cmp == 0)
			cmp = m[len] == '\0' ? 0 : 1;
		if (cmp == 0)
			return mid;
		if (cmp < 0)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return -1;
}

/*
 * Read {proposition: value} into p[nprops] (NaN where absent). Values are
 * booleans (as 0/1) or numbers in [0,1]; with hard_only, numbers must be 0 or 1.
 */
static double *
parse_values(RbrPolicy *pol, Jsonb *jb, bool hard_only)
{
	double	   *p = palloc(sizeof(double) * pol->nprops);
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			idx = -1;
	char	   *key = NULL;

	for (int i = 0; i < pol->nprops; i++)
		p[i] = NAN;
	if (!JB_ROOT_IS_OBJECT(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("proposition values must be a JSON object"),
				 errhint("Pass {\"apology\": 0.93, \"judgement\": 0.02, ...}.")));

	it = JsonbIteratorInit(&jb->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		CHECK_FOR_INTERRUPTS();
		if (tok == WJB_KEY)
		{
			idx = find_simple(pol, v.val.string.val, v.val.string.len);
			key = pnstrdup(v.val.string.val, v.val.string.len);
			if (idx < 0)
			{
				bool		derived = rbr_policy_prop_index(pol, key) >= 0;

				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 derived ? errmsg("\"%s\" is a derived proposition of policy \"%s\"", key, pol->name)
						 : errmsg("policy \"%s\" has no proposition \"%s\"", pol->name, key),
						 derived ? errhint("Give only simple propositions; derived ones are computed from them.")
						 : errhint("Remove it, or check the spelling against rbr_policy_info().")));
			}
		}
		else if (tok == WJB_VALUE)
		{
			double		x;

			if (v.type == jbvBool)
				x = v.val.boolean ? 1.0 : 0.0;
			else if (v.type == jbvNumeric)
			{
				if (numeric_is_nan(v.val.numeric))
					x = NAN;
				else
					x = DatumGetFloat8(DirectFunctionCall1(numeric_float8_no_overflow,
														   NumericGetDatum(v.val.numeric)));
				if (isnan(x))
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errmsg("value of proposition \"%s\" is NaN", key),
							 errhint("Give a probability in [0,1]; a value that could not be graded has no value.")));
			}
			else
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("value of proposition \"%s\" must be %s, not %s", key,
								hard_only ? "true or false" : "a number in [0,1] or a boolean",
								v.type == jbvString ? "a string" : v.type == jbvNull ? "null" : "a container")));
			if (x < 0.0 || x > 1.0)
				ereport(ERROR,
						(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
						 errmsg("value of proposition \"%s\" is %g, outside [0,1]", key, x),
						 errhint("Propositions are probabilities of \"yes\".")));
			if (hard_only && x != 0.0 && x != 1.0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("label of proposition \"%s\" is %g, not true or false", key, x),
						 errhint("rbr_classify() takes hard labels; use rbr_class_probs() for probabilities.")));
			p[idx] = x;
		}
	}
	return p;
}

/* Build a float8[] from a C array. */
static ArrayType *
float8_array(const double *v, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * (n + 1));

	for (int i = 0; i < n; i++)
		d[i] = Float8GetDatum(v[i]);
	return construct_array(d, n, FLOAT8OID, sizeof(float8), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
}

/* ---------------------------------------------------------------------------
 * SQL-callable functions
 * ------------------------------------------------------------------------- */

PG_FUNCTION_INFO_V1(rbr_classify);
/* rbr_classify(policy, response_type, labels jsonb): the one class that holds. */
Datum
rbr_classify(PG_FUNCTION_ARGS)
{
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	RbrRespType *rt = rbr_policy_resptype(pol, text_to_cstring(PG_GETARG_TEXT_PP(1)));
	double	   *p = parse_values(pol, PG_GETARG_JSONB_P(2), true);
	int			found = -1;
	double	   *raw;

	rbr_require_props(pol, rt, p, false);
	raw = palloc(sizeof(double) * pol->nclasses);
	for (int c = 0; c < pol->nclasses; c++)
	{
		raw[c] = conjunction_prob(pol, rt->classes[c].lits, rt->classes[c].nlits, p);
		if (raw[c] > 0.5)
		{
			if (found >= 0)
				partition_error(pol, rt, raw);
			found = c;
		}
	}
	if (found < 0)
		partition_error(pol, rt, raw);
	PG_RETURN_TEXT_P(cstring_to_text(pol->classes[found]));
}

PG_FUNCTION_INFO_V1(rbr_class_probs);
/* rbr_class_probs(policy, response_type, probs jsonb, mode): jsonb class -> P. */
Datum
rbr_class_probs(PG_FUNCTION_ARGS)
{
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	RbrRespType *rt = rbr_policy_resptype(pol, text_to_cstring(PG_GETARG_TEXT_PP(1)));
	double	   *p = parse_values(pol, PG_GETARG_JSONB_P(2), false);
	RbrClassMode mode = rbr_class_mode(text_to_cstring(PG_GETARG_TEXT_PP(3)));
	double	   *out = palloc(sizeof(double) * pol->nclasses);
	JsonbParseState *state = NULL;
	JsonbValue *res;

	rbr_require_props(pol, rt, p, false);
	rbr_class_probs_compute(pol, rt, p, mode, out);

	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int c = 0; c < pol->nclasses; c++)
	{
		JsonbValue	k,
					v;

		k.type = jbvString;
		k.val.string.val = pol->classes[c];
		k.val.string.len = strlen(pol->classes[c]);
		pushJsonbValue(&state, WJB_KEY, &k);
		v.type = jbvNumeric;
		v.val.numeric = DatumGetNumeric(DirectFunctionCall1(float8_numeric, Float8GetDatum(out[c])));
		pushJsonbValue(&state, WJB_VALUE, &v);
	}
	res = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	PG_RETURN_JSONB_P(JsonbValueToJsonb(res));
}

PG_FUNCTION_INFO_V1(rbr_feature_names);
/* rbr_feature_names(policy, response_type): names of the feature vector. */
Datum
rbr_feature_names(PG_FUNCTION_ARGS)
{
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	RbrRespType *rt = rbr_policy_resptype(pol, text_to_cstring(PG_GETARG_TEXT_PP(1)));
	Datum	   *d = palloc(sizeof(Datum) * rt->nfeatures);

	for (int f = 0; f < rt->nfeatures; f++)
		d[f] = CStringGetTextDatum(rbr_feature_name(pol, &rt->features[f]));
	PG_RETURN_ARRAYTYPE_P(construct_array(d, rt->nfeatures, TEXTOID, -1, false, TYPALIGN_INT));
}

PG_FUNCTION_INFO_V1(rbr_features);
/* rbr_features(policy, response_type, probs jsonb, mode): the feature vector. */
Datum
rbr_features(PG_FUNCTION_ARGS)
{
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	RbrRespType *rt = rbr_policy_resptype(pol, text_to_cstring(PG_GETARG_TEXT_PP(1)));
	double	   *p = parse_values(pol, PG_GETARG_JSONB_P(2), false);
	RbrClassMode mode = rbr_class_mode(text_to_cstring(PG_GETARG_TEXT_PP(3)));
	double	   *out = palloc(sizeof(double) * rt->nfeatures);

	rbr_require_props(pol, rt, p, true);
	rbr_features_compute(pol, rt, p, mode, out);
	PG_RETURN_ARRAYTYPE_P(float8_array(out, rt->nfeatures));
}

PG_FUNCTION_INFO_V1(rbr_feature_vector);
/*
 * rbr_feature_vector(policy, response_type, features_row jsonb): the feature
 * vector read by name from a row of feature columns, e.g. to_jsonb(f) of a
 * <source>_features row; other keys are ignored, and a missing or NULL value
 * gives a NULL element (rbr_fit skips such rows, rbr_reward returns NULL).
 */
Datum
rbr_feature_vector(PG_FUNCTION_ARGS)
{
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	RbrRespType *rt = rbr_policy_resptype(pol, text_to_cstring(PG_GETARG_TEXT_PP(1)));
	Jsonb	   *row = PG_GETARG_JSONB_P(2);
	Datum	   *d = palloc(sizeof(Datum) * (rt->nfeatures + 1));
	bool	   *nulls = palloc0(sizeof(bool) * (rt->nfeatures + 1));
	int			dims[1] = {rt->nfeatures};
	int			lbs[1] = {1};

	if (!JB_ROOT_IS_OBJECT(row))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("features row must be a JSON object"),
				 errhint("Pass to_jsonb(f) of a row of the features table.")));
	for (int f = 0; f < rt->nfeatures; f++)
	{
		const char *name = rbr_feature_name(pol, &rt->features[f]);
		JsonbValue *v = getKeyJsonValueFromContainer(&row->root, name, strlen(name), NULL);

		if (v == NULL || v->type == jbvNull)
		{
			nulls[f] = true;
			continue;
		}
		if (v->type != jbvNumeric)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("feature \"%s\" must be a number, not %s", name,
							v->type == jbvString ? "a string" : v->type == jbvBool ? "a boolean" : "a container")));
		d[f] = DirectFunctionCall1(numeric_float8, NumericGetDatum(v->val.numeric));
		if (DatumGetFloat8(d[f]) < 0.0 || DatumGetFloat8(d[f]) > 1.0)
			ereport(ERROR,
					(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
					 errmsg("feature \"%s\" is %g, outside [0,1]", name, DatumGetFloat8(d[f]))));
	}
	PG_RETURN_ARRAYTYPE_P(construct_md_array(d, nulls, 1, dims, lbs, FLOAT8OID, sizeof(float8),
											 FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}
