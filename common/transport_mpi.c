/* transport_mpi: the transport over Open MPI; the only file that includes mpi.h.
 *
 * Rank 0 is the coordinator, whose peer i is rank i + 1; a worker's only peer
 * (0) is rank 0.  One transport message is one MPI message for the header,
 * tagged TMPI_TAG_HDR or TMPI_TAG_HDR_DATA, followed in the latter case by one
 * MPI message for the frame (TMPI_TAG_DATA); MPI's ordering between two ranks
 * keeps the pair together.  All traffic uses a duplicate of MPI_COMM_WORLD
 * whose errors are returned, not fatal.
 *
 * Receiving probes (MPI_Iprobe) in a loop that spins briefly and then sleeps
 * with a growing back-off, so idle ranks do not eat the cores.  Sizes are
 * checked on the probed envelope before anything is allocated; a message
 * over its cap is received into a one-byte scratch buffer, which MPI reports
 * as truncated: that consumes it without storing it.
 *
 * Sending posts MPI_Isend for the header and frame from the caller's buffers
 * and tests them until they complete or the send time-out passes.  Large
 * messages complete only when the receiver posts its receive, so while
 * waiting the sender receives whatever arrives and queues it for
 * transport_recv(): two ranks sending to each other cannot deadlock. */
#include "transport.h"
#include "err.h"
#include "log.h"
#include "wire.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>

#ifndef WIRE_MAX_HEADER
#define WIRE_MAX_HEADER (16u << 20)
#endif

enum {
	TMPI_TAG_HDR = 101,	/* header, no frame follows */
	TMPI_TAG_HDR_DATA = 102, /* header, a frame follows */
	TMPI_TAG_DATA = 103,	/* the frame */
};

#define TMPI_QUEUE_MAX 4096	   /* messages queued while a send waits */
#define TMPI_CANCEL_WAIT_MS 200	   /* how long a timed-out send may take to cancel */
#define TMPI_SPIN_NS 50000	   /* busy polling before the first sleep */
#define TMPI_SLEEP_MAX_NS 100000	   /* longest back-off sleep */

struct mpi_msg {
	int peer;
	int bad;
	int has_data;
	uint8_t *hdr;
	size_t hdr_len, hdr_cap;
	uint8_t *data;
	size_t data_len, data_cap;
};

struct transport_mpi {
	transport base;
	MPI_Comm comm;
	int rank, size;
	int n_peers;
	int broken;	     /* a send could not be cancelled: no more MPI calls */
	int *dropped;	     /* per peer */
	char (*names)[32];   /* per peer */
	struct mpi_msg cur;  /* the message transport_recv() last returned */
	struct mpi_msg *queue; /* FIFO of messages received while sending */
	int q_len, q_cap;
};

static const struct transport_ops mpi_transport_ops;
static const uint8_t mpi_empty_frame[1];
static int mpi_initialised_here; /* MPI_Init_thread was ours: finalise on destroy */
static int mpi_in_use;		 /* one MPI transport per process */

static int64_t mpi_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static const char *mpi_strerror(int code, char *buf)
{
	int len = 0;
	if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS)
		snprintf(buf, MPI_MAX_ERROR_STRING, "MPI error %d", code);
	return buf;
}

/* Waits with back-off: call with the time waiting started. */
static void mpi_backoff(int64_t start, int64_t *sleep_ns)
{
	if (mpi_now_ns() - start < TMPI_SPIN_NS)
		return;
	struct timespec ts = {0, (long)*sleep_ns};
	nanosleep(&ts, NULL);
	if (*sleep_ns < TMPI_SLEEP_MAX_NS)
		*sleep_ns = *sleep_ns * 2 > TMPI_SLEEP_MAX_NS ? TMPI_SLEEP_MAX_NS : *sleep_ns * 2;
}

static int mpi_peer_of_rank(const struct transport_mpi *tm, int rank)
{
	return tm->rank == 0 ? rank - 1 : 0;
}

static int mpi_rank_of_peer(const struct transport_mpi *tm, int peer)
{
	return tm->rank == 0 ? peer + 1 : 0;
}

static const char *mpi_peer_name(const transport *t, int peer)
{
	const struct transport_mpi *tm = (const struct transport_mpi *)t;
	if (peer < 0 || peer >= tm->n_peers)
		return "mpi rank (invalid)";
	return tm->names[peer];
}

