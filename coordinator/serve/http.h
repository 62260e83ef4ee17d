/* http: a small HTTP/1.1 server (the only user of libmicrohttpd).
 *
 * Every connection has its own thread (up to max_conns at once; more are
 * refused by closing them), so the handler may block: it runs once per
 * request, after the whole body has arrived (a body over max_body bytes is
 * not kept: the handler sees body_too_large and no body), and fills in a
 * response, either a complete body or a stream.  A stream's read function is
 * called again and again from the connection's thread, may block until it has
 * data, and returns the number of bytes written (> 0), 0 at the end, or -1 to
 * abort the connection; its free function is called exactly once, when the
 * response is finished or the connection dies.
 *
 * http_conn_closed() tells whether the client has gone away (hung up or
 * reset), so a handler waiting for a long computation can give up at once.
 * The handler's strings (method, url, headers, body) live until the handler
 * returns. */
#ifndef MOEFLEET_HTTP_H
#define MOEFLEET_HTTP_H

#include <stddef.h>
#include <sys/types.h>

struct http_request {
	const char *method;
	const char *url;	   /* path, without the query string */
	const char *authorization; /* the Authorization header or NULL */
	const char *body;	   /* NUL-terminated (body_len bytes before the NUL) */
	size_t body_len;
	int body_too_large;
	int fd; /* the connection's socket, for http_conn_closed */
};

typedef ssize_t (*http_read_fn)(void *ctx, char *buf, size_t cap);

struct http_response {
	int status;
	const char *content_type; /* static string */
	char *body;		  /* malloc'ed, taken over by http; NULL = empty */
	size_t body_len;
	/* a stream instead of a body (read != NULL) */
	http_read_fn read;
	void (*free_fn)(void *ctx);
	void *ctx;
};

typedef void (*http_handler)(void *ctx, const struct http_request *req, struct http_response *res);

struct http_config {
	const char *host; /* address or name to bind; NULL: 127.0.0.1 */
	int port;	  /* 0: any free port (see http_port) */
	size_t max_body;
	int max_conns;
	int idle_timeout_s; /* close connections idle this long */
	http_handler handler;
	void *ctx;
};

typedef struct http http;

/* Binds and starts serving.  ERR_CONFIG (logged) if the address cannot be
 * resolved or bound. */
int http_new(const struct http_config *cfg, http **out);
/* Stops accepting, waits for the connection threads, frees everything. */
void http_destroy(http **h);
int http_port(const http *h);
/* 1 if the peer of connection fd (http_request.fd) hung up or reset it. */
int http_conn_closed(int fd);

#endif
