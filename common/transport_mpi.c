/* transport_mpi: the transport over Open MPI; the only file that includes mpi.h.
 *
 * Rank 0 is the coordinator, whose peer i is rank i + 1; a worker's only peer
 * (0) is rank 0.  All traffic uses a duplicate of MPI_COMM_WORLD whose errors
 * are returned, not fatal.
 *
 * On the wire one transport message is:
 *   - a head (tag TMPI_TAG_HEAD): a 24-byte prefix {magic, flags, header
 *     length, frame length} followed by the header itself when it is at most
 *     TMPI_INLINE bytes;
 *   - a longer header, then the frame, as body messages (tag TMPI_TAG_BODY)
 *     of at most TMPI_CHUNK bytes each.
 * MPI keeps messages between two ranks in order, so the pieces stay together.
 * The receiver knows every size from the prefix before it allocates, and a
 * message over its cap is consumed chunk by chunk into one TMPI_CHUNK-sized
 * scratch buffer and dropped.  (Receiving into a too-small buffer and
 * letting MPI truncate is not an option: Open MPI 4.1's shared-memory
 * single-copy path crashes on it.)  Chunking also lifts MPI's INT_MAX count
 * limit.
 *
 * Receiving probes (MPI_Iprobe) in a loop that spins briefly and then sleeps
 * with a growing back-off (at most TMPI_SLEEP_MAX_NS), so idle ranks do not
 * eat the cores.
 *
 * Sending posts MPI_Isend for every piece from the caller's buffers (a short
 * header is copied next to the prefix) and tests them until they complete or
 * the send time-out passes.  Large pieces complete only when the receiver
 * posts its receive, so while waiting the sender receives whatever arrives
 * and queues it for transport_recv(): two ranks sending to each other cannot
 * deadlock. */
#include "transport.h"
#include "err.h"
#include "log.h"
#include "wire.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>

enum {
	TMPI_TAG_HEAD = 101,
	TMPI_TAG_BODY = 102,
};

#define TMPI_MAGIC	    0x3154464du	      /* "MFT1" */
#define TMPI_FLAG_DATA	    1u		      /* a frame follows */
#define TMPI_PREFIX	    24		      /* bytes of the head's prefix */
#define TMPI_INLINE	    (64u << 10)	      /* headers up to this travel in the head */
#define TMPI_CHUNK	    ((size_t)4 << 20) /* largest body message */
#define TMPI_QUEUE_MAX	    4096	      /* messages queued while a send waits */
#define TMPI_CANCEL_WAIT_MS 200		      /* how long a timed-out send may take to cancel */
#define TMPI_SPIN_NS	    50000	      /* busy polling before the first sleep */
#define TMPI_SLEEP_MAX_NS   100000	      /* longest back-off sleep */

struct tmpi_msg {
	int peer;
	int bad;
	int has_data;
	const uint8_t *hdr; /* into head or hbuf */
	size_t hdr_len;
	size_t data_len;
	uint8_t *head; /* prefix + inline header */
	size_t head_cap;
	uint8_t *hbuf; /* a header sent in body chunks */
	size_t hbuf_cap;
	uint8_t *data;
	size_t data_cap;
};

struct transport_mpi {
	transport base;
	MPI_Comm comm;
	int rank, size;
	int n_peers;
	int broken;		/* a send could not be cancelled: no more MPI calls */
	int *dropped;		/* per peer */
	char (*names)[32];	/* per peer */
	struct tmpi_msg cur;	/* the message transport_recv() last returned */
	struct tmpi_msg *queue; /* FIFO of messages received while sending */
	int q_len, q_cap;
	uint8_t *scratch; /* discarded chunks land here */
	size_t scratch_cap;
	uint8_t head_out[TMPI_PREFIX + TMPI_INLINE]; /* the head being sent */
};

static const struct transport_ops tmpi_transport_ops;
static const uint8_t tmpi_empty_frame[1];
static int tmpi_initialised_here; /* MPI_Init_thread was ours: finalise on destroy */
static int tmpi_in_use;		  /* one MPI transport per process */

static int64_t tmpi_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static const char *tmpi_strerror(int code, char *buf)
{
	int len = 0;
	if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS)
		snprintf(buf, MPI_MAX_ERROR_STRING, "MPI error %d", code);
	return buf;
}

