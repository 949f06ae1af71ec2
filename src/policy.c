/*
 * policy.c: parse, validate and compile a policy spec, and cache compiled
 * policies per backend.
 *
 * A spec is the jsonb document of ../shared/reference/policy.json, with
 * optional extra keys (behavior_policy, label_tiers, features, description).
 * Compilation resolves every name to an index once, so that evaluating a row
 * (classes.c) is only arithmetic. Every validation error names the problem
 * and the place in the spec (a dotted path).
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"

#include "jsonutil.h"
#include "policy.h"

/* Most simple propositions one class may repeat before exact mode refuses. */
#define RBR_MAX_REPEATED 20

/*
 * Limits of a spec (doc/reference.md, "Limits"). They are far above any
 * policy of the paper's size (23 simple and 6 derived propositions, 5
 * classes, 4 response types) and keep validating a hostile spec cheap:
 * every pass over it is linear in its size, and these bound what follows.
 */
#define RBR_MAX_SPEC_BYTES (5 * 1024 * 1024)	/* jsonb size of a spec */
#define RBR_MAX_PROPS 10000		/* simple + derived propositions */
#define RBR_MAX_DEPTH 64		/* derived propositions nested in each other */
#define RBR_MAX_CLASSES 256		/* completion classes (each response type has all) */
#define RBR_MAX_RESPTYPES 256	/* response types */
#define RBR_MAX_LITERALS 1000	/* literals of one conjunction */
#define RBR_MAX_ENTRIES 10000	/* features, label tiers, behavior categories */

/* Column names a proposition or class may not take (system columns). */
static const char *const reserved_names[] = {
	"xmin", "xmax", "cmin", "cmax", "ctid", "tableoid", "oid", NULL
};

/* Top-level keys a spec may carry. */
static const char *const spec_keys[] = {
	"prompt_template", "completion_class_order", "completion_classes",
	"derived_propositions", "simple_propositions", "behavior_policy",
	"label_tiers", "features", "description", NULL
};

/* ---------------------------------------------------------------------------
 * Errors
 * ------------------------------------------------------------------------- */

/* Raise the standard "invalid policy" error with a detail and a hint. */
#define policy_error(path, hint, ...) \
	ereport(ERROR, \
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE), \
			 errmsg("invalid policy: " __VA_ARGS__), \
			 errdetail("At %s.", (path)), \
			 (hint) ? errhint("%s", (const char *) (hint)) : 0))

/* ---------------------------------------------------------------------------
 * Names
 * ------------------------------------------------------------------------- */

/* Fold a response type name: lower case, runs of spaces/hyphens become '_'. */
char *
rbr_fold_name(const char *name)
{
	StringInfoData buf;
	const char *p = name;
	bool		pending_sep = false;

	initStringInfo(&buf);
	while (*p == ' ' || *p == '\t')
		p++;
	for (; *p; p++)
	{
		char		c = *p;

		if (c == ' ' || c == '\t' || c == '-' || c == '_')
		{
			pending_sep = true;
			continue;
		}
		if (pending_sep && buf.len > 0)
			appendStringInfoChar(&buf, '_');
		pending_sep = false;
		appendStringInfoChar(&buf, (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c);
	}
	return buf.data;
}

/* Check a name used for propositions, classes and response types. */
static void
check_name(const char *name, const char *path, const char *what)
{
	const char *p;

	if (name[0] == '\0')
		policy_error(path, "Give every entry a non-empty name.", "empty %s name", what);
	if (strlen(name) > RBR_NAME_MAX)
		policy_error(path, "Names become column names: keep them at most 63 bytes.",
					 "%s name \"%s\" is too long", what, name);
	for (p = name; *p; p++)
	{
		bool		ok = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
			*p == '_' || (p != name && *p >= '0' && *p <= '9');

		/* name the whole character, never a byte of a multi-byte one */
		if (!ok)
			policy_error(path,
						 "Names become column names: use letters, digits and underscores, not starting with a digit.",
						 "%s name \"%s\" contains \"%.*s\"", what, name,
						 pg_mbcliplen(p, strlen(p), pg_mblen(p)), p);
	}
	for (int i = 0; reserved_names[i]; i++)
		if (strcmp(name, reserved_names[i]) == 0)
			policy_error(path,
						 psprintf("Names become columns of the features table, where \"%s\" is a system column; rename it, e.g. to \"%s_\" or \"is_%s\".",
								  name, name, name),
						 "%s name \"%s\" is reserved", what, name);
}

/* Index of a proposition by name within props[lo .. hi-1] (sorted), or -1. */
static int
find_prop_in(RbrPolicy *policy, int lo, int hi, const char *name)
{
	hi--;
	while (lo <= hi)
	{
		int			mid = lo + (hi - lo) / 2;
		int			cmp = strcmp(policy->props[mid].name, name);

		if (cmp == 0)
			return mid;
		if (cmp < 0)
			lo = mid + 1;
		else
			hi = mid - 1;
	}
	return -1;
}

/* Index of a proposition by name, or -1. */
int
rbr_policy_prop_index(RbrPolicy *policy, const char *name)
{
	/* two sorted runs: simple propositions, then derived ones */
	int			i = find_prop_in(policy, 0, policy->nsimple, name);

	return i >= 0 ? i : find_prop_in(policy, policy->nsimple, policy->nprops, name);
}

/* Index of a class by name, or -1. */
int
rbr_policy_class_index(RbrPolicy *policy, const char *name)
{
	for (int i = 0; i < policy->nclasses; i++)
		if (strcmp(policy->classes[i], name) == 0)
			return i;
	return -1;
}

/* Name of a feature of a response type. */
const char *
rbr_feature_name(RbrPolicy *policy, RbrFeature *f)
{
	return f->kind == RBR_FEATURE_PROP ? policy->props[f->index].name
		: policy->classes[f->index];
}

/* The response type of a policy, matched after folding; ERROR if absent. */
RbrRespType *
rbr_policy_resptype(RbrPolicy *policy, const char *name)
{
	char	   *folded = rbr_fold_name(name);
	StringInfoData known;

	for (int i = 0; i < policy->nresptypes; i++)
		if (strcmp(policy->resptypes[i].name, folded) == 0)
		{
			pfree(folded);
			return &policy->resptypes[i];
		}

	initStringInfo(&known);
	for (int i = 0; i < policy->nresptypes; i++)
		appendStringInfo(&known, "%s%s", i ? ", " : "", policy->resptypes[i].name);
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("policy \"%s\" has no response type \"%s\"", policy->name, name),
			 errdetail("Its response types are: %s.", known.data),
			 errhint("Names match after folding case, spaces and hyphens: 'Hard Refuse' is hard_refuse.")));
	return NULL;				/* keep compiler quiet */
}

