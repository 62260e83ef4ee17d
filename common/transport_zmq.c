/* transport_zmq: the transport over ZeroMQ; the only file that includes zmq.h.
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
#include "transport.h"
#include "err.h"
#include "log.h"
#include "wire.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#define TZMQ_ID_MAX	       255   /* libzmq's limit on routing ids */
#define TZMQ_PEERS_MAX	       65536 /* indices handed out; later newcomers are refused */
#define TZMQ_Z85_LEN	       40    /* a CURVE key in Z85 text */
#define TZMQ_KEY_BYTES	       32
#define TZMQ_KEYS_MAX	       4096	  /* authorised keys in one file */
#define TZMQ_KEYFILE_MAX       (1u << 20) /* bytes of one key file */
#define TZMQ_HANDSHAKE_DEFAULT 10000	  /* ms */
#define TZMQ_SNDHWM	       128	  /* frames queued for one peer (4 MiB weight chunks: ~170 MiB) */
#define TZMQ_ZAP_ENDPOINT      "inproc://zeromq.zap.01"
#define TZMQ_ZAP_DOMAIN	       "moefleet"

struct tzmq_peer {
	uint8_t id[TZMQ_ID_MAX];
	size_t id_len;
	int active; /* 0 once dropped: the id no longer maps to this index */
	char name[32];
};

struct transport_zmq {
	transport base;
	void *ctx;
	void *sock;
	int router;		 /* 1: coordinator (ROUTER), 0: worker (DEALER) */
	char endpoint[512];	 /* as bound / connected (ZMQ_LAST_ENDPOINT) */
	char ipc_path[512];	 /* socket file to remove on destroy, "" if none */
	struct tzmq_peer *peers; /* router: index -> routing id */
	int n_peers, cap_peers;
	zmq_msg_t part[2]; /* header and frame of the last message */
	int n_held;
	/* security */
	int curve;			   /* 1: CURVE on this socket */
	char public_key[TZMQ_Z85_LEN + 1]; /* own public key, "" without CURVE */
	void *mon;			   /* PAIR receiving the socket's events, or NULL */
	struct tzmq_zap *zap;		   /* coordinator with CURVE: the ZAP handler */
	int hs_ok;			   /* worker: the last handshake succeeded */
	double hs_connected_at;		   /* worker: first connection since the last good
					      handshake (ms), 0 if none */
	int hs_timeout_ms;
	int hs_error;  /* worker: fatal handshake error, returned by every call */
	double log_at; /* rate limit of handshake-failure lines */
	int log_suppressed;
};

/* The ZAP handler's state; the thread owns the socket and the key list. */
struct tzmq_zap {
	pthread_t thread;
	int started;
	void *sock; /* REP on TZMQ_ZAP_ENDPOINT */
	char path[512];
	char endpoint[512];
	uint8_t (*keys)[TZMQ_KEY_BYTES];
	int n_keys;
	struct timespec mtime;
	off_t size;
	double log_at;
	int log_suppressed;
};

static const struct transport_ops tzmq_transport_ops;
static const uint8_t tzmq_empty_frame[1];

static double tzmq_now_ms(void)
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

/* ------------------------------------------------------------ keys */

static void tzmq_wipe(void *p, size_t n)
{
	volatile uint8_t *v = p;
	while (n--)
		*v++ = 0;
}

/* Refuses a key file other users could read (a secret key) or change (any key
 * file: a swapped public key lets another machine in).  fd is open on path. */
