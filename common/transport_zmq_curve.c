/* transport_zmq CURVE security: key files (reading, checking their mode,
 * keygen), the ZAP handler thread that admits a worker when its public key
 * is in the authorised-keys file (re-read when it changes), and the CURVE
 * options of a socket.  See transport_zmq.c and transport.h. */
#include "transport_zmq_internal.h"
#include "err.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zmq.h>

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
int tzmq_log_allowed(double *at, int *suppressed)
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
void tzmq_zap_stop(struct tzmq_zap *z)
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

/* CURVE options: the coordinator is the server (cluster secret key, ZAP
 * domain); a worker is a client that knows the server's public key. */
int tzmq_setup_curve(struct transport_zmq *tz, const struct transport_zmq_security *sec)
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