/* ------------------------------------------------------------ set-up */

int transport_mpi_new(int *rank, int *size, transport **out)
{
	*out = NULL;
	char ebuf[MPI_MAX_ERROR_STRING];
	if (mpi_in_use) {
		log_error("transport: only one MPI transport per process");
		return ERR_CONFIG;
	}
	int flag = 0, rc;
	MPI_Finalized(&flag);
	if (flag) {
		log_error("transport: MPI was already finalised in this process");
		return ERR_CONFIG;
	}
	MPI_Initialized(&flag);
	if (!flag) {
		int provided = 0;
		rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
		if (rc != MPI_SUCCESS) {
			log_error("transport: MPI_Init_thread failed: %s", mpi_strerror(rc, ebuf));
			return ERR_IO;
		}
		mpi_initialised_here = 1;
	}

	struct transport_mpi *tm = calloc(1, sizeof(*tm));
	if (!tm) {
		log_error("transport: out of memory for the MPI transport");
		return ERR_NOMEM;
	}
	transport_init_base(&tm->base, &mpi_transport_ops);
	tm->comm = MPI_COMM_NULL;
	mpi_in_use = 1;
	rc = MPI_Comm_dup(MPI_COMM_WORLD, &tm->comm);
	if (rc == MPI_SUCCESS)
		rc = MPI_Comm_set_errhandler(tm->comm, MPI_ERRORS_RETURN);
	if (rc == MPI_SUCCESS)
		rc = MPI_Comm_rank(tm->comm, &tm->rank);
	if (rc == MPI_SUCCESS)
		rc = MPI_Comm_size(tm->comm, &tm->size);
	if (rc != MPI_SUCCESS) {
		log_error("transport: cannot set up the MPI communicator: %s",
			  mpi_strerror(rc, ebuf));
		rc = ERR_IO;
		goto out;
	}
	tm->n_peers = tm->rank == 0 ? tm->size - 1 : 1;
	size_t n = tm->n_peers > 0 ? (size_t)tm->n_peers : 1;
	tm->dropped = calloc(n, sizeof(*tm->dropped));
	tm->names = calloc(n, sizeof(*tm->names));
	if (!tm->dropped || !tm->names) {
		log_error("transport: out of memory for %d MPI peers", tm->n_peers);
		rc = ERR_NOMEM;
		goto out;
	}
	for (int i = 0; i < tm->n_peers; i++)
		snprintf(tm->names[i], sizeof(tm->names[i]), "mpi rank %d",
			 mpi_rank_of_peer(tm, i));
	*rank = tm->rank;
	*size = tm->size;
	rc = 0;
out:
	if (rc)
		mpi_transport_ops.destroy(&tm->base);
	else
		*out = &tm->base;
	return rc;
}

static void mpi_msg_free(struct mpi_msg *m)
{
	free(m->hdr);
	free(m->data);
	memset(m, 0, sizeof(*m));
}

static void mpi_destroy(transport *t)
{
	struct transport_mpi *tm = (struct transport_mpi *)t;
	for (int i = 0; i < tm->q_len; i++)
		mpi_msg_free(&tm->queue[i]);
	free(tm->queue);
	mpi_msg_free(&tm->cur);
	free(tm->dropped);
	free(tm->names);
	if (!tm->broken) {
		if (tm->comm != MPI_COMM_NULL)
			MPI_Comm_free(&tm->comm);
		if (mpi_initialised_here)
			MPI_Finalize();
	} else {
		log_error("transport: MPI left unfinalised after a send that could not be "
			  "cancelled");
	}
	mpi_initialised_here = 0;
	mpi_in_use = 0;
	free(tm);
}

/* ------------------------------------------------------------ peers */

static void mpi_drop_peer(transport *t, int peer)
{
	struct transport_mpi *tm = (struct transport_mpi *)t;
	if (peer >= 0 && peer < tm->n_peers)
		tm->dropped[peer] = 1;
}

static int mpi_n_peers(const transport *t) { return ((const struct transport_mpi *)t)->n_peers; }

/* ------------------------------------------------------------ receive */

/* Probes for a message from src with tag until timeout_ms passes (-1:
 * forever): 0 with *st set, ERR_PEER on time-out, ERR_IO. */
