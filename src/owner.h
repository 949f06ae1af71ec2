/*
 * owner.h: statements rbr runs as the extension's owner.
 *
 * rbr's caches (rbr.grade_cache, rbr.generation_cache) and its run
 * bookkeeping (rbr.run) are writable by the extension's owner alone; the C
 * code that maintains them switches to that role around each statement, as
 * PostgreSQL's own referential-integrity and materialized-view code does.
 */
#ifndef RBR_OWNER_H
#define RBR_OWNER_H

#include "postgres.h"

/* The role that owns the rbr extension in this database. */
extern Oid	rbr_extension_owner(void);

/*
 * SPI_execute_with_args() of a fixed statement as the extension's owner,
 * with search_path pinned to pg_catalog; the caller has done SPI_connect().
 */
extern int	rbr_spi_execute_as_owner(const char *sql, int nargs, Oid *argtypes, Datum *values,
									 const char *nulls, bool read_only, long count);

/*
 * The owner of rbr run run_id (runs.c), after checking that it exists and
 * that the caller may act on it (its owner, a member, a superuser); inside
 * SPI.
 */
extern Oid	rbr_run_owner(int64 run_id);

#endif							/* RBR_OWNER_H */
