/*
 * fit_scaleout.c: rbr_fit_table, the fit that iterates over a table without
 * gathering its rows on one node.
 *
 * It minimises the same objective as rbr_fit's exact solver (fit_solver.h):
 *
 *     L(w) = (1/P) sum_pairs max(0, u_p(w)) + (l2/2)|w|^2,   u_p = m_p - (s_a - s_b)
 *
 * Every pass is one SQL query: a self-join of the table on the group key forms
 * the ordered pairs where the rows are, and a plain aggregate (float8[] state,
 * a combine function) sums what each pair contributes, so parallel query and
 * Citus aggregate partially on the workers.  The driver (rbr_fit_table, run
 * on the coordinator through SPI as the caller) works between the passes:
 *
 * 1. Barrier passes (rbr.fit_pairs), a few.  Each pair's hinge is written with
 *    a slack xi >= 0, xi >= u and the log barrier -mu (log xi + log(xi - u));
 *    the slack has a closed form, so the barrier objective
 *        F_mu(w) = (1/P) sum_pairs phi_mu(u_p(w)) + (l2/2)|w|^2
 *    is smooth in w alone, with gradient and Hessian summed over the pairs.  A
 *    pass evaluates 8 points along the last Newton direction (a line search
 *    in one pass).  The multipliers alpha_p = phi_mu'(u_p) lie in (0, 1), so
 *    they are dual-feasible: every point evaluated also gives a lower bound
 *    D(alpha), and mixtures of them (SoDual) better ones.
 * 2. Working-set passes (rbr.fit_band), until the gap is certified.  At the
 *    best point the pairs within tau of the kink come back one by one (at most
 *    SO_BAND_CAP of them, tau chosen from a histogram of |u|), the pairs
 *    beyond it on the active side as sums (their hinge is linear there).  The
 *    model they make is solved in memory by a primal-dual interior-point
 *    method (so_model_solve).  Its multipliers (1 for the active sums, 0 for
 *    the rest) are dual-feasible for the whole problem, so its dual value is
 *    a lower bound; the next pass evaluates the model's solution, an upper
 *    bound.  Once the working set holds every pair whose side can change,
 *    the two meet: gap = best L - best lower bound <= tol max(L, 1e-6).
 */
#include "postgres.h"

#include <math.h>

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "fit_options.h"
#include "jsonutil.h"
#include "rbr.h"
#include "rowset.h"

/* Largest number of features (as fit_solver.h). */
#define SO_MAX_D 1024

/*
 * Layout of the parameters of one pass (float8[]): d, mu, margin,
 * validation_fraction, seed, n_tier_margin, K, tier_margin[n_tier_margin],
 * t[K], w[d], dir[d].  The pass evaluates the K points w + t[k] dir (a line
 * search in one pass).
 */
#define PAR_D 0
#define PAR_MU 1
#define PAR_MARGIN 2
#define PAR_VF 3
#define PAR_SEED 4
#define PAR_NTM 5
#define PAR_K 6
#define PAR_HDR 7

/* Most barrier passes before the working-set passes take over. */
#define SO_BARRIER_PASSES 6

/* Pairs of one working set. */
#define SO_BAND_CAP 20000

/* Most points one pass evaluates. */
#define SO_MAX_K 8

/*
 * Layout of the sums of one pass (float8[]): the header below, then
 * v = sum alpha_p z_p (d), then sum phi'' z_p z_p^T (upper triangle, row by row).
 */
#define ST_TRAIN_PAIRS 0
#define ST_TRAIN_HINGE 1
#define ST_BARRIER 2
#define ST_GAP_TERMS 3
#define ST_TRAIN_RIGHT 4
#define ST_TRAIN_ZERO 5
#define ST_VAL_PAIRS 6
#define ST_VAL_HINGE 7
#define ST_VAL_RIGHT 8
#define ST_D 9
#define ST_ALPHA_C 10
#define ST_HDR 11

/* Layout of the row check of one group (float8[]): complete rows, skipped rows, d, min tier, max tier. */
#define RC_COMPLETE 0
#define RC_SKIPPED 1
#define RC_D 2
#define RC_MIN_TIER 3
#define RC_MAX_TIER 4
#define RC_LEN 5

/* Number of doubles in the sums of a pass with d features. */
static int
state_len(int d)
{
	return ST_HDR + d + d * (d + 1) / 2;
}

/* A new float8[] of n zeros in the current memory context. */
static ArrayType *
zero_array(int n)
{
	ArrayType  *a;
	Size		bytes = ARR_OVERHEAD_NONULLS(1) + sizeof(float8) * (Size) n;

	a = (ArrayType *) palloc0(bytes);
	SET_VARSIZE(a, bytes);
	a->ndim = 1;
	a->dataoffset = 0;
	a->elemtype = FLOAT8OID;
	ARR_DIMS(a)[0] = n;
	ARR_LBOUND(a)[0] = 1;
	return a;
}

/* The doubles of a one-dimensional float8[] without NULLs, or ERROR naming what. */
static double *
float8_items(ArrayType *a, int *n, const char *what)
{
	if (ARR_ELEMTYPE(a) != FLOAT8OID || ARR_NDIM(a) > 1 || ARR_HASNULL(a))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a one-dimensional float8 array without NULLs", what)));
	*n = ARR_NDIM(a) == 0 ? 0 : ARR_DIMS(a)[0];
	return (double *) ARR_DATA_PTR(a);
}

/* True if a group is held out for validation: the same split as rbr_fit's exact solver. */
static bool
key_is_validation(const char *key, int len, uint64 seed, double fraction)
{
	uint64		h;

	if (fraction <= 0)
		return false;
	h = hash_bytes_extended((const unsigned char *) key, len, seed);
	return (double) (h >> 11) * (1.0 / 9007199254740992.0) < fraction;
}

/* Per-call cache of rbr.fit_pairs: scratch for one pair's difference. */
typedef struct PairScratch
{
	int			d;
	double	   *z;
} PairScratch;

/*
 * The parameters (argument 1) of a pass aggregate's transition function
 * (name: rbr.fit_pairs or rbr.fit_band), at least hdr doubles; sets *aggcxt.
 */
static const double *
pass_params(FunctionCallInfo fcinfo, const char *name, int hdr, int *npar, MemoryContext *aggcxt)
{
	const double *par;

	if (!AggCheckCallContext(fcinfo, aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s called in non-aggregate context", name)));
	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s needs its parameters", name),
				 errhint("%s is a step of rbr_fit_table(); call that instead.", name)));
	par = float8_items(PG_GETARG_ARRAYTYPE_P(1), npar, psprintf("the parameters of %s", name));
	if (*npar < hdr)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("%s parameters are too short", name)));
	return par;
}

/* One ordered pair of a pass (a better than b), read from its row and scored at w. */
typedef struct PassPair
{
	const double *xa,
			   *xb;				/* features, d each */
	double		m;				/* the pair's margin */
	double		c;				/* m - (base_a - base_b): the pair's u at w = 0 */
	double		sa,
				sb;				/* scores at w */
	double		u;				/* m - (sa - sb) */
	bool		validation;		/* its group is held out */
} PassPair;

/*
 * Read the pair of a pass row (arguments group_key, tier_a, tier_b,
 * features_a, features_b, base_a, base_b: 2..8) and score it at w (d
 * features; the margins by tier at tm, ntm of them): false when the row is
 * to be skipped (a NULL: the pass query sends none, the row check counted
 * rows with a NULL feature).
 */
static bool
pass_pair(FunctionCallInfo fcinfo, const double *par, const double *tm, int ntm, int d, const double *w, PassPair *p)
{
	text	   *key;
	int32		tier_a;
	int			na,
				nb;

	for (int i = 2; i <= 8; i++)
		if (PG_ARGISNULL(i))
			return false;
	if (ARR_HASNULL(PG_GETARG_ARRAYTYPE_P(5)) || ARR_HASNULL(PG_GETARG_ARRAYTYPE_P(6)))
		return false;
	key = PG_GETARG_TEXT_PP(2);
	tier_a = PG_GETARG_INT32(3);
	p->xa = float8_items(PG_GETARG_ARRAYTYPE_P(5), &na, "features");
	p->xb = float8_items(PG_GETARG_ARRAYTYPE_P(6), &nb, "features");
	if (na != d || nb != d)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("feature arrays differ in length"),
				 errhint("Fit one response type at a time (where_column => 'response_type'): each has its own feature list.")));
	p->m = (tier_a < ntm && !isnan(tm[tier_a])) ? tm[tier_a] : par[PAR_MARGIN];
	p->sa = PG_GETARG_FLOAT8(7);
	p->sb = PG_GETARG_FLOAT8(8);
	p->c = p->m - (p->sa - p->sb);
	for (int j = 0; j < d; j++)
	{
		p->sa += w[j] * p->xa[j];
		p->sb += w[j] * p->xb[j];
	}
	p->u = p->m - (p->sa - p->sb);
	if (isnan(p->u) || isinf(p->u))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("a pair's score difference is not finite"),
				 errhint("Features and base rewards must be finite numbers.")));
	p->validation = key_is_validation(VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key), (uint64) par[PAR_SEED], par[PAR_VF]);
	return true;
}

PG_FUNCTION_INFO_V1(rbr_fit_pairs_transfn);
/*
 * rbr.fit_pairs transition: one ordered pair (a better than b) of one group:
 * (params, group_key, tier_a, tier_b, features_a, features_b, base_a, base_b).
 * Adds the pair's hinge, barrier value, multiplier and curvature at each of
 * the pass's points to the sums (K blocks of state_len(d)).
 */
