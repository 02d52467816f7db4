/* SPDX-License-Identifier: MIT */
/*
 * config.c — qinsd's one option table. Each option has a name, a type, a default, bounds and a
 * help line; the table parses `--name value` / `--name=value` flags, the config file (`name value`
 * lines, `#` comments; docs/qinsd.conf.example lists every option) and prints `--help`.
 * Precedence: defaults < config file < flags. A bad value exits with status 2 naming the option.
 * A test checks docs/qinsd.conf.example against this table (qinsd --help and --check).
 * List options (allow-uid, allow-gid) are the exception to "flags override": every config line and
 * every flag adds its comma-separated entries to the list. User and group names are resolved to
 * ids once, here, so a typo exits 2 at start instead of silently refusing everyone.
 */
#include <ctype.h>
#include <stdarg.h>
#include <errno.h>
#include <grp.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "methods.h"
#include "qinsd.h"


enum { T_STR, T_U64, T_SIZE, T_MODE, T_LEVEL, T_GROUP, T_UIDS, T_GIDS };

typedef struct opt {
  const char *name;  /* flag and config-file key */
  int type;          /* T_* */
  const char *def;   /* default, as text (parsed like user input); NULL: none */
  uint64_t min, max; /* bounds of numeric types */
  size_t off;        /* field in qd_config */
  const char *help;  /* one line */
} opt;

#define F(field) offsetof(qd_config, field)
#define KiB (1024ull)
#define MiB (1024ull * 1024)
#define GiB (1024ull * 1024 * 1024)

static const opt opts[] = {
  {"store", T_STR, NULL, 0, 0, F(store), "store directory (required)"},
  {"socket", T_STR, NULL, 0, 0, F(socket), "Unix socket path to listen on (required; < 108 bytes)"},
  {"config", T_STR, NULL, 0, 0, F(config), "config file of `name value` lines (flags override it)"},
  {"log", T_STR, "", 0, 0, F(log), "log file (empty: stderr)"},
  {"log-level", T_LEVEL, "notice", 0, 0, F(log_level), "debug, verbose, notice or warning"},
  {"socket-mode", T_MODE, "0660", 0, 0777, F(socket_mode),
   "socket file mode, octal (connecting needs write permission)"},
  {"socket-group", T_GROUP, NULL, 0, 0, F(socket_group),
   "group (name or gid) given to the socket file before listening; unset: the daemon's group"},
  {"store-group", T_GROUP, NULL, 0, 0, F(store_group),
   "group (name or gid) of store files qinsd creates (an empty store's data.mdb, lock.mdb), then "
   "mode 0640; unset: mode 0600, the daemon's group"},
  {"allow-uid", T_UIDS, NULL, 0, 0, F(allow_uid),
   "users (names or uids, comma list, repeatable) allowed to call read methods; with no allow "
   "list anyone who can connect may; the daemon's uid and root always may"},
  {"allow-gid", T_GIDS, NULL, 0, 0, F(allow_gid),
   "groups (names or gids, comma list, repeatable) whose members (primary or supplementary group "
   "of the peer) may call read methods"},
  {"max-request-bytes", T_SIZE, "1M", 64, 64 * MiB, F(max_request_bytes),
   "largest request accepted; larger ones get TOO_LARGE and a close"},
  {"max-response-bytes", T_SIZE, "1G", 4 * KiB, 4 * GiB - 1, F(max_response_bytes),
   "largest response; larger answers get RESPONSE_TOO_LARGE (slice instead)"},
  {"max-connections", T_U64, "256", 1, 100000, F(max_connections),
   "concurrent client connections; more get BUSY"},
  {"max-connections-per-uid", T_U64, "128", 1, 100000, F(max_connections_per_uid),
   "concurrent connections of one peer uid (root and the daemon's uid are not limited); more "
   "get BUSY"},
  {"idle-timeout-ms", T_U64, "0", 0, 86400000, F(idle_timeout_ms),
   "a connection with no request in flight, nothing to send and no arena lease for this long is "
   "closed, checked every second (0: never)"},
  {"max-ranges", T_U64, "8", 1, QINS_MAX_NDIM, F(max_ranges), "slice ranges per request"},
  {"inline-decode-bytes", T_SIZE, "256K", 0, 4 * GiB, F(inline_decode_bytes),
   "decodes producing up to this many bytes run on the loop thread, larger ones on the pool"},
  {"write-queue-bytes", T_SIZE, "8M", 64 * KiB, 16 * GiB, F(write_queue_bytes),
   "memory held by a client's unsent responses above this pauses reading its requests"},
  {"max-response-memory", T_SIZE, "512M", 1 * MiB, 1024 * GiB, F(max_response_memory),
   "memory held for responses and pending decodes, all clients: at this, reading every client's "
   "requests pauses until it falls"},
  {"max-pending", T_U64, "64", 1, 4096, F(max_pending),
   "requests of one client being answered at once; more wait unread"},
  {"shutdown-timeout-ms", T_U64, "10000", 0, 3600000, F(shutdown_timeout_ms),
   "on SIGTERM, connections still busy after this long are closed"},
  {"threads", T_U64, "4", 1, 128, F(threads), "decode threads (libuv thread pool size)"},
  {"buffer-cache-bytes", T_SIZE, "256M", 0, 64 * GiB, F(buffer_cache_bytes),
   "decoded-payload buffers kept for reuse (avoids page faults on large gets)"},
  {"stream-min-bytes", T_SIZE, "4M", 0, 4 * GiB, F(stream_min_bytes),
   "gets of whole tensors or row ranges at least this large are sent chunk by chunk while being "
   "decoded (0: never)"},
  {"stream-piece-bytes", T_SIZE, "256K", 4 * KiB, 1 * GiB, F(stream_piece_bytes),
   "streamed gets are decoded and sent in pieces of about this size (cache-sized)"},
  {"arena-bytes", T_SIZE, "auto", 0, 16384 * GiB, F(arena_bytes),
   "size of the shared decoded-weights arena workers map (attach/map); auto: a quarter of "
   "physical memory; 0: no arena. Pages are created on first use (or ahead: arena-warm-bytes) "
   "and kept"},
  {"arena-warm-bytes", T_SIZE, "512M", 0, 16384 * GiB, F(arena_warm_bytes),
   "arena pages created ahead of use, in the background once a client attaches: a reserve of "
   "this many bytes (at most arena-bytes) of created pages no entry holds yet; 0: pages are "
   "created by the first decode into them"},
  {"arena-max-leases", T_U64, "4096", 1, 1u << 24, F(arena_max_leases),
   "arena leases one connection may hold at once (more get ARENA_FULL)"},
};
#define N_OPTS (sizeof opts / sizeof opts[0])

