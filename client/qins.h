/* SPDX-License-Identifier: MIT */
/*
 * qins.h — the public C API of libqins, the client library inference workers link to fetch
 * decoded weights from qinsd. Installed with qins_base.h (proto/: the version and the error map,
 * shared with the daemon and the store), which it includes.
 *
 * Design: one blocking connection per thread (a qins_client is not thread-safe); every call is
 * one msgpack-RPC round trip on the Unix socket (docs/PROTOCOL.md). Payloads of `get` are read
 * from the socket straight into the caller's buffer: no intermediate copy.
 *
 * Errors: every function returns 0 or a negative code. Codes in QINS_ERR_MAP (qins_base.h) are
 * the project's (<= -1000), stable and append-only; they are also the codes that cross the wire.
 * Other negative values are negated errno values passed through (-ENOENT, -ECONNREFUSED, ...).
 * qins_strerror() names both; qins_client_error() gives the last call's full message (the
 * server's text included). A lost connection is repaired inside the call (qins_set_retry): the
 * caller sees QINS_ECLOSED only once the retry budget is spent.
 */
#ifndef QINS_H
#define QINS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QINS_EXTERN __attribute__((visibility("default")))

/* The version, the error map (QINS_ERR_MAP, qins_err, qins_err_name, qins_strerror) and
 * qins_version: shared with the daemon and the store, installed beside this header. */
#include "qins_base.h"

/* Output dtypes of decoded data. Values match the wire names "f32", "f16", "bf16". */
typedef enum qins_dtype { QINS_F32 = 0, QINS_F16 = 1, QINS_BF16 = 2 } qins_dtype;

/* One [start, stop) range on one dimension. */
typedef struct qins_range {
  uint64_t start; /* first index, inclusive */
  uint64_t stop;  /* last index, exclusive; start <= stop <= dim */
} qins_range;

/* What the server knows of one stored tensor (method `info`, `list`). */
typedef struct qins_tensor_info {
  char name[QINS_MAX_NAME + 1];  /* tensor name */
  char codec[16];                /* "qins8", "qins16", "f32", ... */
  char src_dtype[8];             /* dtype it was imported from: "f32", "f16", "bf16", ... */
  int ndim;                      /* 0..QINS_MAX_NDIM */
  uint64_t shape[QINS_MAX_NDIM]; /* row-major shape */
  uint64_t n_elem;               /* product of shape (1 for a scalar) */
  uint64_t src_bytes;            /* bytes in the source file */
  uint64_t stored_bytes;         /* bytes in the store, codec parameters included */
  double snr_db;                 /* measured at import; +inf for lossless */
} qins_tensor_info;

typedef struct qins_client qins_client;

/* Connects to qinsd at `socket_path`, waiting at most timeout_ms (<= 0: 5000) for the connection
 * and the `hello` exchange. *out is owned by the caller; free with qins_close (NULL is fine).
 * The path is kept: later calls reconnect to it (qins_set_retry). */
QINS_EXTERN int qins_connect(qins_client **out, const char *socket_path, int timeout_ms);
QINS_EXTERN void qins_close(qins_client *c);
/* Message of the last failed call on c ("" if none). Valid until the next call on c. */
QINS_EXTERN const char *qins_client_error(const qins_client *c);
/* Per-call timeout for later calls (ms; <= 0 waits forever). A call that times out returns
 * QINS_ETIMEOUT and closes the connection (the next call reconnects); it is not retried. */
QINS_EXTERN void qins_set_timeout(qins_client *c, int timeout_ms);

