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
 *   By default temperature 0, logprobs with top_logprobs 20, one output token
 *   through max_completion_tokens (or max_tokens: setting, with a one-time
 *   automatic switch per backend when the endpoint rejects the parameter);
 *   rbr.grader_method, _samples, _top_logprobs, _max_answer_tokens,
 *   _temperature, _request_options and _api change the body.
 *
 * P(yes), method logprobs: at the answer position (the first token that is a
 * yes or a no once white space, markup, "Answer:" and a <think> block are
 * skipped), the summed probability of the "yes" variants over that of "yes"
 * and "no" variants (leading spaces, markup and the tokenizer markers U+0120
 * and U+2581 stripped, case ignored). When one side is absent its mass is
 * bounded by the smallest probability listed: an upper bound on what it
 * could be, so P is pulled towards 0.5 (conservative). An answer without
 * log-probabilities is an error. Method sampled: the share of yes among the
 * answers that are a yes or a no.
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "access/xact.h"
#include "common/cryptohash.h"
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

#include "batch.h"
#include "grader.h"
#include "jsonc.h"
#include "jsonutil.h"

char	   *rbr_grader_model = NULL;
int			rbr_grader_timeout_ms = 60000;
int			rbr_grader_max_in_flight = 64;
int			rbr_grader_max_retries = 5;
int			rbr_grader_retry_base_ms = 500;
double		rbr_grader_requests_per_second = 0;
int			rbr_grader_token_parameter = RBR_TOKENS_MAX_COMPLETION_TOKENS;
bool		rbr_grader_strict_logprobs = false;
int			rbr_grader_method = RBR_METHOD_LOGPROBS;
int			rbr_grader_samples = 5;
int			rbr_grader_top_logprobs = 20;
int			rbr_grader_max_answer_tokens = 1;
char	   *rbr_grader_temperature = NULL;
char	   *rbr_grader_request_options = NULL;
int			rbr_grader_api = RBR_API_CHAT;

/* top_logprobs the endpoint accepts, once a 400 named a limit (0: none seen). */
static int	top_logprobs_limit = 0;

static char *grader_classify_failure(long status, const char *body, size_t len, int body_param,
									 bool *retry_now, bool *final, void **json_holder);

static const struct config_enum_entry method_options[] = {
	{"logprobs", RBR_METHOD_LOGPROBS, false},
	{"sampled", RBR_METHOD_SAMPLED, false},
	{"auto", RBR_METHOD_AUTO, false},
	{NULL, 0, false}
};

static const struct config_enum_entry api_options[] = {
	{"chat", RBR_API_CHAT, false},
	{"responses", RBR_API_RESPONSES, false},
	{NULL, 0, false}
};

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

/* rbr.grader_temperature: empty, or a number from 0 to 2. */
static bool
check_temperature(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	char	   *end;
	double		t;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	errno = 0;
	t = strtod(*newval, &end);
	while (*end == ' ')
		end++;
	if (errno != 0 || *end != '\0' || !(t >= 0 && t <= 2))
	{
		GUC_check_errdetail("The temperature is a number from 0 to 2, or empty to leave it to the endpoint.");
		return false;
	}
	return true;
}