/* ---------------------------------------------------------------------------
 * Compilation
 * ------------------------------------------------------------------------- */

/* qsort comparator for C strings. */
static int
cmp_cstring(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/* qsort comparator for JsonItems by key. */
static int
cmp_item(const void *a, const void *b)
{
	return strcmp(((const RbrJsonItem *) a)->key, ((const RbrJsonItem *) b)->key);
}

/* "a, b, c" from an array of names. */
static char *
joined_names(char **names, int n)
{
	StringInfoData buf;

	initStringInfo(&buf);
	for (int i = 0; i < n; i++)
		appendStringInfo(&buf, "%s%s", i ? ", " : "", names[i]);
	return buf.data;
}

/* Fetch a required top-level member, checking it is an object. */
static JsonbContainer *
require_object(JsonbContainer *root, const char *key, bool required)
{
	JsonbValue *v = rbr_obj_get(root, key);

	if (v == NULL)
	{
		if (required)
			policy_error(key, "A policy needs prompt_template, completion_class_order, completion_classes and simple_propositions; derived_propositions is optional.",
						 "missing \"%s\"", key);
		return NULL;
	}
	if (!rbr_jbv_is_object(v))
		policy_error(key, NULL, "\"%s\" must be an object, not %s", key, rbr_jbv_type_name(v));
	return v->val.binary.data;
}

/* Parse an object of literals {name: bool} into resolved literals. */
static RbrLiteral *
parse_literals(RbrPolicy *pol, JsonbValue *v, const char *path, int *nlits)
{
	RbrJsonItem   *items;
	int			n;
	RbrLiteral *lits;

	if (!rbr_jbv_is_object(v))
		policy_error(path, "Write a conjunction as an object of proposition names to true or false.",
					 "literals must be an object, not %s", rbr_jbv_type_name(v));
	items = rbr_obj_items(v->val.binary.data, &n);
	if (n == 0)
		policy_error(path, "List at least one literal.", "empty conjunction");
	if (n > RBR_MAX_LITERALS)
		policy_error(path, "Split the conjunction into derived propositions.",
					 "conjunction has %d literals (at most %d)", n, RBR_MAX_LITERALS);
	lits = palloc(sizeof(RbrLiteral) * n);
	for (int i = 0; i < n; i++)
	{
		int			idx = rbr_policy_prop_index(pol, items[i].key);

		CHECK_FOR_INTERRUPTS();
		if (idx < 0)
			policy_error(psprintf("%s.%s", path, items[i].key), "Every literal must name a simple or derived proposition of the policy.",
						 "unknown proposition \"%s\"", items[i].key);
		if (items[i].value.type != jbvBool)
			policy_error(psprintf("%s.%s", path, items[i].key), "Use true or false (JSON booleans), not strings or numbers.",
						 "literal \"%s\" must be a boolean, not %s", items[i].key,
						 rbr_jbv_type_name(&items[i].value));
		lits[i].prop = idx;
		lits[i].value = items[i].value.val.boolean;
	}
	*nlits = n;
	return lits;
}

/* DFS state for cycle detection among derived propositions. */
typedef enum
{
	VISIT_NEW, VISIT_ACTIVE, VISIT_DONE
} VisitState;

/* ERROR: derived propositions nest deeper than RBR_MAX_DEPTH, from p down. */
static void
depth_error(RbrPolicy *pol, int p, const int *below)
{
	StringInfoData chain;
	int			n = 0;

	initStringInfo(&chain);
	for (int q = p; q >= 0 && n <= RBR_MAX_DEPTH + 1; q = below[q], n++)
	{
		if (n < 3 || below[q] < 0)
			appendStringInfo(&chain, "%s%s", n ? " -> " : "", pol->props[q].name);
		else if (n == 3)
			appendStringInfoString(&chain, " -> ...");
	}
	policy_error(psprintf("derived_propositions.%s", pol->props[p].name),
				 psprintf("Derived propositions nest at most %d deep; flatten the chain.", RBR_MAX_DEPTH),
				 "derived propositions nested more than %d deep: %s", RBR_MAX_DEPTH, chain.data);
}

/*
 * Detect cycles among derived propositions, reporting the cycle's path, and
 * bound how deeply they nest: returns p's height (1 for a derived proposition
 * over simple ones only, 0 for a simple one). One depth-first search over all
 * of them, each visited once (colors, memoised heights), so linear in the
 * number of literals; the recursion is at most RBR_MAX_DEPTH + 1 deep, as a
 * longer chain is refused first. below[p] is the child on p's deepest chain.
 */
static int
check_cycles(RbrPolicy *pol, int p, VisitState *state, int *stack, int depth,
			 int *height, int *below)
{
	RbrProp    *prop = &pol->props[p];
	int			h = 0;

	check_stack_depth();
	CHECK_FOR_INTERRUPTS();
	if (!prop->derived)
		return 0;
	if (state[p] == VISIT_DONE)
		return height[p];
	if (state[p] == VISIT_ACTIVE)
	{
		StringInfoData cyc;
		int			start = 0;

		while (stack[start] != p)
			start++;
		initStringInfo(&cyc);
		for (int i = start; i < depth; i++)
			appendStringInfo(&cyc, "%s -> ", pol->props[stack[i]].name);
		appendStringInfoString(&cyc, prop->name);
		policy_error(psprintf("derived_propositions.%s", prop->name),
					 "A derived proposition may not depend on itself, directly or through others.",
					 "cycle among derived propositions: %s", cyc.data);
	}
	if (depth >= RBR_MAX_DEPTH)
	{
		/* the chain on the stack is already too deep: report it */
		for (int i = 0; i < depth; i++)
			below[stack[i]] = i + 1 < depth ? stack[i + 1] : p;
		below[p] = -1;
		depth_error(pol, stack[0], below);
	}
	state[p] = VISIT_ACTIVE;
	stack[depth] = p;
	below[p] = -1;
	for (int i = 0; i < prop->nlits; i++)
	{
		int			c = prop->lits[i].prop;
		int			hc = check_cycles(pol, c, state, stack, depth + 1, height, below);

		if (hc + 1 > h)
		{
			h = hc + 1;
			below[p] = pol->props[c].derived ? c : -1;
		}
	}
	if (h > RBR_MAX_DEPTH)
		depth_error(pol, p, below);
	state[p] = VISIT_DONE;
	height[p] = h;
	return h;
}

/*
 * Scratch of count_reach(), reused for every conjunction of one policy: per
 * proposition a visit stamp and the number of paths reaching it (saturated at
 * 2: only "never", "once" and "more than once" matter).
 */
typedef struct ReachScratch
{
	int		   *stamp;
	int		   *paths;
	int			gen;
	int		   *order;			/* reached derived propositions, post-order */
	int			norder;
} ReachScratch;

/* The scratch of the policy being compiled (emptied when compiling starts). */
static ReachScratch reach_scratch;

/* Mark what a proposition reaches; derived ones go to s->order in post-order. */
static void
reach_visit(RbrPolicy *pol, ReachScratch *s, int p)
{
	RbrProp    *prop = &pol->props[p];

	if (s->stamp[p] == s->gen)
		return;
	s->stamp[p] = s->gen;
	s->paths[p] = 0;
	if (!prop->derived)
		return;
	/* nesting is at most RBR_MAX_DEPTH deep (check_cycles) */
	check_stack_depth();
	CHECK_FOR_INTERRUPTS();
	for (int i = 0; i < prop->nlits; i++)
		reach_visit(pol, s, prop->lits[i].prop);
	s->order[s->norder++] = p;
}

/*
 * Count how often each simple proposition is reached from a conjunction
 * (through derived propositions, counting every path), adding to counts[]
 * values saturated at 2. Linear in the size of what the conjunction reaches,
 * however often derived propositions share sub-propositions.
 */
static void
count_reach(RbrPolicy *pol, RbrLiteral *lits, int nlits, int *counts)
{
	ReachScratch *s = &reach_scratch;

	if (s->stamp == NULL)
	{
		s->stamp = palloc0(sizeof(int) * pol->nprops);
		s->paths = palloc0(sizeof(int) * pol->nprops);
		s->order = palloc(sizeof(int) * Max(pol->nprops, 1));
		s->gen = 0;
	}
	s->gen++;
	s->norder = 0;
	for (int i = 0; i < nlits; i++)
		reach_visit(pol, s, lits[i].prop);
	for (int i = 0; i < nlits; i++)
		s->paths[lits[i].prop] = Min(s->paths[lits[i].prop] + 1, 2);
	/* reverse post-order: a derived proposition before what it refers to */
	for (int k = s->norder - 1; k >= 0; k--)
	{
		RbrProp    *prop = &pol->props[s->order[k]];
		int			n = s->paths[s->order[k]];

		CHECK_FOR_INTERRUPTS();
		if (n == 0)
			continue;
		for (int i = 0; i < prop->nlits; i++)
			s->paths[prop->lits[i].prop] = Min(s->paths[prop->lits[i].prop] + n, 2);
	}
	for (int i = 0; i < nlits; i++)
	{
		int			q = lits[i].prop;

		if (!pol->props[q].derived && s->stamp[q] == s->gen)
		{
			counts[q] = Min(counts[q] + s->paths[q], 2);
			s->stamp[q] = -1;
		}
	}
	for (int k = 0; k < s->norder; k++)
	{
		RbrProp    *prop = &pol->props[s->order[k]];

		for (int i = 0; i < prop->nlits; i++)
		{
			int			q = prop->lits[i].prop;

			/* each simple proposition once: its stamp moves on when counted */
			if (!pol->props[q].derived && s->stamp[q] == s->gen)
			{
				counts[q] = Min(counts[q] + s->paths[q], 2);
				s->stamp[q] = -1;
			}
		}
	}
}

/* Parse simple and derived propositions into pol->props. */
static void
compile_propositions(RbrPolicy *pol, JsonbContainer *root)
{
	JsonbContainer *simple = require_object(root, "simple_propositions", true);
	JsonbContainer *derived = require_object(root, "derived_propositions", false);
	RbrJsonItem   *sitems,
			   *ditems = NULL;
	int			ns,
				nd = 0;
	VisitState *state;
	int		   *stack;
	int		   *height;
	int		   *below;

	sitems = rbr_obj_items(simple, &ns);
	if (ns == 0)
		policy_error("simple_propositions", "Define at least one proposition with its grader prompt.",
					 "no simple propositions");
	if (derived)
		ditems = rbr_obj_items(derived, &nd);
	if ((int64) ns + nd > RBR_MAX_PROPS)
		policy_error(nd > 0 ? "derived_propositions" : "simple_propositions",
					 "Split the policy, or merge propositions that ask the same question.",
					 "%d simple and %d derived propositions (at most %d in all)", ns, nd, RBR_MAX_PROPS);
	qsort(sitems, ns, sizeof(RbrJsonItem), cmp_item);
	if (nd > 0)
		qsort(ditems, nd, sizeof(RbrJsonItem), cmp_item);

	pol->nsimple = ns;
	pol->nprops = ns + nd;
	pol->props = palloc0(sizeof(RbrProp) * pol->nprops);

	for (int i = 0; i < ns; i++)
	{
		char	   *path = psprintf("simple_propositions.%s", sitems[i].key);
		JsonbValue *prompt;

		CHECK_FOR_INTERRUPTS();
		check_name(sitems[i].key, path, "proposition");
		if (!rbr_jbv_is_object(&sitems[i].value))
			policy_error(path, "Write each simple proposition as {\"prompt\": \"...\"}.",
						 "simple proposition \"%s\" must be an object, not %s",
						 sitems[i].key, rbr_jbv_type_name(&sitems[i].value));
		prompt = rbr_obj_get(sitems[i].value.val.binary.data, "prompt");
		if (prompt == NULL || prompt->type != jbvString || prompt->val.string.len == 0)
			policy_error(path, "Give it a non-empty \"prompt\": the question the grader answers with yes or no.",
						 "simple proposition \"%s\" has no grader prompt", sitems[i].key);
		pol->props[i].name = pstrdup(sitems[i].key);
		pol->props[i].prompt = rbr_jbv_cstring(prompt);
	}
	for (int i = 0; i < nd; i++)
	{
		char	   *path = psprintf("derived_propositions.%s", ditems[i].key);

		CHECK_FOR_INTERRUPTS();
		check_name(ditems[i].key, path, "proposition");
		if (find_prop_in(pol, 0, ns, ditems[i].key) >= 0)
			policy_error(path, "Rename one of them: a name is either simple or derived.",
							 "\"%s\" is both a simple and a derived proposition", ditems[i].key);
		pol->props[ns + i].name = pstrdup(ditems[i].key);
		pol->props[ns + i].derived = true;
		pfree(path);
	}
	/* literals only after every name is known */
	for (int i = 0; i < nd; i++)
	{
		RbrProp    *prop = &pol->props[ns + i];

		prop->lits = parse_literals(pol, &ditems[i].value,
									psprintf("derived_propositions.%s", prop->name),
									&prop->nlits);
	}

	state = palloc0(sizeof(VisitState) * pol->nprops);
	stack = palloc(sizeof(int) * (pol->nprops + 1));
	height = palloc0(sizeof(int) * pol->nprops);
	below = palloc(sizeof(int) * pol->nprops);
	for (int i = ns; i < pol->nprops; i++)
		check_cycles(pol, i, state, stack, 0, height, below);
	pfree(state);
	pfree(stack);
	pfree(height);
	pfree(below);
	pol->memo = palloc0(sizeof(double) * pol->nprops);
	pol->memo_stamp = palloc0(sizeof(uint32) * pol->nprops);
	pol->memo_gen = 0;
}

/* Parse completion_class_order and completion_classes into response types. */
static void
compile_classes(RbrPolicy *pol, JsonbContainer *root)
{
	JsonbValue *order = rbr_obj_get(root, "completion_class_order");
	JsonbContainer *classes = require_object(root, "completion_classes", true);
	JsonbValue *elems;
	RbrJsonItem   *citems;
	int			ncitems;
	char	  **rtnames = NULL;
	int			nrt = 0;
	int		   *counts;
	int		   *any;
	int		   *repeated;

	if (order == NULL)
		policy_error("completion_class_order", "List the classes from best to worst.",
					 "missing \"completion_class_order\"");
	if (!rbr_jbv_is_array(order))
		policy_error("completion_class_order", "List the classes from best to worst.",
					 "\"completion_class_order\" must be an array, not %s", rbr_jbv_type_name(order));
	elems = rbr_arr_items(order->val.binary.data, &pol->nclasses);
	if (pol->nclasses == 0)
		policy_error("completion_class_order", "List the classes from best to worst.",
					 "no completion classes");
	if (pol->nclasses > RBR_MAX_CLASSES)
		policy_error("completion_class_order", "Merge classes that share a tier.",
					 "%d completion classes (at most %d)", pol->nclasses, RBR_MAX_CLASSES);
	pol->classes = palloc(sizeof(char *) * pol->nclasses);
	for (int i = 0; i < pol->nclasses; i++)
	{
		char	   *path = psprintf("completion_class_order[%d]", i);

		if (elems[i].type != jbvString)
			policy_error(path, NULL, "class names must be strings, not %s", rbr_jbv_type_name(&elems[i]));
		pol->classes[i] = rbr_jbv_cstring(&elems[i]);
		check_name(pol->classes[i], path, "class");
		for (int j = 0; j < i; j++)
			if (strcmp(pol->classes[j], pol->classes[i]) == 0)
				policy_error(path, "List each class once.", "duplicate class \"%s\"", pol->classes[i]);
		if (rbr_policy_prop_index(pol, pol->classes[i]) >= 0)
			policy_error(path, "Features are named after propositions and classes, so their names must differ.",
						 "\"%s\" is both a class and a proposition", pol->classes[i]);
	}

	citems = rbr_obj_items(classes, &ncitems);
	for (int i = 0; i < ncitems; i++)
		if (rbr_policy_class_index(pol, citems[i].key) < 0)
			policy_error(psprintf("completion_classes.%s", citems[i].key),
						 "Add it to completion_class_order, or remove its definition.",
						 "class \"%s\" is not in completion_class_order", citems[i].key);

	/* the response types: those of the first class in order */
	for (int c = 0; c < pol->nclasses; c++)
	{
		JsonbValue *def = rbr_obj_get(classes, pol->classes[c]);
		char	   *cpath = psprintf("completion_classes.%s", pol->classes[c]);
		RbrJsonItem   *rtitems;
		int			n;

		if (def == NULL)
			policy_error("completion_classes", "Define every class listed in completion_class_order.",
						 "class \"%s\" has no definition", pol->classes[c]);
		if (!rbr_jbv_is_object(def))
			policy_error(cpath, "Define a class as an object: response type -> literals.",
						 "class \"%s\" must be an object, not %s", pol->classes[c], rbr_jbv_type_name(def));
		rtitems = rbr_obj_items(def->val.binary.data, &n);
		if (n == 0)
			policy_error(cpath, "Define the class for every response type.",
						 "class \"%s\" defines no response type", pol->classes[c]);
		if (n > RBR_MAX_RESPTYPES)
			policy_error(cpath, "Split the policy: one per group of response types.",
						 "class \"%s\" defines %d response types (at most %d)", pol->classes[c], n, RBR_MAX_RESPTYPES);
		if (c == 0)
		{
			rtnames = palloc(sizeof(char *) * n);
			for (int i = 0; i < n; i++)
			{
				char	   *folded = rbr_fold_name(rtitems[i].key);
				char	   *rpath = psprintf("%s.%s", cpath, rtitems[i].key);

				check_name(folded, rpath, "response type");
				for (int j = 0; j < i; j++)
					if (strcmp(rtnames[j], folded) == 0)
						policy_error(rpath, "Response type names match after folding case, spaces and hyphens: keep one.",
									 "response type \"%s\" is given twice", folded);
				rtnames[i] = folded;
			}
			nrt = n;
			qsort(rtnames, nrt, sizeof(char *), cmp_cstring);
			pol->nresptypes = nrt;
			pol->resptypes = palloc0(sizeof(RbrRespType) * nrt);
			for (int i = 0; i < nrt; i++)
			{
				pol->resptypes[i].name = rtnames[i];
				pol->resptypes[i].classes = palloc0(sizeof(RbrClassDef) * pol->nclasses);
			}
		}
		/* every class must name exactly the same response types */
		for (int i = 0; i < n; i++)
		{
			char	   *folded = rbr_fold_name(rtitems[i].key);
			char	   *rpath = psprintf("%s.%s", cpath, rtitems[i].key);
			RbrRespType *rt = NULL;

			for (int j = 0; j < nrt; j++)
				if (strcmp(pol->resptypes[j].name, folded) == 0)
					rt = &pol->resptypes[j];
			if (rt == NULL)
				policy_error(rpath, psprintf("Every class must define the same response types; class \"%s\" defines: %s.",
											 pol->classes[0], joined_names(rtnames, nrt)),
							 "class \"%s\" names response type \"%s\" that class \"%s\" lacks",
							 pol->classes[c], folded, pol->classes[0]);
			if (rt->classes[c].lits != NULL)
				policy_error(rpath, "Response type names match after folding case, spaces and hyphens: keep one.",
							 "response type \"%s\" is given twice", folded);
			rt->classes[c].lits = parse_literals(pol, &rtitems[i].value, rpath,
												 &rt->classes[c].nlits);
		}
		for (int j = 0; j < nrt; j++)
			if (pol->resptypes[j].classes[c].lits == NULL)
				policy_error(cpath, "Every class must define the same response types.",
							 "class \"%s\" lacks response type \"%s\" that class \"%s\" names",
							 pol->classes[c], pol->resptypes[j].name, pol->classes[0]);
	}

	/* needed propositions and exact-mode repeated variables per response type */
	counts = palloc(sizeof(int) * pol->nprops);
	any = palloc0(sizeof(int) * pol->nprops);
	repeated = palloc(sizeof(int) * pol->nsimple);
	for (int r = 0; r < nrt; r++)
	{
		RbrRespType *rt = &pol->resptypes[r];

		for (int c = 0; c < pol->nclasses; c++)
		{
			RbrClassDef *def = &rt->classes[c];

			CHECK_FOR_INTERRUPTS();
			memset(counts, 0, sizeof(int) * pol->nprops);
			count_reach(pol, def->lits, def->nlits, counts);
			for (int p = 0; p < pol->nsimple; p++)
			{
				if (counts[p] > 1)
					repeated[def->nrepeated++] = p;
				any[p] = Min(any[p] + counts[p], 2);
			}
			def->repeated = palloc(sizeof(int) * Max(def->nrepeated, 1));
			memcpy(def->repeated, repeated, sizeof(int) * def->nrepeated);
			if (def->nrepeated > RBR_MAX_REPEATED)
				policy_error(psprintf("completion_classes.%s.%s", pol->classes[c], rt->name),
							 "Exact class probabilities enumerate repeated propositions; simplify the class.",
							 "class \"%s\" reaches %d propositions more than once (at most %d)",
							 pol->classes[c], def->nrepeated, RBR_MAX_REPEATED);
		}
		rt->needed = palloc(sizeof(int) * pol->nsimple);
		for (int p = 0; p < pol->nsimple; p++)
			if (any[p] > 0)
				rt->needed[rt->nneeded++] = p;
		memset(any, 0, sizeof(int) * pol->nprops);
	}
	pfree(counts);
	pfree(any);
	pfree(repeated);
}

/*
 * rt->graded: the simple propositions a response type's feature vector
 * needs, in proposition order. Its classes need rt->needed; a proposition
 * feature needs the simple propositions it reaches; a class feature needs
 * nothing more than the classes do.
 */
static void
compile_graded(RbrPolicy *pol, RbrRespType *rt)
{
	int		   *counts = palloc0(sizeof(int) * pol->nprops);

	for (int i = 0; i < rt->nneeded; i++)
		counts[rt->needed[i]]++;
	for (int f = 0; f < rt->nfeatures; f++)
		if (rt->features[f].kind == RBR_FEATURE_PROP)
		{
			RbrLiteral	lit = {rt->features[f].index, true};

			count_reach(pol, &lit, 1, counts);
		}
	rt->ngraded = 0;
	rt->graded = palloc(sizeof(int) * Max(pol->nsimple, 1));
	for (int p = 0; p < pol->nsimple; p++)
		if (counts[p] > 0)
			rt->graded[rt->ngraded++] = p;
	pfree(counts);
}

/* Parse optional per response type feature lists; default when absent. */
static void
compile_features(RbrPolicy *pol, JsonbContainer *root)
{
	JsonbContainer *feats = require_object(root, "features", false);

	if (feats)
	{
		RbrJsonItem   *items;
		int			n;

		items = rbr_obj_items(feats, &n);
		for (int i = 0; i < n; i++)
		{
			char	   *path = psprintf("features.%s", items[i].key);
			RbrRespType *rt = NULL;
			char	   *folded = rbr_fold_name(items[i].key);
			JsonbValue *elems;
			int			ne;
			bool	   *seen;

			for (int j = 0; j < pol->nresptypes; j++)
				if (strcmp(pol->resptypes[j].name, folded) == 0)
					rt = &pol->resptypes[j];
			if (rt == NULL)
				policy_error(path, "Feature lists are keyed by the response types the classes define.",
							 "unknown response type \"%s\"", items[i].key);
			if (rt->features_explicit)
				policy_error(path, "Response type names match after folding case, spaces and hyphens: keep one.",
							 "response type \"%s\" is given twice", folded);
			if (!rbr_jbv_is_array(&items[i].value))
				policy_error(path, "List feature names: propositions and classes.",
							 "a feature list must be an array, not %s", rbr_jbv_type_name(&items[i].value));
			elems = rbr_arr_items(items[i].value.val.binary.data, &ne);
			if (ne == 0)
				policy_error(path, "List at least one feature, or leave the response type out for the default list.",
							 "empty feature list");
			if (ne > RBR_MAX_ENTRIES)
				policy_error(path, "List each proposition and class at most once.",
							 "%d features (at most %d)", ne, RBR_MAX_ENTRIES);
			rt->features = palloc(sizeof(RbrFeature) * ne);
			seen = palloc0(sizeof(bool) * (pol->nprops + pol->nclasses));
			for (int k = 0; k < ne; k++)
			{
				char	   *epath = psprintf("%s[%d]", path, k);
				char	   *fname;
				int			idx;

				CHECK_FOR_INTERRUPTS();

				if (elems[k].type != jbvString)
					policy_error(epath, NULL, "feature names must be strings, not %s", rbr_jbv_type_name(&elems[k]));
				fname = rbr_jbv_cstring(&elems[k]);
				if ((idx = rbr_policy_prop_index(pol, fname)) >= 0)
				{
					rt->features[k].kind = RBR_FEATURE_PROP;
					rt->features[k].index = idx;
				}
				else if ((idx = rbr_policy_class_index(pol, fname)) >= 0)
				{
					rt->features[k].kind = RBR_FEATURE_CLASS;
					rt->features[k].index = idx;
				}
				else
					policy_error(epath, "A feature is a simple or derived proposition, or a class of the policy.",
								 "unknown feature \"%s\"", fname);
				idx = rt->features[k].index + (rt->features[k].kind == RBR_FEATURE_CLASS ? pol->nprops : 0);
				if (seen[idx])
					policy_error(epath, "List each feature once.", "duplicate feature \"%s\"", fname);
				seen[idx] = true;
				pfree(epath);
				pfree(fname);
			}
			pfree(seen);
			rt->nfeatures = ne;
			rt->features_explicit = true;
		}
	}

	/* default: the simple propositions the classes reach, then every class */
	for (int r = 0; r < pol->nresptypes; r++)
	{
		RbrRespType *rt = &pol->resptypes[r];
		int			k = 0;

		if (rt->features_explicit)
		{
			compile_graded(pol, rt);
			continue;
		}
		rt->nfeatures = rt->nneeded + pol->nclasses;
		rt->features = palloc(sizeof(RbrFeature) * rt->nfeatures);
		for (int i = 0; i < rt->nneeded; i++, k++)
		{
			rt->features[k].kind = RBR_FEATURE_PROP;
			rt->features[k].index = rt->needed[i];
		}
		for (int c = 0; c < pol->nclasses; c++, k++)
		{
			rt->features[k].kind = RBR_FEATURE_CLASS;
			rt->features[k].index = c;
		}
		compile_graded(pol, rt);
	}
}

/* Parse optional label tiers; default: a class's position in the order. */
static void
compile_tiers(RbrPolicy *pol, JsonbContainer *root)
{
	JsonbContainer *tiers = require_object(root, "label_tiers", false);

	if (tiers)
	{
		RbrJsonItem   *items;
		int			n;

		items = rbr_obj_items(tiers, &n);
		for (int i = 0; i < n; i++)
		{
			char	   *path = psprintf("label_tiers.%s", items[i].key);
			char	   *folded = rbr_fold_name(items[i].key);
			RbrRespType *rt = NULL;
			RbrJsonItem   *labels;
			int			nl;

			for (int j = 0; j < pol->nresptypes; j++)
				if (strcmp(pol->resptypes[j].name, folded) == 0)
					rt = &pol->resptypes[j];
			if (rt == NULL)
				policy_error(path, "Label tiers are keyed by the response types the classes define.",
							 "unknown response type \"%s\"", items[i].key);
			if (rt->tiers_explicit)
				policy_error(path, "Response type names match after folding case, spaces and hyphens: keep one.",
							 "response type \"%s\" is given twice", folded);
			if (!rbr_jbv_is_object(&items[i].value))
				policy_error(path, "Map each label to its tier: {\"ideal\": 0, \"bad_refusal\": 1, ...}; 0 is best.",
							 "label tiers must be an object, not %s", rbr_jbv_type_name(&items[i].value));
			labels = rbr_obj_items(items[i].value.val.binary.data, &nl);
			if (nl == 0)
				policy_error(path, "Map at least one label to a tier.", "no label tiers");
			if (nl > RBR_MAX_ENTRIES)
				policy_error(path, "Keep one label per kind of completion.",
							 "%d label tiers (at most %d)", nl, RBR_MAX_ENTRIES);
			rt->tiers = palloc(sizeof(RbrTier) * nl);
			for (int k = 0; k < nl; k++)
			{
				char	   *lpath = psprintf("%s.%s", path, labels[k].key);
				JsonbValue *v = &labels[k].value;
				int32		tier;

				CHECK_FOR_INTERRUPTS();
				if (labels[k].key[0] == '\0')
					policy_error(lpath, "Give every label a non-empty name.", "empty label name");
				if (v->type != jbvNumeric)
					policy_error(lpath, "Tiers are whole numbers, 0 for the best.",
								 "tier of label \"%s\" must be a number, not %s", labels[k].key, rbr_jbv_type_name(v));
				tier = DatumGetInt32(DirectFunctionCall1(numeric_int4, NumericGetDatum(v->val.numeric)));
				if (tier < 0 || !DatumGetBool(DirectFunctionCall2(numeric_eq, NumericGetDatum(v->val.numeric),
																  DirectFunctionCall1(int4_numeric, Int32GetDatum(tier)))))
					policy_error(lpath, "Tiers are whole numbers, 0 for the best.",
								 "tier of label \"%s\" must be a whole number >= 0", labels[k].key);
				rt->tiers[k].label = pstrdup(labels[k].key);
				rt->tiers[k].tier = tier;
			}
			rt->ntiers = nl;
			rt->tiers_explicit = true;
		}
	}
	for (int r = 0; r < pol->nresptypes; r++)
	{
		RbrRespType *rt = &pol->resptypes[r];

		if (rt->tiers_explicit)
			continue;
		rt->ntiers = pol->nclasses;
		rt->tiers = palloc(sizeof(RbrTier) * pol->nclasses);
		for (int c = 0; c < pol->nclasses; c++)
		{
			rt->tiers[c].label = pol->classes[c];
			rt->tiers[c].tier = c;
		}
	}
}

/* Parse the optional behavior policy: category -> response type. */
static void
compile_behavior(RbrPolicy *pol, JsonbContainer *root)
{
	JsonbContainer *beh = require_object(root, "behavior_policy", false);
	RbrJsonItem   *items;
	int			n;

	if (beh == NULL)
		return;
	items = rbr_obj_items(beh, &n);
	if (n > RBR_MAX_ENTRIES)
		policy_error("behavior_policy", "Group content categories.",
					 "%d content categories (at most %d)", n, RBR_MAX_ENTRIES);
	pol->behavior = palloc(sizeof(RbrBehavior) * (n + 1));
	for (int i = 0; i < n; i++)
	{
		char	   *path = psprintf("behavior_policy.%s", items[i].key);
		char	   *folded;
		int			idx = -1;

		if (items[i].key[0] == '\0')
			policy_error(path, "Give every content category a non-empty code, such as K-R.", "empty category name");
		if (items[i].value.type != jbvString)
			policy_error(path, "Map each content category to a response type name.",
						 "response type of category \"%s\" must be a string, not %s",
						 items[i].key, rbr_jbv_type_name(&items[i].value));
		CHECK_FOR_INTERRUPTS();
		folded = rbr_fold_name(rbr_jbv_cstring(&items[i].value));
		for (int j = 0; j < pol->nresptypes; j++)
			if (strcmp(pol->resptypes[j].name, folded) == 0)
				idx = j;
		if (idx < 0)
			policy_error(path, "Use one of the response types the classes define.",
						 "category \"%s\" maps to unknown response type \"%s\"", items[i].key, folded);
		pol->behavior[i].category = pstrdup(items[i].key);
		pol->behavior[i].resptype = idx;
	}
	pol->nbehavior = n;
}

/* Parse and validate a spec; ERROR naming the problem if it is invalid. */
RbrPolicy *
rbr_policy_compile(Jsonb *spec, const char *name, int version, MemoryContext parent)
{
	MemoryContext cxt = AllocSetContextCreate(parent, "rbr policy", ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	JsonbContainer *root = &spec->root;
	RbrPolicy  *pol;
	JsonbValue *tmpl;
	RbrJsonItem   *items;
	int			n;

	if (!JsonContainerIsObject(root) || JsonContainerIsScalar(root))
		policy_error("the top level", "Pass the policy document as a JSON object, as in policy.json.",
					 "a policy must be a JSON object");
	if (VARSIZE(spec) > RBR_MAX_SPEC_BYTES)
		policy_error("the top level", "Split the policy; doc/reference.md lists the limits of a spec.",
					 "spec is %zu bytes as jsonb (at most %d)", (size_t) VARSIZE(spec), RBR_MAX_SPEC_BYTES);
	memset(&reach_scratch, 0, sizeof(reach_scratch));

	items = rbr_obj_items(root, &n);
	for (int i = 0; i < n; i++)
	{
		bool		known = false;

		for (int k = 0; spec_keys[k]; k++)
			known |= strcmp(spec_keys[k], items[i].key) == 0;
		if (!known)
			policy_error(items[i].key,
						 "Known keys: prompt_template, completion_class_order, completion_classes, derived_propositions, simple_propositions, behavior_policy, label_tiers, features, description.",
						 "unknown key \"%s\"", items[i].key);
	}

	pol = palloc0(sizeof(RbrPolicy));
	pol->mcxt = cxt;
	pol->name = pstrdup(name ? name : "(unnamed)");
	pol->version = version;

	tmpl = rbr_obj_get(root, "prompt_template");
	if (tmpl == NULL || tmpl->type != jbvString)
		policy_error("prompt_template", "Give the grader prompt template as a string with {question} and {response}.",
					 "missing or non-string \"prompt_template\"");
	pol->prompt_template = rbr_jbv_cstring(tmpl);
	if (strstr(pol->prompt_template, "{question}") == NULL)
		policy_error("prompt_template", "Put {question} where the proposition's grader prompt goes.",
					 "prompt template lacks the {question} placeholder");
	if (strstr(pol->prompt_template, "{response}") == NULL)
		policy_error("prompt_template", "Put {response} where the completion being judged goes.",
					 "prompt template lacks the {response} placeholder");

	compile_propositions(pol, root);
	compile_classes(pol, root);
	compile_features(pol, root);
	compile_tiers(pol, root);
	compile_behavior(pol, root);

	if (reach_scratch.stamp != NULL)
	{
		pfree(reach_scratch.stamp);
		pfree(reach_scratch.paths);
		pfree(reach_scratch.order);
	}
	memset(&reach_scratch, 0, sizeof(reach_scratch));
	MemoryContextSwitchTo(old);
	return pol;
}

/* ---------------------------------------------------------------------------
 * Cache: compiled policies per backend, invalidated when rbr.policy_version
 * changes (see rbr_tables_generation() in rbr.c).
 * ------------------------------------------------------------------------- */

#define POLICY_REF_MAX (NAMEDATALEN + 16)

typedef struct PolicyCacheEntry
{
	char		ref[POLICY_REF_MAX];	/* hash key: "name" or "name@N" */
	RbrPolicy  *policy;
	uint64		generation;
} PolicyCacheEntry;

static HTAB *policy_cache = NULL;

/* Parse "name" or "name@N" into name and version (0 = latest). */
static void
parse_policy_ref(const char *ref, char **name, int *version)
{
	const char *at = strrchr(ref, '@');

	*version = 0;
	if (at != NULL)
	{
		char	   *end;
		long		v = strtol(at + 1, &end, 10);

		if (at[1] == '\0' || *end != '\0' || v <= 0 || v > PG_INT32_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid policy reference \"%s\"", ref),
					 errhint("Name a policy as 'name' for its latest version or 'name@N' for version N.")));
		*name = pnstrdup(ref, at - ref);
		*version = (int) v;
	}
	else
		*name = pstrdup(ref);
}

