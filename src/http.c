/*
 * http.c: the libcurl multi engine that sends a batch of jobs concurrently,
 * with retries, inside a backend. A batch talks to one endpoint (RbrEndpoint,
 * endpoint.h: URL, key, headers, model, timeout, limits) whose client builds
 * each request body, reads each 200 answer and classifies each failure
 * through callbacks; the engine knows nothing of graders or generators.
 * A failure the client calls final stops the batch: jobs not yet sent end
 * with its reason, and until a first answer comes back at most
 * RBR_PROBE_IN_FLIGHT requests are in flight, so a bad key costs a few.
 *
 * - One multi handle per backend, created on first use (libcurl is
 *   initialised lazily, never in _PG_init); connections stay in its pool
 *   between batches and are multiplexed over HTTP/2 where offered.
 * - libcurl uses its own malloc. Every easy handle, header list, response
 *   buffer and json-c object of a batch is owned by a "batch" whose memory
 *   context carries a reset callback, so an ERROR (cancel, statement_timeout,
 *   out of memory) frees them all.
 * - Callbacks never ereport: they record the failure and return a short
 *   count. The loop polls with at most 100 ms timeouts and calls
 *   CHECK_FOR_INTERRUPTS() between rounds, so a cancel or statement_timeout
 *   stops a batch within a fraction of a second with SQLSTATE 57014.
 * - Connection errors, timeouts, 408, 409, 429 and 5xx are retried with
 *   exponential backoff and jitter, honouring retry-after-ms / retry-after
 *   (capped); other 4xx are not retried. A job that runs out of retries ends
 *   as an error with its reason.
 * - Each attempt starts when this backend's rbr.grader_requests_per_second
 *   and the endpoint's rate budget (ratelimit.c: shared by the cluster when
 *   rbr is preloaded) allow it; every answer, its x-ratelimit-* headers and
 *   its token usage are reported back to the budget. While nothing is in
 *   flight the loop waits on the latch, so a cancel wakes it at once.
 */
#include "postgres.h"

#include <ctype.h>
#include <math.h>
#include <time.h>

#include <curl/curl.h>
#include <json-c/json.h>

#include "common/pg_prng.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "endpoint.h"
#include "ratelimit.h"
#include "secrets.h"
#include "storage/latch.h"
#include "utils/wait_event.h"

/* A batch in flight: what must be freed if the batch ends by ERROR. */
typedef struct RbrHttpBatch
{
	const RbrEndpoint *ep;
	RbrGradeJob *jobs;
	int			njobs;
	struct curl_slist *headers;
	const char *url;
	void	   *json;			/* json-c object being read, if any */
	CURL	  **spare;			/* easy handles between two requests, for reuse */
	int			nspare;
	int			maxspare;
	RbrRate		rate;			/* its endpoint's rate budget */
	bool		cleaned;
} RbrHttpBatch;

static CURLM *rbr_multi = NULL;
static bool rbr_curl_ready = false;
static bool rbr_async_dns = false;
static RbrHttpBatch *rbr_active_batch = NULL;
static int64 rbr_next_slot = 0; /* rate limiter: earliest next start (us) */

/* counters for rbr_http_stats() */
static int64 stat_live_easy = 0;
static int64 stat_requests = 0;
static int64 stat_retries = 0;
static int64 stat_ok = 0;
static int64 stat_errors = 0;
static int64 stat_batches = 0;
static int64 stat_param_switches = 0;
static int64 stat_stopped_batches = 0;
static int64 stat_rate_waits = 0;	/* loop rounds that waited for the rate budget */
static int64 stat_throttled = 0;	/* 429 answers */

/* The limits of the batch running (its endpoint's). */
static int	eng_retry_base_ms = 500;
static double eng_requests_per_second = 0;

/* Requests in flight at the start of a batch, before any answer came back. */
#define RBR_PROBE_IN_FLIGHT 4
#define RBR_PROBE_MS 2000
static int64 stat_http2 = 0;	/* responses that came over HTTP/2 */

/* Initialise libcurl and the backend's multi handle on first use. */
static void
http_init(void)
{
	curl_version_info_data *vi;

	if (rbr_multi != NULL)
		return;
	if (!rbr_curl_ready)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			ereport(ERROR,
					(errcode(ERRCODE_SYSTEM_ERROR),
					 errmsg("could not initialise libcurl")));
		rbr_curl_ready = true;
		vi = curl_version_info(CURLVERSION_NOW);
		rbr_async_dns = (vi->features & CURL_VERSION_ASYNCHDNS) != 0;
		if (!rbr_async_dns)
			ereport(WARNING,
					(errmsg("libcurl %s has no asynchronous DNS resolver", vi->version),
					 errdetail("A slow DNS lookup of the grader host cannot be cancelled until it ends."),
					 errhint("Use a libcurl built with the threaded resolver or c-ares.")));
	}
	rbr_multi = curl_multi_init();
	if (rbr_multi == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("could not create a libcurl multi handle")));
	curl_multi_setopt(rbr_multi, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX);
	curl_multi_setopt(rbr_multi, CURLMOPT_MAXCONNECTS, (long) 1024);
}

