/*
 * grader.c: the LLM grader's settings, the request it sends, how P(yes) is
 * read from its answer, and the SQL functions rbr_grade(), rbr_grade_many(),
 * rbr_grader_request() and rbr_grader_stats().
 *
 * Request layout (the test grader relies on it):
 *   messages[0] system: the policy's prompt_template with {question} replaced
 *     by the proposition's prompt and {response} by the completion judged; the
 *     backtick fence lines around the {response} line are replaced by a run of
 *     backticks one longer than the longest run inside the completion (min 3),
 *     so the completion cannot close its block.
 *   messages[1] user: a one-line header, then the conversation (prompt
 *     messages, then the completion) as "ROLE: content" lines in a fence
 *     chosen the same way.
 *   Long fixed text comes first (template, question), varying text last.
 *   temperature 0, logprobs with top_logprobs 20, one output token through
 *   max_completion_tokens (or max_tokens: setting, with a one-time automatic
 *   switch per backend when the endpoint rejects the parameter).
 *
 * P(yes): from the first output token's top_logprobs, the summed probability
 * of the "yes" variants over that of "yes" and "no" variants (leading spaces
 * and the tokenizer markers U+0120 and U+2581 stripped, case ignored). When
 * one side is absent its mass is bounded by the smallest probability listed:
 * an upper bound on what it could be, so P is pulled towards 0.5
 * (conservative). Without logprobs the answer text decides (yes 1, no 0) with
 * method 'text', unless rbr.grader_strict_logprobs is on.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "access/xact.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
/* PostgreSQL's SQL function json_object() and json-c's type share a name */
#define json_object pg_sql_json_object
#include "utils/builtins.h"
#undef json_object
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"

#include <json-c/json.h>

#include "grader.h"
#include "jsonutil.h"

char	   *rbr_grader_model = NULL;
int			rbr_grader_timeout_ms = 60000;
int			rbr_grader_max_in_flight = 64;
int			rbr_grader_max_retries = 5;
int			rbr_grader_retry_base_ms = 500;
double		rbr_grader_requests_per_second = 0;
int			rbr_grader_token_parameter = RBR_TOKENS_MAX_COMPLETION_TOKENS;
bool		rbr_grader_strict_logprobs = false;

/* The automatic switch: parameter to use while the setting is 'switched_from'. */
static int	token_switched_from = -1;

static const struct config_enum_entry token_parameter_options[] = {
	{"max_completion_tokens", RBR_TOKENS_MAX_COMPLETION_TOKENS, false},
	{"max_tokens", RBR_TOKENS_MAX_TOKENS, false},
	{NULL, 0, false}
};

/* ---------------------------------------------------------------------------
 * Settings
 * ------------------------------------------------------------------------- */

