/*
 * rowset.c: the rows an aggregate over ranked completions collects, the SQL
 * type rbr.fit_rows (see rowset.h): an expanded object that grows in place
 * with a memory limit, its flat form (validated), text and binary I/O,
 * combine, and the canonical sort.
 */
#include "postgres.h"

#include <limits.h>
#include <math.h>

#include "common/base64.h"
#include "common/hashfn.h"
#include "libpq/pqformat.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "rowset.h"

/* Most memory one row set may use, in MB (rbr.fit_max_memory). */
static int	rowset_max_memory_mb = 2048;

/*
 * The flat form: this header, then (each section starting 8-aligned from
 * the start of the varlena) the options text, x (nrows * d), base, key_off,
 * label_off (only with FLAT_HAS_LABELS), tier, and the keys arena. Host byte
 * order; the magic doubles as a version tag (and detects a byte-order
 * mismatch). The text form is FLAT_TEXT_PREFIX and the base64 of the bytes
 * after the varlena header.
 */
#define FLAT_MAGIC 0x52425232	/* "RBR2": version 2 (version 1 was the bytea of 0.2) */
#define FLAT_HAS_LABELS 1
#define FLAT_TEXT_PREFIX "rbr2:"
#define FLAT_MAX_D 65536		/* features per row a value may declare */
#define FLAT_MAX_ROWS (INT64CONST(1) << 40)

typedef struct FitRowsFlat
{
	int32		vl_len_;		/* varlena header (do not touch directly) */
	uint32		magic;
	int32		d;
	int32		options_len;	/* -1 = none */
	int32		flags;
	int32		pad;			/* 0 */
	int64		nrows;
	int64		keys_len;
	int64		skipped;
} FitRowsFlat;

/* Offsets of the sections of a flat value, from the start of the varlena. */
typedef struct FlatLayout
{
	uint64		opt,
				x,
				base,
				key_off,
				label_off,
				tier,
				keys,
				total;
} FlatLayout;

/* The rows of a state, wherever they are (expanded or flat): read only. */
typedef struct RowsSrc
{
	int			d;
	int64		nrows;
	const double *x;
	const double *base;
	const int32 *tier;
	const int64 *key_off;
	const int64 *label_off;		/* NULL = no labels */
	const char *keys;
	int64		keys_len;
	int64		skipped;
	const char *options;		/* not NUL-terminated; NULL = none */
	int32		options_len;
} RowsSrc;

static Size rowset_get_flat_size(ExpandedObjectHeader *eohptr);
static void rowset_flatten_into(ExpandedObjectHeader *eohptr, void *result, Size allocated_size);

static const ExpandedObjectMethods rowset_methods = {
	rowset_get_flat_size,
	rowset_flatten_into
};

/* Settings of the row store (rbr.fit_max_memory). */
void
rbr_rowset_init_settings(void)
{
	DefineCustomIntVariable("rbr.fit_max_memory",
							"Most memory the rows collected by one rbr_fit or rbr_pair_accuracy aggregate may use.",
							"Past it the aggregate stops with an error instead of exhausting the server's memory.",
							&rowset_max_memory_mb,
							2048, 1, INT_MAX / 2,
							PGC_USERSET, GUC_UNIT_MB,
							NULL, NULL, NULL);
}

/* Bytes a row set with this capacity occupies. */
static Size
rowset_bytes(int d, int64 cap, int64 keys_cap, bool labels)
{
	return (Size) cap * (sizeof(double) * (Max(d, 0) + 1) + sizeof(int32) + (labels ? 2 : 1) * sizeof(int64)) + keys_cap;
}

/* ERROR when a row set would grow past rbr.fit_max_memory. */
static void
check_memory(int d, int64 cap, int64 keys_cap, bool labels)
{
	Size		bytes = rowset_bytes(d, cap, keys_cap, labels);

	if (bytes > (Size) rowset_max_memory_mb * 1024 * 1024)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("rows collected for fitting exceed rbr.fit_max_memory (%d MB)", rowset_max_memory_mb),
				 errdetail("%lld rows of %d features need about %zu MB.",
						   (long long) cap, Max(d, 0), bytes / (1024 * 1024)),
				 errhint("Raise rbr.fit_max_memory if the server has the memory, or fit on a sample of the prompts.")));
}

/* ERROR unless a tier is a whole number >= 0. */
void
rbr_check_tier(int32 tier)
{
	if (tier < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tier %d is negative", tier),
				 errhint("Tiers are whole numbers, 0 for the best completions; rbr_label_tier() maps labels to tiers.")));
}

/* A new empty row set in the memory context cxt (which it does not own alone when shared). */
static RbrRowSet *
rowset_new_in(MemoryContext cxt)
{
	RbrRowSet  *rs = MemoryContextAllocZero(cxt, sizeof(RbrRowSet));

	EOH_init_header(&rs->hdr, &rowset_methods, cxt);
	rs->d = -1;
	rs->mcxt = cxt;
	return rs;
}