/* Free the curl objects of one job (safe to call twice). */
static void
job_release(RbrGradeJob *job)
{
	if (job->easy != NULL)
	{
		curl_multi_remove_handle(rbr_multi, (CURL *) job->easy);
		curl_easy_cleanup((CURL *) job->easy);
		job->easy = NULL;
		stat_live_easy--;
	}
	if (job->resp != NULL)
	{
		free(job->resp);
		job->resp = NULL;
	}
	job->resp_len = job->resp_cap = 0;
}

/* Free everything a batch owns; runs on normal exit and on ERROR. */
static void
batch_cleanup(void *arg)
{
	RbrHttpBatch *b = (RbrHttpBatch *) arg;

	if (b->cleaned)
		return;
	rbr_rate_end(&b->rate);
	for (int i = 0; i < b->njobs; i++)
		job_release(&b->jobs[i]);
	while (b->nspare > 0)
	{
		curl_easy_cleanup(b->spare[--b->nspare]);
		stat_live_easy--;
	}
	if (b->headers != NULL)
		curl_slist_free_all(b->headers);
	b->headers = NULL;
	if (b->json != NULL)
		json_object_put((json_object *) b->json);
	b->json = NULL;
	b->cleaned = true;
	if (rbr_active_batch == b)
		rbr_active_batch = NULL;
}

/* libcurl write callback: append to the job's buffer, or stop the transfer. */
static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	RbrGradeJob *job = (RbrGradeJob *) userdata;
	size_t		n = size * nmemb;

	if (job->resp_len + n + 1 > RBR_MAX_RESPONSE_BYTES)
	{
		job->resp_too_big = true;
		return 0;
	}
	if (job->resp_len + n + 1 > job->resp_cap)
	{
		size_t		cap = Max(job->resp_cap * 2, Max(job->resp_len + n + 1, 4096));
		char	   *p = realloc(job->resp, cap);

		if (p == NULL)
			return 0;			/* curl reports a write error */
		job->resp = p;
		job->resp_cap = cap;
	}
	memcpy(job->resp + job->resp_len, ptr, n);
	job->resp_len += n;
	job->resp[job->resp_len] = '\0';
	return n;
}

/*
 * Value of header line h (length n, not NUL-terminated) if it is header
 * 'name' (case-insensitive), leading blanks skipped; NULL otherwise. The
 * value ends at h + n; it is never read past.
 */
static const char *
header_value(const char *h, size_t n, const char *name)
{
	size_t		k = strlen(name);
	const char *end = h + n;

	if (n <= k || pg_strncasecmp(h, name, k) != 0 || h[k] != ':')
		return NULL;
	h += k + 1;
	while (h < end && (*h == ' ' || *h == '\t'))
		h++;
	return h;
}

/* libcurl header callback: remember retry-after-ms / retry-after. */
static size_t
header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	RbrGradeJob *job = (RbrGradeJob *) userdata;
	size_t		n = size * nitems;
	char		val[128];
	const char *v;
	size_t		vl;
	char	   *end;
	double		d;

	if (rbr_rate_header(&job->rate_seen, buffer, n))
		return n;
	if ((v = header_value(buffer, n, "retry-after-ms")) != NULL ||
		(v = header_value(buffer, n, "retry-after")) != NULL)
	{
		bool		ms = pg_strncasecmp(buffer, "retry-after-ms", 14) == 0;

		vl = n - (size_t) (v - buffer);
		while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' ' || v[vl - 1] == '\t'))
			vl--;
		if (vl == 0 || vl >= sizeof(val))
			return n;
		memcpy(val, v, vl);
		val[vl] = '\0';
		d = strtod(val, &end);
		if (end != val && *end == '\0' && d >= 0 && isfinite(d))
		{
			long		wait = (long) Min(ms ? d : d * 1000.0, (double) RBR_MAX_RETRY_AFTER_MS);

			/* retry-after-ms is the more precise of the two: it wins */
			if (ms || job->retry_after_ms < 0)
				job->retry_after_ms = wait;
		}
		else if (!ms)
		{
			time_t		t = curl_getdate(val, NULL);

			if (t > 0 && job->retry_after_ms < 0)
			{
				double		secs = difftime(t, time(NULL));

				job->retry_after_ms = (long) Min(Max(secs, 0.0) * 1000.0,
												 (double) RBR_MAX_RETRY_AFTER_MS);
			}
		}
	}
	return n;
}

/* The base URL of an endpoint (see endpoint.h). */
char *
rbr_endpoint_base(const RbrEndpoint *ep)
{
	char	   *base = pstrdup(ep->url);
	int			len = strlen(base);

	while (len > 0 && base[len - 1] == '/')
		base[--len] = '\0';
	if (ep->azure_api_version != NULL && ep->azure_api_version[0] != '\0')
	{
		if (len >= 10 && strcmp(base + len - 10, "/openai/v1") == 0)
			base[len - 10] = '\0';
		else if (len >= 7 && strcmp(base + len - 7, "/openai") == 0)
			base[len - 7] = '\0';
	}
	return base;
}