/* Define the grader's settings. Called from _PG_init. */
void
rbr_grader_init_settings(void)
{
	DefineCustomStringVariable("rbr.grader_model",
							   "Model (or Azure deployment) that grades propositions.",
							   NULL, &rbr_grader_model, "gpt-4o-mini",
							   PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.grader_timeout_ms",
							"Timeout of one grader request attempt.",
							NULL, &rbr_grader_timeout_ms, 60000, 100, 600000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.grader_max_in_flight",
							"Grader requests one backend keeps in flight at once.",
							NULL, &rbr_grader_max_in_flight, 64, 1, 1024,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.grader_max_retries",
							"Retries of a grader request after a connection error, timeout, 408, 409, 429 or 5xx.",
							NULL, &rbr_grader_max_retries, 5, 0, 20,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.grader_retry_base_ms",
							"First retry backoff; doubles per retry (with jitter, capped at 30 s).",
							NULL, &rbr_grader_retry_base_ms, 500, 1, 30000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomRealVariable("rbr.grader_requests_per_second",
							 "Most grader requests a backend starts per second (0: no limit).",
							 NULL, &rbr_grader_requests_per_second, 0, 0, 100000,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("rbr.grader_token_parameter",
							 "Request parameter that limits the answer to one token.",
							 "A backend switches to the other one once if the endpoint rejects it.",
							 &rbr_grader_token_parameter, RBR_TOKENS_MAX_COMPLETION_TOKENS,
							 token_parameter_options, PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("rbr.grader_strict_logprobs",
							 "Treat an answer without log-probabilities as an error instead of reading its text.",
							 NULL, &rbr_grader_strict_logprobs, false,
							 PGC_USERSET, 0, NULL, NULL, NULL);
}

/* The grader's endpoint, from the rbr.grader_* settings. */
void
rbr_grader_endpoint(RbrEndpoint *ep)
{
	ep->kind = RBR_JOB_GRADE;
	rbr_secrets_endpoint(ep);
	ep->model = rbr_grader_model;
	ep->timeout_ms = rbr_grader_timeout_ms;
}

/* The token parameter in use: the setting, or the other after a switch. */
int
rbr_grader_token_param(void)
{
	if (token_switched_from == rbr_grader_token_parameter)
		return 1 - rbr_grader_token_parameter;
	return rbr_grader_token_parameter;
}

/* The endpoint rejected parameter 'from': use the other from now on. */
void
rbr_grader_switch_token_param(int from)
{
	if (from == rbr_grader_token_parameter)
	{
		token_switched_from = from;
		ereport(NOTICE,
				(errmsg("the grader endpoint rejected \"%s\"; this session now sends \"%s\"",
						from == RBR_TOKENS_MAX_TOKENS ? "max_tokens" : "max_completion_tokens",
						from == RBR_TOKENS_MAX_TOKENS ? "max_completion_tokens" : "max_tokens"),
				 errhint("Set rbr.grader_token_parameter to avoid the first rejected request.")));
	}
	else
		token_switched_from = -1;	/* back to the setting */
}

/* Add the values of "Name: value; Name2: value" (trimmed) to secrets[]. */
static int
header_values(const char *headers, char **secrets, int n, int max)
{
	const char *p = headers;

	while (p != NULL && *p && n < max)
	{
		const char *colon = strchr(p, ':');
		const char *end;

		if (colon == NULL)
			break;
		end = strchr(colon, ';');
		if (end == NULL)
			end = colon + strlen(colon);
		colon++;
		while (colon < end && (*colon == ' ' || *colon == '\t'))
			colon++;
		while (end > colon && (end[-1] == ' ' || end[-1] == '\t'))
			end--;
		secrets[n++] = pnstrdup(colon, end - colon);
		p = strchr(colon, ';');
		if (p)
			p++;
	}
	return n;
}

/*
 * Replace the secrets (the grader's and generator's API keys, and the values
 * of their extra headers) wherever they appear in a message, and bound its
 * size. Secrets shorter than 4 bytes are left alone (they would mask ordinary
 * text).
 */
char *
rbr_grader_scrub(const char *msg)
{
	StringInfoData out;
	char	   *secrets[66];
	int			nsecrets = 0;
	const char *p = msg;

	if (msg == NULL)
		return NULL;
	nsecrets = rbr_secrets_known((const char **) secrets, 6);
	nsecrets = header_values(rbr_secrets_headers(RBR_JOB_GRADE), secrets, nsecrets, 36);
	nsecrets = header_values(rbr_secrets_headers(RBR_JOB_GENERATE), secrets, nsecrets, 66);

	initStringInfo(&out);
	/* 500 bytes at most, then back to a character boundary */
	while (*p && out.len < 500)
	{
		size_t		klen = 0;

		for (int k = 0; k < nsecrets && klen == 0; k++)
			if (strlen(secrets[k]) >= 4 && strncmp(p, secrets[k], strlen(secrets[k])) == 0)
				klen = strlen(secrets[k]);
		if (klen > 0)
		{
			appendStringInfoString(&out, "********");
			p += klen;
		}
		else
		{
			char		c = *p++;

			appendStringInfoChar(&out, (c == '\n' || c == '\r') ? ' ' : c);
		}
	}
	if (*p)
	{
		out.len = rbr_clip_len(out.data, out.len, 500);
		out.data[out.len] = '\0';
		appendStringInfoString(&out, "...");
	}
	return out.data;
}

/* ---------------------------------------------------------------------------
 * Request building
 * ------------------------------------------------------------------------- */

/* A backtick fence one longer than the longest run in the texts (min 3). */
static char *
fence_for(const char *const *texts, int n)
{
	int			longest = 0;
	char	   *f;
	int			len;

	for (int i = 0; i < n; i++)
	{
		int			run = 0;

		for (const char *p = texts[i]; *p; p++)
		{
			run = (*p == '`') ? run + 1 : 0;
			longest = Max(longest, run);
		}
	}
	len = Max(3, longest + 1);
	f = palloc(len + 1);
	memset(f, '`', len);
	f[len] = '\0';
	return f;
}

/* Is line [s, e) made only of backticks, at least three? */
static bool
is_fence_line(const char *s, const char *e)
{
	if (e - s < 3)
		return false;
	for (const char *p = s; p < e; p++)
		if (*p != '`')
			return false;
	return true;
}

/* Does line [s, e) contain "{response}"? */
static bool
line_has_response(const char *s, const char *e)
{
	for (const char *p = s; p + 10 <= e; p++)
		if (memcmp(p, "{response}", 10) == 0)
			return true;
	return false;
}

/* The system message: template with question, completion and safe fences. */
static char *
system_message(const char *tmpl, const char *question, const char *completion)
{
	StringInfoData out;
	const char *texts[1] = {completion};
	char	   *fence = fence_for(texts, 1);
	const char *line = tmpl;
	const char *prev_s = NULL,
			   *prev_e = NULL;

	initStringInfo(&out);
	while (line != NULL && *line != '\0')
	{
		const char *nl = strchr(line, '\n');
		const char *e = nl ? nl : line + strlen(line);
		bool		fence_line = false;

		if (is_fence_line(line, e))
		{
			if (prev_s && line_has_response(prev_s, prev_e))
				fence_line = true;
			else if (nl)
			{
				const char *n2 = strchr(nl + 1, '\n');
				const char *ne = n2 ? n2 : nl + 1 + strlen(nl + 1);

				fence_line = line_has_response(nl + 1, ne);
			}
		}
		if (fence_line)
			appendStringInfoString(&out, fence);
		else
		{
			/* one pass, so substituted text is never scanned again */
			for (const char *p = line; p < e;)
			{
				if (e - p >= 10 && memcmp(p, "{question}", 10) == 0)
				{
					appendStringInfoString(&out, question);
					p += 10;
				}
				else if (e - p >= 10 && memcmp(p, "{response}", 10) == 0)
				{
					appendStringInfoString(&out, completion);
					p += 10;
				}
				else
					appendStringInfoChar(&out, *p++);
			}
		}
		if (nl)
			appendStringInfoChar(&out, '\n');
		prev_s = line;
		prev_e = e;
		line = nl ? nl + 1 : NULL;
	}
	return out.data;
}

/* Text of a message's content: a string, or an array of {text} parts. */
static char *
content_text(JsonbValue *v, int i)
{
	if (v == NULL || v->type == jbvNull)
		return pstrdup("");
	if (v->type == jbvString)
		return pnstrdup(v->val.string.val, v->val.string.len);
	if (v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data))
	{
		StringInfoData s;
		int			n = JsonContainerSize(v->val.binary.data);

		initStringInfo(&s);
		for (int k = 0; k < n; k++)
		{
			JsonbValue *part = getIthJsonbValueFromContainer(v->val.binary.data, k);
			JsonbValue *t;

			if (part && part->type == jbvBinary && JsonContainerIsObject(part->val.binary.data) &&
				(t = getKeyJsonValueFromContainer(part->val.binary.data, "text", 4, NULL)) != NULL &&
				t->type == jbvString)
				appendBinaryStringInfo(&s, t->val.string.val, t->val.string.len);
		}
		return s.data;
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("content of prompt message %d must be a string or an array of text parts", i + 1)));
	return NULL;
}

/* The prompt as parallel arrays of upper-cased roles and contents. */
int
rbr_prompt_messages(Jsonb *prompt, char ***roles, char ***contents)
{
	int			n;

	if (JB_ROOT_IS_SCALAR(prompt))
	{
		JsonbValue *v = getIthJsonbValueFromContainer(&prompt->root, 0);

		if (v == NULL || v->type != jbvString)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("prompt must be a JSON array of messages or a JSON string"),
					 errhint("Pass [{\"role\": \"user\", \"content\": \"...\"}, ...].")));
		*roles = palloc(sizeof(char *));
		*contents = palloc(sizeof(char *));
		(*roles)[0] = pstrdup("USER");
		(*contents)[0] = pnstrdup(v->val.string.val, v->val.string.len);
		return 1;
	}
	if (!JB_ROOT_IS_ARRAY(prompt))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("prompt must be a JSON array of messages or a JSON string"),
				 errhint("Pass [{\"role\": \"user\", \"content\": \"...\"}, ...].")));
	n = JB_ROOT_COUNT(prompt);
	*roles = palloc(sizeof(char *) * Max(n, 1));
	*contents = palloc(sizeof(char *) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		JsonbValue *m = getIthJsonbValueFromContainer(&prompt->root, i);
		JsonbValue *role;

		if (m == NULL || m->type != jbvBinary || !JsonContainerIsObject(m->val.binary.data))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("prompt message %d is not a JSON object", i + 1),
					 errhint("Each message is {\"role\": \"user\", \"content\": \"...\"}.")));
		role = getKeyJsonValueFromContainer(m->val.binary.data, "role", 4, NULL);
		if (role == NULL || role->type != jbvString || role->val.string.len == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("prompt message %d has no \"role\" string", i + 1)));
		(*roles)[i] = pnstrdup(role->val.string.val, role->val.string.len);
		for (char *p = (*roles)[i]; *p; p++)
			*p = pg_toupper((unsigned char) *p);
		(*contents)[i] = content_text(getKeyJsonValueFromContainer(m->val.binary.data, "content", 7, NULL), i);
	}
	return n;
}