static int mpi_probe_wait(struct transport_mpi *tm, int src, int tag, int timeout_ms,
			  MPI_Status *st)
{
	char ebuf[MPI_MAX_ERROR_STRING];
	int64_t start = mpi_now_ns(), sleep_ns = 1000;
	int64_t deadline = start + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000;
	for (;;) {
		int flag = 0;
		int rc = MPI_Iprobe(src, tag, tm->comm, &flag, st);
		if (rc != MPI_SUCCESS) {
			log_error("transport: MPI_Iprobe failed: %s", mpi_strerror(rc, ebuf));
			return ERR_IO;
		}
		if (flag)
			return 0;
		if (timeout_ms >= 0 && mpi_now_ns() >= deadline)
			return ERR_PEER;
		mpi_backoff(start, &sleep_ns);
	}
}

/* Consumes the probed message (src, tag) without storing it: a one-byte
 * receive, which MPI ends with MPI_ERR_TRUNCATE for anything longer. */
static int mpi_discard(struct transport_mpi *tm, int src, int tag)
{
	char ebuf[MPI_MAX_ERROR_STRING];
	uint8_t scratch[1];
	MPI_Status st;
	int rc = MPI_Recv(scratch, 1, MPI_BYTE, src, tag, tm->comm, &st);
	int cls = rc;
	if (rc != MPI_SUCCESS)
		MPI_Error_class(rc, &cls);
	if (cls == MPI_SUCCESS || cls == MPI_ERR_TRUNCATE)
		return 0;
	log_error("transport: cannot discard a message from mpi rank %d: %s", src,
		  mpi_strerror(rc, ebuf));
	return ERR_IO;
}

static int mpi_grow(uint8_t **buf, size_t *cap, size_t need)
{
	if (need <= *cap && *buf)
		return 0;
	size_t n = need ? need : 1;
	uint8_t *p = realloc(*buf, n);
	if (!p)
		return ERR_NOMEM;
	*buf = p;
	*cap = n;
	return 0;
}

/* Receives one whole message (header and its frame) whose header envelope
 * was probed into st.  Size violations give m->bad = 1 and return 0. */
static int mpi_take(struct transport_mpi *tm, const MPI_Status *st, struct mpi_msg *m)
{
	char ebuf[MPI_MAX_ERROR_STRING];
	int src = st->MPI_SOURCE, tag = st->MPI_TAG, count = 0, rc;
	MPI_Status st_copy = *st, dst;
	MPI_Get_count(&st_copy, MPI_BYTE, &count);
	m->peer = mpi_peer_of_rank(tm, src);
	m->bad = 0;
	m->has_data = 0;
	m->hdr_len = m->data_len = 0;
	const char *who = mpi_peer_name(&tm->base, m->peer);

	if (m->peer < 0 || m->peer >= tm->n_peers) {
		log_error("transport: message from mpi rank %d, which is not a peer; dropped",
			  src);
		m->peer = -1;
		m->bad = 1;
		return mpi_discard(tm, src, tag);
	}
	tm->dropped[m->peer] = 0; /* it speaks again */
	if (tag != TMPI_TAG_HDR && tag != TMPI_TAG_HDR_DATA) {
		log_error("%s: unexpected MPI message (tag %d) where a header belongs; dropped",
			  who, tag);
		m->bad = 1;
		return mpi_discard(tm, src, tag);
	}
	if (count == MPI_UNDEFINED || (size_t)count > WIRE_MAX_HEADER) {
		log_error("%s: header of %d bytes exceeds the %u-byte cap; message dropped", who,
			  count, (unsigned)WIRE_MAX_HEADER);
		m->bad = 1;
		rc = mpi_discard(tm, src, tag);
	} else {
		rc = mpi_grow(&m->hdr, &m->hdr_cap, (size_t)count);
		if (rc) {
			log_error("%s: out of memory for a %d-byte header", who, count);
			return rc;
		}
		rc = MPI_Recv(m->hdr, count, MPI_BYTE, src, tag, tm->comm, MPI_STATUS_IGNORE);
		if (rc != MPI_SUCCESS) {
			log_error("%s: receiving a header failed: %s", who, mpi_strerror(rc, ebuf));
			return ERR_IO;
		}
		m->hdr_len = (size_t)count;
	}
	if (rc || tag != TMPI_TAG_HDR_DATA)
		return rc;

	/* the frame was posted together with its header: it is on its way */
	rc = mpi_probe_wait(tm, src, TMPI_TAG_DATA, tm->base.send_timeout_ms, &dst);
	if (rc == ERR_PEER) {
		log_error("%s: the frame announced by a header did not arrive within %d ms; "
			  "message dropped",
			  who, tm->base.send_timeout_ms);
		m->bad = 1;
		return 0;
	}
	if (rc)
		return rc;
	MPI_Get_count(&dst, MPI_BYTE, &count);
	if (!m->bad && (count == MPI_UNDEFINED || (size_t)count > tm->base.frame_cap)) {
		log_error("%s: frame of %d bytes exceeds the %zu-byte cap; message dropped", who,
			  count, tm->base.frame_cap);
		m->bad = 1;
	}
	if (m->bad)
		return mpi_discard(tm, src, TMPI_TAG_DATA);
	rc = mpi_grow(&m->data, &m->data_cap, (size_t)count);
	if (rc) {
		log_error("%s: out of memory for a %d-byte frame", who, count);
		return rc;
	}
	rc = MPI_Recv(m->data, count, MPI_BYTE, src, TMPI_TAG_DATA, tm->comm, MPI_STATUS_IGNORE);
	if (rc != MPI_SUCCESS) {
		log_error("%s: receiving a frame failed: %s", who, mpi_strerror(rc, ebuf));
		return ERR_IO;
	}
	m->data_len = (size_t)count;
	m->has_data = 1;
	return 0;
}