/* The chat completions URL of an endpoint. */
static char *
endpoint_url(const RbrEndpoint *ep)
{
	StringInfoData u;
	char	   *base = rbr_endpoint_base(ep);

	initStringInfo(&u);
	if (pg_strcasecmp(ep->azure_api_version, "v1") == 0)
	{
		/* Azure's v1 form: <resource>/openai/v1/<path>, no api-version */
		appendStringInfo(&u, "%s/openai/v1/%s", base, ep->path);
	}
	else if (ep->azure_api_version[0] != '\0')
	{
		CURL	   *h = curl_easy_init();
		char	   *model,
				   *ver;

		if (h == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		model = curl_easy_escape(h, ep->model, 0);
		ver = curl_easy_escape(h, ep->azure_api_version, 0);
		if (model && ver)
			appendStringInfo(&u, "%s/openai/deployments/%s/%s?api-version=%s",
							 base, model, ep->path, ver);
		curl_free(model);
		curl_free(ver);
		curl_easy_cleanup(h);
		if (u.len == 0)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	}
	else
		appendStringInfo(&u, "%s/%s", base, ep->path);
	return u.data;
}

/* Append one header to a list; ERROR (nothing leaked: *list stays valid) on failure. */
static void
add_header(struct curl_slist **list, const char *h)
{
	struct curl_slist *l = curl_slist_append(*list, h);

	if (l == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	*list = l;
}

/* Request headers: content type (JSON unless json is false), credentials, extra headers. */
static void
endpoint_headers(struct curl_slist **list, const RbrEndpoint *ep, bool json)
{
	if (json)
		add_header(list, "Content-Type: application/json");
	add_header(list, "Accept: application/json");
	add_header(list, "Expect:");
	if (ep->api_key[0] != '\0')
	{
		char	   *h;

		if (ep->azure_api_version[0] != '\0')
			h = psprintf("api-key: %s", ep->api_key);
		else
			h = psprintf("Authorization: Bearer %s", ep->api_key);
		add_header(list, h);
		memset(h, 0, strlen(h));
		pfree(h);
	}
	if (ep->extra_headers[0] != '\0')
	{
		char	   *copy = pstrdup(ep->extra_headers);
		char	   *save = NULL;

		for (char *tok = strtok_r(copy, ";", &save); tok; tok = strtok_r(NULL, ";", &save))
		{
			while (*tok == ' ' || *tok == '\t')
				tok++;
			if (*tok != '\0')
				add_header(list, tok);
		}
		memset(copy, 0, strlen(ep->extra_headers));
		pfree(copy);
	}
}

/* The batch's request headers. */
static void
build_headers(RbrHttpBatch *b)
{
	endpoint_headers(&b->headers, b->ep, true);
}

/* Is this libcurl failure worth another attempt? */
static bool
curl_retryable(CURLcode cc)
{
	switch (cc)
	{
		case CURLE_COULDNT_RESOLVE_HOST:
		case CURLE_COULDNT_CONNECT:
		case CURLE_OPERATION_TIMEDOUT:
		case CURLE_SEND_ERROR:
		case CURLE_RECV_ERROR:
		case CURLE_GOT_NOTHING:
		case CURLE_PARTIAL_FILE:
		case CURLE_HTTP2:
		case CURLE_HTTP2_STREAM:
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_WEIRD_SERVER_REPLY:
			return true;
		default:
			return false;
	}
}

/* A new easy handle with the options every request of the batch shares. */
static CURL *
easy_new(RbrHttpBatch *b)
{
	CURL	   *h = curl_easy_init();
	long		timeout = b->ep->timeout_ms;

	if (h == NULL)
		return NULL;
	stat_live_easy++;
	curl_easy_setopt(h, CURLOPT_URL, b->url);
	curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(h, CURLOPT_POST, 1L);
	curl_easy_setopt(h, CURLOPT_HTTPHEADER, b->headers);
	curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout);
	curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, Min(timeout, 10000L));
	curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(h, CURLOPT_USERAGENT, "rbr-postgresql/0.1");
	if (pg_strncasecmp(b->url, "https:", 6) == 0)
	{
		curl_easy_setopt(h, CURLOPT_HTTP_VERSION, (long) CURL_HTTP_VERSION_2TLS);
		curl_easy_setopt(h, CURLOPT_PIPEWAIT, 1L);
		/* a private CA (self-hosted servers); verification itself stays on */
		if (b->ep->ca_file != NULL && b->ep->ca_file[0] != '\0')
			curl_easy_setopt(h, CURLOPT_CAINFO, b->ep->ca_file);
	}
	return h;
}

/*
 * Before the batch's first request: where it goes and with which key
 * (secrets.c; ERROR when not configured), the URL and the headers.
 */
static void
batch_connect(RbrHttpBatch *b, MemoryContext bcxt)
{
	MemoryContext old = MemoryContextSwitchTo(bcxt);
	RbrEndpoint *ep = palloc(sizeof(RbrEndpoint));

	*ep = *b->ep;
	rbr_secrets_resolve(ep);
	b->ep = ep;
	b->url = endpoint_url(ep);
	build_headers(b);
	MemoryContextSwitchTo(old);
	rbr_rate_open(&b->rate, b->url, ep->model);
}

