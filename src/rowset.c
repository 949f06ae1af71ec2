/*
 * rowset.c: the rows an aggregate over ranked completions collects (see
 * rowset.h): growth with a memory limit, merge, serialization, canonical sort.
 */
#include "postgres.h"

#include <limits.h>

#include "common/hashfn.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "rowset.h"

/* Most memory one row set may use, in MB (rbr.fit_max_memory). */
static int	rowset_max_memory_mb = 2048;

/* Serialized format: magic, then the header fields, then the arrays. */
#define ROWSET_MAGIC 0x52425231	/* "RBR1" */

typedef struct RowSetHeader
{
	uint32		magic;
	int32		d;
	int64		nrows;
	int64		keys_len;
	int64		skipped;
	int32		options_len;	/* -1 = none */
} RowSetHeader;

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
rowset_bytes(int d, int64 cap, int64 keys_cap)
{
	return (Size) cap * (sizeof(double) * (Max(d, 0) + 1) + sizeof(int32) + 2 * sizeof(int64)) + keys_cap;
}

/* ERROR when a row set would grow past rbr.fit_max_memory. */
static void
check_memory(int d, int64 cap, int64 keys_cap)
{
	Size		bytes = rowset_bytes(d, cap, keys_cap);

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

/* A new empty row set in the aggregate's memory context. */
RbrRowSet *
rbr_rowset_create(FunctionCallInfo fcinfo, const char *fname)
{
	MemoryContext aggcxt;
	RbrRowSet  *rs;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("%s called in non-aggregate context", fname)));
	rs = MemoryContextAllocZero(aggcxt, sizeof(RbrRowSet));
	rs->d = -1;
	rs->mcxt = aggcxt;
	return rs;
}

/* Make room for n more rows and keylen more key bytes. */
static void
rowset_reserve(RbrRowSet *rs, int64 n, int64 keylen)
{
	int			d = Max(rs->d, 0);

	if (rs->nrows + n > rs->cap)
	{
		int64		cap = Max(Max(rs->cap * 2, rs->nrows + n), 1024);

		check_memory(d, cap, rs->keys_cap);
		if (rs->cap == 0)
		{
			rs->x = MemoryContextAllocHuge(rs->mcxt, sizeof(double) * Max(cap * d, 1));
			rs->base = MemoryContextAllocHuge(rs->mcxt, sizeof(double) * cap);
			rs->tier = MemoryContextAllocHuge(rs->mcxt, sizeof(int32) * cap);
			rs->key_off = MemoryContextAllocHuge(rs->mcxt, sizeof(int64) * cap);
			rs->label_off = MemoryContextAllocHuge(rs->mcxt, sizeof(int64) * cap);
		}
		else
		{
			rs->x = repalloc_huge(rs->x, sizeof(double) * Max(cap * d, 1));
			rs->base = repalloc_huge(rs->base, sizeof(double) * cap);
			rs->tier = repalloc_huge(rs->tier, sizeof(int32) * cap);
			rs->key_off = repalloc_huge(rs->key_off, sizeof(int64) * cap);
			rs->label_off = repalloc_huge(rs->label_off, sizeof(int64) * cap);
		}
		rs->cap = cap;
	}
	if (rs->keys_len + keylen > rs->keys_cap)
	{
		int64		kcap = Max(Max(rs->keys_cap * 2, rs->keys_len + keylen), 4096);

		check_memory(d, rs->cap, kcap);
		rs->keys = rs->keys ? repalloc_huge(rs->keys, kcap) : MemoryContextAllocHuge(rs->mcxt, kcap);
		rs->keys_cap = kcap;
	}
}

/* Copy a string into the keys arena; returns its offset. */
static int64
rowset_put_string(RbrRowSet *rs, const char *str, int len)
{
	int64		off = rs->keys_len;

	memcpy(rs->keys + off, str, len);
	rs->keys[off + len] = '\0';
	rs->keys_len += len + 1;
	return off;
}

