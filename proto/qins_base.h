/* SPDX-License-Identifier: MIT */
/*
 * qins_base.h — what every module and the public API share: the version, the shape and name
 * limits and the error map. QINS_ERR_MAP(X) (NAME, value, message) generates the qins_err enum
 * here and qins_err_name() / qins_strerror() in proto/errors.c. 0 means OK; project codes are <= -1000,
 * stable and append-only (they cross the wire, docs/PROTOCOL.md §3); a local negative errno may
 * pass through, and both functions handle it. Installed beside client/qins.h, which includes it;
 * includes nothing of the project's, so proto/ depends on nothing.
 */
#ifndef QINS_BASE_H
#define QINS_BASE_H

#ifdef __cplusplus
extern "C" {
#endif

#ifndef QINS_EXTERN
#define QINS_EXTERN __attribute__((visibility("default")))
#endif

#define QINS_VERSION_MAJOR 0
#define QINS_VERSION_MINOR 1
#define QINS_VERSION_PATCH 0
#define QINS_VERSION_HEX ((QINS_VERSION_MAJOR << 16) | (QINS_VERSION_MINOR << 8) | QINS_VERSION_PATCH)
#define QINS_VERSION_STRING "0.1.0"

/* Error codes: NAME, value, message. Append-only; values are never reused (they cross the wire). */
#define QINS_ERR_MAP(X)                                                                      \
  X(PROTO,          -1000, "malformed request")                                              \
  X(TOO_LARGE,      -1001, "request exceeds the size limit")                                  \
  X(UNKNOWN_METHOD, -1002, "unknown method")                                                  \
  X(BAD_PARAMS,     -1003, "missing or ill-typed parameter")                                  \
  X(NO_MODEL,       -1004, "no such model")                                                   \
  X(NO_TENSOR,      -1005, "no such tensor")                                                  \
  X(BAD_SLICE,      -1006, "bad slice (out of range, reversed or too many ranges)")          \
  X(RESPONSE_TOO_LARGE, -1007, "response exceeds the size limit: request a slice")            \
  X(DENIED,         -1008, "permission denied")                                               \
  X(BUSY,           -1009, "too many connections")                                            \
  X(CHECKSUM,       -1010, "stored data failed its checksum")                                 \
  X(CORRUPT,        -1011, "stored record is malformed")                                      \
  X(NONFINITE,      -1012, "NaN or infinity in a tensor bound for a lossy codec")             \
  X(FORMAT,         -1013, "malformed input file")                                            \
  X(UNSUPPORTED,    -1014, "unsupported")                                                     \
  X(STORE_FULL,     -1015, "the store is out of space")                                       \
  X(NAME,           -1016, "bad or too long name")                                            \
  X(SHUTDOWN,       -1017, "the server is shutting down")                                     \
  X(INTERNAL,       -1018, "internal error")                                                  \
  X(NOMEM,          -1019, "out of memory")                                                   \
  X(IO,             -1020, "I/O error")                                                       \
  X(TIMEOUT,        -1021, "timed out")                                                       \
  X(CLOSED,         -1022, "connection closed")                                               \
  X(DTYPE,          -1023, "unsupported dtype")                                               \
  X(INVALID,        -1024, "invalid argument")                                                \
  X(BUFFER,         -1025, "buffer too small")                                                \
  X(VERSION,        -1026, "unsupported format or protocol version")                          \
  X(LOCKED,         -1027, "the store is locked by another writer")                          \
  X(ARENA_FULL,     -1028, "the arena cannot hold this now: use get")

typedef enum qins_err {
  QINS_OK = 0,
#define QINS__ERR_ENUM(name, val, msg) QINS_E##name = (val),
  QINS_ERR_MAP(QINS__ERR_ENUM)
#undef QINS__ERR_ENUM
} qins_err;

/* "PROTO", "NO_TENSOR", ... for project codes; "ENOENT"-style for errno values; never NULL. */
QINS_EXTERN const char *qins_err_name(int code);
/* A human message for any code (project or negated errno); never NULL. */
QINS_EXTERN const char *qins_strerror(int code);
QINS_EXTERN unsigned qins_version(void); /* QINS_VERSION_HEX of the library */

#define QINS_MAX_NDIM 8 /* tensors have at most this many dimensions (and slices ranges) */
#define QINS_MAX_NAME 256 /* model and tensor names: bytes, NUL excluded (LMDB keys <= 511) */

#ifdef __cplusplus
}
#endif

#endif /* QINS_BASE_H */
