/* transport: the calls every implementation shares; they dispatch to t->ops.
 * The ZeroMQ and MPI specifics live in transport_zmq.c and transport_mpi.c. */
#include "transport.h"
#include "err.h"
#include "log.h"

#include <stdlib.h>

void transport_init_base(transport *t, const struct transport_ops *ops)
{
	t->ops = ops;
	t->frame_cap = TRANSPORT_FRAME_CAP_DEFAULT;
	t->send_timeout_ms = TRANSPORT_SEND_TIMEOUT_DEFAULT;
}

int transport_mpi_launched(void)
{
	/* set by Open MPI's launcher (OMPI_*) and by any PMIx-based one */
	static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
					   "PMIX_RANK"};
	for (size_t i = 0; i < sizeof(vars) / sizeof(vars[0]); i++) {
		const char *v = getenv(vars[i]);
		if (v && *v)
			return 1;
	}
	return 0;
}

void transport_destroy(transport **t)
{
	if (!t || !*t)
		return;
	(*t)->ops->destroy(*t);
	*t = NULL;
}

int transport_send(transport *t, int peer, const void *hdr, size_t hdr_len, const void *data,
		   size_t data_len)
{
	if (!hdr && hdr_len) {
		log_error("transport: send with a NULL header of %zu bytes", hdr_len);
		return ERR_CONFIG;
	}
	if (!data && data_len) {
		log_error("transport: send with a NULL frame of %zu bytes", data_len);
		return ERR_CONFIG;
	}
	return t->ops->send(t, peer, hdr, hdr_len, data, data_len);
}

int transport_recv(transport *t, int timeout_ms, struct transport_frame *out)
{
	return t->ops->recv(t, timeout_ms, out);
}

void transport_drop_peer(transport *t, int peer)
{
	t->ops->drop_peer(t, peer);
}

int transport_n_peers(const transport *t)
{
	return t->ops->n_peers(t);
}

const char *transport_peer_name(const transport *t, int peer)
{
	return t->ops->peer_name(t, peer);
}

void transport_set_frame_cap(transport *t, size_t cap)
{
	t->frame_cap = cap;
	if (t->ops->limits_changed)
		t->ops->limits_changed(t);
}

void transport_set_send_timeout(transport *t, int timeout_ms)
{
	t->send_timeout_ms = timeout_ms > 0 ? timeout_ms : TRANSPORT_SEND_TIMEOUT_DEFAULT;
	if (t->ops->limits_changed)
		t->ops->limits_changed(t);
}