static int tzmq_check_key_mode(int fd, const char *path, int secret, struct stat *st)
{
	if (fstat(fd, st)) {
		log_error("%s: cannot stat key file: %s", path, strerror(errno));
		return ERR_IO;
	}
	if (!S_ISREG(st->st_mode)) {
		log_error("%s: key file is not a regular file", path);
		return ERR_CONFIG;
	}
	if (st->st_uid != geteuid() && st->st_uid != 0) {
		log_error("%s: key file belongs to uid %u, not to this user (uid %u) or root; "
			  "refusing it",
			  path, (unsigned)st->st_uid, (unsigned)geteuid());
		return ERR_CONFIG;
	}
	mode_t bad = secret ? (S_IRWXG | S_IRWXO) : (S_IWGRP | S_IWOTH);
	if (st->st_mode & bad) {
		log_error("%s: permissions %03o %s; refusing it (fix: chmod %s %s)", path,
			  (unsigned)(st->st_mode & 0777),
			  secret ? "let other users read this secret key"
				 : "let other users change these keys",
			  secret ? "600" : "go-w", path);
		return ERR_CONFIG;
	}
	return 0;
}

/* Reads a key file: every line that is not blank and not a comment ('#'
 * followed by white space or the end of the line: '#' alone is a Z85 digit)
 * begins with a 40-character Z85 key, optionally followed by white space and
 * a comment.  Decodes at most max keys; *st gets the file's status. */
static int tzmq_read_keys(const char *path, int secret, uint8_t (*keys)[TZMQ_KEY_BYTES], int max,
			  int *n_out, struct stat *st)
{
	*n_out = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		log_error("%s: cannot open key file: %s", path, strerror(errno));
		return ERR_IO;
	}
	char *text = NULL;
	size_t len = 0;
	int rc = tzmq_check_key_mode(fd, path, secret, st);
	if (rc)
		goto out;
	size_t cap = (size_t)TZMQ_KEYFILE_MAX + 1;
	text = malloc(cap);
	if (!text) {
		rc = ERR_NOMEM;
		goto out;
	}
	for (;;) {
		ssize_t r = read(fd, text + len, cap - 1 - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			log_error("%s: cannot read key file: %s", path, strerror(errno));
			rc = ERR_IO;
			goto out;
		}
		if (r == 0)
			break;
		len += (size_t)r;
		if (len == cap - 1) {
			log_error("%s: key file is larger than %u bytes", path, TZMQ_KEYFILE_MAX);
			rc = ERR_RANGE;
			goto out;
		}
	}
	text[len] = 0;
	int n = 0, line = 0;
	for (char *p = text; *p;) {
		char *eol = strchr(p, '\n');
		if (eol)
			*eol = 0;
		line++;
		char *q = p + strspn(p, " \t\r");
		int comment = q[0] == '#' && (!q[1] || strchr(" \t\r", q[1]));
		if (*q && !comment) {
			size_t k = strcspn(q, " \t\r");
			uint8_t bin[TZMQ_KEY_BYTES];
			char z[TZMQ_Z85_LEN + 1];
			if (k != TZMQ_Z85_LEN) {
				log_error("%s:%d: expected a 40-character Z85 key (as written by "
					  "'moefleet keygen')",
					  path, line);
				rc = ERR_FORMAT;
				goto out;
			}
			if (n >= max) {
				log_error("%s:%d: more than %d key(s) in the file", path, line,
					  max);
				rc = ERR_RANGE;
				goto out;
			}
			memcpy(z, q, TZMQ_Z85_LEN);
			z[TZMQ_Z85_LEN] = 0;
			if (!zmq_z85_decode(bin, z)) {
				log_error("%s:%d: not a valid Z85 key", path, line);
				rc = ERR_FORMAT;
				goto out;
			}
			memcpy(keys[n++], bin, TZMQ_KEY_BYTES);
			tzmq_wipe(bin, sizeof(bin));
			tzmq_wipe(z, sizeof(z));
		}
		if (!eol)
			break;
		p = eol + 1;
	}
	if (n == 0 && max == 1) {
		log_error("%s: no key in the file", path);
		rc = ERR_FORMAT;
		goto out;
	}
	*n_out = n;
out:
	if (text) {
		tzmq_wipe(text, len);
		free(text);
	}
	close(fd);
	return rc;
}