/* The "messages" JSON array for one (proposition, prompt, completion). */
char *
rbr_grader_messages_json(RbrPolicy *pol, int prop, Jsonb *prompt, const char *completion)
{
	char	  **roles,
			  **contents;
	int			n = rbr_prompt_messages(prompt, &roles, &contents);
	const char **texts = palloc(sizeof(char *) * (2 * n + 1));
	char	   *fence;
	StringInfoData conv;
	StringInfoData out;

	/* roles are untrusted too: on one line, and inside the fence */
	for (int i = 0; i < n; i++)
	{
		for (char *p = roles[i]; *p; p++)
			if (*p == '\n' || *p == '\r')
				*p = ' ';
		texts[i] = contents[i];
		texts[n + i] = roles[i];
	}
	texts[2 * n] = completion;
	fence = fence_for(texts, 2 * n + 1);

	initStringInfo(&conv);
	appendStringInfo(&conv,
					 "The conversation, for context (the question is about its last ASSISTANT message):\n%s\n",
					 fence);
	for (int i = 0; i < n; i++)
		appendStringInfo(&conv, "%s: %s\n", roles[i], contents[i]);
	appendStringInfo(&conv, "ASSISTANT: %s\n%s", completion, fence);

	initStringInfo(&out);
	appendStringInfoString(&out, "[{\"role\": \"system\", \"content\": ");
	escape_json(&out, system_message(pol->prompt_template, pol->props[prop].prompt, completion));
	appendStringInfoString(&out, "}, {\"role\": \"user\", \"content\": ");
	escape_json(&out, conv.data);
	appendStringInfoString(&out, "}]");
	return out.data;
}

