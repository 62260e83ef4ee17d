/* The ZeroMQ transport, coordinator (ROUTER) and workers (DEALER) in one
 * process, over ipc:// and tcp://127.0.0.1: round trips with and without a
 * raw frame, distinct peer indices, a big frame, the size caps, receive and
 * send time-outs, and sends to dropped, unknown or departed peers. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../common/err.h"
#include "../common/transport.h"
#include "../common/wire.h"

#define RECV_MS 20000 /* generous (valgrind): only a failing test waits this long */

/* plain tcp:// here; CURVE links are tested end to end by tests/test_curve.sh */
static const struct transport_zmq_security plain_tcp = {.insecure = 1};

struct pair {
	char endpoint[256];
	transport *coord;
	transport *work;
};

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void sleep_ms(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
	nanosleep(&ts, NULL);
}

/* A listening coordinator on a fresh endpoint: kind 0 = ipc, 1 = tcp. */
static void listen_fresh(int kind, struct pair *p)
{
	static int counter;
	memset(p, 0, sizeof(*p));
	char ep[256];
	if (kind == 0)
		snprintf(ep, sizeof(ep), "ipc:///tmp/moefleet-test-transport-%d-%d.sock",
			 (int)getpid(), counter++);
	else
		snprintf(ep, sizeof(ep), "tcp://127.0.0.1:*");
	assert_int_equal(transport_zmq_listen_secure(ep, &plain_tcp, &p->coord), 0);
	const char *bound = transport_zmq_endpoint(p->coord);
	assert_non_null(bound);
	snprintf(p->endpoint, sizeof(p->endpoint), "%s", bound);
	if (kind == 1)
		assert_null(strchr(p->endpoint, '*'));
}

static void connect_worker(const struct pair *p, transport **w)
{
	assert_int_equal(transport_zmq_connect_secure(p->endpoint, &plain_tcp, w), 0);
}

static void pair_close(struct pair *p)
{
	transport_destroy(&p->work);
	transport_destroy(&p->coord);
	assert_null(p->work);
	assert_null(p->coord);
}

static void send_str(transport *t, int peer, const char *s)
{
	assert_int_equal(transport_send(t, peer, s, strlen(s), NULL, 0), 0);
}

/* Receives one good message whose header is s; returns its peer. */
static int expect_str(transport *t, const char *s, struct transport_frame *f)
{
	assert_int_equal(transport_recv(t, RECV_MS, f), 0);
	assert_int_equal(f->bad, 0);
	assert_int_equal(f->hdr_len, strlen(s));
	assert_memory_equal(f->hdr, s, strlen(s));
	return f->peer;
}

/* ------------------------------------------------------------ cases */

static void round_trip(int kind)
{
	struct pair p;
	listen_fresh(kind, &p);
	connect_worker(&p, &p.work);
	assert_string_equal(transport_peer_name(p.work, 0), "zmq coordinator");
	assert_int_equal(transport_n_peers(p.coord), 0);

	/* Hello-like: header only */
	struct transport_frame f;
	send_str(p.work, 0, "hello");
	assert_int_equal(expect_str(p.coord, "hello", &f), 0);
	assert_null(f.data);
	assert_int_equal(f.data_len, 0);
	assert_int_equal(transport_n_peers(p.coord), 1);
	assert_string_equal(transport_peer_name(p.coord, 0), "zmq peer 0");

	/* header + frame back to the worker */
	float act[64];
	for (int i = 0; i < 64; i++)
		act[i] = (float)i * 0.5f;
	assert_int_equal(transport_send(p.coord, 0, "batch", 5, act, sizeof(act)), 0);
	assert_int_equal(expect_str(p.work, "batch", &f), 0);
	assert_non_null(f.data);
	assert_int_equal(f.data_len, sizeof(act));
	assert_memory_equal(f.data, act, sizeof(act));

	/* an empty frame is still a frame */
	assert_int_equal(transport_send(p.work, 0, "result", 6, act, 0), 0);
	assert_int_equal(expect_str(p.coord, "result", &f), 0);
	assert_non_null(f.data);
	assert_int_equal(f.data_len, 0);

	/* an empty header */
	assert_int_equal(transport_send(p.work, 0, NULL, 0, NULL, 0), 0);
	assert_int_equal(transport_recv(p.coord, RECV_MS, &f), 0);
	assert_int_equal(f.bad, 0);
	assert_int_equal(f.hdr_len, 0);
	assert_null(f.data);
	pair_close(&p);
}