/* One key from a file that must hold exactly one: a secret key (and its
 * public key in Z85) or a public key. */
static int tzmq_read_one_key(const char *path, int secret, uint8_t key[TZMQ_KEY_BYTES],
			     char public_z85[TZMQ_Z85_LEN + 1])
{
	uint8_t keys[1][TZMQ_KEY_BYTES];
	struct stat st;
	int n = 0;
	int rc = tzmq_read_keys(path, secret, keys, 1, &n, &st);
	if (rc)
		return rc;
	memcpy(key, keys[0], TZMQ_KEY_BYTES);
	tzmq_wipe(keys, sizeof(keys));
	if (secret && public_z85) {
		char z[TZMQ_Z85_LEN + 1];
		zmq_z85_encode(z, key, TZMQ_KEY_BYTES);
		rc = zmq_curve_public(public_z85, z) ? ERR_CONFIG : 0;
		tzmq_wipe(z, sizeof(z));
		if (rc)
			log_error("%s: cannot derive the public key: %s", path,
				  zmq_strerror(errno));
	}
	return rc;
}

int transport_zmq_keygen(char public_z85[41], char secret_z85[41])
{
	if (zmq_curve_keypair(public_z85, secret_z85)) {
		log_error("cannot make a CURVE key pair: %s (libzmq without CURVE support?)",
			  zmq_strerror(errno));
		return ERR_CONFIG;
	}
	return 0;
}

int transport_zmq_public_key(const char *secret_key_file, char public_z85[41])
{
	uint8_t key[TZMQ_KEY_BYTES];
	int rc = tzmq_read_one_key(secret_key_file, 1, key, public_z85);
	tzmq_wipe(key, sizeof(key));
	return rc;
}

/* ------------------------------------------------------------ ZAP handler */

static int tzmq_zap_load(struct tzmq_zap *z)
{
	uint8_t(*keys)[TZMQ_KEY_BYTES] = calloc(TZMQ_KEYS_MAX, TZMQ_KEY_BYTES);
	if (!keys) {
		log_error("%s: out of memory for the authorised keys", z->path);
		return ERR_NOMEM;
	}
	struct stat st;
	int n = 0;
	int rc = tzmq_read_keys(z->path, 0, keys, TZMQ_KEYS_MAX, &n, &st);
	if (rc) {
		free(keys);
		return rc;
	}
	free(z->keys);
	z->keys = keys;
	z->n_keys = n;
	z->mtime = st.st_mtim;
	z->size = st.st_size;
	return 0;
}

/* Re-reads the authorised keys when the file changed.  A file that became
 * unreadable or unsafe refuses everyone until it is fixed (fail closed). */
static void tzmq_zap_refresh(struct tzmq_zap *z)
{
	struct stat st;
	if (stat(z->path, &st) == 0 && st.st_size == z->size &&
	    st.st_mtim.tv_sec == z->mtime.tv_sec && st.st_mtim.tv_nsec == z->mtime.tv_nsec)
		return;
	if (tzmq_zap_load(z) == 0) {
		log_info("%s: %d authorised worker key(s) (re)loaded", z->path, z->n_keys);
		return;
	}
	log_error("%s: refusing every worker until the authorised keys file is fixed", z->path);
	z->n_keys = 0;
	z->size = -1;
}

/* At most one line a second for failures a peer can repeat at will. */
static int tzmq_log_allowed(double *at, int *suppressed)
{
	double now = tzmq_now_ms();
	if (*at > 0 && now - *at < 1000.0) {
		(*suppressed)++;
		return 0;
	}
	if (*suppressed)
		log_warn("(%d similar line(s) suppressed)", *suppressed);
	*at = now;
	*suppressed = 0;
	return 1;
}

static int tzmq_part_is(zmq_msg_t *m, const char *s)
{
	size_t n = strlen(s);
	return zmq_msg_size(m) == n && !memcmp(zmq_msg_data(m), s, n);
}

