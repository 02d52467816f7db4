/* SPDX-License-Identifier: MIT */
/*
 * arena.c — the decoded-weights arena: a sealed memfd, its extent allocator, the entry cache
 * (hash + LRU), leases per connection and the decode hand-off. arena.h is the manual (design,
 * invariants, threads); docs/PROTOCOL.md §4.10-4.13 and docs/qinsd.md "The arena" the contract.
 *
 * Invariants (under a->mu):
 *  - Free extents are sorted by offset, never adjacent (coalesced), and with the entries' extents
 *    they tile [0, size) exactly; every offset and length is a multiple of QD_ARENA_ALIGN.
 *  - An entry is in the hash iff it is not stale; on the LRU iff READY, unleased and not stale.
 *    A stale entry (superseded model or failed decode) is freed as soon as it is unleased and not
 *    DECODING.
 *  - A lease is in the lease table and in its connection's list; conn records exist only while
 *    they hold a lease.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "arena.h"
#include "qins.h"

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010 /* linux/fcntl.h, Linux 5.1 */
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* linux/mman.h, Linux 5.14 */
#endif

enum { E_DECODING, E_READY, E_FAILED };

/* A node of a chained hash table keyed by a 64-bit hash. */
typedef struct hnode {
  uint64_t h;         /* hash (or id) */
  struct hnode *next; /* chain */
} hnode;
typedef struct htab {
  hnode **b;  /* buckets, a power of two of them */
  size_t nb;  /* bucket count */
  size_t n;   /* nodes */
} htab;

struct qd_arena_entry {
  hnode hn;                  /* in a->entries (h: key hash); first member */
  qd_arena_key key;          /* what it holds */
  qd_arena_meta meta;        /* shape and dtype for answers */
  uint64_t off, len, alloc;  /* bytes at off; alloc: the extent (aligned, >= len) */
  int state;                 /* E_DECODING, E_READY, E_FAILED */
  int rc;                    /* the decode's error (E_FAILED) */
  int stale;                 /* out of the hash: freed once unleased */
  int on_lru;                /* on the LRU list */
  uint32_t pins;             /* leases on it */
  qd_arena_entry *lprev, *lnext; /* LRU list (lhead = most recent) */
  qd_arena_entry *aprev, *anext; /* all entries */
  qd_arena_waiter *waiters;  /* async waiters of a DECODING entry */
};

typedef struct lease lease;
typedef struct conn_rec {
  hnode hn;      /* in a->conns (h: mix64 of the connection id); first member */
  uint64_t conn; /* the connection id */
  uint32_t n;    /* leases held */
  lease *head;   /* its leases */
} conn_rec;

struct lease {
  hnode hn;               /* in a->leases (h: mix64 of id); first member */
  uint64_t id;            /* the lease id */
  uint64_t conn;          /* owner */
  qd_arena_entry *e;      /* what it pins */
  lease *cprev, *cnext;   /* the owner's list */
};

typedef struct fx {
  uint64_t off, len; /* a free extent */
  struct fx *next;   /* next higher */
} fx;

struct qd_arena {
  pthread_mutex_t mu;
  pthread_cond_t cv;       /* broadcast when a decode ends */
  int fd;                  /* read-only open of the memfd (what clients get); fstat for residency */
  uint8_t *base;           /* the daemon's writable mapping */
  uint64_t size;           /* bytes */
  uint64_t page;           /* system page size */
  uint32_t max_leases;     /* per connection; 0: none */
  fx *free;                /* free extents by offset */
  uint64_t free_bytes;     /* their sum */
  uint64_t lru_bytes;      /* allocs of entries on the LRU (evictable) */
  htab entries, leases, conns;
  qd_arena_entry *lhead, *ltail; /* LRU: head most recent */
  qd_arena_entry *all;     /* every entry */
  uint64_t next_lease;     /* ids are never reused */
  uint64_t hits, misses, evictions, decode_bytes, refusals;
  uint64_t *made;          /* a bit per page: created by qd_arena_prefault (they stay) */
  uint64_t npages;         /* size / page */
};