/* The full request body of a job with the given token parameter. */
char *
rbr_grader_body(RbrGradeJob *job, int token_param)
{
	StringInfoData b;

	initStringInfo(&b);
	appendStringInfoString(&b, "{\"model\": ");
	escape_json(&b, rbr_grader_model);
	appendStringInfo(&b, ", \"messages\": %s, \"temperature\": 0, \"logprobs\": true, "
					 "\"top_logprobs\": 20, \"%s\": 1}",
					 job->messages_json,
					 token_param == RBR_TOKENS_MAX_TOKENS ? "max_tokens" : "max_completion_tokens");
	return b.data;
}

/* ---------------------------------------------------------------------------
 * Reading answers
 * ------------------------------------------------------------------------- */

/* Does a token mean 'word' after stripping spaces and tokenizer markers? */
static bool
token_is(const char *tok, const char *word)
{
	const char *s = tok;
	size_t		len;

	for (;;)
	{
		if (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
			s++;
		else if ((unsigned char) s[0] == 0xC4 && (unsigned char) s[1] == 0xA0)
			s += 2;				/* U+0120, GPT-2 space marker */
		else if ((unsigned char) s[0] == 0xE2 && (unsigned char) s[1] == 0x96 &&
				 (unsigned char) s[2] == 0x81)
			s += 3;				/* U+2581, SentencePiece space marker */
		else
			break;
	}
	len = strlen(s);
	while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\n' || s[len - 1] == '\r' || s[len - 1] == '\t'))
		len--;
	return len == strlen(word) && pg_strncasecmp(s, word, len) == 0;
}

/*
 * P(yes) from top tokens; *found false when neither side is listed. *mass is
 * the observed yes + no probability. A missing side is bounded by the
 * smallest listed probability (an upper bound on its mass).
 */
double
rbr_grader_p_yes(const char *const *tokens, const double *logprobs, int n,
				 double *mass, bool *found)
{
	double		yes = 0,
				no = 0,
				smallest;
	double		lowest = 0.0;	/* log of the smallest probability listed */

	for (int i = 0; i < n; i++)
	{
		double		lp = logprobs[i];

		if (!(lp <= 709.0))		/* NaN, or exp() would overflow */
			continue;
		lowest = Min(lowest, lp);
		if (token_is(tokens[i], "yes"))
			yes += exp(lp);
		else if (token_is(tokens[i], "no"))
			no += exp(lp);
	}
	smallest = exp(lowest);
	*mass = yes + no;
	*found = (yes > 0 || no > 0);
	if (!*found)
		return NAN;
	if (yes == 0)
		yes = smallest;
	if (no == 0)
		no = smallest;
	return yes / (yes + no);
}

/* Member of a json-c object, or NULL. */
static json_object *
jget(json_object *o, const char *key)
{
	json_object *v = NULL;

	if (o == NULL || !json_object_is_type(o, json_type_object))
		return NULL;
	return json_object_object_get_ex(o, key, &v) ? v : NULL;
}

/* Element i of a json-c array, or NULL. */
static json_object *
jidx(json_object *a, size_t i)
{
	if (a == NULL || !json_object_is_type(a, json_type_array) || json_object_array_length(a) <= i)
		return NULL;
	return json_object_array_get_idx(a, i);
}

/* Integer member, or -1. */
static int
jint(json_object *o, const char *key)
{
	json_object *v = jget(o, key);

	return v && json_object_is_type(v, json_type_int) ? json_object_get_int(v) : -1;
}

/*
 * Up to len bytes of untrusted text as a valid string of the database: cut at
 * a NUL, control characters as spaces, invalid UTF-8 bytes (and, in a
 * database that is not UTF-8, every non-ASCII byte) as '?'.
 */
static char *
clean_text(const char *s, size_t len)
{
	StringInfoData out;
	bool		utf8 = GetDatabaseEncoding() == PG_UTF8;
	size_t		i = 0;

	initStringInfo(&out);
	while (i < len && s[i] != '\0')
	{
		unsigned char c = (unsigned char) s[i];
		int			l = (c < 0x80) ? 1 : pg_utf_mblen((const unsigned char *) s + i);

		if (c < 0x80)
			appendStringInfoChar(&out, c < 0x20 ? ' ' : (char) c);
		else if (utf8 && i + l <= len && pg_utf8_islegal((const unsigned char *) s + i, l))
		{
			appendBinaryStringInfo(&out, s + i, l);
			i += l;
			continue;
		}
		else
			appendStringInfoChar(&out, '?');
		i++;
	}
	return out.data;
}

/* Parse JSON text; the object is parked in *holder until put. */
static json_object *
parse_json(const char *body, size_t len, void **holder)
{
	json_tokener *tok;
	json_object *root;

	if (body == NULL || len == 0)
		return NULL;
	tok = json_tokener_new();
	if (tok == NULL)
		return NULL;
	/* invalid UTF-8 must never reach SQL text: reject the whole body */
	json_tokener_set_flags(tok, JSON_TOKENER_VALIDATE_UTF8);
	root = json_tokener_parse_ex(tok, body, (int) len);
	if (root != NULL && json_tokener_get_error(tok) != json_tokener_success)
	{
		json_object_put(root);
		root = NULL;
	}
	json_tokener_free(tok);
	*holder = root;
	return root;
}

/* Release the parked json-c object. */
static void
put_json(void **holder)
{
	if (*holder != NULL)
		json_object_put((json_object *) *holder);
	*holder = NULL;
}

/*
 * Read a 200 answer into res. Returns false (res->error set) if it is
 * malformed, has no usable answer, or lacks logprobs in strict mode.
 */
bool
rbr_grader_parse_answer(const char *body, size_t len, RbrGradeResult *res, void **json_holder)
{
	json_object *root = parse_json(body, len, json_holder);
	json_object *choice,
			   *content,
			   *lp0,
			   *top,
			   *model,
			   *usage;
	char	   *text = NULL;
	int			n = 0;
	const char **tokens = NULL;
	double	   *lps = NULL;
	double		mass,
				p;
	bool		found;

	res->ok = false;
	if (root == NULL)
	{
		res->error = pstrdup("malformed answer: the response body is not valid JSON in UTF-8");
		return false;
	}
	choice = jidx(jget(root, "choices"), 0);
	content = jget(jget(choice, "message"), "content");
	if (content && json_object_is_type(content, json_type_string))
		text = pstrdup(json_object_get_string(content));
	model = jget(root, "model");
	if (model && json_object_is_type(model, json_type_string))
		res->model = pstrdup(json_object_get_string(model));
	usage = jget(root, "usage");
	res->prompt_tokens = jint(usage, "prompt_tokens");
	res->completion_tokens = jint(usage, "completion_tokens");

	lp0 = jidx(jget(jget(choice, "logprobs"), "content"), 0);
	top = jget(lp0, "top_logprobs");
	if (top && json_object_is_type(top, json_type_array) && json_object_array_length(top) > 0)
	{
		size_t		m = json_object_array_length(top);

		tokens = palloc(sizeof(char *) * m);
		lps = palloc(sizeof(double) * m);
		for (size_t i = 0; i < m; i++)
		{
			json_object *e = json_object_array_get_idx(top, i);
			json_object *t = jget(e, "token");
			json_object *l = jget(e, "logprob");

			if (t && l && json_object_is_type(t, json_type_string) &&
				(json_object_is_type(l, json_type_double) || json_object_is_type(l, json_type_int)))
			{
				tokens[n] = pstrdup(json_object_get_string(t));
				lps[n] = json_object_get_double(l);
				n++;
			}
		}
	}
	else if (lp0 != NULL && jget(lp0, "token") && jget(lp0, "logprob") &&
			 json_object_is_type(jget(lp0, "token"), json_type_string) &&
			 (json_object_is_type(jget(lp0, "logprob"), json_type_double) ||
			  json_object_is_type(jget(lp0, "logprob"), json_type_int)))
	{
		/* no alternatives listed: the chosen token alone */
		tokens = palloc(sizeof(char *));
		lps = palloc(sizeof(double));
		tokens[0] = pstrdup(json_object_get_string(jget(lp0, "token")));
		lps[0] = json_object_get_double(jget(lp0, "logprob"));
		n = 1;
	}
	if (choice == NULL)
	{
		put_json(json_holder);
		res->error = pstrdup("malformed answer: no choices");
		return false;
	}
	put_json(json_holder);

	/*
	 * A log-probability is at most 0 (a little more is rounding); anything
	 * larger is a broken answer, which would otherwise give P = NaN or an
	 * arbitrary value. NaN entries are skipped by rbr_grader_p_yes().
	 */
	for (int i = 0; i < n; i++)
	{
		if (lps[i] > 1e-4)
		{
			res->error = psprintf("malformed answer: %g is not a log-probability (entry %d of top_logprobs)",
								  lps[i], i + 1);
			return false;
		}
		if (lps[i] > 0.0)
			lps[i] = 0.0;
	}
	if (n > 0)
	{
		p = rbr_grader_p_yes(tokens, lps, n, &mass, &found);
		if (found && !(p >= 0.0 && p <= 1.0))
		{
			res->error = pstrdup("malformed answer: the logprobs give no probability");
			return false;
		}
		if (found)
		{
			res->ok = true;
			res->probability = p;
			res->method = "logprobs";
			res->yes_no_mass = mass;
			return true;
		}
	}
	if (rbr_grader_strict_logprobs)
	{
		res->error = n > 0 ? pstrdup("neither \"yes\" nor \"no\" is among the top tokens (rbr.grader_strict_logprobs is on)")
			: pstrdup("the answer has no logprobs (rbr.grader_strict_logprobs is on)");
		return false;
	}
	if (text != NULL && (token_is(text, "yes") || token_is(text, "no")))
	{
		res->ok = true;
		res->probability = token_is(text, "yes") ? 1.0 : 0.0;
		res->method = "text";
		res->yes_no_mass = NAN;
		return true;
	}
	res->error = psprintf("the answer is neither \"yes\" nor \"no\"%s%s%s",
						  text ? " (\"" : "", text ? text : "", text ? "\")" : "");
	return false;
}

/*
 * Read a generator's 200 answer into res: choices[0].message.content (text),
 * finish_reason, model and usage. Returns false (res->error set) when the
 * body is malformed or carries no text (e.g. a refusal field instead).
 */
bool
rbr_generator_parse_answer(const char *body, size_t len, RbrGradeResult *res, void **json_holder)
{
	json_object *root = parse_json(body, len, json_holder);
	json_object *choice,
			   *message,
			   *content,
			   *refusal,
			   *finish,
			   *model,
			   *usage;

	res->ok = false;
	if (root == NULL)
	{
		res->error = pstrdup("malformed answer: the response body is not valid JSON in UTF-8");
		return false;
	}
	choice = jidx(jget(root, "choices"), 0);
	message = jget(choice, "message");
	content = jget(message, "content");
	refusal = jget(message, "refusal");
	finish = jget(choice, "finish_reason");
	model = jget(root, "model");
	usage = jget(root, "usage");
	if (model && json_object_is_type(model, json_type_string))
		res->model = pstrdup(json_object_get_string(model));
	res->prompt_tokens = jint(usage, "prompt_tokens");
	res->completion_tokens = jint(usage, "completion_tokens");
	if (finish && json_object_is_type(finish, json_type_string))
		res->finish_reason = pstrdup(json_object_get_string(finish));
	if (choice == NULL)
		res->error = pstrdup("malformed answer: no choices");
	else if (content && json_object_is_type(content, json_type_string))
	{
		res->text = pstrdup(json_object_get_string(content));
		res->ok = true;
	}
	else if (refusal && json_object_is_type(refusal, json_type_string))
		res->error = rbr_grader_scrub(psprintf("the generator refused: %s", json_object_get_string(refusal)));
	else
		res->error = pstrdup("malformed answer: choices[0].message.content is not a string");
	put_json(json_holder);
	return res->ok;
}

/*
 * Reason of a non-200 answer: "HTTP 429: message". *param is the rejected
 * request parameter when the endpoint names one as unsupported.
 */
char *
rbr_grader_error_reason(long status, const char *body, size_t len, char **param, void **json_holder)
{
	json_object *root = parse_json(body, len, json_holder);
	json_object *err = jget(root, "error");
	json_object *msg = jget(err, "message");
	json_object *par = jget(err, "param");
	json_object *code = jget(err, "code");
	char	   *reason;

	*param = NULL;
	if (msg && json_object_is_type(msg, json_type_string))
	{
		const char *m = json_object_get_string(msg);
		const char *c = code && json_object_is_type(code, json_type_string) ? json_object_get_string(code) : NULL;

		reason = psprintf("HTTP %ld: %s%s%s%s", status, m, c ? " (" : "", c ? c : "", c ? ")" : "");
		if (par && json_object_is_type(par, json_type_string) &&
			((c && strcmp(c, "unsupported_parameter") == 0) || strstr(m, "nsupported parameter") != NULL))
			*param = pstrdup(json_object_get_string(par));
		else if (strstr(m, "nsupported parameter: 'max_tokens'") != NULL)
			*param = pstrdup("max_tokens");
		else if (strstr(m, "nsupported parameter: 'max_completion_tokens'") != NULL)
			*param = pstrdup("max_completion_tokens");
	}
	else if (body != NULL && len > 0)
	{
		reason = psprintf("HTTP %ld: %s", status, clean_text(body, Min(len, 200)));
	}
	else
		reason = psprintf("HTTP %ld", status);
	put_json(json_holder);
	return rbr_grader_scrub(reason);
}

/* ---------------------------------------------------------------------------
 * Grading: cache, then the network
 * ------------------------------------------------------------------------- */

/* One grade_all() call: its questions, jobs and the keys seen so far. */
typedef struct RbrGradeRun
{
	RbrPolicy  *pol;
	const int  *props;
	Jsonb	  **prompts;
	char	  **completions;
	RbrGradeJob *jobs;
	int			n;
	const char **names;			/* proposition name per job */
	int		   *leader;			/* job asking the same question first, or -1 */
	HTAB	   *seen;			/* cache key -> first job with it */
	int			window;			/* jobs made ready at once */
} RbrGradeRun;

typedef struct RbrSeenKey
{
	uint8		key[32];
	int			job;
} RbrSeenKey;

/*
 * Feed: make the next window of jobs ready. Build each request and its key;
 * a question already asked in this call waits for that one's answer; the
 * others are looked up in the cache (one query per window).
 */
static void
grade_prepare(void *arg, int *ready)
{
	RbrGradeRun *g = (RbrGradeRun *) arg;
	int			from = *ready;
	int			to = Min(g->n, from + g->window);

	for (int i = from; i < to; i++)
	{
		RbrGradeJob *job = &g->jobs[i];
		RbrSeenKey *e;
		bool		found;

		job->messages_json = rbr_grader_messages_json(g->pol, g->props[i], g->prompts[i],
													  g->completions[i]);
		job->result.prompt_tokens = job->result.completion_tokens = -1;
		job->result.yes_no_mass = NAN;
		g->names[i] = g->pol->props[g->props[i]].name;
		rbr_cache_key(job);
		e = hash_search(g->seen, job->key, HASH_ENTER, &found);
		if (found)
		{
			g->leader[i] = e->job;
			job->done = true;
		}
		else
		{
			e->job = i;
			g->leader[i] = -1;
		}
	}
	rbr_cache_lookup(g->jobs + from, to - from, g->names + from);
	for (int i = from; i < to; i++)
		if (g->jobs[i].done)
		{
			/* answered from the cache or by another job: never sent */
			pfree(g->jobs[i].messages_json);
			g->jobs[i].messages_json = NULL;
		}
	*ready = to;
}

/* Feed: jobs that ended; cache the new answers. */
static void
grade_ended(void *arg, const int *idx, int n)
{
	RbrGradeRun *g = (RbrGradeRun *) arg;

	rbr_cache_store(g->jobs, idx, n, g->names);
	for (int k = 0; k < n; k++)
	{
		RbrGradeJob *job = &g->jobs[idx[k]];

		if (job->messages_json != NULL)
		{
			pfree(job->messages_json);
			job->messages_json = NULL;
		}
	}
}

/*
 * Grade n questions: answers from the cache cost nothing, identical questions
 * are asked once, the rest go to the grader concurrently; new answers are
 * cached. Building requests, cache look-ups and cache writes are done a
 * window at a time while other requests are in flight. Returns the jobs with
 * their results.
 */
static RbrGradeJob *
grade_all(RbrPolicy *pol, int n, const int *props, Jsonb **prompts, char **completions)
{
	RbrGradeRun g;
	HASHCTL		hctl;
	RbrHttpFeed feed;
	RbrEndpoint ep;

	g.pol = pol;
	g.props = props;
	g.prompts = prompts;
	g.completions = completions;
	g.n = n;
	g.jobs = palloc0(sizeof(RbrGradeJob) * Max(n, 1));
	g.names = palloc0(sizeof(char *) * Max(n, 1));
	g.leader = palloc(sizeof(int) * Max(n, 1));
	g.window = Max(16, Min(rbr_grader_max_in_flight, 256));
	memset(&hctl, 0, sizeof(hctl));
	hctl.keysize = 32;
	hctl.entrysize = sizeof(RbrSeenKey);
	hctl.hcxt = CurrentMemoryContext;
	g.seen = hash_create("rbr grader keys", Max(n, 16), &hctl,
						 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	feed.prepare = grade_prepare;
	feed.ended = grade_ended;
	feed.arg = &g;

	rbr_grader_endpoint(&ep);
	rbr_http_run(&ep, g.jobs, n, &feed);

	for (int i = 0; i < n; i++)
		if (g.leader[i] >= 0)
		{
			RbrGradeJob *lead = &g.jobs[g.leader[i]];

			g.jobs[i].result = lead->result;
			g.jobs[i].result.attempts = 0;
			g.jobs[i].result.prompt_tokens = g.jobs[i].result.completion_tokens = 0;
			g.jobs[i].result.cached = lead->result.ok;
		}
	for (int i = 0; i < n; i++)
		if (g.jobs[i].result.model == NULL)
			g.jobs[i].result.model = pstrdup(rbr_grader_model);
	hash_destroy(g.seen);
	return g.jobs;
}

/* Index of a simple proposition by name; ERROR if absent or derived. */
static int
simple_prop(RbrPolicy *pol, const char *name)
{
	int			i = rbr_policy_prop_index(pol, name);

	if (i < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("policy \"%s\" has no proposition \"%s\"", pol->name, name),
				 errhint("Check the spelling against rbr_policy_info().")));
	if (pol->props[i].derived)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" is a derived proposition of policy \"%s\"", name, pol->name),
				 errdetail("Only simple propositions are asked of the grader."),
				 errhint("Grade the simple propositions it is made of.")));
	return i;
}