/* Build a job's request body if it has none for the token parameter in use. */
static void
job_body(RbrHttpBatch *b, RbrGradeJob *job, MemoryContext bcxt)
{
	int			param = b->ep->token_param();

	if (b->url == NULL)
		batch_connect(b, bcxt);

	if (job->body == NULL || job->body_param != param)
	{
		MemoryContext old = MemoryContextSwitchTo(bcxt);

		if (job->body != NULL)
			pfree(job->body);
		job->body = b->ep->build_body(job, param);
		/* JSON on the wire is UTF-8, whatever the database encoding */
		if (GetDatabaseEncoding() != PG_UTF8)
			job->body = pg_server_to_any(job->body, strlen(job->body), PG_UTF8);
		job->body_param = param;
		MemoryContextSwitchTo(old);
	}
}

/* An admitted attempt ended (status 0: no HTTP answer): tell the budget. */
static void
job_rate_done(RbrHttpBatch *b, RbrGradeJob *job, long status)
{
	if (!job->admitted)
		return;
	job->admitted = false;
	stat_throttled += status == 429;
	rbr_rate_done(&b->rate, GetCurrentTimestamp(), job->sent_at, status,
				  job->retry_after_ms, &job->rate_seen, job->rate_cost, -1);
}

/* Start one attempt of a job: ok, or the job ends with an error. */
static void
job_start(RbrHttpBatch *b, RbrGradeJob *job, MemoryContext bcxt)
{
	CURL	   *h;

	job_body(b, job, bcxt);
	job->retry_after_ms = -1;
	job->resp_too_big = false;
	job->errbuf[0] = '\0';
	rbr_rate_seen_reset(&job->rate_seen);
	job->sent_at = GetCurrentTimestamp();

	/* a handle of an earlier request keeps its shared options */
	h = b->nspare > 0 ? b->spare[--b->nspare] : easy_new(b);
	if (h == NULL)
	{
		job_rate_done(b, job, 0);
		job->done = true;
		job->result.error = pstrdup("could not create a libcurl handle (out of memory)");
		return;
	}
	job->easy = h;
	curl_easy_setopt(h, CURLOPT_POSTFIELDS, job->body);
	curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) strlen(job->body));
	curl_easy_setopt(h, CURLOPT_WRITEDATA, job);
	curl_easy_setopt(h, CURLOPT_HEADERDATA, job);
	curl_easy_setopt(h, CURLOPT_PRIVATE, job);
	curl_easy_setopt(h, CURLOPT_ERRORBUFFER, job->errbuf);
	if (curl_multi_add_handle(rbr_multi, h) != CURLM_OK)
	{
		job_rate_done(b, job, 0);
		job_release(job);
		job->done = true;
		job->result.error = pstrdup("could not add a request to the libcurl multi handle");
		return;
	}
	stat_requests++;
}

/* Backoff before retry number n (1-based): exponential with jitter, capped. */
static long
backoff_ms(int n)
{
	double		base = eng_retry_base_ms * pow(2.0, n - 1);

	base = Min(base, (double) RBR_MAX_BACKOFF_MS);
	return (long) (base * (0.5 + 0.5 * pg_prng_double(&pg_global_prng_state)));
}

/*
 * One attempt of a job finished: decide ok, retry or error.
 * Returns true if the job is to be retried (job->not_before set).
 */
static bool
job_finish(RbrHttpBatch *b, RbrGradeJob *job, CURLcode cc)
{
	long		status = 0;
	bool		retryable = false;
	bool		requeue_now = false;
	bool		final = false;
	char	   *reason = NULL;

	curl_easy_getinfo((CURL *) job->easy, CURLINFO_RESPONSE_CODE, &status);
	job_rate_done(b, job, cc == CURLE_OK ? status : 0);
	{
		long		version = 0;

		curl_easy_getinfo((CURL *) job->easy, CURLINFO_HTTP_VERSION, &version);
		stat_http2 += version == CURL_HTTP_VERSION_2_0;
	}
	/* the connection stays in the multi handle's pool, the handle in ours */
	curl_multi_remove_handle(rbr_multi, (CURL *) job->easy);
	if (b->nspare < b->maxspare)
		b->spare[b->nspare++] = (CURL *) job->easy;
	else
	{
		curl_easy_cleanup((CURL *) job->easy);
		stat_live_easy--;
	}
	job->easy = NULL;
	job->result.attempts++;

	if (cc != CURLE_OK)
	{
		if (job->resp_too_big)
			reason = psprintf("response larger than %d bytes", RBR_MAX_RESPONSE_BYTES);
		else
		{
			reason = psprintf("%s%s%s", curl_easy_strerror(cc),
							  job->errbuf[0] ? ": " : "", job->errbuf);
			retryable = curl_retryable(cc);
		}
	}
	else if (status == 200)
	{
		bool		parsed;

		job->result.retry = job->result.final = false;
		parsed = b->ep->read_answer(job->resp ? job->resp : "", job->resp_len,
									&job->result, &b->json);
		if (parsed)
		{
			if (job->result.prompt_tokens >= 0 && job->result.completion_tokens >= 0)
				rbr_rate_tokens(&b->rate, GetCurrentTimestamp(), job->rate_cost,
								job->result.prompt_tokens + job->result.completion_tokens);
			job_release(job);
			if (job->result.again)
			{
				/* the client asks the same question again (one sample per request) */
				job->result.again = false;
				if (job->body != NULL)
					pfree(job->body);
				job->body = NULL;
				job->not_before = 0;
				return true;
			}
			job->done = true;
			return false;
		}
		reason = job->result.error;
		/* a malformed or truncated 200 is a server fault like a 5xx */
		retryable = job->result.retry;
		final = job->result.final;
	}
	else
	{
		bool		retry_now = false;
		int			param_before = b->ep->token_param();

		reason = b->ep->classify_failure(status, job->resp, job->resp_len, job->body_param,
										 &retry_now, &final, &b->json);
		if (retry_now)
		{
			/* the client changed its request (a rejected parameter): resend */
			if (b->ep->token_param() != param_before)
				stat_param_switches++;
			if (job->body != NULL)
				pfree(job->body);
			job->body = NULL;
			requeue_now = job->result.attempts < 3;
		}
		else if (!final && (status == 408 || status == 409 || status == 429 || status >= 500))
			retryable = true;
	}
	job_release(job);

	if (requeue_now)
	{
		job->not_before = 0;
		job->result.error = NULL;
		return true;
	}
	if (retryable && job->retries < b->ep->max_retries)
	{
		long		wait = backoff_ms(job->retries + 1);

		if (job->retry_after_ms >= 0)
			wait = Max(wait, job->retry_after_ms);
		job->retries++;
		stat_retries++;
		job->not_before = GetCurrentTimestamp() + (int64) wait * 1000;
		return true;
	}
	job->done = true;
	job->result.ok = false;
	job->result.final = final;
	if (retryable)
		job->result.error = psprintf("%s (gave up after %d attempts)", reason, job->result.attempts);
	else
		job->result.error = reason;
	job->result.error = b->ep->scrub(job->result.error);
	return false;
}