/* Waits with back-off: call with the time waiting started. */
static void tmpi_backoff(int64_t start, int64_t *sleep_ns)
{
	if (tmpi_now_ns() - start < TMPI_SPIN_NS)
		return;
	struct timespec ts = {0, (long)*sleep_ns};
	nanosleep(&ts, NULL);
	*sleep_ns = *sleep_ns * 2 > TMPI_SLEEP_MAX_NS ? TMPI_SLEEP_MAX_NS : *sleep_ns * 2;
}

static int tmpi_peer_of_rank(const struct transport_mpi *tm, int rank)
{
	return tm->rank == 0 ? rank - 1 : 0;
}

static int tmpi_rank_of_peer(const struct transport_mpi *tm, int peer)
{
	return tm->rank == 0 ? peer + 1 : 0;
}

static const char *tmpi_peer_name(const transport *t, int peer)
{
	const struct transport_mpi *tm = (const struct transport_mpi *)t;
	if (peer < 0 || peer >= tm->n_peers)
		return "mpi rank (invalid)";
	return tm->names[peer];
}

static size_t tmpi_n_chunks(size_t len)
{
	return (len + TMPI_CHUNK - 1) / TMPI_CHUNK;
}

/* ------------------------------------------------------------ set-up */

int transport_mpi_new(int *rank, int *size, transport **out)
{
	*out = NULL;
	char ebuf[MPI_MAX_ERROR_STRING];
	if (tmpi_in_use) {
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
			log_error("transport: MPI_Init_thread failed: %s", tmpi_strerror(rc, ebuf));
			return ERR_IO;
		}
		tmpi_initialised_here = 1;
	}

	struct transport_mpi *tm = calloc(1, sizeof(*tm));
	if (!tm) {
		log_error("transport: out of memory for the MPI transport");
		return ERR_NOMEM;
	}
	transport_init_base(&tm->base, &tmpi_transport_ops);
	tm->comm = MPI_COMM_NULL;
	tmpi_in_use = 1;
	rc = MPI_Comm_dup(MPI_COMM_WORLD, &tm->comm);
	if (rc == MPI_SUCCESS)
		rc = MPI_Comm_set_errhandler(tm->comm, MPI_ERRORS_RETURN);
	if (rc == MPI_SUCCESS)
		rc = MPI_Comm_rank(tm->comm, &tm->rank);
	if (rc == MPI_SUCCESS)
		rc = MPI_Comm_size(tm->comm, &tm->size);
	if (rc != MPI_SUCCESS) {
		log_error("transport: cannot set up the MPI communicator: %s",
			  tmpi_strerror(rc, ebuf));
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
			 tmpi_rank_of_peer(tm, i));
	*rank = tm->rank;
	*size = tm->size;
	rc = 0;
out:
	if (rc)
		tmpi_transport_ops.destroy(&tm->base);
	else
		*out = &tm->base;
	return rc;
}

static void tmpi_msg_free(struct tmpi_msg *m)
{
	free(m->head);
	free(m->hbuf);
	free(m->data);
	memset(m, 0, sizeof(*m));
}

static void tmpi_destroy(transport *t)
{
	struct transport_mpi *tm = (struct transport_mpi *)t;
	for (int i = 0; i < tm->q_len; i++)
		tmpi_msg_free(&tm->queue[i]);
	free(tm->queue);
	tmpi_msg_free(&tm->cur);
	free(tm->scratch);
	free(tm->dropped);
	free(tm->names);
	if (!tm->broken) {
		if (tm->comm != MPI_COMM_NULL)
			MPI_Comm_free(&tm->comm);
		if (tmpi_initialised_here)
			MPI_Finalize();
	} else {
		log_error("transport: MPI left unfinalised after a send that could not be "
			  "cancelled");
	}
	tmpi_initialised_here = 0;
	tmpi_in_use = 0;
	free(tm);
}

/* ------------------------------------------------------------ peers */

static void tmpi_drop_peer(transport *t, int peer)
{
	struct transport_mpi *tm = (struct transport_mpi *)t;
	if (peer >= 0 && peer < tm->n_peers)
		tm->dropped[peer] = 1;
}

static int tmpi_n_peers(const transport *t)
{
	return ((const struct transport_mpi *)t)->n_peers;
}

/* ------------------------------------------------------------ receive */

/* Probes for a message from src with tag until timeout_ms passes (-1:
 * forever): 0 with *st set, ERR_PEER on time-out, ERR_IO. */
