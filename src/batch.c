/*
 * batch.c: batch mode of rbr_featurize and rbr_synthesize through the
 * provider's Batch API (OpenAI's /v1/files and /v1/batches, and Azure
 * OpenAI's /openai/files and /openai/batches), at half the price of online
 * requests.
 *
 * How a run goes (rbr.batch_drive, SQL):
 *   1. collect (rbr.batch_collect): every submitted batch of the run's owner
 *      that has ended is downloaded; each answer is read by the grader's own
 *      parser (rbr_grader_parse_answer) and stored in the grade cache;
 *      lines that failed or expired go back to the queue.
 *   2. chunks (rbr.batch_chunk): rbr.featurize_chunk (rbr.synth_chunk)
 *      runs as online, but grading (generating) answers from the cache only
 *      (rbr_batch_prepare_jobs, rbr_batch_prepare_gen_jobs): a missing
 *      question becomes a queued line (its request body from the endpoint's
 *      own builder) and its value (slot) is skipped.
 *   3. submit: the queued lines are cut into batches (rbr.batch_prepare),
 *      each uploaded as a JSONL file (rbr.batch_upload) and created
 *      (rbr.batch_create), each step committed.
 *
 * Bookkeeping: tables rbr.batch and rbr.batch_line, which no role may read
 * or write; the functions here do, as the extension's owner (owner.c), after
 * checking that the caller owns the run or batch. A line is one question
 * (its grade or generation cache key) of one owner; its custom_id is
 * "rbr-<line id>", no user text. A batch holds lines of one kind (grader or
 * generator: they may be different endpoints). Nothing is paid twice: a line is in one batch at a time; the
 * input file id is committed before the batch is created; before creating
 * one, the provider's list of batches is searched for one with that input
 * file (a crash after the create request, before its commit).
 */
#include "postgres.h"

#include <math.h>

#include <curl/curl.h>
#include <json-c/json.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/array.h"
/* PostgreSQL's SQL function json_object() and json-c's type share a name */
#define json_object pg_sql_json_object
#include "utils/builtins.h"
#undef json_object
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "batch.h"
#include "grader.h"
#include "jsonc.h"
#include "owner.h"

/* Settings */
static int	batch_max_lines = 50000;
static int	batch_max_file_mb = 200;
static double batch_poll_seconds = 60;

/* The run whose batch-mode chunk is running, and its owner (0: none). */
static int64 active_run = 0;
static Oid	active_owner = InvalidOid;

static void kind_endpoint(RbrEndpoint *ep, const char *kind);

/* A json-c object being read; put before the next one (an ERROR in between leaks none for long). */
static json_object *held_json = NULL;

/* Define the rbr.batch_* settings. */
void
rbr_batch_init_settings(void)
{
	DefineCustomIntVariable("rbr.batch_max_lines",
							"Most requests per Batch API file (the provider's limit is 50000).",
							NULL, &batch_max_lines, 50000, 1, 50000,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.batch_max_file_mb",
							"Largest Batch API input file, in megabytes (the provider's limit is 200).",
							NULL, &batch_max_file_mb, 200, 1, 200,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomRealVariable("rbr.batch_poll_seconds",
							 "Seconds between two looks at batches in flight, when rbr_featurize waits for them.",
							 NULL, &batch_poll_seconds, 60, 0.01, 86400,
							 PGC_USERSET, 0, NULL, NULL, NULL);
}

/* Is a batch-mode chunk running? */
bool
rbr_batch_active(void)
{
	return active_run != 0;
}

/* Put the held json-c object. */
static void
put_held(void)
{
	if (held_json != NULL)
		json_object_put(held_json);
	held_json = NULL;
}

/* Parse JSON text (held until put_held()); NULL if it is not JSON. */
static json_object *
parse_held(const char *text, size_t len)
{
	put_held();
	held_json = rbr_jsonc_parse(text, len);
	return held_json;
}

/* String member as a palloc'd copy, or NULL. */
static char *
jstr(json_object *o, const char *key)
{
	json_object *v = rbr_jsonc_get(o, key);

	return v && json_object_is_type(v, json_type_string) ? pstrdup(json_object_get_string(v)) : NULL;
}

/* An id the provider gave (file, batch) is used in URLs: letters, digits, - _ . only. */
static bool
id_ok(const char *id)
{
	if (id == NULL || id[0] == '\0' || strlen(id) > 200)
		return false;
	for (const char *p = id; *p; p++)
		if (!isalnum((unsigned char) *p) && *p != '-' && *p != '_' && *p != '.')
			return false;
	return true;
}

/* ---------------------------------------------------------------------------
 * Ownership
 * ------------------------------------------------------------------------- */

/* Is a run (of the caller's, checked) a run of rbr_synthesize? (inside SPI) */
static bool
run_is_synth(int64 run_id)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(run_id)};

	if (rbr_spi_execute_as_owner("SELECT kind FROM rbr.run WHERE run_id OPERATOR(pg_catalog.=) $1",
								 1, argtypes, args, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "rbr: run lookup failed");
	return strcmp(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), "synthesize") == 0;
}

/* A batch row (batch_id, run_id, owner, state, input_file_id, provider_id, lines, kind) after the owner check. */
typedef struct BatchRow
{
	int64		batch_id;
	int64		run_id;
	Oid			owner;
	char	   *state;
	char	   *input_file_id;
	char	   *provider_id;
	int			lines;
	char	   *kind;			/* grade or generate */
} BatchRow;

/*
 * Read a batch of the caller's (inside SPI), locked until the end of the
 * transaction: a second session on the same batch waits, then sees what the
 * first one did (so a file is uploaded, a batch created, once).
 */
