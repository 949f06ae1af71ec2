/*
 * fit_solver_test.c - unit tests of src/fit_solver.c (TAP output).
 *
 * The references are independent of the library: pairs are enumerated naively from the rows, the
 * l2 > 0 optimum is computed by dual coordinate ascent on the box-constrained dual (a different
 * route from the library's primal interior-point / working-set method) with its own duality gap,
 * the l2 = 0 optimum in two dimensions by enumerating the vertices of the hinge arrangement, and
 * AdamW by a direct transcription of torch.optim.AdamW over an explicit pair list.
 */
#include "fit_solver.h"

#include <math.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ TAP */

static int n_test = 0, n_fail = 0;

/* Report one test result. */
static void ok(int cond, const char *name)
{
    n_test++;
    if (!cond)
        n_fail++;
    printf("%s %d - %s\n", cond ? "ok" : "not ok", n_test, name);
    fflush(stdout);
}

/* A diagnostic line. */
static void diag(const char *s)
{
    printf("# %s\n", s);
}

/* ------------------------------------------------------------------ allocator with accounting */

typedef struct Arena
{
    long live, total;
    long fail_after; /* -1 = never fail */
    long checks;
    jmp_buf *jump;   /* longjmp out of check_interrupts when set */
    long jump_at;
} Arena;

/* Counting malloc for the library. */
static void *t_alloc(void *ctx, size_t n)
{
    Arena *a = ctx;
    size_t *p;

    if (a->fail_after >= 0 && a->total >= a->fail_after)
        return NULL;
    p = malloc(n + 16);
    if (!p)
        return NULL;
    a->live++;
    a->total++;
    p[0] = 0xabcdef;
    return (char *)p + 16;
}

/* Counting free for the library. */
static void t_free(void *ctx, void *q)
{
    Arena *a = ctx;
    size_t *p = (size_t *)((char *)q - 16);

    if (p[0] != 0xabcdef)
        abort();
    p[0] = 0;
    a->live--;
    free(p);
}

/* Interrupt callback: counts calls, optionally longjmps. */
static void t_check(void *ctx)
{
    Arena *a = ctx;

    a->checks++;
    if (a->jump && a->checks >= a->jump_at)
        longjmp(*a->jump, 1);
}

/* ------------------------------------------------------------------ random problems */

static uint64_t rs = 12345;