/* rbr.grader_request_options (and the generator's): empty or a JSON object. */
bool
rbr_check_request_options(char **newval, void **extra pg_attribute_unused(), GucSource source pg_attribute_unused())
{
	json_object *o;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	o = json_tokener_parse(*newval);
	if (o == NULL || !json_object_is_type(o, json_type_object))
	{
		if (o != NULL)
			json_object_put(o);
		GUC_check_errdetail("The request options must be a JSON object, e.g. {\"reasoning_effort\": \"low\"}.");
		return false;
	}
	json_object_put(o);
	return true;
}

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
							 "Deprecated, no effect: an answer without log-probabilities is always an error under rbr.grader_method = logprobs.",
							 NULL, &rbr_grader_strict_logprobs, false,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomEnumVariable("rbr.grader_method",
							 "How P(yes) is obtained: logprobs, sampled (share of yes over rbr.grader_samples answers) or auto.",
							 "auto: log-probabilities when the answer carries them, else the share of yes; the method is recorded per value.",
							 &rbr_grader_method, RBR_METHOD_LOGPROBS, method_options,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.grader_samples",
							"Answers asked per question (request parameter n) under rbr.grader_method sampled or auto.",
							NULL, &rbr_grader_samples, 5, 1, 128,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.grader_top_logprobs",
							"Alternatives per token asked (top_logprobs); lowered once per session when the endpoint names its limit.",
							NULL, &rbr_grader_top_logprobs, 20, 1, 20,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("rbr.grader_max_answer_tokens",
							"Output tokens a grader answer may use (room to reason before the yes or no).",
							NULL, &rbr_grader_max_answer_tokens, 1, 1, 100000,
							PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("rbr.grader_temperature",
							   "Sampling temperature of the grader; empty: not sent (the endpoint's default).",
							   NULL, &rbr_grader_temperature, "0",
							   PGC_USERSET, 0, check_temperature, NULL, NULL);
	DefineCustomStringVariable("rbr.grader_request_options",
							   "JSON object merged into every grader request body; a key set to null removes rbr's own field.",
							   "E.g. {\"reasoning_effort\": \"low\"} or {\"chat_template_kwargs\": {\"enable_thinking\": false}}.",
							   &rbr_grader_request_options, "",
							   PGC_USERSET, 0, rbr_check_request_options, NULL, NULL);
	DefineCustomEnumVariable("rbr.grader_api",
							 "API the grader speaks: chat (Chat Completions) or responses (OpenAI Responses API).",
							 NULL, &rbr_grader_api, RBR_API_CHAT, api_options,
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
	ep->path = rbr_grader_api == RBR_API_RESPONSES ? "responses" : "chat/completions";
	ep->build_body = rbr_grader_body;
	ep->read_answer = rbr_grader_parse_answer;
	ep->token_param = rbr_grader_token_param;
	ep->classify_failure = grader_classify_failure;
	ep->scrub = rbr_grader_scrub;
	ep->max_in_flight = rbr_grader_max_in_flight;
	ep->max_retries = rbr_grader_max_retries;
	ep->retry_base_ms = rbr_grader_retry_base_ms;
	ep->requests_per_second = rbr_grader_requests_per_second;
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

/* top_logprobs sent: the setting, capped by a limit the endpoint named. */
static int
top_logprobs_sent(void)
{
	if (top_logprobs_limit > 0)
		return Min(rbr_grader_top_logprobs, top_logprobs_limit);
	return rbr_grader_top_logprobs;
}

/*
 * Merge a JSON object of request options into a request body: each key
 * replaces rbr's field of that name, null removes it. Returns a new body.
 */
char *
rbr_merge_request_options(const char *body, const char *options)
{
	json_object *b,
			   *o;
	char	   *out;

	if (options == NULL || options[0] == '\0')
		return (char *) body;
	b = json_tokener_parse(body);
	o = json_tokener_parse(options);
	if (b == NULL || o == NULL || !json_object_is_type(o, json_type_object))
	{
		if (b)
			json_object_put(b);
		if (o)
			json_object_put(o);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("could not merge the request options into the request body"),
				 errhint("The request options must be a JSON object.")));
	}
	for (struct lh_entry *e = json_object_get_object(o)->head; e != NULL; e = e->next)
	{
		const char *key = (const char *) lh_entry_k(e);
		json_object *val = (json_object *) lh_entry_v(e);

		if (val == NULL)
			json_object_object_del(b, key);
		else
			json_object_object_add(b, key, json_object_get(val));
	}
	out = pstrdup(json_object_to_json_string_ext(b, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
	json_object_put(b);
	json_object_put(o);
	return out;
}

/*
 * Set once per backend when the endpoint rejects "n" > 1: sampled grading
 * then sends k requests of one answer each (with "seed" 0 .. k-1) and counts
 * the yes answers over all of them.
 */
static bool one_sample_per_request = false;

/* Whether sampled grading sends one request per answer (the endpoint rejected "n"). */
bool
rbr_grader_one_sample_per_request(void)
{
	return one_sample_per_request;
}

/* The request body of a job for sample index seed (one sample per request). */
static char *
grader_body(RbrGradeJob *job, int token_param, int seed)
{
	StringInfoData b;
	bool		want_lp = rbr_grader_method != RBR_METHOD_SAMPLED;
	int			n = rbr_grader_method == RBR_METHOD_LOGPROBS ? 1 : rbr_grader_samples;
	bool		temp = rbr_grader_temperature != NULL && rbr_grader_temperature[0] != '\0';

	initStringInfo(&b);
	appendStringInfoString(&b, "{\"model\": ");
	escape_json(&b, rbr_grader_model);
	if (rbr_grader_api == RBR_API_RESPONSES)
	{
		appendStringInfo(&b, ", \"input\": %s", job->messages_json);
		if (temp)
			appendStringInfo(&b, ", \"temperature\": %s", rbr_grader_temperature);
		if (want_lp)
			appendStringInfo(&b, ", \"top_logprobs\": %d, \"include\": [\"message.output_text.logprobs\"]",
							 top_logprobs_sent());
		appendStringInfo(&b, ", \"max_output_tokens\": %d, \"store\": false}",
						 rbr_grader_max_answer_tokens);
	}
	else
	{
		appendStringInfo(&b, ", \"messages\": %s", job->messages_json);
		if (temp)
			appendStringInfo(&b, ", \"temperature\": %s", rbr_grader_temperature);
		if (want_lp)
			appendStringInfo(&b, ", \"logprobs\": true, \"top_logprobs\": %d", top_logprobs_sent());
		if (n > 1 && !one_sample_per_request)
			appendStringInfo(&b, ", \"n\": %d", n);
		else if (n > 1)
			appendStringInfo(&b, ", \"seed\": %d", seed);
		appendStringInfo(&b, ", \"%s\": %d}",
						 token_param == RBR_TOKENS_MAX_TOKENS ? "max_tokens" : "max_completion_tokens",
						 rbr_grader_max_answer_tokens);
	}
	return rbr_merge_request_options(b.data, rbr_grader_request_options);
}

/* The full request body of a job with the given token parameter. */
char *
rbr_grader_body(RbrGradeJob *job, int token_param)
{
	return grader_body(job, token_param, job->result.acc_answers);
}

/*
 * The cache key of a grading job: sha256 of the endpoint kind, the model, the
 * method and k, and the request body as sent (every field: messages,
 * temperature, top_logprobs, answer tokens, request options), with the token
 * parameter's name fixed (both names ask for the same limit).
 */
void
rbr_grader_cache_key(RbrGradeJob *job)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	const char *kind = rbr_grader_azure_api_version[0] ? "azure" : "openai";
	char	   *method = psprintf("method=%s k=%d api=%s",
								  method_options[rbr_grader_method].name,
								  rbr_grader_method == RBR_METHOD_LOGPROBS ? 1 : rbr_grader_samples,
								  api_options[rbr_grader_api].name);
	char	   *body = grader_body(job, RBR_TOKENS_MAX_COMPLETION_TOKENS, 0);
	const char *parts[] = {"rbr-grade-cache-v2\n", kind, "\n", rbr_grader_model, "\n",
	method, "\n", body};
	bool		ok = ctx != NULL && pg_cryptohash_init(ctx) == 0;

	for (int i = 0; ok && i < (int) lengthof(parts); i++)
		ok = pg_cryptohash_update(ctx, (const uint8 *) parts[i], strlen(parts[i])) == 0;
	ok = ok && pg_cryptohash_final(ctx, job->key, sizeof(job->key)) == 0;
	pg_cryptohash_free(ctx);
	pfree(method);
	pfree(body);
	if (!ok)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute the sha256 of a grader request")));
}

/* ---------------------------------------------------------------------------
 * Reading answers
 * ------------------------------------------------------------------------- */

/* Is c markup that may precede the answer word (bold, heading, quotes)? */
static bool
is_markup(char c)
{
	return c == '*' || c == '_' || c == '#' || c == '"' || c == '\'' || c == '`' || c == '>' || c == '-';
}

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
		else if (is_markup(*s))
			s++;				/* "**Yes" */
		else
			break;
	}
	len = strlen(s);
	while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\n' || s[len - 1] == '\r' || s[len - 1] == '\t' ||
					   s[len - 1] == '.' || is_markup(s[len - 1])))
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
	json_object *v = rbr_jsonc_get(o, key);

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
	json_object *root = rbr_jsonc_parse(body, len);

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
 * Offset in text of the answer word: after white space, markup, an
 * "Answer:" label and a <think>...</think> block. -1 when a reasoning block
 * is not closed (the answer ran out of tokens while reasoning).
 */
