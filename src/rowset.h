/*
 * rowset.h: the rows an aggregate over ranked completions collects, as the
 * SQL type rbr.fit_rows.
 *
 * rbr_fit(), rbr_pair_accuracy(), rbr_pair_counts() and rbr_pair_errors()
 * need every row of a group (prompt) before they can form pairs, so their
 * state keeps the rows: group key, tier, base reward (or score), an optional
 * label and an optional feature vector. In memory the state is an expanded
 * object (utils/expandeddatum.h) that lives in the aggregate's memory
 * context, so the transition function appends in place; its flat form (a
 * versioned, validated varlena) is what goes between parallel workers and,
 * through the type's text and binary I/O, to and from Citus workers. The
 * rows can be merged (combine) and sorted into a canonical order so that a
 * result never depends on the order rows arrived in.
 */
#ifndef RBR_ROWSET_H
#define RBR_ROWSET_H

#include "postgres.h"

#include "fmgr.h"
#include "utils/expandeddatum.h"

typedef struct RbrRowSet
{
	ExpandedObjectHeader hdr;	/* first: this is an expanded object */
	int			d;				/* features per row; -1 until the first row */
	int64		nrows;
	int64		cap;
	double	   *x;				/* cap * d */
	double	   *base;			/* base reward, or score */
	int32	   *tier;
	int64	   *key_off;		/* offset of each row's group key in keys */
	int64	   *label_off;		/* offset of each row's label in keys, -1 = none;
								 * NULL while no row has a label */
	char	   *keys;			/* NUL-terminated group keys and labels */
	int64		keys_len;
	int64		keys_cap;
	int64		skipped;		/* rows skipped because an input was NULL */
	char	   *options;		/* options (jsonb text) of the first row, or NULL */
	MemoryContext mcxt;			/* where the arrays live (hdr.eoh_context) */
} RbrRowSet;

/*
 * Rows sorted canonically (group key, tier, label, base, features), grouped.
 * Row r is row row[r] of the state; x is either a sorted copy of the
 * features (x_row NULL) or the state's own features, row r's at row
 * x_row[r] (no copy).
 */
typedef struct RbrSortedRows
{
	int			d;
	int64		nrows;
	const double *x;
	const int64 *x_row;			/* NULL when x is a sorted copy */
	double	   *base;
	int32	   *tier;
	const char **label;			/* nrows; NULL where a row has none */
	int64		ngroups;
	int64	   *group_start;	/* ngroups + 1 */
	const char **group_key;		/* ngroups */
} RbrSortedRows;

/*
 * The state of an aggregate's transition or combine function (argument
 * argno), ready to append to in place: a new empty one when the argument is
 * NULL, the argument itself when it is our read-write expanded object, else
 * an expanded copy. Always in the aggregate's memory context.
 */
extern RbrRowSet *rbr_rowset_state(FunctionCallInfo fcinfo, int argno, const char *fname);

/* The datum that returns a state from a transition or combine function. */
#define RbrRowSetGetDatum(rs) EOHPGetRWDatum(&(rs)->hdr)

/* Read a state datum (expanded or flat) in a final function; read only. */
extern const RbrRowSet *rbr_rowset_read(Datum d);

/* Append one row; label may be NULL, x may be NULL when d == 0. */
extern void rbr_rowset_add(RbrRowSet *rs, const char *key, int keylen,
						   const char *label, int labellen, int32 tier,
						   double base, const double *x, int d);

/* Append every row of src to dst (combine). */
extern void rbr_rowset_merge(RbrRowSet *dst, const RbrRowSet *src);

/*
 * The rows in canonical order, grouped; the features copied in that order
 * when copy_x, or when the state's rows are too scattered to read through
 * x_row.
 */
extern RbrSortedRows *rbr_rowset_sort(const RbrRowSet *rs, bool copy_x);

/* ERROR unless a tier is a whole number >= 0. */
extern void rbr_check_tier(int32 tier);

/* Settings of the row store (rbr.fit_max_memory). */
extern void rbr_rowset_init_settings(void);

#endif							/* RBR_ROWSET_H */