/* ------------------------------------------------------------------------------------------------
 * Hash tables */

static int ht_grow(htab *t) {
  size_t nb = t->nb ? t->nb * 2 : 64;
  hnode **b = calloc(nb, sizeof *b);
  if (!b) return QINS_ENOMEM;
  for (size_t i = 0; i < t->nb; i++)
    for (hnode *n = t->b[i], *next; n; n = next) {
      next = n->next;
      n->next = b[n->h & (nb - 1)];
      b[n->h & (nb - 1)] = n;
    }
  free(t->b);
  t->b = b;
  t->nb = nb;
  return 0;
}

/* Grows ahead of an insert so the insert itself cannot fail. */
static int ht_reserve(htab *t) { return t->n + 1 > t->nb ? ht_grow(t) : 0; }

static void ht_insert(htab *t, hnode *n) {
  hnode **b = &t->b[n->h & (t->nb - 1)];
  n->next = *b;
  *b = n;
  t->n++;
}

static void ht_remove(htab *t, hnode *n) {
  for (hnode **p = &t->b[n->h & (t->nb - 1)]; *p; p = &(*p)->next)
    if (*p == n) {
      *p = n->next;
      t->n--;
      return;
    }
}

static hnode *ht_first(const htab *t, uint64_t h) {
  hnode *n = t->nb ? t->b[h & (t->nb - 1)] : NULL;
  while (n && n->h != h) n = n->next;
  return n;
}

static hnode *ht_next(hnode *n) {
  uint64_t h = n->h;
  for (n = n->next; n && n->h != h; n = n->next) {}
  return n;
}

/* Ids are hashed so that sequential ones spread over buckets (splitmix64's finaliser). */
static uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* ------------------------------------------------------------------------------------------------
 * Keys */

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
  const uint8_t *s = p;
  for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
  return h;
}

static uint64_t key_hash(const qd_arena_key *k) {
  uint64_t h = 0xcbf29ce484222325ull;
  h = fnv(h, &k->model_id, sizeof k->model_id);
  h = fnv(h, &k->dtype, sizeof k->dtype);
  h = fnv(h, &k->ndim, sizeof k->ndim);
  h = fnv(h, k->start, (size_t)k->ndim * sizeof k->start[0]);
  h = fnv(h, k->stop, (size_t)k->ndim * sizeof k->stop[0]);
  h = fnv(h, k->name, strlen(k->name));
  return mix64(h);
}

static int key_eq(const qd_arena_key *a, const qd_arena_key *b) {
  return a->model_id == b->model_id && a->dtype == b->dtype && a->ndim == b->ndim &&
         !memcmp(a->start, b->start, (size_t)a->ndim * sizeof a->start[0]) &&
         !memcmp(a->stop, b->stop, (size_t)a->ndim * sizeof a->stop[0]) &&
         !strcmp(a->name, b->name) && !strcmp(a->model, b->model);
}

void qd_arena_key_make(qd_arena_key *k, const qs_tensor *t, const qs_slice *sl, int dt) {
  memset(k, 0, sizeof *k);
  k->model_id = t->model_id;
  k->dtype = dt;
  snprintf(k->model, sizeof k->model, "%s", t->model);
  snprintf(k->name, sizeof k->name, "%s", t->name);
  if (sl) {
    k->ndim = sl->ndim < 0 ? 0 : sl->ndim > QS_MAX_NDIM ? QS_MAX_NDIM : sl->ndim;
    for (int d = 0; d < k->ndim; d++) k->start[d] = sl->start[d], k->stop[d] = sl->stop[d];
  }
  /* A trailing range over its whole dimension says nothing: dimensions past ndim are whole. */
  while (k->ndim > 0 && k->ndim <= t->ndim && k->start[k->ndim - 1] == 0 &&
         k->stop[k->ndim - 1] == t->shape[k->ndim - 1]) {
    k->ndim--;
    k->start[k->ndim] = k->stop[k->ndim] = 0;
  }
}