static int
answer_offset(const char *text)
{
	const char *p = text;

	for (;;)
	{
		const char *q = p;

		while (*q && (isspace((unsigned char) *q) || is_markup(*q)))
			q++;
		if (pg_strncasecmp(q, "<think>", 7) == 0)
		{
			const char *e = strstr(q + 7, "</think>");

			if (e == NULL)
				return -1;
			q = e + 8;
		}
		else if (pg_strncasecmp(q, "answer", 6) == 0)
		{
			const char *r = q + 6;

			while (*r == ' ' || is_markup(*r))
				r++;
			if (*r == ':')
				q = r + 1;
		}
		if (q == p)
			return p - text;
		p = q;
	}
}

/* 1 if the text's answer is yes, 0 if no, -1 neither, -2 unclosed reasoning. */
static int
answer_word(const char *text)
{
	int			off = answer_offset(text);
	const char *p;

	if (off < 0)
		return -2;
	p = text + off;
	if (pg_strncasecmp(p, "yes", 3) == 0 && !isalnum((unsigned char) p[3]))
		return 1;
	if (pg_strncasecmp(p, "no", 2) == 0 && !isalnum((unsigned char) p[2]))
		return 0;
	return -1;
}

/* One output position's log-probabilities: the token and its alternatives. */
typedef struct LpPos
{
	const char *token;
	int			nalt;
	const char **alt;
	double	   *lp;
} LpPos;

/* Is v a JSON number? */
static bool
jnum(json_object *v)
{
	return v && (json_object_is_type(v, json_type_double) || json_object_is_type(v, json_type_int));
}

/*
 * The positions of a logprobs list in the Chat Completions / Responses shape:
 * [{token, logprob, top_logprobs: [{token, logprob}]}].
 */