/* Read a policy version's spec from rbr.policy_version and compile it. */
static RbrPolicy *
load_policy(const char *ref)
{
	char	   *name;
	int			version;
	RbrPolicy  *pol = NULL;
	MemoryContext caller = CurrentMemoryContext;
	Datum		args[2];
	Oid			argtypes[2] = {TEXTOID, INT4OID};
	int			ret;

	parse_policy_ref(ref, &name, &version);
	args[0] = CStringGetTextDatum(name);
	args[1] = Int32GetDatum(version);

	SPI_connect();
	ret = SPI_execute_with_args("SELECT version, spec FROM rbr.policy_version "
								"WHERE policy OPERATOR(pg_catalog.=) $1 AND ($2 OPERATOR(pg_catalog.=) 0 "
								"OR version OPERATOR(pg_catalog.=) $2) "
								"ORDER BY version DESC LIMIT 1",
								2, argtypes, args, NULL, true, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "rbr: reading rbr.policy_version failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 1)
	{
		bool		isnull;
		int			v = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		Jsonb	   *spec = DatumGetJsonbP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));

		/* compile under the caller's context; the cache re-parents it */
		pol = rbr_policy_compile(spec, name, v, caller);
	}
	SPI_finish();

	if (pol == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 version ? errmsg("policy \"%s\" has no version %d", name, version)
				 : errmsg("policy \"%s\" does not exist", name),
				 errhint("Load it with rbr_policy_load(name, spec); rbr.policies lists the loaded ones.")));
	return pol;
}