Datum
rbr_fit_pairs_transfn(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	ArrayType  *state;
	double	   *st;
	const double *par,
			   *w,
			   *dir,
			   *ts;
	int			npar,
				d,
				ntm,
				K,
				slen;
	double		mu,
				du,
				u0;
	PassPair	pp;
	PairScratch *sc;

	par = pass_params(fcinfo, "rbr.fit_pairs", PAR_HDR, &npar, &aggcxt);
	d = (int) par[PAR_D];
	ntm = (int) par[PAR_NTM];
	K = (int) par[PAR_K];
	mu = par[PAR_MU];
	if (d < 0 || d > SO_MAX_D || ntm < 0 || ntm > 1001 || K < 1 || K > SO_MAX_K ||
		npar != PAR_HDR + ntm + K + 2 * d || !(mu > 0))
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("rbr.fit_pairs parameters are malformed")));
	ts = par + PAR_HDR + ntm;
	w = ts + K;
	dir = w + d;
	slen = state_len(d);

	if (PG_ARGISNULL(0))
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		state = zero_array(K * slen);
		for (int k = 0; k < K; k++)
			((double *) ARR_DATA_PTR(state))[k * slen + ST_D] = d;
		MemoryContextSwitchTo(old);
	}
	else
		state = PG_GETARG_ARRAYTYPE_P(0);
	st = (double *) ARR_DATA_PTR(state);
	if (ARR_NDIM(state) != 1 || ARR_DIMS(state)[0] != K * slen || st[ST_D] != d)
		ereport(ERROR, (errcode(ERRCODE_DATA_EXCEPTION), errmsg("rbr.fit_pairs state does not match its parameters")));

	if (!pass_pair(fcinfo, par, par + PAR_HDR, ntm, d, w, &pp))
		PG_RETURN_ARRAYTYPE_P(state);

	sc = (PairScratch *) fcinfo->flinfo->fn_extra;
	if (sc == NULL || sc->d != d)
	{
		sc = MemoryContextAlloc(fcinfo->flinfo->fn_mcxt, sizeof(PairScratch));
		sc->d = d;
		sc->z = MemoryContextAlloc(fcinfo->flinfo->fn_mcxt, sizeof(double) * Max(d, 1));
		fcinfo->flinfo->fn_extra = sc;
	}
	du = 0;
	for (int j = 0; j < d; j++)
	{
		sc->z[j] = pp.xa[j] - pp.xb[j];
		du += dir[j] * sc->z[j];
	}
	u0 = pp.u;
	if (isnan(du) || isinf(du))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("a pair's score difference is not finite"),
				 errhint("Features and base rewards must be finite numbers.")));

	if (pp.validation)
	{
		for (int k = 0; k < K; k++)
		{
			double	   *sk = st + k * slen;
			double		u = u0 - ts[k] * du;

			sk[ST_VAL_PAIRS] += 1;
			sk[ST_VAL_HINGE] += u > 0 ? u : 0;
			sk[ST_VAL_RIGHT] += ts[k] == 0 ? pp.sa > pp.sb : pp.m - u > 0;
		}
		PG_RETURN_ARRAYTYPE_P(state);
	}

	for (int k = 0; k < K; k++)
	{
		/* the barrier-smoothed hinge at point k: slack xi, multiplier alpha, curvature */
		double	   *sk = st + k * slen;
		double		u = u0 - ts[k] * du;
		double		S = hypot(u, 2 * mu);
		double		A,
					B,
					xi,
					xmu,
					alpha,
					curv;
		double	   *v = sk + ST_HDR;
		double	   *H = v + d;
		int			kk = 0;

		if (u >= 0)
		{
			A = u + S;
			B = 4 * mu * mu / A;
		}
		else
		{
			B = S - u;
			A = 4 * mu * mu / B;
		}
		xi = (A + 2 * mu) / 2;	/* the slack */
		xmu = (B + 2 * mu) / 2; /* xi - u */
		alpha = mu / xmu;
		curv = 2 * mu * B / (S * (B + 2 * mu) * (B + 2 * mu));

		sk[ST_TRAIN_PAIRS] += 1;
		sk[ST_TRAIN_HINGE] += u > 0 ? u : 0;
		sk[ST_BARRIER] += xi - mu * (log(xi) + log(xmu));
		sk[ST_GAP_TERMS] += u > 0 ? u * (mu / xi) : -u * alpha;
		sk[ST_ALPHA_C] += alpha * pp.c;
		/* s_a > s_b strictly (ties are wrong), as rbr_fit counts */
		sk[ST_TRAIN_RIGHT] += ts[k] == 0 ? pp.sa > pp.sb : pp.m - u > 0;
		sk[ST_TRAIN_ZERO] += u <= 0;
		for (int i = 0; i < d; i++)
			v[i] += alpha * sc->z[i];
		/* the curvature only at the first point (the driver's Newton matrix) */
		if (k == 0)
			for (int i = 0; i < d; i++)
			{
				double		ci = curv * sc->z[i];

				if (ci == 0)
				{
					kk += d - i;
					continue;
				}
				for (int j = i; j < d; j++)
					H[kk++] += ci * sc->z[j];
			}
	}
	PG_RETURN_ARRAYTYPE_P(state);
}

PG_FUNCTION_INFO_V1(rbr_fit_sums_combine);
/* Combine two partial sums of rbr.fit_pairs: element-wise addition. */
Datum
rbr_fit_sums_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	ArrayType  *a,
			   *b;
	double	   *x;
	const double *y;
	int			na,
				nb;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("rbr.fit_sums_combine called in non-aggregate context")));
	/* strict: both are non-NULL here; the first is our own state */
	a = PG_GETARG_ARRAYTYPE_P(0);
	b = PG_GETARG_ARRAYTYPE_P(1);
	x = float8_items(a, &na, "a partial sum");
	y = float8_items(b, &nb, "a partial sum");
	if (na != nb)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("partial sums of rbr.fit_pairs differ in length")));
	for (int i = 0; i < na; i++)
		x[i] += y[i];
	PG_RETURN_ARRAYTYPE_P(a);
}


/*
 * The working-set pass (rbr.fit_band): at one point w, the pairs whose
 * u = m - (s_a - s_b) is within tau of the kink are returned one by one (at
 * most cap of them: the working set), the pairs beyond it on the active side
 * only as sums (their hinge is linear there), with the losses at w and a
 * histogram of |u| to choose the next tau.
 *
 * Parameters (float8[]): d, mu, margin, validation_fraction, seed,
 * n_tier_margin, tau, cap, tier_margin[n_tier_margin], w[d].
 * State: the header below, v_A = sum of z over the active pairs (d), the
 * histogram (BAND_NBINS), then cap slots of (z (d), c, alpha at mu).
 */
#define BP_TAU 6
#define BP_CAP 7
#define BP_HDR 8

#define B_TRAIN_PAIRS 0
#define B_TRAIN_HINGE 1
#define B_TRAIN_RIGHT 2
#define B_TRAIN_ZERO 3
#define B_VAL_PAIRS 4
#define B_VAL_HINGE 5
#define B_VAL_RIGHT 6
#define B_NA 7
#define B_AC 8
#define B_OVERFLOW 9
#define B_NBAND 10
#define B_CAP 11
#define B_D 12
#define B_HDR 13
#define BAND_NBINS 24
#define BAND_MAX_CAP 200000

/* Upper edge of histogram bin b of |u|: 10^(-8 + b/2); the last bin takes the rest. */
static double
band_edge(int b)
{
	return pow(10.0, -8 + 0.5 * b);
}

/* Length of a working-set state. */
static int64
band_len(int d, int cap)
{
	return B_HDR + d + BAND_NBINS + (int64) cap * (d + 2);
}

PG_FUNCTION_INFO_V1(rbr_fit_band_transfn);
/*
 * rbr.fit_band transition: one ordered pair (a better than b):
 * (params, group_key, tier_a, tier_b, features_a, features_b, base_a, base_b).
 */
Datum
rbr_fit_band_transfn(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	ArrayType  *state;
	double	   *st;
	const double *par,
			   *w;
	int			npar,
				d,
				ntm,
				cap,
				bin;
	double		mu,
				tau,
				u;
	PassPair	pp;

	par = pass_params(fcinfo, "rbr.fit_band", BP_HDR, &npar, &aggcxt);
	d = (int) par[PAR_D];
	ntm = (int) par[PAR_NTM];
	cap = (int) par[BP_CAP];
	mu = par[PAR_MU];
	tau = par[BP_TAU];
	if (d < 0 || d > SO_MAX_D || ntm < 0 || ntm > 1001 || cap < 0 || cap > BAND_MAX_CAP ||
		npar != BP_HDR + ntm + d || !(mu > 0) || !(tau >= 0))
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("rbr.fit_band parameters are malformed")));
	w = par + BP_HDR + ntm;

	if (PG_ARGISNULL(0))
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		if (band_len(d, cap) > (int64) (MaxAllocSize / sizeof(double)) - 64)
			ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("rbr.fit_band working set is too large")));
		state = zero_array((int) band_len(d, cap));
		st = (double *) ARR_DATA_PTR(state);
		st[B_CAP] = cap;
		st[B_D] = d;
		MemoryContextSwitchTo(old);
	}
	else
		state = PG_GETARG_ARRAYTYPE_P(0);
	st = (double *) ARR_DATA_PTR(state);
	if (ARR_NDIM(state) != 1 || ARR_DIMS(state)[0] != band_len(d, cap) || st[B_D] != d || st[B_CAP] != cap)
		ereport(ERROR, (errcode(ERRCODE_DATA_EXCEPTION), errmsg("rbr.fit_band state does not match its parameters")));

	if (!pass_pair(fcinfo, par, par + BP_HDR, ntm, d, w, &pp))
		PG_RETURN_ARRAYTYPE_P(state);
	u = pp.u;
	if (pp.validation)
	{
		st[B_VAL_PAIRS] += 1;
		st[B_VAL_HINGE] += u > 0 ? u : 0;
		st[B_VAL_RIGHT] += pp.sa > pp.sb;
		PG_RETURN_ARRAYTYPE_P(state);
	}
	st[B_TRAIN_PAIRS] += 1;
	st[B_TRAIN_HINGE] += u > 0 ? u : 0;
	st[B_TRAIN_RIGHT] += pp.sa > pp.sb;
	st[B_TRAIN_ZERO] += u <= 0;
	for (bin = 0; bin < BAND_NBINS - 1 && fabs(u) > band_edge(bin); bin++)
		;
	st[B_HDR + d + bin] += 1;
	if (u > tau)
	{
		double	   *vA = st + B_HDR;

		st[B_NA] += 1;
		st[B_AC] += pp.c;
		for (int j = 0; j < d; j++)
			vA[j] += pp.xa[j] - pp.xb[j];
	}
	else if (u >= -tau)
	{
		if (st[B_NBAND] < cap)
		{
			double	   *slot = st + B_HDR + d + BAND_NBINS + (int64) st[B_NBAND] * (d + 2);
			double		S = hypot(u, 2 * mu);
			double		B = u >= 0 ? 4 * mu * mu / (u + S) : S - u;

			for (int j = 0; j < d; j++)
				slot[j] = pp.xa[j] - pp.xb[j];
			slot[d] = pp.c;
			slot[d + 1] = 2 * mu / (B + 2 * mu);	/* the barrier multiplier, a warm start */
			st[B_NBAND] += 1;
		}
		else
			st[B_OVERFLOW] += 1;
	}
	PG_RETURN_ARRAYTYPE_P(state);
}