static void test_round_trip_ipc(void **state)
{
	(void)state;
	round_trip(0);
}

static void test_round_trip_tcp(void **state)
{
	(void)state;
	round_trip(1);
}

static void many_peers(int kind)
{
	enum { N = 4 };
	struct pair p;
	listen_fresh(kind, &p);
	transport *w[N];
	for (int i = 0; i < N; i++)
		connect_worker(&p, &w[i]);

	/* in order of first message, each worker gets its own index */
	int index_of[N];
	for (int i = 0; i < N; i++) {
		char s[32];
		snprintf(s, sizeof(s), "hello %d", i);
		send_str(w[i], 0, s);
		struct transport_frame f;
		index_of[i] = expect_str(p.coord, s, &f);
		assert_int_equal(index_of[i], i);
	}
	assert_int_equal(transport_n_peers(p.coord), N);

	/* the same worker keeps its index; replies reach the right worker */
	for (int i = N - 1; i >= 0; i--) {
		char s[32];
		snprintf(s, sizeof(s), "again %d", i);
		send_str(w[i], 0, s);
		struct transport_frame f;
		assert_int_equal(expect_str(p.coord, s, &f), index_of[i]);
		snprintf(s, sizeof(s), "you are %d", index_of[i]);
		send_str(p.coord, index_of[i], s);
	}
	for (int i = 0; i < N; i++) {
		char s[32];
		snprintf(s, sizeof(s), "you are %d", index_of[i]);
		struct transport_frame f;
		expect_str(w[i], s, &f);
	}
	assert_int_equal(transport_n_peers(p.coord), N);
	for (int i = 0; i < N; i++)
		transport_destroy(&w[i]);
	pair_close(&p);
}

static void test_many_peers_ipc(void **state)
{
	(void)state;
	many_peers(0);
}

static void test_many_peers_tcp(void **state)
{
	(void)state;
	many_peers(1);
}

static void big_frame(int kind)
{
	const size_t n = (size_t)8 << 20;
	struct pair p;
	listen_fresh(kind, &p);
	connect_worker(&p, &p.work);
	uint8_t *buf = malloc(n);
	assert_non_null(buf);
	uint32_t x = 12345;
	for (size_t i = 0; i < n; i++) {
		x = x * 1664525u + 1013904223u;
		buf[i] = (uint8_t)(x >> 24);
	}
	struct transport_frame f;
	assert_int_equal(transport_send(p.work, 0, "big", 3, buf, n), 0);
	assert_int_equal(expect_str(p.coord, "big", &f), 0);
	assert_int_equal(f.data_len, n);
	assert_memory_equal(f.data, buf, n);

	buf[0] ^= 0xff;
	assert_int_equal(transport_send(p.coord, 0, "big2", 4, buf, n), 0);
	expect_str(p.work, "big2", &f);
	assert_int_equal(f.data_len, n);
	assert_memory_equal(f.data, buf, n);
	free(buf);
	pair_close(&p);
}

static void test_big_frame_ipc(void **state)
{
	(void)state;
	big_frame(0);
}

static void test_big_frame_tcp(void **state)
{
	(void)state;
	big_frame(1);
}

