/*
 * fit_solver.h - fitting the RBR weights (Mu et al. 2024, "Fitting the weights").
 *
 * A pure C library (GNU C99: it uses the vector extensions of GCC and Clang) with no PostgreSQL
 * dependency (it includes only <stdint.h>, <stdbool.h>, <stddef.h>, <math.h>, <string.h>), so that it
 * can be unit-tested and benchmarked on its own and called from an aggregate's final function.
 *
 * Problem.  Rows are grouped by prompt.  Row i has features x_i (d doubles), a base reward r_i and a
 * tier (0 = best).  Inside one group every ordered pair (a, b) with tier(a) < tier(b) is compared
 * (equal tiers are not).  With the score s_i = r_i + w.x_i (coefficient 1 on the base reward, no bias):
 *
 *     L(w) = (1/P) sum_pairs max(0, m_ab - (s_a - s_b))  +  (l2/2) |w|^2
 *
 * m_ab is tier_margin[tier(a)] when that is given and not NaN, else margin.  Features flagged
 * fixed_zero are held at w_j = 0 exactly.
 *
 * RBR_SOLVER_EXACT minimises L over the pairs of the groups flagged group_is_train (all groups when
 * that is NULL) and certifies the result:
 *   - gap is an upper bound on L_used(w) - min L_used, where L_used is L with l2_used: it is
 *     L_used(w) - D(alpha) for a dual-feasible alpha in [0,1]^P built on every pair (D the Lagrange dual
 *     function), i.e. the KKT conditions checked on every pair.  Rigorous up to floating-point rounding
 *     of the sums (relative 1e-15 or so).
 *   - converged means gap <= tol * max(L_used(w), 1e-6); otherwise (max_iter reached, or no further
 *     progress at double precision) the best point found is returned with its honest gap.
 *   - l2 == 0: the hinge problem is then a linear programme whose optimal set may be unbounded
 *     (separable data).  The solver minimises with l2_tiebreak instead (reported as l2_used) and so
 *     always terminates with a unique, finite w: the minimiser of hinge + (l2_tiebreak/2)|w|^2.  For a
 *     small enough tie-breaker that is exactly the least-norm optimal solution of the linear programme
 *     (Mangasarian & Meyer 1979); in any case its hinge exceeds the linear optimum by at most
 *     gap + (l2_tiebreak/2)(|w_ln|^2 - |w|^2), w_ln being the least-norm linear solution.  The reported
 *     objective is then the plain hinge (l2 = 0), the gap refers to the tie-broken objective.
 *   - Deterministic: the result depends only on the data in the order given and on the options.
 *   - Degenerate inputs: every feature fixed -> w = 0, gap 0; pairs with x_a = x_b (on the free
 *     features) and duplicate rows are handled exactly; no training pair -> RBR_FIT_ENOPAIRS.
 *   - Cost: about 5-11 passes over the pairs plus small dense d x d work on a working set of about
 *     sqrt(pairs) pairs (see fit_solver.c).
 *
 * RBR_SOLVER_ADAMW is the paper's released fitter: full-batch AdamW (torch.optim.AdamW semantics:
 * decoupled weight decay, bias-corrected moments, eps added to the corrected square root) from w = 0
 * on the mean hinge, subgradient 0 at the kink (as relu).  It uses the pairs of ALL groups
 * (group_is_train is ignored) enumerated as above and splits the PAIRS: pair (a, b) is a validation
 * pair when rbr_fit_pair_is_val(seed, a, b, val_fraction), a and b being row indices of the data.  l2
 * does not enter its gradient (weight_decay is its regulariser); it is only added to the reported
 * objective.  gap is NaN.
 *
 * Memory and control.  All memory comes from alloc/free in RbrFitAlloc (never malloc); everything is
 * freed before the entry points return, on success and on error.  check_interrupts (may be NULL) is
 * called once 65536 pair evaluations have accumulated (checked after each row's pairs, so at most
 * 65536 + the largest group's size apart) and at every interior-point iteration; it may longjmp
 * out (PostgreSQL's ereport), in which case the blocks obtained so far are NOT freed by the library:
 * the allocator must own them (a memory context).  alloc may return NULL on failure (reported as
 * RBR_FIT_ENOMEM) or not return at all.  The library never prints and never exits.  Memory: about 56
 * bytes per row plus a few MB of working set; for very large inputs single blocks can exceed 1 GB, so
 * a PostgreSQL caller should allocate with the MemoryContextAllocHuge family.
 */
#ifndef RBR_FIT_SOLVER_H
#define RBR_FIT_SOLVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Return codes; a message is written to errbuf (when given) for every code but RBR_FIT_OK. */
#define RBR_FIT_OK 0
#define RBR_FIT_EINVAL 1   /* invalid argument or data (non-finite value, bad group offsets, ...) */
#define RBR_FIT_ENOPAIRS 2 /* no training pair (one tier per group, no training group, no rows) */
#define RBR_FIT_ENOMEM 3   /* the allocator returned NULL, or a size overflowed */
#define RBR_FIT_ENUMERIC 4 /* numerical breakdown that the safeguards could not repair */

/* Allocator and interrupt callbacks; ctx is passed back unchanged. */
typedef struct RbrFitAlloc
{
    void *ctx;
    void *(*alloc)(void *ctx, size_t size);
    void (*free)(void *ctx, void *ptr);
    void (*check_interrupts)(void *ctx); /* may be NULL */
} RbrFitAlloc;

/* The data, read only.  Rows of a group are contiguous: group g is rows group_start[g] ..
 * group_start[g+1]-1, with group_start[0] = 0 and group_start[ngroups] = nrows (non-decreasing; empty
 * groups are allowed). */