/* The compiled policy for 'name' (latest version) or 'name@N'; cached. */
RbrPolicy *
rbr_policy_get(const char *ref)
{
	PolicyCacheEntry *entry;
	bool		found;

	if (strlen(ref) >= POLICY_REF_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_NAME_TOO_LONG),
				 errmsg("policy reference is too long"),
				 errdetail("It has %zu bytes; the longest is %d.", strlen(ref), POLICY_REF_MAX - 1)));
	if (ref[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("policy name is empty"),
				 errhint("Name a policy as 'name' for its latest version or 'name@N' for version N.")));

	if (policy_cache == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = POLICY_REF_MAX;
		ctl.entrysize = sizeof(PolicyCacheEntry);
		ctl.hcxt = CacheMemoryContext;
		policy_cache = hash_create("rbr policy cache", 16, &ctl,
								   HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}

	entry = hash_search(policy_cache, ref, HASH_FIND, &found);
	if (found && entry->generation == rbr_tables_generation())
		return entry->policy;

	{
		uint64		gen = rbr_tables_generation();
		RbrPolicy  *pol = load_policy(ref);

		MemoryContextSetParent(pol->mcxt, CacheMemoryContext);
		entry = hash_search(policy_cache, ref, HASH_ENTER, &found);
		/*
		 * A stale version may still be referenced by a caller up the stack in
		 * this transaction; free it when the transaction ends.
		 */
		if (found && entry->policy != NULL)
			MemoryContextSetParent(entry->policy->mcxt, TopTransactionContext);
		entry->policy = pol;
		entry->generation = gen;
		return pol;
	}
}

