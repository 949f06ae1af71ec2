/*
 * rowset.h: the rows an aggregate over ranked completions collects.
 *
 * rbr_fit() and rbr_pair_accuracy() both need every row of a group (prompt)
 * before they can form pairs, so their transition state keeps the rows:
 * group key, tier, base reward (or score) and an optional feature vector.
 * The state can be merged (combine), serialized for parallel workers and
 * Citus, and sorted into a canonical order so that a result never depends
 * on the order rows arrived in.
 */
#ifndef RBR_ROWSET_H
#define RBR_ROWSET_H

#include "postgres.h"

#include "fmgr.h"

typedef struct RbrRowSet
{
	int			d;				/* features per row; -1 until the first row */
	int64		nrows;
	int64		cap;
	double	   *x;				/* cap * d */
	double	   *base;			/* base reward, or score */
	int32	   *tier;
	int64	   *key_off;		/* offset of each row's group key in keys */
	int64	   *label_off;		/* offset of each row's label in keys, -1 = none */
	char	   *keys;			/* NUL-terminated group keys and labels */
	int64		keys_len;
	int64		keys_cap;
	int64		skipped;		/* rows skipped because an input was NULL */
	char	   *options;		/* options (jsonb text) of the first row, or NULL */
	MemoryContext mcxt;			/* where the arrays live */
} RbrRowSet;

/* Rows sorted canonically (group key, tier, label, base, features), grouped. */
typedef struct RbrSortedRows
{
	int			d;
	int64		nrows;
	double	   *x;
	double	   *base;
	int32	   *tier;
	const char **label;			/* nrows; NULL where a row has none */
	int64		ngroups;
	int64	   *group_start;	/* ngroups + 1 */
	const char **group_key;		/* ngroups */
} RbrSortedRows;

/* A new empty row set in the aggregate's memory context. */
extern RbrRowSet *rbr_rowset_create(FunctionCallInfo fcinfo, const char *fname);

/* Append one row; label may be NULL, x may be NULL when d == 0. */
extern void rbr_rowset_add(RbrRowSet *rs, const char *key, int keylen,
						   const char *label, int labellen, int32 tier,
						   double base, const double *x, int d);

/* Append every row of src to dst (combine). */
extern void rbr_rowset_merge(RbrRowSet *dst, const RbrRowSet *src);

/* Serialize into a bytea, and back (with version and length checks). */
extern bytea *rbr_rowset_serialize(const RbrRowSet *rs);
extern RbrRowSet *rbr_rowset_deserialize(bytea *b, MemoryContext mcxt);

/* The rows in canonical order, grouped. */
extern RbrSortedRows *rbr_rowset_sort(const RbrRowSet *rs);

/* ERROR unless a tier is a whole number >= 0. */
extern void rbr_check_tier(int32 tier);

/* Settings of the row store (rbr.fit_max_memory). */
extern void rbr_rowset_init_settings(void);

#endif							/* RBR_ROWSET_H */