/* A new empty row set in its own small memory context under parent. */
static RbrRowSet *
rowset_new(MemoryContext parent)
{
	return rowset_new_in(AllocSetContextCreate(parent, "rbr.fit_rows", ALLOCSET_START_SMALL_SIZES));
}

/*
 * The states of one aggregate call site share one memory context under the
 * aggregate context (cached in fn_extra, forgotten when the aggregate
 * context is reset): a context per group would make nodeAgg's memory
 * accounting, which walks every child context each time a hash table gets a
 * new group, quadratic in the number of groups. A state in it is never
 * handed to nodeAgg for deletion: the transition and combine functions
 * always return the state they were given, once they have one.
 */
typedef struct StateCache
{
	MemoryContext aggcxt;
	MemoryContext cxt;
} StateCache;

/* Forget the cached context when its aggregate context is reset (callback). */
typedef struct StateCacheReset
{
	MemoryContextCallback cb;
	StateCache *cache;
	MemoryContext aggcxt;
} StateCacheReset;

/* Reset callback of StateCacheReset. */
static void
state_cache_reset(void *arg)
{
	StateCacheReset *r = arg;

	if (r->cache->aggcxt == r->aggcxt)
	{
		r->cache->aggcxt = NULL;
		r->cache->cxt = NULL;
	}
}

/* The shared context of the states of this call site in aggcxt. */
static MemoryContext
states_context(FunctionCallInfo fcinfo, MemoryContext aggcxt)
{
	StateCache *c = fcinfo->flinfo->fn_extra;

	if (c == NULL)
	{
		c = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(StateCache));
		fcinfo->flinfo->fn_extra = c;
	}
	if (c->aggcxt != aggcxt || c->cxt == NULL)
	{
		StateCacheReset *r = MemoryContextAlloc(aggcxt, sizeof(StateCacheReset));

		c->cxt = AllocSetContextCreate(aggcxt, "rbr.fit_rows states", ALLOCSET_DEFAULT_SIZES);
		c->aggcxt = aggcxt;
		r->cache = c;
		r->aggcxt = aggcxt;
		r->cb.func = state_cache_reset;
		r->cb.arg = r;
		MemoryContextRegisterResetCallback(aggcxt, &r->cb);
	}
	return c->cxt;
}

/* Give every row a label slot (-1) once the first label arrives. */
static void
rowset_enable_labels(RbrRowSet *rs)
{
	check_memory(rs->d, rs->cap, rs->keys_cap, true);
	rs->label_off = MemoryContextAllocHuge(rs->mcxt, sizeof(int64) * Max(rs->cap, 1));
	for (int64 i = 0; i < rs->nrows; i++)
		rs->label_off[i] = -1;
}

/* Make room for n more rows and keylen more key bytes (geometric growth, from small). */
static void
rowset_reserve(RbrRowSet *rs, int64 n, int64 keylen)
{
	int			d = Max(rs->d, 0);
	bool		labels = rs->label_off != NULL;

	if (rs->nrows + n > rs->cap)
	{
		int64		cap = Max(Max(rs->cap * 2, rs->nrows + n), 4);

		check_memory(d, cap, rs->keys_cap, labels);
		if (rs->cap == 0)
		{
			rs->x = d > 0 ? MemoryContextAllocHuge(rs->mcxt, sizeof(double) * cap * d) : NULL;
			rs->base = MemoryContextAllocHuge(rs->mcxt, sizeof(double) * cap);
			rs->tier = MemoryContextAllocHuge(rs->mcxt, sizeof(int32) * cap);
			rs->key_off = MemoryContextAllocHuge(rs->mcxt, sizeof(int64) * cap);
			if (labels)
				rs->label_off = repalloc_huge(rs->label_off, sizeof(int64) * cap);
		}
		else
		{
			if (d > 0)
				rs->x = rs->x ? repalloc_huge(rs->x, sizeof(double) * cap * d)
					: MemoryContextAllocHuge(rs->mcxt, sizeof(double) * cap * d);
			rs->base = repalloc_huge(rs->base, sizeof(double) * cap);
			rs->tier = repalloc_huge(rs->tier, sizeof(int32) * cap);
			rs->key_off = repalloc_huge(rs->key_off, sizeof(int64) * cap);
			if (labels)
				rs->label_off = repalloc_huge(rs->label_off, sizeof(int64) * cap);
		}
		rs->cap = cap;
	}
	if (rs->keys_len + keylen > rs->keys_cap)
	{
		int64		kcap = Max(Max(rs->keys_cap * 2, rs->keys_len + keylen), 32);

		check_memory(d, rs->cap, kcap, labels);
		rs->keys = rs->keys ? repalloc_huge(rs->keys, kcap) : MemoryContextAllocHuge(rs->mcxt, kcap);
		rs->keys_cap = kcap;
	}
}

/* Copy a string into the keys arena; returns its offset. */
static inline int64
rowset_put_string(RbrRowSet *rs, const char *str, int len)
{
	int64		off = rs->keys_len;

	memcpy(rs->keys + off, str, len);
	rs->keys[off + len] = '\0';
	rs->keys_len += len + 1;
	return off;
}

