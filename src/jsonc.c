/*
 * jsonc.c: the strict json-c parse and member look-up that the grader
 * (grader.c) and batch mode (batch.c) share.
 */
#include "postgres.h"

#include "jsonc.h"

/* Parse JSON text strictly (one value, valid UTF-8); NULL otherwise. */
json_object *
rbr_jsonc_parse(const char *text, size_t len)
{
	json_tokener *tok;
	json_object *root;

	if (text == NULL || len == 0)
		return NULL;
	tok = json_tokener_new();
	if (tok == NULL)
		return NULL;
	json_tokener_set_flags(tok, JSON_TOKENER_VALIDATE_UTF8);
	root = json_tokener_parse_ex(tok, text, (int) len);
	if (root != NULL && json_tokener_get_error(tok) != json_tokener_success)
	{
		json_object_put(root);
		root = NULL;
	}
	json_tokener_free(tok);
	return root;
}

/* Member of a json-c object, or NULL. */
json_object *
rbr_jsonc_get(json_object *o, const char *key)
{
	json_object *v = NULL;

	if (o == NULL || !json_object_is_type(o, json_type_object))
		return NULL;
	return json_object_object_get_ex(o, key, &v) ? v : NULL;
}