static const opt *opt_find(const char *name, size_t len) {
  for (size_t i = 0; i < N_OPTS; i++)
    if (strlen(opts[i].name) == len && memcmp(opts[i].name, name, len) == 0) return &opts[i];
  return NULL;
}

static void die_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die_usage(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "qinsd: ");
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n(qinsd --help lists the options)\n");
  exit(2);
}

static int parse_u64(const char *s, int type, uint64_t *out) {
  if (!*s || *s == '-' || isspace((unsigned char)*s)) return -1;
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, type == T_MODE ? 8 : 0);
  if (errno || end == s) return -1;
  uint64_t mul = 1;
  if (type == T_SIZE && *end) {
    switch (toupper((unsigned char)*end)) {
    case 'K': mul = KiB; break;
    case 'M': mul = MiB; break;
    case 'G': mul = GiB; break;
    default: return -1;
    }
    end++;
    if (*end == 'i' || *end == 'I') end++;
    if (*end == 'B' || *end == 'b') end++;
  }
  if (*end) return -1;
  if (v && mul > UINT64_MAX / v) return -1;
  *out = v * mul;
  return 0;
}

/* A uid/gid as a decimal number, or a user/group name looked up in the system's databases. */
static int parse_id(const char *s, int group, uint32_t *out) {
  if (*s >= '0' && *s <= '9') {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v >= UINT32_MAX) return -1; /* (uid_t)-1 is "no id" */
    *out = (uint32_t)v;
    return 0;
  }
  if (group) {
    struct group *g = getgrnam(s);
    if (!g) return -1;
    *out = (uint32_t)g->gr_gid;
  } else {
    struct passwd *pw = getpwnam(s);
    if (!pw) return -1;
    *out = (uint32_t)pw->pw_uid;
  }
  return 0;
}

/* Appends the comma-separated ids of val to list l (empty items between commas are skipped). A
 * value naming no id at all (`allow-uid ""`, `--allow-uid=`) exits 2: read as "no list" it would
 * let anyone who connects read, the opposite of what the operator wrote. */
