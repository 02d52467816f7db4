/* SPDX-License-Identifier: MIT */
/*
 * json.h — a small strict JSON (RFC 8259) parser building a DOM (qs_json_), plus string escaping for
 * writers. Used for safetensors headers, model.safetensors.index.json, test vectors and qinsctl's
 * --json output.
 *
 * Strictness (input is hostile): the whole input must be one JSON value with optional surrounding
 * whitespace; strings must be valid UTF-8 (no overlong forms, no surrogates, <= U+10FFFF) with no raw
 * control characters; \u escapes are decoded, surrogate pairs combined and lone surrogates
 * rejected; numbers follow the JSON grammar exactly (no leading zeros, no NaN/Infinity, no '+');
 * duplicate keys in one object are rejected; nesting depth is bounded (QS_JSON_MAX_DEPTH).
 * Memory is O(input size): every node comes from at least one input byte.
 *
 * Errors: QINS_EFORMAT with a message "byte OFFSET: what is wrong" in the caller's err buffer;
 * QINS_ENOMEM when allocation fails.
 */
#ifndef QINS_STORE_JSON_H
#define QINS_STORE_JSON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define QS_JSON_MAX_DEPTH 64 /* nesting bound: deep enough for any header we read, bounds recursion */

typedef enum qs_json_type {
  QS_JSON_NULL = 0,
  QS_JSON_BOOL,
  QS_JSON_NUMBER,
  QS_JSON_STRING,
  QS_JSON_ARRAY,
  QS_JSON_OBJECT
} qs_json_type;

/* Number flags (qs_json.num_flags). */
enum {
  QS_JSON_INTEGRAL = 1, /* written without fraction or exponent */
  QS_JSON_IS_I64 = 2,   /* integral and fits int64: .i64 exact */
  QS_JSON_IS_U64 = 4    /* integral, non-negative and fits uint64: .u64 exact */
};

typedef struct qs_json qs_json;
struct qs_json {
  qs_json_type type;  /* which of the fields below are meaningful */
  size_t offset;      /* byte offset of the value in the input (object members: of their key) */
  const char *key;    /* member of an object: its key (NUL-terminated; may hold NUL via \u0000) */
  size_t key_len;     /* key length in bytes */
  int boolean;        /* QS_JSON_BOOL: 0 or 1 */
  double num;         /* QS_JSON_NUMBER: value as double (nearest) */
  int64_t i64;        /* QS_JSON_NUMBER with QS_JSON_IS_I64 */
  uint64_t u64;       /* QS_JSON_NUMBER with QS_JSON_IS_U64 */
  int num_flags;      /* QS_JSON_INTEGRAL | QS_JSON_IS_I64 | QS_JSON_IS_U64 */
  char *str;          /* QS_JSON_STRING: decoded UTF-8, NUL-terminated (may hold NUL: use len) */
  size_t len;         /* QS_JSON_STRING: bytes; ARRAY/OBJECT: number of items */
  qs_json *items;     /* ARRAY/OBJECT: items in input order (objects: each with key set) */
  size_t *sorted;     /* OBJECT: indexes of items sorted by key (for qs_json_get) */
};

/* Parses len bytes at text (need not be NUL-terminated). On success *out is the root, owned by the
 * caller (qs_json_free). On failure returns QINS_EFORMAT (err gets "byte N: reason") or
 * QINS_ENOMEM; *out is NULL. err may be NULL. */
int qs_json_parse(const char *text, size_t len, qs_json **out /* out; qs_json_free */, char *err,
                  size_t errlen);
void qs_json_free(qs_json *v);

/* Member `key` of object obj, or NULL (absent, or obj NULL or not an object). O(log n). The pointer
 * lives as long as the root. */
const qs_json *qs_json_get(const qs_json *obj, const char *key);
/* Item i of an array or object, or NULL when out of range / not a container. */
const qs_json *qs_json_at(const qs_json *v, size_t i);
/* "null", "bool", "number", "string", "array", "object". */
const char *qs_json_type_name(qs_json_type t);


#endif /* QINS_STORE_JSON_H */
