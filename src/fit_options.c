/*
 * fit_options.c: the options rbr_fit (fit.c) and rbr_fit_table
 * (fit_scaleout.c) share: checked here once, so both accept the same values
 * and refuse the same ones with the same words.
 */
#include "postgres.h"

#include <math.h>

#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/json.h"
#include "utils/jsonb.h"

#include "fit_options.h"
#include "jsonutil.h"

/* ERROR about option key of function fn. */
void
rbr_fit_option_fail(const char *fn, const char *key, const char *detail)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid %s option \"%s\": %s", fn, key, detail),
			 errhint("See the options of %s in doc/reference.md.", fn)));
	pg_unreachable();
}

/* The options object, every key known. */
JsonbContainer *
rbr_fit_check_option_keys(Jsonb *jb, const char *fn, const char *const *keys, const char *options_hint)
{
	RbrJsonItem *items;
	int			n;

	if (!JB_ROOT_IS_OBJECT(jb))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s options must be a JSON object", fn),
				 errhint("For example '{\"l2\": 0.001, \"validation_fraction\": 0.1}'.")));
	items = rbr_obj_items(&jb->root, &n);
	for (int i = 0; i < n; i++)
	{
		bool		known = false;

		for (int k = 0; keys[k]; k++)
			known |= strcmp(keys[k], items[i].key) == 0;
		if (!known)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unknown %s option \"%s\"", fn, items[i].key),
					 errhint("%s", options_hint)));
	}
	return &jb->root;
}

/* A number option within [lo, hi]. */
double
rbr_fit_option_number(JsonbContainer *c, const char *fn, const char *key, double dflt, double lo, double hi)
{
	JsonbValue *v = rbr_obj_get(c, key);
	double		x;

	if (v == NULL)
		return dflt;
	if (v->type != jbvNumeric)
		rbr_fit_option_error(fn, key, "must be a number, not %s", rbr_jbv_type_name(v));
	x = DatumGetFloat8(DirectFunctionCall1(numeric_float8, NumericGetDatum(v->val.numeric)));
	if (!(x >= lo && x <= hi))
		rbr_fit_option_error(fn, key, "%g is outside [%g, %g]", x, lo, hi);
	return x;
}

/* feature_names, fixed_zero (positions from 1 or names) and tier_margin. */
void
rbr_fit_parse_shared_options(JsonbContainer *c, const char *fn, int d, RbrFitSharedOptions *out)
{
	JsonbValue *v;

	memset(out, 0, sizeof(*out));
	if ((v = rbr_obj_get(c, "feature_names")) != NULL)
	{
		JsonbValue *e;

		if (!rbr_jbv_is_array(v))
			rbr_fit_option_error(fn, "feature_names", "must be an array of names, such as rbr_feature_names() returns");
		e = rbr_arr_items(v->val.binary.data, &out->nnames);
		if (out->nnames != d)
			rbr_fit_option_error(fn, "feature_names", "has %d names for %d features", out->nnames, d);
		out->names = palloc(sizeof(char *) * Max(out->nnames, 1));
		for (int i = 0; i < out->nnames; i++)
		{
			if (e[i].type != jbvString)
				rbr_fit_option_error(fn, "feature_names", "names must be strings");
			out->names[i] = rbr_jbv_cstring(&e[i]);
		}
	}

	if ((v = rbr_obj_get(c, "fixed_zero")) != NULL)
	{
		JsonbValue *e;
		int			ne;

		if (!rbr_jbv_is_array(v))
			rbr_fit_option_error(fn, "fixed_zero", "must be an array of feature positions (from 1) or names");
		e = rbr_arr_items(v->val.binary.data, &ne);
		out->fixed_zero = palloc0(sizeof(bool) * Max(d, 1));
		for (int i = 0; i < ne; i++)
		{
			int			pos = -1;

			if (e[i].type == jbvNumeric)
			{
				double		x = DatumGetFloat8(DirectFunctionCall1(numeric_float8, NumericGetDatum(e[i].val.numeric)));

				if (x == floor(x) && x >= 1 && x <= d)
					pos = (int) x - 1;
			}
			else if (e[i].type == jbvString && out->names != NULL)
			{
				char	   *name = rbr_jbv_cstring(&e[i]);

				for (int k = 0; k < out->nnames; k++)
					if (strcmp(out->names[k], name) == 0)
						pos = k;
			}
			if (pos < 0)
				rbr_fit_option_error(fn, "fixed_zero", "entry %d is neither a feature position in 1..%d nor a name in feature_names", i + 1, d);
			out->fixed_zero[pos] = true;
		}
	}

	if ((v = rbr_obj_get(c, "tier_margin")) != NULL)
	{
		RbrJsonItem *t;
		int			nt;
		int			maxtier = -1;

		if (!rbr_jbv_is_object(v))
			rbr_fit_option_error(fn, "tier_margin", "must be an object from the better side's tier to its margin, such as {\"0\": 2}");
		t = rbr_obj_items(v->val.binary.data, &nt);
		for (int i = 0; i < nt; i++)
		{
			char	   *end;
			long		tier = strtol(t[i].key, &end, 10);

			if (*t[i].key == '\0' || *end != '\0' || tier < 0 || tier > 1000)
				rbr_fit_option_error(fn, "tier_margin", "key \"%s\" is not a tier in 0..1000", t[i].key);
			maxtier = Max(maxtier, (int) tier);
		}
		out->n_tier_margin = maxtier + 1;
		out->tier_margin = palloc(sizeof(double) * Max(maxtier + 1, 1));
		for (int i = 0; i <= maxtier; i++)
			out->tier_margin[i] = NAN;
		for (int i = 0; i < nt; i++)
		{
			double		m;

			if (t[i].value.type != jbvNumeric)
				rbr_fit_option_error(fn, "tier_margin", "margins must be numbers");
			m = DatumGetFloat8(DirectFunctionCall1(numeric_float8, NumericGetDatum(t[i].value.val.numeric)));
			if (!(m >= 0 && m <= 1e6))
				rbr_fit_option_error(fn, "tier_margin", "margin %g is outside [0, 1e6]", m);
			out->tier_margin[strtol(t[i].key, NULL, 10)] = m;
		}
	}
}

/* Append a number of a fit's report: JSON null for NaN or an infinity. */
void
rbr_fit_json_number(StringInfo buf, double v)
{
	if (isnan(v) || isinf(v))
		appendStringInfoString(buf, "null");
	else
		appendStringInfoString(buf, float8out_internal(v));
}

/* Start a fit's report: {"weights": [...] and, when names, "feature_names": [...]. */
void
rbr_fit_json_weights(StringInfo buf, const double *w, int d, char **names, int nnames)
{
	appendStringInfoString(buf, "{\"weights\": [");
	for (int j = 0; j < d; j++)
	{
		if (j)
			appendStringInfoString(buf, ", ");
		rbr_fit_json_number(buf, w[j]);
	}
	appendStringInfoString(buf, "]");
	if (names)
	{
		appendStringInfoString(buf, ", \"feature_names\": [");
		for (int i = 0; i < nnames; i++)
		{
			if (i)
				appendStringInfoString(buf, ", ");
			escape_json(buf, names[i]);
		}
		appendStringInfoString(buf, "]");
	}
}