static void idlist_add(const opt *o, qd_idlist *l, const char *val, const char *where) {
  const char *p = val;
  if (!val[strspn(val, ", \t")])
    die_usage("bad value for %s: \"%s\"%s (an empty list; name at least one %s, or remove the "
              "option to let anyone who can connect read)", o->name, val, where,
              o->type == T_GIDS ? "group" : "user");
  while (*p) {
    size_t n = strcspn(p, ",");
    char item[256];
    while (n && isspace((unsigned char)*p)) p++, n--;
    if (n >= sizeof item) die_usage("bad value for %s: \"%.40s...\"%s (too long)", o->name, p, where);
    memcpy(item, p, n);
    item[n] = '\0';
    while (n && isspace((unsigned char)item[n - 1])) item[--n] = '\0';
    p += strcspn(p, ",");
    if (*p == ',') p++;
    if (!n) continue;
    uint32_t id;
    if (parse_id(item, o->type == T_GIDS, &id))
      die_usage("bad value for %s: \"%s\"%s (not a %s name or a numeric id)", o->name, item, where,
                o->type == T_GIDS ? "group" : "user");
    uint32_t *nv = realloc(l->v, (l->n + 1) * sizeof *nv);
    if (!nv) die_usage("out of memory reading %s", o->name);
    l->v = nv;
    l->v[l->n++] = id;
  }
}

int qd_peer_may_read(uid_t uid, gid_t gid, const gid_t *groups, size_t ngroups) {
  if (uid == 0 || uid == getuid()) return 1;
  if (!qd_srv.cfg.allow_uid.n && !qd_srv.cfg.allow_gid.n) return 1;
  for (size_t i = 0; i < qd_srv.cfg.allow_uid.n; i++)
    if (qd_srv.cfg.allow_uid.v[i] == (uint32_t)uid) return 1;
  for (size_t i = 0; i < qd_srv.cfg.allow_gid.n; i++) {
    if (qd_srv.cfg.allow_gid.v[i] == (uint32_t)gid) return 1;
    for (size_t k = 0; k < ngroups; k++)
      if (qd_srv.cfg.allow_gid.v[i] == (uint32_t)groups[k]) return 1;
  }
  return 0;
}

static void opt_set(const opt *o, const char *val, const char *where) {
  char *base = (char *)&qd_srv.cfg;
  if (o->type == T_UIDS || o->type == T_GIDS) {
    idlist_add(o, (qd_idlist *)(base + o->off), val, where);
    return;
  }
  if (o->type == T_GROUP) {
    uint32_t g = 0;
    if (*val && parse_id(val, 1, &g))
      die_usage("bad value for %s: \"%s\"%s (not a group name or a numeric gid)", o->name, val,
                where);
    char **name = (char **)(base + o->off);
    free(*name);
    *name = strdup(val);
    *(o->off == F(store_group) ? &qd_srv.cfg.store_gid : &qd_srv.cfg.socket_gid) = (gid_t)g;
    return;
  }
  if (o->type == T_STR) {
    char **f = (char **)(base + o->off);
    free(*f);
    *f = strdup(val);
    return;
  }
  if (o->type == T_LEVEL) {
    int l = qd_log_level_from_name(val);
    if (l < 0) die_usage("bad value for %s: \"%s\" (debug, verbose, notice or warning)", o->name, val);
    *(int *)(base + o->off) = l;
    return;
  }
  uint64_t v;
  if (o->type == T_SIZE && !strcmp(val, "auto") && o->off == F(arena_bytes)) {
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE); /* a quarter of RAM */
    v = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz / 4 / MiB * MiB : 1 * GiB;
    *(uint64_t *)(base + o->off) = v;
    return;
  }
  if (parse_u64(val, o->type, &v) || v < o->min || v > o->max) {
    if (o->type == T_MODE)
      die_usage("bad value for %s: \"%s\"%s (an octal mode, at most 0777)", o->name, val, where);
    die_usage("bad value for %s: \"%s\"%s (allowed %" PRIu64 " .. %" PRIu64
              ", sizes may end in K, M or G)", o->name, val, where, o->min, o->max);
  }
  if (o->type == T_MODE)
    *(unsigned *)(base + o->off) = (unsigned)v;
  else
    *(uint64_t *)(base + o->off) = v;
}