/* Append one row; label may be NULL, x may be NULL when d == 0. */
void
rbr_rowset_add(RbrRowSet *rs, const char *key, int keylen,
			   const char *label, int labellen, int32 tier,
			   double base, const double *x, int d)
{
	bool		same_key;

	if (rs->d < 0)
		rs->d = d;
	else if (rs->d != d)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("feature arrays differ in length"),
				 errdetail("Earlier rows have %d features, this row has %d.", rs->d, d),
				 errhint("Fit one response type at a time (GROUP BY response_type): each has its own feature list.")));

	/* consecutive rows of one group share their key */
	same_key = rs->nrows > 0 &&
		strlen(rs->keys + rs->key_off[rs->nrows - 1]) == (size_t) keylen &&
		memcmp(rs->keys + rs->key_off[rs->nrows - 1], key, keylen) == 0;
	rowset_reserve(rs, 1, (same_key ? 0 : keylen + 1) + (label ? labellen + 1 : 0));
	rs->key_off[rs->nrows] = same_key ? rs->key_off[rs->nrows - 1]
		: rowset_put_string(rs, key, keylen);
	rs->label_off[rs->nrows] = label ? rowset_put_string(rs, label, labellen) : -1;
	rs->tier[rs->nrows] = tier;
	rs->base[rs->nrows] = base;
	if (d > 0)
		memcpy(rs->x + rs->nrows * d, x, sizeof(double) * d);
	rs->nrows++;
}

/* Append every row of src to dst (combine). */
void
rbr_rowset_merge(RbrRowSet *dst, const RbrRowSet *src)
{
	int			d;

	dst->skipped += src->skipped;
	if (dst->options == NULL && src->options != NULL)
		dst->options = MemoryContextStrdup(dst->mcxt, src->options);
	if (src->nrows == 0)
		return;
	if (dst->d < 0)
		dst->d = src->d;
	else if (dst->d != src->d)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("feature arrays differ in length"),
				 errdetail("Some rows have %d features, others %d.", dst->d, src->d),
				 errhint("Fit one response type at a time (GROUP BY response_type): each has its own feature list.")));
	d = dst->d;
	rowset_reserve(dst, src->nrows, src->keys_len);
	memcpy(dst->x + dst->nrows * d, src->x, sizeof(double) * src->nrows * d);
	memcpy(dst->base + dst->nrows, src->base, sizeof(double) * src->nrows);
	memcpy(dst->tier + dst->nrows, src->tier, sizeof(int32) * src->nrows);
	for (int64 i = 0; i < src->nrows; i++)
	{
		dst->key_off[dst->nrows + i] = src->key_off[i] + dst->keys_len;
		dst->label_off[dst->nrows + i] = src->label_off[i] < 0 ? -1 : src->label_off[i] + dst->keys_len;
	}
	memcpy(dst->keys + dst->keys_len, src->keys, src->keys_len);
	dst->keys_len += src->keys_len;
	dst->nrows += src->nrows;
}

/* Serialize into a bytea. */
bytea *
rbr_rowset_serialize(const RbrRowSet *rs)
{
	RowSetHeader h;
	int			d = Max(rs->d, 0);
	int32		optlen = rs->options ? (int32) strlen(rs->options) : -1;
	Size		size = VARHDRSZ + sizeof(h) + Max(optlen, 0) +
		rs->nrows * (sizeof(double) * (d + 1) + sizeof(int32) + 2 * sizeof(int64)) + rs->keys_len;
	bytea	   *b;
	char	   *p;

	if (size > MaxAllocSize)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("rows collected for fitting are too large to pass between parallel processes"),
				 errdetail("They need %zu MB; the limit is 1 GB.", size / (1024 * 1024)),
				 errhint("Disable parallel aggregation for this query (SET max_parallel_workers_per_gather = 0).")));
	b = palloc(size);
	SET_VARSIZE(b, size);
	p = VARDATA(b);
	h.magic = ROWSET_MAGIC;
	h.d = rs->d;
	h.nrows = rs->nrows;
	h.keys_len = rs->keys_len;
	h.skipped = rs->skipped;
	h.options_len = optlen;
#define PUT(src, len) do { memcpy(p, (src), (len)); p += (len); } while (0)
	PUT(&h, sizeof(h));
	if (optlen > 0)
		PUT(rs->options, optlen);
	PUT(rs->x, sizeof(double) * rs->nrows * d);
	PUT(rs->base, sizeof(double) * rs->nrows);
	PUT(rs->tier, sizeof(int32) * rs->nrows);
	PUT(rs->key_off, sizeof(int64) * rs->nrows);
	PUT(rs->label_off, sizeof(int64) * rs->nrows);
	PUT(rs->keys, rs->keys_len);