static int tmpi_probe_wait(struct transport_mpi *tm, int src, int tag, int timeout_ms,
			   MPI_Status *st)
{
	char ebuf[MPI_MAX_ERROR_STRING];
	int64_t start = tmpi_now_ns(), sleep_ns = 1000;
	int64_t deadline = start + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000;
	for (;;) {
		int flag = 0;
		int rc = MPI_Iprobe(src, tag, tm->comm, &flag, st);
		if (rc != MPI_SUCCESS) {
			log_error("transport: MPI_Iprobe failed: %s", tmpi_strerror(rc, ebuf));
			return ERR_IO;
		}
		if (flag)
			return 0;
		if (timeout_ms >= 0 && tmpi_now_ns() >= deadline)
			return ERR_PEER;
		tmpi_backoff(start, &sleep_ns);
	}
}

static int tmpi_grow(uint8_t **buf, size_t *cap, size_t need)
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

/* Receives the probed message (src, tag, count bytes) into dst, or into the
 * scratch buffer when dst is NULL (dropping it). */
static int tmpi_recv_probed(struct transport_mpi *tm, int src, int tag, int count, uint8_t *dst)
{
	char ebuf[MPI_MAX_ERROR_STRING];
	if (!dst) {
		/* count is at most TMPI_CHUNK + TMPI_PREFIX from a well-behaved peer */
		if (tmpi_grow(&tm->scratch, &tm->scratch_cap, (size_t)count)) {
			log_error("%s: out of memory dropping a %d-byte message",
				  tmpi_peer_name(&tm->base, tmpi_peer_of_rank(tm, src)), count);
			return ERR_NOMEM;
		}
		dst = tm->scratch;
	}
	int rc = MPI_Recv(dst, count, MPI_BYTE, src, tag, tm->comm, MPI_STATUS_IGNORE);
	if (rc != MPI_SUCCESS) {
		log_error("%s: MPI_Recv failed: %s",
			  tmpi_peer_name(&tm->base, tmpi_peer_of_rank(tm, src)),
			  tmpi_strerror(rc, ebuf));
		return ERR_IO;
	}
	return 0;
}

/* Receives len bytes sent as body chunks from src into dst (NULL: drop
 * them).  *bad is set when a chunk is missing or has the wrong size. */
static int tmpi_recv_body(struct transport_mpi *tm, int src, uint8_t *dst, size_t len, int *bad)
{
	const char *who = tmpi_peer_name(&tm->base, tmpi_peer_of_rank(tm, src));
	for (size_t off = 0; off < len;) {
		size_t want = len - off < TMPI_CHUNK ? len - off : TMPI_CHUNK;
		MPI_Status st;
		int rc = tmpi_probe_wait(tm, src, TMPI_TAG_BODY, tm->base.send_timeout_ms, &st);
		if (rc == ERR_PEER) {
			log_error("%s: a message's remaining %zu bytes did not arrive within %d ms",
				  who, len - off, tm->base.send_timeout_ms);
			*bad = 1;
			return 0;
		}
		if (rc)
			return rc;
		int count = 0;
		MPI_Get_count(&st, MPI_BYTE, &count);
		if (count < 0 || (size_t)count != want) {
			log_error("%s: body chunk of %d bytes where %zu belong", who, count, want);
			*bad = 1;
			return tmpi_recv_probed(tm, src, TMPI_TAG_BODY, count < 0 ? 0 : count,
						NULL);
		}
		rc = tmpi_recv_probed(tm, src, TMPI_TAG_BODY, count, dst ? dst + off : NULL);
		if (rc)
			return rc;
		off += want;
	}
	return 0;
}

static uint32_t tmpi_get_u32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

static uint64_t tmpi_get_u64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

/* Receives one whole message whose head was probed into st.  Size
 * violations give m->bad = 1 and return 0; the rest of the message is
 * consumed either way. */
