/* transport_zmq: the transport over ZeroMQ; with transport_zmq_curve.c, the only files that include
 * zmq.h.
 *
 * Coordinator: a ROUTER bound to the endpoint.  Every message arrives as
 * [routing id, header, frame?]; routing ids map to peer indices in order of
 * first message (a linear table: a cluster has tens of workers, not
 * thousands).  Worker: a DEALER connected to the endpoint, messages are
 * [header, frame?].  The parts of the last received message are kept as
 * zmq_msg_t until the next receive, so receiving copies nothing.
 *
 * Security on tcp:// (see transport.h): the ROUTER is a CURVE server with the
 * cluster's secret key; a ZAP handler thread (a REP socket on
 * inproc://zeromq.zap.01 in the transport's own context, bound before the
 * ROUTER so no connection is ever accepted without it) answers each
 * handshake with 200 when the client's public key is in the authorised-keys
 * file and 400 otherwise, re-reading the file when its size or time stamp
 * changes.  Workers are CURVE clients.  Both sides watch their socket's
 * events through a monitor (a PAIR on inproc://) while they wait in
 * transport_recv(): a worker turns a refused or failed handshake into a
 * logged error instead of retrying forever; the coordinator logs them. */
#include "transport_zmq_internal.h"
#include "err.h"
#include "log.h"
#include "wire.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

static const struct transport_ops tzmq_transport_ops;
static const uint8_t tzmq_empty_frame[1];

double tzmq_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void tzmq_release_held(struct transport_zmq *tz)
{
	for (int i = 0; i < tz->n_held; i++)
		zmq_msg_close(&tz->part[i]);
	tz->n_held = 0;
}

/* libzmq's own ceiling, so an absurd frame is refused before it is
 * allocated: twice our caps, so frames a little above them arrive and are
 * reported as bad instead of closing the connection. */
static int64_t tzmq_hard_cap(const transport *t)
{
	uint64_t cap = t->frame_cap > WIRE_MAX_HEADER ? t->frame_cap : WIRE_MAX_HEADER;
	if (cap > (uint64_t)INT64_MAX / 2)
		return -1; /* no limit */
	return (int64_t)(cap * 2);
}

static int tzmq_apply_limits(struct transport_zmq *tz)
{
	int64_t hard = tzmq_hard_cap(&tz->base);
	int sndtimeo = tz->base.send_timeout_ms;
	if (zmq_setsockopt(tz->sock, ZMQ_MAXMSGSIZE, &hard, sizeof(hard)) ||
	    zmq_setsockopt(tz->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof(sndtimeo))) {
		log_error("%s: cannot set socket limits: %s", tz->endpoint, zmq_strerror(errno));
		return ERR_IO;
	}
	return 0;
}

static void tzmq_limits_changed(transport *t)
{
	tzmq_apply_limits((struct transport_zmq *)t);
}

/* A routing id unlikely to collide with another worker's: 16 bytes mixed from
 * the clock, the pid and an address.  The first byte is not 0 (libzmq keeps
 * ids starting with 0 for the ones it generates). */
static void tzmq_make_routing_id(const void *salt, uint8_t id[16])
{
	static unsigned counter;
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	uint64_t x = (uint64_t)ts.tv_sec * 1000000007u ^ (uint64_t)ts.tv_nsec ^
		     ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)salt ^ (uint64_t)++counter;
	for (int i = 0; i < 2; i++) {
		/* splitmix64 */
		x += 0x9e3779b97f4a7c15ull;
		uint64_t z = x;
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		z ^= z >> 31;
		memcpy(id + 8 * i, &z, 8);
	}
	if (id[0] == 0)
		id[0] = 1;
}

static const char *tzmq_handshake_reason(struct transport_zmq *tz, int event, uint32_t value)
{
	if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)
		return "the worker's key is not authorised";
	if (event == ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL)
		return "connection failed during the handshake";
	switch (value) {
	case ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
		return tz->curve ? "the other side does not use CURVE keys (--insecure on one side "
				   "only?)"
				 : "the other side uses CURVE keys, this side runs with --insecure";
	case ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
	case ZMQ_PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE:
		return "CURVE keys do not match (the worker's server key must be the coordinator's "
		       "public key)";
	default: return "protocol error during the handshake";
	}
}

