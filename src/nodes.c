/*
 * nodes.c: copying policies and models to the other nodes of a Citus
 * cluster (rbr_citus_sync).
 *
 * rbr.policy_version and rbr.model are local tables of each node; queries
 * that Citus pushes down read them on the workers. The deferred triggers of
 * the SQL script copy each stored row at commit; rbr_citus_sync() copies
 * everything the caller may see (e.g. to a worker added later) and, called
 * by a superuser or the extension's owner, removes from the workers the rows
 * the coordinator no longer has (deleted while a worker was down). It reads
 * the rows as the caller, so row security decides what is copied, and sends
 * them as the extension's owner (owner.c), whose connections to the workers
 * may write there. The caller passes nothing that reaches the workers: no role
 * can send rows it could not load on the coordinator.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/tuplestore.h"

#include "owner.h"

PG_FUNCTION_INFO_V1(rbr_citus_sync);

/* rbr.citus_sync(): ship rbr.citus_payload() of the caller to every worker. */
Datum
rbr_citus_sync(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Datum		payload;
	bool		isnull;
	Oid			argtypes[1] = {JSONBOID};
	int			ret;

	/*
	 * Removing from the workers what the coordinator no longer has needs a
	 * lock that keeps every store of a policy or model waiting until this
	 * transaction ends; a role that could hold it open would stop every
	 * other role's loads. So only a superuser or the extension's owner
	 * mirrors; any other role's sync copies (what it sees) and removes
	 * nothing.
	 */
	bool		mirror = superuser() || has_privs_of_role(GetUserId(), rbr_extension_owner());

	/*
	 * A mirror's payload must hold every row committed before the workers
	 * apply it: a snapshot taken after the lock below, which a transaction
	 * snapshot is not.
	 */
	if (mirror && IsolationUsesXactSnapshot())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("rbr_citus_sync() cannot run in a REPEATABLE READ or SERIALIZABLE transaction"),
				 errdetail("It removes from the workers what the coordinator no longer has, so it must see every committed row."),
				 errhint("Run it on its own, or in a READ COMMITTED transaction.")));

	InitMaterializedSRF(fcinfo, 0);
	SPI_connect();

	if (mirror)
	{
		/*
		 * As the extension's owner: wait for the transactions that are
		 * storing or deleting policies and models (their commit-time copies
		 * race with the mirror), and keep new ones out until this
		 * transaction ends.
		 */
		ret = rbr_spi_execute_as_owner("LOCK TABLE rbr.policy_version, rbr.model IN SHARE MODE",
									   0, NULL, NULL, NULL, false, 0);
		if (ret != SPI_OK_UTILITY)
			elog(ERROR, "rbr: locking the policies and models failed: %s", SPI_result_code_string(ret));
	}

	/*
	 * As the caller, in a new snapshot: the rows row security lets it see.
	 * A mirroring caller (a superuser, or the owner of rbr's tables) sees
	 * every row, so its payload is marked a mirror: each worker removes the
	 * rows it lacks.
	 */
	ret = SPI_execute(mirror ? "SELECT rbr.citus_payload() OPERATOR(pg_catalog.||) '{\"mirror\": true}'::pg_catalog.jsonb"
					  : "SELECT rbr.citus_payload()",
					  false, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "rbr: reading the policies and models to copy failed: %s", SPI_result_code_string(ret));
	payload = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		elog(ERROR, "rbr: rbr.citus_payload() returned NULL");
	/* the tuple table is freed by the next statement: keep a copy */
	payload = SPI_datumTransfer(payload, false, -1);

	/* as the extension's owner: send them to every worker */
	ret = rbr_spi_execute_as_owner("SELECT s.node, s.port, s.result FROM rbr.citus_ship($1) s",
								   1, argtypes, &payload, NULL, false, 0);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "rbr: copying to the Citus workers failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		Datum		values[3];
		bool		nulls[3];

		CHECK_FOR_INTERRUPTS();
		for (int c = 0; c < 3; c++)
			values[c] = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, c + 1, &nulls[c]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
	return (Datum) 0;
}
