/*
 * fit_solver.c - exact (certified) and AdamW fitting of the RBR weights; see fit_solver.h.
 *
 * Notation.  For a pair p = (a better, b worse) and the free weights w (fixed_zero features removed):
 *   z_p = x_a - x_b,  b_p = m_p - (r_a - r_b),  t_p(w) = b_p - z_p.w = m_p - (s_a - s_b),  h(t) = max(0, t),
 *   F(w) = sum_p h(t_p(w)) + (rho/2)|w|^2,  rho = P * l2_used   (P times the objective).
 *
 * EXACT solver.
 *   Pass.  One pass over the pairs at a point w computes the row scores (O(rows * d), reading x once),
 *   then per pair t = m_a - s_a + s_b (a few flops): F(w), G = sum_{t > 0} z (per-row integer counts
 *   times x, formed per group while its rows are in cache), the "band" (pairs with |t| below a width
 *   chosen so that about `working_set` of them are kept), and the pairs whose sign changed relative to
 *   the previous centre.
 *   Model.  Around a centre w_c:  M(w) = -g.w + sum_{k in K} h(t_k(w)) + (rho/2)|w|^2 [+ (1/2) dw^T C dw],
 *   g = G minus the z of the K pairs with t > 0 (the pairs outside K are taken as linear where t > 0
 *   and as zero elsewhere), K = the band (+ pairs kept exactly).  It is minimised inside a box trust
 *   region by a dense primal-dual interior-point method (Mehrotra predictor-corrector; the Newton
 *   system is reduced to the d x d Schur complement in w and solved by Cholesky with a diagonal-shift
 *   fallback).  First an approach phase adds the curvature term C = sum_band z z^T / (2 delta), a
 *   kernel estimate of how the kinks of all the other pairs bend F (Newton-like steps from far away);
 *   then an exact phase drops it and keeps every pair a model got wrong: that model is a lower bound
 *   of F, equal to F wherever no pair outside K changes sign.  Details at solve_level.
 *   Certificate.  For any alpha in [0,1]^P, F(w) - min F <= F(w) - D(alpha) with D the Lagrange dual;
 *   with alpha_p = [t_p > 0] outside K and the interior-point multipliers in K,
 *       F(w) - min F <= sum_{k in K} (h(t_k) - alpha_k t_k) + |rho w - sum_p alpha_p z_p|^2 / (2 rho),
 *   a sum of non-negative terms (the KKT conditions checked on every pair), computed in the pass.
 *   The solver stops when it is below tol * max(objective, RBR_OBJ_FLOOR) (objective per pair).
 *   Warm start.  The same method on nested hashed sub-samples of the groups (1/64, 1/4096, ...); the
 *   smallest is solved with every pair in K.  A level needs about 5-7 passes; the sub-levels cost a
 *   fraction of a full pass.
 *   Everything runs in a fixed order: the result depends only on the input and the options.
 *
 * ADAMW: full-batch AdamW on the mean hinge (the released fitter); one pass per step.
 */
#include "fit_solver.h"

#include <math.h>
#include <string.h>

#define RBR_CHECK_EVERY 65536  /* pair evaluations (or equivalent work) between interrupt checks */
#define RBR_MAX_D 1024         /* the model algebra is dense in d: keep d small */
#define RBR_MIN_WS 256         /* automatic working set (pairs in the band of the approach phase): */
#define RBR_MAX_WS 4096        /* sqrt(training pairs) within [RBR_MIN_WS, RBR_MAX_WS] */
#define RBR_EXACT_WS_FACTOR 4  /* the exact phase's band may hold this many times the working set */
#define RBR_LEVEL_FACTOR 64    /* group sub-sampling factor between warm-start levels */
#define RBR_MAX_LEVELS 8
#define RBR_SUBLEVEL_TOL 1e-3  /* relative gap that is enough for a warm start */
#define RBR_SUBLEVEL_MAXIT 30
#define RBR_QSWITCH 4.0        /* approach phase ends when the step moves t by < QSWITCH band widths */
#define RBR_IPM_MAXIT 120      /* interior-point iterations per model solve */
#define RBR_OBJ_FLOOR 1e-6     /* relative gaps are taken against max(objective, this) */
#define RBR_NO_NUM INT64_MIN

/* ------------------------------------------------------------------ two doubles at a time */

/*
 * Two doubles at a time for the element-wise updates of the model solves (GCC and Clang
 * vector extensions; SSE2 on x86-64, scalar code where the target has no vectors).  Each element gets
 * exactly the operations of the scalar loop, in the same order, so the results are the same bit for bit.
 */
typedef double v2d __attribute__((vector_size(16)));

/* Load two doubles from any address. */
static inline v2d ld2(const double *p)
{
    v2d v;

    memcpy(&v, p, sizeof(v));
    return v;
}

/* Store two doubles at any address. */
static inline void st2(double *p, v2d v)
{
    memcpy(p, &v, sizeof(v));
}

/* y[j] += t * z[j] for j < n. */
static inline void axpyn(double *y, double t, const double *z, int n)
{
    const v2d tv = {t, t};
    int j = 0;

    for (; j + 2 <= n; j += 2)
        st2(y + j, ld2(y + j) + tv * ld2(z + j));
    for (; j < n; j++)
        y[j] += t * z[j];
}

/* ------------------------------------------------------------------ context, memory, errors */

typedef struct Ctx
{
    const RbrFitAlloc *al;
    void **reg; /* every live block obtained from al->alloc */
    size_t nreg, capreg;
    int64_t tick;  /* work since the last interrupt check */
    int64_t evals; /* pair evaluations */
    char *errbuf;
    size_t errlen;
    const int64_t *xrow; /* rbr_fit_solve_rows: storage row of each row's features, or NULL */
} Ctx;

/* Count work and call check_interrupts when enough has accumulated. */
static inline void ctx_work(Ctx *c, int64_t units)
{
    c->tick += units;
    if (c->tick >= RBR_CHECK_EVERY)
    {
        c->tick = 0;
        if (c->al->check_interrupts)
            c->al->check_interrupts(c->al->ctx);
    }
}

/* Allocate nmemb * size bytes (overflow-checked) through the caller and register the block. */
static void *ctx_alloc(Ctx *c, size_t nmemb, size_t size)
{
    void *p;

    if (nmemb == 0)
        nmemb = 1;
    if (size == 0)
        size = 1;
    if (nmemb > SIZE_MAX / size)
        return NULL;
    if (c->nreg == c->capreg)
    {
        size_t ncap = c->capreg ? 2 * c->capreg : 64;
        void **nr = c->al->alloc(c->al->ctx, ncap * sizeof(void *));

        if (!nr)
            return NULL;
        if (c->nreg)
            memcpy(nr, c->reg, c->nreg * sizeof(void *));
        if (c->reg)
            c->al->free(c->al->ctx, c->reg);
        c->reg = nr;
        c->capreg = ncap;
    }
    p = c->al->alloc(c->al->ctx, nmemb * size);
    if (!p)
        return NULL;
    c->reg[c->nreg++] = p;
    return p;
}

/* Free one registered block (NULL is ignored). */
static void ctx_free(Ctx *c, void *p)
{
    size_t i;

    if (!p)
        return;
    for (i = c->nreg; i-- > 0;)
    {
        if (c->reg[i] == p)
        {
            c->reg[i] = c->reg[--c->nreg];
            c->al->free(c->al->ctx, p);
            return;
        }
    }
}

/* Free every registered block and the registry itself. */
static void ctx_free_all(Ctx *c)
{
    while (c->nreg > 0)
        c->al->free(c->al->ctx, c->reg[--c->nreg]);
    if (c->reg)
        c->al->free(c->al->ctx, c->reg);
    c->reg = NULL;
    c->capreg = 0;
}

/* Append a string to the error buffer. */
static void err_put(Ctx *c, size_t *pos, const char *s)
{
    while (*s && *pos + 1 < c->errlen)
        c->errbuf[(*pos)++] = *s++;
    c->errbuf[*pos] = '\0';
}