/* ERROR: feature vectors of different lengths. */
static void
length_mismatch(int had, int has)
{
	ereport(ERROR,
			(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
			 errmsg("feature arrays differ in length"),
			 errdetail("Earlier rows have %d features, this row has %d.", had, has),
			 errhint("Fit one response type at a time (GROUP BY response_type): each has its own feature list.")));
}

/* Append one row; label may be NULL, x may be NULL when d == 0. */
void
rbr_rowset_add(RbrRowSet *rs, const char *key, int keylen,
			   const char *label, int labellen, int32 tier,
			   double base, const double *x, int d)
{
	bool		same_key;
	int64		n;

	if (rs->d < 0)
		rs->d = d;
	else if (rs->d != d)
		length_mismatch(rs->d, d);
	if (label && rs->label_off == NULL)
		rowset_enable_labels(rs);

	/* consecutive rows of one group share their key */
	n = rs->nrows;
	same_key = n > 0 && rs->key_off[n - 1] + keylen < rs->keys_len &&
		rs->keys[rs->key_off[n - 1] + keylen] == '\0' &&
		memcmp(rs->keys + rs->key_off[n - 1], key, keylen) == 0;
	rowset_reserve(rs, 1, (same_key ? 0 : keylen + 1) + (label ? labellen + 1 : 0));
	rs->key_off[n] = same_key ? rs->key_off[n - 1] : rowset_put_string(rs, key, keylen);
	if (rs->label_off)
		rs->label_off[n] = label ? rowset_put_string(rs, label, labellen) : -1;
	rs->tier[n] = tier;
	rs->base[n] = base;
	if (d > 0)
		memcpy(rs->x + n * d, x, sizeof(double) * d);
	rs->nrows = n + 1;
}

/* The rows of an expanded state as a source. */
static void
src_of_rowset(const RbrRowSet *rs, RowsSrc *s)
{
	s->d = rs->d;
	s->nrows = rs->nrows;
	s->x = rs->x;
	s->base = rs->base;
	s->tier = rs->tier;
	s->key_off = rs->key_off;
	s->label_off = rs->label_off;
	s->keys = rs->keys;
	s->keys_len = rs->keys_len;
	s->skipped = rs->skipped;
	s->options = rs->options;
	s->options_len = rs->options ? (int32) strlen(rs->options) : -1;
}

/* Append every row of a source to dst. */
static void
rowset_merge_src(RbrRowSet *dst, const RowsSrc *src)
{
	int			d;
	int64		n0 = dst->nrows;
	int64		k0 = dst->keys_len;

	dst->skipped += src->skipped;
	if (dst->options == NULL && src->options != NULL)
	{
		dst->options = MemoryContextAlloc(dst->mcxt, src->options_len + 1);
		memcpy(dst->options, src->options, src->options_len);
		dst->options[src->options_len] = '\0';
	}
	if (src->nrows == 0)
		return;
	if (dst->d < 0)
		dst->d = src->d;
	else if (dst->d != src->d)
		length_mismatch(dst->d, src->d);
	if (src->label_off && dst->label_off == NULL)
		rowset_enable_labels(dst);
	d = dst->d;
	rowset_reserve(dst, src->nrows, src->keys_len);
	if (d > 0)
		memcpy(dst->x + n0 * d, src->x, sizeof(double) * src->nrows * d);
	memcpy(dst->base + n0, src->base, sizeof(double) * src->nrows);
	memcpy(dst->tier + n0, src->tier, sizeof(int32) * src->nrows);
	for (int64 i = 0; i < src->nrows; i++)
	{
		dst->key_off[n0 + i] = src->key_off[i] + k0;
		if (dst->label_off)
			dst->label_off[n0 + i] = (src->label_off == NULL || src->label_off[i] < 0) ? -1 : src->label_off[i] + k0;
		if ((i & 0xFFFF) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	memcpy(dst->keys + k0, src->keys, src->keys_len);
	dst->keys_len = k0 + src->keys_len;
	dst->nrows = n0 + src->nrows;
}

/* Append every row of src to dst (combine). */
void
rbr_rowset_merge(RbrRowSet *dst, const RbrRowSet *src)
{
	RowsSrc		s;

	src_of_rowset(src, &s);
	rowset_merge_src(dst, &s);
}

/* ---------------------------------------------------------------------------
 * The flat form
 * ------------------------------------------------------------------------- */

/* Section offsets of a flat value with these dimensions (no overflow within the checked bounds). */
static void
flat_layout(FlatLayout *L, int d, int64 n, bool labels, int32 optlen, int64 keys_len)
{
	uint64		o = sizeof(FitRowsFlat);
	uint64		un = (uint64) n;

	L->opt = o;
	o += TYPEALIGN(8, (uint64) Max(optlen, 0));
	L->x = o;
	o += 8 * un * (uint64) Max(d, 0);
	L->base = o;
	o += 8 * un;
	L->key_off = o;
	o += 8 * un;
	L->label_off = o;
	if (labels)
		o += 8 * un;
	L->tier = o;
	o += TYPEALIGN(8, 4 * un);
	L->keys = o;
	o += (uint64) keys_len;
	L->total = o;
}

/* Size of the flat form of an expanded state (EOH method). */
static Size
rowset_get_flat_size(ExpandedObjectHeader *eohptr)
{
	RbrRowSet  *rs = (RbrRowSet *) eohptr;
	FlatLayout	L;

	flat_layout(&L, rs->d, rs->nrows, rs->label_off != NULL,
				rs->options ? (int32) strlen(rs->options) : -1, rs->keys_len);
	if (L.total > MaxAllocSize)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("rows collected for fitting are too large to pass between processes"),
				 errdetail("They need %llu MB; the limit of one value is 1 GB.",
						   (unsigned long long) (L.total / (1024 * 1024))),
				 errhint("Disable parallel aggregation for this query (SET max_parallel_workers_per_gather = 0), or aggregate per prompt first (rbr_pair_counts).")));
	return (Size) L.total;
}