static void load_file(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) die_usage("cannot read config file %s: %s", path, strerror(errno));
  char line[4096];
  int lineno = 0;
  while (fgets(line, sizeof line, f)) {
    lineno++;
    char *p = line;
    while (isspace((unsigned char)*p)) p++;
    if (!*p || *p == '#') continue;
    char *k = p;
    while (*p && !isspace((unsigned char)*p)) p++;
    size_t klen = (size_t)(p - k);
    while (*p == ' ' || *p == '\t') p++;
    char *v = p;
    size_t vlen = strlen(v);
    while (vlen && isspace((unsigned char)v[vlen - 1])) v[--vlen] = '\0';
    if (vlen >= 2 && v[0] == '"' && v[vlen - 1] == '"') {
      v[vlen - 1] = '\0';
      v++;
    }
    k[klen] = '\0';
    const opt *o = opt_find(k, klen);
    char where[300];
    snprintf(where, sizeof where, " in %s line %d", path, lineno);
    if (!o || strcmp(o->name, "config") == 0) die_usage("unknown option \"%s\"%s", k, where);
    opt_set(o, v, where);
  }
  fclose(f);
}

void qd_config_help(FILE *out) {
  fprintf(out,
          "usage: qinsd --store DIR --socket PATH [--config FILE] [options]\n"
          "Serves decoded tensors of a qins store over msgpack-RPC on a Unix socket\n"
          "(docs/PROTOCOL.md). Every option also works as `name value` in the config file.\n\n");
  for (size_t i = 0; i < N_OPTS; i++) {
    char arg[64];
    snprintf(arg, sizeof arg, "--%s %s", opts[i].name,
             opts[i].type == T_STR     ? "STR"
             : opts[i].type == T_LEVEL ? "LEVEL"
             : opts[i].type == T_GROUP ? "NAME|GID"
             : opts[i].type == T_UIDS || opts[i].type == T_GIDS ? "LIST"
                                                                 : "N");
    fprintf(out, "  %-30s %s (default: %s)\n", arg, opts[i].help,
            opts[i].def ? (*opts[i].def ? opts[i].def : "\"\"") : "none");
  }
  fprintf(out,
          "\nother flags:\n"
          "  --check                        validate the options and config file, then exit\n"
          "  --methods                      list the protocol methods, then exit\n"
          "  --version                      print the version, then exit\n"
          "  --help                         this text\n"
          "Sizes take K, M or G suffixes (powers of 1024). Exit status: 0 clean shutdown, 1 error,\n"
          "2 bad option.\n");
}

int qd_config_load(int argc, char **argv) {
  for (size_t i = 0; i < N_OPTS; i++)
    if (opts[i].def) opt_set(&opts[i], opts[i].def, " (default)");
  int check = 0;
  /* First pass: --help, --methods, --check, --config. */
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      qd_config_help(stdout);
      exit(0);
    }
    if (strcmp(a, "--version") == 0) {
      printf("qinsd %s\n", QINS_VERSION_STRING);
      exit(0);
    }
    if (strcmp(a, "--methods") == 0) {
      for (int m = 0; m < qd_n_methods; m++)
        printf("%-10s %-6s %s — %s\n", qd_methods[m].name,
               qd_methods[m].flags & QD_ADMIN ? "admin" : "read", qd_methods[m].params,
               qd_methods[m].summary);
      exit(0);
    }
    if (strcmp(a, "--check") == 0) check = 1;
    if (strcmp(a, "--config") == 0 && i + 1 < argc) opt_set(opt_find("config", 6), argv[i + 1], "");
    if (strncmp(a, "--config=", 9) == 0) opt_set(opt_find("config", 6), a + 9, "");
  }
  if (qd_srv.cfg.config) load_file(qd_srv.cfg.config);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--check") == 0) continue;
    if (strncmp(a, "--", 2) != 0) die_usage("unexpected argument \"%s\"", a);
    const char *name = a + 2;
    const char *eq = strchr(name, '=');
    size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
    const opt *o = opt_find(name, nlen);
    if (!o) die_usage("unknown option \"%s\"", a);
    const char *val;
    if (eq) {
      val = eq + 1;
    } else {
      if (i + 1 >= argc) die_usage("option --%s needs a value", o->name);
      val = argv[++i];
    }
    opt_set(o, val, "");
  }
  if (!check) {
    if (!qd_srv.cfg.store || !*qd_srv.cfg.store) die_usage("missing --store DIR");
    if (!qd_srv.cfg.socket || !*qd_srv.cfg.socket) die_usage("missing --socket PATH");
  }
  if (qd_srv.cfg.socket && strlen(qd_srv.cfg.socket) >= 108)
    die_usage("bad value for socket: \"%s\" (a socket path holds at most 107 bytes)",
              qd_srv.cfg.socket);
  return check;
}
