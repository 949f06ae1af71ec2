/*
 * secrets.c: where requests go and with which key.
 *
 * The settings that decide the endpoint (rbr.grader_url, rbr.generator_url,
 * their Azure API versions and CA files) and its credentials (the API keys
 * and extra headers) of the grader and the generator, and how a key is found
 * when a batch is about to be sent:
 *   1. rbr.*_api_key_file: a file the server reads (a superuser names it);
 *      re-read when it changes, surrounding white space trimmed;
 *   2. rbr.*_api_key: honoured only when rbr is in shared_preload_libraries
 *      (then the setting is defined, superuser-only, in every backend from
 *      its start; otherwise it is a placeholder that any role can SHOW) and
 *      never when it came from ALTER ROLE/DATABASE SET (pg_db_role_setting
 *      shows those to every role);
 *   3. RBR_GRADER_API_KEY / RBR_GENERATOR_API_KEY in the server's
 *      environment.
 * Extra headers may carry credentials too: they get the same rules as the
 * inline key. No message ever repeats a key, a header value or a key file's
 * content; check hooks never ERROR on a key (a refused statement is written
 * to the server log), control characters are refused when the key is used.
 *
 * The URLs have no built-in default: empty means "not configured", so that a
 * refused value (a non-superuser's PGOPTIONS or SET, reapplied when the
 * library loads) can never make requests go to a host nobody chose.
 */
#include "postgres.h"

#include <sys/stat.h>
#include <unistd.h>
#include <fcntl.h>

#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/fd.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/guc_tables.h"
#include "utils/memutils.h"

#include "endpoint.h"
#include "secrets.h"

bool		rbr_preloaded = false;

char	   *rbr_grader_azure_api_version = NULL;
char	   *rbr_generator_azure_api_version = NULL;

/* Largest key file read. */
#define RBR_KEY_FILE_MAX 65536

/* The settings and state of one endpoint (grader or generator). */
typedef struct EndpointSettings
{
	const char *name;			/* "grader" or "generator" */
	const char *env;			/* environment variable of the key */
	char	   *url;
	char	   *api_key_guc;	/* the setting: "********" when set */
	char	   *api_key;		/* the key given to the setting (its extra) */
	char	   *api_key_file;
	char	   *extra_headers_guc;	/* the setting: "********" when set */
	char	   *extra_headers;	/* the headers given to the setting (its extra) */
	char	   *ca_file;
	char	  **azure;			/* &rbr_*_azure_api_version */
	/* the key file as last read (TopMemoryContext) */
	char	   *file_path;
	struct stat file_st;
	char	   *file_key;
	/* the key last resolved, for scrubbing messages */
	char	   *last_key;
} EndpointSettings;

static EndpointSettings settings[2] = {
	{.name = "grader",.env = "RBR_GRADER_API_KEY"},
	{.name = "generator",.env = "RBR_GENERATOR_API_KEY"},
};

/* The settings of an endpoint kind. */
static EndpointSettings *
settings_of(RbrJobKind kind)
{
	return &settings[kind == RBR_JOB_GENERATE ? 1 : 0];
}

/* ---------------------------------------------------------------------------
 * Check hooks and SHOW
 * ------------------------------------------------------------------------- */

/* SHOW, current_setting() and pg_settings print this instead of a key. */
static const char *
show_secret(void)
{
	return "********";
}

/* The URL settings: empty (not configured), or an http or https URL. */
static bool
check_http_url(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	if (*newval == NULL || **newval == '\0')
		return true;
	if (pg_strncasecmp(*newval, "http://", 7) != 0 && pg_strncasecmp(*newval, "https://", 8) != 0)
	{
		GUC_check_errdetail("The URL must start with http:// or https://.");
		return false;
	}
	if (strpbrk(*newval, " \r\n\t") != NULL)
	{
		GUC_check_errdetail("The URL must not contain white space.");
		return false;
	}
	return true;
}