/*
 * Forget a rate-limit slot booked under an earlier, slower setting: the next
 * start is at most one interval of the current setting away.
 */
static void
rate_reset(int64 now)
{
	if (eng_requests_per_second <= 0)
		rbr_next_slot = 0;
	else
		rbr_next_slot = Min(rbr_next_slot,
							now + (int64) (1000000.0 / eng_requests_per_second));
}

/*
 * May this job's attempt start now? Builds its body (its size estimates its
 * tokens), then asks this backend's rbr.grader_requests_per_second and the
 * endpoint's budget (ratelimit.c). 0: yes, it is counted; otherwise the
 * microseconds to wait before asking again.
 */
static int64
job_admit(RbrHttpBatch *b, RbrGradeJob *job, MemoryContext bcxt, int64 now)
{
	int64		wait;

	job_body(b, job, bcxt);
	if (eng_requests_per_second > 0 && now < rbr_next_slot)
		return rbr_next_slot - now;
	job->rate_cost = Max(1, (int) (strlen(job->body) / 4));
	wait = rbr_rate_admit(&b->rate, now, job->rate_cost);
	if (wait > 0)
		return wait;
	job->admitted = true;
	if (eng_requests_per_second > 0)
		rbr_next_slot = Max(rbr_next_slot, now) + (int64) (1000000.0 / eng_requests_per_second);
	return 0;
}

/*
 * The engine's loop over a batch set up by rbr_http_run(): start jobs (and
 * retries) while slots are free, poll, hand ended jobs to the feed.
 */
