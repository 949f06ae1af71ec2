/*
 * classes.h: completion classes and feature vectors from proposition values.
 *
 * Inputs are the simple propositions' values: probabilities in [0,1] (graded)
 * or 0/1 (human labels). Values are indexed like RbrPolicy.props; NaN marks a
 * value that was not given.
 */
#ifndef RBR_CLASSES_H
#define RBR_CLASSES_H

#include "policy.h"

/* How class probabilities are computed from proposition probabilities. */
typedef enum RbrClassMode
{
	RBR_CLASS_PRODUCT,			/* the paper's: product of literal probabilities */
	RBR_CLASS_EXACT				/* probability of the formula, independent props */
} RbrClassMode;

/* Parse a mode name ('product' or 'exact'); ERROR on anything else. */
extern RbrClassMode rbr_class_mode(const char *name);

/* Probability of one literal: p or 1-p, recursing into derived ones. */
extern double rbr_literal_prob(RbrPolicy *pol, const RbrLiteral *lit, const double *p);

/* ERROR listing the simple propositions a response type needs but lacks. */
extern void rbr_require_props(RbrPolicy *pol, RbrRespType *rt, const double *p,
							  bool for_features);

/* Normalised class probabilities of a response type into out[nclasses]. */
extern void rbr_class_probs_compute(RbrPolicy *pol, RbrRespType *rt, const double *p,
									RbrClassMode mode, double *out);

/* The feature vector of a response type into out[rt->nfeatures]. */
extern void rbr_features_compute(RbrPolicy *pol, RbrRespType *rt, const double *p,
								 RbrClassMode mode, double *out);

#endif							/* RBR_CLASSES_H */