/* ---------------------------------------------------------------------------
 * SQL-callable functions
 * ------------------------------------------------------------------------- */

PG_FUNCTION_INFO_V1(rbr_policy_validate);
/* rbr_policy_validate(spec jsonb): ERROR if the spec is invalid, else true. */
Datum
rbr_policy_validate(PG_FUNCTION_ARGS)
{
	Jsonb	   *spec = PG_GETARG_JSONB_P(0);
	RbrPolicy  *pol = rbr_policy_compile(spec, NULL, 0, CurrentMemoryContext);

	MemoryContextDelete(pol->mcxt);
	PG_RETURN_BOOL(true);
}

PG_FUNCTION_INFO_V1(rbr_response_type);
/* rbr_response_type(policy, category): the behavior policy's response type. */
Datum
rbr_response_type(PG_FUNCTION_ARGS)
{
	char	   *ref = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *category = text_to_cstring(PG_GETARG_TEXT_PP(1));
	RbrPolicy  *pol = rbr_policy_get(ref);

	if (pol->nbehavior == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("policy \"%s\" has no behavior policy", pol->name),
				 errhint("Add \"behavior_policy\": {\"K-R\": \"hard_refuse\", ...} to the spec and load it again.")));
	for (int i = 0; i < pol->nbehavior; i++)
		if (strcmp(pol->behavior[i].category, category) == 0)
			PG_RETURN_TEXT_P(cstring_to_text(pol->resptypes[pol->behavior[i].resptype].name));
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("policy \"%s\" has no content category \"%s\"", pol->name, category),
			 errhint("Categories are matched exactly; add it to the policy's behavior_policy.")));
	PG_RETURN_NULL();
}

