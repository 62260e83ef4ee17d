/* transport: moving (header, raw frame) message pairs between a coordinator
 * and its workers, over ZeroMQ (tcp://, ipc://) or Open MPI.
 *
 * A message is a header (an encoded wire envelope) and an optional raw frame
 * (activations, results, weight bytes).  The coordinator side talks to many
 * peers, numbered from 0 in order of first contact (ZeroMQ) or by MPI rank - 1;
 * a worker side has exactly one peer, the coordinator (peer 0).
 *
 * transport_recv() waits at most timeout_ms (-1: forever) and returns
 * ERR_PEER on time-out without logging; received buffers belong to the
 * transport and stay valid until the next transport_recv() on it.  Sizes are
 * capped: a header above WIRE_MAX_HEADER or a frame above the transport's
 * frame cap is dropped with a logged reason (the peer is reported in
 * transport_frame.peer with bad = 1, hdr/data NULL); so is a message of more
 * than header + one frame.  The next message is received normally.  Sending
 * never blocks indefinitely: a peer that does not take its messages within
 * the send time-out yields ERR_PEER.  transport_send() with data == NULL sends
 * no raw frame; with data != NULL (even data_len == 0) the receiver gets a
 * non-NULL frame.  Each transport is used from one thread.
 *
 * ZeroMQ: the coordinator binds a ROUTER, workers connect DEALERs (each with
 * a random routing id, so a reconnect after a network blip keeps its peer
 * index).  Sends copy the caller's bytes (the buffers are free on return);
 * receives are zero-copy.  Sending to a peer whose connection is gone fails
 * with ERR_PEER (ROUTER_MANDATORY); the peer is not dropped automatically.
 * A dropped peer is forgotten: a later message from the same worker gets a
 * NEW index, so the caller sees an unknown peer and must insist on Hello.
 * Peer indices are never reused; transport_n_peers() counts dropped ones too;
 * after 65536 indices, messages from new peers come back bad with peer -1.
 * Frames far above the cap (twice max(frame cap, WIRE_MAX_HEADER), fixed per
 * connection when it is made) make libzmq close that connection instead.
 * Close does not linger: messages still queued are discarded.
 *
 * Open MPI: one message is a small head (sizes, plus the header when short)
 * and body messages of at most 4 MiB, so sizes are checked before anything
 * is allocated, an oversized message is drained through a 4 MiB scratch
 * buffer, and frames may exceed INT_MAX bytes.  Ranks are fixed, so a dropped
 * rank keeps its index: sends to it fail with ERR_PEER until it sends again.
 * Large sends need the receiver to post a receive; while a send waits,
 * incoming messages are received and queued, so two peers sending to each
 * other do not deadlock.  Open MPI cannot cancel a send the receiver never
 * takes: a send that times out leaves the transport broken (every later call
 * fails with ERR_PEER and destroy skips MPI_Finalize); exit with an error and
 * let mpirun end the job. */
#ifndef MOEFLEET_TRANSPORT_H
#define MOEFLEET_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

typedef struct transport transport;

struct transport_frame {
	int peer;
	int bad; /* 1: the message broke the size rules and was dropped */
	const uint8_t *hdr;
	size_t hdr_len;
	const uint8_t *data; /* NULL when the message has no raw frame */
	size_t data_len;
};

#define TRANSPORT_FRAME_CAP_DEFAULT    ((size_t)1 << 30)
#define TRANSPORT_SEND_TIMEOUT_DEFAULT 30000 /* ms */

/* Security of ZeroMQ links.  tcp:// links are CURVE-authenticated and
 * encrypted unless `insecure` is set: the coordinator holds the cluster key
 * pair and a file of authorised worker public keys, each worker its own key
 * pair and the coordinator's public key.  A worker whose key is not
 * authorised is refused during the handshake (the coordinator logs its key
 * and address).  ipc:// links are local and always plain; their socket file
 * is made accessible to its owner only.
 *
 * Key files hold one 40-character Z85 key per line, optionally followed by a
 * comment; blank lines and comments ("# ...": '#' then white space; a bare
 * '#' is a Z85 digit) are ignored.  A secret key
 * file must be readable by its owner only (mode 0600 or stricter) and any key
 * file must belong to this user (or root) and not be writable by group or
 * others, or the transport refuses it with ERR_CONFIG.  The coordinator
 * re-reads the authorised keys when the file changes (rotation without a
 * restart); a file that became unreadable or unsafe refuses every new worker
 * until fixed.  Without security settings (NULL, or keys missing) a tcp://
 * endpoint is refused with ERR_CONFIG. */
