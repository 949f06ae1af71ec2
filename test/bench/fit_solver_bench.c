/*
 * fit_solver_bench.c - benchmark of the RBR weight fitter on synthetic data in the paper's shape.
 *
 * Build and run (from the repository root):
 *   gcc -std=gnu99 -O2 -Wall -Wextra -Werror -Isrc -o /tmp/fit_solver_bench \
 *       test/bench/fit_solver_bench.c src/fit_solver.c -lm
 *   /tmp/fit_solver_bench [groups=60000] [adam_steps=1000] [seed=1] [working_set=0] [noise=2.0] [l2=default] [base_scale=1]
 *
 * Data: per group (prompt) a response type (hard refuse / soft refuse / comply), about 16 completions in
 * 3 tiers (ideal, acceptable, bad), 23 features that are noisy proposition probabilities whose means
 * depend on the response type and the tier (some informative, some weak, some pure noise, with a
 * per-prompt shift), and a base reward that prefers compliance (so it ranks refusal prompts' pairs
 * badly).  10% of the groups are held out.  Prints the exact solver's time, passes and objective, the
 * held-out pair accuracy of: the base reward alone, the exact fit, AdamW (the released fitter's
 * settings) trained on the same training groups.
 */
#include "fit_solver.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define D 23

/* generator state (splitmix64) */
static uint64_t rng_state = 88172645463325252ULL;