static int mpi_any_source(const struct transport_mpi *tm)
{
	return tm->rank == 0 ? MPI_ANY_SOURCE : 0;
}

static void mpi_fill_frame(const struct mpi_msg *m, struct transport_frame *out)
{
	memset(out, 0, sizeof(*out));
	out->peer = m->peer;
	out->bad = m->bad;
	if (m->bad)
		return;
	out->hdr = m->hdr ? m->hdr : mpi_empty_frame;
	out->hdr_len = m->hdr_len;
	if (m->has_data) {
		out->data = m->data ? m->data : mpi_empty_frame;
		out->data_len = m->data_len;
	}
}

static int mpi_recv_msg(transport *t, int timeout_ms, struct transport_frame *out)
{
	struct transport_mpi *tm = (struct transport_mpi *)t;
	memset(out, 0, sizeof(*out));
	if (tm->broken)
		return ERR_PEER;
	if (tm->q_len > 0) {
		/* the oldest message received while a send waited */
		mpi_msg_free(&tm->cur);
		tm->cur = tm->queue[0];
		memmove(tm->queue, tm->queue + 1, (size_t)(tm->q_len - 1) * sizeof(*tm->queue));
		tm->q_len--;
		mpi_fill_frame(&tm->cur, out);
		return 0;
	}
	MPI_Status st;
	int rc = mpi_probe_wait(tm, mpi_any_source(tm), MPI_ANY_TAG, timeout_ms, &st);
	if (rc)
		return rc;
	rc = mpi_take(tm, &st, &tm->cur);
	if (rc)
		return rc;
	mpi_fill_frame(&tm->cur, out);
	return 0;
}

/* ------------------------------------------------------------ send */

/* While a send waits: receive one pending message into the queue, if any. */
static int mpi_queue_incoming(struct transport_mpi *tm)
{
	if (tm->q_len >= TMPI_QUEUE_MAX)
		return 0;
	int flag = 0;
	MPI_Status st;
	if (MPI_Iprobe(mpi_any_source(tm), MPI_ANY_TAG, tm->comm, &flag, &st) != MPI_SUCCESS ||
	    !flag)
		return 0;
	if (tm->q_len == tm->q_cap) {
		int cap = tm->q_cap ? tm->q_cap * 2 : 8;
		struct mpi_msg *q = realloc(tm->queue, (size_t)cap * sizeof(*q));
		if (!q) {
			log_error("transport: out of memory queueing MPI messages");
			return ERR_NOMEM;
		}
		tm->queue = q;
		tm->q_cap = cap;
	}
	struct mpi_msg *m = &tm->queue[tm->q_len];
	memset(m, 0, sizeof(*m));
	int rc = mpi_take(tm, &st, m);
	if (rc) {
		mpi_msg_free(m);
		return rc;
	}
	tm->q_len++;
	return 0;
}

/* A send timed out: try to cancel it.  0 if it completed after all, ERR_PEER
 * if it was cancelled or the transport is now broken. */