PG_FUNCTION_INFO_V1(rbr_fit_band_combine);
/* Combine two working-set states: add the sums, join the working sets (up to cap). */
Datum
rbr_fit_band_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	ArrayType  *a;
	double	   *x;
	const double *y;
	int			na,
				nb,
				d,
				cap;
	int64		nx,
				ny,
				take;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("rbr.fit_band_combine called in non-aggregate context")));
	a = PG_GETARG_ARRAYTYPE_P(0);
	x = float8_items(a, &na, "a working-set state");
	y = float8_items(PG_GETARG_ARRAYTYPE_P(1), &nb, "a working-set state");
	if (na != nb || na < B_HDR)
		ereport(ERROR, (errcode(ERRCODE_DATA_EXCEPTION), errmsg("working-set states of rbr.fit_band differ in length")));
	d = (int) x[B_D];
	cap = (int) x[B_CAP];
	if (y[B_D] != d || y[B_CAP] != cap || band_len(d, cap) != na)
		ereport(ERROR, (errcode(ERRCODE_DATA_EXCEPTION), errmsg("malformed working-set state of rbr.fit_band")));
	nx = (int64) x[B_NBAND];
	ny = (int64) y[B_NBAND];
	for (int i = 0; i < B_HDR + d + BAND_NBINS; i++)
		if (i != B_NBAND && i != B_CAP && i != B_D)
			x[i] += y[i];
	take = Min(ny, cap - nx);
	memcpy(x + B_HDR + d + BAND_NBINS + nx * (d + 2), y + B_HDR + d + BAND_NBINS, sizeof(double) * take * (d + 2));
	x[B_NBAND] = nx + take;
	x[B_OVERFLOW] += ny - take;
	PG_RETURN_ARRAYTYPE_P(a);
}

PG_FUNCTION_INFO_V1(rbr_fit_table_rows_transfn);
/*
 * rbr.fit_table_rows transition: (tier, features, base_reward, key_is_present) of
 * one row of a group; counts complete and skipped rows and checks the values
 * as rbr_fit does.
 */
Datum
rbr_fit_table_rows_transfn(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	ArrayType  *state;
	double	   *st;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("rbr.fit_table_rows called in non-aggregate context")));
	if (PG_ARGISNULL(0))
	{
		MemoryContext old = MemoryContextSwitchTo(aggcxt);

		state = zero_array(RC_LEN);
		st = (double *) ARR_DATA_PTR(state);
		st[RC_D] = -1;
		st[RC_MIN_TIER] = INFINITY;
		st[RC_MAX_TIER] = -INFINITY;
		MemoryContextSwitchTo(old);
	}
	else
		state = PG_GETARG_ARRAYTYPE_P(0);
	st = (double *) ARR_DATA_PTR(state);

	if (!PG_ARGISNULL(2) && ARR_NDIM(PG_GETARG_ARRAYTYPE_P(2)) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("features must be a one-dimensional array")));
	if (PG_ARGISNULL(1) || PG_ARGISNULL(2) || PG_ARGISNULL(3) || PG_ARGISNULL(4) ||
		!PG_GETARG_BOOL(4) || ARR_HASNULL(PG_GETARG_ARRAYTYPE_P(2)))
		st[RC_SKIPPED] += 1;
	else
	{
		int32		tier = PG_GETARG_INT32(1);
		ArrayType  *f = PG_GETARG_ARRAYTYPE_P(2);
		int			d = ARR_NDIM(f) == 0 ? 0 : ARR_DIMS(f)[0];
		const double *x = (const double *) ARR_DATA_PTR(f);

		rbr_check_tier(tier);
		rbr_check_finite(PG_GETARG_FLOAT8(3), "base_reward");
		for (int i = 0; i < d; i++)
			if (isnan(x[i]) || isinf(x[i]))
				ereport(ERROR,
						(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
						 errmsg("feature %d is %s", i + 1, isnan(x[i]) ? "NaN" : "infinite"),
						 errhint("Features are probabilities in [0,1]; regrade or drop the row.")));
		if (st[RC_D] >= 0 && st[RC_D] != d)
			ereport(ERROR,
					(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
					 errmsg("feature arrays differ in length"),
					 errhint("Fit one response type at a time (where_column => 'response_type'): each has its own feature list.")));
		st[RC_D] = d;
		st[RC_COMPLETE] += 1;
		st[RC_MIN_TIER] = Min(st[RC_MIN_TIER], tier);
		st[RC_MAX_TIER] = Max(st[RC_MAX_TIER], tier);
	}
	PG_RETURN_ARRAYTYPE_P(state);
}

PG_FUNCTION_INFO_V1(rbr_fit_table_rows_combine);
/* Combine two row checks of rbr.fit_table_rows. */
Datum
rbr_fit_table_rows_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	double	   *x;
	const double *y;
	ArrayType  *a;
	int			na,
				nb;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("rbr.fit_table_rows_combine called in non-aggregate context")));
	a = PG_GETARG_ARRAYTYPE_P(0);
	x = float8_items(a, &na, "a row check");
	y = float8_items(PG_GETARG_ARRAYTYPE_P(1), &nb, "a row check");
	if (na != RC_LEN || nb != RC_LEN)
		ereport(ERROR, (errcode(ERRCODE_DATA_EXCEPTION), errmsg("malformed row check of rbr.fit_table_rows")));
	if (x[RC_D] >= 0 && y[RC_D] >= 0 && x[RC_D] != y[RC_D])
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("feature arrays differ in length"),
				 errhint("Fit one response type at a time (where_column => 'response_type'): each has its own feature list.")));
	x[RC_COMPLETE] += y[RC_COMPLETE];
	x[RC_SKIPPED] += y[RC_SKIPPED];
	x[RC_D] = Max(x[RC_D], y[RC_D]);
	x[RC_MIN_TIER] = Min(x[RC_MIN_TIER], y[RC_MIN_TIER]);
	x[RC_MAX_TIER] = Max(x[RC_MAX_TIER], y[RC_MAX_TIER]);
	PG_RETURN_ARRAYTYPE_P(a);
}

/* ---------------------------------------------------------------------------
 * Options
 * ------------------------------------------------------------------------- */

/* Options of one rbr_fit_table call. */
typedef struct SoOptions
{
	double		margin;
	int			ntm;			/* length of tier_margin */
	double	   *tier_margin;	/* NaN = margin */
	double		l2;
	double		l2_tiebreak;
	double		validation_fraction;
	uint64		seed;
	double		tol;
	int			max_iter;
	int			working_set;	/* pairs in one working set */
	int			nnames;
	char	  **names;
	bool	   *fixed_zero;		/* d flags or NULL */
} SoOptions;

static const char *const so_option_keys[] = {
	"solver", "margin", "tier_margin", "l2", "fixed_zero", "feature_names",
	"validation_fraction", "seed", "tol", "max_iter", "working_set", NULL
};

/* ERROR about one option; a number option within [lo, hi]. */
#define so_option_error(key, ...) rbr_fit_option_error("rbr_fit_table", (key), __VA_ARGS__)
#define so_option_number(c, key, dflt, lo, hi) rbr_fit_option_number((c), "rbr_fit_table", (key), (dflt), (lo), (hi))

