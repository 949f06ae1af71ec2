/*
 * rbr.c: module entry point.
 *
 * Settings of each part are defined by that part's init function, called
 * from here; nothing else happens at load time (libcurl in particular is
 * initialised lazily on first use).
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "rbr.h"
#include "batch.h"
#include "grader.h"
#include "ratelimit.h"
#include "rowset.h"
#include "secrets.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/* Called once when the library is loaded into a backend. */
void
_PG_init(void)
{
	rbr_secrets_init_settings(process_shared_preload_libraries_in_progress);
	rbr_rowset_init_settings();
	rbr_grader_init_settings();
	rbr_generator_init_settings();
	rbr_batch_init_settings();
	rbr_ratelimit_init(process_shared_preload_libraries_in_progress);
	MarkGUCPrefixReserved("rbr");
}

/* ---------------------------------------------------------------------------
 * Invalidation of per-backend caches (compiled policies, model weights).
 *
 * A statement trigger on each of rbr's catalog tables (rbr.policy_version,
 * rbr.model) sends a relcache invalidation for that table; every backend's
 * callback then bumps a generation counter, and cache entries made under an
 * older generation are reloaded on their next use.
 * ------------------------------------------------------------------------- */

static const char *const watched_tables[] = {"policy_version", "model"};
#define NWATCHED lengthof(watched_tables)

static Oid	watched_oids[NWATCHED];
static uint64 tables_generation = 1;
static bool callback_registered = false;
static Oid	generation_user = InvalidOid;	/* the role the cached rows were read as */

/* Relcache callback: a change to a watched table makes the caches stale. */
static void
tables_relcache_callback(Datum arg pg_attribute_unused(), Oid relid)
{
	bool		hit = !OidIsValid(relid);

	for (int i = 0; i < (int) NWATCHED; i++)
		hit |= OidIsValid(watched_oids[i]) && watched_oids[i] == relid;
	if (hit)
	{
		tables_generation++;
		memset(watched_oids, 0, sizeof(watched_oids));
	}
}

/*
 * The current generation of rbr's tables; cached data of older ones is stale.
 * Policies and models are read under row-level security, so what a backend
 * cached for one role is stale for another: a change of the current user
 * (SET ROLE, a SECURITY DEFINER function) starts a new generation too.
 */
uint64
rbr_tables_generation(void)
{
	if (GetUserId() != generation_user)
	{
		generation_user = GetUserId();
		tables_generation++;
	}
	if (!callback_registered)
	{
		CacheRegisterRelcacheCallback(tables_relcache_callback, (Datum) 0);
		callback_registered = true;
	}
	if (!OidIsValid(watched_oids[0]))
	{
		Oid			nsp = get_namespace_oid(RBR_SCHEMA, true);

		if (OidIsValid(nsp))
			for (int i = 0; i < (int) NWATCHED; i++)
				watched_oids[i] = get_relname_relid(watched_tables[i], nsp);
	}
	return tables_generation;
}

PG_FUNCTION_INFO_V1(rbr_table_changed);
/* Statement trigger on rbr's tables: invalidate every backend's caches. */
Datum
rbr_table_changed(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("rbr_table_changed() must be called as a trigger")));
	CacheInvalidateRelcacheByRelid(RelationGetRelid(trigdata->tg_relation));
	PG_RETURN_POINTER(NULL);
}
