/*
 * runs.c: the bookkeeping of bulk runs (rbr_featurize, rbr_synthesize).
 *
 * One table, rbr.run, records every run of both procedures: its owner, the
 * tables it reads and writes, the policy version, its options and counters.
 * No role may write it directly; these functions do, as the extension's
 * owner (owner.c), after checking that the caller owns the run (or is a
 * member of the owning role, or a superuser). Nothing read back from the
 * table is ever used as SQL text: the procedures take table names from the
 * catalogs (regclass) and column types from pg_attribute on every use.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "owner.h"

/* The owner of run_id, after checking that it exists and that the caller may act on it (inside SPI). */
Oid
rbr_run_owner(int64 run_id)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(run_id)};
	bool		isnull;
	Oid			owner;

	if (rbr_spi_execute_as_owner("SELECT owner FROM rbr.run WHERE run_id OPERATOR(pg_catalog.=) $1",
								 1, argtypes, args, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "rbr: run lookup failed");
	if (SPI_processed != 1)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no rbr run %lld", (long long) run_id)));
	owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (isnull || !has_privs_of_role(GetUserId(), owner))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for rbr run %lld", (long long) run_id),
				 errdetail("The run belongs to another role; only its owner, members of the owning role and superusers may use it.")));
	return owner;
}

/* Run a statement returning one rbr.run row as the owner; that row as a Datum. */
static Datum
run_row(const char *sql, int nargs, Oid *argtypes, Datum *args, const char *nulls)
{
	int			ret = rbr_spi_execute_as_owner(sql, nargs, argtypes, args, nulls, false, 0);

	if ((ret != SPI_OK_SELECT && ret != SPI_OK_UPDATE_RETURNING) || SPI_processed != 1)
		elog(ERROR, "rbr: run update failed: %s", SPI_result_code_string(ret));
	return PointerGetDatum(SPI_returntuple(SPI_tuptable->vals[0], SPI_tuptable->tupdesc));
}

PG_FUNCTION_INFO_V1(rbr_run_begin);
/* rbr.run_begin(kind, source, outputs, policy, options, total): record a run of the caller's. */
Datum
rbr_run_begin(PG_FUNCTION_ARGS)
{
	text	   *kind = PG_GETARG_TEXT_PP(0);
	Oid			source = PG_GETARG_OID(1);
	ArrayType  *outputs = PG_GETARG_ARRAYTYPE_P(2);
	Datum	   *outs;
	bool	   *outnulls;
	int			nouts;
	Oid			argtypes[8] = {TEXTOID, OIDOID, REGCLASSOID, REGCLASSARRAYOID, TEXTOID, JSONBOID, INT8OID, INT4OID};
	Datum		args[8];
	bool		isnull;
	int64		run_id;

	deconstruct_array(outputs, REGCLASSOID, sizeof(Oid), true, TYPALIGN_INT, &outs, &outnulls, &nouts);
	for (int i = 0; i < nouts; i++)
	{
		if (outnulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("output tables of a run must not be NULL")));
		/* rbr writes only into tables of the caller's */
		if (get_rel_relkind(DatumGetObjectId(outs[i])) == '\0' ||
			!pg_class_ownercheck(DatumGetObjectId(outs[i]), GetUserId()))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("rbr writes only into tables its caller owns")));
	}
	args[0] = PointerGetDatum(kind);
	args[1] = ObjectIdGetDatum(GetUserId());
	args[2] = ObjectIdGetDatum(source);
	args[3] = PointerGetDatum(outputs);
	args[4] = PG_GETARG_DATUM(3);
	args[5] = PG_GETARG_DATUM(4);
	args[6] = PG_GETARG_DATUM(5);
	args[7] = Int32GetDatum(MyProcPid);

	SPI_connect();
	if (rbr_spi_execute_as_owner("INSERT INTO rbr.run (kind, owner, source, outputs, policy, options, total, pid) "
								 "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING run_id",
								 8, argtypes, args, NULL, false, 0) != SPI_OK_INSERT_RETURNING ||
		SPI_processed != 1)
		elog(ERROR, "rbr: could not record the run");
	run_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	PG_RETURN_INT64(run_id);
}

/* Check that the caller owns run_id, then run sql ($1 = run_id) returning its row. */
static Datum
owned_run_row(int64 run_id, const char *sql)
{
	Oid			argtypes[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(run_id)};
	Datum		row;

	SPI_connect();
	(void) rbr_run_owner(run_id);
	row = run_row(sql, 1, argtypes, args, NULL);
	SPI_finish();
	return row;
}