/* Write the flat form of an expanded state (EOH method). */
static void
rowset_flatten_into(ExpandedObjectHeader *eohptr, void *result, Size allocated_size)
{
	RbrRowSet  *rs = (RbrRowSet *) eohptr;
	FitRowsFlat *h = result;
	char	   *p = result;
	int32		optlen = rs->options ? (int32) strlen(rs->options) : -1;
	int			d = Max(rs->d, 0);
	FlatLayout	L;

	flat_layout(&L, rs->d, rs->nrows, rs->label_off != NULL, optlen, rs->keys_len);
	Assert(allocated_size == L.total);
	memset(h, 0, sizeof(FitRowsFlat));
	SET_VARSIZE(h, allocated_size);
	h->magic = FLAT_MAGIC;
	h->d = rs->d;
	h->options_len = optlen;
	h->flags = rs->label_off ? FLAT_HAS_LABELS : 0;
	h->nrows = rs->nrows;
	h->keys_len = rs->keys_len;
	h->skipped = rs->skipped;
	memset(p + L.opt, 0, L.x - L.opt);
	if (optlen > 0)
		memcpy(p + L.opt, rs->options, optlen);
	if (d > 0)
		memcpy(p + L.x, rs->x, sizeof(double) * rs->nrows * d);
	memcpy(p + L.base, rs->base, sizeof(double) * rs->nrows);
	memcpy(p + L.key_off, rs->key_off, sizeof(int64) * rs->nrows);
	if (rs->label_off)
		memcpy(p + L.label_off, rs->label_off, sizeof(int64) * rs->nrows);
	memset(p + L.tier, 0, L.keys - L.tier);
	memcpy(p + L.tier, rs->tier, sizeof(int32) * rs->nrows);
	memcpy(p + L.keys, rs->keys, rs->keys_len);
}

/* ERROR for a flat value that does not check out. */
static void
invalid_value(const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
			 errmsg("invalid rbr.fit_rows value: %s", what),
			 errhint("Values of rbr.fit_rows are made by rbr's aggregates (rbr_fit, rbr_pair_accuracy, ...) of the same rbr version; pass them on unchanged.")));
}

/*
 * Validate a flat value (4-byte header, 8-aligned) and describe its rows in
 * s: every length, offset and number is checked before anything is read
 * through it, so a crafted value gives an error, never a bad read.
 */