PG_FUNCTION_INFO_V1(rbr_grade);
/* rbr_grade(policy, proposition, prompt jsonb, completion): P(yes), cached. */
Datum
rbr_grade(PG_FUNCTION_ARGS)
{
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	int			prop = simple_prop(pol, text_to_cstring(PG_GETARG_TEXT_PP(1)));
	Jsonb	   *prompt = PG_GETARG_JSONB_P(2);
	char	   *completion = text_to_cstring(PG_GETARG_TEXT_PP(3));
	RbrGradeJob *job = grade_all(pol, 1, &prop, &prompt, &completion);

	if (!job->result.ok)
		ereport(ERROR,
				(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
				 errmsg("grader failed on proposition \"%s\": %s", pol->props[prop].name,
						job->result.error),
				 errdetail("Model \"%s\", %d attempt(s).", job->result.model, job->result.attempts)));
	PG_RETURN_FLOAT8(job->result.probability);
}

PG_FUNCTION_INFO_V1(rbr_grade_many);
/*
 * rbr_grade_many(policy, propositions text[], prompts jsonb[], completions
 * text[]): one row per question (ord = 1-based position), errors as rows.
 */
Datum
rbr_grade_many(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	ArrayType  *a_props = PG_GETARG_ARRAYTYPE_P(1);
	ArrayType  *a_prompts = PG_GETARG_ARRAYTYPE_P(2);
	ArrayType  *a_compl = PG_GETARG_ARRAYTYPE_P(3);
	Datum	   *d_props,
			   *d_prompts,
			   *d_compl;
	bool	   *n_props,
			   *n_prompts,
			   *n_compl;
	int			n,
				n2,
				n3;
	int		   *props;
	Jsonb	  **prompts;
	char	  **completions;
	RbrGradeJob *jobs;

	InitMaterializedSRF(fcinfo, 0);
	deconstruct_array(a_props, TEXTOID, -1, false, TYPALIGN_INT, &d_props, &n_props, &n);
	deconstruct_array(a_prompts, JSONBOID, -1, false, TYPALIGN_INT, &d_prompts, &n_prompts, &n2);
	deconstruct_array(a_compl, TEXTOID, -1, false, TYPALIGN_INT, &d_compl, &n_compl, &n3);
	if (n != n2 || n != n3)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("propositions, prompts and completions must have the same length"),
				 errdetail("They have %d, %d and %d elements.", n, n2, n3)));
	props = palloc(sizeof(int) * Max(n, 1));
	prompts = palloc(sizeof(Jsonb *) * Max(n, 1));
	completions = palloc(sizeof(char *) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		if (n_props[i] || n_prompts[i] || n_compl[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("element %d of the arguments is NULL", i + 1)));
		props[i] = simple_prop(pol, TextDatumGetCString(d_props[i]));
		prompts[i] = DatumGetJsonbP(d_prompts[i]);
		completions[i] = TextDatumGetCString(d_compl[i]);
	}
	jobs = grade_all(pol, n, props, prompts, completions);

	for (int i = 0; i < n; i++)
	{
		RbrGradeResult *r = &jobs[i].result;
		Datum		v[12];
		bool		nulls[12] = {0};

		v[0] = Int32GetDatum(i + 1);
		v[1] = CStringGetTextDatum(pol->props[props[i]].name);
		v[2] = CStringGetTextDatum(r->ok ? "ok" : "error");
		v[3] = Float8GetDatum(r->probability);
		nulls[3] = !r->ok;
		v[4] = r->ok ? CStringGetTextDatum(r->method) : (Datum) 0;
		nulls[4] = !r->ok;
		v[5] = Float8GetDatum(r->yes_no_mass);
		nulls[5] = !r->ok || isnan(r->yes_no_mass);
		v[6] = CStringGetTextDatum(r->model);
		v[7] = r->error ? CStringGetTextDatum(r->error) : (Datum) 0;
		nulls[7] = r->ok || r->error == NULL;
		v[8] = Int32GetDatum(r->attempts);
		v[9] = Int32GetDatum(r->prompt_tokens);
		nulls[9] = r->prompt_tokens < 0;
		v[10] = Int32GetDatum(r->completion_tokens);
		nulls[10] = r->completion_tokens < 0;
		v[11] = BoolGetDatum(r->cached);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, nulls);
	}
	PG_RETURN_NULL();
}