struct transport_zmq_security {
	int insecure;			  /* 1: plain tcp:// (trusted networks only) */
	const char *key_file;		  /* own secret key (coordinator: the cluster key) */
	const char *server_key_file;	  /* worker: the coordinator's public key */
	const char *authorized_keys_file; /* coordinator: the workers' public keys */
	int handshake_timeout_ms;	  /* worker; <= 0: 10 s */
};

/* Coordinator side: binds endpoint (tcp://HOST:PORT or ipc://PATH; a port of
 * "*" picks a free one, see transport_zmq_endpoint()).  An ipc:// socket file
 * is removed again on destroy.  transport_zmq_listen() is
 * transport_zmq_listen_secure() without security settings (ipc:// only). */
int transport_zmq_listen(const char *endpoint, transport **out);
int transport_zmq_listen_secure(const char *endpoint, const struct transport_zmq_security *sec,
				transport **out);
/* Worker side: connects to the coordinator's endpoint.  Succeeds before the
 * coordinator is up: messages wait in the queue until the connection is made.
 * Once a TCP connection exists, the handshake must succeed within the
 * handshake time-out: a refused key, a security mismatch (--insecure on one
 * side only), wrong keys or a time-out are logged and make every later
 * transport_recv() / transport_send() fail with ERR_CONFIG. */
int transport_zmq_connect(const char *endpoint, transport **out);
int transport_zmq_connect_secure(const char *endpoint, const struct transport_zmq_security *sec,
				 transport **out);
/* A new CURVE key pair in Z85 (40 characters + NUL each). */
int transport_zmq_keygen(char public_z85[41], char secret_z85[41]);
/* The public key (Z85) of a secret key file, checked like the transport does. */
int transport_zmq_public_key(const char *secret_key_file, char public_z85[41]);
/* The endpoint actually bound or connected ("tcp://127.0.0.1:41234" for a
 * "*" port); NULL when t is not a ZeroMQ transport. */
const char *transport_zmq_endpoint(const transport *t);
/* Open MPI: rank 0 is the coordinator, the other ranks workers.  *rank and
 * *size are set; MPI is initialised on first use and finalised on destroy.
 * One MPI transport per process.  ERR_CONFIG when built without MPI. */
int transport_mpi_new(int *rank, int *size, transport **out);
/* 1 when this process was started by mpirun (without initialising MPI). */
int transport_mpi_launched(void);

void transport_destroy(transport **t);

/* ERR_RANGE for a peer index never seen or a size beyond the transport's
 * limits, ERR_PEER for a dropped / disconnected / unresponsive peer. */
int transport_send(transport *t, int peer, const void *hdr, size_t hdr_len, const void *data,
		   size_t data_len);
int transport_recv(transport *t, int timeout_ms, struct transport_frame *out);
/* Forgets a peer.  ZeroMQ: its later messages arrive under a new index.
 * MPI: it keeps its index; sends fail until it sends again. */
void transport_drop_peer(transport *t, int peer);
/* Peer indices handed out so far (coordinator side; dropped ones included):
 * valid indices are [0, n). */
int transport_n_peers(const transport *t);
/* Human-readable peer name for logs ("zmq peer 2", "mpi rank 3"); valid until
 * the next transport_recv() or destroy. */
const char *transport_peer_name(const transport *t, int peer);
/* Cap on raw frames received (default 1 GiB).  ZeroMQ: set it before peers
 * connect (the library-level ceiling is fixed per connection). */
void transport_set_frame_cap(transport *t, size_t cap);
/* How long one send may wait for a slow peer (ms, > 0; default 30 s). */
void transport_set_send_timeout(transport *t, int timeout_ms);

/* Internal: the operations each implementation provides. */
struct transport_ops {
	int (*send)(transport *t, int peer, const void *hdr, size_t hdr_len, const void *data,
		    size_t data_len);
	int (*recv)(transport *t, int timeout_ms, struct transport_frame *out);
	void (*drop_peer)(transport *t, int peer);
	int (*n_peers)(const transport *t);
	const char *(*peer_name)(const transport *t, int peer);
	void (*destroy)(transport *t);
	/* optional: frame_cap or send_timeout_ms changed */
	void (*limits_changed)(transport *t);
};

struct transport {
	const struct transport_ops *ops;
	size_t frame_cap;
	int send_timeout_ms;
};

/* Internal: sets ops and the default limits. */
void transport_init_base(transport *t, const struct transport_ops *ops);

#endif