static int tmpi_take(struct transport_mpi *tm, const MPI_Status *st, struct tmpi_msg *m)
{
	int src = st->MPI_SOURCE, count = 0, rc;
	MPI_Status st_copy = *st;
	MPI_Get_count(&st_copy, MPI_BYTE, &count);
	m->peer = tmpi_peer_of_rank(tm, src);
	m->bad = 0;
	m->has_data = 0;
	m->hdr = NULL;
	m->hdr_len = m->data_len = 0;
	const char *who = tmpi_peer_name(&tm->base, m->peer);

	if (count < TMPI_PREFIX || (size_t)count > TMPI_PREFIX + TMPI_INLINE) {
		log_error("%s: MPI message of %d bytes is not a transport head; dropped", who,
			  count);
		m->bad = 1;
		return tmpi_recv_probed(tm, src, st->MPI_TAG, count < 0 ? 0 : count, NULL);
	}
	if (tmpi_grow(&m->head, &m->head_cap, TMPI_PREFIX + TMPI_INLINE)) {
		log_error("%s: out of memory for a message head", who);
		return ERR_NOMEM;
	}
	rc = tmpi_recv_probed(tm, src, TMPI_TAG_HEAD, count, m->head);
	if (rc)
		return rc;
	uint32_t magic = tmpi_get_u32(m->head), flags = tmpi_get_u32(m->head + 4);
	uint64_t hdr_len = tmpi_get_u64(m->head + 8), data_len = tmpi_get_u64(m->head + 16);
	int inl = hdr_len <= TMPI_INLINE;
	if (magic != TMPI_MAGIC || (inl && (size_t)count != TMPI_PREFIX + hdr_len) ||
	    (!inl && count != TMPI_PREFIX) || (!(flags & TMPI_FLAG_DATA) && data_len)) {
		log_error("%s: malformed transport head (%d bytes); dropped", who, count);
		m->bad = 1;
		return 0;
	}
	if (m->peer >= 0 && m->peer < tm->n_peers)
		tm->dropped[m->peer] = 0; /* it speaks again */

	if (hdr_len > WIRE_MAX_HEADER) {
		log_error("%s: header of %llu bytes exceeds the %u-byte cap; message dropped", who,
			  (unsigned long long)hdr_len, (unsigned)WIRE_MAX_HEADER);
		m->bad = 1;
	} else if ((flags & TMPI_FLAG_DATA) && data_len > tm->base.frame_cap) {
		log_error("%s: frame of %llu bytes exceeds the %zu-byte cap; message dropped", who,
			  (unsigned long long)data_len, tm->base.frame_cap);
		m->bad = 1;
	}

	/* the header */
	if (inl) {
		m->hdr = m->head + TMPI_PREFIX;
	} else if (m->bad) {
		rc = tmpi_recv_body(tm, src, NULL, hdr_len, &m->bad);
	} else if (tmpi_grow(&m->hbuf, &m->hbuf_cap, hdr_len)) {
		log_error("%s: out of memory for a %llu-byte header", who,
			  (unsigned long long)hdr_len);
		return ERR_NOMEM;
	} else {
		m->hdr = m->hbuf;
		rc = tmpi_recv_body(tm, src, m->hbuf, hdr_len, &m->bad);
	}
	if (rc)
		return rc;
	m->hdr_len = hdr_len;

	/* the frame */
	if (!(flags & TMPI_FLAG_DATA))
		return 0;
	if (m->bad)
		return tmpi_recv_body(tm, src, NULL, data_len, &m->bad);
	if (tmpi_grow(&m->data, &m->data_cap, data_len)) {
		log_error("%s: out of memory for a %llu-byte frame", who,
			  (unsigned long long)data_len);
		return ERR_NOMEM;
	}
	rc = tmpi_recv_body(tm, src, m->data, data_len, &m->bad);
	m->data_len = data_len;
	m->has_data = 1;
	return rc;
}

static int tmpi_any_source(const struct transport_mpi *tm)
{
	return tm->rank == 0 ? MPI_ANY_SOURCE : 0;
}

/* Probes for the next message's head, dropping stray body chunks (left over
 * from a message cut short). */
static int tmpi_probe_head(struct transport_mpi *tm, int timeout_ms, MPI_Status *st)
{
	int64_t deadline = tmpi_now_ns() + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000;
	for (;;) {
		int left = timeout_ms;
		if (timeout_ms > 0) {
			int64_t ns = deadline - tmpi_now_ns();
			left = ns > 0 ? (int)((ns + 999999) / 1000000) : 0;
		}
		int rc = tmpi_probe_wait(tm, tmpi_any_source(tm), MPI_ANY_TAG, left, st);
		if (rc)
			return rc;
		if (st->MPI_TAG == TMPI_TAG_HEAD)
			return 0;
		int count = 0;
		MPI_Get_count(st, MPI_BYTE, &count);
		log_error("%s: stray MPI message (tag %d, %d bytes) dropped",
			  tmpi_peer_name(&tm->base, tmpi_peer_of_rank(tm, st->MPI_SOURCE)),
			  st->MPI_TAG, count);
		rc = tmpi_recv_probed(tm, st->MPI_SOURCE, st->MPI_TAG, count < 0 ? 0 : count, NULL);
		if (rc)
			return rc;
	}
}