/* ------------------------------------------------------------------------------------------------
 * Extents */

static uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* The extent an entry of len bytes takes, and its alignment. */
static uint64_t extent_align(const qd_arena *a, uint64_t len) {
  return len >= QD_ARENA_PAGE_ALIGN ? a->page : QD_ARENA_ALIGN;
}
static uint64_t extent_bytes(const qd_arena *a, uint64_t len) {
  return round_up(len ? len : 1, extent_align(a, len));
}

/* Best fit: the smallest free extent that holds alloc bytes at alignment al. Large entries are cut
 * from the extent's start, small ones from its end. 0 and *off, or -1 when nothing fits. */
static int extent_take(qd_arena *a, uint64_t alloc, uint64_t al, uint64_t *off) {
  fx **best = NULL;
  for (fx **p = &a->free; *p; p = &(*p)->next) {
    fx *f = *p;
    uint64_t start = al > QD_ARENA_ALIGN ? round_up(f->off, al) : f->off + f->len - alloc;
    if (f->len < alloc || start < f->off || start + alloc > f->off + f->len) continue;
    if (!best || f->len < (*best)->len) best = p;
  }
  if (!best) return -1;
  fx *f = *best;
  if (al <= QD_ARENA_ALIGN) {
    *off = f->off + f->len - alloc;
    f->len -= alloc;
  } else {
    uint64_t start = round_up(f->off, al), end = f->off + f->len;
    *off = start;
    if (start > f->off) { /* the alignment gap stays free; the tail becomes a new extent */
      f->len = start - f->off;
      if (end > start + alloc) {
        fx *t = malloc(sizeof *t);
        if (!t) { /* cannot split: give up the tail's use until it coalesces back */
          f->len = end - f->off;
          return -2;
        }
        t->off = start + alloc;
        t->len = end - t->off;
        t->next = f->next;
        f->next = t;
      }
    } else {
      f->off += alloc;
      f->len -= alloc;
    }
  }
  if (f->len == 0) {
    *best = f->next;
    free(f);
  }
  a->free_bytes -= alloc;
  return 0;
}

/* Returns [off, off + len) to the free list, coalescing with its neighbours. */
static int extent_put(qd_arena *a, uint64_t off, uint64_t len) {
  fx *prev = NULL, *next = a->free;
  while (next && next->off < off) prev = next, next = next->next;
  int joins_prev = prev && prev->off + prev->len == off;
  int joins_next = next && off + len == next->off;
  if (joins_prev) {
    prev->len += len;
    if (joins_next) {
      prev->len += next->len;
      prev->next = next->next;
      free(next);
    }
  } else if (joins_next) {
    next->off = off;
    next->len += len;
  } else {
    fx *f = malloc(sizeof *f);
    if (!f) return QINS_ENOMEM; /* the bytes are lost to allocation until close; counted used */
    f->off = off;
    f->len = len;
    f->next = next;
    if (prev) prev->next = f;
    else a->free = f;
  }
  a->free_bytes += len;
  return 0;
}

/* ------------------------------------------------------------------------------------------------
 * Entries */

static void lru_remove(qd_arena *a, qd_arena_entry *e) {
  if (!e->on_lru) return;
  if (e->lprev) e->lprev->lnext = e->lnext;
  else a->lhead = e->lnext;
  if (e->lnext) e->lnext->lprev = e->lprev;
  else a->ltail = e->lprev;
  e->lprev = e->lnext = NULL;
  e->on_lru = 0;
  a->lru_bytes -= e->alloc;
}

static void lru_push(qd_arena *a, qd_arena_entry *e) {
  e->lprev = NULL;
  e->lnext = a->lhead;
  if (a->lhead) a->lhead->lprev = e;
  else a->ltail = e;
  a->lhead = e;
  e->on_lru = 1;
  a->lru_bytes += e->alloc;
}

