/* SPDX-License-Identifier: MIT */
/*
 * errors.c — names and messages for every qins error code: the project's QINS_ERR_MAP codes
 * (proto/qins_base.h, <= -1000, the ones that cross the wire) and negated errno values.
 */
#include <errno.h>
#include <string.h>

#include "qins_base.h"

const char *qins_err_name(int code) {
  switch (code) {
  case 0: return "OK";
#define QINS__ERR_NAME(name, val, msg) case val: return #name;
  QINS_ERR_MAP(QINS__ERR_NAME)
#undef QINS__ERR_NAME
  default: break;
  }
  if (code < 0 && code > -1000) {
    const char *n = strerrorname_np(-code);
    if (n) return n;
  }
  return "UNKNOWN";
}

const char *qins_strerror(int code) {
  switch (code) {
  case 0: return "ok";
#define QINS__ERR_MSG(name, val, msg) case val: return msg;
  QINS_ERR_MAP(QINS__ERR_MSG)
#undef QINS__ERR_MSG
  default: break;
  }
  if (code < 0 && code > -1000) {
    const char *d = strerrordesc_np(-code);
    if (d) return d;
  }
  return "unknown error";
}

unsigned qins_version(void) { return QINS_VERSION_HEX; }