typedef struct RbrFitData
{
    int d;                      /* number of features, 0 .. 1024 */
    int64_t nrows;
    const double *x;            /* nrows * d, row-major, finite (in [0,1] expected, not required) */
    const double *base;         /* nrows, finite: the reward model's score */
    const int32_t *tier;        /* nrows, 0 = best; only the order matters (any int32) */
    int64_t ngroups;
    const int64_t *group_start; /* ngroups + 1 offsets (may be NULL when ngroups = nrows = 0) */
    const bool *group_is_train; /* ngroups; NULL = every group trains (EXACT; ignored by ADAMW) */
} RbrFitData;

typedef enum RbrSolverKind
{
    RBR_SOLVER_EXACT = 0,
    RBR_SOLVER_ADAMW = 1
} RbrSolverKind;

/* Options; start from rbr_fit_options_default(). */
typedef struct RbrFitOptions
{
    RbrSolverKind solver;      /* default RBR_SOLVER_EXACT */
    double margin;             /* default margin, finite, >= 0; default 1 */
    int n_tier_margin;         /* length of tier_margin, >= 0; default 0 */
    const double *tier_margin; /* margin by tier of the better side; NaN = use margin; else finite >= 0 */
    double l2;                 /* in [0, 1e12]; default 1e-6 */
    const bool *fixed_zero;    /* d flags, may be NULL: those w_j are held at exactly 0 */

    /* EXACT */
    double tol;         /* relative tolerance on the certified gap; default 1e-9 */
    int max_iter;       /* cap on model solves at full size (sub-sample levels have their own); default 100 */
    double l2_tiebreak; /* l2 minimised with when l2 == 0; in (0, 1e12]; default 1e-9 */
    int working_set;    /* pairs in the model's band (0 = automatic: sqrt(training pairs) in [256, 4096]); larger: fewer passes, dearer
                         * model solves */

    /* ADAMW (the released fitter): full batch, weights from zero */
    double lr;           /* default 0.01 */
    int steps;           /* default 1000 */
    double weight_decay; /* decoupled, as torch.optim.AdamW; default 0.05 (the released example) */
    double beta1, beta2; /* default 0.9, 0.999 */
    double eps;          /* default 1e-8 */
    double val_fraction; /* share of PAIRS held out, in [0,1]; default 0.05 */
    uint64_t seed;       /* seed of the pair split; default 0 */
} RbrFitOptions;

/* Output.  w is allocated by the caller (d doubles).  Losses are mean hinge without the l2 term;
 * accuracies count pairs with s_a > s_b strictly (ties are wrong); NaN where there is no pair. */
typedef struct RbrFitResult
{
    double *w;
    int64_t train_pairs, val_pairs;
    double train_loss, val_loss;
    double objective;         /* train_loss + (l2/2)|w|^2, with the caller's l2 */
    double zero_loss_share;   /* share of train pairs with zero hinge */
    double train_accuracy, val_accuracy;
    int iterations;           /* EXACT: model solves over all levels; ADAMW: steps */
    bool converged;           /* EXACT: gap <= tol * max(objective_used, 1e-6); ADAMW: true */
    double gap;               /* EXACT: certified bound on objective_used - minimum; ADAMW: NaN */
    double l2_used;           /* the l2 actually minimised with (l2, or l2_tiebreak when l2 == 0) */
    int64_t passes;           /* full passes over the train pairs (sub-sample work rounded up) */
    int64_t pair_evaluations; /* every pair evaluation, sub-samples and validation included */
    int64_t working_set_pairs; /* EXACT: pairs modelled individually in the last model solve */
} RbrFitResult;

/* Fill o with the defaults documented above. */
void rbr_fit_options_default(RbrFitOptions *o);

/* Fit the weights; returns RBR_FIT_OK or an error code with a message in errbuf (may be NULL). */
int rbr_fit_solve(const RbrFitData *data, const RbrFitOptions *opts, const RbrFitAlloc *alloc,
                  RbrFitResult *result, char *errbuf, size_t errlen);

/* As rbr_fit_solve, but the features of row i (rows in the order of data: groups, tiers, base, the
 * AdamW pair split all refer to that order) are stored at row x_row[i] of data->x: data->x holds
 * nrows rows in any order and x_row maps each row to its storage row (each in 0 .. nrows-1, checked;
 * normally a permutation).  x_row NULL is rbr_fit_solve.  Lets a caller that sorted its rows skip
 * copying the features into that order; the result equals rbr_fit_solve on the copied features. */
int rbr_fit_solve_rows(const RbrFitData *data, const int64_t *x_row, const RbrFitOptions *opts,
                       const RbrFitAlloc *alloc, RbrFitResult *result, char *errbuf, size_t errlen);

/* Evaluate a given w (d doubles, used as given: fixed_zero is ignored) with the EXACT split
 * (group_is_train), opts' margins and opts->l2: fills the pair counts, losses, accuracies, zero-loss
 * share and objective of result (result->w is not touched; gap NaN; no training pair gives NaN train
 * figures, not an error). */
int rbr_fit_evaluate(const RbrFitData *data, const RbrFitOptions *opts, const double *w,
                     const RbrFitAlloc *alloc, RbrFitResult *result, char *errbuf, size_t errlen);

/* The AdamW pair split: true when the pair (better row a, worse row b; row indices of the data) is a
 * validation pair, i.e. when a 53-bit hash of (seed, a, b) is below val_fraction * 2^53. */
bool rbr_fit_pair_is_val(uint64_t seed, int64_t a, int64_t b, double val_fraction);

/* A static English description of a return code. */
const char *rbr_fit_strerror(int code);

#endif /* RBR_FIT_SOLVER_H */
