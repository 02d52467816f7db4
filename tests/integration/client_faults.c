/* SPDX-License-Identifier: MIT */
/*
 * client_faults.c — libqins against a scripted fake server that answers with hostile or broken
 * bytes: each case must give an error code (never a crash, a hang or an allocation of what a
 * header merely declares), and a broken stream must leave the client closed (QINS_ECLOSED next,
 * with reconnecting off: the fake accepts one connection).
 * The client keeps proto's bounds (docs/PROTOCOL.md §1; client/qins.c's header).
 *
 * The fake server (a thread) accepts one connection, answers hello with a valid map (unless the
 * case scripts hello itself), reads the next request and writes the case's bytes, then closes
 * when the case says so. msgids are the client's: 1 for hello, 2 for the first call.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <msgpack.h>

#include "qins.h"

typedef struct fake {
  char dir[64], path[96];
  int lfd;
  const uint8_t *hello; /* scripted hello answer, or NULL for a valid one */
  size_t hello_len;
  const uint8_t *reply; /* answer to the first call */
  size_t reply_len;
  int close_after; /* close right after writing reply */
  pthread_t thr;
} fake;

/* Starts a successful answer [1, msgid, nil, <result>] in sb (initialised here); pk packs the
 * result next. */
static void answer_begin(msgpack_sbuffer *sb, msgpack_packer *pk, uint32_t msgid) {
  msgpack_sbuffer_init(sb);
  msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
  msgpack_pack_array(pk, 4);
  msgpack_pack_uint8(pk, 1);
  msgpack_pack_uint32(pk, msgid);
  msgpack_pack_nil(pk);
}

/* A valid hello answer into sb (initialised here). */
static void pack_valid_hello(msgpack_sbuffer *sb, uint32_t msgid) {
  msgpack_packer pk;
  answer_begin(sb, &pk, msgid);
  msgpack_pack_map(&pk, 6);
  const char *keys[] = {"protocol", "server", "max_request_bytes", "max_response_bytes",
                        "max_connections", "max_ranges"};
  uint64_t vals[] = {1, 0, 1 << 20, 1 << 20, 8, 8};
  for (int i = 0; i < 6; i++) {
    msgpack_pack_str_with_body(&pk, keys[i], strlen(keys[i]));
    if (i == 1) msgpack_pack_str_with_body(&pk, "fake 0", 6);
    else msgpack_pack_uint64(&pk, vals[i]);
  }
}

static void read_some(int fd) {
  char buf[4096];
  ssize_t n = recv(fd, buf, sizeof buf, 0);
  (void)n;
}