/*
 * A secret given to ALTER ROLE/DATABASE SET (or a function's SET clause) is
 * refused at once; the statement is kept out of the server log, since it
 * holds the secret. Everything else is accepted here and checked at use
 * (an ERROR here would log the statement, key included).
 */
static void
refuse_stored_secret(const char *value, GucSource source, const char *what)
{
	if (source == PGC_S_TEST && value != NULL && value[0] != '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errhidestmt(true),
				 errmsg("%s cannot be set per role or per database", what),
				 errdetail("pg_db_role_setting shows such values to every role; the value is not shown."),
				 errhint("Put the key in a file named by the matching rbr.*_api_key_file setting.")));
}

/*
 * A secret setting keeps "********" as its value and the secret in its
 * extra: PostgreSQL logs the old and new values of a setting that a reload
 * changes, and reads values without the show hook in places (the value
 * stays "********" there, the secret never reaches the log).
 * PostgreSQL 15 frees setting strings and extras with free().
 */
static bool
mask_secret(char **newval, void **extra)
{
	char	   *copy;
	char	   *mask;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	copy = malloc(strlen(*newval) + 1);
	mask = strdup("********");
	if (copy == NULL || mask == NULL)
	{
		free(copy);
		free(mask);
		return false;
	}
	strcpy(copy, *newval);
	memset(*newval, 0, strlen(*newval));
	free(*newval);
	*newval = mask;
	*extra = copy;
	return true;
}

/* rbr.*_api_key: see refuse_stored_secret() and mask_secret(). */
static bool
check_api_key(char **newval, void **extra, GucSource source)
{
	refuse_stored_secret(*newval, source, "an rbr API key");
	return mask_secret(newval, extra);
}

/* Assign hooks: the secret of the setting is its extra. */
static void
assign_grader_key(const char *newval pg_attribute_unused(), void *extra)
{
	settings[0].api_key = (char *) extra;
}

static void
assign_generator_key(const char *newval pg_attribute_unused(), void *extra)
{
	settings[1].api_key = (char *) extra;
}

static void
assign_grader_headers(const char *newval pg_attribute_unused(), void *extra)
{
	settings[0].extra_headers = (char *) extra;
}

static void
assign_generator_headers(const char *newval pg_attribute_unused(), void *extra)
{
	settings[1].extra_headers = (char *) extra;
}

/* Is s "Name: value; Name2: value" without line breaks? */
static bool
headers_well_formed(const char *s)
{
	if (strpbrk(s, "\r\n") != NULL)
		return false;
	while (*s)
	{
		const char *start;

		while (*s == ' ' || *s == ';' || *s == '\t')
			s++;
		if (!*s)
			break;
		start = s;
		while (*s && *s != ':' && *s != ';' &&
			   (isalnum((unsigned char) *s) || strchr("!#$%&'*+-.^_`|~", *s)))
			s++;
		if (s == start || *s != ':')
			return false;
		while (*s && *s != ';')
			s++;
	}
	return true;
}

/*
 * rbr.*_extra_headers: see refuse_stored_secret(). The format is checked
 * here for SET, and at use for values from the configuration file (ALTER
 * SYSTEM would log a refused statement, headers included).
 */
static bool
check_headers(char **newval, void **extra, GucSource source)
{
	refuse_stored_secret(*newval, source, "rbr extra headers");
	if (*newval != NULL && source != PGC_S_FILE && !headers_well_formed(*newval))
	{
		GUC_check_errmsg("extra headers must be given as \"Name: value; Name2: value\"");
		GUC_check_errhint("The value is not shown.");
		return false;
	}
	return mask_secret(newval, extra);
}