static void tzmq_on_event(struct transport_zmq *tz, int event, uint32_t value)
{
	switch (event) {
	case ZMQ_EVENT_CONNECTED:
		if (!tz->router && tz->hs_connected_at == 0)
			tz->hs_connected_at = tzmq_now_ms();
		break;
	case ZMQ_EVENT_DISCONNECTED: tz->hs_ok = 0; break;
	case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
		tz->hs_ok = 1;
		tz->hs_connected_at = 0;
		break;
	case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
		if (tz->router)
			break; /* the handler has logged it */
		log_error("%s: the coordinator refused this worker's key %s: add the worker's "
			  "public key to the coordinator's authorised keys",
			  tz->endpoint, tz->public_key);
		tz->hs_error = ERR_CONFIG;
		break;
	case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
	case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL: {
		const char *why = tzmq_handshake_reason(tz, event, value);
		if (tz->router) {
			if (tzmq_log_allowed(&tz->log_at, &tz->log_suppressed))
				log_warn("%s: a worker's connection failed its handshake: %s",
					 tz->endpoint, why);
		} else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
			   (value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH ||
			    value == ZMQ_PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)) {
			log_error("%s: handshake with the coordinator failed: %s", tz->endpoint,
				  why);
			tz->hs_error = ERR_CONFIG;
		}
		break;
	}
	default: break;
	}
}

/* Reads the monitor's pending events; returns a worker's fatal handshake
 * error or 0. */
static int tzmq_read_events(struct transport_zmq *tz)
{
	while (!tz->hs_error) {
		zmq_msg_t ev;
		zmq_msg_init(&ev);
		if (zmq_msg_recv(&ev, tz->mon, ZMQ_DONTWAIT) < 0) {
			zmq_msg_close(&ev);
			break;
		}
		uint16_t event = 0;
		uint32_t value = 0;
		if (zmq_msg_size(&ev) >= 6) {
			memcpy(&event, zmq_msg_data(&ev), 2);
			memcpy(&value, (const uint8_t *)zmq_msg_data(&ev) + 2, 4);
		}
		if (zmq_msg_more(&ev)) { /* the endpoint: the listener's own, not the peer's */
			zmq_msg_t addr;
			zmq_msg_init(&addr);
			zmq_msg_recv(&addr, tz->mon, 0);
			zmq_msg_close(&addr);
		}
		tzmq_on_event(tz, event, value);
	}
	return tz->hs_error;
}

static int tzmq_start_monitor(struct transport_zmq *tz)
{
	char addr[64];
	snprintf(addr, sizeof(addr), "inproc://moefleet-monitor-%p", (void *)tz);
	int events = ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED | ZMQ_EVENT_HANDSHAKE_SUCCEEDED |
		     ZMQ_EVENT_HANDSHAKE_FAILED_AUTH | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
		     ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL;
	int zero = 0;
	if (zmq_socket_monitor(tz->sock, addr, events) ||
	    !(tz->mon = zmq_socket(tz->ctx, ZMQ_PAIR)) ||
	    zmq_setsockopt(tz->mon, ZMQ_LINGER, &zero, sizeof(zero)) ||
	    zmq_connect(tz->mon, addr)) {
		log_error("%s: cannot monitor the socket: %s", tz->endpoint, zmq_strerror(errno));
		return ERR_IO;
	}
	return 0;
}

static int tzmq_check_endpoint(const char *endpoint)
{
	if (!endpoint || (strncmp(endpoint, "tcp://", 6) && strncmp(endpoint, "ipc://", 6)) ||
	    strlen(endpoint) <= 6) {
		log_error("transport: endpoint '%s' must be tcp://HOST:PORT or ipc://PATH",
			  endpoint ? endpoint : "(null)");
		return ERR_CONFIG;
	}
	if (strlen(endpoint) >= sizeof(((struct transport_zmq *)0)->endpoint)) {
		log_error("transport: endpoint '%.40s...' is too long", endpoint);
		return ERR_CONFIG;
	}
	return 0;
}