/* Parse the options (NULL = defaults) for d features. */
static void
so_parse_options(Jsonb *jb, int d, SoOptions *o)
{
	JsonbContainer *c;
	JsonbValue *v;

	memset(o, 0, sizeof(*o));
	o->margin = 1;
	o->l2 = 1e-6;
	o->l2_tiebreak = 1e-9;
	o->validation_fraction = 0.05;
	o->tol = 1e-9;
	o->max_iter = 200;
	/* at most 2^22 doubles (32 MB) in one working set */
	o->working_set = Min(SO_BAND_CAP, (1 << 22) / (d + 2));
	if (jb == NULL)
		return;
	c = rbr_fit_check_option_keys(jb, "rbr_fit_table", so_option_keys,
								  "Options: solver, margin, tier_margin, l2, fixed_zero, feature_names, validation_fraction, seed, tol, max_iter, working_set (AdamW is rbr_fit's alone).");
	if ((v = rbr_obj_get(c, "solver")) != NULL)
	{
		char	   *s = v->type == jbvString ? rbr_jbv_cstring(v) : "";

		if (strcmp(s, "barrier") != 0 && strcmp(s, "exact") != 0)
			so_option_error("solver", "rbr_fit_table reaches the exact optimum (\"exact\" or \"barrier\"); use rbr_fit for \"adamw\"");
	}
	o->margin = so_option_number(c, "margin", o->margin, 0, 1e6);
	o->l2 = so_option_number(c, "l2", o->l2, 0, 1e6);
	o->validation_fraction = so_option_number(c, "validation_fraction", o->validation_fraction, 0, 1);
	o->seed = (uint64) so_option_number(c, "seed", 0, 0, 9007199254740992.0);
	o->tol = so_option_number(c, "tol", o->tol, 1e-15, 1);
	o->max_iter = (int) so_option_number(c, "max_iter", o->max_iter, 1, 1e6);
	o->working_set = (int) so_option_number(c, "working_set", o->working_set, 16, BAND_MAX_CAP);

	{
		RbrFitSharedOptions sh;

		rbr_fit_parse_shared_options(c, "rbr_fit_table", d, &sh);
		o->nnames = sh.nnames;
		o->names = sh.names;
		o->fixed_zero = sh.fixed_zero;
		if (sh.tier_margin != NULL)
		{
			o->ntm = sh.n_tier_margin;
			o->tier_margin = sh.tier_margin;
		}
	}
}

/* ---------------------------------------------------------------------------
 * The driver
 * ------------------------------------------------------------------------- */

/* A column of the source, checked: its quoted name and base type. */
typedef struct SoColumn
{
	const char *role;			/* "group_column", ... for messages */
	char	   *name;
	char	   *quoted;
	AttrNumber	attnum;
	Oid			type;			/* as declared */
	Oid			base;			/* domain's base type */
} SoColumn;

/* Look up a column of rel by name, or ERROR naming the argument. */
static void
so_column(Oid relid, const char *relname, Name arg, const char *role, SoColumn *col)
{
	HeapTuple	tup;
	Form_pg_attribute att;

	col->role = role;
	if (arg == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", role)));
	col->name = pstrdup(NameStr(*arg));
	tup = SearchSysCacheAttName(relid, col->name);
	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("%s \"%s\" is not a column of %s", role, col->name, relname),
				 errhint("Pass the name of a column, as \\d %s lists them.", relname)));
	att = (Form_pg_attribute) GETSTRUCT(tup);
	if (att->attnum <= 0)
	{
		ReleaseSysCache(tup);
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("%s \"%s\" is a system column", role, col->name)));
	}
	col->attnum = att->attnum;
	col->type = att->atttypid;
	col->base = getBaseType(att->atttypid);
	col->quoted = pstrdup(quote_identifier(col->name));
	ReleaseSysCache(tup);
}

/* ERROR about a column of the wrong type. */
static void
so_type_error(const SoColumn *col, const char *want)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATATYPE_MISMATCH),
			 errmsg("%s \"%s\" is of type %s, not %s", col->role, col->name, format_type_be(col->type), want),
			 errhint("Fit from a view that casts the column, or pass another column.")));
}

/* The query text of the row check (over a's rows, grouped by key). */
static char *
so_check_query(const char *src, const char *keytext, const char *tier, const char *feat,
			   const char *base, const char *key, const char *filter)
{
	StringInfoData q;

	initStringInfo(&q);
	appendStringInfo(&q,
					 "SELECT pg_catalog.count(*) FILTER (WHERE r[1] > 0), "
					 "pg_catalog.count(*) FILTER (WHERE r[1] > 0 AND r[4] = r[5]), "
					 "pg_catalog.sum(r[1]), pg_catalog.sum(r[2]), "
					 "pg_catalog.min(r[3]) FILTER (WHERE r[3] >= 0), pg_catalog.max(r[3]) "
					 "FROM (SELECT rbr.fit_table_rows(%s, %s, %s, a.%s IS NOT NULL) AS r FROM %s a%s GROUP BY %s) g",
					 tier, feat, base, key, src, filter, keytext);
	return q.data;
}

/* The query text of one pass: every ordered pair, summed by rbr.fit_pairs($1, ...). */
static char *
so_pass_query(const char *agg, const char *src, const SoColumn *k, const SoColumn *t, const SoColumn *f,
			  const SoColumn *b, const SoColumn *wc, const char *wtype)
{
	StringInfoData q;
	bool		raw_key = k->base == TEXTOID || k->base == VARCHAROID || k->base == INT2OID ||
		k->base == INT4OID || k->base == INT8OID || k->base == UUIDOID;
	const char *fcast = f->base == FLOAT8ARRAYOID ? "" : "::pg_catalog.float8[]";

	initStringInfo(&q);
	appendStringInfo(&q, "SELECT %s($1, ", agg);
	if (k->base == TEXTOID)
		appendStringInfo(&q, "a.%s, ", k->quoted);
	else
		appendStringInfo(&q, "a.%s::pg_catalog.text, ", k->quoted);
	appendStringInfo(&q, "a.%s::pg_catalog.int4, b.%s::pg_catalog.int4, a.%s%s, b.%s%s, "
					 "a.%s::pg_catalog.float8, b.%s::pg_catalog.float8) FROM %s a JOIN %s b ON ",
					 t->quoted, t->quoted, f->quoted, fcast, f->quoted, fcast, b->quoted, b->quoted, src, src);
	if (raw_key)
		appendStringInfo(&q, "a.%s OPERATOR(pg_catalog.=) b.%s", k->quoted, k->quoted);
	else
		appendStringInfo(&q, "a.%s::pg_catalog.text OPERATOR(pg_catalog.=) b.%s::pg_catalog.text", k->quoted, k->quoted);
	appendStringInfo(&q, " WHERE a.%s OPERATOR(pg_catalog.<) b.%s", t->quoted, t->quoted);
	for (int side = 0; side < 2; side++)
	{
		const char *s = side == 0 ? "a" : "b";

		appendStringInfo(&q, " AND %s.%s IS NOT NULL AND %s.%s IS NOT NULL", s, f->quoted, s, b->quoted);
		if (wc)
			appendStringInfo(&q, " AND %s.%s OPERATOR(pg_catalog.=) CAST($2 AS %s)", s, wc->quoted, wtype);
	}
	return q.data;
}

/* The argument columns and the source of a call, checked. */
typedef struct SoSource
{
	Oid			relid;
	char	   *src;			/* schema-qualified, quoted */
	char	   *relname;		/* for messages */
	SoColumn	k,
				t,
				f,
				b,
				w;
	bool		has_where;
	char	   *wtype;			/* qualified type name of the where column */
	char	   *check_query;
	char	   *pass_query;
	char	   *band_query;
} SoSource;

/* Check the source and the columns (existence, types, the caller's SELECT privilege), build the queries. */
static void
so_source(FunctionCallInfo fcinfo, SoSource *s)
{
	HeapTuple	tup;
	char		relkind;
	SoColumn   *cols[5];
	int			ncols;
	const char *filter;
	StringInfoData fb;
	const char *keytext,
			   *fcast;
	char	   *tier,
			   *feat,
			   *base;

	memset(s, 0, sizeof(*s));
	if (PG_NARGS() < 8)
		elog(ERROR, "rbr_fit_table: called with %d arguments, not 8", PG_NARGS());
	if (PG_ARGISNULL(0))
		ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED), errmsg("source must not be NULL")));
	s->relid = PG_GETARG_OID(0);
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(s->relid));
	if (!HeapTupleIsValid(tup))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", s->relid)));
	relkind = ((Form_pg_class) GETSTRUCT(tup))->relkind;
	ReleaseSysCache(tup);
	s->relname = pstrdup(quote_qualified_identifier(get_namespace_name(get_rel_namespace(s->relid)),
													get_rel_name(s->relid)));
	s->src = s->relname;
	if (relkind != RELKIND_RELATION && relkind != RELKIND_VIEW && relkind != RELKIND_MATVIEW &&
		relkind != RELKIND_FOREIGN_TABLE && relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("%s is not a table, view or materialized view", s->relname)));

	so_column(s->relid, s->relname, PG_ARGISNULL(1) ? NULL : PG_GETARG_NAME(1), "group_column", &s->k);
	so_column(s->relid, s->relname, PG_ARGISNULL(2) ? NULL : PG_GETARG_NAME(2), "tier_column", &s->t);
	so_column(s->relid, s->relname, PG_ARGISNULL(3) ? NULL : PG_GETARG_NAME(3), "features_column", &s->f);
	so_column(s->relid, s->relname, PG_ARGISNULL(4) ? NULL : PG_GETARG_NAME(4), "base_column", &s->b);
	if (s->t.base != INT2OID && s->t.base != INT4OID && s->t.base != INT8OID)
		so_type_error(&s->t, "smallint, integer or bigint");
	if (s->f.base != FLOAT8ARRAYOID && s->f.base != FLOAT4ARRAYOID && s->f.base != NUMERICARRAYOID)
		so_type_error(&s->f, "float8[] (or real[], numeric[])");
	if (s->b.base != FLOAT8OID && s->b.base != FLOAT4OID && s->b.base != NUMERICOID &&
		s->b.base != INT2OID && s->b.base != INT4OID && s->b.base != INT8OID)
		so_type_error(&s->b, "a number (float8, real, numeric or an integer)");

	cols[0] = &s->k;
	cols[1] = &s->t;
	cols[2] = &s->f;
	cols[3] = &s->b;
	ncols = 4;
	if (!PG_ARGISNULL(6))
	{
		so_column(s->relid, s->relname, PG_GETARG_NAME(6), "where_column", &s->w);
		if (PG_ARGISNULL(7))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("where_value must not be NULL when where_column is given"),
					 errhint("Pass the value the rows to fit have in %s, such as where_value => 'comply'.", s->w.name)));
		s->has_where = true;
		s->wtype = format_type_be_qualified(s->w.type);
		cols[ncols++] = &s->w;
	}
	else if (!PG_ARGISNULL(7))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("where_value needs where_column"),
				 errhint("Name the column to compare, such as where_column => 'response_type'.")));

	/* the caller must be able to read every column used (table or column privilege) */
	if (pg_class_aclcheck(s->relid, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		for (int i = 0; i < ncols; i++)
			if (pg_attribute_aclcheck(s->relid, cols[i]->attnum, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
				ereport(ERROR,
						(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
						 errmsg("permission denied for column %s of %s", cols[i]->name, s->relname),
						 errhint("rbr_fit_table reads the table as the calling role: grant it SELECT on the columns it fits from.")));

	initStringInfo(&fb);
	if (s->has_where)
		appendStringInfo(&fb, " WHERE a.%s OPERATOR(pg_catalog.=) CAST($2 AS %s)", s->w.quoted, s->wtype);
	filter = fb.data;
	keytext = s->k.base == TEXTOID ? psprintf("a.%s", s->k.quoted) : psprintf("a.%s::pg_catalog.text", s->k.quoted);
	fcast = s->f.base == FLOAT8ARRAYOID ? "" : "::pg_catalog.float8[]";
	tier = psprintf("a.%s::pg_catalog.int4", s->t.quoted);
	feat = psprintf("a.%s%s", s->f.quoted, fcast);
	base = psprintf("a.%s::pg_catalog.float8", s->b.quoted);
	s->check_query = so_check_query(s->src, keytext, tier, feat, base, s->k.quoted, filter);
	s->band_query = so_pass_query("rbr.fit_band", s->src, &s->k, &s->t, &s->f, &s->b, s->has_where ? &s->w : NULL, s->wtype);
	s->pass_query = so_pass_query("rbr.fit_pairs", s->src, &s->k, &s->t, &s->f, &s->b, s->has_where ? &s->w : NULL, s->wtype);
}

/* Run one query of the driver with its two parameters; returns its single row. */
static HeapTuple
so_run(const char *query, Datum params, Datum where_value, bool has_where, TupleDesc *td)
{
	Oid			types[2] = {FLOAT8ARRAYOID, TEXTOID};
	Datum		values[2] = {params, where_value};
	char		nulls[2] = {' ', has_where ? ' ' : 'n'};
	int			ret;

	ret = SPI_execute_with_args(query, 2, types, values, nulls, true, 0);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "rbr_fit_table: pass query failed: %s", SPI_result_code_string(ret));
	*td = SPI_tuptable->tupdesc;
	return SPI_tuptable->vals[0];
}

/* A float8 column of a result row (NaN for NULL). */
static double
so_get_double(HeapTuple tup, TupleDesc td, int col)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, td, col, &isnull);
	Oid			type = SPI_gettypeid(td, col);

	if (isnull)
		return NAN;
	if (type == INT8OID)
		return (double) DatumGetInt64(d);
	return DatumGetFloat8(d);
}

