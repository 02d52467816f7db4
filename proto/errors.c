/* SPDX-License-Identifier: MIT */
/*
 * errors.c — names and messages for every qins error code: the project's QINS_ERR_MAP codes
 * (proto/qins_base.h, <= -1000, the ones that cross the wire) and negated errno values.
 */
#include <errno.h>
#include <string.h>

#include "qins_base.h"

/* The name (msg 0) or message (msg 1) of 0 or a QINS_ERR_MAP code; NULL for any other code. */
static const char *map_text(int code, int msg) {
  switch (code) {
  case 0: return msg ? "ok" : "OK";
#define QINS__ERR_TEXT(name, val, text) case val: return msg ? text : #name;
  QINS_ERR_MAP(QINS__ERR_TEXT)
#undef QINS__ERR_TEXT
  default: return NULL;
  }
}

const char *qins_err_name(int code) {
  const char *t = map_text(code, 0);
  if (!t && code < 0 && code > -1000) t = strerrorname_np(-code);
  return t ? t : "UNKNOWN";
}

const char *qins_strerror(int code) {
  const char *t = map_text(code, 1);
  if (!t && code < 0 && code > -1000) t = strerrordesc_np(-code);
  return t ? t : "unknown error";
}

unsigned qins_version(void) { return QINS_VERSION_HEX; }