static LpPos *
positions_chat(json_object *content, int *npos)
{
	size_t		m = json_object_array_length(content);
	LpPos	   *pos = palloc0(sizeof(LpPos) * Max(m, 1));
	int			n = 0;

	for (size_t i = 0; i < m; i++)
	{
		json_object *e = json_object_array_get_idx(content, i);
		json_object *t = rbr_jsonc_get(e, "token");
		json_object *top = rbr_jsonc_get(e, "top_logprobs");
		LpPos	   *ps = &pos[n];

		if (t == NULL || !json_object_is_type(t, json_type_string))
			continue;
		ps->token = pstrdup(json_object_get_string(t));
		if (top && json_object_is_type(top, json_type_array) && json_object_array_length(top) > 0)
		{
			size_t		k = json_object_array_length(top);

			ps->alt = palloc(sizeof(char *) * k);
			ps->lp = palloc(sizeof(double) * k);
			for (size_t j = 0; j < k; j++)
			{
				json_object *a = json_object_array_get_idx(top, j);
				json_object *at = rbr_jsonc_get(a, "token");
				json_object *al = rbr_jsonc_get(a, "logprob");

				if (at && json_object_is_type(at, json_type_string) && jnum(al))
				{
					ps->alt[ps->nalt] = pstrdup(json_object_get_string(at));
					ps->lp[ps->nalt++] = json_object_get_double(al);
				}
			}
		}
		else if (jnum(rbr_jsonc_get(e, "logprob")))
		{
			/* no alternatives listed: the chosen token alone */
			ps->alt = palloc(sizeof(char *));
			ps->lp = palloc(sizeof(double));
			ps->alt[0] = ps->token;
			ps->lp[0] = json_object_get_double(rbr_jsonc_get(e, "logprob"));
			ps->nalt = 1;
		}
		n++;
	}
	*npos = n;
	return pos;
}

/*
 * The positions of a completions-style logprobs object (Together and
 * others): {tokens: [...], token_logprobs: [...], top_logprobs: [{tok: lp}]}.
 */
static LpPos *
positions_completions(json_object *lp, int *npos)
{
	json_object *toks = rbr_jsonc_get(lp, "tokens");
	json_object *tlps = rbr_jsonc_get(lp, "token_logprobs");
	json_object *tops = rbr_jsonc_get(lp, "top_logprobs");
	size_t		m = json_object_array_length(toks);
	LpPos	   *pos = palloc0(sizeof(LpPos) * Max(m, 1));
	int			n = 0;

	for (size_t i = 0; i < m; i++)
	{
		json_object *t = json_object_array_get_idx(toks, i);
		json_object *top = jidx(tops, i);
		LpPos	   *ps = &pos[n];

		if (t == NULL || !json_object_is_type(t, json_type_string))
			continue;
		ps->token = pstrdup(json_object_get_string(t));
		if (top && json_object_is_type(top, json_type_object) && json_object_object_length(top) > 0)
		{
			int			k = json_object_object_length(top);

			ps->alt = palloc(sizeof(char *) * k);
			ps->lp = palloc(sizeof(double) * k);
			for (struct lh_entry *e = json_object_get_object(top)->head; e != NULL; e = e->next)
			{
				const char *key = (const char *) lh_entry_k(e);
				json_object *val = (json_object *) lh_entry_v(e);

				if (jnum(val))
				{
					ps->alt[ps->nalt] = pstrdup(key);
					ps->lp[ps->nalt++] = json_object_get_double(val);
				}
			}
		}
		else if (jnum(jidx(tlps, i)))
		{
			ps->alt = palloc(sizeof(char *));
			ps->lp = palloc(sizeof(double));
			ps->alt[0] = ps->token;
			ps->lp[0] = json_object_get_double(jidx(tlps, i));
			ps->nalt = 1;
		}
		n++;
	}
	*npos = n;
	return pos;
}

/* The log-probability positions of a logprobs member in any known shape, or NULL. */
static LpPos *
positions_of(json_object *lp, int *npos)
{
	*npos = 0;
	if (lp && json_object_is_type(lp, json_type_array))
		return positions_chat(lp, npos);	/* Responses: output_text.logprobs */
	if (rbr_jsonc_get(lp, "content") && json_object_is_type(rbr_jsonc_get(lp, "content"), json_type_array))
		return positions_chat(rbr_jsonc_get(lp, "content"), npos);
	if (rbr_jsonc_get(lp, "tokens") && json_object_is_type(rbr_jsonc_get(lp, "tokens"), json_type_array))
		return positions_completions(lp, npos);
	return NULL;
}

/*
 * The answer position: the token where the answer word starts once white
 * space, markup, "Answer:" and a reasoning block are skipped. -1 when the
 * answer is neither yes nor no, -2 when reasoning did not end.
 */
static int
answer_position(LpPos *pos, int n)
{
	StringInfoData text;
	int		   *start = palloc(sizeof(int) * (n + 1));
	int			off,
				w;

	initStringInfo(&text);
	for (int i = 0; i < n; i++)
	{
		const unsigned char *t = (const unsigned char *) pos[i].token;

		start[i] = text.len;
		/* the tokenizers' space markers (U+0120, U+2581) read as spaces */
		while (*t)
		{
			if (t[0] == 0xC4 && t[1] == 0xA0)
				t += 2;
			else if (t[0] == 0xE2 && t[1] == 0x96 && t[2] == 0x81)
				t += 3;
			else
			{
				appendStringInfoChar(&text, (char) *t++);
				continue;
			}
			appendStringInfoChar(&text, ' ');
		}
	}
	start[n] = text.len;
	w = answer_word(text.data);
	if (w < 0)
		return w;
	off = answer_offset(text.data);
	for (int i = 0; i < n; i++)
		if (off >= start[i] && off < start[i + 1])
			return i;
	return -1;
}