static int tzmq_open(const char *endpoint, int router, const struct transport_zmq_security *sec,
		     transport **out)
{
	*out = NULL;
	int rc = tzmq_check_endpoint(endpoint);
	if (rc)
		return rc;
	int tcp = !strncmp(endpoint, "tcp://", 6);
	int insecure = sec && sec->insecure;
	if (tcp && !insecure &&
	    (!sec || !sec->key_file ||
	     !(router ? sec->authorized_keys_file : sec->server_key_file))) {
		log_error("%s: tcp:// links need CURVE keys (%s; see 'moefleet keygen') or an "
			  "explicit --insecure on a trusted network",
			  endpoint,
			  router ? "--cluster-key and --authorized-keys"
				 : "--key and --server-key");
		return ERR_CONFIG;
	}
	struct transport_zmq *tz = calloc(1, sizeof(*tz));
	if (!tz) {
		log_error("%s: out of memory", endpoint);
		return ERR_NOMEM;
	}
	transport_init_base(&tz->base, &tzmq_transport_ops);
	tz->router = router;
	tz->curve = tcp && !insecure;
	tz->hs_timeout_ms = sec && sec->handshake_timeout_ms > 0 ? sec->handshake_timeout_ms
								 : TZMQ_HANDSHAKE_DEFAULT;
	snprintf(tz->endpoint, sizeof(tz->endpoint), "%s", endpoint);
	if (tcp && insecure)
		log_warn("%s: --insecure: this link is neither authenticated nor encrypted",
			 endpoint);

	rc = ERR_IO;
	tz->ctx = zmq_ctx_new();
	if (!tz->ctx) {
		log_error("%s: cannot create a ZeroMQ context: %s", endpoint, zmq_strerror(errno));
		goto out;
	}
	zmq_ctx_set(tz->ctx, ZMQ_BLOCKY, 0);
	tz->sock = zmq_socket(tz->ctx, router ? ZMQ_ROUTER : ZMQ_DEALER);
	if (!tz->sock) {
		log_error("%s: cannot create a ZeroMQ socket: %s", endpoint, zmq_strerror(errno));
		goto out;
	}
	int zero = 0, one = 1;
	if (zmq_setsockopt(tz->sock, ZMQ_LINGER, &zero, sizeof(zero))) {
		log_error("%s: cannot set ZMQ_LINGER: %s", endpoint, zmq_strerror(errno));
		goto out;
	}
	if (router) {
		/* unknown peers fail loudly; a reconnecting worker takes its id back;
		 * at most TZMQ_SNDHWM frames wait for a peer (a send blocks beyond),
		 * so that streaming GiBs of weights to a slow link does not queue
		 * them all in memory */
		int hwm = TZMQ_SNDHWM;
		if (zmq_setsockopt(tz->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof(one)) ||
		    zmq_setsockopt(tz->sock, ZMQ_ROUTER_HANDOVER, &one, sizeof(one)) ||
		    zmq_setsockopt(tz->sock, ZMQ_SNDHWM, &hwm, sizeof(hwm))) {
			log_error("%s: cannot set ROUTER options: %s", endpoint,
				  zmq_strerror(errno));
			goto out;
		}
	} else {
		uint8_t id[16];
		tzmq_make_routing_id(tz, id);
		if (zmq_setsockopt(tz->sock, ZMQ_ROUTING_ID, id, sizeof(id))) {
			log_error("%s: cannot set ZMQ_ROUTING_ID: %s", endpoint,
				  zmq_strerror(errno));
			goto out;
		}
	}
	rc = tzmq_apply_limits(tz);
	if (rc)
		goto out;
	if (tz->curve) {
		rc = tzmq_setup_curve(tz, sec);
		if (rc)
			goto out;
	}
	if (tcp) {
		rc = tzmq_start_monitor(tz);
		if (rc)
			goto out;
	}

	rc = ERR_IO;
	if (router ? zmq_bind(tz->sock, endpoint) : zmq_connect(tz->sock, endpoint)) {
		int e = errno;
		log_error("%s: cannot %s: %s", endpoint, router ? "bind" : "connect",
			  zmq_strerror(e));
		rc = (e == EINVAL || e == EPROTONOSUPPORT) ? ERR_CONFIG : ERR_IO;
		goto out;
	}
	char last[sizeof(tz->endpoint)];
	size_t last_len = sizeof(last);
	if (zmq_getsockopt(tz->sock, ZMQ_LAST_ENDPOINT, last, &last_len) == 0 && last_len > 1 &&
	    last[0])
		snprintf(tz->endpoint, sizeof(tz->endpoint), "%s", last);
	/* the socket file of an ipc:// listener (not an abstract "@name") */
	if (router && !strncmp(tz->endpoint, "ipc://", 6) && tz->endpoint[6] != '@') {
		snprintf(tz->ipc_path, sizeof(tz->ipc_path), "%s", tz->endpoint + 6);
		/* local and plain: only this user may connect */
		if (chmod(tz->ipc_path, S_IRUSR | S_IWUSR))
			log_warn("%s: cannot restrict the socket file to this user: %s",
				 tz->ipc_path, strerror(errno));
	}
	rc = 0;
out:
	if (rc)
		tzmq_transport_ops.destroy(&tz->base);
	else
		*out = &tz->base;
	return rc;
}

