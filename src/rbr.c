/*
 * rbr.c: module entry point.
 *
 * Settings of each part are defined by that part's init function, called
 * from here; nothing else happens at load time (libcurl in particular is
 * initialised lazily on first use).
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/guc.h"

#include "rbr.h"
#include "grader.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

/* Called once when the library is loaded into a backend. */
void
_PG_init(void)
{
	rbr_grader_init_settings();
	MarkGUCPrefixReserved("rbr");
}
