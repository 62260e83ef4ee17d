/* transport_zmq_internal: what the two files of the ZeroMQ transport share --
 * limits, the transport's and the ZAP handler's state, and the functions one
 * calls in the other.  Only common/transport_zmq*.c include it (and zmq.h). */
#ifndef MOEFLEET_TRANSPORT_ZMQ_INTERNAL_H
#define MOEFLEET_TRANSPORT_ZMQ_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include <zmq.h>

#include "transport.h"

#define TZMQ_ID_MAX	       255   /* libzmq's limit on routing ids */
#define TZMQ_PEERS_MAX	       65536 /* indices handed out; later newcomers are refused */
#define TZMQ_Z85_LEN	       40    /* a CURVE key in Z85 text */
#define TZMQ_KEY_BYTES	       32
#define TZMQ_KEYS_MAX	       4096	  /* authorised keys in one file */
#define TZMQ_KEYFILE_MAX       (1u << 20) /* bytes of one key file */
#define TZMQ_HANDSHAKE_DEFAULT 10000	  /* ms */
#define TZMQ_SNDHWM	       128 /* frames queued for one peer (4 MiB weight chunks: ~170 MiB) */
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

/* transport_zmq.c */
double tzmq_now_ms(void);

/* transport_zmq_curve.c */
int tzmq_log_allowed(double *at, int *suppressed);
void tzmq_zap_stop(struct tzmq_zap *z);
int tzmq_setup_curve(struct transport_zmq *tz, const struct transport_zmq_security *sec);

#endif