/* Reconnecting (docs/client.md §1.1). When a call finds its connection lost — the daemon closed it
 * (EOF), reset it, EPIPE, a SHUTDOWN answer, or the connection was already closed by an earlier
 * failure — the library reconnects to the same path (connect + hello, the limits of qins_server
 * re-read) and sends the call again whole: every method but qins_shutdown is a read, so an
 * interrupted call is simply repeated (maps re-attach first: "The arena" below; qins_release is
 * not retried: a lost connection ends its leases). Attempts are spaced 5 ms, 10 ms, ... up to 200 ms apart
 * (a daemon that comes back is found within 200 ms) while connect fails with ENOENT, ECONNREFUSED,
 * EAGAIN or BUSY, for at most the retry budget, counted from the call's first loss; the budget
 * also bounds each attempt's connect and hello. When it is spent the call returns QINS_ECLOSED and
 * qins_client_error names the socket, the budget and the last failure ("get: lost the connection
 * to /run/qinsd/qins.sock (ECLOSED) and could not reconnect within the 5000 ms retry budget (31
 * attempts, last: ENOENT)"). A failure no restart explains (EACCES, DENIED, VERSION) ends the
 * call at once with its own code. A payload cut short twice in one call (what the daemon does when
 * a streamed chunk fails its checksum, PROTOCOL.md §4.6) returns QINS_ECLOSED without spending the
 * budget. Failures of the server's own (NO_TENSOR, ...), timeouts and malformed answers are never
 * retried. qins_connect itself does not retry: a missing daemon at start is reported at once.
 *
 * The budget is $QINS_RETRY_MS when set at qins_connect (a decimal number of ms), else 5000;
 * qins_set_retry changes it (ms; 0 turns reconnecting off: a lost connection is then reported at
 * once, as QINS_ECLOSED or a negated errno; < 0: the default). */
QINS_EXTERN void qins_set_retry(qins_client *c, int budget_ms);

/* Called on c after each reconnect, before the interrupted call is sent again: the place to
 * restore per-connection state on the new daemon (the arena needs nothing here: the next map
 * re-attaches by itself). Calls on
 * c inside it work but do not themselves reconnect. A nonzero return fails the interrupted call
 * with that code. fn NULL removes it. */
typedef int (*qins_reconnect_fn)(qins_client *c, void *ud);
QINS_EXTERN void qins_set_reconnect_cb(qins_client *c, qins_reconnect_fn fn, void *ud);

/* Counters of c's connection, for the worker to log. */
typedef struct qins_conn_stats {
  uint64_t generation;    /* 1 after qins_connect, +1 per reconnect: which connection is live */
  uint64_t reconnects;    /* successful reconnects */
  uint64_t retried_calls; /* calls sent again after a reconnect */
  uint64_t budgets_spent; /* calls that failed because no reconnect succeeded within the budget */
  uint64_t reattaches;    /* arena attaches redone by a map after a reconnect */
  uint64_t old_mappings;  /* arena mappings of earlier connections still mapped (leases held) */
} qins_conn_stats;
QINS_EXTERN void qins_client_stats(const qins_client *c, qins_conn_stats *out /* out */);

QINS_EXTERN int qins_ping(qins_client *c);

/* Metadata of one tensor. */
QINS_EXTERN int qins_info(qins_client *c, const char *model, const char *name,
                          qins_tensor_info *out /* out */);

/* Decodes tensor `name` of `model`, or the hyperslab given by `slice` (nslice ranges, one per
 * leading dimension; dimensions past nslice are whole; slice may be NULL with nslice 0), as dtype
 * `dt` into buf (buf_bytes long). The payload is read straight into buf. On success *out_bytes
 * (may be NULL) is the payload size, and shape_out/ndim_out (may be NULL) the slice's shape.
 * QINS_EBUFFER if buf_bytes is smaller than the payload (the connection stays usable). */
QINS_EXTERN int qins_get_into(qins_client *c, const char *model, const char *name,
                              const qins_range *slice, int nslice, qins_dtype dt, void *buf,
                              size_t buf_bytes, size_t *out_bytes /* out */,
                              uint64_t shape_out[QINS_MAX_NDIM] /* out */, int *ndim_out /* out */);

/* As qins_get_into, into a buffer allocated by the library (64-byte aligned), which the caller
 * frees with qins_free. */
QINS_EXTERN int qins_get(qins_client *c, const char *model, const char *name,
                         const qins_range *slice, int nslice, qins_dtype dt, void **out /* out */,
                         size_t *out_bytes /* out */, uint64_t shape_out[QINS_MAX_NDIM] /* out */,
                         int *ndim_out /* out */);
QINS_EXTERN void qins_free(void *p);

/* What the server said in `hello` (docs/PROTOCOL.md §4.1), kept from the connect. Valid while c
 * lives. */
typedef struct qins_server_info {
  unsigned protocol;           /* wire protocol version (1) */
  char server[64];             /* "qinsd 0.1.0" */
  uint64_t max_request_bytes;  /* requests above this are refused */
  uint64_t max_response_bytes; /* answers above this are refused: ask for a slice */
  uint64_t max_connections;    /* connections the daemon accepts at once */
  uint64_t max_ranges;         /* slice ranges per request */
} qins_server_info;
QINS_EXTERN const qins_server_info *qins_server(const qins_client *c);

