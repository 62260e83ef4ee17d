#define _GNU_SOURCE
#include "http.h"

#include <microhttpd.h>

#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "../../common/err.h"
#include "../../common/log.h"

struct http {
	struct MHD_Daemon *d;
	struct http_config cfg;
	int port;
};

/* Per-request state while the body arrives. */
struct http_upload {
	char *buf;
	size_t len, cap;
	int too_large;
};

struct http_stream {
	http_read_fn read;
	void (*free_fn)(void *ctx);
	void *ctx;
};

static ssize_t http_stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
	(void)pos;
	struct http_stream *s = cls;
	ssize_t n = s->read(s->ctx, buf, max);
	if (n > 0)
		return n;
	return n == 0 ? MHD_CONTENT_READER_END_OF_STREAM : MHD_CONTENT_READER_END_WITH_ERROR;
}

static void http_stream_free(void *cls)
{
	struct http_stream *s = cls;
	if (s->free_fn)
		s->free_fn(s->ctx);
	free(s);
}

static void http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
			   enum MHD_RequestTerminationCode toe)
{
	(void)cls;
	(void)conn;
	(void)toe;
	struct http_upload *u = *con_cls;
	if (u) {
		free(u->buf);
		free(u);
		*con_cls = NULL;
	}
}

static int http_append(struct http_upload *u, const char *data, size_t n, size_t max)
{
	if (u->too_large || u->len + n > max) {
		u->too_large = 1;
		return 0;
	}
	if (u->len + n + 1 > u->cap) {
		size_t cap = u->cap ? u->cap : 1024;
		while (cap < u->len + n + 1)
			cap *= 2;
		char *t = realloc(u->buf, cap);
		if (!t)
			return ERR_NOMEM;
		u->buf = t;
		u->cap = cap;
	}
	memcpy(u->buf + u->len, data, n);
	u->len += n;
	u->buf[u->len] = 0;
	return 0;
}

static enum MHD_Result http_access(void *cls, struct MHD_Connection *conn, const char *url,
				   const char *method, const char *version, const char *upload_data,
				   size_t *upload_data_size, void **con_cls)
{
	(void)version;
	http *h = cls;
	struct http_upload *u = *con_cls;
	if (!u) {
		u = calloc(1, sizeof(*u));
		if (!u)
			return MHD_NO;
		*con_cls = u;
		return MHD_YES;
	}
	if (*upload_data_size > 0) {
		if (http_append(u, upload_data, *upload_data_size, h->cfg.max_body))
			return MHD_NO;
		*upload_data_size = 0;
		return MHD_YES;
	}
	const union MHD_ConnectionInfo *ci =
	    MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
	struct http_request req = {
	    .method = method,
	    .url = url,
	    .authorization = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization"),
	    .body = u->too_large || !u->buf ? "" : u->buf,
	    .body_len = u->too_large ? 0 : u->len,
	    .body_too_large = u->too_large,
	    .fd = ci ? ci->connect_fd : -1,
	};
	struct http_response res = {.status = 500, .content_type = "text/plain"};
	h->cfg.handler(h->cfg.ctx, &req, &res);
	struct MHD_Response *r = NULL;
	if (res.read) {
		struct http_stream *s = malloc(sizeof(*s));
		if (!s) {
			if (res.free_fn)
				res.free_fn(res.ctx);
			return MHD_NO;
		}
		*s = (struct http_stream){res.read, res.free_fn, res.ctx};
		r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, http_stream_read, s,
						      http_stream_free);
		if (!r) {
			http_stream_free(s);
			return MHD_NO;
		}
		MHD_add_response_header(r, "Cache-Control", "no-cache");
	} else {
		r = MHD_create_response_from_buffer(res.body_len, res.body ? res.body : (void *)"",
						    res.body ? MHD_RESPMEM_MUST_FREE
							     : MHD_RESPMEM_PERSISTENT);
		if (!r) {
			free(res.body);
			return MHD_NO;
		}
	}
	if (res.content_type)
		MHD_add_response_header(r, "Content-Type", res.content_type);
	enum MHD_Result ret = MHD_queue_response(conn, (unsigned)res.status, r);
	MHD_destroy_response(r);
	return ret;
}

int http_new(const struct http_config *cfg, http **out)
{
	*out = NULL;
	const char *host = cfg->host ? cfg->host : "127.0.0.1";
	if (cfg->port < 0 || cfg->port > 65535 || !cfg->handler || cfg->max_conns < 1) {
		log_error("http: invalid configuration (port %d)", cfg->port);
		return ERR_CONFIG;
	}
	char port[16];
	snprintf(port, sizeof(port), "%d", cfg->port);
	struct addrinfo hints = {
	    .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
	struct addrinfo *ai = NULL;
	int gr = getaddrinfo(host, port, &hints, &ai);
	if (gr || !ai) {
		log_error("http: cannot resolve '%s': %s", host, gai_strerror(gr));
		return ERR_CONFIG;
	}
	http *h = calloc(1, sizeof(*h));
	if (!h) {
		freeaddrinfo(ai);
		return ERR_NOMEM;
	}
	h->cfg = *cfg;
	unsigned flags =
	    MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL;
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	h->d = MHD_start_daemon(flags, (uint16_t)cfg->port, NULL, NULL, http_access, h,
				MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT,
				(unsigned)cfg->max_conns, MHD_OPTION_CONNECTION_TIMEOUT,
				(unsigned)(cfg->idle_timeout_s > 0 ? cfg->idle_timeout_s : 60),
				MHD_OPTION_NOTIFY_COMPLETED, http_completed, h,
				MHD_OPTION_THREAD_STACK_SIZE, (size_t)(512 * 1024), MHD_OPTION_END);
	freeaddrinfo(ai);
	if (!h->d) {
		log_error("http: cannot listen on %s port %d (in use, or not an address of this "
			  "machine)",
			  host, cfg->port);
		free(h);
		return ERR_CONFIG;
	}
	const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
	h->port = di ? di->port : cfg->port;
	*out = h;
	return 0;
}

void http_destroy(http **hp)
{
	if (!hp || !*hp)
		return;
	http *h = *hp;
	if (h->d)
		MHD_stop_daemon(h->d);
	free(h);
	*hp = NULL;
}

int http_port(const http *h)
{
	return h->port;
}

int http_conn_closed(int fd)
{
	if (fd < 0)
		return 0;
	struct pollfd p = {.fd = fd, .events = POLLRDHUP};
	if (poll(&p, 1, 0) <= 0)
		return 0;
	return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}