/* splitmix64 random bits. */
static uint64_t rnd(void)
{
    uint64_t z = (rs += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [0,1). */
static double unif(void)
{
    return (double)(rnd() >> 11) * 0x1.0p-53;
}

typedef struct Prob
{
    RbrFitData data;
    int d;
    int64_t nrows, ngroups;
    double *x, *base;
    int32_t *tier;
    int64_t *gs;
    bool *train;
} Prob;

/* A random problem: ngroups groups of 2..maxrows rows, tiers 0..ntier-1, features correlated with the
 * tier (strength sig), base rewards with noise. */
static void prob_make(Prob *p, int d, int64_t ngroups, int maxrows, int ntier, double sig, double val_share)
{
    int64_t g, r = 0, cap = ngroups * maxrows;
    double *dir = malloc(sizeof(double) * (size_t)(d > 0 ? d : 1));
    int j;

    memset(p, 0, sizeof(*p));
    p->d = d;
    p->ngroups = ngroups;
    p->x = malloc(sizeof(double) * (size_t)(cap * (d > 0 ? d : 1)));
    p->base = malloc(sizeof(double) * (size_t)cap);
    p->tier = malloc(sizeof(int32_t) * (size_t)cap);
    p->gs = malloc(sizeof(int64_t) * (size_t)(ngroups + 1));
    p->train = malloc(sizeof(bool) * (size_t)ngroups);
    for (j = 0; j < d; j++)
        dir[j] = unif() * 2 - 1;
    for (g = 0; g < ngroups; g++)
    {
        int nr = 2 + (int)(rnd() % (uint64_t)(maxrows - 1)), i;

        p->gs[g] = r;
        p->train[g] = unif() >= val_share;
        for (i = 0; i < nr; i++, r++)
        {
            int t = (int)(rnd() % (uint64_t)ntier);

            p->tier[r] = t;
            for (j = 0; j < d; j++)
            {
                double v = 0.5 + sig * dir[j] * (ntier - 1 - 2 * t) / (double)(ntier > 1 ? ntier : 1) +
                           0.3 * (unif() - 0.5);

                p->x[r * d + j] = v < 0 ? 0 : (v > 1 ? 1 : v);
            }
            p->base[r] = 0.3 * (unif() - 0.5) + 0.2 * (ntier - t);
        }
    }
    p->gs[ngroups] = r;
    p->nrows = r;
    p->data.d = d;
    p->data.nrows = r;
    p->data.x = p->x;
    p->data.base = p->base;
    p->data.tier = p->tier;
    p->data.ngroups = ngroups;
    p->data.group_start = p->gs;
    p->data.group_is_train = p->train;
    free(dir);
}

/* Release a problem. */
static void prob_free(Prob *p)
{
    free(p->x);
    free(p->base);
    free(p->tier);
    free(p->gs);
    free(p->train);
}

/* ------------------------------------------------------------------ naive pair list */

typedef struct Pairs
{
    int64_t n;
    int nf;        /* free features */
    double *z, *b; /* n x nf, n */
    int64_t *a, *bw; /* row indices */
} Pairs;

/* Enumerate the train pairs of the groups selected (all when train_only is false) naively. */
static void pairs_make(Pairs *P, const Prob *p, const RbrFitOptions *o, bool train_only)
{
    int64_t g, cap = 0, k = 0;
    int j, f;

    for (g = 0; g < p->ngroups; g++)
    {
        int64_t len = p->gs[g + 1] - p->gs[g];

        cap += len * len;
    }
    P->nf = 0;
    for (j = 0; j < p->d; j++)
        if (!o->fixed_zero || !o->fixed_zero[j])
            P->nf++;
    P->z = malloc(sizeof(double) * (size_t)((cap > 0 ? cap : 1) * (P->nf > 0 ? P->nf : 1)));
    P->b = malloc(sizeof(double) * (size_t)(cap > 0 ? cap : 1));
    P->a = malloc(sizeof(int64_t) * (size_t)(cap > 0 ? cap : 1));
    P->bw = malloc(sizeof(int64_t) * (size_t)(cap > 0 ? cap : 1));
    for (g = 0; g < p->ngroups; g++)
    {
        int64_t i, l;

        if (train_only && !p->train[g])
            continue;
        for (i = p->gs[g]; i < p->gs[g + 1]; i++)
            for (l = p->gs[g]; l < p->gs[g + 1]; l++)
            {
                double m = o->margin;

                if (!(p->tier[i] < p->tier[l]))
                    continue;
                if (p->tier[i] >= 0 && p->tier[i] < o->n_tier_margin && !isnan(o->tier_margin[p->tier[i]]))
                    m = o->tier_margin[p->tier[i]];
                f = 0;
                for (j = 0; j < p->d; j++)
                    if (!o->fixed_zero || !o->fixed_zero[j])
                        P->z[k * P->nf + f++] = p->x[i * p->d + j] - p->x[l * p->d + j];
                P->b[k] = m - (p->base[i] - p->base[l]);
                P->a[k] = i;
                P->bw[k] = l;
                k++;
            }
    }
    P->n = k;
}

/* Release a pair list. */
static void pairs_free(Pairs *P)
{
    free(P->z);
    free(P->b);
    free(P->a);
    free(P->bw);
}

/* P * objective at free weights w: sum of hinges + (rho/2)|w|^2. */
static double ref_F(const Pairs *P, const double *w, double rho)
{
    double s = 0, n2 = 0;
    int64_t k;
    int j;

    for (k = 0; k < P->n; k++)
    {
        double t = P->b[k];

        for (j = 0; j < P->nf; j++)
            t -= P->z[k * P->nf + j] * w[j];
        if (t > 0)
            s += t;
    }
    for (j = 0; j < P->nf; j++)
        n2 += w[j] * w[j];
    return s + 0.5 * rho * n2;
}

/*
 * Reference for l2 > 0: dual coordinate ascent on  max_{alpha in [0,1]^n} sum alpha b - |sum alpha z|^2/(2 rho).
 * Returns the primal w = sum alpha z / rho (free coordinates), the dual value in *dual.
 */
static void ref_dca(const Pairs *P, double rho, double *w, double *dual)
{
    const int nf = P->nf;
    double *al = calloc((size_t)(P->n > 0 ? P->n : 1), sizeof(double));
    double *v = calloc((size_t)(nf > 0 ? nf : 1), sizeof(double));
    double ab = 0, vv = 0;
    int64_t k, sweep;
    int j;

    for (sweep = 0; sweep < 100000; sweep++)
    {
        double maxch = 0;

        if (sweep % 20 == 19)
        {
            /* stop once the duality gap of the reference itself is negligible */
            double ab2 = 0, vv2 = 0, Fp;

            for (j = 0; j < nf; j++)
            {
                w[j] = v[j] / rho;
                vv2 += v[j] * v[j];
            }
            for (k = 0; k < P->n; k++)
                ab2 += al[k] * P->b[k];
            Fp = ref_F(P, w, rho);
            if (Fp - (ab2 - vv2 / (2 * rho)) <= 1e-13 * fabs(Fp))
                break;
        }

        for (k = 0; k < P->n; k++)
        {
            const double *z = P->z + k * nf;
            double zz = 0, zv = 0, na, ch;

            for (j = 0; j < nf; j++)
            {
                zz += z[j] * z[j];
                zv += z[j] * v[j];
            }
            if (zz == 0)
                na = P->b[k] > 0 ? 1 : 0;
            else
                na = al[k] + rho * (P->b[k] - zv / rho) / zz;
            na = na < 0 ? 0 : (na > 1 ? 1 : na);
            ch = na - al[k];
            if (ch != 0)
            {
                for (j = 0; j < nf; j++)
                    v[j] += ch * z[j];
                al[k] = na;
            }
            if (fabs(ch) > maxch)
                maxch = fabs(ch);
        }
        if (maxch < 1e-15)
            break;
    }
    /* recompute v exactly */
    for (j = 0; j < nf; j++)
        v[j] = 0;
    for (k = 0; k < P->n; k++)
    {
        for (j = 0; j < nf; j++)
            v[j] += al[k] * P->z[k * nf + j];
        ab += al[k] * P->b[k];
    }
    for (j = 0; j < nf; j++)
    {
        w[j] = v[j] / rho;
        vv += v[j] * v[j];
    }
    *dual = ab - vv / (2 * rho);
    free(al);
    free(v);
}

/* Independent optimality check: the directional derivative of P*F at w along v must be >= -eps for all v;
 * pairs with |t| <= kink count as at the kink. Checks coordinate and random directions; returns the
 * most negative derivative found, scaled by the norm of v. */
static double ref_min_dirderiv(const Pairs *P, const double *w, double rho, double kink, int ndir)
{
    const int nf = P->nf;
    double *v = malloc(sizeof(double) * (size_t)(nf > 0 ? nf : 1));
    double worst = INFINITY;
    int dir, j;

    for (dir = 0; dir < 2 * nf + ndir; dir++)
    {
        double dd = 0, nv = 0;
        int64_t k;

        for (j = 0; j < nf; j++)
            v[j] = dir < 2 * nf ? (j == dir / 2 ? (dir % 2 ? -1.0 : 1.0) : 0.0) : 2 * unif() - 1;
        for (j = 0; j < nf; j++)
        {
            dd += rho * w[j] * v[j];
            nv += v[j] * v[j];
        }
        for (k = 0; k < P->n; k++)
        {
            double t = P->b[k], zv = 0;

            for (j = 0; j < nf; j++)
            {
                t -= P->z[k * nf + j] * w[j];
                zv += P->z[k * nf + j] * v[j];
            }
            if (t > kink)
                dd -= zv;
            else if (t >= -kink)
                dd += zv < 0 ? -zv : 0;
        }
        dd /= sqrt(nv);
        if (dd < worst)
            worst = dd;
    }
    free(v);
    return worst;
}

/* Free weights of a full w. */
static void free_w(const double *wfull, int d, const bool *fixed, double *wf)
{
    int j, f = 0;

    for (j = 0; j < d; j++)
        if (!fixed || !fixed[j])
            wf[f++] = wfull[j];
}

/* ------------------------------------------------------------------ helpers */

static Arena arena;
static RbrFitAlloc AL = {&arena, t_alloc, t_free, t_check};
static char errbuf[256];

/* Reset the accounting arena. */
static void arena_reset(void)
{
    memset(&arena, 0, sizeof(arena));
    arena.fail_after = -1;
}

/* Solve p with options o into res (w of size d); returns the code. */
static int solve(const Prob *p, const RbrFitOptions *o, RbrFitResult *res, double *w)
{
    memset(res, 0, sizeof(*res));
    res->w = w;
    return rbr_fit_solve(&p->data, o, &AL, res, errbuf, sizeof(errbuf));
}

/* Compare the exact solver with the dual reference on p; returns a pass flag and prints details. */
static bool check_vs_reference(const Prob *p, const RbrFitOptions *o, const char *what)
{
    RbrFitResult res;
    Pairs P;
    double w[64] = {0}, wf[64] = {0}, wr[64] = {0}, dual, Fx, Fr, rho, worst, wdiff = 0;
    int rc, j;
    char line[512];
    bool good;

    arena_reset();
    rc = solve(p, o, &res, w);
    pairs_make(&P, p, o, true);
    rho = (double)P.n * o->l2;
    ref_dca(&P, rho, wr, &dual);
    free_w(w, p->d, o->fixed_zero, wf);
    Fx = ref_F(&P, wf, rho);
    Fr = ref_F(&P, wr, rho);
    worst = ref_min_dirderiv(&P, wf, rho, 1e-6, 200);
    for (j = 0; j < P.nf; j++)
        wdiff = fmax(wdiff, fabs(wf[j] - wr[j]));
    good = rc == RBR_FIT_OK && res.converged && arena.live == 0 &&
           /* the library's objective is what the reference computes */
           fabs(res.objective - Fx / (double)P.n) <= 1e-12 * (1 + Fx / (double)P.n) &&
           /* not worse than the reference primal, not below the reference dual bound */
           Fx <= Fr + 1e-9 * (1 + fabs(Fr)) && Fx >= dual - 1e-9 * (1 + fabs(dual)) &&
           /* its own certificate is honest: F(w) - F* <= gap, and F* <= Fr */
           Fx / (double)P.n - res.gap <= Fr / (double)P.n + 1e-12 &&
           res.gap <= o->tol * res.objective && worst >= -1e-6 * (1 + Fx) && wdiff <= 1e-5 * (1 + fabs(wr[0]));
    snprintf(line, sizeof(line),
             "%s: rc=%d pairs=%lld obj=%.15g ref=%.15g dual=%.15g gap=%.3g dirderiv=%.3g |dw|=%.3g passes=%lld live=%ld",
             what, rc, (long long)P.n, Fx / (double)P.n, Fr / (double)P.n, dual / (double)P.n, res.gap, worst,
             wdiff, (long long)res.passes, arena.live);
    if (!good)
        diag(line);
    pairs_free(&P);
    return good;
}

/* ------------------------------------------------------------------ tests */

/* Defaults as documented. */
static void test_defaults(void)
{
    RbrFitOptions o;

    rbr_fit_options_default(&o);
    ok(o.solver == RBR_SOLVER_EXACT && o.margin == 1 && o.l2 == 1e-6 && o.tol == 1e-9 && o.lr == 0.01 &&
           o.steps == 1000 && o.weight_decay == 0.05 && o.beta1 == 0.9 && o.beta2 == 0.999 && o.eps == 1e-8 &&
           o.val_fraction == 0.05 && o.l2_tiebreak > 0,
       "defaults");
}

/* Exact solver against the dual reference on small random problems (base path). */
static void test_random_small(void)
{
    RbrFitOptions o;
    int s, good = 0;

    rbr_fit_options_default(&o);
    for (s = 0; s < 12; s++)
    {
        Prob p;
        char what[64];

        rs = 1000 + (uint64_t)s;
        prob_make(&p, 2 + s % 5, 6 + s * 3, 6, 2 + s % 3, 0.15 + 0.05 * (s % 4), 0.2);
        o.l2 = s % 3 == 0 ? 0.1 : (s % 3 == 1 ? 0.01 : 0.001);
        snprintf(what, sizeof(what), "small seed %d", s);
        good += check_vs_reference(&p, &o, what);
        prob_free(&p);
    }
    ok(good == 12, "exact = dual coordinate ascent reference on 12 small random problems (objective, w, KKT)");
}

/* Exact solver through the multi-level working-set path (tiny working set) against the reference. */
static void test_random_working_set(void)
{
    RbrFitOptions o;
    int s, good = 0;

    rbr_fit_options_default(&o);
    for (s = 0; s < 4; s++)
    {
        Prob p;
        char what[64];

        rs = 2000 + (uint64_t)s;
        prob_make(&p, 4 + s, 150 + 50 * s, 9, 3, 0.12, 0.1);
        o.l2 = s % 2 ? 0.01 : 0.003;
        o.working_set = 24 + 40 * s;
        snprintf(what, sizeof(what), "working set seed %d", s);
        good += check_vs_reference(&p, &o, what);
        prob_free(&p);
    }
    ok(good == 4, "exact (working-set levels, tiny working set) = reference on 4 problems of 1.5k-4k pairs");
}

/* Same input twice: bitwise the same w, and all memory returned. */
static void test_determinism(void)
{
    RbrFitOptions o;
    RbrFitResult r1, r2;
    double w1[8], w2[8];
    Prob p;
    int rc1, rc2;

    rbr_fit_options_default(&o);
    o.working_set = 40;
    rs = 77;
    prob_make(&p, 6, 400, 9, 3, 0.1, 0.1);
    arena_reset();
    rc1 = solve(&p, &o, &r1, w1);
    rc2 = solve(&p, &o, &r2, w2);
    ok(rc1 == 0 && rc2 == 0 && memcmp(w1, w2, sizeof(double) * 6) == 0 && r1.passes == r2.passes &&
           r1.gap == r2.gap && arena.live == 0,
       "determinism: same input twice gives bitwise the same w (working-set path)");
    o.working_set = 0;
    rc1 = solve(&p, &o, &r1, w1);
    rc2 = solve(&p, &o, &r2, w2);
    ok(rc1 == 0 && rc2 == 0 && memcmp(w1, w2, sizeof(double) * 6) == 0 && arena.live == 0,
       "determinism: same input twice gives bitwise the same w (base path)");
    prob_free(&p);
}

/* rbr_fit_solve_rows: features stored in another order, mapped per row, give bitwise the same fit
 * (exact and AdamW); a map entry outside the rows is refused. */
static void test_solve_rows(void)
{
    RbrFitOptions o;
    RbrFitResult r1, r2;
    double w1[8], w2[8];
    Prob p;
    RbrFitData data;
    double *xs;
    int64_t *map, i, n;
    int rc1, rc2, good = 0, k;
    const int d = 6;

    rs = 91;
    prob_make(&p, d, 300, 9, 3, 0.1, 0.1);
    n = p.nrows;
    xs = malloc(sizeof(double) * (size_t)(n * d));
    map = malloc(sizeof(int64_t) * (size_t)n);
    /* storage row of row i: a fixed odd-stride permutation */
    for (i = 0; i < n; i++)
        map[i] = (i * 7919) % n;
    for (i = 0; i < n; i++)
        memcpy(xs + map[i] * d, p.x + i * d, sizeof(double) * d);
    data = p.data;
    data.x = xs;
    arena_reset();
    for (k = 0; k < 2; k++)
    {
        rbr_fit_options_default(&o);
        o.solver = k == 0 ? RBR_SOLVER_EXACT : RBR_SOLVER_ADAMW;
        o.steps = 50;
        memset(&r1, 0, sizeof(r1));
        memset(&r2, 0, sizeof(r2));
        r1.w = w1;
        r2.w = w2;
        rc1 = rbr_fit_solve(&p.data, &o, &AL, &r1, errbuf, sizeof(errbuf));
        rc2 = rbr_fit_solve_rows(&data, map, &o, &AL, &r2, errbuf, sizeof(errbuf));
        good += rc1 == 0 && rc2 == 0 && memcmp(w1, w2, sizeof(double) * d) == 0 && r1.passes == r2.passes &&
                r1.train_pairs == r2.train_pairs && r1.val_pairs == r2.val_pairs;
    }
    ok(good == 2 && arena.live == 0, "rbr_fit_solve_rows: mapped feature rows give bitwise the fit of the copied rows");
    map[n / 2] = n;
    memset(&r2, 0, sizeof(r2));
    r2.w = w2;
    rc2 = rbr_fit_solve_rows(&data, map, &o, &AL, &r2, errbuf, sizeof(errbuf));
    ok(rc2 == RBR_FIT_EINVAL && arena.live == 0 && strlen(errbuf) > 0, "rbr_fit_solve_rows: a map entry outside the rows is RBR_FIT_EINVAL");
    free(xs);
    free(map);
    prob_free(&p);
}

/* fixed_zero: exactly zero, and the optimum of the reduced problem. */
static void test_fixed_zero(void)
{
    RbrFitOptions o;
    RbrFitResult r;
    bool fixed[5] = {false, true, false, false, true};
    double w[5];
    Prob p;
    int rc;

    rbr_fit_options_default(&o);
    o.l2 = 0.01;
    o.fixed_zero = fixed;
    rs = 99;
    prob_make(&p, 5, 40, 6, 3, 0.2, 0.0);
    arena_reset();
    rc = solve(&p, &o, &r, w);
    ok(rc == 0 && w[1] == 0.0 && w[4] == 0.0 && w[0] != 0.0, "fixed_zero features are exactly zero");
    ok(check_vs_reference(&p, &o, "fixed_zero"), "fixed_zero: optimum of the reduced problem (reference)");
    o.working_set = 16;
    ok(check_vs_reference(&p, &o, "fixed_zero ws"), "fixed_zero on the working-set path");
    prob_free(&p);
}

/* Per-tier margins: the reference with per-pair margins agrees, and they change the solution. */
static void test_tier_margins(void)
{
    RbrFitOptions o;
    RbrFitResult r1, r2;
    double tm[3] = {2.5, NAN, 0.25}, w1[4], w2[4];
    Prob p;
    int rc1, rc2;

    rbr_fit_options_default(&o);
    o.l2 = 0.01;
    rs = 4242;
    prob_make(&p, 4, 50, 7, 3, 0.2, 0.0);
    arena_reset();
    rc1 = solve(&p, &o, &r1, w1);
    o.n_tier_margin = 3;
    o.tier_margin = tm;
    rc2 = solve(&p, &o, &r2, w2);
    ok(rc1 == 0 && rc2 == 0 && fabs(w1[0] - w2[0]) + fabs(w1[1] - w2[1]) > 1e-3, "per-tier margins change the fit");
    ok(check_vs_reference(&p, &o, "tier margins"), "per-tier margins: optimum with per-pair margins (reference)");
    o.working_set = 16;
    ok(check_vs_reference(&p, &o, "tier margins ws"), "per-tier margins on the working-set path");
    prob_free(&p);
}

/* Separable data with l2 = 0: terminates with zero loss; the tie-breaker is reported. */
static void test_separable_l2_zero(void)
{
    RbrFitOptions o;
    RbrFitResult r;
    double w[3];
    Prob p;
    int64_t i;
    int rc;

    rbr_fit_options_default(&o);
    o.l2 = 0;
    rs = 5;
    prob_make(&p, 3, 60, 6, 3, 0.0, 0.0);
    for (i = 0; i < p.nrows; i++)
    {
        p.x[i * 3 + 0] = 1.0 - 0.4 * p.tier[i] - 0.05 * unif(); /* feature 0 separates the tiers */
        p.base[i] = unif();
    }
    arena_reset();
    rc = solve(&p, &o, &r, w);
    ok(rc == 0 && r.converged && r.train_loss <= 1e-9 && r.train_accuracy == 1.0 && r.l2_used == o.l2_tiebreak &&
           isfinite(w[0]) && fabs(w[0]) < 1e4 && arena.live == 0,
       "separable data with l2 = 0 terminates: zero loss, accuracy 1, finite w, tie-breaker reported");
    o.working_set = 8;
    rc = solve(&p, &o, &r, w);
    ok(rc == 0 && r.converged && r.train_loss <= 1e-9, "separable data with l2 = 0 on the working-set path");
    prob_free(&p);
}

/* l2 = 0 in two dimensions: the hinge optimum equals the best vertex of the arrangement. */
static void test_l2_zero_vertices(void)
{
    RbrFitOptions o;
    int s, good = 0;

    rbr_fit_options_default(&o);
    o.l2 = 0;
    for (s = 0; s < 6; s++)
    {
        RbrFitResult r;
        Pairs P;
        Prob p;
        double w[2], best = INFINITY;
        int64_t i, k;
        int rc;

        rs = 3000 + (uint64_t)s;
        prob_make(&p, 2, 8 + 2 * s, 5, 3, 0.1, 0.0);
        pairs_make(&P, &p, &o, true);
        for (i = 0; i < P.n; i++)
            for (k = i + 1; k < P.n; k++)
            {
                const double *a = P.z + 2 * i, *b = P.z + 2 * k;
                double det = a[0] * b[1] - a[1] * b[0], v[2];

                if (fabs(det) < 1e-12)
                    continue;
                v[0] = (P.b[i] * b[1] - a[1] * P.b[k]) / det;
                v[1] = (a[0] * P.b[k] - P.b[i] * b[0]) / det;
                best = fmin(best, ref_F(&P, v, 0));
            }
        arena_reset();
        rc = solve(&p, &o, &r, w);
        if (rc == 0 && r.converged && r.train_loss * (double)P.n <= best + 1e-6 * (1 + best) &&
            r.train_loss * (double)P.n >= best - 1e-9 * (1 + best))
            good++;
        else
        {
            char line[200];

            snprintf(line, sizeof(line), "l2=0 seed %d: rc=%d hinge=%.12g vertex best=%.12g", s, rc,
                     r.train_loss * (double)P.n, best);
            diag(line);
        }
        pairs_free(&P);
        prob_free(&p);
    }
    ok(good == 6, "l2 = 0: hinge optimum = best vertex of the hinge arrangement (d = 2, 6 problems)");
}

/* Errors: no pairs, bad input; nothing leaks. */
static void test_errors(void)
{
    RbrFitOptions o;
    RbrFitResult r;
    double w[3];
    Prob p;
    int64_t i;
    int rc;

    rbr_fit_options_default(&o);
    rs = 8;
    prob_make(&p, 3, 10, 5, 3, 0.1, 0.0);
    for (i = 0; i < p.nrows; i++)
        p.tier[i] = 1;
    arena_reset();
    rc = solve(&p, &o, &r, w);
    ok(rc == RBR_FIT_ENOPAIRS && arena.live == 0 && strlen(errbuf) > 0, "one tier per group: RBR_FIT_ENOPAIRS");
    o.solver = RBR_SOLVER_ADAMW;
    rc = solve(&p, &o, &r, w);
    ok(rc == RBR_FIT_ENOPAIRS && arena.live == 0, "one tier per group (AdamW): RBR_FIT_ENOPAIRS");
    o.solver = RBR_SOLVER_EXACT;
    for (i = 0; i < p.nrows; i++)
        p.tier[i] = (int32_t)(i % 3);
    for (i = 0; i < p.ngroups; i++)
        p.train[i] = false;
    rc = solve(&p, &o, &r, w);
    ok(rc == RBR_FIT_ENOPAIRS && arena.live == 0, "no training group: RBR_FIT_ENOPAIRS");
    {
        Prob e;

        memset(&e, 0, sizeof(e));
        e.data.d = 3;
        e.data.group_start = NULL;
        rc = solve(&e, &o, &r, w);
        ok(rc == RBR_FIT_ENOPAIRS && arena.live == 0, "empty data: RBR_FIT_ENOPAIRS");
    }
    for (i = 0; i < p.ngroups; i++)
        p.train[i] = true;
    p.x[4] = NAN;
    rc = solve(&p, &o, &r, w);
    ok(rc == RBR_FIT_EINVAL && arena.live == 0, "NaN feature: RBR_FIT_EINVAL");
    p.x[4] = 0.5;
    p.base[2] = INFINITY;
    rc = solve(&p, &o, &r, w);
    ok(rc == RBR_FIT_EINVAL, "infinite base reward: RBR_FIT_EINVAL");
    p.base[2] = 0.5;
    p.gs[3] = p.gs[2] - 1;
    rc = solve(&p, &o, &r, w);
    ok(rc == RBR_FIT_EINVAL, "decreasing group offsets: RBR_FIT_EINVAL");
    p.gs[3] = p.gs[2];
    o.margin = -1;
    rc = solve(&p, &o, &r, w);
    ok(rc == RBR_FIT_EINVAL, "negative margin: RBR_FIT_EINVAL");
    o.margin = 1;
    o.l2 = NAN;
    rc = solve(&p, &o, &r, w);
    ok(rc == RBR_FIT_EINVAL, "NaN l2: RBR_FIT_EINVAL");
    prob_free(&p);
}

/* Degenerate inputs: every feature fixed, duplicate rows and pairs with z = 0. */
static void test_degenerate(void)
{
    RbrFitOptions o;
    RbrFitResult r;
    bool fixed[3] = {true, true, true};
    double w[3];
    Prob p;
    int64_t i;
    int rc;

    rbr_fit_options_default(&o);
    rs = 31;
    prob_make(&p, 3, 20, 6, 3, 0.2, 0.0);
    o.fixed_zero = fixed;
    arena_reset();
    rc = solve(&p, &o, &r, w);
    {
        Pairs P;

        pairs_make(&P, &p, &o, true);
        ok(rc == 0 && r.converged && w[0] == 0 && w[1] == 0 && w[2] == 0 && r.gap == 0 &&
               fabs(r.train_loss - ref_F(&P, w, 0) / (double)P.n) < 1e-12,
           "every feature fixed: w = 0, objective = hinge at 0");
        pairs_free(&P);
    }
    o.fixed_zero = NULL;
    o.l2 = 0.01;
    /* duplicate the first row of every group into the second, and give half the groups equal x */
    for (i = 0; i < p.ngroups; i++)
    {
        int64_t a = p.gs[i];
        int j;

        for (j = 0; j < 3; j++)
            p.x[(a + 1) * 3 + j] = p.x[a * 3 + j];
        if (i % 2)
            for (a = p.gs[i]; a < p.gs[i + 1]; a++)
                for (j = 0; j < 3; j++)
                    p.x[a * 3 + j] = 0.5;
    }
    ok(check_vs_reference(&p, &o, "duplicates"), "duplicate rows and pairs with z = 0: optimum (reference)");
    o.working_set = 8;
    ok(check_vs_reference(&p, &o, "duplicates ws"), "duplicate rows and z = 0 pairs on the working-set path");
    prob_free(&p);
}

/* AdamW, straightforwardly: explicit pair list, torch.optim.AdamW formulas. */
static void ref_adamw(const Prob *p, const RbrFitOptions *o, int steps, double *w)
{
    Pairs P;
    int64_t k, ntr = 0;
    double m1[16] = {0}, m2[16] = {0}, g[16];
    bool *isval;
    int st, j;

    pairs_make(&P, p, o, false);
    isval = malloc(sizeof(bool) * (size_t)(P.n > 0 ? P.n : 1));
    for (k = 0; k < P.n; k++)
    {
        isval[k] = rbr_fit_pair_is_val(o->seed, P.a[k], P.bw[k], o->val_fraction);
        ntr += !isval[k];
    }
    for (j = 0; j < P.nf; j++)
        w[j] = 0;
    for (st = 1; st <= steps; st++)
    {
        double bc1 = 1 - pow(o->beta1, st), bc2 = 1 - pow(o->beta2, st);

        for (j = 0; j < P.nf; j++)
            g[j] = 0;
        for (k = 0; k < P.n; k++)
        {
            double t = P.b[k];

            if (isval[k])
                continue;
            for (j = 0; j < P.nf; j++)
                t -= P.z[k * P.nf + j] * w[j];
            if (t > 0) /* relu'(0) = 0 */
                for (j = 0; j < P.nf; j++)
                    g[j] -= P.z[k * P.nf + j] / (double)ntr;
        }
        for (j = 0; j < P.nf; j++)
        {
            w[j] *= 1 - o->lr * o->weight_decay;
            m1[j] = o->beta1 * m1[j] + (1 - o->beta1) * g[j];
            m2[j] = o->beta2 * m2[j] + (1 - o->beta2) * g[j] * g[j];
            w[j] -= (o->lr / bc1) * m1[j] / (sqrt(m2[j]) / sqrt(bc2) + o->eps);
        }
    }
    free(isval);
    pairs_free(&P);
}

/* AdamW matches the reference step by step; its split and counts are right. */
static void test_adamw(void)
{
    RbrFitOptions o;
    RbrFitResult r;
    Prob p;
    int steps[6] = {1, 2, 3, 10, 100, 1000}, s, good = 0;
    double w[4], wr[4], worst = 0;
    char line[160];

    rbr_fit_options_default(&o);
    o.solver = RBR_SOLVER_ADAMW;
    o.val_fraction = 0.3;
    o.seed = 17;
    o.l2 = 0;
    rs = 555;
    prob_make(&p, 4, 30, 6, 3, 0.1, 0.0);
    arena_reset();
    for (s = 0; s < 6; s++)
    {
        int j, rc;
        double diff = 0;

        o.steps = steps[s];
        rc = solve(&p, &o, &r, w);
        ref_adamw(&p, &o, steps[s], wr);
        for (j = 0; j < 4; j++)
            diff = fmax(diff, fabs(w[j] - wr[j]));
        worst = fmax(worst, diff);
        good += rc == 0 && diff <= 1e-10 && r.iterations == steps[s];
    }
    snprintf(line, sizeof(line), "AdamW vs reference: worst |dw| %.3g over 1..1000 steps", worst);
    diag(line);
    ok(good == 6 && arena.live == 0, "AdamW = straightforward torch.optim.AdamW transcription after 1, 2, 3, 10, 100, 1000 steps");
    {
        Pairs P;
        int64_t k, nv = 0;

        pairs_make(&P, &p, &o, false);
        for (k = 0; k < P.n; k++)
            nv += rbr_fit_pair_is_val(o.seed, P.a[k], P.bw[k], o.val_fraction);
        ok(r.val_pairs == nv && r.train_pairs == P.n - nv && nv > 0 && nv < P.n,
           "AdamW splits pairs by rbr_fit_pair_is_val (train/validation counts)");
        pairs_free(&P);
    }
    prob_free(&p);
}

/* The exact objective is never above AdamW's on the same pairs. */
static void test_exact_beats_adamw(void)
{
    RbrFitOptions o;
    RbrFitResult re, ra, ev;
    Prob p;
    double we[6], wa[6];
    int rc1, rc2, rc3, s, good = 0;

    for (s = 0; s < 3; s++)
    {
        rbr_fit_options_default(&o);
        o.l2 = s == 0 ? 1e-6 : (s == 1 ? 0.0 : 1e-3);
        rs = 600 + (uint64_t)s;
        prob_make(&p, 6, 200, 8, 3, 0.1, 0.0);
        arena_reset();
        rc1 = solve(&p, &o, &re, we);
        o.solver = RBR_SOLVER_ADAMW;
        o.val_fraction = 0;
        rc2 = solve(&p, &o, &ra, wa);
        o.solver = RBR_SOLVER_EXACT;
        memset(&ev, 0, sizeof(ev));
        rc3 = rbr_fit_evaluate(&p.data, &o, wa, &AL, &ev, errbuf, sizeof(errbuf));
        good += rc1 == 0 && rc2 == 0 && rc3 == 0 && re.objective <= ev.objective + 1e-12 &&
                ra.train_pairs == re.train_pairs && fabs(ra.train_loss - ev.train_loss) < 1e-12;
        prob_free(&p);
    }
    ok(good == 3 && arena.live == 0, "exact objective <= AdamW objective on the same pairs (3 problems, l2 1e-6/0/1e-3)");
}

/* rbr_fit_evaluate agrees with the solver's own figures. */
static void test_evaluate(void)
{
    RbrFitOptions o;
    RbrFitResult r, ev;
    Prob p;
    double w[5];
    int rc1, rc2;

    rbr_fit_options_default(&o);
    rs = 909;
    prob_make(&p, 5, 80, 7, 3, 0.1, 0.3);
    arena_reset();
    rc1 = solve(&p, &o, &r, w);
    memset(&ev, 0, sizeof(ev));
    rc2 = rbr_fit_evaluate(&p.data, &o, w, &AL, &ev, errbuf, sizeof(errbuf));
    ok(rc1 == 0 && rc2 == 0 && fabs(ev.objective - r.objective) < 1e-12 && ev.val_pairs == r.val_pairs &&
           ev.val_pairs > 0 && fabs(ev.val_accuracy - r.val_accuracy) < 1e-15 &&
           fabs(ev.train_accuracy - r.train_accuracy) < 1e-15 && fabs(ev.val_loss - r.val_loss) < 1e-12 &&
           arena.live == 0,
       "rbr_fit_evaluate reproduces the solver's losses and accuracies (train and validation groups)");
    prob_free(&p);
}

/* Accuracies and losses against an independent count, with many exact score ties (ties are wrong). */
static void test_ties(void)
{
    RbrFitOptions o;
    RbrFitResult ev;
    Prob p;
    Pairs P;
    double w[3] = {0.5, 0, -0.5}, hinge = 0;
    int64_t i, k, correct = 0, zero = 0;
    int rc;

    rbr_fit_options_default(&o);
    rs = 4711;
    prob_make(&p, 3, 60, 8, 3, 0.2, 0.0);
    for (i = 0; i < p.nrows; i++)
    {
        p.base[i] = 0.5 * (double)(rnd() % 3); /* coarse rewards: many ties */
        p.x[i * 3 + 0] = (double)(rnd() % 2);
        p.x[i * 3 + 2] = p.x[i * 3 + 0];
    }
    pairs_make(&P, &p, &o, true);
    for (k = 0; k < P.n; k++)
    {
        double sa = p.base[P.a[k]], sb = p.base[P.bw[k]], t;
        int j;

        for (j = 0; j < 3; j++)
        {
            sa += w[j] * p.x[P.a[k] * 3 + j];
            sb += w[j] * p.x[P.bw[k] * 3 + j];
        }
        t = 1 - (sa - sb);
        correct += sa > sb;
        zero += t <= 0;
        hinge += t > 0 ? t : 0;
    }
    arena_reset();
    memset(&ev, 0, sizeof(ev));
    rc = rbr_fit_evaluate(&p.data, &o, w, &AL, &ev, errbuf, sizeof(errbuf));
    ok(rc == 0 && ev.train_pairs == P.n && ev.train_accuracy == (double)correct / (double)P.n &&
           ev.zero_loss_share == (double)zero / (double)P.n && fabs(ev.train_loss - hinge / (double)P.n) < 1e-14 &&
           correct < P.n && arena.live == 0,
       "accuracy counts s_a > s_b strictly (ties are wrong), zero-loss share and loss match an independent count");
    pairs_free(&P);
    prob_free(&p);
}

/* Interrupt callback is called; a longjmp out of it is survivable (memory owned by the allocator);
 * allocation failures are reported without leaks. */
static void test_callbacks(void)
{
    RbrFitOptions o;
    RbrFitResult r;
    Prob p;
    double w[6];
    jmp_buf jb;
    long n, total;
    volatile long fails = 0, leaks = 0;
    int rc;

    rbr_fit_options_default(&o);
    o.working_set = 32;
    rs = 1234;
    prob_make(&p, 6, 3000, 10, 3, 0.1, 0.0);
    arena_reset();
    rc = solve(&p, &o, &r, w);
    ok(rc == 0 && arena.checks > 0 && arena.checks * 70000 >= r.pair_evaluations, "check_interrupts called at least every ~70k pair evaluations");
    total = arena.total;
    arena_reset();
    arena.jump = &jb;
    arena.jump_at = 3;
    if (setjmp(jb) == 0)
    {
        solve(&p, &o, &r, w);
        ok(0, "longjmp out of check_interrupts");
    }
    else
        ok(arena.live > 0, "longjmp out of check_interrupts returns control (blocks stay with the allocator)");
    arena.jump = NULL;
    for (n = 0; n < total; n += 1 + total / 40)
    {
        arena_reset();
        arena.fail_after = n;
        rc = solve(&p, &o, &r, w);
        fails += rc == RBR_FIT_ENOMEM;
        leaks += arena.live;
    }
    ok(fails > 0 && leaks == 0, "allocation failures give RBR_FIT_ENOMEM and free everything");
    o.solver = RBR_SOLVER_ADAMW;
    o.steps = 3;
    for (n = 0, fails = 0; n < 12; n++)
    {
        arena_reset();
        arena.fail_after = n;
        rc = solve(&p, &o, &r, w);
        fails += rc == RBR_FIT_ENOMEM;
        leaks += arena.live;
    }
    ok(fails > 0 && leaks == 0, "allocation failures in AdamW give RBR_FIT_ENOMEM and free everything");
    prob_free(&p);
}

/* Run every test. */
int main(void)
{
    printf("1..37\n");
    test_defaults();
    test_random_small();
    test_random_working_set();
    test_determinism();
    test_solve_rows();
    test_fixed_zero();
    test_tier_margins();
    test_separable_l2_zero();
    test_l2_zero_vertices();
    test_errors();
    test_degenerate();
    test_adamw();
    test_exact_beats_adamw();
    test_evaluate();
    test_ties();
    test_callbacks();
    if (n_test != 37)
        printf("# planned 37 tests, ran %d\n", n_test);
    return n_fail == 0 && n_test == 37 ? 0 : 1;
}
