/*
 * batch.h: batch mode of rbr_featurize, through the provider's Batch API
 * (batch.c). While a batch-mode chunk runs, grading answers from the cache
 * only: a question missing from it is queued as a line of a batch (or is
 * already in flight) and its value is left for a later call.
 */
#ifndef RBR_BATCH_H
#define RBR_BATCH_H

#include "endpoint.h"

/* Define the rbr.batch_* settings. Called from _PG_init. */
extern void rbr_batch_init_settings(void);

/* Is a batch-mode chunk running in this backend (grading from the cache only)? */
extern bool rbr_batch_active(void);

/*
 * Batch mode: after the cache look-up of jobs[0 .. n-1] (names: proposition
 * per job), end every job still missing as 'pending' (queued as a batch
 * line, or in flight already) or as the error its line ended with; an
 * answer the Batch API brought counts as asked (not cached), with its
 * tokens, the first time a chunk uses it.
 */
extern void rbr_batch_prepare_jobs(RbrGradeJob *jobs, int n, const char *const *names);

/* The same for generation jobs (rbr_generate_many), lines of kind "generate". */
extern void rbr_batch_prepare_gen_jobs(RbrGradeJob *jobs, int n);

#endif							/* RBR_BATCH_H */