/* Cholesky factorisation in place (lower triangle of the n x n matrix a); false if not positive definite. */
static bool
so_cholesky(double *a, int n)
{
	for (int j = 0; j < n; j++)
	{
		double		s = a[j * n + j];

		CHECK_FOR_INTERRUPTS();

		for (int k = 0; k < j; k++)
			s -= a[j * n + k] * a[j * n + k];
		if (!(s > 0) || isinf(s))
			return false;
		s = sqrt(s);
		a[j * n + j] = s;
		for (int i = j + 1; i < n; i++)
		{
			double		t = a[i * n + j];

			for (int k = 0; k < j; k++)
				t -= a[i * n + k] * a[j * n + k];
			a[i * n + j] = t / s;
		}
	}
	return true;
}

/* Solve L L^T x = b with the factor of so_cholesky (b is overwritten by x). */
static void
so_cholesky_solve(const double *l, int n, double *b)
{
	for (int i = 0; i < n; i++)
	{
		double		s = b[i];

		for (int k = 0; k < i; k++)
			s -= l[i * n + k] * b[k];
		b[i] = s / l[i * n + i];
	}
	for (int i = n - 1; i >= 0; i--)
	{
		double		s = b[i];

		for (int k = i + 1; k < n; k++)
			s -= l[k * n + i] * b[k];
		b[i] = s / l[i * n + i];
	}
}

/*
 * The best dual point found so far: a convex combination of the multipliers
 * of every point evaluated (each is dual-feasible, so is any mixture), kept as
 * its sums abar = (1/P) sum alpha c and vbar = (1/P) sum alpha z.  Each new
 * point's multipliers are mixed in by Frank-Wolfe steps with exact line
 * search on the concave dual D = abar - |vbar_free|^2 / (2 l2).
 */
typedef struct SoDual
{
	int			d;
	int			natoms,
				cap;
	double	   *a;				/* natoms */
	double	   *v;				/* natoms * d */
	double		abar;
	double	   *vbar;			/* d */
	bool		have;
	int64		pushed;
} SoDual;

/* D at (abar, vbar) over the free features. */
static double
so_dual_value(double abar, const double *vbar, const int *freej, int nf, double lambda)
{
	double		vv = 0;

	for (int i = 0; i < nf; i++)
		vv += vbar[freej[i]] * vbar[freej[i]];
	return abar - vv / (2 * lambda);
}

/* Add one point's multipliers (the sums of a pass at that point) as an atom. */
static void
so_dual_push(SoDual *du, const double *sums)
{
	double		P = sums[ST_TRAIN_PAIRS];
	int			d = du->d;
	int			slot;

	if (du->natoms < du->cap)
		slot = du->natoms++;
	else
		slot = (int) (du->pushed % du->cap);	/* overwrite the oldest atom */
	du->pushed++;
	du->a[slot] = sums[ST_ALPHA_C] / P;
	for (int j = 0; j < d; j++)
		du->v[slot * d + j] = sums[ST_HDR + j] / P;
	if (!du->have)
	{
		du->abar = du->a[slot];
		memcpy(du->vbar, du->v + slot * d, sizeof(double) * d);
		du->have = true;
	}
}

/* Improve the mixture by Frank-Wolfe sweeps over the atoms; returns D. */
static double
so_dual_improve(SoDual *du, const int *freej, int nf, double lambda)
{
	int			d = du->d;

	for (int sweep = 0; sweep < 200; sweep++)
	{
		bool		moved = false;

		CHECK_FOR_INTERRUPTS();

		for (int k = 0; k < du->natoms; k++)
		{
			/* D((1-g) bar + g atom_k) = A + g B - (C + 2 g E + g^2 F) / (2 l2), g in [0, 1] */
			const double *vk = du->v + k * d;
			double		B = du->a[k] - du->abar,
						E = 0,
						F = 0,
						g;

			for (int i = 0; i < nf; i++)
			{
				int			j = freej[i];
				double		dv = vk[j] - du->vbar[j];

				E += du->vbar[j] * dv;
				F += dv * dv;
			}
			if (F <= 0)
				g = B > 0 ? 1 : 0;
			else
				g = (lambda * B - E) / F;
			if (!(g > 0))
				continue;
			g = Min(g, 1.0);
			if (g < 1e-16)
				continue;
			du->abar += g * B;
			for (int j = 0; j < d; j++)
				du->vbar[j] += g * (vk[j] - du->vbar[j]);
			moved = true;
		}
		if (!moved)
			break;
	}
	return so_dual_value(du->abar, du->vbar, freej, nf, lambda);
}

/* What one pass says about a point, in the driver's terms. */
typedef struct SoPoint
{
	double	   *w;				/* d */
	double		mu;
	double	   *sums;			/* the pass's sums, state_len(d) */
	double		loss_used;		/* L with l2_used */
	double		barrier;		/* F_mu */
	double		gap;
	double	   *grad;			/* nf, of F_mu */
} SoPoint;

/* Evaluate the sums of a pass at w: losses, barrier value, gradient on the free features, gap. */
static void
so_point(SoPoint *p, int d, const int *freej, int nf, double lambda)
{
	double		P = p->sums[ST_TRAIN_PAIRS];
	const double *v = p->sums + ST_HDR;
	double		ww = 0,
				gg = 0;

	for (int j = 0; j < d; j++)
		ww += p->w[j] * p->w[j];
	for (int i = 0; i < nf; i++)
	{
		p->grad[i] = lambda * p->w[freej[i]] - v[freej[i]] / P;
		gg += p->grad[i] * p->grad[i];
	}
	p->loss_used = p->sums[ST_TRAIN_HINGE] / P + lambda / 2 * ww;
	p->barrier = p->sums[ST_BARRIER] / P + lambda / 2 * ww;
	p->gap = p->sums[ST_GAP_TERMS] / P + gg / (2 * lambda);
}


/*
 * The model of a working-set pass, solved in memory by a primal-dual
 * interior-point method: the pairs of the working set each with a hinge
 * (slack xi_i, multiplier alpha_i in [0, 1]), the active pairs as the linear
 * sums a_A, v_A (multiplier 1), the others left out (multiplier 0).  Every
 * such alpha is dual-feasible for the whole problem, so D(alpha) is a lower
 * bound on its optimum.  Each Newton step is a d x d system.  Returns D and
 * sets w to the model's solution.
 */