static void
flat_check(const struct varlena *v, RowsSrc *s)
{
	const char *p = (const char *) v;
	Size		len = VARSIZE(v);
	FitRowsFlat h;
	FlatLayout	L;
	bool		labels;
	int			d;

	if (len < sizeof(FitRowsFlat))
		invalid_value("too short");
	memcpy(&h, p, sizeof(h));
	if (h.magic != FLAT_MAGIC)
		invalid_value("unknown version");
	if (h.d < -1 || h.d > FLAT_MAX_D)
		invalid_value("bad number of features");
	if (h.nrows < 0 || h.nrows > FLAT_MAX_ROWS || (h.d < 0 && h.nrows > 0))
		invalid_value("bad number of rows");
	if (h.keys_len < 0 || h.keys_len > (int64) len || h.skipped < 0 || h.options_len < -1 ||
		h.options_len > (int64) len || (h.flags & ~FLAT_HAS_LABELS) != 0 || h.pad != 0)
		invalid_value("bad header");
	/* every row takes at least 20 bytes: bounds nrows before the products */
	if ((uint64) h.nrows > len / 20)
		invalid_value("length does not match its header");
	labels = (h.flags & FLAT_HAS_LABELS) != 0;
	flat_layout(&L, h.d, h.nrows, labels, h.options_len, h.keys_len);
	if (L.total != len)
		invalid_value("length does not match its header");
	if (h.nrows > 0 && h.keys_len == 0)
		invalid_value("rows without keys");
	if (h.keys_len > 0 && p[L.keys + h.keys_len - 1] != '\0')
		invalid_value("unterminated key");
	if (h.options_len > 0 && memchr(p + L.opt, '\0', h.options_len) != NULL)
		invalid_value("bad options");

	d = Max(h.d, 0);
	s->d = h.d;
	s->nrows = h.nrows;
	s->x = (const double *) (p + L.x);
	s->base = (const double *) (p + L.base);
	s->tier = (const int32 *) (p + L.tier);
	s->key_off = (const int64 *) (p + L.key_off);
	s->label_off = labels ? (const int64 *) (p + L.label_off) : NULL;
	s->keys = p + L.keys;
	s->keys_len = h.keys_len;
	s->skipped = h.skipped;
	s->options = h.options_len >= 0 ? p + L.opt : NULL;
	s->options_len = h.options_len;

	for (int64 i = 0; i < s->nrows; i++)
	{
		if (s->key_off[i] < 0 || s->key_off[i] >= s->keys_len ||
			(labels && (s->label_off[i] < -1 || s->label_off[i] >= s->keys_len)))
			invalid_value("key offset out of range");
		if (s->tier[i] < 0)
			invalid_value("negative tier");
		if (!isfinite(s->base[i]))
			invalid_value("base reward or score is not finite");
		if ((i & 0xFFFF) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	for (int64 i = 0; i < s->nrows * d; i++)
	{
		if (!isfinite(s->x[i]))
			invalid_value("feature is not finite");
		if ((i & 0xFFFFF) == 0)
			CHECK_FOR_INTERRUPTS();
	}
}

/* The flat value of a datum, detoasted and 8-aligned (copied if it was not). */
static struct varlena *
flat_of_datum(Datum d)
{
	struct varlena *v = PG_DETOAST_DATUM(d);

	if (((uintptr_t) v) % 8 != 0)
	{
		struct varlena *c = palloc(VARSIZE(v));

		memcpy(c, v, VARSIZE(v));
		v = c;
	}
	return v;
}

/* An expanded copy of a state datum (expanded or flat) under parent. */
static RbrRowSet *
rowset_copy_datum(Datum d, MemoryContext parent)
{
	RbrRowSet  *rs = rowset_new(parent);
	RowsSrc		s;

	if (VARATT_IS_EXTERNAL_EXPANDED(DatumGetPointer(d)))
	{
		ExpandedObjectHeader *eoh = DatumGetEOHP(d);

		if (eoh->eoh_methods != &rowset_methods)
			elog(ERROR, "expanded object is not an rbr.fit_rows value");
		src_of_rowset((RbrRowSet *) eoh, &s);
	}
	else
		flat_check(flat_of_datum(d), &s);
	rowset_merge_src(rs, &s);
	return rs;
}

/* The state of a transition or combine function, ready to append to in place. */
RbrRowSet *
rbr_rowset_state(FunctionCallInfo fcinfo, int argno, const char *fname)
{
	MemoryContext aggcxt;
	Datum		d;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s called in non-aggregate context", fname)));
	if (PG_ARGISNULL(argno))
		return rowset_new_in(states_context(fcinfo, aggcxt));
	d = PG_GETARG_DATUM(argno);
	if (VARATT_IS_EXTERNAL_EXPANDED_RW(DatumGetPointer(d)) &&
		DatumGetEOHP(d)->eoh_methods == &rowset_methods)
		return (RbrRowSet *) DatumGetEOHP(d);	/* ours: append in place */
	return rowset_copy_datum(d, aggcxt);
}

/* Read a state datum (expanded or flat) in a final function; read only. */
const RbrRowSet *
rbr_rowset_read(Datum d)
{
	if (VARATT_IS_EXTERNAL_EXPANDED(DatumGetPointer(d)))
	{
		ExpandedObjectHeader *eoh = DatumGetEOHP(d);

		if (eoh->eoh_methods == &rowset_methods)
			return (const RbrRowSet *) eoh;
	}
	return rowset_copy_datum(d, CurrentMemoryContext);
}

/* ---------------------------------------------------------------------------
 * The canonical sort
 * ------------------------------------------------------------------------- */

/*
 * The canonical order: group key (by hash, then bytes), then within a group
 * tier, label, base and features. It depends only on the rows' values,
 * never on the order they arrived in. The sort interns the group keys in a
 * hash table (one probe per row, none for a row whose key is the previous
 * row's), orders the distinct keys, places the rows by a counting sort on
 * the key's rank, and sorts each group alone by a cheap inline comparison.
 */

/* A distinct group key. */
typedef struct KeyEnt
{
	uint64		hash;
	int64		off;			/* its offset in the keys arena */
	int64		count;			/* rows; later the first position of the group */
} KeyEnt;

/* A row inside its group, with what the comparison needs first. */
typedef struct SortItem
{
	int32		tier;
	int32		pad;
	double		base;
	int64		row;
} SortItem;

/* The label of row i, or "" when it has none (for ordering). */
static inline const char *
row_label(const RbrRowSet *rs, int64 i)
{
	return (rs->label_off == NULL || rs->label_off[i] < 0) ? "" : rs->keys + rs->label_off[i];
}

/* Order of two rows of one group: tier, label, base, features. */
static inline int
cmp_items(const SortItem *x, const SortItem *y, const RbrRowSet *rs)
{
	int64		i,
				j;
	int			c;

	if (x->tier != y->tier)
		return x->tier < y->tier ? -1 : 1;
	i = x->row;
	j = y->row;
	if (rs->label_off && rs->label_off[i] != rs->label_off[j] &&
		(c = strcmp(row_label(rs, i), row_label(rs, j))) != 0)
		return c;
	if (x->base != y->base)
		return x->base < y->base ? -1 : 1;
	for (int k = 0; k < rs->d; k++)
	{
		double		xi = rs->x[i * rs->d + k];
		double		xj = rs->x[j * rs->d + k];

		if (xi != xj)
			return xi < xj ? -1 : 1;
	}
	return 0;
}

#define ST_SORT sort_items
#define ST_ELEMENT_TYPE SortItem
#define ST_COMPARE(a, b, arg) cmp_items(a, b, arg)
#define ST_COMPARE_ARG_TYPE const RbrRowSet
#define ST_CHECK_FOR_INTERRUPTS
#define ST_SCOPE static
#define ST_DEFINE
#include "lib/sort_template.h"

/* Order of two distinct keys: hash, then bytes. */
static inline int
cmp_keys(const KeyEnt *x, const KeyEnt *y, const RbrRowSet *rs)
{
	if (x->hash != y->hash)
		return x->hash < y->hash ? -1 : 1;
	return strcmp(rs->keys + x->off, rs->keys + y->off);
}

#define ST_SORT sort_keys
#define ST_ELEMENT_TYPE KeyEnt
#define ST_COMPARE(a, b, arg) cmp_keys(a, b, arg)
#define ST_COMPARE_ARG_TYPE const RbrRowSet
#define ST_CHECK_FOR_INTERRUPTS
#define ST_SCOPE static
#define ST_DEFINE
#include "lib/sort_template.h"

/* The rows in canonical order, grouped; the features copied in that order when copy_x. */
RbrSortedRows *
rbr_rowset_sort(const RbrRowSet *rs, bool copy_x)
{
	RbrSortedRows *s = palloc0(sizeof(RbrSortedRows));
	int			d = Max(rs->d, 0);
	int64		n = rs->nrows;
	int64	   *kid = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(int64) * Max(n, 1));
	KeyEnt	   *keys = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(KeyEnt) * Max(n, 1));
	int64	   *slot;
	int64		nslot = 16,
				nkeys = 0;
	SortItem   *items;
	double	   *x_copy = NULL;
	int64	   *x_row = NULL;

	/* intern the keys: kid[i] is row i's key, keys[] the distinct keys */
	while (nslot < 2048 && nslot < n / 4)
		nslot *= 2;
	slot = MemoryContextAllocExtended(CurrentMemoryContext, sizeof(int64) * nslot, MCXT_ALLOC_HUGE | MCXT_ALLOC_ZERO);
	for (int64 i = 0; i < n; i++)
	{
		const char *key;
		uint64		h;
		int64		p;

		if (i > 0 && rs->key_off[i] == rs->key_off[i - 1])
		{
			kid[i] = kid[i - 1];
			keys[kid[i]].count++;
			continue;
		}
		key = rs->keys + rs->key_off[i];
		h = hash_bytes_extended((const unsigned char *) key, strlen(key), 0);
		for (p = h & (nslot - 1); slot[p] != 0; p = (p + 1) & (nslot - 1))
		{
			KeyEnt	   *e = &keys[slot[p] - 1];

			if (e->hash == h && (e->off == rs->key_off[i] || strcmp(rs->keys + e->off, key) == 0))
				break;
		}
		if (slot[p] == 0)
		{
			keys[nkeys].hash = h;
			keys[nkeys].off = rs->key_off[i];
			keys[nkeys].count = 0;
			slot[p] = ++nkeys;
			if (nkeys * 2 > nslot)
			{
				/* grow the table and place every key again */
				pfree(slot);
				nslot *= 2;
				slot = MemoryContextAllocExtended(CurrentMemoryContext, sizeof(int64) * nslot, MCXT_ALLOC_HUGE | MCXT_ALLOC_ZERO);
				for (int64 k = 0; k < nkeys; k++)
				{
					int64		q;

					for (q = keys[k].hash & (nslot - 1); slot[q] != 0; q = (q + 1) & (nslot - 1))
						;
					slot[q] = k + 1;
				}
			}
			kid[i] = nkeys - 1;
		}
		else
			kid[i] = slot[p] - 1;
		keys[kid[i]].count++;
		if ((i & 0xFFFF) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	pfree(slot);

	/* order the distinct keys; a key's group starts after the groups of smaller keys */
	{
		KeyEnt	   *sorted;
		int64		pos = 0;

		/* sort copies carrying their id in count's place */
		sorted = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(KeyEnt) * Max(nkeys, 1));
		for (int64 k = 0; k < nkeys; k++)
		{
			sorted[k] = keys[k];
			sorted[k].count = k;
		}
		sort_keys(sorted, nkeys, rs);
		s->group_start = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(int64) * (nkeys + 1));
		s->group_key = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(char *) * Max(nkeys, 1));
		for (int64 r = 0; r < nkeys; r++)
		{
			int64		k = sorted[r].count;

			s->group_start[r] = pos;
			s->group_key[r] = rs->keys + keys[k].off;
			pos += keys[k].count;
			keys[k].count = s->group_start[r];	/* next free position of the group */
		}
		s->group_start[nkeys] = pos;
		pfree(sorted);
	}

	/* counting sort by group, then each group by its rows' values */
	items = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(SortItem) * Max(n, 1));
	for (int64 i = 0; i < n; i++)
	{
		SortItem   *it = &items[keys[kid[i]].count++];

		it->tier = rs->tier[i];
		it->pad = 0;
		it->base = rs->base[i];
		it->row = i;
		if ((i & 0xFFFF) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	pfree(kid);
	for (int64 g = 0; g < nkeys; g++)
	{
		int64		gs = s->group_start[g],
					ge = s->group_start[g + 1];

		if (ge - gs > 1)
			sort_items(items + gs, ge - gs, rs);
		if ((g & 0xFFF) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	pfree(keys);

	/*
	 * Without a copy the solver reads the features through x_row several
	 * times: worth it only when the canonical order walks the state nearly
	 * in storage order (rows of a group arrived together), else copy once.
	 */
	if (!copy_x && d > 0 && n > 1)
	{
		int64		near = 0;

		for (int64 r = 1; r < n; r++)
			near += Abs(items[r].row - items[r - 1].row) <= 64;
		copy_x = near * 4 < (n - 1) * 3;
	}
	s->d = d;
	s->nrows = n;
	s->ngroups = nkeys;
	if (copy_x || d == 0)
		s->x = x_copy = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(double) * Max(n * d, 1));
	else
	{
		s->x = rs->x;
		s->x_row = x_row = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(int64) * Max(n, 1));
	}
	s->base = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(double) * Max(n, 1));
	s->tier = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(int32) * Max(n, 1));
	s->label = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(char *) * Max(n, 1));
	for (int64 r = 0; r < n; r++)
	{
		int64		i = items[r].row;

		if (x_copy && d > 0)
			memcpy(x_copy + r * d, rs->x + i * d, sizeof(double) * d);
		else if (x_row)
			x_row[r] = i;
		s->base[r] = items[r].base;
		s->tier[r] = items[r].tier;
		s->label[r] = (rs->label_off == NULL || rs->label_off[i] < 0) ? NULL : rs->keys + rs->label_off[i];
		if ((r & 0xFFFF) == 0)
			CHECK_FOR_INTERRUPTS();
	}
	pfree(items);
	return s;
}