/* One tensor of a get_many into caller buffers. The caller fills name, buf and buf_bytes; the call
 * fills the rest. */
typedef struct qins_get_req {
  const char *name;              /* in: tensor name */
  void *buf;                     /* in: where the payload goes (read straight into it) */
  size_t buf_bytes;              /* in: its size */
  size_t out_bytes;              /* out: payload bytes written */
  int ndim;                      /* out: dimensions */
  uint64_t shape[QINS_MAX_NDIM]; /* out: shape */
} qins_get_req;

/* Fetches n tensors of `model` in one round trip (method get_many), each straight into its
 * request's buffer. QINS_EBUFFER if any buffer is too small (that tensor's payload is discarded,
 * the others are still filled; the connection stays usable). */
QINS_EXTERN int qins_get_many_into(qins_client *c, const char *model, qins_get_req *reqs, int n,
                                   qins_dtype dt);

/* A tensor fetched into library memory (qins_get_many). */
typedef struct qins_tensor {
  char name[QINS_MAX_NAME + 1];  /* tensor name */
  char dtype[8];                 /* "f32", "f16", "bf16" */
  int ndim;                      /* dimensions */
  uint64_t shape[QINS_MAX_NDIM]; /* shape */
  void *data;                    /* payload, 64-byte aligned; freed by qins_tensors_free */
  size_t bytes;                  /* payload bytes */
} qins_tensor;

/* Fetches the tensors named in names[0..n_names) or, when names is NULL, every tensor whose name
 * starts with prefix (one whole layer: "layers.3."), in one round trip. *out (an array of *n_out)
 * is owned by the caller: free it with qins_tensors_free(*out, *n_out). */
QINS_EXTERN int qins_get_many(qins_client *c, const char *model, const char *const *names,
                              int n_names, const char *prefix, qins_dtype dt,
                              qins_tensor **out /* out */, size_t *n_out /* out */);
QINS_EXTERN void qins_tensors_free(qins_tensor *t, size_t n);

/* One model as listed by the server (method `models`). */
typedef struct qins_model_info {
  char name[QINS_MAX_NAME + 1]; /* model name */
  uint64_t tensors;             /* tensor count */
  uint64_t n_elem;              /* total elements */
  uint64_t src_bytes;           /* bytes of the imported source tensors */
  uint64_t stored_bytes;        /* bytes in the store */
  int64_t created;              /* unix seconds of import */
  char *metadata;               /* the model's metadata as JSON text, or NULL when the server sends
                                   none (qinsd does not: see qins_model_metadata); lives in the
                                   same allocation */
} qins_model_info;

/* Every model, in name order. *out is one allocation owned by the caller (qins_free). */
QINS_EXTERN int qins_models(qins_client *c, qins_model_info **out /* out */,
                            size_t *n_out /* out */);

/* Tensors of `model` whose name starts with prefix (NULL: all), in name order, from offset, at most
 * limit of them (0: the server's default). *total (may be NULL) is the number that match. *out is
 * owned by the caller (qins_free). */
QINS_EXTERN int qins_list(qins_client *c, const char *model, const char *prefix, uint64_t offset,
                          uint64_t limit, qins_tensor_info **out /* out */,
                          size_t *n_out /* out */, uint64_t *total /* out */);

/* The server's counters (method `stats`) as one JSON object text, NUL-terminated, owned by the
 * caller (qins_free). */
QINS_EXTERN int qins_stats(qins_client *c, char **json /* out */);

/* One page of a model's metadata (method model_info, docs/PROTOCOL.md §4.14) as the JSON text of
 * the server's answer: with key NULL, {"model", "metadata": {members}, "gguf_version"?, "total",
 * "offset", "entries": [[key, type, value], ...]} for entries [offset, offset + limit); with key,
 * {"model", "key", "type", "total", "offset", "values": [...]}: elements of that array entry.
 * limit 0: the server's default. Each answer is bounded by max_response_bytes: fewer entries than
 * asked may come. *json is NUL-terminated and owned by the caller (qins_free). */
QINS_EXTERN int qins_model_info_page(qins_client *c, const char *model, const char *key,
                                     uint64_t offset, uint64_t limit, char **json /* out */);
/* The whole metadata of `model` as the store keeps it (docs/FORMAT.md §2.3.1), read page by page:
 * one JSON object text with the members, "gguf": {"version", "kv": [...]} and "hf": {...}. An
 * array too large for one answer stays [key, type, null, count] (its elements: qins_model_info
 * with key). A model without metadata gives "{}". *json is owned by the caller (qins_free). */
