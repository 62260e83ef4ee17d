/* The MPI transport between real ranks: run by tests/test_transport_mpi.sh
 * as `mpirun -np 3`.  Rank 0 (the coordinator) drives phases and prints one
 * TAP line per check ("ok - ..." without numbers; the script adds the plan);
 * workers count their own failed checks and report them at the end.
 *
 * Phases: ping/pong with and without frames, both sides sending 8 MiB frames
 * to each other at the same time (the send must not deadlock), oversized
 * frame and header flagged bad with the next message intact, dropping a
 * peer, receive time-out. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../common/err.h"
#include "../common/log.h"
#include "../common/transport.h"
#include "../common/wire.h"

#define RECV_MS 8000
#define BIG	(((size_t)8 << 20) + 12345) /* three 4 MiB chunks, the last short */

static int n_fail;

static void check(int ok, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	char line[256];
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	printf("%s - %s\n", ok ? "ok" : "not ok", line);
	fflush(stdout);
	if (!ok)
		n_fail++;
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void fill(uint8_t *buf, size_t n, uint32_t seed)
{
	uint32_t x = seed;
	for (size_t i = 0; i < n; i++) {
		x = x * 1664525u + 1013904223u;
		buf[i] = (uint8_t)(x >> 24);
	}
}

static int is_str(const struct transport_frame *f, const char *s)
{
	return !f->bad && f->hdr_len == strlen(s) && !memcmp(f->hdr, s, f->hdr_len);
}

static int send_str(transport *t, int peer, const char *s)
{
	return transport_send(t, peer, s, strlen(s), NULL, 0);
}

/* ------------------------------------------------------------ worker */

static int worker_check(int ok, const char *what, int rank)
{
	if (!ok) {
		fprintf(stderr, "rank %d: check failed: %s\n", rank, what);
		n_fail++;
	}
	return ok;
}

static void worker_run(transport *t, int rank)
{
	uint8_t *big = malloc((size_t)WIRE_MAX_HEADER + 1);
	uint8_t *expect = malloc(BIG);
	if (!big || !expect) {
		fprintf(stderr, "rank %d: out of memory\n", rank);
		exit(1);
	}
	worker_check(transport_n_peers(t) == 1, "one peer", rank);
	for (;;) {
		struct transport_frame f;
		int rc = transport_recv(t, RECV_MS, &f);
		if (!worker_check(rc == 0 && !f.bad && f.peer == 0, "receive a command", rank))
			break;
		char cmd[64];
		snprintf(cmd, sizeof(cmd), "%.*s", (int)(f.hdr_len < 63 ? f.hdr_len : 63),
			 (const char *)f.hdr);
		if (!strcmp(cmd, "ping")) {
			worker_check(f.data == NULL, "ping has no frame", rank);
			char s[32];
			snprintf(s, sizeof(s), "pong %d", rank);
			fill(big, 1000u * (unsigned)rank, (uint32_t)rank);
			transport_send(t, 0, s, strlen(s), big, 1000u * (unsigned)rank);
		} else if (!strcmp(cmd, "big")) {
			/* send ours before taking the coordinator's: both wait on each other */
			fill(big, BIG, 100u + (uint32_t)rank);
			worker_check(transport_send(t, 0, "mybig", 5, big, BIG) == 0, "send big",
				     rank);
			rc = transport_recv(t, RECV_MS, &f);
			fill(expect, BIG, 200u + (uint32_t)rank);
			int ok = rc == 0 && is_str(&f, "yourbig") && f.data_len == BIG &&
				 !memcmp(f.data, expect, BIG);
			worker_check(ok, "receive big", rank);
			send_str(t, 0, ok ? "bigok" : "bigbad");
		} else if (!strcmp(cmd, "oversize")) {
			memset(big, 0, (size_t)WIRE_MAX_HEADER + 1);
			transport_send(t, 0, "frame", 5, big, ((size_t)1 << 20) + 1);
			transport_send(t, 0, big, (size_t)WIRE_MAX_HEADER + 1, NULL, 0);
			transport_send(t, 0, big, (size_t)WIRE_MAX_HEADER + 1, big, 10);
			send_str(t, 0, "after");
		} else if (!strcmp(cmd, "drop")) {
			struct timespec ts = {0, 100 * 1000000};
			nanosleep(&ts, NULL);
			send_str(t, 0, "back");
		} else if (!strcmp(cmd, "bye")) {
			char s[32];
			snprintf(s, sizeof(s), "failures %d", n_fail);
			send_str(t, 0, s);
			break;
		} else {
			worker_check(0, "known command", rank);
		}
	}
	free(big);
	free(expect);
}

/* ------------------------------------------------------------ coordinator */

static void coord_run(transport *t, int size)
{
	int n = size - 1;
	struct transport_frame f;
	uint8_t *buf = malloc(BIG);
	if (!buf) {
		check(0, "memory");
		return;
	}
	check(transport_n_peers(t) == n, "coordinator has %d peers", n);
	check(!strcmp(transport_peer_name(t, 0), "mpi rank 1"), "peer 0 is named mpi rank 1");

	/* ping / pong: header only one way, header + frame back */
	for (int i = 0; i < n; i++)
		check(send_str(t, i, "ping") == 0, "send ping to peer %d", i);
	int seen = 0;
	for (int k = 0; k < n; k++) {
		int rc = transport_recv(t, RECV_MS, &f);
		if (rc || f.bad || f.peer < 0 || f.peer >= n) {
			check(0, "receive pong");
			continue;
		}
		int rank = f.peer + 1;
		char s[32];
		snprintf(s, sizeof(s), "pong %d", rank);
		fill(buf, 1000u * (unsigned)rank, (uint32_t)rank);
		check(is_str(&f, s) && f.data && f.data_len == 1000u * (unsigned)rank &&
			  !memcmp(f.data, buf, f.data_len),
		      "pong from %s with a %zu-byte frame", transport_peer_name(t, f.peer),
		      f.data_len);
		seen |= 1 << f.peer;
	}
	check(seen == (1 << n) - 1, "every worker answered once");

	/* 8 MiB both ways at the same time */
	for (int i = 0; i < n; i++)
		send_str(t, i, "big");
	int ok = 1;
	for (int i = 0; i < n; i++) {
		fill(buf, BIG, 200u + (uint32_t)(i + 1));
		ok &= transport_send(t, i, "yourbig", 7, buf, BIG) == 0;
	}
	check(ok, "send 8 MiB to every worker while they send 8 MiB to us");
	int got_big = 0, got_ok = 0;
	for (int k = 0; k < 2 * n; k++) {
		if (transport_recv(t, RECV_MS, &f) || f.bad)
			break;
		if (is_str(&f, "mybig")) {
			fill(buf, BIG, 100u + (uint32_t)(f.peer + 1));
			got_big += f.data_len == BIG && !memcmp(f.data, buf, BIG);
		} else if (is_str(&f, "bigok")) {
			got_ok++;
		}
	}
	check(got_big == n, "8 MiB frames from every worker intact (%d/%d)", got_big, n);
	check(got_ok == n, "every worker got its 8 MiB frame intact (%d/%d)", got_ok, n);

	/* size caps: frame over the cap, header over WIRE_MAX_HEADER (alone and
	 * with a frame), then a normal message */
	transport_set_frame_cap(t, (size_t)1 << 20);
	send_str(t, 0, "oversize");
	int bad = 0;
	for (int k = 0; k < 3; k++)
		bad += transport_recv(t, RECV_MS, &f) == 0 && f.bad && f.peer == 0;
	check(bad == 3, "oversized frame and headers flagged bad (%d/3)", bad);
	check(transport_recv(t, RECV_MS, &f) == 0 && is_str(&f, "after") && f.peer == 0,
	      "the message after them arrives");
	transport_set_frame_cap(t, TRANSPORT_FRAME_CAP_DEFAULT);

	/* peers: out of range, dropped, back after it speaks again */
	check(send_str(t, n, "x") == ERR_RANGE, "send to peer %d (no such rank) fails", n);
	send_str(t, 0, "drop");
	transport_drop_peer(t, 0);
	check(send_str(t, 0, "x") == ERR_PEER, "send to a dropped peer fails");
	check(transport_recv(t, RECV_MS, &f) == 0 && is_str(&f, "back") && f.peer == 0,
	      "a dropped rank speaks again under its index");
	check(send_str(t, 0, "ping") == 0, "send to it works again");
	check(transport_recv(t, RECV_MS, &f) == 0 && f.peer == 0 && is_str(&f, "pong 1"),
	      "and it answers");

	/* nothing pending: the receive times out on time */
	double t0 = now_ms();
	int rc = transport_recv(t, 200, &f);
	double dt = now_ms() - t0;
	check(rc == ERR_PEER && dt >= 190 && dt < 400, "receive times out after %.0f ms", dt);

	/* the workers' own checks */
	for (int i = 0; i < n; i++)
		send_str(t, i, "bye");
	for (int k = 0; k < n; k++) {
		rc = transport_recv(t, RECV_MS, &f);
		check(rc == 0 && is_str(&f, "failures 0"), "%s passed its own checks",
		      rc == 0 ? transport_peer_name(t, f.peer) : "a worker");
	}
	free(buf);
}

int main(void)
{
	if (!transport_mpi_launched()) {
		printf("1..0 # SKIP not started by mpirun (see tests/test_transport_mpi.sh)\n");
		return 77;
	}
	int rank = -1, size = 0;
	transport *t = NULL;
	int rc = transport_mpi_new(&rank, &size, &t);
	if (rc == ERR_CONFIG) {
		const char *r = getenv("OMPI_COMM_WORLD_RANK");
		if (!r || !strcmp(r, "0"))
			printf("1..0 # SKIP built without MPI\n");
		return 77;
	}
	if (rc) {
		printf("not ok - transport_mpi_new: %s\n", err_str(rc));
		return 1;
	}
	if (rank == 0) {
		check(size >= 2, "at least 2 ranks (got %d)", size);
		if (size >= 2)
			coord_run(t, size);
	} else {
		worker_run(t, rank);
	}
	transport_destroy(&t);
	return n_fail ? 1 : 0;
}