/* Next 64 random bits (splitmix64). */
static uint64_t rng_u64(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [0,1). */
static double rng_unif(void)
{
    return (double)(rng_u64() >> 11) * 0x1.0p-53;
}

/* Standard normal (Box-Muller). */
static double rng_norm(void)
{
    double u1 = rng_unif(), u2 = rng_unif();

    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Logistic function. */
static double sigm(double v)
{
    return 1.0 / (1.0 + exp(-v));
}

/* malloc-based allocator for the library. */
static void *b_alloc(void *ctx, size_t n)
{
    (void)ctx;
    return malloc(n);
}

/* free-based release for the library. */
static void b_free(void *ctx, void *p)
{
    (void)ctx;
    free(p);
}

/* Wall-clock seconds. */
static double now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct Synth
{
    RbrFitData data;
    double *x, *base;
    int32_t *tier;
    int64_t *gstart;
    bool *train;
} Synth;

/* Generate ngroups groups of synthetic comparison data; noise scales the per-completion feature noise. */
static void synth_make(Synth *s, int64_t ngroups, double noise)
{
    double mu[3][3][D]; /* response type, tier, feature: logit means */
    int64_t g, row = 0, cap = ngroups * 20;
    int rt, t, j;

    for (rt = 0; rt < 3; rt++)
        for (j = 0; j < D; j++)
        {
            double base = rng_norm();
            double slope = j < 10 ? 1.5 * rng_norm() : (j < 18 ? 0.4 * rng_norm() : 0.0);

            for (t = 0; t < 3; t++)
                mu[rt][t][j] = base + slope * (t - 1) + (j < 10 ? 0.5 * rng_norm() : 0.0);
        }
    s->x = malloc(sizeof(double) * (size_t)cap * D);
    s->base = malloc(sizeof(double) * (size_t)cap);
    s->tier = malloc(sizeof(int32_t) * (size_t)cap);
    s->gstart = malloc(sizeof(int64_t) * (size_t)(ngroups + 1));
    s->train = malloc(sizeof(bool) * (size_t)ngroups);
    for (g = 0; g < ngroups; g++)
    {
        int nrow = 14 + (int)(rng_u64() % 5); /* 14..18 completions */
        double shift[D], off = rng_norm();
        int i;

        rt = (int)(rng_u64() % 10);
        rt = rt < 3 ? 0 : (rt < 5 ? 1 : 2);
        for (j = 0; j < D; j++)
            shift[j] = 0.5 * rng_norm();
        s->gstart[g] = row;
        s->train[g] = rng_unif() >= 0.1;
        for (i = 0; i < nrow; i++, row++)
        {
            double comply, r;
            double u = rng_unif();

            t = i < 3 ? 0 : (i < 9 ? 1 : 2); /* about 3 ideal, 6 acceptable, the rest bad */
            if (u < 0.05)
                t = (t + 1) % 3; /* label noise in the class sizes */
            s->tier[row] = t;
            for (j = 0; j < D; j++)
                s->x[row * D + j] = sigm(mu[rt][t][j] + shift[j] + noise * rng_norm());
            if (rt < 2)
                comply = t == 2 ? (rng_unif() < 0.7 ? 1.0 : 0.0) : 0.0;
            else
                comply = t == 0 ? 1.0 : (t == 1 ? 0.5 : 0.0);
            r = 1.5 * comply + 0.4 * (2 - t) + off + 0.8 * rng_norm();
            s->base[row] = r;
        }
    }
    s->gstart[ngroups] = row;
    s->data.d = D;
    s->data.nrows = row;
    s->data.x = s->x;
    s->data.base = s->base;
    s->data.tier = s->tier;
    s->data.ngroups = ngroups;
    s->data.group_start = s->gstart;
    s->data.group_is_train = s->train;
}

/* Copy of the training groups only (for the AdamW run, which splits pairs itself). */
static void synth_train_only(const Synth *s, Synth *o)
{
    int64_t g, ng = 0, row = 0;

    o->x = malloc(sizeof(double) * (size_t)s->data.nrows * D);
    o->base = malloc(sizeof(double) * (size_t)s->data.nrows);
    o->tier = malloc(sizeof(int32_t) * (size_t)s->data.nrows);
    o->gstart = malloc(sizeof(int64_t) * (size_t)(s->data.ngroups + 1));
    o->train = NULL;
    for (g = 0; g < s->data.ngroups; g++)
    {
        int64_t a = s->gstart[g], b = s->gstart[g + 1];

        if (!s->train[g])
            continue;
        o->gstart[ng++] = row;
        memcpy(o->x + row * D, s->x + a * D, sizeof(double) * (size_t)(b - a) * D);
        memcpy(o->base + row, s->base + a, sizeof(double) * (size_t)(b - a));
        memcpy(o->tier + row, s->tier + a, sizeof(int32_t) * (size_t)(b - a));
        row += b - a;
    }
    o->gstart[ng] = row;
    o->data = s->data;
    o->data.nrows = row;
    o->data.x = o->x;
    o->data.base = o->base;
    o->data.tier = o->tier;
    o->data.ngroups = ng;
    o->data.group_start = o->gstart;
    o->data.group_is_train = NULL;
}

/* Run the benchmark. */
int main(int argc, char **argv)
{
    int64_t ngroups = argc > 1 ? atoll(argv[1]) : 60000;
    int steps = argc > 2 ? atoi(argv[2]) : 1000;
    uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 10) : 1;
    int ws = argc > 4 ? atoi(argv[4]) : 0;
    double noise = argc > 5 ? atof(argv[5]) : 2.0;
    double l2 = argc > 6 ? atof(argv[6]) : -1;
    double bscale = argc > 7 ? atof(argv[7]) : 1.0;
    RbrFitAlloc al = {NULL, b_alloc, b_free, NULL};
    RbrFitOptions o;
    RbrFitResult r, ra, ev;
    Synth s, st;
    double w[D], wa[D], w0[D] = {0}, t0, t_exact, t_med, t_rep[3], t_adam = 0;
    char err[256];
    int rc, rep;
    int64_t i;

    printf("command:");
    for (i = 0; i < argc; i++)
        printf(" %s", argv[i]);
    printf("\n");
    rng_state ^= seed * 0x9e3779b97f4a7c15ULL;
    synth_make(&s, ngroups, noise);
    for (i = 0; i < s.data.nrows; i++)
        s.base[i] *= bscale;
    rbr_fit_options_default(&o);
    o.working_set = ws;
    if (l2 >= 0)
        o.l2 = l2;

    memset(&ev, 0, sizeof(ev));
    rbr_fit_evaluate(&s.data, &o, w0, &al, &ev, err, sizeof(err));
    printf("data: %lld groups, %lld rows, d=%d, %lld train pairs, %lld held-out pairs\n", (long long)ngroups,
           (long long)s.data.nrows, D, (long long)ev.train_pairs, (long long)ev.val_pairs);
    printf("base reward alone: held-out accuracy %.4f (train %.4f)\n", ev.val_accuracy, ev.train_accuracy);

    for (rep = 0; rep < 3; rep++)
    {
        memset(&r, 0, sizeof(r));
        r.w = w;
        t0 = now();
        rc = rbr_fit_solve(&s.data, &o, &al, &r, err, sizeof(err));
        t_rep[rep] = now() - t0;
        if (rc)
        {
            fprintf(stderr, "exact failed: %s\n", err);
            return 1;
        }
    }
    t_exact = fmin(t_rep[0], fmin(t_rep[1], t_rep[2]));
    t_med = fmax(fmin(t_rep[0], t_rep[1]), fmin(fmax(t_rep[0], t_rep[1]), t_rep[2]));
    printf("exact: best %.3f s, median %.3f s of 3 runs; %lld passes, %d model solves, working set %lld pairs;\n"
           "       objective %.12g, certified gap %.3g (%s), train acc %.4f, held-out acc %.4f, zero-loss share %.4f\n",
           t_exact, t_med, (long long)r.passes, r.iterations, (long long)r.working_set_pairs, r.objective, r.gap,
           r.converged ? "converged" : "NOT converged", r.train_accuracy, r.val_accuracy, r.zero_loss_share);

    if (steps > 0)
    {
        synth_train_only(&s, &st);
        o.solver = RBR_SOLVER_ADAMW;
        o.steps = steps;
        memset(&ra, 0, sizeof(ra));
        ra.w = wa;
        t0 = now();
        rc = rbr_fit_solve(&st.data, &o, &al, &ra, err, sizeof(err));
        t_adam = now() - t0;
        if (rc)
        {
            fprintf(stderr, "adamw failed: %s\n", err);
            return 1;
        }
        o.solver = RBR_SOLVER_EXACT;
        rbr_fit_evaluate(&s.data, &o, wa, &al, &ev, err, sizeof(err));
        printf("adamw %d steps (trained on the training groups, 95/5 pair split): %.3f s (%.1f ms/step);\n"
               "       its train loss %.6f; on the exact solver's split: objective %.12g, train acc %.4f, "
               "held-out acc %.4f\n",
               steps, t_adam, 1e3 * t_adam / steps, ra.train_loss, ev.objective, ev.train_accuracy, ev.val_accuracy);
        printf("speed-up exact vs adamw: %.1fx (best exact), %.1fx (median exact)\n", t_adam / t_exact,
               t_adam / t_med);
    }
    printf("weights (exact):");
    for (i = 0; i < D; i++)
        printf(" %.3f", w[i]);
    printf("\n");
    free(s.x);
    free(s.base);
    free(s.tier);
    free(s.gstart);
    free(s.train);
    if (steps > 0)
    {
        free(st.x);
        free(st.base);
        free(st.tier);
        free(st.gstart);
    }
    return 0;
}