/* Append a decimal integer to the error buffer. */
static void err_num(Ctx *c, size_t *pos, int64_t v)
{
    char tmp[24], out[24];
    int i = 0, j = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;

    do
    {
        tmp[i++] = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[i++] = '-';
    while (i > 0)
        out[j++] = tmp[--i];
    out[j] = '\0';
    err_put(c, pos, out);
}

/* Record the message "a<v>b" (v omitted when RBR_NO_NUM) and return code. */
static int fail(Ctx *c, int code, const char *a, int64_t v, const char *b)
{
    size_t pos = 0;

    if (!c->errbuf || c->errlen == 0)
        return code;
    c->errbuf[0] = '\0';
    err_put(c, &pos, a);
    if (v != RBR_NO_NUM)
        err_num(c, &pos, v);
    err_put(c, &pos, b);
    return code;
}

/* The out-of-memory error. */
static int oom(Ctx *c)
{
    return fail(c, RBR_FIT_ENOMEM, "out of memory in the weight fitter", RBR_NO_NUM, "");
}

/* ------------------------------------------------------------------ hashing */

/* splitmix64 finaliser: a well-mixed 64-bit hash of z. */
static inline uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The AdamW pair split (see the header). */
bool rbr_fit_pair_is_val(uint64_t seed, int64_t a, int64_t b, double val_fraction)
{
    uint64_t h = mix64(mix64(mix64(seed) ^ (uint64_t)a) ^ (uint64_t)b);

    return (double)(h >> 11) * 0x1.0p-53 < val_fraction;
}

/* ------------------------------------------------------------------ public helpers */

/* Fill o with the documented defaults. */
void rbr_fit_options_default(RbrFitOptions *o)
{
    memset(o, 0, sizeof(*o));
    o->solver = RBR_SOLVER_EXACT;
    o->margin = 1.0;
    o->n_tier_margin = 0;
    o->tier_margin = NULL;
    o->l2 = 1e-6;
    o->fixed_zero = NULL;
    o->tol = 1e-9;
    o->max_iter = 100;
    o->l2_tiebreak = 1e-9;
    o->working_set = 0;
    o->lr = 0.01;
    o->steps = 1000;
    o->weight_decay = 0.05;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->val_fraction = 0.05;
    o->seed = 0;
}

/* A static description of a return code. */
const char *rbr_fit_strerror(int code)
{
    switch (code)
    {
    case RBR_FIT_OK:
        return "success";
    case RBR_FIT_EINVAL:
        return "invalid argument";
    case RBR_FIT_ENOPAIRS:
        return "no training pairs";
    case RBR_FIT_ENOMEM:
        return "out of memory";
    case RBR_FIT_ENUMERIC:
        return "numerical failure";
    default:
        return "unknown error";
    }
}

/* ------------------------------------------------------------------ validation */

/* Check the data and the options that every entry point uses. */
static int validate_common(Ctx *c, const RbrFitData *data, const RbrFitOptions *o)
{
    int64_t i, g;
    int j;

    if (!data || !o)
        return fail(c, RBR_FIT_EINVAL, "data and options must not be NULL", RBR_NO_NUM, "");
    if (data->d < 0 || data->d > RBR_MAX_D)
        return fail(c, RBR_FIT_EINVAL, "the number of features must be between 0 and ", RBR_MAX_D, "");
    if (data->nrows < 0 || data->ngroups < 0)
        return fail(c, RBR_FIT_EINVAL, "negative row or group count", RBR_NO_NUM, "");
    if (data->nrows > 0 && (!data->base || !data->tier || (data->d > 0 && !data->x)))
        return fail(c, RBR_FIT_EINVAL, "x, base and tier must not be NULL", RBR_NO_NUM, "");
    if (data->nrows > 0 && data->ngroups == 0)
        return fail(c, RBR_FIT_EINVAL, "rows given without groups", RBR_NO_NUM, "");
    if (data->ngroups > 0 || data->group_start)
    {
        if (!data->group_start)
            return fail(c, RBR_FIT_EINVAL, "group_start must not be NULL", RBR_NO_NUM, "");
        if (data->group_start[0] != 0 || data->group_start[data->ngroups] != data->nrows)
            return fail(c, RBR_FIT_EINVAL,
                        "group_start must begin at 0 and end at the number of rows", RBR_NO_NUM, "");
        for (g = 0; g < data->ngroups; g++)
            if (data->group_start[g + 1] < data->group_start[g])
                return fail(c, RBR_FIT_EINVAL, "group_start decreases at group ", g, "");
    }
    for (i = 0; i < data->nrows; i++)
    {
        /* v * 0 is 0 for a finite v and NaN otherwise: one test per row, no branch per feature */
        const double *xr = data->x + i * data->d;
        double z0 = 0, z1 = 0, z2 = 0, z3 = 0;

        if (!isfinite(data->base[i]))
            return fail(c, RBR_FIT_EINVAL, "base reward of row ", i, " is not finite");
        for (j = 0; j + 4 <= data->d; j += 4)
        {
            z0 += xr[j] * 0.0;
            z1 += xr[j + 1] * 0.0;
            z2 += xr[j + 2] * 0.0;
            z3 += xr[j + 3] * 0.0;
        }
        for (; j < data->d; j++)
            z0 += xr[j] * 0.0;
        if ((z0 + z1) + (z2 + z3) != 0.0)
            return fail(c, RBR_FIT_EINVAL, "a feature of row ", i, " is not finite");
        if ((i & 1023) == 0)
            ctx_work(c, 1024 * (data->d / 8 + 1));
    }
    if (!isfinite(o->margin) || o->margin < 0)
        return fail(c, RBR_FIT_EINVAL, "margin must be finite and non-negative", RBR_NO_NUM, "");
    if (o->n_tier_margin < 0 || (o->n_tier_margin > 0 && !o->tier_margin))
        return fail(c, RBR_FIT_EINVAL, "bad tier margin array", RBR_NO_NUM, "");
    for (j = 0; j < o->n_tier_margin; j++)
        if (!isnan(o->tier_margin[j]) && (!isfinite(o->tier_margin[j]) || o->tier_margin[j] < 0))
            return fail(c, RBR_FIT_EINVAL, "the margin of tier ", j, " must be NaN or finite and non-negative");
    if (!(o->l2 >= 0 && o->l2 <= 1e12))
        return fail(c, RBR_FIT_EINVAL, "l2 must be between 0 and 1e12", RBR_NO_NUM, "");
    return RBR_FIT_OK;
}

/* Check the solver-specific options. */
static int validate_solver(Ctx *c, const RbrFitOptions *o)
{
    if (o->solver == RBR_SOLVER_EXACT)
    {
        if (!(o->tol > 0) || !isfinite(o->tol))
            return fail(c, RBR_FIT_EINVAL, "tol must be positive", RBR_NO_NUM, "");
        if (o->max_iter < 1)
            return fail(c, RBR_FIT_EINVAL, "max_iter must be at least 1", RBR_NO_NUM, "");
        if (!(o->l2_tiebreak > 0 && o->l2_tiebreak <= 1e12))
            return fail(c, RBR_FIT_EINVAL, "l2_tiebreak must be positive (at most 1e12)", RBR_NO_NUM, "");
        if (o->working_set < 0)
            return fail(c, RBR_FIT_EINVAL, "working_set must be 0 (automatic) or positive", RBR_NO_NUM, "");
    }
    else if (o->solver == RBR_SOLVER_ADAMW)
    {
        if (!(o->lr > 0) || !isfinite(o->lr))
            return fail(c, RBR_FIT_EINVAL, "lr must be positive", RBR_NO_NUM, "");
        if (o->steps < 0)
            return fail(c, RBR_FIT_EINVAL, "steps must be non-negative", RBR_NO_NUM, "");
        if (!(o->weight_decay >= 0) || !isfinite(o->weight_decay))
            return fail(c, RBR_FIT_EINVAL, "weight_decay must be non-negative", RBR_NO_NUM, "");
        if (!(o->beta1 >= 0 && o->beta1 < 1) || !(o->beta2 >= 0 && o->beta2 < 1))
            return fail(c, RBR_FIT_EINVAL, "betas must be in [0, 1)", RBR_NO_NUM, "");
        if (!(o->eps > 0) || !isfinite(o->eps))
            return fail(c, RBR_FIT_EINVAL, "eps must be positive", RBR_NO_NUM, "");
        if (!(o->val_fraction >= 0 && o->val_fraction <= 1))
            return fail(c, RBR_FIT_EINVAL, "val_fraction must be in [0, 1]", RBR_NO_NUM, "");
    }
    else
        return fail(c, RBR_FIT_EINVAL, "unknown solver", RBR_NO_NUM, "");
    return RBR_FIT_OK;
}

/* ------------------------------------------------------------------ prepared data */

/* Rows re-ordered by tier inside each group ("positions"), with per-position copies of what the pair
 * loop needs: a pair is (pos, q) with q in [wst[pos], group end). */
typedef struct Prep
{
    const RbrFitData *data;
    int d, n;       /* all features, free features */
    int *freeidx;   /* n indices of the free features */
    int64_t N, G;
    const int64_t *gs; /* group offsets (positions of a group = its rows) */
    int64_t *perm;  /* position -> row */
    double *rb;     /* base reward at the position */
    double *mb;     /* margin when the position is the better side */
    int64_t *wst;   /* first position of the group with a larger tier */
    int64_t *gpairs; /* pairs per group */
    const int64_t *xrow; /* storage row of each row's features in data->x, NULL = the row itself */
} Prep;

/* The features (all d) of row `row`. */
static inline const double *row_x(const Prep *pr, int64_t row)
{
    return pr->data->x + (pr->xrow ? pr->xrow[row] : row) * pr->d;
}

/* A set of groups and its pair count. */
typedef struct View
{
    int64_t ng;
    int64_t *g;
    int64_t npairs;
} View;

/* Stable sort of idx[0..len) by tier (insertion sort when short, bottom-up merge sort otherwise). */
static void sort_by_tier(int64_t *idx, int64_t *tmp, int64_t len, const int32_t *tier)
{
    int64_t i, width;

    for (i = 1; i < len; i++)
        if (tier[idx[i]] < tier[idx[i - 1]])
            break;
    if (i >= len)
        return; /* already sorted */
    if (len <= 32)
    {
        for (i = 1; i < len; i++)
        {
            int64_t v = idx[i], j = i;

            while (j > 0 && tier[idx[j - 1]] > tier[v])
            {
                idx[j] = idx[j - 1];
                j--;
            }
            idx[j] = v;
        }
        return;
    }
    for (width = 1; width < len; width *= 2)
    {
        int64_t lo;

        for (lo = 0; lo < len; lo += 2 * width)
        {
            int64_t mid = lo + width < len ? lo + width : len;
            int64_t hi = lo + 2 * width < len ? lo + 2 * width : len;
            int64_t a = lo, b = mid, k = lo;

            while (a < mid && b < hi)
                tmp[k++] = tier[idx[b]] < tier[idx[a]] ? idx[b++] : idx[a++];
            while (a < mid)
                tmp[k++] = idx[a++];
            while (b < hi)
                tmp[k++] = idx[b++];
        }
        memcpy(idx, tmp, (size_t)len * sizeof(int64_t));
    }
}

/* Margin of a pair whose better side has tier t. */
static inline double pair_margin(const RbrFitOptions *o, int32_t t)
{
    if (t >= 0 && t < o->n_tier_margin && !isnan(o->tier_margin[t]))
        return o->tier_margin[t];
    return o->margin;
}

/* Build the per-position arrays; fixed_zero decides the free features unless all_free. */
static int prep_build(Ctx *c, Prep *pr, const RbrFitData *data, const RbrFitOptions *o, bool all_free)
{
    int64_t g, maxlen = 1, pos;
    int64_t *tmp;
    int j;

    memset(pr, 0, sizeof(*pr));
    pr->data = data;
    pr->d = data->d;
    pr->N = data->nrows;
    pr->G = data->ngroups;
    pr->gs = data->group_start;
    pr->xrow = c->xrow;
    if (!(pr->freeidx = ctx_alloc(c, (size_t)(data->d > 0 ? data->d : 1), sizeof(int))))
        return oom(c);
    pr->n = 0;
    for (j = 0; j < data->d; j++)
        if (all_free || !o->fixed_zero || !o->fixed_zero[j])
            pr->freeidx[pr->n++] = j;
    if (!(pr->perm = ctx_alloc(c, (size_t)pr->N, sizeof(int64_t))) ||
        !(pr->rb = ctx_alloc(c, (size_t)pr->N, sizeof(double))) ||
        !(pr->mb = ctx_alloc(c, (size_t)pr->N, sizeof(double))) ||
        !(pr->wst = ctx_alloc(c, (size_t)pr->N, sizeof(int64_t))) ||
        !(pr->gpairs = ctx_alloc(c, (size_t)pr->G, sizeof(int64_t))))
        return oom(c);
    for (g = 0; g < pr->G; g++)
        if (pr->gs[g + 1] - pr->gs[g] > maxlen)
            maxlen = pr->gs[g + 1] - pr->gs[g];
    if (!(tmp = ctx_alloc(c, (size_t)maxlen, sizeof(int64_t))))
        return oom(c);
    for (g = 0; g < pr->G; g++)
    {
        int64_t s = pr->gs[g], e = pr->gs[g + 1], np = 0;

        for (pos = s; pos < e; pos++)
            pr->perm[pos] = pos;
        sort_by_tier(pr->perm + s, tmp, e - s, data->tier);
        for (pos = e - 1; pos >= s; pos--)
        {
            int64_t row = pr->perm[pos];

            pr->rb[pos] = data->base[row];
            pr->mb[pos] = pair_margin(o, data->tier[row]);
            if (pos == e - 1)
                pr->wst[pos] = e;
            else if (data->tier[pr->perm[pos + 1]] > data->tier[row])
                pr->wst[pos] = pos + 1;
            else
                pr->wst[pos] = pr->wst[pos + 1];
            np += e - pr->wst[pos];
        }
        pr->gpairs[g] = np;
        ctx_work(c, e - s);
    }
    ctx_free(c, tmp);
    return RBR_FIT_OK;
}

/* Build the view of the groups g with want(g): train / validation / hashed sub-sample of a view. */
static int view_build(Ctx *c, const Prep *pr, View *v, const View *from, int mode, uint64_t mod)
{
    /* mode 0: train groups, 1: validation groups, 2: all groups, 3: hashed subset of `from` */
    const bool *tr = pr->data->group_is_train;
    int64_t i, cnt = 0, total = mode == 3 ? from->ng : pr->G;

    v->ng = 0;
    v->npairs = 0;
    if (!(v->g = ctx_alloc(c, (size_t)(total > 0 ? total : 1), sizeof(int64_t))))
        return oom(c);
    for (i = 0; i < total; i++)
    {
        int64_t g = mode == 3 ? from->g[i] : i;
        bool want;

        if (mode == 0)
            want = !tr || tr[g];
        else if (mode == 1)
            want = tr && !tr[g];
        else if (mode == 2)
            want = true;
        else
            want = mix64((uint64_t)g ^ 0x5242527375627370ULL) % mod == 0;
        if (want)
        {
            v->g[cnt++] = g;
            v->npairs += pr->gpairs[g];
        }
    }
    v->ng = cnt;
    return RBR_FIT_OK;
}

/* ------------------------------------------------------------------ passes over the pairs */

/* A pair found during a pass: its id in the view's enumeration, positions, residual. */
typedef struct PairRef
{
    int64_t id, pa, pb;
    double t;
} PairRef;

/* The band: every pair with z != 0 and |t| <= min(delta, range), at most cap of them.  delta starts
 * infinite (it stays so when every candidate fits), becomes the largest |t| held when the buffer first
 * overflows, and halves whenever the buffer is full. */
typedef struct Band
{
    int64_t n, cap;
    PairRef *e;
    double delta;
    double range;
} Band;

/* Pairs whose sign differs from the model's (the first cap are kept, total counts all). */
typedef struct MisBuf
{
    int64_t n, cap, total;
    PairRef *e;
} MisBuf;

/* Totals of a pass. */
typedef struct PassOut
{
    double hinge;
    int64_t npairs, ncorrect, nzero;
} PassOut;

/* The working set: pairs modelled individually, sorted by id, with z (free features), b, the model's
 * multiplier, and whether the pair stays when the centre moves (pairs the model once got wrong, and
 * every pair at the base level) or is only part of the current band. */
typedef struct KSet
{
    int64_t m, cap;
    int n;
    int64_t *id, *pa, *pb;
    double *b, *z, *alpha;
    uint8_t *keep;
} KSet;

/* Score (base + w.x) of the row at position pos. */
static inline double row_score(const Prep *pr, const double *wfull, int64_t pos)
{
    const int d = pr->d;
    const double *xr;
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int j;

    if (d == 0)
        return pr->rb[pos];
    xr = row_x(pr, pr->perm[pos]);
    /* four independent sums: the loop is bound by the latency of the additions otherwise */
    for (j = 0; j + 4 <= d; j += 4)
    {
        s0 += wfull[j] * xr[j];
        s1 += wfull[j + 1] * xr[j + 1];
        s2 += wfull[j + 2] * xr[j + 2];
        s3 += wfull[j + 3] * xr[j + 3];
    }
    for (; j < d; j++)
        s0 += wfull[j] * xr[j];
    return pr->rb[pos] + ((s0 + s1) + (s2 + s3));
}

/* Whether the two positions have equal free features (z = 0: the pair's loss does not depend on w). */
static bool pair_z_zero(const Prep *pr, int64_t pa, int64_t pb)
{
    const double *xa, *xb;
    int j;

    if (pr->n == 0)
        return true;
    xa = row_x(pr, pr->perm[pa]);
    xb = row_x(pr, pr->perm[pb]);
    for (j = 0; j < pr->n; j++)
        if (xa[pr->freeidx[j]] != xb[pr->freeidx[j]])
            return false;
    return true;
}

/* Empty the band before a pass. */
static void band_reset(Band *bd, double delta0, double range, int64_t cap)
{
    bd->n = 0;
    bd->delta = delta0;
    bd->range = range;
    bd->cap = cap;
}

/* Add a pair with |t| <= min(delta, range) to the band, halving delta while the buffer is full. */
static void band_add(const Prep *pr, Band *bd, int64_t id, int64_t pa, int64_t pb, double t)
{
    const double at = fabs(t);

    if (pair_z_zero(pr, pa, pb))
        return;
    while (bd->n >= bd->cap)
    {
        int64_t i, k = 0;

        if (bd->delta == 0.0)
            return;
        if (isinf(bd->delta))
        {
            /* first overflow: start from the widest residual held */
            bd->delta = at;
            for (i = 0; i < bd->n; i++)
                bd->delta = fmax(bd->delta, fabs(bd->e[i].t));
        }
        bd->delta *= 0.5;
        for (i = 0; i < bd->n; i++)
            if (fabs(bd->e[i].t) <= bd->delta)
                bd->e[k++] = bd->e[i];
        bd->n = k;
        if (!(at <= bd->delta))
            return;
    }
    bd->e[bd->n].id = id;
    bd->e[bd->n].pa = pa;
    bd->e[bd->n].pb = pb;
    bd->e[bd->n].t = t;
    bd->n++;
}

/* G += sum over the positions [s, e) of coef[pos] * x_free(pos), summed per group first (part). */
static void group_gradient(const Prep *pr, int64_t s, int64_t e, const double *coef, double *G, double *part)
{
    const int n = pr->n, d = pr->d;
    int64_t pos;
    int j;

    for (j = 0; j < n; j++)
        part[j] = 0;
    for (pos = s; pos < e; pos++)
    {
        const double cf = coef[pos];
        const double *xr;

        if (cf == 0)
            continue;
        xr = row_x(pr, pr->perm[pos]);
        if (n == d)
            axpyn(part, cf, xr, n);
        else
            for (j = 0; j < n; j++)
                part[j] += cf * xr[pr->freeidx[j]];
    }
    for (j = 0; j < n; j++)
        G[j] += part[j];
}

/*
 * One pass over the pairs of a view at the weights wfull: scores into S, totals into out, and
 * optionally G = sum of z over the pairs with t > 0 (formed per group from per-row counts in the
 * scratch coef, +1 better side, -1 worse side, while the group's rows are in cache; part is n
 * scratch), the band, and the pairs outside K whose sign differs from the one at the scores Sref.
 */
static void pass_run(Ctx *c, const Prep *pr, const View *v, const double *wfull, double *S, double *G,
                     double *coef, double *part, const double *Sref, const KSet *K, Band *band, MisBuf *mis,
                     PassOut *out)
{
    const int64_t km = K ? K->m : 0;
    const int64_t *kid = K ? K->id : NULL;
    const uint8_t *kkeep = K ? K->keep : NULL;
    int64_t gi, p = 0, ki = 0, ncor = 0, nzero = 0, nextk = km > 0 ? kid[0] : INT64_MAX;
    double hinge = 0;
    int j;

    if (G)
        for (j = 0; j < pr->n; j++)
            G[j] = 0;
    else
        coef = NULL;
    for (gi = 0; gi < v->ng; gi++)
    {
        const int64_t g = v->g[gi], s = pr->gs[g], e = pr->gs[g + 1];
        int64_t pos, q;
        double hg = 0;

        for (pos = s; pos < e; pos++)
            S[pos] = row_score(pr, wfull, pos);
        if (coef)
            for (pos = s; pos < e; pos++)
                coef[pos] = 0;
        for (pos = s; pos < e; pos++)
        {
            const int64_t q0 = pr->wst[pos];
            const double sa = S[pos], ma = pr->mb[pos] - sa;
            const double mr = Sref ? pr->mb[pos] - Sref[pos] : 0;
            double cpos = 0;
            double thr = band ? fmin(band->delta, band->range) : -1.0;

            if (q0 >= e)
                break; /* sorted by tier: no later position has a worse partner */
            for (q = q0; q < e; q++, p++)
            {
                const double sq = S[q];
                const double t = ma + sq;
                const int pos_t = t > 0;
                bool inK = false, kept = false;

                hg += pos_t ? t : 0.0;
                nzero += !pos_t;
                ncor += sa > sq;
                if (coef)
                {
                    cpos += pos_t;
                    coef[q] -= pos_t;
                }
                if (p == nextk)
                {
                    inK = true;
                    kept = kkeep[ki] != 0;
                    nextk = ++ki < km ? kid[ki] : INT64_MAX;
                }
                /* kept pairs are in the model already */
                if (fabs(t) <= thr && !kept)
                {
                    band_add(pr, band, p, pos, q, t);
                    thr = fmin(band->delta, band->range);
                }
                if (mis)
                {
                    const double tr = mr + Sref[q];

                    if (!inK && ((tr > 0 && t < 0) || (tr <= 0 && t > 0)))
                    {
                        if (mis->n < mis->cap)
                        {
                            mis->e[mis->n].id = p;
                            mis->e[mis->n].pa = pos;
                            mis->e[mis->n].pb = q;
                            mis->e[mis->n].t = t;
                            mis->n++;
                        }
                        mis->total++;
                    }
                }
            }
            if (coef)
                coef[pos] += cpos;
            ctx_work(c, e - q0);
        }
        if (coef)
            group_gradient(pr, s, e, coef, G, part);
        hinge += hg;
        ctx_work(c, (e - s) / 4 + 1);
    }
    c->evals += p;
    out->hinge = hinge;
    out->npairs = p;
    out->ncorrect = ncor;
    out->nzero = nzero;
}

/* ------------------------------------------------------------------ working set */

/* Fill z (free features) and b of the pair (pa better, pb worse). */
static void pair_fill(const Prep *pr, int64_t pa, int64_t pb, double *z, double *b)
{
    const double *xa = row_x(pr, pr->perm[pa]);
    const double *xb = row_x(pr, pr->perm[pb]);
    int j;

    for (j = 0; j < pr->n; j++)
        z[j] = xa[pr->freeidx[j]] - xb[pr->freeidx[j]];
    *b = pr->mb[pa] - (pr->rb[pa] - pr->rb[pb]);
}

/* Residual of working-set entry k at the scores S, computed exactly as in pass_run. */
static inline double kset_t(const Prep *pr, const KSet *K, int64_t k, const double *S)
{
    return (pr->mb[K->pa[k]] - S[K->pa[k]]) + S[K->pb[k]];
}

/* Empty the working set and release its arrays. */
static void kset_clear(Ctx *c, KSet *K)
{
    ctx_free(c, K->id);
    ctx_free(c, K->pa);
    ctx_free(c, K->pb);
    ctx_free(c, K->b);
    ctx_free(c, K->z);
    ctx_free(c, K->alpha);
    ctx_free(c, K->keep);
    K->id = K->pa = K->pb = NULL;
    K->b = K->z = K->alpha = NULL;
    K->keep = NULL;
    K->m = K->cap = 0;
}

/* Merge the id-sorted refs e[0..ne) into K (a pair present already is not duplicated), computing z
 * and b of the new pairs; keep marks the merged pairs as staying. */
static int kset_merge(Ctx *c, const Prep *pr, KSet *K, const PairRef *e, int64_t ne, bool keep)
{
    const int n = K->n;
    int64_t i = 0, j = 0, m = 0, cap;
    int64_t *id, *pa, *pb;
    double *b, *z, *al;
    uint8_t *kp;

    if (ne == 0)
        return RBR_FIT_OK;
    cap = K->m + ne;
    if (!(id = ctx_alloc(c, (size_t)cap, sizeof(int64_t))) || !(pa = ctx_alloc(c, (size_t)cap, sizeof(int64_t))) ||
        !(pb = ctx_alloc(c, (size_t)cap, sizeof(int64_t))) || !(b = ctx_alloc(c, (size_t)cap, sizeof(double))) ||
        !(z = ctx_alloc(c, (size_t)cap, (size_t)(n > 0 ? n : 1) * sizeof(double))) ||
        !(al = ctx_alloc(c, (size_t)cap, sizeof(double))) || !(kp = ctx_alloc(c, (size_t)cap, sizeof(uint8_t))))
        return oom(c);
    while (i < K->m || j < ne)
    {
        if (j >= ne || (i < K->m && K->id[i] <= e[j].id))
        {
            id[m] = K->id[i];
            pa[m] = K->pa[i];
            pb[m] = K->pb[i];
            b[m] = K->b[i];
            al[m] = K->alpha[i];
            kp[m] = K->keep[i];
            if (n > 0)
                memcpy(z + m * n, K->z + i * n, (size_t)n * sizeof(double));
            if (j < ne && K->id[i] == e[j].id)
            {
                if (keep)
                    kp[m] = 1;
                j++;
            }
            i++;
        }
        else
        {
            id[m] = e[j].id;
            pa[m] = e[j].pa;
            pb[m] = e[j].pb;
            pair_fill(pr, e[j].pa, e[j].pb, z + m * n, &b[m]);
            al[m] = 0.5;
            kp[m] = keep ? 1 : 0;
            j++;
        }
        m++;
    }
    kset_clear(c, K);
    K->id = id;
    K->pa = pa;
    K->pb = pb;
    K->b = b;
    K->z = z;
    K->alpha = al;
    K->keep = kp;
    K->m = m;
    K->cap = cap;
    return RBR_FIT_OK;
}

/* Remove the band pairs (not kept) from K. */
static void kset_drop_unkept(KSet *K)
{
    const int n = K->n;
    int64_t k, m = 0;

    for (k = 0; k < K->m; k++)
    {
        if (!K->keep[k])
            continue;
        K->id[m] = K->id[k];
        K->pa[m] = K->pa[k];
        K->pb[m] = K->pb[k];
        K->b[m] = K->b[k];
        K->alpha[m] = K->alpha[k];
        K->keep[m] = 1;
        if (n > 0 && m != k)
            memmove(K->z + m * n, K->z + k * n, (size_t)n * sizeof(double));
        m++;
    }
    K->m = m;
}

/* Move a[r] down the max-heap a[0 .. len-1] until both children are smaller. */
static void sift_down_d(double *a, int64_t r, int64_t len)
{
    for (;;)
    {
        int64_t ch = 2 * r + 1;
        double t;

        if (ch >= len)
            break;
        if (ch + 1 < len && a[ch + 1] > a[ch])
            ch++;
        if (a[r] >= a[ch])
            break;
        t = a[r];
        a[r] = a[ch];
        a[ch] = t;
        r = ch;
    }
}

/* In-place heap sort of doubles (ascending). */
static void heapsort_d(double *a, int64_t len)
{
    int64_t i, end;

    for (i = len / 2; i-- > 0;)
        sift_down_d(a, i, len);
    for (end = len - 1; end > 0; end--)
    {
        double t = a[0];

        a[0] = a[end];
        a[end] = t;
        sift_down_d(a, 0, end);
    }
}

/* Keep at most `keep` entries of K, those closest to the kink at the scores S and with |t| <= maxabs
 * (ties in id order). */
static int kset_prune(Ctx *c, const Prep *pr, KSet *K, const double *S, int64_t keep, double maxabs)
{
    const int n = K->n;
    double *key, thr;
    int64_t k, m = 0, nbelow = 0, eqroom;

    if (!(key = ctx_alloc(c, (size_t)(K->m > 0 ? K->m : 1), sizeof(double))))
        return oom(c);
    for (k = 0; k < K->m; k++)
        key[k] = fabs(kset_t(pr, K, k, S));
    heapsort_d(key, K->m);
    thr = K->m > keep ? key[keep - 1] : (K->m > 0 ? key[K->m - 1] : 0.0);
    if (thr > maxabs)
    {
        thr = maxabs;
        keep = K->m;
    }
    for (k = 0; k < K->m; k++)
        if (fabs(kset_t(pr, K, k, S)) < thr)
            nbelow++;
    eqroom = keep - nbelow;
    for (k = 0; k < K->m; k++)
    {
        const double a = fabs(kset_t(pr, K, k, S));

        if (a < thr || (a == thr && eqroom-- > 0))
        {
            K->id[m] = K->id[k];
            K->pa[m] = K->pa[k];
            K->pb[m] = K->pb[k];
            K->b[m] = K->b[k];
            K->alpha[m] = K->alpha[k];
            K->keep[m] = K->keep[k];
            if (n > 0 && m != k)
                memmove(K->z + m * n, K->z + k * n, (size_t)n * sizeof(double));
            m++;
        }
    }
    K->m = m;
    ctx_free(c, key);
    return RBR_FIT_OK;
}

/* ------------------------------------------------------------------ dense algebra */

/* Cholesky of the Jacobi-scaled matrix: diag(sc) H diag(sc) + shift I = L L^T (row-major, lower);
 * 0 on success, -1 on a pivot <= floor. */
static int chol_try(const double *H, const double *sc, double *L, int n, double shift, double floor)
{
    int i, j, k;

    for (i = 0; i < n; i++)
    {
        for (j = 0; j <= i; j++)
        {
            double s = H[i * n + j] * sc[i] * sc[j] + (i == j ? shift : 0.0);

            for (k = 0; k < j; k++)
                s -= L[i * n + k] * L[j * n + k];
            if (i == j)
            {
                if (!(s > floor))
                    return -1;
                L[i * n + i] = sqrt(s);
            }
            else
                L[i * n + j] = s / L[j * n + j];
        }
    }
    return 0;
}

/* Factor the symmetric positive (semi-)definite H: scale it to a unit diagonal (sc = diag^-1/2, so that
 * thresholds are relative per coordinate), then Cholesky, adding a growing diagonal shift if it is
 * numerically singular; false when even a large shift fails (non-finite input). */
static bool chol_factor(const double *H, double *L, double *sc, int n)
{
    double shift;
    int i, tries;

    for (i = 0; i < n; i++)
    {
        const double dg = H[i * n + i];

        if (!isfinite(dg))
            return false;
        sc[i] = dg > 0 ? 1.0 / sqrt(dg) : 1.0;
    }
    if (chol_try(H, sc, L, n, 0.0, 1e-14) == 0)
        return true;
    shift = 1e-12;
    for (tries = 0; tries < 12; tries++, shift *= 10)
        if (chol_try(H, sc, L, n, shift, 1e-14) == 0)
            return true;
    return false;
}

/* Solve H x = x in place with the factor of chol_factor. */
static void chol_solve(const double *L, const double *sc, int n, double *x)
{
    int i, k;

    for (i = 0; i < n; i++)
        x[i] *= sc[i];
    for (i = 0; i < n; i++)
    {
        double s = x[i];

        for (k = 0; k < i; k++)
            s -= L[i * n + k] * x[k];
        x[i] = s / L[i * n + i];
    }
    for (i = n - 1; i >= 0; i--)
    {
        double s = x[i];

        for (k = i + 1; k < n; k++)
            s -= L[k * n + i] * x[k];
        x[i] = s / L[i * n + i];
    }
    for (i = 0; i < n; i++)
        x[i] *= sc[i];
}

/* Dot product of length n. */
static inline double dotn(const double *a, const double *b, int n)
{
    v2d s2 = {0, 0};
    double s;
    int j = 0;

    /* even and odd elements summed apart, then together: a fixed order, so results are repeatable */
    for (; j + 2 <= n; j += 2)
        s2 += ld2(a + j) * ld2(b + j);
    s = s2[0] + s2[1];
    for (; j < n; j++)
        s += a[j] * b[j];
    return s;
}

/* The smaller of a running minimum a (never NaN) and b, as fmin(a, b) there, without a call. */
static inline double min_acc(double a, double b)
{
    return b < a ? b : a;
}

/* The larger of a running maximum a (never NaN) and b, as fmax(a, b) there, without a call. */
static inline double max_acc(double a, double b)
{
    return b > a ? b : a;
}

/* ------------------------------------------------------------------ interior-point model solver */

/* Work arrays of the interior-point method (per-pair arrays sized cap). */
typedef struct IpmWs
{
    int64_t cap;
    double *u, *s, *a, *bt, *th, *rs, *ru, *ds, *du, *da, *db;
    double *H, *L, *sc, *rw, *rhs, *dw, *dwa, *yl, *yh, *dyl, *dyh, *dyla, *dyha, *p, *q;
} IpmWs;

/* Make sure the interior-point work arrays hold m pairs and n weights. */
static int ipm_reserve(Ctx *c, IpmWs *ws, int64_t m, int n)
{
    double **pp[] = {&ws->u, &ws->s, &ws->a, &ws->bt, &ws->th, &ws->rs, &ws->ru, &ws->ds, &ws->du, &ws->da, &ws->db};
    double **pn[] = {&ws->sc, &ws->rw, &ws->rhs, &ws->dw, &ws->dwa, &ws->yl, &ws->yh, &ws->dyl, &ws->dyh,
                     &ws->dyla, &ws->dyha, &ws->p, &ws->q};
    size_t i;

    if (!ws->H)
    {
        if (!(ws->H = ctx_alloc(c, (size_t)(n > 0 ? n : 1) * (size_t)(n > 0 ? n : 1), sizeof(double))) ||
            !(ws->L = ctx_alloc(c, (size_t)(n > 0 ? n : 1) * (size_t)(n > 0 ? n : 1), sizeof(double))))
            return oom(c);
        for (i = 0; i < sizeof(pn) / sizeof(pn[0]); i++)
            if (!(*pn[i] = ctx_alloc(c, (size_t)(n > 0 ? n : 1), sizeof(double))))
                return oom(c);
    }
    if (m <= ws->cap)
        return RBR_FIT_OK;
    m = m > 2 * ws->cap ? m : 2 * ws->cap;
    for (i = 0; i < sizeof(pp) / sizeof(pp[0]); i++)
    {
        ctx_free(c, *pp[i]);
        if (!(*pp[i] = ctx_alloc(c, (size_t)m, sizeof(double))))
            return oom(c);
    }
    ws->cap = m;
    return RBR_FIT_OK;
}

/*
 * Minimise  -g.w + sum_k max(0, b_k - z_k.w) + (rho/2)|w|^2  (over lo <= w <= hi when lo != NULL)
 * by Mehrotra's predictor-corrector on
 *     min -g.w + sum u + (rho/2)|w|^2   s.t.  s = Z w + u - b >= 0,  u >= 0,  lo <= w <= hi
 * with multipliers alpha (on s), beta (on u; alpha + beta = 1 at optimality), yl, yh.  Eliminating the
 * per-pair unknowns leaves the n x n system (rho I + Z^T diag(theta) Z + diag(yl/p + yh/q)) dw = rhs,
 * theta_k = 1 / (u_k/beta_k + s_k/alpha_k).  w is the start (strictly inside the box) and the result;
 * With Cq (n x n, positive semi-definite) the objective has (1/2)(w - wq)^T Cq (w - wq) added.
 * K->alpha receives the multipliers (clamped to [0, 1]).  It stops when the two parts of the
 * certificate it controls, the complementarity and |r_w|^2 / (2 rho) (r_w the stationarity residual),
 * are each below acc * max(fscale, model objective), and the primal residuals are small.
 */
static int ipm_solve(Ctx *c, IpmWs *ws, KSet *K, const double *g, double rho, const double *Cq,
                     const double *wq, const double *lo, const double *hi, double acc, double fscale, double *w,
                     int *iters_out)
{
    const int n = K->n;
    const int64_t m = K->m;
    const double *Z = K->z, *B = K->b;
    const bool box = lo != NULL;
    const double nc = 2.0 * (double)m + (box ? 2.0 * n : 0.0);
    const double eta = 1.0;
    double *u = ws->u, *s = ws->s, *a = ws->a, *bt = ws->bt, *th = ws->th, *rs = ws->rs, *ru = ws->ru;
    double *ds = ws->ds, *du = ws->du, *da = ws->da, *db = ws->db;
    double *H = ws->H, *L = ws->L, *rw = ws->rw, *rhs = ws->rhs, *dw = ws->dw, *dwa = ws->dwa;
    double *yl = ws->yl, *yh = ws->yh, *dyl = ws->dyl, *dyh = ws->dyh, *dyla = ws->dyla, *dyha = ws->dyha;
    double *p = ws->p, *q = ws->q;
    double bmax = 0, zmax = 0;
    int64_t k;
    int i, j, it;

    *iters_out = 0;
    if (n == 0)
    {
        for (k = 0; k < m; k++)
            K->alpha[k] = B[k] > 0 ? 1.0 : 0.0;
        return RBR_FIT_OK;
    }
    if (nc == 0)
    {
        for (j = 0; j < n; j++)
            w[j] = g[j] / rho;
        return RBR_FIT_OK;
    }
    for (k = 0; k < m; k++)
    {
        const double tk = B[k] - dotn(Z + k * n, w, n);

        bmax = max_acc(bmax, fabs(B[k]));
        for (j = 0; j < n; j++)
            zmax = max_acc(zmax, fabs(Z[k * n + j]));
        u[k] = fmax(tk, 0.0) + eta;
        s[k] = u[k] - tk;
        a[k] = 0.5;
        bt[k] = 0.5;
    }
    for (j = 0; j < n; j++)
    {
        if (box)
        {
            p[j] = w[j] - lo[j];
            q[j] = hi[j] - w[j];
            yl[j] = 0.5 * eta / p[j];
            yh[j] = 0.5 * eta / q[j];
        }
        else
            p[j] = q[j] = yl[j] = yh[j] = 0;
    }

    for (it = 0; it < RBR_IPM_MAXIT; it++)
    {
        double comp = 0, pobj, nrs = 0, nru = 0, mu, wmax = 0, smu = 0, step, stepa, mua, sigma;
        int pass;

        /* residuals and convergence */
        for (j = 0; j < n; j++)
        {
            rw[j] = rho * w[j] - g[j] - (box ? yl[j] - yh[j] : 0.0);
            wmax = max_acc(wmax, fabs(w[j]));
        }
        pobj = (rho / 2) * dotn(w, w, n) - dotn(g, w, n);
        if (Cq)
        {
            /* dw (free here) holds w - wq */
            for (j = 0; j < n; j++)
                dw[j] = w[j] - wq[j];
            for (i = 0; i < n; i++)
            {
                const double cv = dotn(Cq + i * n, dw, n);

                rw[i] += cv;
                pobj += 0.5 * dw[i] * cv;
            }
        }
        for (k = 0; k < m; k++)
        {
            const double *zk = Z + k * n;

            axpyn(rw, -a[k], zk, n);
            rs[k] = dotn(zk, w, n) + u[k] - B[k] - s[k];
            ru[k] = 1.0 - a[k] - bt[k];
            comp += s[k] * a[k] + u[k] * bt[k];
            pobj += u[k];
            nrs = max_acc(nrs, fabs(rs[k]));
            nru = max_acc(nru, fabs(ru[k]));
        }
        if (box)
            for (j = 0; j < n; j++)
                comp += p[j] * yl[j] + q[j] * yh[j];
        mu = comp / nc;
        ctx_work(c, m * n / 8 + 1);
        {
            const double target = acc * fmax(fscale, fabs(pobj));
            double rw2 = 0;

            for (j = 0; j < n; j++)
                rw2 += rw[j] * rw[j];
            if (comp <= target && rw2 / (2 * rho) <= target && nrs <= 10 * acc * (1.0 + bmax + zmax * wmax) &&
                nru <= 10 * acc)
                break;
        }
        if (!isfinite(comp) || !isfinite(dotn(rw, rw, n)))
            return fail(c, RBR_FIT_ENUMERIC, "the interior-point solver diverged", RBR_NO_NUM, "");
        *iters_out = it + 1;

        /* Schur complement */
        for (i = 0; i < n * n; i++)
            H[i] = 0;
        for (k = 0; k < m; k++)
            th[k] = 1.0 / (u[k] / bt[k] + s[k] / a[k]);
        for (k = 0; k + 4 <= m; k += 4)
        {
            /* four pairs at a time: H is read and written once per block */
            const double *z0 = Z + k * n, *z1 = z0 + n, *z2 = z1 + n, *z3 = z2 + n;

            for (i = 0; i < n; i++)
            {
                const double a0 = th[k] * z0[i], a1 = th[k + 1] * z1[i], a2 = th[k + 2] * z2[i],
                             a3 = th[k + 3] * z3[i];
                const v2d A0 = {a0, a0}, A1 = {a1, a1}, A2 = {a2, a2}, A3 = {a3, a3};
                double *Hi = H + i * n;

                for (j = 0; j + 2 <= i + 1; j += 2)
                    st2(Hi + j, ld2(Hi + j) + (A0 * ld2(z0 + j) + A1 * ld2(z1 + j) + A2 * ld2(z2 + j) +
                                               A3 * ld2(z3 + j)));
                for (; j <= i; j++)
                    Hi[j] += a0 * z0[j] + a1 * z1[j] + a2 * z2[j] + a3 * z3[j];
            }
        }
        for (; k < m; k++)
        {
            const double *zk = Z + k * n;

            for (i = 0; i < n; i++)
            {
                const double zi = th[k] * zk[i];
                double *Hi = H + i * n;

                for (j = 0; j <= i; j++)
                    Hi[j] += zi * zk[j];
            }
        }
        for (i = 0; i < n; i++)
        {
            for (j = 0; j < i; j++)
                H[j * n + i] = H[i * n + j];
            H[i * n + i] += rho + (box ? yl[i] / p[i] + yh[i] / q[i] : 0.0);
        }
        if (Cq)
            for (i = 0; i < n * n; i++)
                H[i] += Cq[i];
        if (!chol_factor(H, L, ws->sc, n))
            return fail(c, RBR_FIT_ENUMERIC, "the interior-point Newton system is not factorisable", RBR_NO_NUM, "");

        /* pass 0: affine (targets 0); pass 1: combined (targets sigma mu - second-order terms) */
        for (pass = 0; pass < 2; pass++)
        {
            const bool corr = pass == 1;
            double *dwp = corr ? dw : dwa, *dylp = corr ? dyl : dyla, *dyhp = corr ? dyh : dyha;

            for (j = 0; j < n; j++)
            {
                rhs[j] = -rw[j];
                if (box)
                {
                    const double tl = corr ? smu - dwa[j] * dyla[j] : 0.0;
                    const double tq = corr ? smu + dwa[j] * dyha[j] : 0.0;

                    rhs[j] += (tl / p[j] - yl[j]) - (tq / q[j] - yh[j]);
                }
            }
            for (k = 0; k < m; k++)
            {
                const double ts = corr ? smu - ds[k] * da[k] : 0.0;
                const double tu = corr ? smu - du[k] * db[k] : 0.0;
                const double e = -rs[k] - tu / bt[k] + u[k] + u[k] * ru[k] / bt[k] + ts / a[k] - s[k];
                const double te = th[k] * e;
                const double *zk = Z + k * n;

                axpyn(rhs, te, zk, n);
            }
            memcpy(dwp, rhs, (size_t)n * sizeof(double));
            chol_solve(L, ws->sc, n, dwp);
            for (k = 0; k < m; k++)
            {
                const double ts = corr ? smu - ds[k] * da[k] : 0.0;
                const double tu = corr ? smu - du[k] * db[k] : 0.0;
                const double e = -rs[k] - tu / bt[k] + u[k] + u[k] * ru[k] / bt[k] + ts / a[k] - s[k];
                const double dak = th[k] * (e - dotn(Z + k * n, dwp, n));
                const double dbk = ru[k] - dak;

                da[k] = dak;
                ds[k] = ts / a[k] - s[k] - (s[k] / a[k]) * dak;
                db[k] = dbk;
                du[k] = tu / bt[k] - u[k] - (u[k] / bt[k]) * dbk;
            }
            if (box)
                for (j = 0; j < n; j++)
                {
                    const double tl = corr ? smu - dwa[j] * dyla[j] : 0.0;
                    const double tq = corr ? smu + dwa[j] * dyha[j] : 0.0;

                    dylp[j] = (tl - p[j] * yl[j] - yl[j] * dwp[j]) / p[j];
                    dyhp[j] = (tq - q[j] * yh[j] + yh[j] * dwp[j]) / q[j];
                }

            /* largest step keeping every variable positive */
            step = 1.0;
            for (k = 0; k < m; k++)
            {
                if (ds[k] < 0)
                    step = min_acc(step, -s[k] / ds[k]);
                if (du[k] < 0)
                    step = min_acc(step, -u[k] / du[k]);
                if (da[k] < 0)
                    step = min_acc(step, -a[k] / da[k]);
                if (db[k] < 0)
                    step = min_acc(step, -bt[k] / db[k]);
            }
            if (box)
                for (j = 0; j < n; j++)
                {
                    if (dwp[j] < 0)
                        step = min_acc(step, -p[j] / dwp[j]);
                    if (dwp[j] > 0)
                        step = min_acc(step, q[j] / dwp[j]);
                    if (dylp[j] < 0)
                        step = min_acc(step, -yl[j] / dylp[j]);
                    if (dyhp[j] < 0)
                        step = min_acc(step, -yh[j] / dyhp[j]);
                }
            if (!corr)
            {
                stepa = step;
                mua = 0;
                for (k = 0; k < m; k++)
                    mua += (s[k] + stepa * ds[k]) * (a[k] + stepa * da[k]) +
                           (u[k] + stepa * du[k]) * (bt[k] + stepa * db[k]);
                if (box)
                    for (j = 0; j < n; j++)
                        mua += (p[j] + stepa * dwa[j]) * (yl[j] + stepa * dyla[j]) +
                               (q[j] - stepa * dwa[j]) * (yh[j] + stepa * dyha[j]);
                mua /= nc;
                sigma = mu > 0 ? pow(fmax(mua, 0.0) / mu, 3) : 0.0;
                if (sigma > 1)
                    sigma = 1;
                smu = sigma * mu;
            }
        }

        /* combined step */
        step = fmin(1.0, 0.995 * step);
        for (j = 0; j < n; j++)
        {
            w[j] += step * dw[j];
            if (box)
            {
                p[j] += step * dw[j];
                q[j] -= step * dw[j];
                yl[j] += step * dyl[j];
                yh[j] += step * dyh[j];
            }
        }
        for (k = 0; k < m; k++)
        {
            s[k] += step * ds[k];
            u[k] += step * du[k];
            a[k] += step * da[k];
            bt[k] += step * db[k];
        }
        ctx_work(c, m * n * 2 + 1);
    }
    for (k = 0; k < m; k++)
        K->alpha[k] = a[k] < 0 ? 0.0 : (a[k] > 1 ? 1.0 : a[k]);
    return RBR_FIT_OK;
}

/* ------------------------------------------------------------------ exact solver */

/* Solver state shared by the levels. */
typedef struct Work
{
    double *Sc, *Sn; /* per position: scores at the centre and at the new point */
    double *coef;    /* per position scratch: counts of the pairs with t > 0 */
    double *wfull;                   /* d */
    double *wc, *wn, *Gc, *Gn, *gv, *lo, *hi, *part; /* n */
    double *C;     /* n x n: curvature estimate of the approach phase */
    KSet K;
    IpmWs ipm;
    Band band;
    MisBuf mis;
    int64_t ws; /* working-set (band) target */
    double l2u;
} Work;

/* What a level returns. */
typedef struct LevelOut
{
    double obj, gap;
    PassOut po;
    bool converged;
    int iters;
    int64_t passes;
    int64_t kpairs;
} LevelOut;

/* Expand free weights to all d features (fixed ones 0). */
static void expand_w(const Prep *pr, const double *w, double *wfull)
{
    int j;

    for (j = 0; j < pr->d; j++)
        wfull[j] = 0;
    for (j = 0; j < pr->n; j++)
        wfull[pr->freeidx[j]] = w[j];
}

/* Certified bound on (objective - optimum) at w, per pair: see the file comment. */
static double certificate(const Prep *pr, const KSet *K, const double *S, const double *G, const double *w,
                          double rho, double P, double *ga)
{
    const int n = pr->n;
    double compl = 0, r2 = 0;
    int64_t k;
    int j;

    for (j = 0; j < n; j++)
        ga[j] = G[j];
    for (k = 0; k < K->m; k++)
    {
        const double t = kset_t(pr, K, k, S);
        const double al = K->alpha[k];
        const double cf = al - (t > 0 ? 1.0 : 0.0);

        if (cf != 0)
            for (j = 0; j < n; j++)
                ga[j] += cf * K->z[k * n + j];
        compl += (t > 0 ? t : 0.0) - al * t;
    }
    for (j = 0; j < n; j++)
    {
        const double r = rho * w[j] - ga[j];

        r2 += r * r;
    }
    return (fmax(compl, 0.0) + r2 / (2 * rho)) / P;
}

/* Objective (per pair) from a pass's hinge sum. */
static double objective_of(const PassOut *po, const double *w, int n, double l2)
{
    return po->hinge / (double)po->npairs + 0.5 * l2 * dotn(w, w, n);
}

/* Swap two pointers. */
static void swap_ptr(double **a, double **b)
{
    double *t = *a;

    *a = *b;
    *b = t;
}

/* The stopping test: certified gap <= tol * max(objective, RBR_OBJ_FLOOR). */
static bool gap_ok(double gap, double obj, double tol)
{
    return gap <= tol * fmax(obj, RBR_OBJ_FLOOR);
}

/* Accuracy of the model solves for a level tolerance: a tenth of it, within [1e-14, 1e-7]. */
static double ipm_acc(double tol)
{
    return fmin(1e-7, fmax(1e-14, 0.1 * tol));
}

/* Curvature estimate of the approach phase: C = sum over K (the band, |t| <= delta) of z z^T / (2 delta),
 * the Hessian of the hinges smoothed over a width delta. */
static void curvature(const KSet *K, double delta, double *C)
{
    const int n = K->n;
    const double sc = delta > 0 ? 1.0 / (2 * delta) : 0.0;
    int64_t k;
    int i, j;

    for (i = 0; i < n * n; i++)
        C[i] = 0;
    for (k = 0; k < K->m; k++)
    {
        const double *zk = K->z + k * n;

        for (i = 0; i < n; i++)
            axpyn(C + i * n, sc * zk[i], zk, i + 1);
    }
    for (i = 0; i < n; i++)
        for (j = 0; j < i; j++)
            C[j * n + i] = C[i * n + j];
}

/* The model's linear part at the centre: G_c minus the z of the K pairs with t_c > 0 (those are exact). */
static void model_linear(const Prep *pr, const KSet *K, const double *Sc, const double *Gc, double *gv)
{
    const int n = pr->n;
    int64_t k;
    int j;

    memcpy(gv, Gc, (size_t)n * sizeof(double));
    for (k = 0; k < K->m; k++)
        if (kset_t(pr, K, k, Sc) > 0)
            for (j = 0; j < n; j++)
                gv[j] -= K->z[k * n + j];
}

/*
 * Minimise the objective over the pairs of view v from w (in/out, free coordinates).
 *
 * base: every pair with z != 0 is modelled exactly (the model is F itself): one interior-point solve
 * and the certificate pass.
 *
 * Otherwise, from a centre w_c, each iteration minimises a model inside the box |w - w_c|_inf <= radius
 * and evaluates the result on every pair (one pass):
 *   approach phase: linear part at w_c + exact hinges of the band (|t| <= delta) + (1/2) dw^T C dw,
 *     C = sum_band z z^T / (2 delta), a kernel estimate of the curvature that the kinks of all the
 *     other pairs add as w moves (pairs cross the kink at a density read off the band).  Not a lower
 *     bound of F, but a Newton-like model far from the optimum.
 *   exact phase (once a step moves t by less than RBR_QSWITCH band widths): linear part + exact hinges
 *     of the band (|t| <= the last shift, up to RBR_EXACT_WS_FACTOR times the working set) + exact
 *     hinges of every pair a previous model got wrong (kept).  A lower bound of F, equal to F wherever
 *     no other pair changes sign, so it reaches the optimum once the kept pairs cover the crossings.
 * A point that lowers F (or is certified) is accepted and becomes the centre, the box growing if it
 * was binding; otherwise the box shrinks.  Stops when the certificate at the centre is below tol.
 */
static int solve_level(Ctx *c, const Prep *pr, const View *v, Work *wk, double *w, double tol, int maxit,
                       bool base, LevelOut *lo)
{
    const int n = pr->n;
    const double P = (double)v->npairs, rho = P * wk->l2u;
    KSet *K = &wk->K;
    double obj_c, gap_c, radius, delta_c;
    bool approach = true;
    PassOut po_c, po_n;
    int it, rc, ipit, j;
    int64_t passes = 0;

    memset(lo, 0, sizeof(*lo));
    kset_clear(c, K);
    K->n = n;
    memcpy(wk->wc, w, (size_t)n * sizeof(double));

    if (base)
    {
        PairRef *all;
        int64_t gi, p = 0, na = 0;

        if (!(all = ctx_alloc(c, (size_t)(v->npairs > 0 ? v->npairs : 1), sizeof(PairRef))))
            return oom(c);
        for (gi = 0; gi < v->ng; gi++)
        {
            const int64_t g = v->g[gi], e = pr->gs[g + 1];
            int64_t pos, q;

            for (pos = pr->gs[g]; pos < e; pos++)
                for (q = pr->wst[pos]; q < e; q++, p++)
                    if (!pair_z_zero(pr, pos, q))
                    {
                        all[na].id = p;
                        all[na].pa = pos;
                        all[na].pb = q;
                        all[na].t = 0;
                        na++;
                    }
            ctx_work(c, pr->gpairs[g] + 1);
        }
        if ((rc = kset_merge(c, pr, K, all, na, true)) != RBR_FIT_OK)
            return rc;
        ctx_free(c, all);
        if ((rc = ipm_reserve(c, &wk->ipm, K->m, n)) != RBR_FIT_OK)
            return rc;
        for (j = 0; j < n; j++)
            wk->gv[j] = 0;
        memcpy(wk->wn, wk->wc, (size_t)n * sizeof(double));
        if ((rc = ipm_solve(c, &wk->ipm, K, wk->gv, rho, NULL, NULL, NULL, NULL, ipm_acc(tol), P * RBR_OBJ_FLOOR,
                            wk->wn, &ipit)) != RBR_FIT_OK)
            return rc;
        expand_w(pr, wk->wn, wk->wfull);
        pass_run(c, pr, v, wk->wfull, wk->Sn, wk->Gn, wk->coef, wk->part, NULL, NULL, NULL, NULL, &po_n);
        lo->gap = certificate(pr, K, wk->Sn, wk->Gn, wk->wn, rho, P, wk->part);
        lo->obj = objective_of(&po_n, wk->wn, n, wk->l2u);
        lo->po = po_n;
        lo->converged = gap_ok(lo->gap, lo->obj, tol);
        lo->iters = 1;
        lo->passes = 1;
        lo->kpairs = K->m;
        memcpy(w, wk->wn, (size_t)n * sizeof(double));
        return RBR_FIT_OK;
    }

    /* the centre: scores, G, band; its certificate takes alpha = [t > 0] on every pair */
    expand_w(pr, wk->wc, wk->wfull);
    band_reset(&wk->band, INFINITY, INFINITY, wk->ws);
    pass_run(c, pr, v, wk->wfull, wk->Sc, wk->Gc, wk->coef, wk->part, NULL, NULL, &wk->band, NULL, &po_c);
    passes++;
    obj_c = objective_of(&po_c, wk->wc, n, wk->l2u);
    gap_c = certificate(pr, K, wk->Sc, wk->Gc, wk->wc, rho, P, wk->part);
    lo->converged = gap_ok(gap_c, obj_c, tol);
    if ((rc = kset_merge(c, pr, K, wk->band.e, wk->band.n, false)) != RBR_FIT_OK)
        return rc;
    delta_c = wk->band.delta;
    curvature(K, delta_c, wk->C);
    radius = 0;
    for (j = 0; j < n; j++)
        radius = fmax(radius, fabs(wk->wc[j]));
    radius = fmax(1.0, radius);

    for (it = 0; it < maxit && !lo->converged; it++)
    {
        double obj_n, gap_n, stepinf = 0, shift = 0;
        bool box_active = false, accept, next_approach;
        int64_t k;

        /* minimise the model at the centre inside the box */
        model_linear(pr, K, wk->Sc, wk->Gc, wk->gv);
        for (j = 0; j < n; j++)
        {
            wk->lo[j] = wk->wc[j] - radius;
            wk->hi[j] = wk->wc[j] + radius;
        }
        if ((rc = ipm_reserve(c, &wk->ipm, K->m, n)) != RBR_FIT_OK)
            return rc;
        memcpy(wk->wn, wk->wc, (size_t)n * sizeof(double));
        if ((rc = ipm_solve(c, &wk->ipm, K, wk->gv, rho, approach ? wk->C : NULL, wk->wc, wk->lo, wk->hi,
                            ipm_acc(tol), P * fmax(obj_c, RBR_OBJ_FLOOR), wk->wn, &ipit)) != RBR_FIT_OK)
            return rc;
        lo->iters++;
        lo->kpairs = K->m;
        for (j = 0; j < n; j++)
        {
            const double st = fabs(wk->wn[j] - wk->wc[j]);

            stepinf = fmax(stepinf, st);
            if (st >= (1 - 1e-6) * radius)
                box_active = true;
            wk->part[j] = wk->wn[j] - wk->wc[j];
        }
        /* the largest shift of t over the modelled pairs; the next step is expected to be shorter */
        for (k = 0; k < K->m; k++)
            shift = fmax(shift, fabs(dotn(K->z + k * n, wk->part, n)));
        next_approach = approach && shift > RBR_QSWITCH * delta_c;

        /* evaluate the new point on every pair: objective, certificate, model errors, next band */
        expand_w(pr, wk->wn, wk->wfull);
        if (next_approach)
            band_reset(&wk->band, INFINITY, INFINITY, wk->ws);
        else
            band_reset(&wk->band, INFINITY, shift, RBR_EXACT_WS_FACTOR * wk->ws);
        wk->mis.n = 0;
        wk->mis.total = 0;
        pass_run(c, pr, v, wk->wfull, wk->Sn, wk->Gn, wk->coef, wk->part, wk->Sc, K, &wk->band, &wk->mis,
                 &po_n);
        passes++;
        obj_n = objective_of(&po_n, wk->wn, n, wk->l2u);
        gap_n = certificate(pr, K, wk->Sn, wk->Gn, wk->wn, rho, P, wk->part);
        accept = obj_n < obj_c || (obj_n <= obj_c && gap_n < gap_c) || gap_ok(gap_n, obj_n, tol);

        if (accept)
        {
            swap_ptr(&wk->Sc, &wk->Sn);
            swap_ptr(&wk->Gc, &wk->Gn);
            swap_ptr(&wk->wc, &wk->wn);
            obj_c = obj_n;
            gap_c = gap_n;
            po_c = po_n;
            if (gap_ok(gap_n, obj_n, tol))
            {
                lo->converged = true;
                break;
            }
            /* re-centre: a new band; in the exact phase the pairs the model got wrong stay */
            kset_drop_unkept(K);
            approach = next_approach;
            if (!approach)
            {
                if ((rc = kset_merge(c, pr, K, wk->mis.e, wk->mis.n, true)) != RBR_FIT_OK ||
                    (rc = kset_prune(c, pr, K, wk->Sc, wk->ws, 2 * shift)) != RBR_FIT_OK)
                    return rc;
            }
            if ((rc = kset_merge(c, pr, K, wk->band.e, wk->band.n, false)) != RBR_FIT_OK)
                return rc;
            delta_c = wk->band.delta;
            if (approach)
                curvature(K, delta_c, wk->C);
            if (box_active)
                radius *= 4;
        }
        else
        {
            /* same centre, a smaller box; in the exact phase the wrongly modelled pairs become exact */
            if (!approach && (rc = kset_merge(c, pr, K, wk->mis.e, wk->mis.n, true)) != RBR_FIT_OK)
                return rc;
            radius = 0.5 * fmin(radius, stepinf);
            if (!(radius > 1e-15 * (1 + stepinf)))
                break; /* no progress possible at this precision */
        }
    }
    memcpy(w, wk->wc, (size_t)n * sizeof(double));
    lo->obj = obj_c;
    lo->gap = gap_c;
    lo->po = po_c;
    lo->passes = passes;
    return RBR_FIT_OK;
}

/* The automatic working set for P training pairs: about sqrt(P), so that a model solve (~ ws d^2 per
 * interior-point iteration) stays cheap against a pass (~ P) at every size; measured best from 10^4 to
 * 10^6 pairs with test/bench/fit_solver_bench.c. */
static int auto_working_set(int64_t P)
{
    double ws = sqrt((double)P);

    return ws < RBR_MIN_WS ? RBR_MIN_WS : ws > RBR_MAX_WS ? RBR_MAX_WS : (int)ws;
}

/* Allocate the exact solver's work arrays (P training pairs). */
static int work_init(Ctx *c, const Prep *pr, Work *wk, const RbrFitOptions *o, int64_t P)
{
    const size_t N = (size_t)(pr->N > 0 ? pr->N : 1), n = (size_t)(pr->n > 0 ? pr->n : 1);

    memset(wk, 0, sizeof(*wk));
    wk->ws = o->working_set > 0 ? o->working_set : auto_working_set(P);
    wk->l2u = o->l2 > 0 ? o->l2 : o->l2_tiebreak;
    if (!(wk->Sc = ctx_alloc(c, N, sizeof(double))) || !(wk->Sn = ctx_alloc(c, N, sizeof(double))) ||
        !(wk->coef = ctx_alloc(c, N, sizeof(double))) ||
        !(wk->wfull = ctx_alloc(c, (size_t)(pr->d > 0 ? pr->d : 1), sizeof(double))) ||
        !(wk->wc = ctx_alloc(c, n, sizeof(double))) || !(wk->wn = ctx_alloc(c, n, sizeof(double))) ||
        !(wk->Gc = ctx_alloc(c, n, sizeof(double))) || !(wk->Gn = ctx_alloc(c, n, sizeof(double))) ||
        !(wk->gv = ctx_alloc(c, n, sizeof(double))) || !(wk->lo = ctx_alloc(c, n, sizeof(double))) ||
        !(wk->hi = ctx_alloc(c, n, sizeof(double))) || !(wk->part = ctx_alloc(c, n, sizeof(double))) ||
        !(wk->C = ctx_alloc(c, n * n, sizeof(double))) ||
        !(wk->band.e = ctx_alloc(c, (size_t)(RBR_EXACT_WS_FACTOR * wk->ws), sizeof(PairRef))) ||
        !(wk->mis.e = ctx_alloc(c, (size_t)wk->ws, sizeof(PairRef))))
        return oom(c);
    wk->band.cap = wk->ws;
    wk->mis.cap = wk->ws;
    return RBR_FIT_OK;
}

/* Fill the validation part of the result: one pass over the validation groups at wfull. */
static int fill_validation(Ctx *c, const Prep *pr, const double *wfull, double *S, RbrFitResult *r)
{
    View vv;
    PassOut po;
    int rc;

    if ((rc = view_build(c, pr, &vv, NULL, 1, 0)) != RBR_FIT_OK)
        return rc;
    r->val_pairs = vv.npairs;
    r->val_loss = r->val_accuracy = NAN;
    if (vv.npairs > 0)
    {
        pass_run(c, pr, &vv, wfull, S, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &po);
        r->val_loss = po.hinge / (double)po.npairs;
        r->val_accuracy = (double)po.ncorrect / (double)po.npairs;
    }
    ctx_free(c, vv.g);
    return RBR_FIT_OK;
}

/* The EXACT solver. */
static int solve_exact(Ctx *c, const RbrFitData *data, const RbrFitOptions *o, RbrFitResult *r)
{
    Prep pr;
    Work wk;
    View views[RBR_MAX_LEVELS];
    int nlev = 1, lev, rc, j;
    uint64_t mod = 1;
    double *w;
    LevelOut lo;
    int64_t sub_evals = 0, base_cap, evals0;

    if ((rc = prep_build(c, &pr, data, o, false)) != RBR_FIT_OK)
        return rc;
    if ((rc = view_build(c, &pr, &views[0], NULL, 0, 0)) != RBR_FIT_OK)
        return rc;
    if (views[0].npairs == 0)
        return fail(c, RBR_FIT_ENOPAIRS,
                    "no training pairs: each training group needs rows of at least two different tiers",
                    RBR_NO_NUM, "");
    if ((rc = work_init(c, &pr, &wk, o, views[0].npairs)) != RBR_FIT_OK)
        return rc;
    if (!(w = ctx_alloc(c, (size_t)(pr.n > 0 ? pr.n : 1), sizeof(double))))
        return oom(c);
    for (j = 0; j < pr.n; j++)
        w[j] = 0;
    r->l2_used = wk.l2u;
    r->train_pairs = views[0].npairs;

    if (pr.n == 0)
    {
        /* nothing to fit: w = 0 is the only feasible point, trivially optimal */
        PassOut po;

        expand_w(&pr, w, wk.wfull);
        pass_run(c, &pr, &views[0], wk.wfull, wk.Sc, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &po);
        memset(&lo, 0, sizeof(lo));
        lo.po = po;
        lo.obj = po.hinge / (double)po.npairs;
        lo.gap = 0;
        lo.converged = true;
        lo.passes = 1;
        r->iterations = 0;
        r->passes = 1;
    }
    else
    {
        /* warm-start levels: nested hashed sub-samples of the training groups */
        base_cap = 2 * wk.ws;
        while (views[nlev - 1].npairs > base_cap && nlev < RBR_MAX_LEVELS)
        {
            mod *= RBR_LEVEL_FACTOR;
            if ((rc = view_build(c, &pr, &views[nlev], &views[0], 3, mod)) != RBR_FIT_OK)
                return rc;
            if (views[nlev].npairs < 4 * (int64_t)pr.n + 16)
            {
                ctx_free(c, views[nlev].g);
                break;
            }
            nlev++;
        }
        r->iterations = 0;
        for (lev = nlev - 1; lev >= 0; lev--)
        {
            const bool base = views[lev].npairs <= base_cap;

            evals0 = c->evals;
            if ((rc = solve_level(c, &pr, &views[lev], &wk, w, lev == 0 ? o->tol : fmax(o->tol, RBR_SUBLEVEL_TOL),
                                  lev == 0 ? o->max_iter : RBR_SUBLEVEL_MAXIT, base, &lo)) != RBR_FIT_OK)
                return rc;
            r->iterations += lo.iters;
            if (lev > 0)
                sub_evals += c->evals - evals0;
        }
        r->passes = lo.passes + (sub_evals + views[0].npairs - 1) / views[0].npairs;
        r->working_set_pairs = lo.kpairs;
    }
    expand_w(&pr, w, wk.wfull);
    if (pr.d > 0)
        memcpy(r->w, wk.wfull, (size_t)pr.d * sizeof(double));
    r->train_loss = lo.po.hinge / (double)lo.po.npairs;
    r->zero_loss_share = (double)lo.po.nzero / (double)lo.po.npairs;
    r->train_accuracy = (double)lo.po.ncorrect / (double)lo.po.npairs;
    r->objective = r->train_loss + 0.5 * o->l2 * dotn(w, w, pr.n);
    r->gap = lo.gap;
    r->converged = lo.converged;
    if ((rc = fill_validation(c, &pr, wk.wfull, wk.Sn, r)) != RBR_FIT_OK)
        return rc;
    r->pair_evaluations = c->evals;
    return RBR_FIT_OK;
}

/* ------------------------------------------------------------------ AdamW (the released fitter) */

/* One pass over every pair at wfull.  With coef: per-row counts of the train pairs with t > 0 only
 * (the gradient); without: the totals of the train and validation pairs.  vid lists the validation
 * pair ids in increasing order. */
static void adam_pass(Ctx *c, const Prep *pr, const View *v, const double *wfull, double *S, double *G,
                      double *coef, double *part, const int64_t *vid, int64_t nvid, PassOut *tr, PassOut *va)
{
    int64_t gi, p = 0, vi = 0, nextval = nvid > 0 ? vid[0] : INT64_MAX;
    PassOut o[2];
    int j;

    memset(o, 0, sizeof(o));
    if (G)
        for (j = 0; j < pr->n; j++)
            G[j] = 0;
    else
        coef = NULL;
    for (gi = 0; gi < v->ng; gi++)
    {
        const int64_t g = v->g[gi], s = pr->gs[g], e = pr->gs[g + 1];
        int64_t pos, q;

        for (pos = s; pos < e; pos++)
            S[pos] = row_score(pr, wfull, pos);
        if (coef)
            for (pos = s; pos < e; pos++)
                coef[pos] = 0;
        for (pos = s; pos < e; pos++)
        {
            const int64_t q0 = pr->wst[pos];
            const double sa = S[pos], ma = pr->mb[pos] - sa;
            double cpos = 0;

            if (q0 >= e)
                break;
            if (coef)
            {
                for (q = q0; q < e; q++, p++)
                {
                    const double t = ma + S[q];

                    if (p == nextval)
                    {
                        nextval = ++vi < nvid ? vid[vi] : INT64_MAX;
                        continue;
                    }
                    if (t > 0)
                    {
                        cpos += 1;
                        coef[q] -= 1;
                    }
                }
                coef[pos] += cpos;
            }
            else
            {
                for (q = q0; q < e; q++, p++)
                {
                    const double t = ma + S[q];
                    PassOut *po = &o[0];

                    if (p == nextval)
                    {
                        nextval = ++vi < nvid ? vid[vi] : INT64_MAX;
                        po = &o[1];
                    }
                    po->npairs++;
                    if (t > 0)
                        po->hinge += t;
                    else
                        po->nzero++;
                    if (sa > S[q])
                        po->ncorrect++;
                }
            }
            ctx_work(c, e - q0);
        }
        if (coef)
            group_gradient(pr, s, e, coef, G, part);
        ctx_work(c, (e - s) / 4 + 1);
    }
    c->evals += p;
    *tr = o[0];
    *va = o[1];
}

/* The ADAMW solver: full-batch AdamW from zero on the mean hinge of the train pairs. */
static int solve_adamw(Ctx *c, const RbrFitData *data, const RbrFitOptions *o, RbrFitResult *r)
{
    Prep pr;
    View all;
    int64_t *vid;
    double *S, *coef, *w, *wfull, *m1, *m2, *G, *part;
    int64_t gi, p = 0, ntrain = 0, nval = 0, capv = 1024;
    PassOut tr, va;
    int rc, step, j;
    const double lerpw = 1.0 - o->beta1;

    if ((rc = prep_build(c, &pr, data, o, false)) != RBR_FIT_OK)
        return rc;
    if ((rc = view_build(c, &pr, &all, NULL, 2, 0)) != RBR_FIT_OK)
        return rc;
    if (!(vid = ctx_alloc(c, (size_t)capv, sizeof(int64_t))))
        return oom(c);
    for (gi = 0; gi < all.ng; gi++)
    {
        const int64_t g = all.g[gi], e = pr.gs[g + 1];
        int64_t pos, q;

        for (pos = pr.gs[g]; pos < e; pos++)
            for (q = pr.wst[pos]; q < e; q++, p++)
            {
                if (rbr_fit_pair_is_val(o->seed, pr.perm[pos], pr.perm[q], o->val_fraction))
                {
                    if (nval == capv)
                    {
                        int64_t *nv = ctx_alloc(c, (size_t)(2 * capv), sizeof(int64_t));

                        if (!nv)
                            return oom(c);
                        memcpy(nv, vid, (size_t)capv * sizeof(int64_t));
                        ctx_free(c, vid);
                        vid = nv;
                        capv *= 2;
                    }
                    vid[nval++] = p;
                }
                else
                    ntrain++;
            }
        ctx_work(c, pr.gpairs[g] + 1);
    }
    if (ntrain == 0)
        return fail(c, RBR_FIT_ENOPAIRS,
                    "no training pairs: groups need rows of at least two different tiers and val_fraction < 1",
                    RBR_NO_NUM, "");
    {
        const size_t N = (size_t)(pr.N > 0 ? pr.N : 1), n = (size_t)(pr.n > 0 ? pr.n : 1);

        if (!(S = ctx_alloc(c, N, sizeof(double))) || !(coef = ctx_alloc(c, N, sizeof(double))) ||
            !(w = ctx_alloc(c, n, sizeof(double))) || !(m1 = ctx_alloc(c, n, sizeof(double))) ||
            !(m2 = ctx_alloc(c, n, sizeof(double))) || !(G = ctx_alloc(c, n, sizeof(double))) ||
            !(part = ctx_alloc(c, n, sizeof(double))) ||
            !(wfull = ctx_alloc(c, (size_t)(pr.d > 0 ? pr.d : 1), sizeof(double))))
            return oom(c);
    }
    for (j = 0; j < pr.n; j++)
        w[j] = m1[j] = m2[j] = 0;
    for (step = 1; step <= o->steps; step++)
    {
        const double bc1 = 1.0 - pow(o->beta1, (double)step);
        const double bc2 = 1.0 - pow(o->beta2, (double)step);
        const double step_size = o->lr / bc1, bc2_sqrt = sqrt(bc2);

        expand_w(&pr, w, wfull);
        adam_pass(c, &pr, &all, wfull, S, G, coef, part, vid, nval, &tr, &va);
        for (j = 0; j < pr.n; j++)
        {
            const double grad = -G[j] / (double)ntrain;
            double denom;

            /* torch.optim.AdamW, single-tensor path (lerp as torch computes it) */
            w[j] *= 1.0 - o->lr * o->weight_decay;
            if (fabs(lerpw) < 0.5)
                m1[j] = m1[j] + lerpw * (grad - m1[j]);
            else
                m1[j] = grad - (grad - m1[j]) * (1.0 - lerpw);
            m2[j] = m2[j] * o->beta2 + (1.0 - o->beta2) * grad * grad;
            denom = sqrt(m2[j]) / bc2_sqrt + o->eps;
            w[j] += -step_size * (m1[j] / denom);
        }
    }
    expand_w(&pr, w, wfull);
    adam_pass(c, &pr, &all, wfull, S, NULL, NULL, NULL, vid, nval, &tr, &va);
    if (pr.d > 0)
        memcpy(r->w, wfull, (size_t)pr.d * sizeof(double));
    r->train_pairs = ntrain;
    r->val_pairs = nval;
    r->train_loss = tr.hinge / (double)tr.npairs;
    r->zero_loss_share = (double)tr.nzero / (double)tr.npairs;
    r->train_accuracy = (double)tr.ncorrect / (double)tr.npairs;
    r->val_loss = nval > 0 ? va.hinge / (double)va.npairs : NAN;
    r->val_accuracy = nval > 0 ? (double)va.ncorrect / (double)va.npairs : NAN;
    r->objective = r->train_loss + 0.5 * o->l2 * dotn(w, w, pr.n);
    r->iterations = o->steps;
    r->converged = true;
    r->gap = NAN;
    r->l2_used = o->l2;
    r->passes = (int64_t)o->steps + 1;
    r->pair_evaluations = c->evals;
    r->working_set_pairs = 0;
    return RBR_FIT_OK;
}

/* ------------------------------------------------------------------ entry points */

/* Reset the result's scalar fields (w is the caller's). */
static void result_reset(RbrFitResult *r)
{
    double *w = r->w;

    memset(r, 0, sizeof(*r));
    r->w = w;
    r->train_loss = r->val_loss = r->objective = r->zero_loss_share = NAN;
    r->train_accuracy = r->val_accuracy = r->gap = r->l2_used = NAN;
}

/* Fit the weights (see the header). */
int rbr_fit_solve(const RbrFitData *data, const RbrFitOptions *opts, const RbrFitAlloc *alloc,
                  RbrFitResult *result, char *errbuf, size_t errlen)
{
    return rbr_fit_solve_rows(data, NULL, opts, alloc, result, errbuf, errlen);
}

/* Fit the weights with the features of row i stored at row x_row[i] of data->x (see the header). */
int rbr_fit_solve_rows(const RbrFitData *data, const int64_t *x_row, const RbrFitOptions *opts,
                       const RbrFitAlloc *alloc, RbrFitResult *result, char *errbuf, size_t errlen)
{
    Ctx c;
    int rc;

    memset(&c, 0, sizeof(c));
    c.al = alloc;
    c.errbuf = errbuf;
    c.errlen = errlen;
    if (errbuf && errlen > 0)
        errbuf[0] = '\0';
    if (!alloc || !alloc->alloc || !alloc->free || !result)
        return fail(&c, RBR_FIT_EINVAL, "allocator and result must not be NULL", RBR_NO_NUM, "");
    result_reset(result);
    if ((rc = validate_common(&c, data, opts)) != RBR_FIT_OK || (rc = validate_solver(&c, opts)) != RBR_FIT_OK)
        return rc;
    if (x_row && data->d > 0)
    {
        int64_t i;

        for (i = 0; i < data->nrows; i++)
        {
            if (x_row[i] < 0 || x_row[i] >= data->nrows)
                return fail(&c, RBR_FIT_EINVAL, "x_row of row ", i, " is not a row of x");
            if ((i & 1023) == 0)
                ctx_work(&c, 1024);
        }
        c.xrow = x_row;
    }
    if (data->d > 0 && !result->w)
        return fail(&c, RBR_FIT_EINVAL, "result->w must not be NULL", RBR_NO_NUM, "");
    if (opts->solver == RBR_SOLVER_EXACT)
        rc = solve_exact(&c, data, opts, result);
    else
        rc = solve_adamw(&c, data, opts, result);
    ctx_free_all(&c);
    return rc;
}

/* Evaluate a given w with the EXACT split (see the header). */
int rbr_fit_evaluate(const RbrFitData *data, const RbrFitOptions *opts, const double *w,
                     const RbrFitAlloc *alloc, RbrFitResult *result, char *errbuf, size_t errlen)
{
    Ctx c;
    Prep pr;
    View tv;
    PassOut po;
    double *S;
    int rc, j;

    memset(&c, 0, sizeof(c));
    c.al = alloc;
    c.errbuf = errbuf;
    c.errlen = errlen;
    if (errbuf && errlen > 0)
        errbuf[0] = '\0';
    if (!alloc || !alloc->alloc || !alloc->free || !result)
        return fail(&c, RBR_FIT_EINVAL, "allocator and result must not be NULL", RBR_NO_NUM, "");
    result_reset(result);
    if ((rc = validate_common(&c, data, opts)) != RBR_FIT_OK)
        return rc;
    if (data->d > 0 && !w)
        return fail(&c, RBR_FIT_EINVAL, "w must not be NULL", RBR_NO_NUM, "");
    for (j = 0; j < data->d; j++)
        if (!isfinite(w[j]))
        {
            rc = fail(&c, RBR_FIT_EINVAL, "weight ", j, " is not finite");
            goto done;
        }
    if ((rc = prep_build(&c, &pr, data, opts, true)) != RBR_FIT_OK ||
        (rc = view_build(&c, &pr, &tv, NULL, 0, 0)) != RBR_FIT_OK)
        goto done;
    if (!(S = ctx_alloc(&c, (size_t)(pr.N > 0 ? pr.N : 1), sizeof(double))))
    {
        rc = oom(&c);
        goto done;
    }
    result->train_pairs = tv.npairs;
    if (tv.npairs > 0)
    {
        pass_run(&c, &pr, &tv, w, S, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &po);
        result->train_loss = po.hinge / (double)po.npairs;
        result->zero_loss_share = (double)po.nzero / (double)po.npairs;
        result->train_accuracy = (double)po.ncorrect / (double)po.npairs;
        result->objective = result->train_loss + 0.5 * opts->l2 * dotn(w, w, pr.d);
    }
    rc = fill_validation(&c, &pr, w, S, result);
    result->l2_used = opts->l2;
    result->pair_evaluations = c.evals;
done:
    ctx_free_all(&c);
    return rc;
}