/* Answers one ZAP request (RFC 27): version, request id, domain, address,
 * routing id, mechanism, credentials. */
static void tzmq_zap_answer(struct tzmq_zap *z, zmq_msg_t *part, int n)
{
	const char *status = "400", *text = "malformed request";
	char who[64] = "?", user[TZMQ_Z85_LEN + 1] = "";
	if (n >= 7 && tzmq_part_is(&part[0], "1.0") && tzmq_part_is(&part[5], "CURVE") &&
	    zmq_msg_size(&part[6]) == TZMQ_KEY_BYTES) {
		size_t a = zmq_msg_size(&part[3]);
		if (a >= sizeof(who))
			a = sizeof(who) - 1;
		memcpy(who, zmq_msg_data(&part[3]), a);
		who[a] = 0;
		const uint8_t *key = zmq_msg_data(&part[6]);
		zmq_z85_encode(user, key, TZMQ_KEY_BYTES);
		tzmq_zap_refresh(z);
		text = "key not authorised";
		for (int i = 0; i < z->n_keys; i++)
			if (!memcmp(z->keys[i], key, TZMQ_KEY_BYTES)) {
				status = "200";
				text = "OK";
				break;
			}
		if (status[0] == '2')
			log_info("%s: worker key %s from %s accepted", z->endpoint, user, who);
		else if (tzmq_log_allowed(&z->log_at, &z->log_suppressed))
			log_error("%s: refused a worker from %s: its key %s is not in %s",
				  z->endpoint, who, user, z->path);
	} else if (tzmq_log_allowed(&z->log_at, &z->log_suppressed)) {
		log_error("%s: refused a malformed authentication request", z->endpoint);
	}
	const void *id = n >= 2 ? zmq_msg_data(&part[1]) : "";
	size_t id_len = n >= 2 ? zmq_msg_size(&part[1]) : 0;
	int ok = status[0] == '2';
	zmq_send(z->sock, "1.0", 3, ZMQ_SNDMORE);
	zmq_send(z->sock, id, id_len, ZMQ_SNDMORE);
	zmq_send(z->sock, status, 3, ZMQ_SNDMORE);
	zmq_send(z->sock, text, strlen(text), ZMQ_SNDMORE);
	zmq_send(z->sock, user, ok ? strlen(user) : 0, ZMQ_SNDMORE);
	zmq_send(z->sock, "", 0, 0);
}

#define TZMQ_ZAP_PARTS 8

static void *tzmq_zap_main(void *arg)
{
	struct tzmq_zap *z = arg;
	for (;;) {
		zmq_msg_t part[TZMQ_ZAP_PARTS];
		int n = 0, more = 1, stop = 0;
		while (more) {
			zmq_msg_t m;
			zmq_msg_init(&m);
			if (zmq_msg_recv(&m, z->sock, 0) < 0) {
				zmq_msg_close(&m);
				if (errno == EINTR)
					continue;
				stop = 1; /* ETERM: the transport is being destroyed */
				break;
			}
			more = zmq_msg_more(&m);
			if (n < TZMQ_ZAP_PARTS) {
				zmq_msg_init(&part[n]);
				zmq_msg_move(&part[n++], &m);
			}
			zmq_msg_close(&m);
		}
		if (!stop)
			tzmq_zap_answer(z, part, n);
		for (int i = 0; i < n; i++)
			zmq_msg_close(&part[i]);
		if (stop)
			break;
	}
	zmq_close(z->sock);
	z->sock = NULL;
	return NULL;
}