static void entry_free(qd_arena *a, qd_arena_entry *e) {
  lru_remove(a, e);
  if (!e->stale) ht_remove(&a->entries, &e->hn);
  if (e->aprev) e->aprev->anext = e->anext;
  else a->all = e->anext;
  if (e->anext) e->anext->aprev = e->aprev;
  if (extent_put(a, e->off, e->alloc) == 0) free(e);
  /* else: the entry's extent cannot be listed as free; the struct is leaked with it. */
}

/* Puts e where its state says after a change of pins, state or staleness (see the invariants). */
static void entry_settle(qd_arena *a, qd_arena_entry *e) {
  if (e->state == E_FAILED && !e->stale) {
    ht_remove(&a->entries, &e->hn);
    e->stale = 1;
  }
  if (e->stale) {
    lru_remove(a, e);
    if (e->pins == 0 && e->state != E_DECODING) entry_free(a, e);
    return;
  }
  int want = e->state == E_READY && e->pins == 0;
  if (want && !e->on_lru) lru_push(a, e);
  else if (!want) lru_remove(a, e);
}

static qd_arena_entry *entry_find(qd_arena *a, const qd_arena_key *k, uint64_t h) {
  for (hnode *n = ht_first(&a->entries, h); n; n = ht_next(n)) {
    qd_arena_entry *e = (qd_arena_entry *)n;
    if (key_eq(&e->key, k)) return e;
  }
  return NULL;
}

/* A newer version of k's model is being mapped: its older entries answer no more lookups; unleased
 * ones are freed now, leased ones when released. */
static void drop_superseded(qd_arena *a, const qd_arena_key *k) {
  for (qd_arena_entry *e = a->all, *next; e; e = next) {
    next = e->anext;
    if (e->stale || e->key.model_id >= k->model_id || strcmp(e->key.model, k->model)) continue;
    ht_remove(&a->entries, &e->hn);
    e->stale = 1;
    entry_settle(a, e);
  }
}

/* ------------------------------------------------------------------------------------------------
 * Leases */

static conn_rec *conn_find(qd_arena *a, uint64_t conn) {
  for (hnode *n = ht_first(&a->conns, mix64(conn)); n; n = ht_next(n))
    if (((conn_rec *)n)->conn == conn) return (conn_rec *)n;
  return NULL;
}

static lease *lease_find(qd_arena *a, uint64_t id) {
  for (hnode *n = ht_first(&a->leases, mix64(id)); n; n = ht_next(n))
    if (((lease *)n)->id == id) return (lease *)n;
  return NULL;
}

/* Takes a lease on e for conn (tables reserved by the caller). */
static uint64_t lease_take(qd_arena *a, qd_arena_entry *e, uint64_t conn, conn_rec *c) {
  lease *l = calloc(1, sizeof *l);
  if (!l) return 0;
  l->id = ++a->next_lease;
  l->hn.h = mix64(l->id);
  l->conn = conn;
  l->e = e;
  l->cnext = c->head;
  if (c->head) c->head->cprev = l;
  c->head = l;
  c->n++;
  ht_insert(&a->leases, &l->hn);
  e->pins++;
  return l->id;
}

static void lease_drop(qd_arena *a, lease *l) {
  conn_rec *c = conn_find(a, l->conn);
  ht_remove(&a->leases, &l->hn);
  if (l->cprev) l->cprev->cnext = l->cnext;
  else if (c) c->head = l->cnext;
  if (l->cnext) l->cnext->cprev = l->cprev;
  if (c && --c->n == 0) {
    ht_remove(&a->conns, &c->hn);
    free(c);
  }
  qd_arena_entry *e = l->e;
  e->pins--;
  free(l);
  entry_settle(a, e);
}

/* ------------------------------------------------------------------------------------------------
 * Public API */