/* Define the settings of one endpoint. */
static void
define_endpoint_settings(EndpointSettings *s, const char *url_help)
{
	char		name[64];
	char	   *desc;

	snprintf(name, sizeof(name), "rbr.%s_url", s->name);
	DefineCustomStringVariable(pstrdup(name),
							   psprintf("Base URL of the OpenAI-compatible %s API (ending in /v1); empty: not configured.", s->name),
							   url_help, &s->url, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY, check_http_url, NULL, NULL);
	snprintf(name, sizeof(name), "rbr.%s_api_key", s->name);
	desc = psprintf("API key of the %s endpoint; never shown. Honoured only when rbr is in shared_preload_libraries.", s->name);
	DefineCustomStringVariable(pstrdup(name), desc,
							   "Prefer the key file setting; never set it with ALTER ROLE/DATABASE.",
							   &s->api_key_guc, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   check_api_key, s == &settings[0] ? assign_grader_key : assign_generator_key, show_secret);
	snprintf(name, sizeof(name), "rbr.%s_api_key_file", s->name);
	DefineCustomStringVariable(pstrdup(name),
							   psprintf("File the server reads the %s's API key from (trimmed); re-read when it changes.", s->name),
							   "Readable by the server's operating system user only.",
							   &s->api_key_file, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	snprintf(name, sizeof(name), "rbr.%s_extra_headers", s->name);
	DefineCustomStringVariable(pstrdup(name),
							   psprintf("Extra HTTP headers for the %s: \"Name: value; Name2: value\"; never shown. Honoured only under preload.", s->name),
							   NULL, &s->extra_headers_guc, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
							   check_headers, s == &settings[0] ? assign_grader_headers : assign_generator_headers, show_secret);
	snprintf(name, sizeof(name), "rbr.%s_azure_api_version", s->name);
	DefineCustomStringVariable(pstrdup(name),
							   "When set, talk to Azure OpenAI: api-key header, api-version parameter, deployment URL.",
							   NULL, s->azure, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	snprintf(name, sizeof(name), "rbr.%s_ca_file", s->name);
	DefineCustomStringVariable(pstrdup(name),
							   psprintf("File of CA certificates that verify the %s's TLS certificate (empty: the system's).", s->name),
							   "For self-hosted servers with a private CA; verification is never switched off.",
							   &s->ca_file, "",
							   PGC_SUSET, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
}

static ProcessUtility_hook_type prev_utility_hook = NULL;

/* Is this the name of a setting that holds a secret? */
static bool
is_secret_setting(const char *name)
{
	return name != NULL &&
		(pg_strcasecmp(name, "rbr.grader_api_key") == 0 ||
		 pg_strcasecmp(name, "rbr.generator_api_key") == 0 ||
		 pg_strcasecmp(name, "rbr.grader_extra_headers") == 0 ||
		 pg_strcasecmp(name, "rbr.generator_extra_headers") == 0);
}

/*
 * ALTER SYSTEM SET of a secret: trailing white space and line breaks are
 * trimmed before PostgreSQL sees the value (it refuses line breaks, and a
 * refused statement is written to the server log, secret included); a line
 * break inside the value is refused here without logging the statement.
 */
static void
secrets_utility_hook(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					 ProcessUtilityContext context, ParamListInfo params,
					 QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (IsA(parsetree, AlterSystemStmt))
	{
		VariableSetStmt *v = ((AlterSystemStmt *) parsetree)->setstmt;

		if (v->kind == VAR_SET_VALUE && is_secret_setting(v->name) &&
			list_length(v->args) == 1 && IsA(linitial(v->args), A_Const))
		{
			A_Const    *c = linitial_node(A_Const, v->args);

			if (!c->isnull && IsA(&c->val, String))
			{
				const char *val = strVal(&c->val);
				int			len = strlen(val);

				while (len > 0 && isspace((unsigned char) val[len - 1]))
					len--;
				if (memchr(val, '\n', len) != NULL || memchr(val, '\r', len) != NULL)
					ereport(ERROR,
							(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
							 errhidestmt(true),
							 errmsg("the value of %s must not contain a line break", v->name),
							 errdetail("The value is not shown.")));
				if (len < (int) strlen(val))
				{
					pstmt = copyObject(pstmt);
					v = ((AlterSystemStmt *) pstmt->utilityStmt)->setstmt;
					c = linitial_node(A_Const, v->args);
					c->val.sval.sval = pnstrdup(val, len);
					readOnlyTree = false;
				}
			}
		}
	}
	if (prev_utility_hook)
		prev_utility_hook(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

/* Define the settings. Called from _PG_init. */
void
rbr_secrets_init_settings(bool preloading)
{
	prev_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = secrets_utility_hook;
	rbr_preloaded = preloading;
	settings[0].azure = &rbr_grader_azure_api_version;
	settings[1].azure = &rbr_generator_azure_api_version;
	define_endpoint_settings(&settings[0],
							 "For Azure OpenAI (rbr.grader_azure_api_version set): the resource URL.");
	define_endpoint_settings(&settings[1], NULL);
}

/* ---------------------------------------------------------------------------
 * Finding the key
 * ------------------------------------------------------------------------- */

/* Where a setting's current value came from. */
static GucSource
setting_source(const char *name)
{
	struct config_generic **vars = get_guc_variables();
	int			n = GetNumConfigOptions();

	for (int i = 0; i < n; i++)
		if (strcmp(vars[i]->name, name) == 0)
			return vars[i]->source;
	return PGC_S_DEFAULT;
}

/* Did a setting come from ALTER ROLE/DATABASE SET? */
static bool
from_role_or_database(const char *name)
{
	GucSource	src = setting_source(name);

	return src == PGC_S_GLOBAL || src == PGC_S_DATABASE ||
		src == PGC_S_USER || src == PGC_S_DATABASE_USER;
}

/* An inline secret setting is usable: preloaded, not per role/database. */
static void
check_inline(const char *name, const char *fix)
{
	if (!rbr_preloaded)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("%s is refused because rbr is not in shared_preload_libraries", name),
				 errdetail("Without preloading, every role can read this setting with SHOW in a backend that has not loaded rbr."),
				 errhint("%s, or add rbr to shared_preload_libraries and restart the server.", fix)));
	if (from_role_or_database(name))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("%s is refused because it was set with ALTER ROLE or ALTER DATABASE", name),
				 errdetail("pg_db_role_setting shows such values to every role."),
				 errhint("Remove it with ALTER ROLE/DATABASE ... RESET %s and %s.", name,
						 "set it in postgresql.conf (with rbr preloaded) or in the key file")));
}

/*
 * A key as used: surrounding white space and line breaks trimmed; interior
 * control characters refused (they would inject request headers). The
 * message names where the key came from, never the key.
 */
static char *
clean_key(const char *raw, int len, const char *where)
{
	int			start = 0;

	while (start < len && isspace((unsigned char) raw[start]))
		start++;
	while (len > start && isspace((unsigned char) raw[len - 1]))
		len--;
	for (int i = start; i < len; i++)
		if ((unsigned char) raw[i] < 0x20 || (unsigned char) raw[i] == 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the API key from %s contains control characters or line breaks", where),
					 errdetail("The value is not shown.")));
	return pnstrdup(raw + start, len - start);
}