static double
so_model_solve(int nb, const double *slots, double aA, const double *vA, double P, int d,
			   const int *freej, int nf, double lambda, double tol, double *w, int *iters_out)
{
	double	   *al = palloc(sizeof(double) * Max(nb, 1));
	double	   *xi = palloc(sizeof(double) * Max(nb, 1));
	double	   *sl = palloc(sizeof(double) * Max(nb, 1));
	double	   *th = palloc(sizeof(double) * Max(nb, 1));
	double	   *rho = palloc(sizeof(double) * Max(nb, 1));
	double	   *dal = palloc(sizeof(double) * Max(nb, 1));
	double	   *zw = palloc(sizeof(double) * Max(nb, 1));
	double	   *A = palloc(sizeof(double) * Max(nf * nf, 1));
	double	   *rhs = palloc(sizeof(double) * Max(nf, 1));
	double	   *wf = palloc(sizeof(double) * Max(nf, 1));
	double	   *F1 = palloc(sizeof(double) * Max(nf, 1));
	double		D = -INFINITY;
	double		lP = lambda * P;
	int			it;

#define ZF(i, k) (slots[(int64) (i) * (d + 2) + freej[k]])
#define CI(i) (slots[(int64) (i) * (d + 2) + d])
	for (int k = 0; k < nf; k++)
		wf[k] = w[freej[k]];
	for (int i = 0; i < nb; i++)
	{
		double		r = CI(i);

		for (int k = 0; k < nf; k++)
			r -= wf[k] * ZF(i, k);
		xi[i] = Max(r, 0) + 0.1;
		sl[i] = xi[i] - r;
		al[i] = Min(0.9, Max(0.1, slots[(int64) i * (d + 2) + d + 1]));
	}
	for (it = 0; it < 200; it++)
	{
		double		mu = 0,
					M,
					ww = 0,
					wvA = 0,
					hsum = 0,
					acsum = 0,
					step = 1,
					sigma;
		double	   *wa = rhs;	/* scratch: w(alpha) */

		CHECK_FOR_INTERRUPTS();
		/* the certificate of this iterate: M(w) against D(alpha) */
		for (int k = 0; k < nf; k++)
		{
			double		v = vA[freej[k]];

			for (int i = 0; i < nb; i++)
				v += al[i] * ZF(i, k);
			wa[k] = v / lP;
			ww += wa[k] * wa[k];
		}
		for (int i = 0; i < nb; i++)
			acsum += al[i] * CI(i);
		D = (aA + acsum) / P - lambda / 2 * ww;
		ww = 0;
		for (int k = 0; k < nf; k++)
		{
			ww += wf[k] * wf[k];
			wvA += wf[k] * vA[freej[k]];
		}
		for (int i = 0; i < nb; i++)
		{
			double		u = CI(i);

			for (int k = 0; k < nf; k++)
				u -= wf[k] * ZF(i, k);
			zw[i] = CI(i) - u;	/* z.w */
			hsum += u > 0 ? u : 0;
		}
		M = (aA - wvA + hsum) / P + lambda / 2 * ww;
		if (M - D <= 0.01 * tol * Max(M, 1e-6))
			break;

		/* residuals and the central path target */
		for (int i = 0; i < nb; i++)
			mu += sl[i] * al[i] + xi[i] * (1 - al[i]);
		mu /= 2 * Max(nb, 1);
		sigma = it < 3 ? 0.3 : 0.1;
		for (int k = 0; k < nf; k++)
		{
			F1[k] = lP * wf[k] - vA[freej[k]];
			for (int i = 0; i < nb; i++)
				F1[k] -= al[i] * ZF(i, k);
		}
		memset(A, 0, sizeof(double) * nf * nf);
		for (int k = 0; k < nf; k++)
		{
			A[k * nf + k] = lP;
			rhs[k] = -F1[k];
		}
		for (int i = 0; i < nb; i++)
		{
			double		F2 = xi[i] + zw[i] - CI(i) - sl[i];
			double		F3 = sl[i] * al[i] - sigma * mu;
			double		F4 = xi[i] * (1 - al[i]) - sigma * mu;

			if ((i & 255) == 255)
				CHECK_FOR_INTERRUPTS();
			th[i] = 1 / (xi[i] / (1 - al[i]) + sl[i] / al[i]);
			rho[i] = -F2 + F4 / (1 - al[i]) - F3 / al[i];
			for (int k = 0; k < nf; k++)
			{
				double		tz = th[i] * ZF(i, k);

				rhs[k] += tz * rho[i];
				for (int l = k; l < nf; l++)
					A[k * nf + l] += tz * ZF(i, l);
			}
		}
		for (int k = 0; k < nf; k++)
			for (int l = 0; l < k; l++)
				A[k * nf + l] = A[l * nf + k];
		if (!so_cholesky(A, nf))
			break;
		so_cholesky_solve(A, nf, rhs);	/* rhs = dw */
		/* the per-pair steps, and the longest step that keeps the iterate interior */
		for (int i = 0; i < nb; i++)
		{
			double		F3 = sl[i] * al[i] - sigma * mu;
			double		F4 = xi[i] * (1 - al[i]) - sigma * mu;
			double		zdw = 0,
						ds,
						dx;

			for (int k = 0; k < nf; k++)
				zdw += ZF(i, k) * rhs[k];
			dal[i] = th[i] * (rho[i] - zdw);
			ds = (-F3 - sl[i] * dal[i]) / al[i];
			dx = (-F4 + xi[i] * dal[i]) / (1 - al[i]);
			if (dal[i] < 0)
				step = Min(step, -0.99 * al[i] / dal[i]);
			if (dal[i] > 0)
				step = Min(step, 0.99 * (1 - al[i]) / dal[i]);
			if (ds < 0)
				step = Min(step, -0.99 * sl[i] / ds);
			if (dx < 0)
				step = Min(step, -0.99 * xi[i] / dx);
			zw[i] = ds;			/* keep ds */
			th[i] = dx;			/* keep dxi */
		}
		for (int i = 0; i < nb; i++)
		{
			al[i] = Min(Max(al[i] + step * dal[i], 1e-300), 1 - 1e-16);
			sl[i] = Max(sl[i] + step * zw[i], 1e-300);
			xi[i] = Max(xi[i] + step * th[i], 1e-300);
		}
		for (int k = 0; k < nf; k++)
			wf[k] += step * rhs[k];
	}
#undef ZF
#undef CI
	for (int k = 0; k < nf; k++)
		if (isnan(wf[k]) || isinf(wf[k]))
			D = NAN;
	if (isnan(D) || isinf(D))
		D = -INFINITY;			/* broke down: no bound, w unchanged */
	else
	{
		memset(w, 0, sizeof(double) * d);
		for (int k = 0; k < nf; k++)
			w[freej[k]] = wf[k];
	}
	*iters_out = it;
	pfree(al);
	pfree(xi);
	pfree(sl);
	pfree(th);
	pfree(rho);
	pfree(dal);
	pfree(zw);
	pfree(A);
	pfree(rhs);
	pfree(wf);
	pfree(F1);
	return D;
}

PG_FUNCTION_INFO_V1(rbr_fit_table_pass_query);
/* rbr.fit_table_pass_query(..., pass): the text of one pass's query ($1 the parameters, $2 where_value), for EXPLAIN. */
Datum
rbr_fit_table_pass_query(PG_FUNCTION_ARGS)
{
	SoSource	s;

	const char *pass = PG_NARGS() <= 8 || PG_ARGISNULL(8) ? "barrier" : text_to_cstring(PG_GETARG_TEXT_PP(8));

	so_source(fcinfo, &s);
	if (strcmp(pass, "barrier") == 0)
		PG_RETURN_TEXT_P(cstring_to_text(s.pass_query));
	if (strcmp(pass, "working_set") == 0)
		PG_RETURN_TEXT_P(cstring_to_text(s.band_query));
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown pass \"%s\"", pass),
			 errhint("Pass 'barrier' or 'working_set'.")));
	PG_RETURN_NULL();
}

PG_FUNCTION_INFO_V1(rbr_fit_table);
/*
 * rbr_fit_table(source, group_column, tier_column, features_column,
 * base_column, options, where_column, where_value): fit by passes over the
 * table; the report of rbr_fit.
 */