int qd_arena_open(qd_arena **out, uint64_t bytes, uint32_t max_leases) {
  *out = NULL;
  long pg = sysconf(_SC_PAGESIZE);
  uint64_t page = pg > 0 ? (uint64_t)pg : 4096;
  if (bytes == 0) return -EINVAL;
  bytes = round_up(bytes, page);
  qd_arena *a = calloc(1, sizeof *a);
  if (!a) return QINS_ENOMEM;
  a->fd = -1;
  a->base = MAP_FAILED;
  a->size = bytes;
  a->page = page;
  a->max_leases = max_leases;
  pthread_mutex_init(&a->mu, NULL);
  pthread_cond_init(&a->cv, NULL);
  int rc = 0;
  int fd = memfd_create("qinsd-arena", MFD_ALLOW_SEALING | MFD_CLOEXEC);
  if (fd < 0) {
    rc = -errno;
    goto fail;
  }
  if (ftruncate(fd, (off_t)bytes) != 0 ||
      (a->base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED ||
      fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) != 0) {
    rc = -errno;
    goto fail;
  }
  /* Clients get a read-only open file description of the same file: PROT_WRITE is refused
   * (EACCES) before the seals are even consulted, and it cannot add seals. */
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  a->fd = open(path, O_RDONLY | O_CLOEXEC);
  if (a->fd < 0) a->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0); /* no /proc: the seals alone protect it */
  if (a->fd < 0) {
    rc = -errno;
    goto fail;
  }
  close(fd);
  fd = -1;
  a->npages = bytes / page;
  a->made = calloc((size_t)((a->npages + 63) / 64), sizeof *a->made);
  fx *f = malloc(sizeof *f);
  if (!f || !a->made || ht_grow(&a->entries) || ht_grow(&a->leases) || ht_grow(&a->conns)) {
    free(f);
    rc = QINS_ENOMEM;
    goto fail;
  }
  f->off = 0;
  f->len = bytes;
  f->next = NULL;
  a->free = f;
  a->free_bytes = bytes;
  *out = a;
  return 0;
fail:
  if (fd >= 0) close(fd);
  qd_arena_close(a);
  return rc;
}

void qd_arena_close(qd_arena *a) {
  if (!a) return;
  for (size_t i = 0; i < a->leases.nb; i++)
    for (hnode *n = a->leases.b[i], *next; n; n = next) next = n->next, free(n);
  for (size_t i = 0; i < a->conns.nb; i++)
    for (hnode *n = a->conns.b[i], *next; n; n = next) next = n->next, free(n);
  for (qd_arena_entry *e = a->all, *next; e; e = next) next = e->anext, free(e);
  for (fx *f = a->free, *next; f; f = next) next = f->next, free(f);
  free(a->entries.b);
  free(a->leases.b);
  free(a->conns.b);
  free(a->made);
  if (a->base != MAP_FAILED) munmap(a->base, a->size);
  if (a->fd >= 0) close(a->fd);
  pthread_cond_destroy(&a->cv);
  pthread_mutex_destroy(&a->mu);
  free(a);
}

int qd_arena_fd(const qd_arena *a) { return a->fd; }
uint64_t qd_arena_size(const qd_arena *a) { return a->size; }
void *qd_arena_ptr(qd_arena *a, uint64_t off) { return a->base + off; }

/* ------------------------------------------------------------------------------------------------
 * Pages: which exist, and the warm reserve (created pages no entry holds yet) */

static int made_get(const qd_arena *a, uint64_t pg) { return (a->made[pg / 64] >> (pg % 64)) & 1; }

/* Pages set in [p, q). */
static uint64_t made_count(const qd_arena *a, uint64_t p, uint64_t q) {
  uint64_t n = 0;
  while (p < q && p % 64) n += (uint64_t)made_get(a, p++);
  for (; p + 64 <= q; p += 64) n += (uint64_t)__builtin_popcountll(a->made[p / 64]);
  while (p < q) n += (uint64_t)made_get(a, p++);
  return n;
}