/* ---------------------------------------------------------------------------
 * SQL-callable functions of the type rbr.fit_rows
 * ------------------------------------------------------------------------- */

PG_FUNCTION_INFO_V1(rbr_fit_rows_combine);
/* Combine two partial row sets (parallel workers, partitions, Citus shards). */
Datum
rbr_fit_rows_combine(PG_FUNCTION_ARGS)
{
	RbrRowSet  *a;
	RowsSrc		s;
	Datum		b;

	if (PG_ARGISNULL(1))
	{
		if (PG_ARGISNULL(0))
			PG_RETURN_NULL();
		PG_RETURN_DATUM(RbrRowSetGetDatum(rbr_rowset_state(fcinfo, 0, "rbr.fit_rows_combine")));
	}
	a = rbr_rowset_state(fcinfo, 0, "rbr.fit_rows_combine");
	b = PG_GETARG_DATUM(1);
	if (VARATT_IS_EXTERNAL_EXPANDED(DatumGetPointer(b)) &&
		DatumGetEOHP(b)->eoh_methods == &rowset_methods)
		src_of_rowset((RbrRowSet *) DatumGetEOHP(b), &s);
	else
		flat_check(flat_of_datum(b), &s);
	rowset_merge_src(a, &s);
	PG_RETURN_DATUM(RbrRowSetGetDatum(a));
}