int transport_zmq_listen(const char *endpoint, transport **out)
{
	return tzmq_open(endpoint, 1, NULL, out);
}

int transport_zmq_connect(const char *endpoint, transport **out)
{
	return tzmq_open(endpoint, 0, NULL, out);
}

int transport_zmq_listen_secure(const char *endpoint, const struct transport_zmq_security *sec,
				transport **out)
{
	return tzmq_open(endpoint, 1, sec, out);
}

int transport_zmq_connect_secure(const char *endpoint, const struct transport_zmq_security *sec,
				 transport **out)
{
	return tzmq_open(endpoint, 0, sec, out);
}

const char *transport_zmq_endpoint(const transport *t)
{
	if (!t || t->ops != &tzmq_transport_ops)
		return NULL;
	return ((const struct transport_zmq *)t)->endpoint;
}

static void tzmq_destroy(transport *t)
{
	struct transport_zmq *tz = (struct transport_zmq *)t;
	tzmq_release_held(tz);
	if (tz->mon) {
		zmq_socket_monitor(tz->sock, NULL, 0);
		zmq_close(tz->mon);
	}
	if (tz->sock)
		zmq_close(tz->sock);
	if (tz->zap && tz->zap->started)
		zmq_ctx_shutdown(tz->ctx); /* wakes the handler thread with ETERM */
	tzmq_zap_stop(tz->zap);
	if (tz->ctx)
		zmq_ctx_term(tz->ctx);
	if (tz->ipc_path[0] && unlink(tz->ipc_path) && errno != ENOENT)
		log_warn("%s: cannot remove the socket file: %s", tz->ipc_path, strerror(errno));
	free(tz->peers);
	free(tz);
}

static int tzmq_find_peer(const struct transport_zmq *tz, const uint8_t *id, size_t len)
{
	for (int i = 0; i < tz->n_peers; i++) {
		const struct tzmq_peer *p = &tz->peers[i];
		if (p->active && p->id_len == len && !memcmp(p->id, id, len))
			return i;
	}
	return -1;
}

static int tzmq_add_peer(struct transport_zmq *tz, const uint8_t *id, size_t len, int *index)
{
	if (tz->n_peers == tz->cap_peers) {
		int cap = tz->cap_peers ? tz->cap_peers * 2 : 16;
		struct tzmq_peer *p = realloc(tz->peers, (size_t)cap * sizeof(*p));
		if (!p) {
			log_error("%s: out of memory for peer %d", tz->endpoint, tz->n_peers);
			return ERR_NOMEM;
		}
		tz->peers = p;
		tz->cap_peers = cap;
	}
	struct tzmq_peer *p = &tz->peers[tz->n_peers];
	memcpy(p->id, id, len);
	p->id_len = len;
	p->active = 1;
	snprintf(p->name, sizeof(p->name), "zmq peer %d", tz->n_peers);
	*index = tz->n_peers++;
	return 0;
}