static void *fake_main(void *arg) {
  fake *f = arg;
  int fd = accept(f->lfd, NULL, NULL);
  if (fd < 0) return NULL;
  read_some(fd); /* hello */
  if (f->hello) {
    if (write(fd, f->hello, f->hello_len) < 0) goto out;
  } else {
    msgpack_sbuffer sb;
    pack_valid_hello(&sb, 1); /* initialises sb */
    ssize_t w = write(fd, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
    if (w < 0) goto out;
  }
  read_some(fd); /* the call */
  if (f->reply && write(fd, f->reply, f->reply_len) < 0) goto out;
  if (!f->close_after) read_some(fd); /* wait for the client to go */
out:
  close(fd);
  return NULL;
}

static void fake_start(fake *f) {
  snprintf(f->dir, sizeof f->dir, "/tmp/qins-fake-XXXXXX");
  cr_assert(mkdtemp(f->dir));
  snprintf(f->path, sizeof f->path, "%s/s", f->dir);
  f->lfd = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  strcpy(sa.sun_path, f->path);
  cr_assert_eq(bind(f->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
  cr_assert_eq(listen(f->lfd, 4), 0);
  cr_assert_eq(pthread_create(&f->thr, NULL, fake_main, f), 0);
}

static void fake_stop(fake *f) {
  pthread_join(f->thr, NULL);
  close(f->lfd);
  unlink(f->path);
  rmdir(f->dir);
}

/* Connects (expecting success), runs a get into a small buffer, returns its code. */
static int get_against(fake *f, qins_client **cl) {
  int rc = qins_connect(cl, f->path, 2000);
  cr_assert_eq(rc, 0, "connect: %s", qins_strerror(rc));
  qins_set_timeout(*cl, 2000);
  qins_set_retry(*cl, 0); /* the fake answers once: a reconnect would wait on its backlog */
  float buf[16];
  return qins_get_into(*cl, "m", "w", NULL, 0, QINS_F32, buf, sizeof buf, NULL, NULL, NULL);
}

/* Packs [1, 2, nil, {shape: [dims...], dtype: "f32", data: <bin header of len>}] then raw body. */
static size_t pack_get_reply(uint8_t *out, size_t cap, int ndim, const uint64_t *dims, uint32_t len,
                             const void *body, size_t body_len) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  answer_begin(&sb, &pk, 2);
  msgpack_pack_map(&pk, 3);
  msgpack_pack_str_with_body(&pk, "shape", 5);
  msgpack_pack_array(&pk, (size_t)ndim);
  for (int i = 0; i < ndim; i++) msgpack_pack_uint64(&pk, dims[i]);
  msgpack_pack_str_with_body(&pk, "dtype", 5);
  msgpack_pack_str_with_body(&pk, "f32", 3);
  msgpack_pack_str_with_body(&pk, "data", 4);
  msgpack_pack_bin(&pk, len);
  cr_assert_leq(sb.size + body_len, cap);
  memcpy(out, sb.data, sb.size);
  if (body_len) memcpy(out + sb.size, body, body_len);
  size_t n = sb.size + body_len;
  msgpack_sbuffer_destroy(&sb);
  return n;
}

TestSuite(client_faults, .timeout = 30);

Test(client_faults, hello_with_another_protocol_is_refused) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  answer_begin(&sb, &pk, 1);
  msgpack_pack_map(&pk, 1);
  msgpack_pack_str_with_body(&pk, "protocol", 8);
  msgpack_pack_uint8(&pk, 2);
  fake f = {.hello = (const uint8_t *)sb.data, .hello_len = sb.size, .close_after = 1};
  fake_start(&f);
  qins_client *c = (qins_client *)1;
  cr_expect_eq(qins_connect(&c, f.path, 2000), QINS_EVERSION);
  cr_expect_null(c);
  fake_stop(&f);
  msgpack_sbuffer_destroy(&sb);
}

/* PROTOCOL.md §1.1: BUSY comes with msgid 0 before any request. */
Test(client_faults, busy_at_connect_is_reported) {
  static const uint8_t busy[] = {0x94, 0x01, 0x00, 0x92, 0xd1, 0xfc, 0x0f, /* -1009 */
                                 0xa4, 'b', 'u', 's', 'y', 0xc0};
  fake f = {.hello = busy, .hello_len = sizeof busy, .close_after = 1};
  fake_start(&f);
  qins_client *c = NULL;
  cr_expect_eq(qins_connect(&c, f.path, 2000), QINS_EBUSY);
  fake_stop(&f);
}

Test(client_faults, a_response_that_is_not_an_array) {
  static const uint8_t r[] = {0xa3, 'b', 'a', 'd'};
  fake f = {.reply = r, .reply_len = sizeof r};
  fake_start(&f);
  qins_client *c;
  cr_expect_eq(get_against(&f, &c), QINS_EPROTO);
  cr_expect_eq(qins_ping(c), QINS_ECLOSED, "a malformed stream closes the client");
  qins_close(c);
  fake_stop(&f);
}

Test(client_faults, a_response_with_another_msgid) {
  static const uint8_t r[] = {0x94, 0x01, 0x07, 0xc0, 0xa4, 'p', 'o', 'n', 'g'};
  fake f = {.reply = r, .reply_len = sizeof r};
  fake_start(&f);
  qins_client *c;
  cr_assert_eq(qins_connect(&c, f.path, 2000), 0);
  cr_expect_eq(qins_ping(c), QINS_EPROTO);
  cr_expect(strstr(qins_client_error(c), "msgid") != NULL, "%s", qins_client_error(c));
  qins_close(c);
  fake_stop(&f);
}

/* A 4 GiB bin declared in a short answer: refused from its header, nothing allocated. */
Test(client_faults, a_huge_declared_bin_is_refused) {
  uint8_t r[256];
  uint64_t dims[1] = {1u << 30};
  size_t n = pack_get_reply(r, sizeof r, 1, dims, UINT32_MAX, NULL, 0);
  fake f = {.reply = r, .reply_len = n};
  fake_start(&f);
  qins_client *c;
  int rc = get_against(&f, &c);
  cr_expect(rc == QINS_ETOO_LARGE || rc == QINS_EPROTO, "%s", qins_err_name(rc));
  cr_expect_eq(qins_ping(c), QINS_ECLOSED);
  qins_close(c);
  fake_stop(&f);
}

/* Same for the allocating get: the declared size is never allocated. */
Test(client_faults, a_huge_declared_bin_is_not_allocated) {
  uint8_t r[256];
  uint64_t dims[1] = {1u << 30};
  size_t n = pack_get_reply(r, sizeof r, 1, dims, UINT32_MAX, NULL, 0);
  fake f = {.reply = r, .reply_len = n};
  fake_start(&f);
  qins_client *c;
  cr_assert_eq(qins_connect(&c, f.path, 2000), 0);
  void *p = (void *)1;
  size_t bytes = 7;
  int rc = qins_get(c, "m", "w", NULL, 0, QINS_F32, &p, &bytes, NULL, NULL);
  cr_expect(rc == QINS_ETOO_LARGE || rc == QINS_EPROTO, "%s", qins_err_name(rc));
  cr_expect_null(p);
  qins_close(c);
  fake_stop(&f);
}

Test(client_faults, a_payload_that_does_not_match_its_shape) {
  uint8_t r[256];
  float body[3] = {1, 2, 3};
  uint64_t dims[1] = {4};
  size_t n = pack_get_reply(r, sizeof r, 1, dims, sizeof body, body, sizeof body);
  fake f = {.reply = r, .reply_len = n};
  fake_start(&f);
  qins_client *c;
  cr_expect_eq(get_against(&f, &c), QINS_EPROTO);
  cr_expect(strstr(qins_client_error(c), "do not match") != NULL, "%s", qins_client_error(c));
  qins_close(c);
  fake_stop(&f);
}

Test(client_faults, too_many_dimensions) {
  uint8_t r[256];
  uint64_t dims[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  float v = 1;
  size_t n = pack_get_reply(r, sizeof r, 9, dims, 4, &v, 4);
  fake f = {.reply = r, .reply_len = n};
  fake_start(&f);
  qins_client *c;
  cr_expect_eq(get_against(&f, &c), QINS_EPROTO);
  qins_close(c);
  fake_stop(&f);
}

/* The server goes away in the middle of a payload. */
Test(client_faults, closed_mid_payload) {
  uint8_t r[256];
  float body[2] = {1, 2};
  uint64_t dims[1] = {16};
  size_t n = pack_get_reply(r, sizeof r, 1, dims, 64, body, sizeof body);
  fake f = {.reply = r, .reply_len = n, .close_after = 1};
  fake_start(&f);
  qins_client *c;
  int rc = get_against(&f, &c);
  cr_expect(rc == QINS_ECLOSED || rc == -ECONNRESET, "%s", qins_err_name(rc));
  cr_expect_eq(qins_ping(c), QINS_ECLOSED);
  qins_close(c);
  fake_stop(&f);
}

/* A server that never answers: the call's timeout fires and the client is closed. */
Test(client_faults, a_silent_server_times_out) {
  fake f = {0};
  fake_start(&f);
  qins_client *c;
  cr_assert_eq(qins_connect(&c, f.path, 2000), 0);
  qins_set_retry(c, 0);
  qins_set_timeout(c, 100);
  cr_expect_eq(qins_ping(c), QINS_ETIMEOUT);
  cr_expect_eq(qins_ping(c), QINS_ECLOSED);
  qins_close(c);
  fake_stop(&f);
}

/* Nesting deeper than proto's limit in a result. */
Test(client_faults, deep_nesting_is_refused) {
  uint8_t r[64];
  size_t n = 0;
  r[n++] = 0x94, r[n++] = 0x01, r[n++] = 0x02, r[n++] = 0xc0;
  for (int i = 0; i < 20; i++) r[n++] = 0x91; /* [[[[...]]]] */
  r[n++] = 0xc0;
  fake f = {.reply = r, .reply_len = n};
  fake_start(&f);
  qins_client *c;
  cr_assert_eq(qins_connect(&c, f.path, 2000), 0);
  char *js = NULL;
  cr_expect_eq(qins_stats(c, &js), QINS_EPROTO);
  cr_expect_null(js);
  qins_close(c);
  fake_stop(&f);
}

/* qins.h get_many_into: the answer must hold exactly the tensors asked for. A server answering
 * with fewer (here 1 of 2) is a protocol error naming both counts, never rc 0 with buffers left
 * unwritten. */
Test(client_faults, get_many_into_refuses_fewer_tensors_than_asked) {
  msgpack_sbuffer sb;
  msgpack_packer pk;
  answer_begin(&sb, &pk, 2);
  msgpack_pack_map(&pk, 1);
  msgpack_pack_str_with_body(&pk, "tensors", 7);
  msgpack_pack_array(&pk, 1);
  msgpack_pack_map(&pk, 4);
  msgpack_pack_str_with_body(&pk, "name", 4);
  msgpack_pack_str_with_body(&pk, "a", 1);
  msgpack_pack_str_with_body(&pk, "shape", 5);
  msgpack_pack_array(&pk, 1);
  msgpack_pack_uint8(&pk, 2);
  msgpack_pack_str_with_body(&pk, "dtype", 5);
  msgpack_pack_str_with_body(&pk, "f32", 3);
  msgpack_pack_str_with_body(&pk, "data", 4);
  const float body[2] = {1.5f, -2.0f};
  msgpack_pack_bin_with_body(&pk, body, sizeof body);
  fake f = {.reply = (const uint8_t *)sb.data, .reply_len = sb.size};
  fake_start(&f);
  qins_client *c;
  cr_assert_eq(qins_connect(&c, f.path, 2000), 0);
  qins_set_timeout(c, 2000);
  float a[2] = {0}, b[2] = {7.0f, 7.0f};
  qins_get_req req[2] = {{.name = "a", .buf = a, .buf_bytes = sizeof a},
                         {.name = "b", .buf = b, .buf_bytes = sizeof b}};
  int rc = qins_get_many_into(c, "m", req, 2, QINS_F32);
  cr_expect_eq(rc, QINS_EPROTO, "an answer with 1 of 2 tensors: %s", qins_err_name(rc));
  cr_expect(strstr(qins_client_error(c), "1 tensors in the answer, 2 asked") != NULL, "%s",
            qins_client_error(c));
  cr_expect(b[0] == 7.0f && b[1] == 7.0f, "the unanswered buffer is untouched");
  qins_close(c);
  fake_stop(&f);
  msgpack_sbuffer_destroy(&sb);
}