/* Integer member of a member (usage.x.y), or -1. */
static int
jint2(json_object *o, const char *key1, const char *key2)
{
	return jint(rbr_jsonc_get(o, key1), key2);
}

/*
 * P(yes) of one position's alternatives into res; false (res->error set)
 * when they are broken or name neither yes nor no.
 */
static bool
p_yes_of(LpPos *ps, RbrGradeResult *res)
{
	double		mass,
				p;
	bool		found;

	/*
	 * A log-probability is at most 0 (a little more is rounding); anything
	 * larger is a broken answer, which would otherwise give P = NaN or an
	 * arbitrary value. NaN entries are skipped by rbr_grader_p_yes().
	 */
	for (int i = 0; i < ps->nalt; i++)
	{
		if (ps->lp[i] > 1e-4)
		{
			res->error = psprintf("malformed answer: %g is not a log-probability (entry %d of top_logprobs)",
								  ps->lp[i], i + 1);
			return false;
		}
		if (ps->lp[i] > 0.0)
			ps->lp[i] = 0.0;
	}
	p = rbr_grader_p_yes(ps->alt, ps->lp, ps->nalt, &mass, &found);
	if (!found)
	{
		res->error = pstrdup("neither \"yes\" nor \"no\" is among the top tokens at the answer position");
		return false;
	}
	if (!(p >= 0.0 && p <= 1.0))
	{
		res->error = pstrdup("malformed answer: the logprobs give no probability");
		return false;
	}
	res->ok = true;
	res->probability = p;
	res->method = "logprobs";
	res->yes_no_mass = mass;
	res->samples = 1;
	return true;
}

/* Text of a short value for a message: a string, or the JSON of it. */
static char *
short_json(json_object *v)
{
	if (v == NULL)
		return pstrdup("");
	if (json_object_is_type(v, json_type_string))
		return clean_text(json_object_get_string(v), 200);
	return clean_text(json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN), 200);
}

/*
 * Read a 200 answer into res. Returns false (res->error set) if it is
 * malformed (res->retry: sent again like a 5xx), has no usable answer, was
 * refused or filtered, or (under rbr.grader_method logprobs) carries no
 * log-probabilities (an error that names the setting to change).
 */