static void tzmq_drop_peer(transport *t, int peer)
{
	struct transport_zmq *tz = (struct transport_zmq *)t;
	if (tz->router && peer >= 0 && peer < tz->n_peers)
		tz->peers[peer].active = 0;
}

static int tzmq_n_peers(const transport *t)
{
	const struct transport_zmq *tz = (const struct transport_zmq *)t;
	return tz->router ? tz->n_peers : 1;
}

static const char *tzmq_peer_name(const transport *t, int peer)
{
	const struct transport_zmq *tz = (const struct transport_zmq *)t;
	if (!tz->router)
		return peer == 0 ? "zmq coordinator" : "zmq peer (invalid)";
	if (peer < 0 || peer >= tz->n_peers)
		return "zmq peer (invalid)";
	return tz->peers[peer].name;
}

/* A worker's handshake deadline: ERR_CONFIG (logged) once a connection has
 * gone without a good handshake for the handshake time-out; otherwise 0, and
 * *wait_ms (-1: forever) is shortened to wake up at the deadline. */
static int tzmq_check_handshake(struct transport_zmq *tz, long *wait_ms)
{
	if (tz->hs_error)
		return tz->hs_error;
	if (!tz->mon || tz->router || tz->hs_ok || tz->hs_connected_at <= 0)
		return 0;
	double left = tz->hs_connected_at + tz->hs_timeout_ms - tzmq_now_ms();
	if (left <= 0) {
		log_error("%s: no %s handshake with the coordinator within %d ms of connecting: "
			  "check that the server key is the coordinator's public key and that "
			  "both sides agree on --insecure",
			  tz->endpoint, tz->curve ? "CURVE" : "plain", tz->hs_timeout_ms);
		tz->hs_error = ERR_CONFIG;
		return tz->hs_error;
	}
	if (*wait_ms < 0 || (long)(left + 0.999) < *wait_ms)
		*wait_ms = (long)(left + 0.999);
	return 0;
}

/* A worker's send: libzmq drops the connection for good after a refused or
 * failed handshake, and a send would then block for the whole send time-out;
 * so send without blocking and watch the socket's events meanwhile. */
static int tzmq_send_watched(struct transport_zmq *tz, const void *buf, size_t len, int flags)
{
	double deadline = tzmq_now_ms() + tz->base.send_timeout_ms;
	for (;;) {
		if (tzmq_read_events(tz))
			return -1;
		if (zmq_send(tz->sock, buf, len, flags | ZMQ_DONTWAIT) >= 0)
			return 0;
		if (errno != EAGAIN && errno != EINTR)
			return -1;
		double left = deadline - tzmq_now_ms();
		if (left <= 0) {
			errno = EAGAIN;
			return -1;
		}
		long wait = (long)(left + 0.999);
		if (tzmq_check_handshake(tz, &wait))
			return -1;
		zmq_pollitem_t it[2] = {{.socket = tz->sock, .events = ZMQ_POLLOUT},
					{.socket = tz->mon, .events = ZMQ_POLLIN}};
		if (zmq_poll(it, 2, wait) < 0 && errno != EINTR)
			return -1;
	}
}

static int tzmq_send_part(struct transport_zmq *tz, int peer, const void *buf, size_t len, int more)
{
	const void *b = buf ? buf : tzmq_empty_frame;
	int flags = more ? ZMQ_SNDMORE : 0;
	if (tz->mon && !tz->router ? tzmq_send_watched(tz, b, len, flags) == 0
				   : zmq_send(tz->sock, b, len, flags) >= 0)
		return 0;
	if (tz->hs_error)
		return tz->hs_error;
	int e = errno;
	const char *who = tzmq_peer_name(&tz->base, peer);
	if (e == EAGAIN)
		log_error("%s: did not take a message within %d ms", who, tz->base.send_timeout_ms);
	else if (e == EHOSTUNREACH)
		log_error("%s: not connected", who);
	else
		log_error("%s: send failed: %s", who, zmq_strerror(e));
	return ERR_PEER;
}

