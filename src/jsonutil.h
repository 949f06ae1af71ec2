/*
 * jsonutil.h: small helpers to read jsonb documents (policy specs, options).
 */
#ifndef RBR_JSONUTIL_H
#define RBR_JSONUTIL_H

#include "postgres.h"

#include "utils/jsonb.h"

/* One (key, value) of an object container, as produced by rbr_obj_items(). */
typedef struct RbrJsonItem
{
	char	   *key;
	JsonbValue	value;
} RbrJsonItem;

/* Human name of a jsonb value's type, for error messages ("a string"). */
extern const char *rbr_jbv_type_name(JsonbValue *v);

/* True if v is a nested object / array container. */
extern bool rbr_jbv_is_object(JsonbValue *v);
extern bool rbr_jbv_is_array(JsonbValue *v);

/* Copy a jsonb string value into a NUL-terminated palloc'd string. */
extern char *rbr_jbv_cstring(JsonbValue *v);

/* All (key, value) pairs of an object container, in jsonb key order. */
extern RbrJsonItem *rbr_obj_items(JsonbContainer *c, int *n);

/* All elements of an array container. */
extern JsonbValue *rbr_arr_items(JsonbContainer *c, int *n);

/* The value of key in an object container, or NULL. */
extern JsonbValue *rbr_obj_get(JsonbContainer *c, const char *key);

/*
 * The longest prefix of s (len bytes) of at most limit bytes that ends at a
 * character boundary of the database encoding: where to cut text for a message.
 */
extern int	rbr_clip_len(const char *s, int len, int limit);

#endif							/* RBR_JSONUTIL_H */