/* The key in the file of s->api_key_file, read again when the file changed. */
static const char *
read_key_file(EndpointSettings *s)
{
	const char *path = s->api_key_file;
	char		setting[64];
	struct stat st;
	int			fd;
	char	   *buf;
	volatile int len = 0;
	MemoryContext old;

	snprintf(setting, sizeof(setting), "rbr.%s_api_key_file", s->name);
	if (stat(path, &st) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read the key file \"%s\" named by %s: %m", path, setting),
				 errhint("The file must exist and be readable by the server's operating system user.")));
	if (s->file_key != NULL && s->file_path != NULL && strcmp(s->file_path, path) == 0 &&
		st.st_mtime == s->file_st.st_mtime && st.st_size == s->file_st.st_size &&
		st.st_ino == s->file_st.st_ino && st.st_ctime == s->file_st.st_ctime)
		return s->file_key;
	if (!S_ISREG(st.st_mode) || st.st_size > RBR_KEY_FILE_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the key file \"%s\" named by %s is not a regular file of at most %d bytes",
						path, setting, RBR_KEY_FILE_MAX)));
	fd = OpenTransientFile(path, O_RDONLY | PG_BINARY);
	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not read the key file \"%s\" named by %s: %m", path, setting),
				 errhint("The file must be readable by the server's operating system user.")));
	buf = palloc(RBR_KEY_FILE_MAX + 1);
	for (;;)
	{
		int			r = read(fd, buf + len, RBR_KEY_FILE_MAX - len);

		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
		{
			int			save = errno;

			CloseTransientFile(fd);
			errno = save;
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not read the key file \"%s\" named by %s: %m", path, setting)));
		}
		if (r == 0 || len + r >= RBR_KEY_FILE_MAX)
		{
			len += r;
			break;
		}
		len += r;
	}
	CloseTransientFile(fd);

	old = MemoryContextSwitchTo(TopMemoryContext);
	if (s->file_key != NULL)
	{
		memset(s->file_key, 0, strlen(s->file_key));
		pfree(s->file_key);
		s->file_key = NULL;
	}
	if (s->file_path != NULL)
		pfree(s->file_path);
	s->file_path = NULL;
	PG_TRY();
	{
		s->file_key = clean_key(buf, len, setting);
	}
	PG_FINALLY();
	{
		memset(buf, 0, len);
		pfree(buf);
		MemoryContextSwitchTo(old);
	}
	PG_END_TRY();
	if (s->file_key[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the key file \"%s\" named by %s is empty", path, setting)));
	s->file_path = MemoryContextStrdup(TopMemoryContext, path);
	s->file_st = st;
	return s->file_key;
}