Datum
rbr_fit_table(PG_FUNCTION_ARGS)
{
	SoSource	s;
	SoOptions	o;
	Jsonb	   *opts = PG_ARGISNULL(5) ? NULL : PG_GETARG_JSONB_P(5);
	Datum		where_value = PG_ARGISNULL(7) ? (Datum) 0 : PG_GETARG_DATUM(7);
	MemoryContext work,
				old;
	HeapTuple	tup;
	TupleDesc	td;
	double		groups,
				groups_single,
				rows,
				skipped,
				dmin,
				dmax;
	int			d,
				nf,
				npar,
				slen,
				passes = 0,
				newton = 0;
	int		   *freej;
	double	   *par,
			   *hess,
			   *step,
			   *wbase,
			   *sv0,
				lambda,
				mu,
				ttop = 1,
				bestbarrier = 0,
				c_mu = 1;
	SoPoint		cur,
				best;
	SoDual		dual;
	double		dual_value = -INFINITY;
	bool		converged = false;
	ArrayType  *pararr;
	StringInfoData buf;
	Datum		result;

	work = AllocSetContextCreate(CurrentMemoryContext, "rbr_fit_table", ALLOCSET_DEFAULT_SIZES);
	old = MemoryContextSwitchTo(work);
	so_source(fcinfo, &s);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "rbr_fit_table: SPI_connect failed");
	MemoryContextSwitchTo(work);

	/* pass 0: count and check the rows */
	tup = so_run(s.check_query, PointerGetDatum(construct_empty_array(FLOAT8OID)), where_value, s.has_where, &td);
	passes++;
	groups = so_get_double(tup, td, 1);
	groups_single = so_get_double(tup, td, 2);
	rows = so_get_double(tup, td, 3);
	skipped = so_get_double(tup, td, 4);
	dmin = so_get_double(tup, td, 5);
	dmax = so_get_double(tup, td, 6);
	SPI_freetuptable(SPI_tuptable);
	if (isnan(rows) || rows + (isnan(skipped) ? 0 : skipped) == 0)
	{
		/* no rows at all: NULL, as the aggregate */
		SPI_finish();
		MemoryContextSwitchTo(old);
		MemoryContextDelete(work);
		PG_RETURN_NULL();
	}
	if (rows == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("rbr_fit_table has no complete rows"),
				 errdetail("All %.0f rows had a NULL group key, tier, base reward or feature.", skipped),
				 errhint("Grade the missing features first, or filter the rows.")));
	if (dmin != dmax)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("feature arrays differ in length"),
				 errhint("Fit one response type at a time (where_column => 'response_type'): each has its own feature list.")));
	d = (int) dmax;
	if (d > SO_MAX_D)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%d features are more than rbr_fit_table fits (%d)", d, SO_MAX_D)));
	so_parse_options(opts, d, &o);
	lambda = o.l2 > 0 ? o.l2 : o.l2_tiebreak;

	freej = palloc(sizeof(int) * Max(d, 1));
	nf = 0;
	for (int j = 0; j < d; j++)
		if (!(o.fixed_zero && o.fixed_zero[j]))
			freej[nf++] = j;

	npar = PAR_HDR + o.ntm + SO_MAX_K + 2 * d;
	slen = state_len(d);
	par = palloc0(sizeof(double) * npar);
	par[PAR_D] = d;
	par[PAR_MARGIN] = o.margin;
	par[PAR_VF] = o.validation_fraction;
	par[PAR_SEED] = (double) o.seed;
	par[PAR_NTM] = o.ntm;
	for (int i = 0; i < o.ntm; i++)
		par[PAR_HDR + i] = o.tier_margin[i];
	hess = palloc(sizeof(double) * Max(nf * nf, 1));
	step = palloc0(sizeof(double) * Max(d, 1));
	wbase = palloc0(sizeof(double) * Max(d, 1));
	sv0 = palloc0(sizeof(double) * slen);
	memset(&cur, 0, sizeof(cur));
	cur.w = palloc0(sizeof(double) * Max(d, 1));
	cur.sums = palloc0(sizeof(double) * slen);
	cur.grad = palloc0(sizeof(double) * Max(nf, 1));
	memset(&best, 0, sizeof(best));
	best.w = palloc0(sizeof(double) * Max(d, 1));
	best.sums = palloc0(sizeof(double) * slen);
	best.grad = palloc0(sizeof(double) * Max(nf, 1));
	best.gap = INFINITY;
	best.loss_used = INFINITY;
	memset(&dual, 0, sizeof(dual));
	dual.d = d;
	dual.cap = 512;
	dual.a = palloc(sizeof(double) * dual.cap);
	dual.v = palloc(sizeof(double) * dual.cap * Max(d, 1));
	dual.vbar = palloc0(sizeof(double) * Max(d, 1));

	/* the starting barrier parameter: a tenth of the largest margin */
	mu = o.margin;
	for (int i = 0; i < o.ntm; i++)
		if (!isnan(o.tier_margin[i]))
			mu = Max(mu, o.tier_margin[i]);
	mu = 0.1 * Max(mu, 0.01);

	for (int iter = 0; iter < o.max_iter; iter++)
	{
		ArrayType  *sa;
		bool		isnull;
		int			ns,
					K,
					kbest = 0;
		double	   *sv,
				   *ts;
		double		fval[SO_MAX_K],
					gval[SO_MAX_K];
		double		target,
					dirderiv;
		Datum	   *elems;

		CHECK_FOR_INTERRUPTS();

		/* the points of this pass: wbase + t step, t = ttop, ttop/2, ... (one point at the start) */
		K = iter == 0 ? 1 : SO_MAX_K;
		par[PAR_MU] = mu;
		par[PAR_K] = K;
		ts = par + PAR_HDR + o.ntm;
		for (int k = 0; k < K; k++)
			ts[k] = iter == 0 ? 0 : ttop * ldexp(1.0, -k);
		memcpy(ts + K, wbase, sizeof(double) * d);
		memcpy(ts + K + d, step, sizeof(double) * d);
		npar = PAR_HDR + o.ntm + K + 2 * d;
		elems = palloc(sizeof(Datum) * npar);
		for (int i = 0; i < npar; i++)
			elems[i] = Float8GetDatum(par[i]);
		pararr = construct_array(elems, npar, FLOAT8OID, sizeof(float8), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
		pfree(elems);

		tup = so_run(s.pass_query, PointerGetDatum(pararr), where_value, s.has_where, &td);
		passes++;
		(void) SPI_getbinval(tup, td, 1, &isnull);
		sv = NULL;
		if (!isnull)
		{
			sa = DatumGetArrayTypeP(SPI_getbinval(tup, td, 1, &isnull));
			sv = float8_items(sa, &ns, "the sums of a pass");
			if (ns != K * slen)
				elog(ERROR, "rbr_fit_table: a pass returned %d sums, not %d", ns, K * slen);
		}
		if (sv == NULL || sv[ST_TRAIN_PAIRS] == 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_EXCEPTION),
					 errmsg("rbr_fit_table found no pairs to train on"),
					 errdetail("%.0f rows in %.0f groups, %.0f groups with a single tier, %.0f validation pairs.",
							   rows, groups, groups_single, sv ? sv[ST_VAL_PAIRS] : 0),
					 errhint("Pairs are formed within a group (prompt) between different tiers; give each prompt completions of at least two tiers, or lower validation_fraction.")));

		/* the point of least barrier value; the point of least certified gap */
		for (int k = 0; k < K; k++)
		{
			memcpy(cur.sums, sv + k * slen, sizeof(double) * slen);
			for (int j = 0; j < d; j++)
				cur.w[j] = wbase[j] + ts[k] * step[j];
			cur.mu = mu;
			so_point(&cur, d, freej, nf, lambda);
			so_dual_push(&dual, cur.sums);
			if (cur.loss_used < best.loss_used)
			{
				memcpy(best.w, cur.w, sizeof(double) * d);
				memcpy(best.sums, cur.sums, sizeof(double) * slen);
				best.gap = cur.gap;
				best.loss_used = cur.loss_used;
				best.mu = mu;
			}
			fval[k] = cur.barrier;
			gval[k] = cur.gap;
		}
		/* least barrier value; among values equal up to rounding, least gap */
		bestbarrier = fval[0];
		for (int k = 1; k < K; k++)
			bestbarrier = Min(bestbarrier, fval[k]);
		kbest = -1;
		for (int k = 0; k < K; k++)
			if (fval[k] <= bestbarrier + 1e-13 * fabs(bestbarrier) &&
				(kbest < 0 || gval[k] < gval[kbest]))
				kbest = k;
		/* the certificate: the best point against the best dual mixture */
		dual_value = so_dual_improve(&dual, freej, nf, lambda);
		best.gap = Min(best.gap, best.loss_used - dual_value);
		memcpy(cur.sums, sv + kbest * slen, sizeof(double) * slen);
		memcpy(sv0, sv, sizeof(double) * slen);
		SPI_freetuptable(SPI_tuptable);
		for (int j = 0; j < d; j++)
			cur.w[j] = wbase[j] + ts[kbest] * step[j];
		so_point(&cur, d, freej, nf, lambda);
		elog(DEBUG1, "rbr_fit_table pass %d: mu %g t %g barrier %.17g loss %.17g gap %g (barrier part %g), best gap %g",
			 passes, mu, ts[kbest], cur.barrier, cur.loss_used, cur.gap,
			 cur.sums[ST_GAP_TERMS] / cur.sums[ST_TRAIN_PAIRS], best.gap);
		if (nf == 0 || best.gap <= o.tol * Max(best.loss_used, 1e-6))
		{
			converged = true;
			break;
		}
		/* close enough for a working set: the pairs near the kink are few and known */
		if (best.gap <= 1e-3 * Max(best.loss_used, 1e-6) || iter + 1 >= SO_BARRIER_PASSES)
			break;
		/* the next line search starts a little above the step that worked */
		ttop = iter == 0 ? 1 : Min(1.0, ts[kbest] * 4);

		/* the Newton step of F_mu from the chosen point */
		newton++;
		{
			const double *H = sv0 + ST_HDR + d;	/* the curvature of the first point */
			double		P = cur.sums[ST_TRAIN_PAIRS];
			double		ridge = 0;
			double	   *rhs = palloc(sizeof(double) * Max(nf, 1));

			for (;;)
			{
				for (int a = 0; a < nf; a++)
					for (int bb = a; bb < nf; bb++)
					{
						int			i = freej[a],
									j = freej[bb];
						double		hij = H[i * d - i * (i - 1) / 2 + (j - i)] / P;

						hess[bb * nf + a] = hess[a * nf + bb] = hij + (a == bb ? lambda + ridge : 0);
					}
				if (so_cholesky(hess, nf))
					break;
				ridge = ridge == 0 ? lambda : ridge * 10;
				if (ridge > 1e12)
					ereport(ERROR,
							(errcode(ERRCODE_DATA_EXCEPTION),
							 errmsg("rbr_fit_table: the Newton system is singular")));
			}
			for (int i = 0; i < nf; i++)
				rhs[i] = -cur.grad[i];
			so_cholesky_solve(hess, nf, rhs);
			dirderiv = 0;
			memset(step, 0, sizeof(double) * d);
			for (int i = 0; i < nf; i++)
			{
				dirderiv += cur.grad[i] * rhs[i];
				step[freej[i]] = rhs[i];
			}
			pfree(rhs);
		}
		memcpy(wbase, cur.w, sizeof(double) * d);

		/*
		 * Lower mu once the point is centred (the Newton decrement is small
		 * against the barrier's share of the gap), not below what the
		 * tolerance needs.
		 */
		c_mu = Max(cur.sums[ST_GAP_TERMS] / cur.sums[ST_TRAIN_PAIRS] / mu, 1e-3);
		target = 0.1 * o.tol * Max(cur.loss_used, 1e-6) / c_mu;
		if ((cur.gap <= 3 * cur.sums[ST_GAP_TERMS] / cur.sums[ST_TRAIN_PAIRS] ||
			 -dirderiv <= 0.5 * cur.sums[ST_GAP_TERMS] / cur.sums[ST_TRAIN_PAIRS]) && mu > target)
		{
			mu = Max(mu * 0.1, target);
			ttop = 1;
		}
	}

	/*
	 * Working-set passes: at the best point, the pairs near the kink one by
	 * one, the rest as sums; the model they make is solved in memory, its
	 * dual value is a lower bound, the next pass evaluates its solution.
	 */
	if (!converged && nf > 0)
	{
		double		lb = dual_value;
		double		tau = band_edge(BAND_NBINS - 1);
		double	   *wcur = palloc(sizeof(double) * Max(d, 1));
		int			bpar = BP_HDR + o.ntm + d;
		double	   *bp = palloc0(sizeof(double) * bpar);

		memcpy(wcur, best.w, sizeof(double) * d);
		memcpy(bp, par, sizeof(double) * PAR_HDR);
		for (int i = 0; i < o.ntm; i++)
			bp[BP_HDR + i] = o.tier_margin[i];
		while (passes < o.max_iter + 1)
		{
			ArrayType  *sa;
			bool		isnull;
			int			ns,
						nb,
						sweeps;
			double	   *sv,
						P,
						L,
						ww = 0,
						cum = 0,
						tau_next,
						D;
			Datum	   *elems;

			CHECK_FOR_INTERRUPTS();
			bp[PAR_MU] = Max(best.mu, 1e-12);
			bp[BP_TAU] = tau;
			bp[BP_CAP] = o.working_set;
			memcpy(bp + BP_HDR + o.ntm, wcur, sizeof(double) * d);
			elems = palloc(sizeof(Datum) * bpar);
			for (int i = 0; i < bpar; i++)
				elems[i] = Float8GetDatum(bp[i]);
			pararr = construct_array(elems, bpar, FLOAT8OID, sizeof(float8), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE);
			pfree(elems);
			tup = so_run(s.band_query, PointerGetDatum(pararr), where_value, s.has_where, &td);
			passes++;
			sa = DatumGetArrayTypeP(SPI_getbinval(tup, td, 1, &isnull));
			if (isnull)
				elog(ERROR, "rbr_fit_table: a working-set pass returned nothing");
			sa = (ArrayType *) PG_DETOAST_DATUM_COPY(PointerGetDatum(sa));
			SPI_freetuptable(SPI_tuptable);
			sv = float8_items(sa, &ns, "the sums of a working-set pass");
			if (ns != band_len(d, o.working_set))
				elog(ERROR, "rbr_fit_table: a working-set pass returned %d values", ns);
			P = sv[B_TRAIN_PAIRS];
			for (int j = 0; j < d; j++)
				ww += wcur[j] * wcur[j];
			L = sv[B_TRAIN_HINGE] / P + lambda / 2 * ww;
			if (L < best.loss_used)
			{
				memcpy(best.w, wcur, sizeof(double) * d);
				memset(best.sums, 0, sizeof(double) * slen);
				best.sums[ST_TRAIN_PAIRS] = P;
				best.sums[ST_TRAIN_HINGE] = sv[B_TRAIN_HINGE];
				best.sums[ST_TRAIN_RIGHT] = sv[B_TRAIN_RIGHT];
				best.sums[ST_TRAIN_ZERO] = sv[B_TRAIN_ZERO];
				best.sums[ST_VAL_PAIRS] = sv[B_VAL_PAIRS];
				best.sums[ST_VAL_HINGE] = sv[B_VAL_HINGE];
				best.sums[ST_VAL_RIGHT] = sv[B_VAL_RIGHT];
				best.loss_used = L;
				best.gap = L - lb;
			}
			/* the next tau: the widest band of at most half the working set */
			tau_next = band_edge(0);
			for (int b = 0; b < BAND_NBINS - 1; b++)
			{
				cum += sv[B_HDR + d + b];
				if (cum <= o.working_set / 2)
					tau_next = band_edge(b);
			}
			elog(DEBUG1, "rbr_fit_table working-set pass %d: tau %g loss %.17g lower bound %.17g gap %g band %.0f active %.0f overflow %.0f",
				 passes, tau, L, lb, best.gap, sv[B_NBAND], sv[B_NA], sv[B_OVERFLOW]);
			if (best.gap <= o.tol * Max(best.loss_used, 1e-6))
			{
				converged = true;
				break;
			}
			if (passes >= o.max_iter + 1)
				break;
			if (sv[B_OVERFLOW] > 0)
			{
				/* the band was wider than the working set: again, narrower */
				tau = Min(tau_next, tau / 10);
				continue;
			}
			if (L > best.loss_used + 1e-12 * fabs(best.loss_used))
			{
				/* the model's step went too far: half of it */
				for (int j = 0; j < d; j++)
					wcur[j] = best.w[j] + 0.5 * (wcur[j] - best.w[j]);
				tau = Max(tau_next, band_edge(0));
				pfree(sa);
				continue;
			}
			nb = (int) sv[B_NBAND];
			D = so_model_solve(nb, sv + B_HDR + d + BAND_NBINS, sv[B_AC], sv + B_HDR, P, d,
							   freej, nf, lambda, o.tol, wcur, &sweeps);
			newton++;
			lb = Max(lb, D);
			best.gap = Min(best.gap, best.loss_used - lb);
			elog(DEBUG1, "rbr_fit_table model: %d pairs, %d interior-point iterations, dual %.17g, gap now %g", nb, sweeps, D, best.gap);
			if (best.gap <= o.tol * Max(best.loss_used, 1e-6))
			{
				converged = true;
				break;
			}
			tau = Max(tau_next, band_edge(0));
			pfree(sa);
		}
		best.gap = Max(best.gap, 0);
	}
	SPI_finish();

	/* the report, at the best certified point */
	{
		double		P = best.sums[ST_TRAIN_PAIRS];
		double		V = best.sums[ST_VAL_PAIRS];
		double		ww = 0;

		for (int j = 0; j < d; j++)
			ww += best.w[j] * best.w[j];
		initStringInfo(&buf);
		rbr_fit_json_weights(&buf, best.w, d, o.names, o.nnames);
		appendStringInfo(&buf, ", \"rows\": %.0f, \"rows_skipped_null\": %.0f, \"groups\": %.0f, \"groups_without_pairs\": %.0f",
						 rows, skipped, groups, groups_single);
		appendStringInfo(&buf, ", \"pairs\": {\"train\": %.0f, \"validation\": %.0f}", P, V);
		appendStringInfoString(&buf, ", \"loss\": {\"train\": ");
		rbr_fit_json_number(&buf, best.sums[ST_TRAIN_HINGE] / P);
		appendStringInfoString(&buf, ", \"validation\": ");
		rbr_fit_json_number(&buf, V > 0 ? best.sums[ST_VAL_HINGE] / V : NAN);
		appendStringInfoString(&buf, "}, \"objective\": ");
		rbr_fit_json_number(&buf, best.sums[ST_TRAIN_HINGE] / P + o.l2 / 2 * ww);
		appendStringInfoString(&buf, ", \"zero_loss_share\": ");
		rbr_fit_json_number(&buf, best.sums[ST_TRAIN_ZERO] / P);
		appendStringInfoString(&buf, ", \"accuracy\": {\"train\": ");
		rbr_fit_json_number(&buf, best.sums[ST_TRAIN_RIGHT] / P);
		appendStringInfoString(&buf, ", \"validation\": ");
		rbr_fit_json_number(&buf, V > 0 ? best.sums[ST_VAL_RIGHT] / V : NAN);
		appendStringInfo(&buf, "}, \"solver\": \"barrier\", \"iterations\": %d, \"converged\": %s, \"gap\": ",
						 newton, converged ? "true" : "false");
		rbr_fit_json_number(&buf, best.gap);
		appendStringInfo(&buf, ", \"passes\": %d, \"mu\": ", passes);
		rbr_fit_json_number(&buf, best.mu);
		appendStringInfoString(&buf, ", \"options\": {\"margin\": ");
		rbr_fit_json_number(&buf, o.margin);
		appendStringInfoString(&buf, ", \"tier_margin\": {");
		for (int i = 0, k = 0; i < o.ntm; i++)
			if (!isnan(o.tier_margin[i]))
			{
				appendStringInfo(&buf, "%s\"%d\": ", k++ ? ", " : "", i);
				rbr_fit_json_number(&buf, o.tier_margin[i]);
			}
		appendStringInfoString(&buf, "}, \"l2\": ");
		rbr_fit_json_number(&buf, o.l2);
		appendStringInfoString(&buf, ", \"l2_used\": ");
		rbr_fit_json_number(&buf, lambda);
		appendStringInfoString(&buf, ", \"fixed_zero\": [");
		for (int i = 0, k = 0; o.fixed_zero && i < d; i++)
			if (o.fixed_zero[i])
				appendStringInfo(&buf, "%s%d", k++ ? ", " : "", i + 1);
		appendStringInfoString(&buf, "], \"validation_fraction\": ");
		rbr_fit_json_number(&buf, o.validation_fraction);
		appendStringInfo(&buf, ", \"validation_split\": \"groups\", \"seed\": %llu, \"tol\": ",
						 (unsigned long long) o.seed);
		rbr_fit_json_number(&buf, o.tol);
		appendStringInfo(&buf, ", \"max_iter\": %d, \"working_set\": %d}}", o.max_iter, o.working_set);
	}
	MemoryContextSwitchTo(old);
	result = DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data));
	MemoryContextDelete(work);
	PG_RETURN_DATUM(result);
}