static int tzmq_send_msg(transport *t, int peer, const void *hdr, size_t hdr_len, const void *data,
			 size_t data_len)
{
	struct transport_zmq *tz = (struct transport_zmq *)t;
	int rc;
	if (tz->hs_error)
		return tz->hs_error;
	if (tz->router) {
		if (peer < 0 || peer >= tz->n_peers) {
			log_error("%s: send to zmq peer %d, which never connected", tz->endpoint,
				  peer);
			return ERR_RANGE;
		}
		if (!tz->peers[peer].active) {
			log_error("%s: send to a dropped peer", tz->peers[peer].name);
			return ERR_PEER;
		}
		/* the routing id is copied by zmq_send: the table may move later */
		rc = tzmq_send_part(tz, peer, tz->peers[peer].id, tz->peers[peer].id_len, 1);
		if (rc)
			return rc;
	} else if (peer != 0) {
		log_error("%s: a worker can only send to peer 0, not %d", tz->endpoint, peer);
		return ERR_RANGE;
	}
	rc = tzmq_send_part(tz, peer, hdr, hdr_len, data != NULL);
	if (rc || !data)
		return rc;
	return tzmq_send_part(tz, peer, data, data_len, 0);
}

/* Waits until the socket has a message: 0, ERR_PEER on time-out, or
 * ERR_CONFIG when a worker's handshake was refused, failed or did not
 * complete within the handshake time-out of a connection. */
static int tzmq_wait(struct transport_zmq *tz, int timeout_ms, double deadline)
{
	for (;;) {
		if (tz->mon && tzmq_read_events(tz))
			return tz->hs_error;
		double now = tzmq_now_ms();
		long wait = -1;
		if (timeout_ms >= 0) {
			double left = deadline - now;
			wait = left > 0 ? (long)(left + 0.999) : 0;
		}
		if (tzmq_check_handshake(tz, &wait))
			return tz->hs_error;
		zmq_pollitem_t it[2] = {{.socket = tz->sock, .events = ZMQ_POLLIN},
					{.socket = tz->mon, .events = ZMQ_POLLIN}};
		int n = zmq_poll(it, tz->mon ? 2 : 1, wait);
		if (n > 0 && (it[0].revents & ZMQ_POLLIN))
			return 0;
		if (n >= 0) {
			if (timeout_ms >= 0 && tzmq_now_ms() >= deadline)
				return ERR_PEER;
			continue;
		}
		if (errno == EINTR)
			continue;
		log_error("%s: poll failed: %s", tz->endpoint, zmq_strerror(errno));
		return ERR_IO;
	}
}

/* Receives the next part of the current message into m (initialised here);
 * *more says whether others follow. */
static int tzmq_recv_part(struct transport_zmq *tz, zmq_msg_t *m, int *more)
{
	zmq_msg_init(m);
	for (;;) {
		if (zmq_msg_recv(m, tz->sock, 0) >= 0)
			break;
		if (errno == EINTR)
			continue;
		log_error("%s: receive failed: %s", tz->endpoint, zmq_strerror(errno));
		zmq_msg_close(m);
		return ERR_IO;
	}
	*more = zmq_msg_more(m);
	return 0;
}