/* The first page in [p, q) not yet created, or q. */
static uint64_t made_first_clear(const qd_arena *a, uint64_t p, uint64_t q) {
  while (p < q && p % 64) {
    if (!made_get(a, p)) return p;
    p++;
  }
  for (; p + 64 <= q; p += 64)
    if (~a->made[p / 64]) return p + (uint64_t)__builtin_ctzll(~a->made[p / 64]);
  while (p < q && made_get(a, p)) p++;
  return p;
}

/* The pages wholly inside free extent f: [*p, *q). */
static void free_pages(const qd_arena *a, const fx *f, uint64_t *p, uint64_t *q) {
  *p = round_up(f->off, a->page) / a->page;
  *q = (f->off + f->len) / a->page;
  if (*q < *p) *q = *p;
}

int qd_arena_prefault(qd_arena *a, uint64_t off, uint64_t len) {
  if (off > a->size || len > a->size - off) return -EINVAL;
  uint64_t s = off / a->page * a->page, e = round_up(off + len, a->page);
  if (e == s) return 0;
  pthread_mutex_lock(&a->mu); /* pages that exist stay: nothing to do when all of them do */
  int all = made_count(a, s / a->page, e / a->page) == (e - s) / a->page;
  pthread_mutex_unlock(&a->mu);
  if (all) return 0;
  if (madvise(a->base + s, e - s, MADV_POPULATE_WRITE) != 0) return -errno;
  pthread_mutex_lock(&a->mu);
  for (uint64_t pg = s / a->page; pg < e / a->page; pg++) a->made[pg / 64] |= 1ull << (pg % 64);
  pthread_mutex_unlock(&a->mu);
  return 0;
}

int qd_arena_warm_next(qd_arena *a, uint64_t reserve, uint64_t max, uint64_t *off, uint64_t *len,
                       uint64_t *pending) {
  *off = *len = 0;
  pthread_mutex_lock(&a->mu);
  uint64_t warm = 0, cold = 0, first = UINT64_MAX, first_end = 0;
  for (const fx *f = a->free; f; f = f->next) {
    uint64_t p, q;
    free_pages(a, f, &p, &q);
    uint64_t made = made_count(a, p, q);
    warm += made;
    cold += q - p - made;
    if (first == UINT64_MAX && made < q - p) {
      first = made_first_clear(a, p, q);
      first_end = q;
    }
  }
  warm *= a->page;
  cold *= a->page;
  uint64_t want = warm >= reserve ? 0 : round_up(reserve - warm, a->page);
  if (want > cold) want = cold;
  if (pending) *pending = want;
  if (want) { /* the lowest pages not yet created: where the next page-aligned entry goes */
    uint64_t n = max < want ? max : want;
    n = n / a->page ? n / a->page : 1;
    uint64_t e = first;
    while (e < first_end && e - first < n && !made_get(a, e)) e++;
    *off = first * a->page;
    *len = (e - first) * a->page;
  }
  pthread_mutex_unlock(&a->mu);
  return want != 0;
}