static BatchRow
batch_row(int64 batch_id)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(batch_id)};
	bool		isnull;
	BatchRow	b;
	HeapTuple	t;
	TupleDesc	td;

	if (rbr_spi_execute_as_owner("SELECT batch_id, run_id, owner, state, input_file_id, provider_id, lines "
								 "FROM rbr.batch WHERE batch_id OPERATOR(pg_catalog.=) $1",
								 1, argtypes, args, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch lookup failed");
	if (SPI_processed == 1)
	{
		bool		isnull;
		Oid			owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));

		/* the owner check before the lock: no role waits on another's batch */
		if (!has_privs_of_role(GetUserId(), owner))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied for rbr batch %lld", (long long) batch_id),
					 errdetail("The batch belongs to another role's run.")));
	}
	if (rbr_spi_execute_as_owner("SELECT batch_id, run_id, owner, state, input_file_id, provider_id, lines, kind "
								 "FROM rbr.batch WHERE batch_id OPERATOR(pg_catalog.=) $1 FOR UPDATE",
								 1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch lookup failed");
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no rbr batch %lld", (long long) batch_id)));
	t = SPI_tuptable->vals[0];
	td = SPI_tuptable->tupdesc;
	b.batch_id = batch_id;
	b.run_id = DatumGetInt64(SPI_getbinval(t, td, 2, &isnull));
	b.owner = DatumGetObjectId(SPI_getbinval(t, td, 3, &isnull));
	if (!has_privs_of_role(GetUserId(), b.owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for rbr batch %lld", (long long) batch_id),
				 errdetail("The batch belongs to another role's run.")));
	b.state = SPI_getvalue(t, td, 4);
	b.input_file_id = SPI_getvalue(t, td, 5);
	b.provider_id = SPI_getvalue(t, td, 6);
	b.lines = DatumGetInt32(SPI_getbinval(t, td, 7, &isnull));
	b.kind = SPI_getvalue(t, td, 8);
	return b;
}

/*
 * Make this transaction's commit wait for its WAL flush, whatever
 * synchronous_commit says: a file id or batch id must survive a crash that
 * follows the commit, or the next call would pay for the lines again.
 */
static void
durable_commit(void)
{
	(void) set_config_option("synchronous_commit", "on", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * Every statement of the bookkeeping below runs with read_only false, so
 * that it takes a snapshot of its own: it sees what other sessions
 * committed while this one waited for a lock, or since the statement that
 * called it began (a batch created, lines assigned, answers collected).
 */

/* Run a fixed statement as the owner; ERROR unless it returns 'expect'. */
static void
exec_owner(const char *sql, int nargs, Oid *argtypes, Datum *args, const char *nulls, int expect)
{
	int			ret = rbr_spi_execute_as_owner(sql, nargs, argtypes, args, nulls, false, 0);

	if (ret != expect)
		elog(ERROR, "rbr: batch bookkeeping failed: %s", SPI_result_code_string(ret));
}

/* ---------------------------------------------------------------------------
 * Cache-only grading (batch-mode chunks)
 * ------------------------------------------------------------------------- */

typedef struct LineEntry
{
	uint8		key[32];
	int64		line_id;
	char		state;			/* q(ueued), s(ubmitted), d(one), f(ailed) */
	char	   *error;
	int			tokens[4];		/* prompt, completion, cached, reasoning; -1 unknown */
	int			attempts;
} LineEntry;

/* An int8[] Datum. */
static Datum
int8_array(int64 *v, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Int64GetDatum(v[i]);
	return PointerGetDatum(construct_array(d, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/*
 * Batch mode, for jobs of one kind ("grade", with their propositions'
 * names, or "generate"): see batch.h.
 */
static void
prepare_jobs(RbrGradeJob *jobs, int n, const char *const *names, const char *kind)
{
	MemoryContext caller = CurrentMemoryContext;
	Datum	   *keys = palloc(sizeof(Datum) * Max(n, 1));
	int			nkeys = 0;
	HTAB	   *lines;
	HASHCTL		ctl;
	Oid			argtypes[6];
	Datum		args[6];
	int64	   *applied = palloc(sizeof(int64) * Max(n, 1));
	int64	   *dropped = palloc(sizeof(int64) * Max(n, 1));
	int			napplied = 0,
				ndropped = 0;
	Datum	   *new_keys = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *new_props = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *new_bodies = palloc(sizeof(Datum) * Max(n, 1));
	int			nnew = 0;
	RbrEndpoint ep;

	kind_endpoint(&ep, kind);
	for (int i = 0; i < n; i++)
		if (!jobs[i].done || (jobs[i].result.ok && jobs[i].result.cached))
			keys[nkeys++] = rbr_cache_key_datum(jobs[i].key);
	if (nkeys == 0)
		return;
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = 32;
	ctl.entrysize = sizeof(LineEntry);
	ctl.hcxt = CurrentMemoryContext;
	lines = hash_create("rbr batch lines", Max(nkeys, 16), &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	SPI_connect();
	argtypes[0] = OIDOID;
	args[0] = ObjectIdGetDatum(active_owner);
	argtypes[1] = BYTEAARRAYOID;
	args[1] = PointerGetDatum(construct_array(keys, nkeys, BYTEAOID, -1, false, TYPALIGN_INT));
	if (rbr_spi_execute_as_owner("SELECT key, line_id, state, error, prompt_tokens, completion_tokens, "
								 "cached_tokens, reasoning_tokens, attempts FROM rbr.batch_line "
								 "WHERE owner OPERATOR(pg_catalog.=) $1::pg_catalog.regrole "
								 "AND key OPERATOR(pg_catalog.=) ANY ($2) "
								 "ORDER BY (state OPERATOR(pg_catalog.=) 'applied'), line_id DESC",
								 2, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch line lookup failed");
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	t = SPI_tuptable->vals[r];
		TupleDesc	td = SPI_tuptable->tupdesc;
		bool		isnull;
		bytea	   *k = DatumGetByteaPP(SPI_getbinval(t, td, 1, &isnull));
		LineEntry  *e;
		char	   *st;
		char	   *err;

		bool		found;

		CHECK_FOR_INTERRUPTS();
		if (VARSIZE_ANY_EXHDR(k) != 32)
			continue;
		/* the line not applied yet first (there is at most one), else the latest applied */
		e = hash_search(lines, VARDATA_ANY(k), HASH_ENTER, &found);
		if (found)
			continue;
		e->line_id = DatumGetInt64(SPI_getbinval(t, td, 2, &isnull));
		st = SPI_getvalue(t, td, 3);
		e->state = st[0];
		err = SPI_getvalue(t, td, 4);
		e->error = err ? MemoryContextStrdup(caller, err) : NULL;
		for (int c = 0; c < 4; c++)
		{
			Datum		d = SPI_getbinval(t, td, 5 + c, &isnull);

			e->tokens[c] = isnull ? -1 : DatumGetInt32(d);
		}
		e->attempts = DatumGetInt32(SPI_getbinval(t, td, 9, &isnull));
	}

	/*
	 * A miss whose line is answered (done, or applied already): the answer
	 * was cached by a collect that committed after this call's cache
	 * look-up. Look again (the line was read later, so the cache row is
	 * visible now) rather than ask again.
	 */
	{
		RbrGradeJob *again = palloc0(sizeof(RbrGradeJob) * n);
		int		   *at = palloc(sizeof(int) * n);
		int			nagain = 0;

		for (int i = 0; i < n; i++)
		{
			LineEntry  *e;

			if (jobs[i].done || (e = hash_search(lines, jobs[i].key, HASH_FIND, NULL)) == NULL ||
				(e->state != 'd' && e->state != 'a'))
				continue;
			memcpy(again[nagain].key, jobs[i].key, 32);
			again[nagain].result = jobs[i].result;
			at[nagain++] = i;
		}
		if (nagain > 0)
		{
			MemoryContext old = MemoryContextSwitchTo(caller);

			if (strcmp(kind, "generate") == 0)
				rbr_gen_cache_lookup(again, nagain);
			else
				rbr_cache_lookup(again, nagain, NULL);
			MemoryContextSwitchTo(old);
			for (int k = 0; k < nagain; k++)
				if (again[k].done)
				{
					jobs[at[k]].result = again[k].result;
					jobs[at[k]].done = true;
				}
		}
	}

	for (int i = 0; i < n; i++)
	{
		RbrGradeJob *job = &jobs[i];
		RbrGradeResult *res = &job->result;
		LineEntry  *e;

		if (job->done && !(res->ok && res->cached))
			continue;
		e = hash_search(lines, job->key, HASH_FIND, NULL);
		if (job->done)
		{
			/* from the cache: the first use of an answer a batch brought counts as asked */
			if (e != NULL && e->state == 'd')
			{
				res->cached = false;
				res->attempts = 1;
				res->prompt_tokens = e->tokens[0];
				res->completion_tokens = e->tokens[1];
				res->cached_tokens = e->tokens[2];
				res->reasoning_tokens = e->tokens[3];
				applied[napplied++] = e->line_id;
				e->state = 'a';
			}
			continue;
		}
		job->done = true;
		res->ok = false;
		res->attempts = 0;
		if (e != NULL && (e->state == 'q' || e->state == 's'))
			res->pending = true;
		else if (e != NULL && e->state == 'f')
		{
			/* reported once; the next call queues the question again */
			res->error = MemoryContextStrdup(caller, e->error ? e->error : "the Batch API gave no answer");
			res->attempts = e->attempts;
			dropped[ndropped++] = e->line_id;
			e->state = 'x';
		}
		else if (e != NULL && e->state == 'x')
			res->error = MemoryContextStrdup(caller, e->error ? e->error : "the Batch API gave no answer");
		else if (e != NULL && e->state == 'n')
			res->pending = true;	/* queued by an earlier job of this call */
		else
		{
			MemoryContext old = MemoryContextSwitchTo(caller);
			char	   *body = ep.build_body(job, ep.token_param());

			MemoryContextSwitchTo(old);
			/* answered once, but no longer in the cache: asked again */
			if (e != NULL && e->state == 'd')
				dropped[ndropped++] = e->line_id;
			else if (e == NULL)
				e = hash_search(lines, job->key, HASH_ENTER, NULL);
			e->state = 'n';
			new_keys[nnew] = rbr_cache_key_datum(job->key);
			new_props[nnew] = CStringGetTextDatum(names ? names[i] : "");
			new_bodies[nnew] = CStringGetTextDatum(body);
			nnew++;
			res->pending = true;
		}
	}

	if (napplied > 0)
	{
		argtypes[0] = INT8ARRAYOID;
		args[0] = int8_array(applied, napplied);
		exec_owner("UPDATE rbr.batch_line SET state = 'applied', body = NULL, "
				   "updated_at = pg_catalog.clock_timestamp() "
				   "WHERE line_id OPERATOR(pg_catalog.=) ANY ($1) AND state OPERATOR(pg_catalog.=) 'done'",
				   1, argtypes, args, NULL, SPI_OK_UPDATE);
	}
	if (ndropped > 0)
	{
		argtypes[0] = INT8ARRAYOID;
		args[0] = int8_array(dropped, ndropped);
		exec_owner("DELETE FROM rbr.batch_line WHERE line_id OPERATOR(pg_catalog.=) ANY ($1) "
				   "AND state OPERATOR(pg_catalog.=) ANY ('{failed,done}')",
				   1, argtypes, args, NULL, SPI_OK_DELETE);
	}
	if (nnew > 0)
	{
		argtypes[0] = OIDOID;
		args[0] = ObjectIdGetDatum(active_owner);
		argtypes[1] = INT8OID;
		args[1] = Int64GetDatum(active_run);
		argtypes[2] = BYTEAARRAYOID;
		args[2] = PointerGetDatum(construct_array(new_keys, nnew, BYTEAOID, -1, false, TYPALIGN_INT));
		argtypes[3] = TEXTARRAYOID;
		args[3] = PointerGetDatum(construct_array(new_props, nnew, TEXTOID, -1, false, TYPALIGN_INT));
		argtypes[4] = TEXTARRAYOID;
		args[4] = PointerGetDatum(construct_array(new_bodies, nnew, TEXTOID, -1, false, TYPALIGN_INT));
		argtypes[5] = TEXTOID;
		args[5] = CStringGetTextDatum(kind);
		exec_owner("INSERT INTO rbr.batch_line (owner, run_id, key, proposition, body, kind) "
				   "SELECT $1::pg_catalog.regrole, $2, k, p, b, $6 "
				   "FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5)) AS u(k, p, b) "
				   "ON CONFLICT (owner, key) WHERE state OPERATOR(pg_catalog.<>) 'applied' DO NOTHING",
				   6, argtypes, args, NULL, SPI_OK_INSERT);
	}
	SPI_finish();
	hash_destroy(lines);
}

/* See batch.h: grading jobs. */
void
rbr_batch_prepare_jobs(RbrGradeJob *jobs, int n, const char *const *names)
{
	prepare_jobs(jobs, n, names, "grade");
}

/* See batch.h: generation jobs. */
void
rbr_batch_prepare_gen_jobs(RbrGradeJob *jobs, int n)
{
	prepare_jobs(jobs, n, NULL, "generate");
}

PG_FUNCTION_INFO_V1(rbr_batch_chunk);
/* rbr.batch_chunk(run): one rbr.featurize_chunk of a batch-mode run, grading from the cache only. */
Datum
rbr_batch_chunk(PG_FUNCTION_ARGS)
{
	int64		run_id = PG_GETARG_INT64(0);
	Oid			owner;
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(run_id)};
	int			claimed = 0;

	SPI_connect();
	owner = rbr_run_owner(run_id);
	PG_TRY();
	{
		bool		isnull;

		active_run = run_id;
		active_owner = owner;
		/* as the caller: the chunk reads and writes the caller's tables */
		if (SPI_execute_with_args(run_is_synth(run_id) ? "SELECT rbr.synth_chunk($1)" : "SELECT rbr.featurize_chunk($1)",
								  1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT ||
			SPI_processed != 1)
			elog(ERROR, "rbr: batch-mode chunk failed");
		claimed = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	PG_FINALLY();
	{
		active_run = 0;
		active_owner = InvalidOid;
	}
	PG_END_TRY();
	SPI_finish();
	PG_RETURN_INT32(claimed);
}

PG_FUNCTION_INFO_V1(rbr_batch_rewind);
/* rbr.batch_rewind(run): start the run's chunks from the first row again (after a collect). */
Datum
rbr_batch_rewind(PG_FUNCTION_ARGS)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {PG_GETARG_DATUM(0)};

	SPI_connect();
	(void) rbr_run_owner(PG_GETARG_INT64(0));
	exec_owner("UPDATE rbr.run SET last_key = NULL, updated_at = pg_catalog.clock_timestamp() "
			   "WHERE run_id OPERATOR(pg_catalog.=) $1", 1, argtypes, args, NULL, SPI_OK_UPDATE);
	SPI_finish();
	PG_RETURN_VOID();
}

/* ---------------------------------------------------------------------------
 * The provider's API
 * ------------------------------------------------------------------------- */

/* Is the endpoint Azure OpenAI (api-version or v1 form)? */
static bool
is_azure(const RbrEndpoint *ep)
{
	return ep->azure_api_version != NULL && ep->azure_api_version[0] != '\0';
}

/* URL of a Batch API resource ("files", "batches/ID", ...), with an optional query. */
static char *
api_url(const RbrEndpoint *ep, const char *what, const char *query)
{
	StringInfoData u;
	char	   *base = rbr_endpoint_base(ep);

	initStringInfo(&u);
	if (is_azure(ep) && pg_strcasecmp(ep->azure_api_version, "v1") == 0)
		appendStringInfo(&u, "%s/openai/v1/%s%s%s", base, what, query ? "?" : "", query ? query : "");
	else if (is_azure(ep))
	{
		char	   *ver = curl_easy_escape(NULL, ep->azure_api_version, 0);

		if (ver == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		appendStringInfo(&u, "%s/openai/%s?api-version=%s%s%s", base, what, ver, query ? "&" : "", query ? query : "");
		curl_free(ver);
	}
	else
		appendStringInfo(&u, "%s/%s%s%s", base, what, query ? "?" : "", query ? query : "");
	return u.data;
}

/* The "url" of a line and "endpoint" of a batch: the grader's path on the provider. */
static char *
line_url(const RbrEndpoint *ep)
{
	return psprintf(is_azure(ep) ? "/%s" : "/v1/%s", ep->path);
}

/* The endpoint of a kind of line ("grade": the grader, "generate": the generator), unresolved. */
static void
kind_endpoint(RbrEndpoint *ep, const char *kind)
{
	if (strcmp(kind, "generate") == 0)
		rbr_generator_endpoint(ep);
	else
		rbr_grader_endpoint(ep);
}

/* The endpoint of a kind of line, resolved (URL, key). */
static void
resolved_endpoint(RbrEndpoint *ep, const char *kind)
{
	kind_endpoint(ep, kind);
	rbr_secrets_resolve(ep);
}

/* Wait up to ms milliseconds, cancellable at once. */
static void
sleep_ms(double ms)
{
	TimestampTz end = GetCurrentTimestamp() + (TimestampTz) (ms * 1000.0);

	for (;;)
	{
		TimestampTz now = GetCurrentTimestamp();
		long		left;

		CHECK_FOR_INTERRUPTS();
		if (now >= end)
			break;
		left = (long) Min((end - now) / 1000 + 1, 100);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, left, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* Is an HTTP answer worth another try (no answer, 408, 409, 429, 5xx)? */
static bool
transient(long status)
{
	return status == 0 || status == 408 || status == 409 || status == 429 || status >= 500;
}

/*
 * One Batch API request with retries of transient failures; ERROR (the
 * reason scrubbed of secrets) when it fails for good. Returns the 2xx body.
 */
static char *
api_call(const RbrEndpoint *ep, const char *what, const char *method, const char *url,
		 const char *json_body, const char *file_name, const char *file_data, size_t file_len,
		 size_t max_bytes, size_t *len, bool *not_found)
{
	RbrHttpReply reply;
	long		timeout = Max((long) ep->timeout_ms, 300000L);

	for (int attempt = 0;; attempt++)
	{
		rbr_http_request(ep, method, url, json_body, file_name, file_data, file_len, max_bytes, timeout, &reply);
		if (reply.status >= 200 && reply.status < 300)
			break;
		if (reply.status == 404 && not_found != NULL)
		{
			*not_found = true;
			*len = 0;
			return NULL;
		}
		if (!transient(reply.status) || attempt >= ep->max_retries)
		{
			char	   *reason;

			if (reply.status == 0)
				reason = reply.error;
			else
			{
				char	   *param;
				void	   *holder = NULL;

				reason = rbr_grader_error_reason(reply.status, reply.body, reply.len, &param, &holder);
			}
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("the Batch API refused to %s: %s", what, rbr_grader_scrub(reason)),
					 errdetail("%s %s, %d attempt(s).", method, rbr_grader_scrub(url), attempt + 1),
					 errhint("Check that the endpoint offers the Batch API (rbr.grader_url, rbr.grader_azure_api_version); CALL rbr_featurize again to go on: nothing is submitted twice.")));
		}
		sleep_ms(Min((double) ep->retry_base_ms * (1 << Min(attempt, 6)), (double) RBR_MAX_BACKOFF_MS));
	}
	*len = reply.len;
	return reply.body;
}

/* ---------------------------------------------------------------------------
 * Submitting
 * ------------------------------------------------------------------------- */

PG_FUNCTION_INFO_V1(rbr_batch_prepare);
/*
 * rbr.batch_prepare(run): the next batch to submit for the run's owner: one
 * left half-way (not uploaded, or uploaded but not created), else a new one
 * of queued lines (up to rbr.batch_max_lines and rbr.batch_max_file_mb);
 * NULL when nothing is queued.
 */
Datum
rbr_batch_prepare(PG_FUNCTION_ARGS)
{
	int64		run_id = PG_GETARG_INT64(0);
	Oid			owner;
	Oid			argtypes[5];
	Datum		args[5];
	bool		isnull;
	int64		batch_id = 0;
	char	   *kind;
	int64	   *ids;
	int			nids = 0;
	int64		bytes = 0;
	int64		max_bytes = (int64) batch_max_file_mb * 1024 * 1024;
	RbrEndpoint ep;

	SPI_connect();
	owner = rbr_run_owner(run_id);
	argtypes[0] = OIDOID;
	args[0] = ObjectIdGetDatum(owner);
	/* one session at a time chooses an owner's lines (until it commits) */
	if (rbr_spi_execute_as_owner("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rbr.batch'), $1::pg_catalog.int4)",
								 1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch lock failed");
	if (rbr_spi_execute_as_owner("SELECT batch_id FROM rbr.batch WHERE owner OPERATOR(pg_catalog.=) $1::pg_catalog.regrole "
								 "AND state OPERATOR(pg_catalog.=) ANY ('{new,uploaded}') ORDER BY batch_id LIMIT 1",
								 1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch lookup failed");
	if (SPI_processed == 1)
	{
		batch_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		SPI_finish();
		PG_RETURN_INT64(batch_id);
	}
	/* one kind per batch (grader and generator may be different endpoints): the oldest line's */
	if (rbr_spi_execute_as_owner("SELECT kind FROM rbr.batch_line WHERE owner OPERATOR(pg_catalog.=) $1::pg_catalog.regrole "
								 "AND state OPERATOR(pg_catalog.=) 'queued' AND batch_id IS NULL ORDER BY line_id LIMIT 1",
								 1, argtypes, args, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch line lookup failed");
	if (SPI_processed == 0)
	{
		SPI_finish();
		PG_RETURN_NULL();
	}
	kind = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	argtypes[1] = INT4OID;
	args[1] = Int32GetDatum(batch_max_lines);
	argtypes[2] = TEXTOID;
	args[2] = CStringGetTextDatum(kind);
	if (rbr_spi_execute_as_owner("SELECT line_id, pg_catalog.octet_length(body) FROM rbr.batch_line "
								 "WHERE owner OPERATOR(pg_catalog.=) $1::pg_catalog.regrole AND kind OPERATOR(pg_catalog.=) $3 "
								 "AND state OPERATOR(pg_catalog.=) 'queued' AND batch_id IS NULL ORDER BY line_id LIMIT $2",
								 3, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch line lookup failed");
	ids = palloc(sizeof(int64) * Max(SPI_processed, 1));
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		int64		len = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &isnull)) + 128;

		CHECK_FOR_INTERRUPTS();
		if (nids > 0 && bytes + len > max_bytes)
			break;
		bytes += len;
		ids[nids++] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));
	}
	if (nids == 0)
	{
		SPI_finish();
		PG_RETURN_NULL();
	}
	kind_endpoint(&ep, kind);
	argtypes[1] = INT8OID;
	args[1] = Int64GetDatum(run_id);
	argtypes[2] = TEXTOID;
	args[2] = CStringGetTextDatum(is_azure(&ep) ? "azure" : "openai");
	argtypes[3] = INT4OID;
	args[3] = Int32GetDatum(nids);
	argtypes[4] = TEXTOID;
	args[4] = CStringGetTextDatum(kind);
	if (rbr_spi_execute_as_owner("INSERT INTO rbr.batch (owner, run_id, api, lines, kind) "
								 "VALUES ($1::pg_catalog.regrole, $2, $3, $4, $5) RETURNING batch_id",
								 5, argtypes, args, NULL, false, 0) != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "rbr: could not record a batch");
	batch_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	argtypes[0] = INT8OID;
	args[0] = Int64GetDatum(batch_id);
	argtypes[1] = INT8ARRAYOID;
	args[1] = int8_array(ids, nids);
	exec_owner("UPDATE rbr.batch_line SET batch_id = $1, updated_at = pg_catalog.clock_timestamp() "
			   "WHERE line_id OPERATOR(pg_catalog.=) ANY ($2)", 2, argtypes, args, NULL, SPI_OK_UPDATE);
	SPI_finish();
	PG_RETURN_INT64(batch_id);
}

PG_FUNCTION_INFO_V1(rbr_batch_upload);
/*
 * rbr.batch_upload(batch): upload the batch's lines as a JSONL file (purpose
 * batch) and record the file's id; a batch uploaded already is left alone.
 * Returns the input file id.
 */
Datum
rbr_batch_upload(PG_FUNCTION_ARGS)
{
	int64		batch_id = PG_GETARG_INT64(0);
	BatchRow	b;
	Oid			argtypes[2] = {INT8OID, TEXTOID};
	Datum		args[2];
	StringInfoData f;
	RbrEndpoint ep;
	char	   *url_field;
	char	   *resp;
	size_t		len;
	char	   *file_id;
	char	   *name;
	json_object *root;
	Datum		result;

	SPI_connect();
	b = batch_row(batch_id);
	if (strcmp(b.state, "new") != 0)
	{
		Datum		t = b.input_file_id ? SPI_datumTransfer(CStringGetTextDatum(b.input_file_id), false, -1) : (Datum) 0;

		SPI_finish();
		if (t == (Datum) 0)
			PG_RETURN_NULL();
		PG_RETURN_DATUM(t);
	}
	resolved_endpoint(&ep, b.kind);
	url_field = line_url(&ep);
	args[0] = Int64GetDatum(batch_id);
	if (rbr_spi_execute_as_owner("SELECT line_id, body FROM rbr.batch_line WHERE batch_id OPERATOR(pg_catalog.=) $1 "
								 "ORDER BY line_id", 1, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch line lookup failed");
	initStringInfo(&f);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		int64		id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));
		char	   *body = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2);

		CHECK_FOR_INTERRUPTS();
		if (body == NULL)
			continue;
		/* JSON on the wire is UTF-8, whatever the database encoding */
		if (GetDatabaseEncoding() != PG_UTF8)
			body = pg_server_to_any(body, strlen(body), PG_UTF8);
		appendStringInfo(&f, "{\"custom_id\": \"rbr-" INT64_FORMAT "\", \"method\": \"POST\", \"url\": \"%s\", \"body\": %s}\n",
						 id, url_field, body);
	}
	if (f.len == 0)
	{
		/* nothing left to ask (cannot happen through batch_drive): the batch is over */
		exec_owner("UPDATE rbr.batch SET state = 'ended', lines = 0, ended_at = pg_catalog.clock_timestamp(), "
				   "updated_at = pg_catalog.clock_timestamp() WHERE batch_id OPERATOR(pg_catalog.=) $1",
				   1, argtypes, args, NULL, SPI_OK_UPDATE);
		SPI_finish();
		PG_RETURN_NULL();
	}
	name = psprintf("rbr-batch-%lld.jsonl", (long long) batch_id);
	resp = api_call(&ep, "upload the batch file", "POST", api_url(&ep, "files", NULL), NULL,
					name, f.data, f.len, RBR_MAX_RESPONSE_BYTES, &len, NULL);
	pfree(f.data);
	root = parse_held(resp, len);
	file_id = jstr(root, "id");
	put_held();
	if (!id_ok(file_id))
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("the Batch API answered the file upload without a usable file id")));
	args[1] = CStringGetTextDatum(file_id);
	durable_commit();
	exec_owner("UPDATE rbr.batch SET input_file_id = $2, state = 'uploaded', updated_at = pg_catalog.clock_timestamp() "
			   "WHERE batch_id OPERATOR(pg_catalog.=) $1", 2, argtypes, args, NULL, SPI_OK_UPDATE);
	result = SPI_datumTransfer(CStringGetTextDatum(file_id), false, -1);
	SPI_finish();
	PG_RETURN_DATUM(result);
}

/* The provider's batch of an input file, from its list of batches; NULL if none. */
static char *
find_batch(const RbrEndpoint *ep, const char *input_file_id)
{
	char	   *after = NULL;

	/* the newest batches first: a few pages are enough for one just created */
	for (int page = 0; page < 20; page++)
	{
		char	   *query = after ? psprintf("limit=100&after=%s", after) : pstrdup("limit=100");
		size_t		len;
		char	   *resp = api_call(ep, "list the batches", "GET", api_url(ep, "batches", query), NULL,
									NULL, NULL, 0, 64 * 1024 * 1024, &len, NULL);
		json_object *root = parse_held(resp, len);
		json_object *data = rbr_jsonc_get(root, "data");
		json_object *more = rbr_jsonc_get(root, "has_more");
		char	   *found = NULL;
		char	   *last = NULL;
		size_t		n = data && json_object_is_type(data, json_type_array) ? json_object_array_length(data) : 0;

		for (size_t i = 0; i < n && found == NULL; i++)
		{
			json_object *b = json_object_array_get_idx(data, i);
			char	   *in = jstr(b, "input_file_id");

			if (in != NULL && strcmp(in, input_file_id) == 0)
				found = jstr(b, "id");
		}
		if (n > 0)
			last = jstr(json_object_array_get_idx(data, n - 1), "id");
		if (found == NULL && (more == NULL || !json_object_get_boolean(more) || !id_ok(last)))
		{
			put_held();
			return NULL;
		}
		put_held();
		if (found != NULL)
			return found;
		after = last;
	}
	return NULL;
}

PG_FUNCTION_INFO_V1(rbr_batch_create);
/*
 * rbr.batch_create(batch): create the provider's batch of an uploaded file
 * (after looking for one created already with that file), record it and
 * mark its lines submitted. Returns the provider's batch id.
 */
Datum
rbr_batch_create(PG_FUNCTION_ARGS)
{
	int64		batch_id = PG_GETARG_INT64(0);
	BatchRow	b;
	Oid			argtypes[3] = {INT8OID, TEXTOID, TEXTOID};
	Datum		args[3];
	RbrEndpoint ep;
	char	   *provider_id;
	char	   *status = NULL;
	Datum		result;

	SPI_connect();
	b = batch_row(batch_id);
	if (strcmp(b.state, "uploaded") != 0)
	{
		Datum		t = b.provider_id ? SPI_datumTransfer(CStringGetTextDatum(b.provider_id), false, -1) : (Datum) 0;

		SPI_finish();
		if (t == (Datum) 0)
			PG_RETURN_NULL();
		PG_RETURN_DATUM(t);
	}
	resolved_endpoint(&ep, b.kind);
	provider_id = find_batch(&ep, b.input_file_id);
	if (provider_id == NULL)
	{
		StringInfoData req;
		size_t		len;
		char	   *resp;
		json_object *root;

		initStringInfo(&req);
		appendStringInfo(&req, "{\"input_file_id\": \"%s\", \"endpoint\": \"%s\", \"completion_window\": \"24h\"",
						 b.input_file_id, line_url(&ep));
		if (!is_azure(&ep))
			appendStringInfo(&req, ", \"metadata\": {\"rbr_batch\": \"%lld\", \"rbr_run\": \"%lld\", \"rbr_input_file\": \"%s\"}",
							 (long long) batch_id, (long long) b.run_id, b.input_file_id);
		appendStringInfoChar(&req, '}');
		resp = api_call(&ep, "create the batch", "POST", api_url(&ep, "batches", NULL), req.data,
						NULL, NULL, 0, RBR_MAX_RESPONSE_BYTES, &len, NULL);
		root = parse_held(resp, len);
		provider_id = jstr(root, "id");
		status = jstr(root, "status");
		put_held();
	}
	if (!id_ok(provider_id))
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("the Batch API answered the batch creation without a usable batch id")));
	args[0] = Int64GetDatum(batch_id);
	args[1] = CStringGetTextDatum(provider_id);
	args[2] = CStringGetTextDatum(status ? status : "validating");
	durable_commit();
	exec_owner("UPDATE rbr.batch SET provider_id = $2, provider_status = $3, state = 'submitted', "
			   "submitted_at = pg_catalog.clock_timestamp(), updated_at = pg_catalog.clock_timestamp() "
			   "WHERE batch_id OPERATOR(pg_catalog.=) $1", 3, argtypes, args, NULL, SPI_OK_UPDATE);
	exec_owner("UPDATE rbr.batch_line SET state = 'submitted', attempts = attempts + 1, "
			   "updated_at = pg_catalog.clock_timestamp() "
			   "WHERE batch_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) 'queued'",
			   1, argtypes, args, NULL, SPI_OK_UPDATE);
	result = SPI_datumTransfer(CStringGetTextDatum(provider_id), false, -1);
	SPI_finish();
	PG_RETURN_DATUM(result);
}

/* ---------------------------------------------------------------------------
 * Collecting
 * ------------------------------------------------------------------------- */

/* One line of a batch being collected. */
typedef struct CollectLine
{
	int64		line_id;
	RbrGradeJob job;
	const char *prop;
	char		outcome;		/* '\0' no answer yet, 'd' done, 'q' queue again, 'f' failed */
	char	   *error;
} CollectLine;

/* Read one answered line (status, body) into cl, with the endpoint's own parser. */
static void
read_line_answer(const RbrEndpoint *ep, CollectLine *cl, long status, const char *body, size_t len)
{
	RbrGradeResult *res = &cl->job.result;

	res->prompt_tokens = res->completion_tokens = res->cached_tokens = res->reasoning_tokens = -1;
	res->yes_no_mass = NAN;
	if (status == 200)
	{
		void	   *holder = NULL;
		bool		ok = ep->read_answer(body, len, res, &holder);

		if (holder != NULL)
			json_object_put((json_object *) holder);
		if (ok && !res->again)
		{
			res->ok = true;
			res->cached = false;
			res->attempts = 1;
			cl->outcome = 'd';
		}
		else if (ok)
		{
			cl->outcome = 'f';
			cl->error = pstrdup("batch mode does not grade one sample per request; set rbr.grader_samples = 1 or grade online");
		}
		else
		{
			cl->outcome = res->retry ? 'q' : 'f';
			cl->error = res->error;
		}
	}
	else
	{
		char	   *param;
		void	   *holder = NULL;

		cl->error = rbr_grader_error_reason(status, body, len, &param, &holder);
		cl->outcome = transient(status) ? 'q' : 'f';
	}
}

/* Read a JSONL file of a batch's answers (output or error file) into lines[]. */
static void
read_results(const RbrEndpoint *ep, const char *data, size_t len, CollectLine *lines, int nlines, HTAB *index)
{
	const char *p = data;
	const char *end = data + len;

	while (p < end)
	{
		const char *nl = memchr(p, '\n', end - p);
		const char *e = nl ? nl : end;
		json_object *root;
		char	   *custom;
		json_object *resp;
		json_object *err;
		int64		id;
		int64	   *found;
		CollectLine *cl;

		CHECK_FOR_INTERRUPTS();
		root = parse_held(p, e - p);
		p = nl ? nl + 1 : end;
		if (root == NULL)
			continue;
		custom = jstr(root, "custom_id");
		if (custom == NULL || strncmp(custom, "rbr-", 4) != 0)
			continue;
		id = strtoi64(custom + 4, NULL, 10);
		found = hash_search(index, &id, HASH_FIND, NULL);
		if (found == NULL)
			continue;			/* not a line of this batch (or answered already) */
		cl = &lines[found[1]];
		if (cl->outcome == 'd')
			continue;
		resp = rbr_jsonc_get(root, "response");
		err = rbr_jsonc_get(root, "error");
		if (resp != NULL && rbr_jsonc_get(resp, "status_code") != NULL)
		{
			long		status = json_object_get_int(rbr_jsonc_get(resp, "status_code"));
			json_object *body = rbr_jsonc_get(resp, "body");
			char	   *text = body ? pstrdup(json_object_to_json_string_ext(body, JSON_C_TO_STRING_PLAIN |
																			JSON_C_TO_STRING_NOSLASHESCAPE)) : pstrdup("");

			put_held();
			read_line_answer(ep, cl, status, text, strlen(text));
		}
		else if (err != NULL && json_object_is_type(err, json_type_object))
		{
			char	   *code = jstr(err, "code");
			char	   *msg = jstr(err, "message");

			put_held();
			cl->outcome = 'q';
			cl->error = rbr_grader_scrub(psprintf("%s%s%s", msg ? msg : "no answer", code ? ": " : "", code ? code : ""));
		}
		put_held();
	}
	(void) nlines;
}

/* Download a file's content. */
static char *
file_content(const RbrEndpoint *ep, const char *file_id, size_t *len)
{
	if (!id_ok(file_id))
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("the Batch API named an unusable file id")));
	return api_call(ep, "send a batch's results", "GET", api_url(ep, psprintf("files/%s/content", file_id), NULL),
					NULL, NULL, NULL, 0, (size_t) MaxAllocHugeSize - 1, len, NULL);
}

/*
 * Collect one ended batch: read its output and error files, store the
 * answers in the grade cache, mark lines done (with their tokens), queue
 * again those that failed for a reason a retry may fix (or that got no
 * answer: expired, cancelled), fail the others. Returns the lines answered
 * or failed for good.
 */
static int
collect_batch(const RbrEndpoint *ep, const char *kind, int64 batch_id, const char *status,
			  const char *output_file, const char *error_file, const char *batch_error)
{
	Oid			argtypes[6];
	Datum		args[6];
	CollectLine *lines;
	int			nlines;
	HASHCTL		ctl;
	HTAB	   *index;
	int		   *idx;
	const char **props;
	int			nok = 0;
	int64	   *ids[3];
	int			nids[3] = {0, 0, 0};
	Datum	   *errs[2];
	int32	   *tok[4];
	RbrGradeJob *jobs;

	argtypes[0] = INT8OID;
	args[0] = Int64GetDatum(batch_id);
	if (rbr_spi_execute_as_owner("SELECT line_id, key, proposition FROM rbr.batch_line "
								 "WHERE batch_id OPERATOR(pg_catalog.=) $1 AND state OPERATOR(pg_catalog.=) 'submitted' "
								 "ORDER BY line_id", 1, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch line lookup failed");
	nlines = (int) SPI_processed;
	lines = palloc0(sizeof(CollectLine) * Max(nlines, 1));
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(int64) * 2;
	ctl.hcxt = CurrentMemoryContext;
	index = hash_create("rbr batch collect", Max(nlines, 16), &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	for (int i = 0; i < nlines; i++)
	{
		bool		isnull;
		bytea	   *k;
		int64	   *e;

		CHECK_FOR_INTERRUPTS();
		lines[i].line_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
		k = DatumGetByteaPCopy(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull));
		memcpy(lines[i].job.key, VARDATA_ANY(k), 32);
		lines[i].prop = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3);
		e = hash_search(index, &lines[i].line_id, HASH_ENTER, NULL);
		e[1] = i;
	}

	if (output_file != NULL)
	{
		size_t		len;
		char	   *data = file_content(ep, output_file, &len);

		read_results(ep, data, len, lines, nlines, index);
		pfree(data);
	}
	if (error_file != NULL)
	{
		size_t		len;
		char	   *data = file_content(ep, error_file, &len);

		read_results(ep, data, len, lines, nlines, index);
		pfree(data);
	}

	/* answers into the grade cache, through the grader's own store */
	jobs = palloc0(sizeof(RbrGradeJob) * Max(nlines, 1));
	idx = palloc(sizeof(int) * Max(nlines, 1));
	props = palloc(sizeof(char *) * Max(nlines, 1));
	for (int i = 0; i < nlines; i++)
	{
		jobs[i] = lines[i].job;
		props[i] = lines[i].prop;
		if (lines[i].outcome == 'd')
			idx[nok++] = i;
	}
	if (nok > 0 && strcmp(kind, "generate") == 0)
	{
		RbrGradeJob *okjobs = palloc(sizeof(RbrGradeJob) * nok);

		for (int k = 0; k < nok; k++)
			okjobs[k] = jobs[idx[k]];
		rbr_gen_cache_store(okjobs, nok);
	}
	else if (nok > 0)
		rbr_cache_store(jobs, idx, nok, props);

	for (int k = 0; k < 3; k++)
		ids[k] = palloc(sizeof(int64) * Max(nlines, 1));
	for (int k = 0; k < 2; k++)
		errs[k] = palloc(sizeof(Datum) * Max(nlines, 1));
	for (int c = 0; c < 4; c++)
		tok[c] = palloc(sizeof(int32) * Max(nlines, 1));
	for (int i = 0; i < nlines; i++)
	{
		CollectLine *cl = &lines[i];

		CHECK_FOR_INTERRUPTS();
		if (cl->outcome == 'd')
		{
			RbrGradeResult *r = &cl->job.result;
			int			m = nids[0];

			ids[0][m] = cl->line_id;
			tok[0][m] = r->prompt_tokens;
			tok[1][m] = r->completion_tokens;
			tok[2][m] = r->cached_tokens;
			tok[3][m] = r->reasoning_tokens;
			nids[0]++;
		}
		else
		{
			int			k = cl->outcome == 'f' ? 2 : 1;
			const char *why = cl->error ? cl->error
				: batch_error ? batch_error
				: psprintf("no answer: the batch ended %s", status);

			errs[k - 1][nids[k]] = CStringGetTextDatum(why);
			ids[k][nids[k]++] = cl->line_id;
		}
	}
	if (nids[0] > 0)
	{
		Datum	   *td[4];

		for (int c = 0; c < 4; c++)
		{
			td[c] = palloc(sizeof(Datum) * nids[0]);
			for (int m = 0; m < nids[0]; m++)
				td[c][m] = Int32GetDatum(tok[c][m]);
		}
		argtypes[0] = INT8ARRAYOID;
		args[0] = int8_array(ids[0], nids[0]);
		for (int c = 0; c < 4; c++)
		{
			argtypes[1 + c] = INT4ARRAYOID;
			args[1 + c] = PointerGetDatum(construct_array(td[c], nids[0], INT4OID, 4, true, TYPALIGN_INT));
		}
		exec_owner("UPDATE rbr.batch_line l SET state = 'done', body = NULL, error = NULL, "
				   "prompt_tokens = NULLIF(u.pt, -1), completion_tokens = NULLIF(u.ct, -1), "
				   "cached_tokens = NULLIF(u.cat, -1), reasoning_tokens = NULLIF(u.rt, -1), "
				   "updated_at = pg_catalog.clock_timestamp() "
				   "FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3), "
				   "pg_catalog.unnest($4), pg_catalog.unnest($5)) AS u(id, pt, ct, cat, rt) "
				   "WHERE l.line_id OPERATOR(pg_catalog.=) u.id",
				   5, argtypes, args, NULL, SPI_OK_UPDATE);
	}
	/* queue again (or, past rbr.grader_max_retries submissions, fail); fail */
	for (int k = 1; k <= 2; k++)
	{
		if (nids[k] == 0)
			continue;
		argtypes[0] = INT8ARRAYOID;
		args[0] = int8_array(ids[k], nids[k]);
		argtypes[1] = TEXTARRAYOID;
		args[1] = PointerGetDatum(construct_array(errs[k - 1], nids[k], TEXTOID, -1, false, TYPALIGN_INT));
		argtypes[2] = INT4OID;
		args[2] = Int32GetDatum(k == 2 ? 0 : ep->max_retries + 1);
		exec_owner("UPDATE rbr.batch_line l SET "
				   "state = CASE WHEN $3 OPERATOR(pg_catalog.>) l.attempts THEN 'queued' ELSE 'failed' END, "
				   "batch_id = CASE WHEN $3 OPERATOR(pg_catalog.>) l.attempts THEN NULL ELSE l.batch_id END, "
				   "error = CASE WHEN $3 OPERATOR(pg_catalog.>) l.attempts THEN u.e "
				   "  WHEN $3 OPERATOR(pg_catalog.=) 0 THEN u.e "
				   "  ELSE pg_catalog.format('%s (gave up after %s batch submissions)', u.e, l.attempts) END, "
				   "updated_at = pg_catalog.clock_timestamp() "
				   "FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2)) AS u(id, e) "
				   "WHERE l.line_id OPERATOR(pg_catalog.=) u.id",
				   3, argtypes, args, NULL, SPI_OK_UPDATE);
	}
	argtypes[0] = INT8OID;
	args[0] = Int64GetDatum(batch_id);
	argtypes[1] = INT4OID;
	args[1] = Int32GetDatum(nids[0]);
	argtypes[2] = INT4OID;
	args[2] = Int32GetDatum(nids[1]);
	argtypes[3] = INT4OID;
	args[3] = Int32GetDatum(nids[2]);
	argtypes[4] = TEXTOID;
	args[4] = CStringGetTextDatum(status);
	durable_commit();
	exec_owner("UPDATE rbr.batch SET state = 'ended', provider_status = $5, answered = $2, requeued = $3, failed = $4, "
			   "ended_at = pg_catalog.clock_timestamp(), updated_at = pg_catalog.clock_timestamp() "
			   "WHERE batch_id OPERATOR(pg_catalog.=) $1", 5, argtypes, args, NULL, SPI_OK_UPDATE);
	return nids[0] + nids[2];
}

PG_FUNCTION_INFO_V1(rbr_batch_collect);
/*
 * rbr.batch_collect(run): look at every submitted batch of the run's owner
 * (of the API in use: OpenAI or Azure); collect those that ended (completed, expired, failed, cancelled). Returns
 * the lines answered or failed for good.
 */
Datum
rbr_batch_collect(PG_FUNCTION_ARGS)
{
	int64		run_id = PG_GETARG_INT64(0);
	Oid			owner;
	Oid			argtypes[4];
	Datum		args[4];
	int64	   *bids;
	char	  **pids;
	char	  **kinds;
	int			nb;
	int			answered = 0;
	RbrEndpoint ep;
	MemoryContext per = AllocSetContextCreate(CurrentMemoryContext, "rbr batch collect", ALLOCSET_DEFAULT_SIZES);
	MemoryContext old;

	SPI_connect();
	owner = rbr_run_owner(run_id);
	argtypes[0] = OIDOID;
	args[0] = ObjectIdGetDatum(owner);
	rbr_grader_endpoint(&ep);
	argtypes[1] = TEXTOID;
	args[1] = CStringGetTextDatum(is_azure(&ep) ? "azure" : "openai");
	rbr_generator_endpoint(&ep);
	argtypes[2] = TEXTOID;
	args[2] = CStringGetTextDatum(is_azure(&ep) ? "azure" : "openai");
	if (rbr_spi_execute_as_owner("SELECT batch_id, provider_id, kind FROM rbr.batch "
								 "WHERE owner OPERATOR(pg_catalog.=) $1::pg_catalog.regrole "
								 "AND api OPERATOR(pg_catalog.=) CASE WHEN kind OPERATOR(pg_catalog.=) 'generate' THEN $3 ELSE $2 END "
								 "AND state OPERATOR(pg_catalog.=) 'submitted' ORDER BY batch_id FOR UPDATE SKIP LOCKED",
								 3, argtypes, args, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "rbr: batch lookup failed");
	nb = (int) SPI_processed;
	bids = palloc(sizeof(int64) * Max(nb, 1));
	pids = palloc(sizeof(char *) * Max(nb, 1));
	kinds = palloc(sizeof(char *) * Max(nb, 1));
	for (int i = 0; i < nb; i++)
	{
		bool		isnull;

		bids[i] = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
		pids[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2);
		kinds[i] = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3);
	}
	for (int i = 0; i < nb; i++)
	{
		size_t		len;
		char	   *resp;
		json_object *root;
		char	   *status;
		char	   *out_file;
		char	   *err_file;
		char	   *batch_error = NULL;
		json_object *counts;
		bool		gone = false;

		CHECK_FOR_INTERRUPTS();
		old = MemoryContextSwitchTo(per);
		resolved_endpoint(&ep, kinds[i]);
		if (!id_ok(pids[i]))
			ereport(ERROR,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("rbr batch %lld has an unusable provider id", (long long) bids[i])));
		resp = api_call(&ep, "tell a batch's state", "GET", api_url(&ep, psprintf("batches/%s", pids[i]), NULL),
						NULL, NULL, NULL, 0, RBR_MAX_RESPONSE_BYTES, &len, &gone);
		if (gone)
		{
			/* never submitted again on a guess: it may still be running elsewhere */
			ereport(WARNING,
					(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
					 errmsg("the Batch API does not know batch %s (rbr batch %lld); its lines stay in flight",
							pids[i], (long long) bids[i]),
					 errhint("Point rbr.%s_url (and rbr.%s_azure_api_version) at the endpoint that has the batch, as when it was submitted.",
							 strcmp(kinds[i], "generate") == 0 ? "generator" : "grader",
							 strcmp(kinds[i], "generate") == 0 ? "generator" : "grader")));
			MemoryContextSwitchTo(old);
			MemoryContextReset(per);
			continue;
		}
		root = parse_held(resp, len);
		status = jstr(root, "status");
		out_file = jstr(root, "output_file_id");
		err_file = jstr(root, "error_file_id");
		counts = rbr_jsonc_get(root, "request_counts");
		{
			json_object *errs = rbr_jsonc_get(rbr_jsonc_get(root, "errors"), "data");

			if (errs && json_object_is_type(errs, json_type_array) && json_object_array_length(errs) > 0)
			{
				char	   *m = jstr(json_object_array_get_idx(errs, 0), "message");

				if (m != NULL)
					batch_error = rbr_grader_scrub(psprintf("the batch failed: %s", m));
			}
		}
		argtypes[0] = INT8OID;
		args[0] = Int64GetDatum(bids[i]);
		argtypes[1] = TEXTOID;
		args[1] = CStringGetTextDatum(status ? status : "unknown");
		argtypes[2] = INT4OID;
		args[2] = Int32GetDatum(counts && rbr_jsonc_get(counts, "completed") ? json_object_get_int(rbr_jsonc_get(counts, "completed")) : 0);
		argtypes[3] = INT4OID;
		args[3] = Int32GetDatum(counts && rbr_jsonc_get(counts, "failed") ? json_object_get_int(rbr_jsonc_get(counts, "failed")) : 0);
		put_held();
		exec_owner("UPDATE rbr.batch SET provider_status = $2, provider_completed = $3, provider_failed = $4, "
				   "updated_at = pg_catalog.clock_timestamp() WHERE batch_id OPERATOR(pg_catalog.=) $1",
				   4, argtypes, args, NULL, SPI_OK_UPDATE);
		if (status != NULL &&
			(strcmp(status, "completed") == 0 || strcmp(status, "expired") == 0 ||
			 strcmp(status, "failed") == 0 || strcmp(status, "cancelled") == 0))
			answered += collect_batch(&ep, kinds[i], bids[i], status, out_file, err_file, batch_error);
		MemoryContextSwitchTo(old);
		MemoryContextReset(per);
	}
	SPI_finish();
	PG_RETURN_INT32(answered);
}

PG_FUNCTION_INFO_V1(rbr_batch_state);
/*
 * rbr.batch_state(run): the run's owner's lines for the run's source by
 * state (queued, submitted, answered, failed) and the owner's batches in
 * flight.
 */
Datum
rbr_batch_state(PG_FUNCTION_ARGS)
{
	int64		run_id = PG_GETARG_INT64(0);
	Oid			argtypes[2] = {INT8OID, OIDOID};
	Datum		args[2];
	Datum		row;
	int			ret;

	SPI_connect();
	args[0] = Int64GetDatum(run_id);
	args[1] = ObjectIdGetDatum(rbr_run_owner(run_id));
	ret = rbr_spi_execute_as_owner("SELECT "
								   "pg_catalog.count(*) FILTER (WHERE l.state OPERATOR(pg_catalog.=) 'queued') AS queued, "
								   "pg_catalog.count(*) FILTER (WHERE l.state OPERATOR(pg_catalog.=) 'submitted') AS submitted, "
								   "pg_catalog.count(*) FILTER (WHERE l.state OPERATOR(pg_catalog.=) ANY ('{done,applied}')) AS answered, "
								   "pg_catalog.count(*) FILTER (WHERE l.state OPERATOR(pg_catalog.=) 'failed') AS failed, "
								   "(SELECT pg_catalog.count(*) FROM rbr.batch b WHERE b.owner OPERATOR(pg_catalog.=) $2::pg_catalog.regrole "
								   " AND b.state OPERATOR(pg_catalog.<>) 'ended') AS batches_in_flight, "
								   "(SELECT pg_catalog.string_agg(b.provider_id, ', ' ORDER BY b.batch_id) FROM rbr.batch b "
								   " WHERE b.owner OPERATOR(pg_catalog.=) $2::pg_catalog.regrole AND b.state OPERATOR(pg_catalog.<>) 'ended') AS provider_ids "
								   "FROM rbr.batch_line l JOIN rbr.run r ON r.run_id OPERATOR(pg_catalog.=) l.run_id "
								   "WHERE l.owner OPERATOR(pg_catalog.=) $2::pg_catalog.regrole "
								   "AND r.source OPERATOR(pg_catalog.=) (SELECT s.source FROM rbr.run s WHERE s.run_id OPERATOR(pg_catalog.=) $1)",
								   2, argtypes, args, NULL, false, 0);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "rbr: batch state lookup failed");
	{
		TupleDesc	td;
		Datum		v[6];
		bool		nulls[6];

		for (int c = 0; c < 6; c++)
			v[c] = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, c + 1, &nulls[c]);
		if (!nulls[5])
			v[5] = SPI_datumTransfer(v[5], false, -1);
		SPI_finish();
		if (get_call_result_type(fcinfo, NULL, &td) != TYPEFUNC_COMPOSITE)
			elog(ERROR, "rbr: batch_state must return a record");
		row = HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(td), v, nulls));
	}
	PG_RETURN_DATUM(row);
}

PG_FUNCTION_INFO_V1(rbr_batch_sleep);
/* rbr.batch_sleep(seconds): wait between two looks at batches in flight, cancellable at once. */
Datum
rbr_batch_sleep(PG_FUNCTION_ARGS)
{
	double		s = PG_ARGISNULL(0) ? batch_poll_seconds : PG_GETARG_FLOAT8(0);

	if (!(s >= 0) || s > 86400)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("poll_seconds must be between 0 and 86400")));
	sleep_ms(s * 1000.0);
	PG_RETURN_VOID();
}
