/*
 * fit_options.h: the options rbr_fit and rbr_fit_table share (feature
 * names, features fixed at zero, margins per tier), parsed and checked in one
 * place, with errors that name the function they were given to.
 */
#ifndef RBR_FIT_OPTIONS_H
#define RBR_FIT_OPTIONS_H

#include "lib/stringinfo.h"
#include "utils/jsonb.h"

/* The shared options, for d features; NULL / 0 where not given. */
typedef struct RbrFitSharedOptions
{
	int			nnames;
	char	  **names;			/* feature_names */
	bool	   *fixed_zero;		/* d flags */
	int			n_tier_margin;	/* length of tier_margin */
	double	   *tier_margin;	/* margin per better tier; NaN = the margin option */
} RbrFitSharedOptions;

/* ERROR: option key of function fn is invalid, for the reason in detail. */
extern void rbr_fit_option_fail(const char *fn, const char *key, const char *detail) pg_attribute_noreturn();

#define rbr_fit_option_error(fn, key, ...) rbr_fit_option_fail((fn), (key), psprintf(__VA_ARGS__))

/*
 * The options object of fn: ERROR unless jb is a JSON object whose keys are
 * all in keys (NULL-terminated); options_hint lists them for the user.
 */
extern JsonbContainer *rbr_fit_check_option_keys(Jsonb *jb, const char *fn, const char *const *keys,
												 const char *options_hint);

/* A number option of fn within [lo, hi], or dflt when it is absent. */
extern double rbr_fit_option_number(JsonbContainer *c, const char *fn, const char *key,
									double dflt, double lo, double hi);

/* Parse feature_names, fixed_zero and tier_margin of fn's options for d features. */
extern void rbr_fit_parse_shared_options(JsonbContainer *c, const char *fn, int d, RbrFitSharedOptions *out);

/* Append a number of a fit's report: JSON null for NaN or an infinity. */
extern void rbr_fit_json_number(StringInfo buf, double v);

/* Start a fit's report: {"weights": [...] and, when names, "feature_names": [...]. */
extern void rbr_fit_json_weights(StringInfo buf, const double *w, int d, char **names, int nnames);

#endif