static void oversized(int kind)
{
	struct pair p;
	listen_fresh(kind, &p);
	transport_set_frame_cap(p.coord, (size_t)1 << 20);
	connect_worker(&p, &p.work);
	struct transport_frame f;
	send_str(p.work, 0, "hello");
	expect_str(p.coord, "hello", &f);

	/* a frame over the cap: flagged, then the next message arrives */
	size_t n = ((size_t)1 << 20) + 1;
	uint8_t *buf = calloc(1, (size_t)WIRE_MAX_HEADER + 1);
	assert_non_null(buf);
	assert_int_equal(transport_send(p.work, 0, "too big", 7, buf, n), 0);
	send_str(p.work, 0, "after frame");
	assert_int_equal(transport_recv(p.coord, RECV_MS, &f), 0);
	assert_int_equal(f.bad, 1);
	assert_int_equal(f.peer, 0);
	assert_null(f.hdr);
	assert_null(f.data);
	expect_str(p.coord, "after frame", &f);
	assert_int_equal(f.peer, 0);

	/* exactly the cap is fine */
	assert_int_equal(transport_send(p.work, 0, "at cap", 6, buf, n - 1), 0);
	expect_str(p.coord, "at cap", &f);
	assert_int_equal(f.data_len, n - 1);

	/* a header over WIRE_MAX_HEADER, with and without a frame */
	assert_int_equal(transport_send(p.work, 0, buf, (size_t)WIRE_MAX_HEADER + 1, NULL, 0), 0);
	assert_int_equal(transport_send(p.work, 0, buf, (size_t)WIRE_MAX_HEADER + 1, buf, 10), 0);
	send_str(p.work, 0, "after header");
	for (int i = 0; i < 2; i++) {
		assert_int_equal(transport_recv(p.coord, RECV_MS, &f), 0);
		assert_int_equal(f.bad, 1);
		assert_int_equal(f.peer, 0);
	}
	expect_str(p.coord, "after header", &f);

	/* the worker side enforces its cap too */
	transport_set_frame_cap(p.work, 100);
	assert_int_equal(transport_send(p.coord, 0, "x", 1, buf, 101), 0);
	send_str(p.coord, 0, "after");
	assert_int_equal(transport_recv(p.work, RECV_MS, &f), 0);
	assert_int_equal(f.bad, 1);
	expect_str(p.work, "after", &f);
	free(buf);
	pair_close(&p);
}

static void test_oversized_ipc(void **state)
{
	(void)state;
	oversized(0);
}

static void test_oversized_tcp(void **state)
{
	(void)state;
	oversized(1);
}

static void test_recv_timeout(void **state)
{
	(void)state;
	struct pair p;
	listen_fresh(1, &p);
	connect_worker(&p, &p.work);
	struct transport_frame f;
	for (int side = 0; side < 2; side++) {
		transport *t = side ? p.work : p.coord;
		double t0 = now_ms();
		assert_int_equal(transport_recv(t, 200, &f), ERR_PEER);
		double dt = now_ms() - t0;
		assert_true(dt >= 190.0);
		assert_true(dt < 400.0);
		t0 = now_ms();
		assert_int_equal(transport_recv(t, 0, &f), ERR_PEER);
		assert_true(now_ms() - t0 < 100.0);
	}
	/* a message already waiting comes back at once with timeout 0 */
	send_str(p.work, 0, "ready");
	double t0 = now_ms();
	int got = ERR_PEER;
	while (got == ERR_PEER && now_ms() - t0 < RECV_MS)
		got = transport_recv(p.coord, 0, &f);
	assert_int_equal(got, 0);
	assert_int_equal(f.hdr_len, 5);
	pair_close(&p);
}

static void test_send_errors(void **state)
{
	(void)state;
	struct pair p;
	listen_fresh(0, &p);
	struct transport_frame f;

	/* nobody has said anything yet */
	assert_int_equal(transport_send(p.coord, 0, "x", 1, NULL, 0), ERR_RANGE);
	assert_int_equal(transport_send(p.coord, -1, "x", 1, NULL, 0), ERR_RANGE);

	connect_worker(&p, &p.work);
	assert_int_equal(transport_send(p.work, 1, "x", 1, NULL, 0), ERR_RANGE);
	send_str(p.work, 0, "hello");
	expect_str(p.coord, "hello", &f);
	send_str(p.coord, 0, "welcome");
	expect_str(p.work, "welcome", &f);

	/* dropped: sends fail at once, the worker comes back under a new index */
	transport_drop_peer(p.coord, 0);
	double t0 = now_ms();
	assert_int_equal(transport_send(p.coord, 0, "x", 1, NULL, 0), ERR_PEER);
	assert_true(now_ms() - t0 < 100.0);
	send_str(p.work, 0, "hello again");
	assert_int_equal(expect_str(p.coord, "hello again", &f), 1);
	assert_int_equal(transport_n_peers(p.coord), 2);
	assert_string_equal(transport_peer_name(p.coord, 1), "zmq peer 1");
	send_str(p.coord, 1, "welcome back");
	expect_str(p.work, "welcome back", &f);

	/* departed: once the connection is gone, sends fail without hanging */
	transport_set_send_timeout(p.coord, 500);
	transport_destroy(&p.work);
	t0 = now_ms();
	int rc = 0;
	while (rc == 0 && now_ms() - t0 < 3000) {
		double s0 = now_ms();
		rc = transport_send(p.coord, 1, "anyone?", 7, NULL, 0);
		assert_true(now_ms() - s0 < 1000.0);
		if (rc == 0)
			sleep_ms(10);
	}
	assert_int_equal(rc, ERR_PEER);
	pair_close(&p);
}

