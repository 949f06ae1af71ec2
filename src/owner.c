/*
 * owner.c: statements rbr runs as the extension's owner (see owner.h).
 *
 * The user switch is SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION
 * and search_path is pinned to pg_catalog for the statement, so that nothing
 * of the caller's (search_path, temporary objects) can reach code running as
 * the owner. The statements are fixed strings of rbr's; values go in as
 * parameters, never as SQL text.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/rel.h"

#include "owner.h"

/* The role that owns the rbr extension in this database. */
Oid
rbr_extension_owner(void)
{
	Oid			extoid = get_extension_oid("rbr", false);
	Oid			owner = InvalidOid;
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(extoid));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	if (!OidIsValid(owner))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("extension \"rbr\" has no owner in this database")));
	return owner;
}

/* SPI_execute_with_args() of a fixed statement as the extension's owner. */
int
rbr_spi_execute_as_owner(const char *sql, int nargs, Oid *argtypes, Datum *values,
						 const char *nulls, bool read_only, long count)
{
	Oid			owner = rbr_extension_owner();
	Oid			save_userid;
	int			save_sec;
	int			nestlevel;
	volatile int ret = 0;

	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	nestlevel = NewGUCNestLevel();
	PG_TRY();
	{
		(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		ret = SPI_execute_with_args(sql, nargs, argtypes, values, nulls, read_only, count);
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec);
	}
	PG_END_TRY();
	AtEOXact_GUC(false, nestlevel);
	return ret;
}