PG_FUNCTION_INFO_V1(rbr_grader_request);
/* rbr_grader_request(policy, proposition, prompt, completion): the body sent. */
Datum
rbr_grader_request(PG_FUNCTION_ARGS)
{
	RbrPolicy  *pol = rbr_policy_get(text_to_cstring(PG_GETARG_TEXT_PP(0)));
	int			prop = simple_prop(pol, text_to_cstring(PG_GETARG_TEXT_PP(1)));
	RbrGradeJob job = {0};

	job.messages_json = rbr_grader_messages_json(pol, prop, PG_GETARG_JSONB_P(2),
												 text_to_cstring(PG_GETARG_TEXT_PP(3)));
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in,
										CStringGetDatum(rbr_grader_body(&job, rbr_grader_token_param()))));
}

PG_FUNCTION_INFO_V1(rbr_grader_stats);
/* rbr_grader_stats(): this backend's HTTP engine counters. */
Datum
rbr_grader_stats(PG_FUNCTION_ARGS)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	rbr_http_stats(&buf);
	appendStringInfo(&buf, ", \"token_parameter\": \"%s\"}",
					 rbr_grader_token_param() == RBR_TOKENS_MAX_TOKENS ? "max_tokens" : "max_completion_tokens");
	PG_RETURN_DATUM(DirectFunctionCall1(jsonb_in, CStringGetDatum(buf.data)));
}