static void
http_loop(RbrHttpBatch *b, MemoryContext cxt, const RbrHttpFeed *feed, int max_in_flight)
{
	MemoryContext caller PG_USED_FOR_ASSERTS_ONLY = CurrentMemoryContext;
	RbrGradeJob *jobs = b->jobs;
	int			njobs = b->njobs;
	int		   *waiting = MemoryContextAlloc(cxt, sizeof(int) * njobs);
	int		   *ended = MemoryContextAlloc(cxt, sizeof(int) * njobs);
	int			nwaiting = 0;
	int			nended = 0;
	int			next_new = 0;
	int			ready = feed ? 0 : njobs;
	int			in_flight = 0;

	/* hand ended jobs back in groups, a few rounds of slots apart */
	int			ended_group = Max(16, Min(max_in_flight, 256));

	/* the error of a job that no other job can escape: nothing more is sent */
	const char *stop = NULL;

	/*
	 * Until one answer came back (or RBR_PROBE_MS passed), few requests are
	 * in flight: a bad key or an exhausted quota costs a few.
	 */
	bool		probed = false;
	int64		started = GetCurrentTimestamp();

	while ((next_new < njobs && stop == NULL) || in_flight > 0 || nwaiting > 0 || nended > 0)
	{
		int64		now = GetCurrentTimestamp();
		long		wait_ms = 100;
		int			running = 0;
		int			nmsg;
		int			finished = 0;
		int64		admit_wait = 0;	/* > 0: the budget said to wait this long (us) */
		CURLMsg    *msg;

		/* after a final error, retries waiting end with it */
		while (stop != NULL && nwaiting > 0)
		{
			RbrGradeJob *job = &jobs[waiting[--nwaiting]];

			job->done = true;
			job->result.ok = false;
			job->result.final = true;
			job->result.error = pstrdup(stop);
			ended[nended++] = job - jobs;
		}
		/* retries whose time has come, then new jobs */
		for (int w = 0; w < nwaiting && in_flight < max_in_flight && admit_wait == 0;)
		{
			RbrGradeJob *job = &jobs[waiting[w]];

			if (job->not_before <= now && (admit_wait = job_admit(b, job, cxt, now)) == 0)
			{
				waiting[w] = waiting[--nwaiting];
				job_start(b, job, cxt);
				if (job->done)
					ended[nended++] = job - jobs;
				else
					in_flight++;
			}
			else
				w++;
		}
		if (!probed && (now - started) >= (int64) RBR_PROBE_MS * 1000)
			probed = true;		/* slow answers: stop waiting for the first one */
		while (in_flight < (probed ? max_in_flight : Min(max_in_flight, RBR_PROBE_IN_FLIGHT)) &&
			   next_new < njobs && stop == NULL)
		{
			RbrGradeJob *job = &jobs[next_new];

			if (next_new >= ready)
			{
				/* in the caller's context: results outlive the batch */
				feed->prepare(feed->arg, &ready);
				Assert(ready > next_new);
				CHECK_FOR_INTERRUPTS();
				continue;
			}
			if (job->done)
			{
				next_new++;
				continue;
			}
			if (admit_wait > 0 || (admit_wait = job_admit(b, job, cxt, now)) > 0)
				break;
			next_new++;
			job_start(b, job, cxt);
			if (job->done)
				ended[nended++] = job - jobs;
			else
				in_flight++;
		}

		/* the slots are full again: store what ended meanwhile */
		if (feed != NULL && nended > 0 &&
			(nended >= ended_group || (in_flight == 0 && nwaiting == 0 && (next_new >= njobs || stop != NULL))))
		{
			Assert(CurrentMemoryContext == caller);
			feed->ended(feed->arg, ended, nended);
			nended = 0;
			CHECK_FOR_INTERRUPTS();
		}
		else if (feed == NULL)
			nended = 0;
		if (in_flight == 0 && nwaiting == 0 && (next_new >= njobs || stop != NULL) && nended == 0)
			break;

		curl_multi_perform(rbr_multi, &running);
		while ((msg = curl_multi_info_read(rbr_multi, &nmsg)) != NULL)
		{
			RbrGradeJob *job = NULL;

			if (msg->msg != CURLMSG_DONE)
				continue;
			curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &job);
			in_flight--;
			finished++;
			if (job_finish(b, job, msg->data.result))
				waiting[nwaiting++] = job - jobs;
			else
			{
				ended[nended++] = job - jobs;
				probed |= job->result.ok;
				if (job->result.ok)
					stat_ok++;
				else
					stat_errors++;
				if (!job->result.ok && job->result.final && stop == NULL)
				{
					stop = pstrdup(job->result.error);
					stat_stopped_batches++;
				}
				/* its request is not needed any more */
				if (job->body != NULL)
				{
					pfree(job->body);
					job->body = NULL;
				}
			}
		}
		if (finished > 0)
		{
			/* slots were freed: fill them now rather than after a poll */
			CHECK_FOR_INTERRUPTS();
			continue;
		}

		/* wake up in time for the next retry or rate-limit slot */
		now = GetCurrentTimestamp();
		for (int w = 0; w < nwaiting; w++)
		{
			/* a retry that is due waits for a free slot or the budget, not for its time */
			if (jobs[waiting[w]].not_before > now)
				wait_ms = Min(wait_ms, Max(1, (jobs[waiting[w]].not_before - now + 999) / 1000));
		}
		if (admit_wait > 0)
		{
			stat_rate_waits++;
			wait_ms = Min(wait_ms, Max(1, admit_wait / 1000));
		}
		if (in_flight > 0)
			curl_multi_poll(rbr_multi, NULL, 0, (int) wait_ms, NULL);
		else if (wait_ms > 0)
		{
			/* nothing in flight (waiting for a retry or the budget): a cancel wakes us */
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 wait_ms, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}
		CHECK_FOR_INTERRUPTS();
	}

	/* the jobs never sent after a final error end with it */
	for (int i = next_new; stop != NULL && i < njobs; i++)
		if (!jobs[i].done)
		{
			jobs[i].done = true;
			jobs[i].result.ok = false;
			jobs[i].result.final = true;
			jobs[i].result.error = psprintf("not sent: %s", stop);
		}
}

/*
 * Send every job that is not done yet, at most rbr.grader_max_in_flight at a
 * time, and wait until each has ended ('ok' or error). Results are in
 * jobs[i].result; strings are palloc'd in the current memory context.
 *
 * With a feed, jobs are made ready a window at a time by feed->prepare when
 * a slot is free and no ready job is left (it may end jobs itself, e.g. from
 * the cache), and ended jobs are handed to feed->ended in groups once the
 * freed slots are refilled, so that work overlaps with requests in flight.
 * Without one, every job is ready and nothing is handed back.
 */