/* The flat form of a datum for output (flattened if expanded). */
static struct varlena *
flat_for_output(Datum d)
{
	if (VARATT_IS_EXTERNAL_EXPANDED(DatumGetPointer(d)))
	{
		ExpandedObjectHeader *eoh = DatumGetEOHP(d);
		Size		size = EOH_get_flat_size(eoh);
		struct varlena *v = palloc(size);

		EOH_flatten_into(eoh, v, size);
		return v;
	}
	return flat_of_datum(d);
}

PG_FUNCTION_INFO_V1(rbr_fit_rows_out);
/* Text output of rbr.fit_rows: "rbr2:" and the base64 of the flat form. */
Datum
rbr_fit_rows_out(PG_FUNCTION_ARGS)
{
	struct varlena *v = flat_for_output(PG_GETARG_DATUM(0));
	int			len = VARSIZE(v) - VARHDRSZ;
	int			enc = pg_b64_enc_len(len);
	int			plen = strlen(FLAT_TEXT_PREFIX);
	char	   *out;
	int			n;

	if ((Size) enc + plen + 1 > MaxAllocSize)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("rbr.fit_rows value is too large for its text form"),
				 errhint("Aggregate per prompt first (rbr_pair_counts), or fit on fewer rows per node.")));
	out = palloc(plen + enc + 1);
	memcpy(out, FLAT_TEXT_PREFIX, plen);
	n = pg_b64_encode(VARDATA(v), len, out + plen, enc);
	if (n < 0)
		elog(ERROR, "could not encode an rbr.fit_rows value");
	out[plen + n] = '\0';
	PG_RETURN_CSTRING(out);
}