PG_FUNCTION_INFO_V1(rbr_featurize_check_transaction);
/*
 * rbr.featurize_check_transaction(): ERROR unless rbr_featurize can commit
 * per chunk, i.e. it was not called inside a transaction block or a
 * subtransaction (a PL/pgSQL block with an EXCEPTION clause).
 */
Datum
rbr_featurize_check_transaction(PG_FUNCTION_ARGS)
{
	const char *name = PG_NARGS() > 0 ? text_to_cstring(PG_GETARG_TEXT_PP(0)) : "rbr_featurize";

	if (IsSubTransaction())
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
				 errmsg("%s cannot run inside a subtransaction", name),
				 errdetail("It commits after every chunk of rows, which a block with an EXCEPTION clause or a savepoint does not allow."),
				 errhint("CALL %s(...) at top level, or from a PL/pgSQL block without an EXCEPTION clause.", name)));
	if (IsTransactionBlock())
		ereport(ERROR,
				(errcode(ERRCODE_ACTIVE_SQL_TRANSACTION),
				 errmsg("%s cannot run inside a transaction block", name),
				 errdetail("It commits after every chunk of rows, so that a cancelled or crashed run keeps the work done."),
				 errhint("CALL %s(...) on its own, outside BEGIN ... COMMIT (in psql: with autocommit on).", name)));
	PG_RETURN_VOID();
}
