/*
 * secrets.h: where requests go and with which key. The endpoint-location and
 * credential settings of the grader and the generator (rbr.*_url,
 * rbr.*_api_key, rbr.*_api_key_file, rbr.*_extra_headers,
 * rbr.*_azure_api_version, rbr.*_ca_file), the sources a key may come from
 * (key file, the inline setting under preload, the server's environment) and
 * rbr_check_setup().
 */
#ifndef RBR_SECRETS_H
#define RBR_SECRETS_H

#include "postgres.h"

/* Raw values of the non-secret settings (cache.c reads the Azure one). */
extern char *rbr_grader_azure_api_version;
extern char *rbr_generator_azure_api_version;

/* Is rbr in shared_preload_libraries (detected in _PG_init)? */
extern bool rbr_preloaded;

/* Define the settings. Called from _PG_init. */
extern void rbr_secrets_init_settings(bool preloading);

struct RbrEndpoint;

/*
 * Start an endpoint of ep->kind: azure_api_version and ca_file from the
 * settings; url, api_key and extra_headers NULL until rbr_secrets_resolve(),
 * which the engine calls before its first request (a batch answered from
 * the cache needs no endpoint).
 */
extern void rbr_secrets_endpoint(struct RbrEndpoint *ep);

/*
 * Fill url, api_key, azure_api_version, extra_headers and ca_file; ERROR
 * (never echoing a secret) when the URL is not configured or the key or
 * headers come from a place rbr refuses.
 */
extern void rbr_secrets_resolve(struct RbrEndpoint *ep);

/* Add every key known in this backend to out[] (for scrubbing messages). */
extern int	rbr_secrets_known(const char **out, int max);

/* The raw extra headers setting of an endpoint kind (for scrubbing). */
extern const char *rbr_secrets_headers(int kind);

#endif							/* RBR_SECRETS_H */