PG_FUNCTION_INFO_V1(rbr_fit_rows_in);
/* Text input of rbr.fit_rows (validated: a crafted text gives an error). */
Datum
rbr_fit_rows_in(PG_FUNCTION_ARGS)
{
	const char *str = PG_GETARG_CSTRING(0);
	int			plen = strlen(FLAT_TEXT_PREFIX);
	size_t		slen = strlen(str);
	int			dec;
	struct varlena *v;
	int			n;
	RowsSrc		s;

	if (strncmp(str, "rbr", 3) == 0 && strncmp(str, FLAT_TEXT_PREFIX, plen) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid rbr.fit_rows value: unknown version"),
				 errhint("Values of rbr.fit_rows are made by rbr's aggregates of the same rbr version; update rbr on every node.")));
	if (strncmp(str, FLAT_TEXT_PREFIX, plen) != 0 || slen - plen > (size_t) (MaxAllocSize / 2))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type rbr.fit_rows"),
				 errdetail("A value starts with \"%s\" and continues in base64.", FLAT_TEXT_PREFIX)));
	dec = pg_b64_dec_len((int) (slen - plen));
	v = palloc(VARHDRSZ + dec);
	n = pg_b64_decode(str + plen, (int) (slen - plen), VARDATA(v), dec);
	if (n < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("invalid input syntax for type rbr.fit_rows"),
				 errdetail("The part after \"%s\" is not valid base64.", FLAT_TEXT_PREFIX)));
	SET_VARSIZE(v, VARHDRSZ + n);
	flat_check(v, &s);
	PG_RETURN_POINTER(v);
}

PG_FUNCTION_INFO_V1(rbr_fit_rows_send);
/* Binary output of rbr.fit_rows: the flat form after its header. */
Datum
rbr_fit_rows_send(PG_FUNCTION_ARGS)
{
	struct varlena *v = flat_for_output(PG_GETARG_DATUM(0));
	StringInfoData buf;

	pq_begintypsend(&buf);
	pq_sendbytes(&buf, VARDATA(v), VARSIZE(v) - VARHDRSZ);
	PG_RETURN_BYTEA_P(pq_endtypsend(&buf));
}

PG_FUNCTION_INFO_V1(rbr_fit_rows_recv);
/* Binary input of rbr.fit_rows (validated like the text input). */
Datum
rbr_fit_rows_recv(PG_FUNCTION_ARGS)
{
	StringInfo	buf = (StringInfo) PG_GETARG_POINTER(0);
	int			len = buf->len - buf->cursor;
	struct varlena *v = palloc(VARHDRSZ + len);
	RowsSrc		s;

	SET_VARSIZE(v, VARHDRSZ + len);
	pq_copymsgbytes(buf, VARDATA(v), len);
	flat_check(v, &s);
	PG_RETURN_POINTER(v);
}

/* ---------------------------------------------------------------------------
 * The support functions of rbr 0.1 and 0.2 (state type internal), kept so
 * that a database still at 0.2 keeps working with this library until
 * ALTER EXTENSION rbr UPDATE; their bytea is the flat form.
 * ------------------------------------------------------------------------- */

PG_FUNCTION_INFO_V1(rbr_rows_combine);
/* Combine of rbr 0.2's aggregates (internal state). */
Datum
rbr_rows_combine(PG_FUNCTION_ARGS)
{
	return rbr_fit_rows_combine(fcinfo);
}

PG_FUNCTION_INFO_V1(rbr_rows_serialize);
/* Serialize of rbr 0.2's aggregates: the flat form as bytea. */
Datum
rbr_rows_serialize(PG_FUNCTION_ARGS)
{
	PG_RETURN_POINTER(flat_for_output(PG_GETARG_DATUM(0)));
}

PG_FUNCTION_INFO_V1(rbr_rows_deserialize);
/* Deserialize of rbr 0.2's aggregates (validated). */
Datum
rbr_rows_deserialize(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "rbr_rows_deserialize called in non-aggregate context");
	PG_RETURN_DATUM(RbrRowSetGetDatum(rowset_copy_datum(PG_GETARG_DATUM(0), aggcxt)));
}