/* A worker whose coordinator never answers: the queue fills, then a send
 * gives up after the send time-out instead of blocking. */
static void test_send_timeout(void **state)
{
	(void)state;
	struct pair p;
	listen_fresh(0, &p);
	transport_destroy(&p.coord); /* nobody listens any more */
	connect_worker(&p, &p.work);
	transport_set_send_timeout(p.work, 150);
	int rc = 0, sent = 0;
	double slow = 0;
	while (rc == 0 && sent < 100000) {
		double s0 = now_ms();
		rc = transport_send(p.work, 0, "queued", 6, NULL, 0);
		double dt = now_ms() - s0;
		if (rc == 0)
			sent++;
		else
			slow = dt;
	}
	assert_int_equal(rc, ERR_PEER);
	assert_true(sent > 0);
	assert_true(slow >= 140.0);
	assert_true(slow < 300.0);
	pair_close(&p);
}

static void test_ipc_cleanup(void **state)
{
	(void)state;
	struct pair p;
	listen_fresh(0, &p);
	const char *path = p.endpoint + strlen("ipc://");
	assert_int_equal(access(path, F_OK), 0);
	char copy[300];
	snprintf(copy, sizeof(copy), "%s", path);
	pair_close(&p);
	assert_int_not_equal(access(copy, F_OK), 0);
}

static void test_bad_endpoints(void **state)
{
	(void)state;
	transport *t = (transport *)1;
	assert_int_equal(transport_zmq_listen("udp://1.2.3.4:5", &t), ERR_CONFIG);
	assert_null(t);
	t = (transport *)1;
	assert_int_equal(transport_zmq_connect("tcp://", &t), ERR_CONFIG);
	assert_null(t);
	assert_int_not_equal(
	    transport_zmq_listen_secure("tcp://no-such-host.invalid:1", &plain_tcp, &t), 0);
	assert_null(t);
	/* tcp:// without keys needs an explicit insecure setting */
	t = (transport *)1;
	assert_int_equal(transport_zmq_listen("tcp://127.0.0.1:*", &t), ERR_CONFIG);
	assert_null(t);
	struct transport_zmq_security half = {.key_file = "/nonexistent.key"};
	assert_int_equal(transport_zmq_connect_secure("tcp://127.0.0.1:1", &half, &t), ERR_CONFIG);
	assert_null(t);
	assert_null(transport_zmq_endpoint(NULL));
	transport_destroy(&t); /* NULL is fine */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_round_trip_ipc), cmocka_unit_test(test_round_trip_tcp),
	    cmocka_unit_test(test_many_peers_ipc), cmocka_unit_test(test_many_peers_tcp),
	    cmocka_unit_test(test_big_frame_ipc),  cmocka_unit_test(test_big_frame_tcp),
	    cmocka_unit_test(test_oversized_ipc),  cmocka_unit_test(test_oversized_tcp),
	    cmocka_unit_test(test_recv_timeout),   cmocka_unit_test(test_send_errors),
	    cmocka_unit_test(test_send_timeout),   cmocka_unit_test(test_ipc_cleanup),
	    cmocka_unit_test(test_bad_endpoints),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