void
rbr_http_run(const RbrEndpoint *ep, RbrGradeJob *jobs, int njobs, const RbrHttpFeed *feed)
{
	MemoryContext cxt;
	MemoryContextCallback *cb;
	RbrHttpBatch *b;
	int			max_in_flight = ep->max_in_flight;

	if (njobs == 0)
		return;

	http_init();
	/* a batch left behind by an ERROR whose context is not gone yet */
	if (rbr_active_batch != NULL)
		batch_cleanup(rbr_active_batch);
	eng_retry_base_ms = ep->retry_base_ms;
	eng_requests_per_second = ep->requests_per_second;
	rate_reset(GetCurrentTimestamp());

	cxt = AllocSetContextCreate(CurrentMemoryContext, "rbr grader batch",
								ALLOCSET_DEFAULT_SIZES);
	b = MemoryContextAllocZero(cxt, sizeof(RbrHttpBatch));
	b->ep = ep;
	b->jobs = jobs;
	b->njobs = njobs;
	rbr_rate_begin(&b->rate, ep->kind);
	b->maxspare = max_in_flight;
	b->spare = MemoryContextAllocZero(cxt, sizeof(CURL *) * max_in_flight);
	cb = MemoryContextAllocZero(cxt, sizeof(MemoryContextCallback));
	cb->func = batch_cleanup;
	cb->arg = b;
	MemoryContextRegisterResetCallback(cxt, cb);
	rbr_active_batch = b;
	stat_batches++;

	/*
	 * An ERROR anywhere in the loop (cancel, statement_timeout, out of
	 * memory, the feed's cache look-ups and writes) frees every handle at
	 * once, so that none stays attached to the multi handle even when the
	 * ERROR is caught by an EXCEPTION block and the batch's context lives on
	 * until the statement ends. The reset callback stays as a second line of
	 * defence (e.g. an ERROR in build_headers above).
	 */
	PG_TRY();
	{
		http_loop(b, cxt, feed, max_in_flight);
	}
	PG_CATCH();
	{
		batch_cleanup(b);
		PG_RE_THROW();
	}
	PG_END_TRY();

	batch_cleanup(b);
	MemoryContextDelete(cxt);
}

/* Counters of this backend's engine, as JSON object members. */
void
rbr_http_stats(StringInfo buf)
{
	curl_version_info_data *vi = curl_version_info(CURLVERSION_NOW);

	appendStringInfo(buf,
					 "\"libcurl\": \"%s\", \"async_dns\": %s, \"http2\": %s, "
					 "\"initialised\": %s, \"live_easy_handles\": " INT64_FORMAT
					 ", \"active_batch\": %s, \"batches\": " INT64_FORMAT
					 ", \"requests\": " INT64_FORMAT ", \"retries\": " INT64_FORMAT
					 ", \"ok\": " INT64_FORMAT ", \"errors\": " INT64_FORMAT
					 ", \"token_parameter_switches\": " INT64_FORMAT
					 ", \"http2_responses\": " INT64_FORMAT
					 ", \"stopped_batches\": " INT64_FORMAT
					 ", \"rate_budget\": \"%s\", \"rate_waits\": " INT64_FORMAT
					 ", \"throttled\": " INT64_FORMAT,
					 vi->version,
					 (vi->features & CURL_VERSION_ASYNCHDNS) ? "true" : "false",
					 (vi->features & CURL_VERSION_HTTP2) ? "true" : "false",
					 rbr_multi ? "true" : "false",
					 stat_live_easy, rbr_active_batch ? "true" : "false",
					 stat_batches, stat_requests, stat_retries, stat_ok, stat_errors,
					 stat_param_switches, stat_http2, stat_stopped_batches,
					 rbr_rate_shared() ? "cluster" : "session", stat_rate_waits, stat_throttled);
}

/* ---------------------------------------------------------------------------
 * One plain request (the Batch API's files and batches, batch.c)
 * ------------------------------------------------------------------------- */

/* What one plain request owns until it ends, freed on ERROR too. */
typedef struct RbrPlainRequest
{
	CURLM	   *multi;
	CURL	   *easy;
	curl_mime  *mime;
	struct curl_slist *headers;
	char	   *buf;			/* malloc'd answer */
	size_t		len;
	size_t		cap;
	size_t		max;
	bool		too_big;
	bool		cleaned;
} RbrPlainRequest;

/* Free the curl objects and buffer of a plain request (safe to call twice). */
static void
plain_cleanup(void *arg)
{
	RbrPlainRequest *r = (RbrPlainRequest *) arg;

	if (r->cleaned)
		return;
	if (r->easy != NULL)
	{
		if (r->multi != NULL)
			curl_multi_remove_handle(r->multi, r->easy);
		curl_easy_cleanup(r->easy);
	}
	if (r->multi != NULL)
		curl_multi_cleanup(r->multi);
	if (r->mime != NULL)
		curl_mime_free(r->mime);
	if (r->headers != NULL)
		curl_slist_free_all(r->headers);
	if (r->buf != NULL)
		free(r->buf);
	r->easy = NULL;
	r->multi = NULL;
	r->mime = NULL;
	r->headers = NULL;
	r->buf = NULL;
	r->cleaned = true;
}

/* libcurl write callback of a plain request: append, or stop past r->max. */
static size_t
plain_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	RbrPlainRequest *r = (RbrPlainRequest *) userdata;
	size_t		n = size * nmemb;

	if (r->len + n + 1 > r->max)
	{
		r->too_big = true;
		return 0;
	}
	if (r->len + n + 1 > r->cap)
	{
		size_t		cap = Max(r->cap * 2, Max(r->len + n + 1, (size_t) 65536));
		char	   *p;

		cap = Min(cap, r->max);
		p = realloc(r->buf, cap);
		if (p == NULL)
			return 0;
		r->buf = p;
		r->cap = cap;
	}
	memcpy(r->buf + r->len, ptr, n);
	r->len += n;
	r->buf[r->len] = '\0';
	return n;
}