PG_FUNCTION_INFO_V1(rbr_label_tier);
/* rbr_label_tier(policy, response_type, label): the tier used when fitting. */
Datum
rbr_label_tier(PG_FUNCTION_ARGS)
{
	char	   *ref = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *rtname = text_to_cstring(PG_GETARG_TEXT_PP(1));
	char	   *label = text_to_cstring(PG_GETARG_TEXT_PP(2));
	RbrPolicy  *pol = rbr_policy_get(ref);
	RbrRespType *rt = rbr_policy_resptype(pol, rtname);
	StringInfoData known;

	for (int i = 0; i < rt->ntiers; i++)
		if (strcmp(rt->tiers[i].label, label) == 0)
			PG_RETURN_INT32(rt->tiers[i].tier);
	initStringInfo(&known);
	for (int i = 0; i < rt->ntiers; i++)
		appendStringInfo(&known, "%s%s", i ? ", " : "", rt->tiers[i].label);
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("response type \"%s\" of policy \"%s\" has no label \"%s\"", rt->name, pol->name, label),
			 errdetail("Its labels are: %s.", known.data),
			 errhint("Add the label to the policy's label_tiers.")));
	PG_RETURN_NULL();
}

PG_FUNCTION_INFO_V1(rbr_policy_info);
/* rbr_policy_info(policy): the compiled policy as jsonb (resolved defaults). */
Datum
rbr_policy_info(PG_FUNCTION_ARGS)
{
	char	   *ref = text_to_cstring(PG_GETARG_TEXT_PP(0));
	RbrPolicy  *pol = rbr_policy_get(ref);
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"name\": ");
	escape_json(&buf, pol->name);
	appendStringInfo(&buf, ", \"version\": %d, \"simple_propositions\": [", pol->version);
	for (int i = 0; i < pol->nsimple; i++)
	{
		if (i)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, pol->props[i].name);
	}
	appendStringInfoString(&buf, "], \"derived_propositions\": [");
	for (int i = pol->nsimple; i < pol->nprops; i++)
	{
		if (i > pol->nsimple)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, pol->props[i].name);
	}
	appendStringInfoString(&buf, "], \"classes\": [");
	for (int i = 0; i < pol->nclasses; i++)
	{
		if (i)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, pol->classes[i]);
	}
	appendStringInfoString(&buf, "], \"response_types\": {");
	for (int r = 0; r < pol->nresptypes; r++)
	{
		RbrRespType *rt = &pol->resptypes[r];

		if (r)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, rt->name);
		appendStringInfoString(&buf, ": {\"propositions\": [");
		for (int i = 0; i < rt->nneeded; i++)
		{
			if (i)
				appendStringInfoString(&buf, ", ");
			escape_json(&buf, pol->props[rt->needed[i]].name);
		}
		appendStringInfoString(&buf, "], \"graded_propositions\": [");
		for (int i = 0; i < rt->ngraded; i++)
		{
			if (i)
				appendStringInfoString(&buf, ", ");
			escape_json(&buf, pol->props[rt->graded[i]].name);
		}
		appendStringInfo(&buf, "], \"features_default\": %s, \"features\": [",
						 rt->features_explicit ? "false" : "true");
		for (int i = 0; i < rt->nfeatures; i++)
		{
			if (i)
				appendStringInfoString(&buf, ", ");
			escape_json(&buf, rbr_feature_name(pol, &rt->features[i]));
		}
		appendStringInfo(&buf, "], \"label_tiers_default\": %s, \"label_tiers\": {",
						 rt->tiers_explicit ? "false" : "true");
		for (int i = 0; i < rt->ntiers; i++)
		{
			if (i)
				appendStringInfoString(&buf, ", ");
			escape_json(&buf, rt->tiers[i].label);
			appendStringInfo(&buf, ": %d", rt->tiers[i].tier);
		}
		appendStringInfoString(&buf, "}}");
	}
	appendStringInfoString(&buf, "}, \"behavior_policy\": {");
	for (int i = 0; i < pol->nbehavior; i++)
	{
		if (i)
			appendStringInfoString(&buf, ", ");
		escape_json(&buf, pol->behavior[i].category);
		appendStringInfoString(&buf, ": ");
		escape_json(&buf, pol->resptypes[pol->behavior[i].resptype].name);
	}
	appendStringInfoString(&buf, "}}");
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}