static void tmpi_fill_frame(const struct tmpi_msg *m, struct transport_frame *out)
{
	memset(out, 0, sizeof(*out));
	out->peer = m->peer;
	out->bad = m->bad;
	if (m->bad)
		return;
	out->hdr = m->hdr ? m->hdr : tmpi_empty_frame;
	out->hdr_len = m->hdr_len;
	if (m->has_data) {
		out->data = m->data ? m->data : tmpi_empty_frame;
		out->data_len = m->data_len;
	}
}

static int tmpi_recv_msg(transport *t, int timeout_ms, struct transport_frame *out)
{
	struct transport_mpi *tm = (struct transport_mpi *)t;
	memset(out, 0, sizeof(*out));
	if (tm->broken)
		return ERR_PEER;
	if (tm->q_len > 0) {
		/* the oldest message received while a send waited */
		tmpi_msg_free(&tm->cur);
		tm->cur = tm->queue[0];
		memmove(tm->queue, tm->queue + 1, (size_t)(tm->q_len - 1) * sizeof(*tm->queue));
		tm->q_len--;
		tmpi_fill_frame(&tm->cur, out);
		return 0;
	}
	MPI_Status st;
	int rc = tmpi_probe_head(tm, timeout_ms, &st);
	if (rc)
		return rc;
	rc = tmpi_take(tm, &st, &tm->cur);
	if (rc)
		return rc;
	tmpi_fill_frame(&tm->cur, out);
	return 0;
}

/* ------------------------------------------------------------ send */

/* While a send waits: receive one pending message into the queue, if any. */
static int tmpi_queue_incoming(struct transport_mpi *tm)
{
	if (tm->q_len >= TMPI_QUEUE_MAX)
		return 0;
	int flag = 0;
	MPI_Status st;
	if (MPI_Iprobe(tmpi_any_source(tm), TMPI_TAG_HEAD, tm->comm, &flag, &st) != MPI_SUCCESS ||
	    !flag)
		return 0;
	if (tm->q_len == tm->q_cap) {
		int cap = tm->q_cap ? tm->q_cap * 2 : 8;
		struct tmpi_msg *q = realloc(tm->queue, (size_t)cap * sizeof(*q));
		if (!q) {
			log_error("transport: out of memory queueing MPI messages");
			return ERR_NOMEM;
		}
		tm->queue = q;
		tm->q_cap = cap;
	}
	struct tmpi_msg *m = &tm->queue[tm->q_len];
	memset(m, 0, sizeof(*m));
	int rc = tmpi_take(tm, &st, m);
	if (rc) {
		tmpi_msg_free(m);
		return rc;
	}
	tm->q_len++;
	return 0;
}

/* A send timed out: try to cancel it.  0 if it completed after all, ERR_PEER
 * if it was cancelled or the transport is now broken. */
static int tmpi_cancel_send(struct transport_mpi *tm, int peer, MPI_Request *req, int n)
{
	const char *who = tmpi_peer_name(&tm->base, peer);
	for (int i = 0; i < n; i++)
		if (req[i] != MPI_REQUEST_NULL)
			MPI_Cancel(&req[i]);
	int64_t start = tmpi_now_ns(), sleep_ns = 1000;
	int64_t deadline = start + (int64_t)TMPI_CANCEL_WAIT_MS * 1000000;
	int cancelled = 0, pending = n;
	while (pending && tmpi_now_ns() < deadline) {
		pending = 0;
		for (int i = 0; i < n; i++) {
			if (req[i] == MPI_REQUEST_NULL)
				continue;
			int done = 0, c = 0;
			MPI_Status st;
			if (MPI_Test(&req[i], &done, &st) != MPI_SUCCESS)
				done = 0;
			if (done) {
				MPI_Test_cancelled(&st, &c);
				cancelled |= c;
			} else {
				pending++;
			}
		}
		if (pending)
			tmpi_backoff(start, &sleep_ns);
	}
	if (pending) {
		tm->broken = 1;
		log_error("%s: did not take a message within %d ms and the send cannot be "
			  "cancelled; the MPI transport is unusable",
			  who, tm->base.send_timeout_ms);
		return ERR_PEER;
	}
	if (!cancelled)
		return 0;
	log_error("%s: did not take a message within %d ms", who, tm->base.send_timeout_ms);
	return ERR_PEER;
}