static int mpi_cancel_send(struct transport_mpi *tm, int peer, MPI_Request *req, int n)
{
	const char *who = mpi_peer_name(&tm->base, peer);
	for (int i = 0; i < n; i++)
		if (req[i] != MPI_REQUEST_NULL)
			MPI_Cancel(&req[i]);
	MPI_Status st[2];
	int64_t start = mpi_now_ns(), sleep_ns = 1000;
	int64_t deadline = start + (int64_t)TMPI_CANCEL_WAIT_MS * 1000000;
	int done = 0;
	while (!done && mpi_now_ns() < deadline) {
		if (MPI_Testall(n, req, &done, st) != MPI_SUCCESS)
			break;
		if (!done)
			mpi_backoff(start, &sleep_ns);
	}
	if (!done) {
		tm->broken = 1;
		log_error("%s: did not take a message within %d ms and the send cannot be "
			  "cancelled; the MPI transport is unusable",
			  who, tm->base.send_timeout_ms);
		return ERR_PEER;
	}
	int cancelled = 0;
	for (int i = 0; i < n; i++) {
		int c = 0;
		MPI_Test_cancelled(&st[i], &c);
		cancelled |= c;
	}
	if (!cancelled)
		return 0;
	log_error("%s: did not take a message within %d ms", who, tm->base.send_timeout_ms);
	return ERR_PEER;
}

static int mpi_send_msg(transport *t, int peer, const void *hdr, size_t hdr_len, const void *data,
			size_t data_len)
{
	struct transport_mpi *tm = (struct transport_mpi *)t;
	char ebuf[MPI_MAX_ERROR_STRING];
	if (tm->broken) {
		log_error("%s: the MPI transport is unusable", mpi_peer_name(t, peer));
		return ERR_PEER;
	}
	if (peer < 0 || peer >= tm->n_peers) {
		log_error("transport: send to MPI peer %d of %d", peer, tm->n_peers);
		return ERR_RANGE;
	}
	const char *who = tm->names[peer];
	if (tm->dropped[peer]) {
		log_error("%s: send to a dropped peer", who);
		return ERR_PEER;
	}
	if (hdr_len > INT_MAX || data_len > INT_MAX) {
		log_error("%s: message of %zu + %zu bytes is beyond MPI's %d-byte limit", who,
			  hdr_len, data_len, INT_MAX);
		return ERR_RANGE;
	}
	int dest = mpi_rank_of_peer(tm, peer);
	MPI_Request req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
	int n = data ? 2 : 1;
	int rc = MPI_Isend(hdr ? hdr : mpi_empty_frame, (int)hdr_len, MPI_BYTE, dest,
			   data ? TMPI_TAG_HDR_DATA : TMPI_TAG_HDR, tm->comm, &req[0]);
	if (rc == MPI_SUCCESS && data)
		rc = MPI_Isend(data, (int)data_len, MPI_BYTE, dest, TMPI_TAG_DATA, tm->comm,
			       &req[1]);
	if (rc != MPI_SUCCESS) {
		log_error("%s: MPI_Isend failed: %s", who, mpi_strerror(rc, ebuf));
		if (req[0] != MPI_REQUEST_NULL)
			return mpi_cancel_send(tm, peer, req, 1) ? ERR_PEER : ERR_IO;
		return ERR_IO;
	}

	int64_t start = mpi_now_ns(), sleep_ns = 1000;
	int64_t deadline = start + (int64_t)tm->base.send_timeout_ms * 1000000;
	int drain = 1; /* off after a failure to queue (already logged) */
	for (;;) {
		int done = 0;
		rc = MPI_Testall(n, req, &done, MPI_STATUSES_IGNORE);
		if (rc != MPI_SUCCESS) {
			log_error("%s: send failed: %s", who, mpi_strerror(rc, ebuf));
			return ERR_PEER;
		}
		if (done)
			return 0;
		if (drain && mpi_queue_incoming(tm))
			drain = 0;
		if (mpi_now_ns() >= deadline)
			return mpi_cancel_send(tm, peer, req, n);
		mpi_backoff(start, &sleep_ns);
	}
}

static const struct transport_ops mpi_transport_ops = {
	.send = mpi_send_msg,
	.recv = mpi_recv_msg,
	.drop_peer = mpi_drop_peer,
	.n_peers = mpi_n_peers,
	.peer_name = mpi_peer_name,
	.destroy = mpi_destroy,
};