/* Remember the key in use for scrubbing (TopMemoryContext). */
static void
remember_key(EndpointSettings *s, const char *key)
{
	if (s->last_key != NULL && strcmp(s->last_key, key) == 0)
		return;
	if (s->last_key != NULL)
	{
		memset(s->last_key, 0, strlen(s->last_key));
		pfree(s->last_key);
	}
	s->last_key = MemoryContextStrdup(TopMemoryContext, key);
}

/*
 * The key of an endpoint and its source ("the key file", "rbr.grader_api_key",
 * "the environment" or NULL when there is none). ERROR as described above.
 */
static const char *
resolve_key(EndpointSettings *s, const char **source)
{
	char		name[64];
	const char *key = "";
	const char *env;

	snprintf(name, sizeof(name), "rbr.%s_api_key", s->name);
	*source = NULL;
	if (s->api_key != NULL && s->api_key[0] != '\0')
		check_inline(name, psprintf("Move the key into a file named by %s_file and remove %s", name, name));
	if (s->api_key_file != NULL && s->api_key_file[0] != '\0')
	{
		key = read_key_file(s);
		*source = "the key file";
	}
	else if (s->api_key != NULL && s->api_key[0] != '\0')
	{
		key = clean_key(s->api_key, strlen(s->api_key), name);
		*source = "the setting";
	}
	else if ((env = getenv(s->env)) != NULL && env[0] != '\0')
	{
		key = clean_key(env, strlen(env), s->env);
		*source = "the environment";
	}
	if (key[0] != '\0')
		remember_key(s, key);
	return key;
}

/* The extra headers of an endpoint, "" unless usable (see check_inline). */
static const char *
resolve_headers(EndpointSettings *s)
{
	char		name[64];
	const char *h = s->extra_headers;

	if (h == NULL || h[0] == '\0')
		return "";
	snprintf(name, sizeof(name), "rbr.%s_extra_headers", s->name);
	check_inline(name, "Remove the extra headers from the configuration");
	if (!headers_well_formed(h))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be given as \"Name: value; Name2: value\" without line breaks", name),
				 errdetail("The value is not shown.")));
	return h;
}

/* See secrets.h. */
void
rbr_secrets_endpoint(RbrEndpoint *ep)
{
	EndpointSettings *s = settings_of(ep->kind);

	ep->url = NULL;
	ep->api_key = NULL;
	ep->extra_headers = NULL;
	ep->azure_api_version = *s->azure != NULL ? *s->azure : "";
	ep->ca_file = s->ca_file != NULL ? s->ca_file : "";
}

