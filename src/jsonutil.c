/*
 * jsonutil.c: small helpers to read jsonb documents (policy specs, options).
 */
#include "postgres.h"

#include "mb/pg_wchar.h"
#include "miscadmin.h"

#include "jsonutil.h"

/* Human name of a jsonb value's type, for error messages. */
const char *
rbr_jbv_type_name(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvNull:
			return "null";
		case jbvString:
			return "a string";
		case jbvNumeric:
			return "a number";
		case jbvBool:
			return "a boolean";
		case jbvBinary:
			return JsonContainerIsArray(v->val.binary.data) ? "an array" : "an object";
		default:
			return "a container";
	}
}

/* True if v is a jsonb object (as a nested container). */
bool
rbr_jbv_is_object(JsonbValue *v)
{
	return v->type == jbvBinary && JsonContainerIsObject(v->val.binary.data);
}

/* True if v is a jsonb array (as a nested container). */
bool
rbr_jbv_is_array(JsonbValue *v)
{
	return v->type == jbvBinary && JsonContainerIsArray(v->val.binary.data) &&
		!JsonContainerIsScalar(v->val.binary.data);
}

/* Copy a jsonb string value into a NUL-terminated palloc'd string. */
char *
rbr_jbv_cstring(JsonbValue *v)
{
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/* All (key, value) pairs of an object container, in jsonb key order. */
RbrJsonItem *
rbr_obj_items(JsonbContainer *c, int *n)
{
	JsonbIterator *it = JsonbIteratorInit(c);
	JsonbValue	v;
	JsonbIteratorToken tok;
	RbrJsonItem   *items = palloc0(sizeof(RbrJsonItem) * (JsonContainerSize(c) + 1));
	int			count = 0;
	char	   *key = NULL;

	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		CHECK_FOR_INTERRUPTS();
		if (tok == WJB_KEY)
			key = rbr_jbv_cstring(&v);
		else if (tok == WJB_VALUE)
		{
			items[count].key = key;
			items[count].value = v;
			count++;
		}
	}
	*n = count;
	return items;
}

/* All elements of an array container. */
JsonbValue *
rbr_arr_items(JsonbContainer *c, int *n)
{
	JsonbIterator *it = JsonbIteratorInit(c);
	JsonbValue	v;
	JsonbIteratorToken tok;
	JsonbValue *items = palloc0(sizeof(JsonbValue) * (JsonContainerSize(c) + 1));
	int			count = 0;

	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		CHECK_FOR_INTERRUPTS();
		if (tok == WJB_ELEM)
			items[count++] = v;
	}
	*n = count;
	return items;
}

/* The value of key in an object container, or NULL. */
JsonbValue *
rbr_obj_get(JsonbContainer *c, const char *key)
{
	return getKeyJsonValueFromContainer(c, key, strlen(key), NULL);
}


/*
 * The longest prefix of s (len bytes) of at most limit bytes that ends at a
 * character boundary of the database encoding; a character cut by len itself
 * is left out too.
 */
int
rbr_clip_len(const char *s, int len, int limit)
{
	if (len <= 0 || limit <= 0)
		return 0;
	return pg_mbcliplen(s, len, Min(len, limit));
}