#undef PUT
	Assert(p == (char *) b + size);
	return b;
}

/* ERROR for a serialized state that does not check out. */
static void
corrupt_state(const char *what)
{
	ereport(ERROR,
			(errcode(ERRCODE_DATA_CORRUPTED),
			 errmsg("invalid serialized rbr aggregate state: %s", what)));
}

/* Deserialize a bytea made by rbr_rowset_serialize(). */
RbrRowSet *
rbr_rowset_deserialize(bytea *b, MemoryContext mcxt)
{
	Size		len = VARSIZE_ANY_EXHDR(b);
	const char *p = VARDATA_ANY(b);
	RowSetHeader h;
	RbrRowSet  *rs;
	int			d;
	Size		need;

	if (len < sizeof(h))
		corrupt_state("too short");
	memcpy(&h, p, sizeof(h));
	p += sizeof(h);
	if (h.magic != ROWSET_MAGIC)
		corrupt_state("unknown version");
	if (h.d < -1 || h.nrows < 0 || h.keys_len < 0 || h.options_len < -1 || h.skipped < 0)
		corrupt_state("bad header");
	d = Max(h.d, 0);
	need = sizeof(h) + Max(h.options_len, 0) +
		h.nrows * (sizeof(double) * (d + 1) + sizeof(int32) + 2 * sizeof(int64)) + h.keys_len;
	if (len != need)
		corrupt_state("length does not match its header");

	rs = MemoryContextAllocZero(mcxt, sizeof(RbrRowSet));
	rs->mcxt = mcxt;
	rs->d = h.d;
	rs->skipped = h.skipped;
	if (h.options_len >= 0)
	{
		rs->options = MemoryContextAlloc(mcxt, h.options_len + 1);
		memcpy(rs->options, p, h.options_len);
		rs->options[h.options_len] = '\0';
		p += h.options_len;
	}
	rowset_reserve(rs, h.nrows, h.keys_len);
#define GET(dst, len) do { memcpy((dst), p, (len)); p += (len); } while (0)
	GET(rs->x, sizeof(double) * h.nrows * d);
	GET(rs->base, sizeof(double) * h.nrows);
	GET(rs->tier, sizeof(int32) * h.nrows);
	GET(rs->key_off, sizeof(int64) * h.nrows);
	GET(rs->label_off, sizeof(int64) * h.nrows);
	GET(rs->keys, h.keys_len);
#undef GET
	rs->nrows = h.nrows;
	rs->keys_len = h.keys_len;
	for (int64 i = 0; i < rs->nrows; i++)
		if (rs->key_off[i] < 0 || rs->key_off[i] >= rs->keys_len ||
			rs->label_off[i] < -1 || rs->label_off[i] >= rs->keys_len)
			corrupt_state("key offset out of range");
	if (rs->keys_len > 0 && rs->keys[rs->keys_len - 1] != '\0')
		corrupt_state("unterminated key");
	return rs;
}

/* The label of row i, or "" when it has none (for ordering). */
static inline const char *
row_label(const RbrRowSet *rs, int64 i)
{
	return rs->label_off[i] < 0 ? "" : rs->keys + rs->label_off[i];
}

/* A row to sort, with the hash of its group key (compared first: cheap). */
typedef struct SortItem
{
	uint64		key_hash;
	int64		row;
} SortItem;

/*
 * qsort_arg comparator for the canonical order: group key (by hash, then
 * bytes), tier, label, base, then features. It depends only on the rows'
 * values, never on the order they arrived in.
 */
static int
cmp_rows(const void *a, const void *b, void *arg)
{
	const RbrRowSet *rs = arg;
	const SortItem *x = a;
	const SortItem *y = b;
	int64		i = x->row;
	int64		j = y->row;
	int			c;

	if (x->key_hash != y->key_hash)
		return x->key_hash < y->key_hash ? -1 : 1;
	if (rs->key_off[i] != rs->key_off[j] &&
		(c = strcmp(rs->keys + rs->key_off[i], rs->keys + rs->key_off[j])) != 0)
		return c;
	if (rs->tier[i] != rs->tier[j])
		return rs->tier[i] < rs->tier[j] ? -1 : 1;
	if (rs->label_off[i] != rs->label_off[j] &&
		(c = strcmp(row_label(rs, i), row_label(rs, j))) != 0)
		return c;
	if (rs->base[i] != rs->base[j])
		return rs->base[i] < rs->base[j] ? -1 : 1;
	for (int k = 0; k < rs->d; k++)
	{
		double		xi = rs->x[i * rs->d + k];
		double		xj = rs->x[j * rs->d + k];

		if (xi != xj)
			return xi < xj ? -1 : 1;
	}
	return 0;
}