/* See secrets.h. */
void
rbr_secrets_resolve(RbrEndpoint *ep)
{
	EndpointSettings *s = settings_of(ep->kind);
	const char *source;

	if (s->url == NULL || s->url[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("rbr.%s_url is not set", s->name),
				 errdetail("rbr sends no request until a superuser chooses the endpoint."),
				 errhint("Set rbr.%s_url in postgresql.conf (or with ALTER SYSTEM) and reload; SELECT * FROM rbr_check_setup() lists what is missing.",
						 s->name)));
	ep->url = s->url;
	ep->api_key = resolve_key(s, &source);
	ep->extra_headers = resolve_headers(s);
	ep->azure_api_version = *s->azure != NULL ? *s->azure : "";
	ep->ca_file = s->ca_file != NULL ? s->ca_file : "";
}

/* See secrets.h. */
int
rbr_secrets_known(const char **out, int max)
{
	int			n = 0;

	for (int k = 0; k < 2; k++)
	{
		EndpointSettings *s = &settings[k];

		if (s->api_key != NULL && s->api_key[0] != '\0' && n < max)
			out[n++] = s->api_key;
		if (s->last_key != NULL && n < max)
			out[n++] = s->last_key;
		if (s->file_key != NULL && n < max)
			out[n++] = s->file_key;
	}
	return n;
}

/* See secrets.h. */
const char *
rbr_secrets_headers(int kind)
{
	EndpointSettings *s = settings_of((RbrJobKind) kind);

	return s->extra_headers != NULL ? s->extra_headers : "";
}

/* ---------------------------------------------------------------------------
 * rbr_check_setup()
 * ------------------------------------------------------------------------- */

/* Append one row (item, ok, detail). */
static void
setup_row(ReturnSetInfo *rsinfo, const char *item, bool ok, const char *detail)
{
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	values[0] = CStringGetTextDatum(item);
	values[1] = BoolGetDatum(ok);
	values[2] = CStringGetTextDatum(detail);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

PG_FUNCTION_INFO_V1(rbr_check_setup);
/* rbr_check_setup(): what grading and generating still need, in plain words; no secret. */
Datum
rbr_check_setup(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	bool		su = superuser();

	InitMaterializedSRF(fcinfo, 0);
	setup_row(rsinfo, "preload", rbr_preloaded,
			  rbr_preloaded ? "rbr is in shared_preload_libraries"
			  : "rbr is not in shared_preload_libraries: inline keys and extra headers are refused; use the key files or preload rbr");
	for (int k = 0; k < 2; k++)
	{
		EndpointSettings *s = &settings[k];
		MemoryContext cxt = CurrentMemoryContext;
		bool		url_ok = s->url != NULL && s->url[0] != '\0';
		char	   *item;

		item = psprintf("%s url", s->name);
		setup_row(rsinfo, item, url_ok,
				  url_ok ? psprintf("rbr.%s_url is set", s->name)
				  : psprintf("rbr.%s_url is not set: a superuser sets it in postgresql.conf", s->name));
		item = psprintf("%s key", s->name);
		PG_TRY();
		{
			const char *source;
			const char *key = resolve_key(s, &source);

			if (key[0] != '\0')
				setup_row(rsinfo, item, true, psprintf("found in %s", source));
			else
				setup_row(rsinfo, item, false,
						  psprintf("no key: set rbr.%s_api_key_file, or %s in the server's environment (fine for endpoints without keys)",
								   s->name, s->env));
			(void) resolve_headers(s);
			setup_row(rsinfo, psprintf("%s extra headers", s->name), true,
					  s->extra_headers && s->extra_headers[0] ? "set and usable" : "none");
		}
		PG_CATCH();
		{
			ErrorData  *edata;

			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			setup_row(rsinfo, item, false,
					  su ? psprintf("%s%s%s", edata->message, edata->hint ? " " : "", edata->hint ? edata->hint : "")
					  : "not usable (a superuser sees why)");
		}
		PG_END_TRY();
	}
	return (Datum) 0;
}