bool
rbr_grader_parse_answer(const char *body, size_t len, RbrGradeResult *res, void **json_holder)
{
	json_object *root = parse_json(body, len, json_holder);
	json_object *usage,
			   *model;
	json_object **texts;		/* per answer: its text member */
	json_object **lps;			/* per answer: its logprobs member */
	int			nans = 0;
	const char *filtered = NULL;
	char	   *refusal = NULL;
	bool		responses = false;
	bool		truncated = false;	/* an answer ended at the token limit */

	res->ok = false;
	if (root == NULL)
	{
		res->error = pstrdup("malformed answer: the response body is not valid JSON in UTF-8");
		res->retry = true;
		return false;
	}
	model = rbr_jsonc_get(root, "model");
	if (model && json_object_is_type(model, json_type_string))
		res->model = pstrdup(json_object_get_string(model));
	usage = rbr_jsonc_get(root, "usage");
	if (rbr_jsonc_get(root, "output") && json_object_is_type(rbr_jsonc_get(root, "output"), json_type_array))
	{
		/* Responses API: output[] items; reasoning items are skipped */
		json_object *out = rbr_jsonc_get(root, "output");
		size_t		m = json_object_array_length(out);
		json_object *inc = rbr_jsonc_get(rbr_jsonc_get(root, "incomplete_details"), "reason");

		responses = true;
		texts = palloc0(sizeof(json_object *) * 1);
		lps = palloc0(sizeof(json_object *) * 1);
		for (size_t i = 0; i < m; i++)
		{
			json_object *item = json_object_array_get_idx(out, i);
			json_object *ty = rbr_jsonc_get(item, "type");
			json_object *content = rbr_jsonc_get(item, "content");

			if (!ty || strcmp(json_object_get_string(ty), "message") != 0 || content == NULL ||
				!json_object_is_type(content, json_type_array))
				continue;
			for (size_t j = 0; j < json_object_array_length(content); j++)
			{
				json_object *c = json_object_array_get_idx(content, j);
				const char *ct = rbr_jsonc_get(c, "type") ? json_object_get_string(rbr_jsonc_get(c, "type")) : "";

				if (strcmp(ct, "output_text") == 0 && nans == 0)
				{
					texts[0] = rbr_jsonc_get(c, "text");
					lps[0] = rbr_jsonc_get(c, "logprobs");
					nans = 1;
				}
				else if (strcmp(ct, "refusal") == 0)
					refusal = short_json(rbr_jsonc_get(c, "refusal"));
			}
		}
		if (inc && json_object_is_type(inc, json_type_string) &&
			strcmp(json_object_get_string(inc), "content_filter") == 0)
			filtered = "incomplete_details.reason content_filter";
		truncated = inc && json_object_is_type(inc, json_type_string) &&
			strcmp(json_object_get_string(inc), "max_output_tokens") == 0;
		res->prompt_tokens = jint(usage, "input_tokens");
		res->completion_tokens = jint(usage, "output_tokens");
		res->cached_tokens = jint2(usage, "input_tokens_details", "cached_tokens");
		res->reasoning_tokens = jint2(usage, "output_tokens_details", "reasoning_tokens");
	}
	else
	{
		json_object *choices = rbr_jsonc_get(root, "choices");
		size_t		m = choices && json_object_is_type(choices, json_type_array) ? json_object_array_length(choices) : 0;

		if (m == 0)
		{
			put_json(json_holder);
			res->error = pstrdup("malformed answer: no choices");
			res->retry = true;
			return false;
		}
		texts = palloc0(sizeof(json_object *) * m);
		lps = palloc0(sizeof(json_object *) * m);
		for (size_t i = 0; i < m; i++)
		{
			json_object *choice = json_object_array_get_idx(choices, i);
			json_object *msg = rbr_jsonc_get(choice, "message");
			json_object *fr = rbr_jsonc_get(choice, "finish_reason");

			if (fr && json_object_is_type(fr, json_type_string) &&
				strcmp(json_object_get_string(fr), "content_filter") == 0)
				filtered = "finish_reason content_filter";
			if (fr && json_object_is_type(fr, json_type_string) &&
				strcmp(json_object_get_string(fr), "length") == 0)
				truncated = true;
			if (rbr_jsonc_get(msg, "refusal") && json_object_is_type(rbr_jsonc_get(msg, "refusal"), json_type_string))
				refusal = short_json(rbr_jsonc_get(msg, "refusal"));
			texts[nans] = msg ? rbr_jsonc_get(msg, "content") : rbr_jsonc_get(choice, "text");
			lps[nans] = rbr_jsonc_get(choice, "logprobs");
			nans++;
		}
		res->prompt_tokens = jint(usage, "prompt_tokens");
		res->completion_tokens = jint(usage, "completion_tokens");
		res->cached_tokens = jint2(usage, "prompt_tokens_details", "cached_tokens");
		res->reasoning_tokens = jint2(usage, "completion_tokens_details", "reasoning_tokens");
	}

	if (filtered != NULL || refusal != NULL)
	{
		res->error = rbr_grader_scrub(filtered != NULL
									  ? psprintf("content filter: the provider withheld the answer (%s)", filtered)
									  : psprintf("refusal: %s", refusal));
		put_json(json_holder);
		return false;
	}
	if (nans == 0)
	{
		put_json(json_holder);
		res->error = pstrdup(responses ? "malformed answer: no output_text in output"
							 : "malformed answer: no choices");
		res->retry = true;
		return false;
	}

	/* log-probabilities of the first answer, under logprobs and auto */
	if (rbr_grader_method != RBR_METHOD_SAMPLED)
	{
		int			npos;
		LpPos	   *pos = positions_of(lps[0], &npos);

		if (pos != NULL && npos > 0)
		{
			int			at = answer_position(pos, npos);
			bool		ok;

			if (at == -2)
				res->error = psprintf("the answer ran out of tokens inside its reasoning block (rbr.grader_max_answer_tokens is %d)",
									  rbr_grader_max_answer_tokens);
			else if (at < 0)
			{
				char	   *t = texts[0] && json_object_is_type(texts[0], json_type_string)
					? clean_text(json_object_get_string(texts[0]), 100) : pstrdup("");

				res->error = psprintf("the answer is neither \"yes\" nor \"no\" (\"%s\")", t);
			}
			ok = at >= 0 && p_yes_of(&pos[at], res);
			put_json(json_holder);
			if (!ok)
				res->error = rbr_grader_scrub(res->error);
			return ok;
		}
		if (rbr_grader_method == RBR_METHOD_LOGPROBS)
		{
			put_json(json_holder);
			res->error = pstrdup("the answer carries no log-probabilities: this endpoint or model does not return them; "
								 "set rbr.grader_method = 'sampled' (or 'auto')");
			return false;
		}
	}

	/* sampled (or auto without log-probabilities): the share of yes */
	{
		int			yes = 0,
					no = 0,
					other = 0,
					unclosed = 0;
		char	   *first_other = NULL;

		for (int i = 0; i < nans; i++)
		{
			const char *t = texts[i] && json_object_is_type(texts[i], json_type_string)
				? json_object_get_string(texts[i]) : "";
			int			w = answer_word(t);

			if (w == 1)
				yes++;
			else if (w == 0)
				no++;
			else
			{
				other++;
				unclosed += w == -2;
				if (first_other == NULL)
					first_other = clean_text(t, 100);
			}
		}
		put_json(json_holder);
		if (one_sample_per_request && rbr_grader_samples > 1)
		{
			/* one of k requests: count its answers, ask again until k */
			int		   *tok[4] = {&res->prompt_tokens, &res->completion_tokens, &res->cached_tokens,
			&res->reasoning_tokens};

			res->acc_yes += yes;
			res->acc_no += no;
			res->acc_answers += nans;
			for (int i = 0; i < 4; i++)
				res->acc_tokens[i] += Max(*tok[i], 0);
			if (res->acc_answers < rbr_grader_samples)
			{
				res->again = true;
				return true;
			}
			yes = res->acc_yes;
			no = res->acc_no;
			nans = res->acc_answers;
			for (int i = 0; i < 4; i++)
				*tok[i] = res->acc_tokens[i];
		}
		if (yes + no == 0)
		{
			res->error = unclosed > 0 || (truncated && (first_other == NULL || first_other[0] == '\0'))
				? psprintf("the answer ran out of tokens %s (rbr.grader_max_answer_tokens is %d)",
						   unclosed > 0 ? "inside its reasoning block" : "before a yes or a no",
						   rbr_grader_max_answer_tokens)
				: rbr_grader_scrub(psprintf("the answer is neither \"yes\" nor \"no\" (\"%s\")",
											first_other ? first_other : ""));
			return false;
		}
		res->ok = true;
		res->probability = (double) yes / (yes + no);
		res->method = "sampled";
		res->yes_no_mass = (double) (yes + no) / nans;
		res->samples = yes + no;
		return true;
	}
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
	choice = jidx(rbr_jsonc_get(root, "choices"), 0);
	message = rbr_jsonc_get(choice, "message");
	content = rbr_jsonc_get(message, "content");
	refusal = rbr_jsonc_get(message, "refusal");
	finish = rbr_jsonc_get(choice, "finish_reason");
	model = rbr_jsonc_get(root, "model");
	usage = rbr_jsonc_get(root, "usage");
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
	json_object *err = rbr_jsonc_get(root, "error");
	json_object *msg = rbr_jsonc_get(err, "message");
	json_object *par = rbr_jsonc_get(err, "param");
	json_object *code = rbr_jsonc_get(err, "code");
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

/*
 * Classify a non-200 answer for a client: its reason; *token_switch when the
 * endpoint rejected the token parameter the body was built with (the caller
 * switches and sends again); *final for failures that no other request of the
 * batch can escape (a bad key, no quota, an unknown model or path, a request
 * the endpoint rejects); *retry_now is left for the caller.
 */
char *
rbr_error_classify(long status, const char *body, size_t len, int body_param,
				   bool *retry_now, bool *final, void **json_holder, bool *token_switch)
{
	char	   *param = NULL;
	char	   *reason = rbr_grader_error_reason(status, body, len, &param, json_holder);

	*retry_now = false;
	*final = false;
	*token_switch = status == 400 && param != NULL &&
		strcmp(param, body_param == RBR_TOKENS_MAX_TOKENS ? "max_tokens" : "max_completion_tokens") == 0;
	if (*token_switch)
		return reason;
	if (strstr(reason, "content_filter") != NULL || strstr(reason, "ResponsibleAIPolicyViolation") != NULL)
		return psprintf("content filter: %s", reason);
	if (status == 429 && strstr(reason, "insufficient_quota") != NULL)
		*final = true;
	else if (status == 401 || status == 403 || status == 404)
		*final = true;
	else if (status == 400 || status == 422)
	{
		/*
		 * Final when the endpoint rejects a request field that every request
		 * carries (a parameter, its value, the model); a 400 about one
		 * request's messages (too long, say) fails that question alone.
		 */
		json_object *root = parse_json(body, len, json_holder);
		json_object *err = rbr_jsonc_get(root, "error");
		json_object *par = rbr_jsonc_get(err, "param");
		json_object *code = rbr_jsonc_get(err, "code");
		const char *p = par && json_object_is_type(par, json_type_string) ? json_object_get_string(par) : NULL;
		const char *c = code && json_object_is_type(code, json_type_string) ? json_object_get_string(code) : "";

		if ((p != NULL && strcmp(p, "messages") != 0 && strcmp(p, "input") != 0 && strcmp(p, "prompt") != 0) ||
			strcmp(c, "unsupported_parameter") == 0 || strcmp(c, "unsupported_value") == 0 ||
			strcmp(c, "model_not_found") == 0)
			*final = true;
		put_json(json_holder);
	}
	return reason;
}

/* The grader's classification: also lowers top_logprobs once to a limit a 400 names. */
static char *
grader_classify_failure(long status, const char *body, size_t len, int body_param,
						bool *retry_now, bool *final, void **json_holder)
{
	bool		token_switch;
	char	   *reason = rbr_error_classify(status, body, len, body_param, retry_now, final,
											json_holder, &token_switch);
	const char *t;

	if (token_switch)
	{
		if (rbr_grader_token_param() == body_param)
			rbr_grader_switch_token_param(body_param);
		*retry_now = true;
		*final = false;
		return reason;
	}
	if (status == 400 && (t = strstr(reason, "top_logprobs")) != NULL)
	{
		/* "... top_logprobs ... <= 5, but got 20" / "at most 5" */
		const char *d = t;
		const char *g = strstr(t, "got ");
		int			limit = 0;

		while (*d && !isdigit((unsigned char) *d))
			d++;
		if (*d)
			limit = atoi(d);
		if (g != NULL && atoi(g + 4) > top_logprobs_sent() && top_logprobs_limit > 0)
		{
			/* sent before this session lowered the value: send again */
			*retry_now = true;
			*final = false;
		}
		else if (limit >= 1 && limit < top_logprobs_sent())
		{
			top_logprobs_limit = limit;
			ereport(NOTICE,
					(errmsg("the grader endpoint accepts top_logprobs up to %d; this session now sends %d", limit, limit),
					 errhint("Set rbr.grader_top_logprobs to %d to avoid the first rejected request.", limit)));
			*retry_now = true;
			*final = false;
		}
	}
	if (status == 400 && strstr(reason, "'n'") != NULL && rbr_grader_method != RBR_METHOD_LOGPROBS &&
		rbr_grader_samples > 1 && one_sample_per_request)
	{
		/* sent with "n" before this session switched: send again without it */
		*retry_now = true;
		*final = false;
		return reason;
	}
	if (status == 400 && strstr(reason, "'n'") != NULL && rbr_grader_method != RBR_METHOD_LOGPROBS &&
		rbr_grader_samples > 1)
	{
		one_sample_per_request = true;
		ereport(NOTICE,
				(errmsg("the grader endpoint answers one sample per request; this session now sends %d requests per question",
						rbr_grader_samples),
				 errdetail("Each request carries \"seed\" 0 .. %d; P(yes) is the share of yes over all their answers.",
						   rbr_grader_samples - 1)));
		*retry_now = true;
		*final = false;
		return reason;
	}
	/* name the setting that fixes a rejected field */
	if (*final && status == 400)
	{
		if (strstr(reason, "logprobs") != NULL && rbr_grader_method != RBR_METHOD_SAMPLED)
			reason = psprintf("%s; this endpoint does not return log-probabilities: set rbr.grader_method = 'sampled'", reason);
		else if (strstr(reason, "temperature") != NULL)
			reason = psprintf("%s; set rbr.grader_temperature = '' to leave it to the endpoint", reason);
		else if (strstr(reason, "'n'") != NULL)
			reason = psprintf("%s; this endpoint answers one sample per request: set rbr.grader_samples = 1", reason);
	}
	return reason;
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
		job->result.cached_tokens = job->result.reasoning_tokens = -1;
		job->result.yes_no_mass = NAN;
		g->names[i] = g->pol->props[g->props[i]].name;
		rbr_grader_cache_key(job);
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
	/* batch mode: the cache only; what is missing goes to (or is in) a batch */
	if (rbr_batch_active())
		rbr_batch_prepare_jobs(g->jobs + from, to - from, g->names + from);
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

	/*
	 * After top_logprobs was lowered during the call, the answers came from
	 * requests with the lowered value: key them by the request really sent.
	 */
	if (top_logprobs_limit > 0 || one_sample_per_request)
		for (int k = 0; k < n; k++)
		{
			RbrGradeJob *job = &g->jobs[idx[k]];

			if (job->result.ok && !job->result.cached && job->messages_json != NULL)
				rbr_grader_cache_key(job);
		}
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
	for (int i = 0; i < n; i++)
		g.leader[i] = -1;		/* a job never prepared (batch stopped) asks nothing */
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

/*
 * ERROR when a job failed for good (a bad key, no quota, an unknown model, a
 * request field the endpoint rejects): the batch stopped there, and every
 * other question would fail the same way. One clear error instead of a row
 * per question.
 */
static void
final_failure(RbrGradeJob *jobs, int n)
{
	int			first = -1,
				not_sent = 0;

	for (int i = 0; i < n; i++)
		if (!jobs[i].result.ok && jobs[i].result.final)
		{
			if (first < 0 && jobs[i].result.attempts > 0)
				first = i;
			not_sent += jobs[i].result.attempts == 0;
		}
	if (first < 0)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_EXTERNAL_ROUTINE_EXCEPTION),
			 errmsg("the grader endpoint refused the requests: %s", jobs[first].result.error),
			 errdetail("Model \"%s\". %d of %d questions were not sent; no answer of this call is kept.",
					   jobs[first].result.model ? jobs[first].result.model : rbr_grader_model, not_sent, n),
			 errhint("Fix the key, quota, model or request settings (doc/configuration.md, \"Compatibility\"), then run again.")));
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
	final_failure(jobs, n);

	for (int i = 0; i < n; i++)
	{
		RbrGradeResult *r = &jobs[i].result;
		Datum		v[15];
		bool		nulls[15] = {0};

		/* batch mode: asked through the Batch API, no answer yet: no row */
		if (r->pending)
			continue;

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
		v[12] = Int32GetDatum(r->samples);
		nulls[12] = !r->ok || r->samples <= 0;
		v[13] = Int32GetDatum(r->cached_tokens);
		nulls[13] = r->cached_tokens < 0 || r->cached;
		v[14] = Int32GetDatum(r->reasoning_tokens);
		nulls[14] = r->reasoning_tokens < 0 || r->cached;
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