/* Posts len bytes from buf as body chunks; *n counts the requests. */
static int tmpi_post_body(struct transport_mpi *tm, int dest, const uint8_t *buf, size_t len,
			  MPI_Request *req, int *n)
{
	for (size_t off = 0; off < len; off += TMPI_CHUNK) {
		size_t c = len - off < TMPI_CHUNK ? len - off : TMPI_CHUNK;
		int rc =
		    MPI_Isend(buf + off, (int)c, MPI_BYTE, dest, TMPI_TAG_BODY, tm->comm, &req[*n]);
		if (rc != MPI_SUCCESS)
			return rc;
		(*n)++;
	}
	return MPI_SUCCESS;
}

static int tmpi_send_msg(transport *t, int peer, const void *hdr, size_t hdr_len, const void *data,
			 size_t data_len)
{
	struct transport_mpi *tm = (struct transport_mpi *)t;
	char ebuf[MPI_MAX_ERROR_STRING];
	if (tm->broken) {
		log_error("%s: the MPI transport is unusable", tmpi_peer_name(t, peer));
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
	int dest = tmpi_rank_of_peer(tm, peer);
	int inl = hdr_len <= TMPI_INLINE;
	size_t n_req =
	    1 + (inl ? 0 : tmpi_n_chunks(hdr_len)) + (data ? tmpi_n_chunks(data_len) : 0);
	MPI_Request req_small[8], *req = req_small;
	if (n_req > sizeof(req_small) / sizeof(req_small[0])) {
		req = malloc(n_req * sizeof(*req));
		if (!req) {
			log_error("%s: out of memory for %zu send requests", who, n_req);
			return ERR_NOMEM;
		}
	}
	for (size_t i = 0; i < n_req; i++)
		req[i] = MPI_REQUEST_NULL;

	uint8_t *h = tm->head_out;
	uint32_t magic = TMPI_MAGIC, flags = data ? TMPI_FLAG_DATA : 0;
	uint64_t hl = hdr_len, dl = data ? data_len : 0;
	memcpy(h, &magic, 4);
	memcpy(h + 4, &flags, 4);
	memcpy(h + 8, &hl, 8);
	memcpy(h + 16, &dl, 8);
	if (inl && hdr_len)
		memcpy(h + TMPI_PREFIX, hdr, hdr_len);
	int n = 0;
	int rc = MPI_Isend(h, TMPI_PREFIX + (inl ? (int)hdr_len : 0), MPI_BYTE, dest, TMPI_TAG_HEAD,
			   tm->comm, &req[n]);
	if (rc == MPI_SUCCESS)
		n++;
	if (rc == MPI_SUCCESS && !inl)
		rc = tmpi_post_body(tm, dest, hdr, hdr_len, req, &n);
	if (rc == MPI_SUCCESS && data)
		rc = tmpi_post_body(tm, dest, data, data_len, req, &n);
	if (rc != MPI_SUCCESS) {
		log_error("%s: MPI_Isend failed: %s", who, tmpi_strerror(rc, ebuf));
		tmpi_cancel_send(tm, peer, req, n);
		rc = ERR_IO;
		goto out;
	}

	int64_t start = tmpi_now_ns(), sleep_ns = 1000;
	int64_t deadline = start + (int64_t)tm->base.send_timeout_ms * 1000000;
	int drain = 1; /* off after a failure to queue (already logged) */
	for (;;) {
		int done = 0;
		rc = MPI_Testall(n, req, &done, MPI_STATUSES_IGNORE);
		if (rc != MPI_SUCCESS) {
			log_error("%s: send failed: %s", who, tmpi_strerror(rc, ebuf));
			rc = ERR_PEER;
			goto out;
		}
		if (done) {
			rc = 0;
			goto out;
		}
		if (drain && tmpi_queue_incoming(tm))
			drain = 0;
		if (tmpi_now_ns() >= deadline) {
			rc = tmpi_cancel_send(tm, peer, req, n);
			goto out;
		}
		tmpi_backoff(start, &sleep_ns);
	}
out:
	if (req != req_small)
		free(req);
	return rc;
}

static const struct transport_ops tmpi_transport_ops = {
    .send = tmpi_send_msg,
    .recv = tmpi_recv_msg,
    .drop_peer = tmpi_drop_peer,
    .n_peers = tmpi_n_peers,
    .peer_name = tmpi_peer_name,
    .destroy = tmpi_destroy,
};