static int tzmq_recv_msg(transport *t, int timeout_ms, struct transport_frame *out)
{
	struct transport_zmq *tz = (struct transport_zmq *)t;
	memset(out, 0, sizeof(*out));
	tzmq_release_held(tz);
	if (tz->hs_error)
		return tz->hs_error;

	double deadline = tzmq_now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
	uint8_t id[TZMQ_ID_MAX];
	size_t id_len = 0;
	zmq_msg_t m;
	/* ROUTER: the routing id; DEALER: the header, kept */
	zmq_msg_t *first = tz->router ? &m : &tz->part[0];
	int more = 0, rc;
	for (;;) {
		rc = tzmq_wait(tz, timeout_ms, deadline);
		if (rc)
			return rc;
		/* a whole message is there once its first part is: parts are atomic */
		zmq_msg_init(first);
		if (zmq_msg_recv(first, tz->sock, ZMQ_DONTWAIT) >= 0)
			break;
		int e = errno;
		zmq_msg_close(first);
		if (e != EAGAIN && e != EINTR) {
			log_error("%s: receive failed: %s", tz->endpoint, zmq_strerror(e));
			return ERR_IO;
		}
	}
	more = zmq_msg_more(first);
	if (tz->router) {
		id_len = zmq_msg_size(&m);
		if (id_len > sizeof(id))
			id_len = sizeof(id); /* libzmq never makes longer ids */
		memcpy(id, zmq_msg_data(&m), id_len);
		zmq_msg_close(&m);
	} else {
		tz->n_held = 1;
	}

	/* the payload parts: keep two, count and discard the rest */
	int n_parts = tz->n_held;
	while (more) {
		zmq_msg_t *p = tz->n_held < 2 ? &tz->part[tz->n_held] : &m;
		rc = tzmq_recv_part(tz, p, &more);
		if (rc) {
			tzmq_release_held(tz);
			return rc;
		}
		n_parts++;
		if (p == &m)
			zmq_msg_close(&m);
		else
			tz->n_held++;
	}

	int peer = 0;
	if (tz->router) {
		peer = tzmq_find_peer(tz, id, id_len);
		if (peer < 0 && tz->n_peers >= TZMQ_PEERS_MAX) {
			log_error("%s: more than %d peers have connected; message from a new one "
				  "dropped",
				  tz->endpoint, TZMQ_PEERS_MAX);
			tzmq_release_held(tz);
			out->peer = -1;
			out->bad = 1;
			return 0;
		}
		if (peer < 0) {
			rc = tzmq_add_peer(tz, id, id_len, &peer);
			if (rc) {
				tzmq_release_held(tz);
				return rc;
			}
		}
	}
	out->peer = peer;

	const char *who = tzmq_peer_name(t, peer);
	size_t hdr_len = n_parts >= 1 ? zmq_msg_size(&tz->part[0]) : 0;
	size_t data_len = n_parts >= 2 ? zmq_msg_size(&tz->part[1]) : 0;
	if (n_parts == 0 || n_parts > 2) {
		log_error("%s: message of %d parts (expected a header and at most one frame); "
			  "dropped",
			  who, n_parts);
		out->bad = 1;
	} else if (hdr_len > WIRE_MAX_HEADER) {
		log_error("%s: header of %zu bytes exceeds the %u-byte cap; message dropped", who,
			  hdr_len, (unsigned)WIRE_MAX_HEADER);
		out->bad = 1;
	} else if (n_parts == 2 && data_len > t->frame_cap) {
		log_error("%s: frame of %zu bytes exceeds the %zu-byte cap; message dropped", who,
			  data_len, t->frame_cap);
		out->bad = 1;
	}
	if (out->bad) {
		tzmq_release_held(tz);
		return 0;
	}
	out->hdr = zmq_msg_data(&tz->part[0]);
	out->hdr_len = hdr_len;
	if (!out->hdr)
		out->hdr = tzmq_empty_frame;
	if (n_parts == 2) {
		out->data = zmq_msg_data(&tz->part[1]);
		out->data_len = data_len;
		if (!out->data)
			out->data = tzmq_empty_frame;
	}
	return 0;
}

static const struct transport_ops tzmq_transport_ops = {
    .send = tzmq_send_msg,
    .recv = tzmq_recv_msg,
    .drop_peer = tzmq_drop_peer,
    .n_peers = tzmq_n_peers,
    .peer_name = tzmq_peer_name,
    .destroy = tzmq_destroy,
    .limits_changed = tzmq_limits_changed,
};
