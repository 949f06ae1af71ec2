/*
 * rbr.h: declarations shared by every part of the rbr extension.
 *
 * rbr implements Rule-Based Rewards (Mu et al., 2024): a policy of yes/no
 * propositions and completion classes, class probabilities as features,
 * a fitted weight vector per response type, and a reward
 * R_tot = R_rm + w . phi.
 */
#ifndef RBR_H
#define RBR_H

#include "postgres.h"

#include "fmgr.h"
#include "utils/jsonb.h"

/* Name of the schema that holds rbr's tables (created by the install script). */
#define RBR_SCHEMA "rbr"

/* Longest name rbr accepts for propositions, classes and response types. */
#define RBR_NAME_MAX (NAMEDATALEN - 1)

/* Fold a response type name: lower case, runs of spaces/hyphens become '_'. */
extern char *rbr_fold_name(const char *name);

/* The current generation of rbr's tables; cached data of older ones is stale. */
extern uint64 rbr_tables_generation(void);

/* Reject NaN and infinite values with a message naming what was wrong. */
extern void rbr_check_finite(double v, const char *what);

#endif							/* RBR_H */