/*
 * One request to url with the endpoint's credentials and headers (see
 * endpoint.h): GET without a body, POST of json_body, or (file_name set) a
 * multipart POST of purpose=batch and the file. Waits in 100 ms slices with
 * CHECK_FOR_INTERRUPTS(), so a cancel stops it at once; never ERRORs for a
 * transport failure (status 0 and its reason in reply->error). The answer
 * (at most max_bytes) is palloc'd in the caller's context.
 */
void
rbr_http_request(const RbrEndpoint *ep, const char *method, const char *url,
				 const char *json_body, const char *file_name, const char *file_data,
				 size_t file_len, size_t max_bytes, long timeout_ms, RbrHttpReply *reply)
{
	MemoryContext caller = CurrentMemoryContext;
	MemoryContext cxt = AllocSetContextCreate(CurrentMemoryContext, "rbr plain request",
											  ALLOCSET_SMALL_SIZES);
	MemoryContextCallback *cb;
	RbrPlainRequest *r;
	CURLcode	cc = CURLE_OK;
	char		errbuf[CURL_ERROR_SIZE];
	bool		done = false;

	http_init();
	memset(reply, 0, sizeof(*reply));
	MemoryContextSwitchTo(cxt);
	r = palloc0(sizeof(RbrPlainRequest));
	r->max = max_bytes + 1;
	cb = palloc0(sizeof(MemoryContextCallback));
	cb->func = plain_cleanup;
	cb->arg = r;
	MemoryContextRegisterResetCallback(cxt, cb);

	endpoint_headers(&r->headers, ep, json_body != NULL);
	r->multi = curl_multi_init();
	r->easy = curl_easy_init();
	if (r->multi == NULL || r->easy == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("could not create a libcurl handle")));
	errbuf[0] = '\0';
	curl_easy_setopt(r->easy, CURLOPT_URL, url);
	curl_easy_setopt(r->easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(r->easy, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(r->easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->headers);
	curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, plain_write_cb);
	curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, r);
	curl_easy_setopt(r->easy, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(r->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(r->easy, CURLOPT_CONNECTTIMEOUT_MS, Min(timeout_ms, 10000L));
	curl_easy_setopt(r->easy, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(r->easy, CURLOPT_USERAGENT, "rbr-postgresql/0.1");
	if (pg_strncasecmp(url, "https:", 6) == 0 && ep->ca_file != NULL && ep->ca_file[0] != '\0')
		curl_easy_setopt(r->easy, CURLOPT_CAINFO, ep->ca_file);
	if (file_name != NULL)
	{
		curl_mimepart *part;

		r->mime = curl_mime_init(r->easy);
		if (r->mime == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		part = curl_mime_addpart(r->mime);
		if (part == NULL || curl_mime_name(part, "purpose") != CURLE_OK ||
			curl_mime_data(part, "batch", CURL_ZERO_TERMINATED) != CURLE_OK)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		part = curl_mime_addpart(r->mime);
		if (part == NULL || curl_mime_name(part, "file") != CURLE_OK ||
			curl_mime_filename(part, file_name) != CURLE_OK ||
			curl_mime_type(part, "application/jsonl") != CURLE_OK ||
			curl_mime_data(part, file_data, file_len) != CURLE_OK)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		curl_easy_setopt(r->easy, CURLOPT_MIMEPOST, r->mime);
	}
	else if (json_body != NULL)
	{
		curl_easy_setopt(r->easy, CURLOPT_POST, 1L);
		curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, json_body);
		curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) strlen(json_body));
	}
	if (strcmp(method, "GET") != 0 && strcmp(method, "POST") != 0)
		curl_easy_setopt(r->easy, CURLOPT_CUSTOMREQUEST, method);
	else if (strcmp(method, "POST") == 0 && json_body == NULL && file_name == NULL)
	{
		curl_easy_setopt(r->easy, CURLOPT_POST, 1L);
		curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, "");
		curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) 0);
	}
	curl_multi_add_handle(r->multi, r->easy);
	stat_requests++;

	while (!done)
	{
		int			running = 0;
		int			nmsg;
		CURLMsg    *msg;

		curl_multi_perform(r->multi, &running);
		while ((msg = curl_multi_info_read(r->multi, &nmsg)) != NULL)
			if (msg->msg == CURLMSG_DONE)
			{
				cc = msg->data.result;
				done = true;
			}
		if (!done)
			curl_multi_poll(r->multi, NULL, 0, 100, NULL);
		CHECK_FOR_INTERRUPTS();
	}

	MemoryContextSwitchTo(caller);
	if (cc == CURLE_OK)
	{
		curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &reply->status);
		reply->len = r->len;
		reply->body = palloc_extended(r->len + 1, MCXT_ALLOC_HUGE);
		if (r->len > 0)
			memcpy(reply->body, r->buf, r->len);
		reply->body[r->len] = '\0';
		stat_ok++;
	}
	else
	{
		reply->status = 0;
		reply->error = r->too_big
			? psprintf("the answer is larger than %zu bytes", max_bytes)
			: psprintf("%s", errbuf[0] ? errbuf : curl_easy_strerror(cc));
		stat_errors++;
	}
	plain_cleanup(r);
	MemoryContextDelete(cxt);
}