int qd_arena_acquire(qd_arena *a, const qd_arena_key *k, const qd_arena_meta *meta, uint64_t len,
                     uint64_t conn, qd_arena_grant *g, char *msg, size_t msg_cap) {
  memset(g, 0, sizeof *g);
  uint64_t h = key_hash(k);
  pthread_mutex_lock(&a->mu);
  int rc;
  conn_rec *c = conn_find(a, conn);
  if (a->max_leases && c && c->n >= a->max_leases) {
    snprintf(msg, msg_cap, "this connection holds %u leases, the most allowed (arena-max-leases): "
             "release some, or use get", c->n);
    a->refusals++;
    rc = QINS_EARENA_FULL;
    goto out;
  }
  if ((rc = ht_reserve(&a->leases)) || (rc = ht_reserve(&a->conns)) ||
      (rc = ht_reserve(&a->entries)))
    goto out;
  int fresh_conn = !c;
  if (!c) {
    if (!(c = calloc(1, sizeof *c))) {
      rc = QINS_ENOMEM;
      goto out;
    }
    c->hn.h = mix64(conn);
    c->conn = conn;
  }
  qd_arena_entry *e = entry_find(a, k, h);
  if (e) {
    g->lease = lease_take(a, e, conn, c);
    if (!g->lease) {
      rc = QINS_ENOMEM;
      goto conn_out;
    }
    if (fresh_conn) ht_insert(&a->conns, &c->hn);
    a->hits++;
    entry_settle(a, e);
    rc = e->state == E_READY ? QD_ARENA_HIT : QD_ARENA_WAIT;
    goto grant;
  }
  drop_superseded(a, k);
  uint64_t al = extent_align(a, len), alloc = extent_bytes(a, len), off = 0;
  if (alloc > a->size) {
    snprintf(msg, msg_cap, "%s/%s needs %llu bytes, more than the whole arena (%llu, arena-bytes): "
             "use get", k->model, k->name, (unsigned long long)len, (unsigned long long)a->size);
    a->refusals++;
    rc = QINS_EARENA_FULL;
    goto conn_out;
  }
  int took = -1;
  if (a->free_bytes + a->lru_bytes >= alloc) {
    while ((took = extent_take(a, alloc, al, &off)) == -1 && a->ltail) {
      a->evictions++;
      entry_free(a, a->ltail);
    }
  }
  if (took == -2) {
    rc = QINS_ENOMEM;
    goto conn_out;
  }
  if (took != 0) {
    snprintf(msg, msg_cap, "the arena cannot hold %s/%s (%llu bytes) now: %llu of its %llu bytes "
             "are leased or being decoded; use get", k->model, k->name, (unsigned long long)len,
             (unsigned long long)(a->size - a->free_bytes - a->lru_bytes),
             (unsigned long long)a->size);
    a->refusals++;
    rc = QINS_EARENA_FULL;
    goto conn_out;
  }
  if (!(e = calloc(1, sizeof *e))) {
    extent_put(a, off, alloc);
    rc = QINS_ENOMEM;
    goto conn_out;
  }
  e->key = *k;
  e->hn.h = h;
  if (meta) e->meta = *meta;
  e->off = off;
  e->len = len;
  e->alloc = alloc;
  e->state = E_DECODING;
  g->lease = lease_take(a, e, conn, c);
  if (!g->lease) {
    extent_put(a, off, alloc);
    free(e);
    rc = QINS_ENOMEM;
    goto conn_out;
  }
  if (fresh_conn) ht_insert(&a->conns, &c->hn);
  ht_insert(&a->entries, &e->hn);
  e->anext = a->all;
  if (a->all) a->all->aprev = e;
  a->all = e;
  a->misses++;
  rc = QD_ARENA_DECODE;
grant:
  g->off = e->off;
  g->len = e->len;
  g->meta = e->meta;
  g->entry = e;
  goto out;
conn_out:
  if (fresh_conn) free(c);
out:
  pthread_mutex_unlock(&a->mu);
  return rc;
}

void qd_arena_decoded(qd_arena *a, qd_arena_entry *e, int rc) {
  pthread_mutex_lock(&a->mu);
  qd_arena_waiter *w = e->waiters;
  e->waiters = NULL;
  for (qd_arena_waiter *x = w; x; x = x->next) x->entry = NULL;
  if (rc == 0) {
    e->state = E_READY;
    a->decode_bytes += e->len;
  } else {
    e->state = E_FAILED;
    e->rc = rc;
  }
  entry_settle(a, e); /* may free e (failed, unleased) */
  pthread_cond_broadcast(&a->cv);
  pthread_mutex_unlock(&a->mu);
  while (w) {
    qd_arena_waiter *next = w->next; /* cb may free w */
    w->cb(w->ud, rc);
    w = next;
  }
}

/* The rc of a finished entry. */
static int entry_rc(const qd_arena_entry *e) { return e->state == E_READY ? 0 : e->rc; }