/* Loads the keys and starts the handler; must run before the ROUTER binds. */
static int tzmq_zap_start(struct transport_zmq *tz, const char *path)
{
	struct tzmq_zap *z = calloc(1, sizeof(*z));
	if (!z) {
		log_error("%s: out of memory", tz->endpoint);
		return ERR_NOMEM;
	}
	tz->zap = z;
	if (strlen(path) >= sizeof(z->path)) {
		log_error("%.60s...: authorised keys path is too long", path);
		return ERR_CONFIG;
	}
	snprintf(z->path, sizeof(z->path), "%s", path);
	snprintf(z->endpoint, sizeof(z->endpoint), "%s", tz->endpoint);
	int rc = tzmq_zap_load(z);
	if (rc)
		return rc;
	if (z->n_keys == 0)
		log_warn("%s: no authorised worker keys yet: every worker is refused until keys "
			 "are added",
			 z->path);
	z->sock = zmq_socket(tz->ctx, ZMQ_REP);
	int zero = 0;
	if (!z->sock || zmq_setsockopt(z->sock, ZMQ_LINGER, &zero, sizeof(zero)) ||
	    zmq_bind(z->sock, TZMQ_ZAP_ENDPOINT)) {
		log_error("%s: cannot start the authentication handler: %s", tz->endpoint,
			  zmq_strerror(errno));
		return ERR_IO;
	}
	rc = pthread_create(&z->thread, NULL, tzmq_zap_main, z);
	if (rc) {
		log_error("%s: cannot start the authentication thread: %s", tz->endpoint,
			  strerror(rc));
		return ERR_IO;
	}
	z->started = 1;
	return 0;
}

/* Stops the handler; the context must be shut down first when it runs. */
static void tzmq_zap_stop(struct tzmq_zap *z)
{
	if (!z)
		return;
	if (z->started)
		pthread_join(z->thread, NULL);
	else if (z->sock)
		zmq_close(z->sock);
	if (z->keys)
		tzmq_wipe(z->keys, (size_t)z->n_keys * TZMQ_KEY_BYTES);
	free(z->keys);
	free(z);
}

/* ------------------------------------------------------------ socket events */

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

/* CURVE options: the coordinator is the server (cluster secret key, ZAP
 * domain); a worker is a client that knows the server's public key. */
static int tzmq_setup_curve(struct transport_zmq *tz, const struct transport_zmq_security *sec)
{
	uint8_t secret[TZMQ_KEY_BYTES], server[TZMQ_KEY_BYTES], pub[TZMQ_KEY_BYTES];
	int rc = tzmq_read_one_key(sec->key_file, 1, secret, tz->public_key);
	if (rc)
		return rc;
	int one = 1;
	if (tz->router) {
		rc = tzmq_zap_start(tz, sec->authorized_keys_file);
		if (rc)
			goto out;
		rc = ERR_IO;
		if (zmq_setsockopt(tz->sock, ZMQ_CURVE_SERVER, &one, sizeof(one)) ||
		    zmq_setsockopt(tz->sock, ZMQ_CURVE_SECRETKEY, secret, sizeof(secret)) ||
		    zmq_setsockopt(tz->sock, ZMQ_ZAP_DOMAIN, TZMQ_ZAP_DOMAIN,
				   strlen(TZMQ_ZAP_DOMAIN)))
			goto fail;
	} else {
		rc = tzmq_read_one_key(sec->server_key_file, 0, server, NULL);
		if (rc)
			goto out;
		rc = ERR_IO;
		zmq_z85_decode(pub, tz->public_key);
		if (zmq_setsockopt(tz->sock, ZMQ_CURVE_SERVERKEY, server, sizeof(server)) ||
		    zmq_setsockopt(tz->sock, ZMQ_CURVE_PUBLICKEY, pub, sizeof(pub)) ||
		    zmq_setsockopt(tz->sock, ZMQ_CURVE_SECRETKEY, secret, sizeof(secret)))
			goto fail;
	}
	rc = 0;
	goto out;
fail:
	log_error("%s: cannot set CURVE options: %s", tz->endpoint, zmq_strerror(errno));
out:
	tzmq_wipe(secret, sizeof(secret));
	return rc;
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

/* ------------------------------------------------------------ peers */

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

/* ------------------------------------------------------------ send */

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

/* ------------------------------------------------------------ receive */

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
