/*
 * jsonc.h: reading answers with json-c, the same way everywhere they arrive
 * (the grader's and generator's answers, Batch API replies and output lines).
 */
#ifndef RBR_JSONC_H
#define RBR_JSONC_H

#include <stddef.h>

#include <json-c/json.h>

/*
 * Parse len bytes of JSON text; NULL if it is not one JSON value or not valid
 * UTF-8 (invalid UTF-8 must never reach SQL text). The caller puts the result.
 */
extern json_object *rbr_jsonc_parse(const char *text, size_t len);

/* Member key of a json-c object, or NULL (also when o is not an object). */
extern json_object *rbr_jsonc_get(json_object *o, const char *key);

#endif							/* RBR_JSONC_H */