PG_FUNCTION_INFO_V1(rbr_run_get);
/* rbr.run_get(run_id): the run's row, for its owner. */
Datum
rbr_run_get(PG_FUNCTION_ARGS)
{
	PG_RETURN_DATUM(owned_run_row(PG_GETARG_INT64(0),
								  "SELECT * FROM rbr.run WHERE run_id OPERATOR(pg_catalog.=) $1"));
}

PG_FUNCTION_INFO_V1(rbr_run_advance);
/*
 * rbr.run_advance(run_id, done, errors, cached, requests, prompt_tokens,
 * completion_tokens, cached_tokens, reasoning_tokens, counters, last_key):
 * add one committed chunk's counts to the run; returns the updated row.
 */
Datum
rbr_run_advance(PG_FUNCTION_ARGS)
{
	Oid			argtypes[11] = {INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID,
	JSONBOID, TEXTOID};
	Datum		args[11];
	char		nulls[11];
	Datum		row;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("run_id must not be NULL")));
	for (int i = 0; i < 11; i++)
	{
		args[i] = PG_ARGISNULL(i) ? (Datum) 0 : PG_GETARG_DATUM(i);
		nulls[i] = PG_ARGISNULL(i) ? 'n' : ' ';
		if (i >= 1 && i <= 8 && !PG_ARGISNULL(i) && PG_GETARG_INT64(i) < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("run counters only grow")));
	}
	SPI_connect();
	(void) rbr_run_owner(PG_GETARG_INT64(0));
	row = run_row("UPDATE rbr.run r SET "
				  "done = r.done + COALESCE($2, 0), errors = r.errors + COALESCE($3, 0), "
				  "cached = r.cached + COALESCE($4, 0), requests = r.requests + COALESCE($5, 0), "
				  "prompt_tokens = r.prompt_tokens + COALESCE($6, 0), "
				  "completion_tokens = r.completion_tokens + COALESCE($7, 0), "
				  "cached_tokens = r.cached_tokens + COALESCE($8, 0), "
				  "reasoning_tokens = r.reasoning_tokens + COALESCE($9, 0), "
				  "counters = COALESCE((SELECT pg_catalog.jsonb_object_agg(k, "
				  "  COALESCE((r.counters ->> k)::bigint, 0) + COALESCE(($10 ->> k)::bigint, 0)) "
				  "  FROM pg_catalog.jsonb_object_keys(r.counters || COALESCE($10, '{}')) k), '{}'), "
				  "chunks = r.chunks + 1, last_key = COALESCE($11, r.last_key), "
				  "updated_at = pg_catalog.clock_timestamp() "
				  "WHERE r.run_id = $1 RETURNING r.*",
				  11, argtypes, args, nulls);
	SPI_finish();
	PG_RETURN_DATUM(row);
}

PG_FUNCTION_INFO_V1(rbr_run_finish);
/* rbr.run_finish(run_id): mark the run done; returns its row. */
Datum
rbr_run_finish(PG_FUNCTION_ARGS)
{
	PG_RETURN_DATUM(owned_run_row(PG_GETARG_INT64(0),
								  "UPDATE rbr.run r SET state = 'done', finished_at = pg_catalog.clock_timestamp(), "
								  "updated_at = pg_catalog.clock_timestamp() WHERE r.run_id = $1 RETURNING r.*"));
}

PG_FUNCTION_INFO_V1(rbr_run_stop);
/*
 * rbr.run_stop(run_id, reason): mark a running run of the caller's stopped
 * (at a budget, say) with the reason; returns its row. A later CALL starts a
 * new run that does the rest.
 */
Datum
rbr_run_stop(PG_FUNCTION_ARGS)
{
	Oid			argtypes[2] = {INT8OID, TEXTOID};
	Datum		args[2];
	Datum		row;

	args[0] = PG_GETARG_DATUM(0);
	args[1] = PG_GETARG_DATUM(1);
	SPI_connect();
	(void) rbr_run_owner(PG_GETARG_INT64(0));
	row = run_row("UPDATE rbr.run r SET state = 'stopped', stop_reason = $2, "
				  "finished_at = pg_catalog.clock_timestamp(), updated_at = pg_catalog.clock_timestamp() "
				  "WHERE r.run_id = $1 RETURNING r.*",
				  2, argtypes, args, NULL);
	SPI_finish();
	PG_RETURN_DATUM(row);
}