/* The rows in canonical order, grouped. */
RbrSortedRows *
rbr_rowset_sort(const RbrRowSet *rs)
{
	RbrSortedRows *s = palloc0(sizeof(RbrSortedRows));
	int			d = Max(rs->d, 0);
	int64		n = rs->nrows;
	SortItem   *perm = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(SortItem) * Max(n, 1));

	for (int64 i = 0; i < n; i++)
	{
		const char *key = rs->keys + rs->key_off[i];

		/* rows of one group usually arrive together: hash each key once */
		perm[i].key_hash = (i > 0 && rs->key_off[i] == rs->key_off[i - 1]) ? perm[i - 1].key_hash
			: hash_bytes_extended((const unsigned char *) key, strlen(key), 0);
		perm[i].row = i;
	}
	qsort_arg(perm, n, sizeof(SortItem), cmp_rows, (void *) rs);

	s->d = d;
	s->nrows = n;
	s->x = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(double) * Max(n * d, 1));
	s->base = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(double) * Max(n, 1));
	s->tier = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(int32) * Max(n, 1));
	s->label = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(char *) * Max(n, 1));
	s->group_start = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(int64) * (n + 1));
	s->group_key = MemoryContextAllocHuge(CurrentMemoryContext, sizeof(char *) * Max(n, 1));
	for (int64 r = 0; r < n; r++)
	{
		int64		i = perm[r].row;
		const char *key = rs->keys + rs->key_off[i];

		if (d > 0)
			memcpy(s->x + r * d, rs->x + i * d, sizeof(double) * d);
		s->base[r] = rs->base[i];
		s->tier[r] = rs->tier[i];
		s->label[r] = rs->label_off[i] < 0 ? NULL : rs->keys + rs->label_off[i];
		if (r == 0 || perm[r].key_hash != perm[r - 1].key_hash ||
			strcmp(key, s->group_key[s->ngroups - 1]) != 0)
		{
			s->group_start[s->ngroups] = r;
			s->group_key[s->ngroups] = key;
			s->ngroups++;
		}
	}
	s->group_start[s->ngroups] = n;
	pfree(perm);
	return s;
}

/* ---------------------------------------------------------------------------
 * SQL-callable support functions shared by the aggregates over row sets
 * ------------------------------------------------------------------------- */

PG_FUNCTION_INFO_V1(rbr_rows_combine);
/* Combine two partial row sets (parallel workers, Citus shards). */
Datum
rbr_rows_combine(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;
	RbrRowSet  *a,
			   *b;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "rbr_rows_combine called in non-aggregate context");
	if (PG_ARGISNULL(1))
		PG_RETURN_POINTER(PG_ARGISNULL(0) ? NULL : PG_GETARG_POINTER(0));
	b = (RbrRowSet *) PG_GETARG_POINTER(1);
	if (PG_ARGISNULL(0))
	{
		a = MemoryContextAllocZero(aggcxt, sizeof(RbrRowSet));
		a->d = -1;
		a->mcxt = aggcxt;
	}
	else
		a = (RbrRowSet *) PG_GETARG_POINTER(0);
	rbr_rowset_merge(a, b);
	PG_RETURN_POINTER(a);
}

PG_FUNCTION_INFO_V1(rbr_rows_serialize);
/* Serialize a row set for another process. */
Datum
rbr_rows_serialize(PG_FUNCTION_ARGS)
{
	PG_RETURN_BYTEA_P(rbr_rowset_serialize((RbrRowSet *) PG_GETARG_POINTER(0)));
}

PG_FUNCTION_INFO_V1(rbr_rows_deserialize);
/* Deserialize a row set from another process. */
Datum
rbr_rows_deserialize(PG_FUNCTION_ARGS)
{
	MemoryContext aggcxt;

	if (!AggCheckCallContext(fcinfo, &aggcxt))
		elog(ERROR, "rbr_rows_deserialize called in non-aggregate context");
	PG_RETURN_POINTER(rbr_rowset_deserialize(PG_GETARG_BYTEA_PP(0), aggcxt));
}
