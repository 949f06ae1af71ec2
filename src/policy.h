/*
 * policy.h: a policy spec (jsonb) parsed, validated and compiled into the
 * structures every other part of rbr evaluates, plus the per-backend cache.
 *
 * Vocabulary (see doc/concepts.md):
 *   simple proposition   a yes/no question the LLM grader answers: P(yes)
 *   derived proposition  a conjunction of literals over other propositions
 *   literal              (proposition, wanted value)
 *   completion class     per response type, a conjunction of literals; the
 *                        classes of a response type partition completions
 *   feature              a number per completion: a proposition probability
 *                        or a class probability
 */
#ifndef RBR_POLICY_H
#define RBR_POLICY_H

#include "rbr.h"

/* One literal: proposition index (into RbrPolicy.props) and wanted value. */
typedef struct RbrLiteral
{
	int			prop;
	bool		value;
} RbrLiteral;

/* A proposition: simple ones come first in RbrPolicy.props, derived after. */
typedef struct RbrProp
{
	char	   *name;
	bool		derived;
	char	   *prompt;			/* grader prompt (simple propositions) */
	int			nlits;			/* literals (derived propositions) */
	RbrLiteral *lits;
} RbrProp;

/* What a feature measures. */
typedef enum RbrFeatureKind
{
	RBR_FEATURE_PROP,			/* probability of a simple or derived proposition */
	RBR_FEATURE_CLASS			/* probability of a completion class */
} RbrFeatureKind;

typedef struct RbrFeature
{
	RbrFeatureKind kind;
	int			index;			/* prop index, or class index */
} RbrFeature;

/* The definition of one class for one response type, compiled. */
typedef struct RbrClassDef
{
	int			nlits;
	RbrLiteral *lits;
	/* exact mode: simple propositions reached more than once */
	int			nrepeated;
	int		   *repeated;
} RbrClassDef;

/* One label -> tier entry used when fitting. */
typedef struct RbrTier
{
	char	   *label;
	int			tier;
} RbrTier;

/* A response type: its class definitions, features and label tiers. */
typedef struct RbrRespType
{
	char	   *name;			/* folded */
	RbrClassDef *classes;		/* one per policy class, in class order */
	int			nfeatures;
	RbrFeature *features;
	bool		features_explicit;
	int			ntiers;
	RbrTier    *tiers;
	bool		tiers_explicit;
	/* simple propositions this response type needs to classify */
	int			nneeded;
	int		   *needed;
	/*
	 * simple propositions its feature vector needs: 'needed' plus those its
	 * feature list reaches (derived features through their literals); what
	 * rbr_featurize grades for a row of this response type
	 */
	int			ngraded;
	int		   *graded;
} RbrRespType;

/* One behavior policy entry: content category -> response type index. */
typedef struct RbrBehavior
{
	char	   *category;
	int			resptype;
} RbrBehavior;

/* A compiled policy version. Everything lives in its own memory context. */
typedef struct RbrPolicy
{
	MemoryContext mcxt;
	char	   *name;
	int			version;
	char	   *prompt_template;
	int			nprops;			/* simple + derived */
	int			nsimple;		/* props[0 .. nsimple-1] are simple */
	RbrProp    *props;			/* simple sorted by name, then derived by name */
	int			nclasses;
	char	  **classes;		/* in completion_class_order (best first) */
	int			nresptypes;
	RbrRespType *resptypes;		/* sorted by name */
	int			nbehavior;
	RbrBehavior *behavior;
	/*
	 * Evaluation scratch (classes.c): the probability of each derived
	 * proposition, valid where memo_stamp equals memo_gen, so that a
	 * derived proposition shared by others is computed once per evaluation.
	 */
	double	   *memo;
	uint32	   *memo_stamp;
	uint32		memo_gen;
} RbrPolicy;

/* Parse and validate a spec; ERROR naming the problem if it is invalid. */
extern RbrPolicy *rbr_policy_compile(Jsonb *spec, const char *name, int version,
									 MemoryContext parent);

/* The compiled policy for 'name' (latest version) or 'name@N'; cached. */
extern RbrPolicy *rbr_policy_get(const char *ref);

/* The response type of a policy, matched after folding; ERROR if absent. */
extern RbrRespType *rbr_policy_resptype(RbrPolicy *policy, const char *name);

/* Index of a proposition by name, or -1. */
extern int	rbr_policy_prop_index(RbrPolicy *policy, const char *name);

/* Index of a class by name, or -1. */
extern int	rbr_policy_class_index(RbrPolicy *policy, const char *name);

/* Name of a feature of a response type. */
extern const char *rbr_feature_name(RbrPolicy *policy, RbrFeature *f);

#endif							/* RBR_POLICY_H */