QINS_EXTERN int qins_model_metadata(qins_client *c, const char *model, char **json /* out */);
/* Asks the daemon to stop (admin: the daemon's own uid or root; else QINS_EDENIED). */
QINS_EXTERN int qins_shutdown(qins_client *c);

/* ---- The arena: decoded weights mapped read-only, shared by every worker of the host ----------
 * (docs/PROTOCOL.md §4.10-4.13, docs/client.md "The arena"). qins_attach receives the daemon's
 * arena (a sealed memfd, passed with the answer) and maps it PROT_READ, MAP_SHARED once for this
 * connection (the fd is closed right after). qins_map then asks the daemon to decode a tensor or
 * hyperslab into the arena (or finds it there, decoded by any worker) and returns a pointer into
 * the mapping: no copy, no private FP32. The bytes are pinned by a lease until qins_release (or
 * the connection closes): they never move or change meanwhile, even if the model is replaced.
 * The mapping stays readable after the daemon dies; qins_close unmaps it (every pointer from
 * qins_map dies then). Errors: QINS_EARENA_FULL when the arena cannot hold the tensor now (all
 * space leased, larger than the arena, or this connection's lease limit): fall back to qins_get;
 * QINS_EUNSUPPORTED when the daemon runs without an arena.
 *
 * Across a daemon restart (docs/client.md §1.1): attach, map and map_many are retried whole
 * within the retry budget, like get. The first map after a reconnect re-attaches first (the new
 * daemon's arena, a new mapping; qins_conn_stats.reattaches counts it): attaching is lazy, so a
 * client that only gets after a restart never maps the new arena, and a successor without an arena
 * fails maps (QINS_EUNSUPPORTED), never gets. A pointer obtained before the restart stays
 * readable with the same bytes for as long as its lease is held: its mapping of the old arena is
 * kept (qins_conn_stats.old_mappings) until the last of its leases is released, then unmapped (or
 * at qins_close). Its lease ended with the old connection, so releasing it is local: nothing is
 * sent, and no lease of the new daemon (which numbers its leases anew) can be hit. A connection
 * lost to the same daemon (a call timeout, idle-timeout-ms) ends its leases too: the old pointers
 * then stay readable but their bytes are no longer pinned (the daemon may reuse the space): map
 * again rather than keep reading them. */
QINS_EXTERN int qins_attach(qins_client *c, uint64_t *arena_bytes /* out; may be NULL */);

/* One mapped tensor. data is read-only (writing it faults) and valid until its lease is released
 * or the client closed. */
typedef struct qins_mapped {
  const void *data;              /* the decoded bytes, in the arena mapping (64-byte aligned) */
  size_t bytes;                  /* their length */
  uint64_t lease;                /* pass to qins_release: the library's handle, unique in the
                                    process (not the daemon's id, which a restart reuses) */
  uint64_t offset;               /* data's offset in the arena */
  char dtype[8];                 /* "f32", "f16", "bf16" (or a raw tensor's own dtype) */
  int ndim;                      /* dimensions */
  uint64_t shape[QINS_MAX_NDIM]; /* shape */
} qins_mapped;

/* Maps tensor `name` of `model` (or the hyperslab `slice`, as qins_get_into) as dtype dt. */
QINS_EXTERN int qins_map(qins_client *c, const char *model, const char *name,
                         const qins_range *slice, int nslice, qins_dtype dt,
                         qins_mapped *out /* out */);
/* Maps n whole tensors of `model` in one round trip (method map_many); out[i] for names[i]. All or
 * nothing: on an error no lease is held. */
QINS_EXTERN int qins_map_many(qins_client *c, const char *model, const char *const *names, int n,
                              qins_dtype dt, qins_mapped *out /* out: n entries */);
/* Releases n leases: those of the live connection in one round trip, those of an earlier
 * connection (before a reconnect) locally, any mix in one call. When the connection is lost under
 * the release, its leases ended with it: 0. QINS_EBAD_PARAMS naming a lease this client does not
 * hold (unknown, already released, another client's, or listed twice); the others are still
 * released. Do not read a released lease's bytes again; an earlier connection's mapping is
 * unmapped with its last lease. */
QINS_EXTERN int qins_release(qins_client *c, const uint64_t *leases, int n);

#ifdef __cplusplus
}
#endif
#endif /* QINS_H */