int qd_arena_wait(qd_arena *a, const qd_arena_grant *g) {
  pthread_mutex_lock(&a->mu);
  while (g->entry->state == E_DECODING) pthread_cond_wait(&a->cv, &a->mu);
  int rc = entry_rc(g->entry);
  pthread_mutex_unlock(&a->mu);
  return rc;
}

int qd_arena_wait_async(qd_arena *a, const qd_arena_grant *g, qd_arena_waiter *w, int *rc) {
  pthread_mutex_lock(&a->mu);
  qd_arena_entry *e = g->entry;
  int done = e->state != E_DECODING;
  if (done) {
    *rc = entry_rc(e);
  } else {
    w->entry = e;
    w->next = e->waiters;
    e->waiters = w;
  }
  pthread_mutex_unlock(&a->mu);
  return done;
}

int qd_arena_wait_cancel(qd_arena *a, qd_arena_waiter *w) {
  int found = 0;
  pthread_mutex_lock(&a->mu);
  if (w->entry)
    for (qd_arena_waiter **p = &w->entry->waiters; *p; p = &(*p)->next)
      if (*p == w) {
        *p = w->next;
        w->entry = NULL;
        found = 1;
        break;
      }
  pthread_mutex_unlock(&a->mu);
  return found;
}

int qd_arena_release(qd_arena *a, uint64_t conn, uint64_t id, char *msg, size_t msg_cap) {
  pthread_mutex_lock(&a->mu);
  lease *l = lease_find(a, id);
  int rc = 0;
  if (!l || l->conn != conn) {
    snprintf(msg, msg_cap, "lease %llu is not held by this connection", (unsigned long long)id);
    rc = QINS_EBAD_PARAMS;
  } else {
    lease_drop(a, l);
  }
  pthread_mutex_unlock(&a->mu);
  return rc;
}

int qd_arena_holds(qd_arena *a, uint64_t conn, uint64_t id) {
  pthread_mutex_lock(&a->mu);
  lease *l = lease_find(a, id);
  int held = l && l->conn == conn;
  pthread_mutex_unlock(&a->mu);
  return held;
}

int qd_arena_conn_leased(qd_arena *a, uint64_t conn) {
  pthread_mutex_lock(&a->mu);
  int any = conn_find(a, conn) != NULL; /* the record exists while conn holds a lease */
  pthread_mutex_unlock(&a->mu);
  return any;
}

uint64_t qd_arena_release_conn(qd_arena *a, uint64_t conn) {
  uint64_t n = 0;
  pthread_mutex_lock(&a->mu);
  conn_rec *c;
  while ((c = conn_find(a, conn)) != NULL) { /* the record goes with its last lease */
    lease_drop(a, c->head);
    n++;
  }
  pthread_mutex_unlock(&a->mu);
  return n;
}

void qd_arena_stats_get(qd_arena *a, qd_arena_stats *o) {
  memset(o, 0, sizeof *o);
  pthread_mutex_lock(&a->mu);
  o->bytes = a->size;
  for (qd_arena_entry *e = a->all; e; e = e->anext) {
    o->entries++;
    o->used += e->alloc;
    if (e->pins || e->state == E_DECODING) o->leased += e->alloc;
  }
  for (fx *f = a->free; f; f = f->next) o->free_extents++;
  o->leases = a->leases.n;
  o->hits = a->hits;
  o->misses = a->misses;
  o->evictions = a->evictions;
  o->decode_bytes = a->decode_bytes;
  o->refusals = a->refusals;
  for (fx *f = a->free; f; f = f->next) {
    uint64_t p, q;
    free_pages(a, f, &p, &q);
    o->warm += made_count(a, p, q) * a->page;
  }
  struct stat st;
  if (fstat(a->fd, &st) == 0) o->resident = (uint64_t)st.st_blocks * 512;
  pthread_mutex_unlock(&a->mu);
}
