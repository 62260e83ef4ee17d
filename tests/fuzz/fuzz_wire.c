/* fuzz_wire: the coordinator <-> worker message decoder on arbitrary bytes.
 * The first byte picks what the rest is:
 *   0: one envelope (any message kind) for wire_decode();
 *   1: a routing-trace record for wire_decode_trace();
 *   2: u16 header length, the header, then the raw frame that follows it, as
 *      a worker or coordinator receives them: a Batch's activation frame must
 *      have wire_batch_frame_bytes() for an n_embd picked by the second byte
 *      and is then converted row by row to F32 like a worker does, a Result's
 *      frame is read as F32 outputs; the frames of KvPage, AttnBatch,
 *      AttnResult, IdxBatch and IdxResult must have their
 *      wire_*_frame_bytes() and are read whole.
 * Every decoded message must encode again, and decode to the same message. */
#include "fuzz.h"
#include "../../common/log.h"
#include "../../common/wire.h"
#include "../../kernels/kern.h"

#include <stdlib.h>
#include <string.h>

static void fuzz_same(const struct wire_msg *a, const struct wire_msg *b)
{
	if (a->kind != b->kind)
		abort();
	switch (a->kind) {
	case WIRE_ASSIGN:
		if (a->u.assign.n_pairs != b->u.assign.n_pairs ||
		    memcmp(&a->u.assign.spec, &b->u.assign.spec, sizeof(a->u.assign.spec)) ||
		    memcmp(a->u.assign.pair_layer, b->u.assign.pair_layer,
			   a->u.assign.n_pairs * sizeof(uint32_t)) ||
		    memcmp(a->u.assign.pair_expert, b->u.assign.pair_expert,
			   a->u.assign.n_pairs * sizeof(uint32_t)))
			abort();
		break;
	case WIRE_BATCH: {
		const struct wire_batch *x = &a->u.batch, *y = &b->u.batch;
		size_t n = (size_t)x->n_rows * x->k;
		if (x->n_rows != y->n_rows || x->k != y->k || x->dtype != y->dtype ||
		    x->layer != y->layer || x->step != y->step ||
		    memcmp(x->ids, y->ids, n * sizeof(int32_t)) ||
		    memcmp(x->weights, y->weights, n * sizeof(float)))
			abort();
		break;
	}
	case WIRE_KV_PAGE:
		if (memcmp(&a->u.kv_page, &b->u.kv_page, sizeof(a->u.kv_page)))
			abort();
		break;
	case WIRE_KV_FREE:
		if (a->u.kv_free.seq != b->u.kv_free.seq)
			abort();
		break;
	case WIRE_ATTN_BATCH: {
		const struct wire_attn_batch *x = &a->u.attn_batch, *y = &b->u.attn_batch;
		if (x->step != y->step || x->layer != y->layer || x->n_rows != y->n_rows ||
		    x->n_head != y->n_head || x->n_head_kv != y->n_head_kv ||
		    x->head_dim_k != y->head_dim_k || x->head_dim_v != y->head_dim_v ||
		    memcmp(&x->scale, &y->scale, sizeof(x->scale)) || x->page != y->page ||
		    x->n_shard != y->n_shard || x->v0 != y->v0 || x->v1 != y->v1 ||
		    memcmp(x->seq, y->seq, x->n_rows * sizeof(int32_t)) ||
		    memcmp(x->pos, y->pos, x->n_rows * sizeof(int32_t)))
			abort();
		break;
	}
	case WIRE_ATTN_RESULT:
		if (memcmp(&a->u.attn_result, &b->u.attn_result, sizeof(a->u.attn_result)))
			abort();
		break;
	case WIRE_IDX_BATCH: {
		const struct wire_idx_batch *x = &a->u.idx_batch, *y = &b->u.idx_batch;
		if (x->step != y->step || x->layer != y->layer || x->n_rows != y->n_rows ||
		    x->n_head != y->n_head || x->dim != y->dim || x->page != y->page ||
		    x->n_shard != y->n_shard || x->v0 != y->v0 || x->v1 != y->v1 ||
		    memcmp(x->seq, y->seq, x->n_rows * sizeof(int32_t)) ||
		    memcmp(x->pos, y->pos, x->n_rows * sizeof(int32_t)))
			abort();
		break;
	}
	case WIRE_IDX_RESULT:
		if (memcmp(&a->u.idx_result, &b->u.idx_result, sizeof(a->u.idx_result)))
			abort();
		break;
	case WIRE_HELLO:
		if (strcmp(a->u.hello.name, b->u.hello.name) ||
		    strcmp(a->u.hello.model_sha, b->u.hello.model_sha) ||
		    a->u.hello.memory_bytes != b->u.hello.memory_bytes ||
		    a->u.hello.kv_bytes != b->u.hello.kv_bytes ||
		    a->u.hello.shard_file != b->u.hello.shard_file ||
		    a->u.hello.n_held != b->u.hello.n_held)
			abort();
		break;
	case WIRE_SHUTDOWN:
	case WIRE_ERROR:
		if (strcmp(a->u.text, b->u.text))
			abort();
		break;
	default: break;
	}
}

static void fuzz_round_trip(const struct wire_msg *m)
{
	uint8_t *buf = NULL;
	size_t cap = 0, len = 0;
	if (wire_encode(m, &buf, &cap, &len))
		abort(); /* whatever decodes must encode */
	struct wire_msg again;
	if (wire_decode(buf, len, "fuzz", &again))
		abort();
	fuzz_same(m, &again);
	wire_msg_free(&again);
	free(buf);
}

/* Reads every byte of a frame (as floats where it has whole ones). */
static void fuzz_read_floats(const uint8_t *frame, size_t n)
{
	volatile float sum = 0;
	for (size_t i = 0; i + sizeof(float) <= n; i += sizeof(float)) {
		float v;
		memcpy(&v, frame + i, sizeof(v));
		sum += v;
	}
	(void)sum; /* the reads are what matters: every byte of the frame */
}

static void fuzz_frame(const struct wire_msg *m, const uint8_t *frame, size_t n, uint32_t n_embd)
{
	if (m->kind == WIRE_BATCH) {
		const struct wire_batch *b = &m->u.batch;
		if (n != wire_batch_frame_bytes(b, n_embd))
			return; /* refused by the worker */
		size_t row = kern_row_bytes(b->dtype, n_embd);
		float *x = malloc(n_embd * sizeof(float));
		if (!x)
			abort();
		for (uint32_t r = 0; r < b->n_rows; r++)
			kern_dequant_row(b->dtype, frame + r * row, x, n_embd);
		free(x);
	} else if (m->kind == WIRE_RESULT) {
		if (n == wire_result_frame_bytes(&m->u.result, n_embd))
			fuzz_read_floats(frame, n);
	} else if ((m->kind == WIRE_KV_PAGE && n == wire_kv_page_frame_bytes(&m->u.kv_page)) ||
		   (m->kind == WIRE_ATTN_BATCH &&
		    n == wire_attn_batch_frame_bytes(&m->u.attn_batch)) ||
		   (m->kind == WIRE_ATTN_RESULT &&
		    n == wire_attn_result_frame_bytes(&m->u.attn_result)) ||
		   (m->kind == WIRE_IDX_BATCH &&
		    n == wire_idx_batch_frame_bytes(&m->u.idx_batch)) ||
		   (m->kind == WIRE_IDX_RESULT &&
		    n == wire_idx_result_frame_bytes(&m->u.idx_result))) {
		fuzz_read_floats(frame, n);
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static int init;
	if (!init) {
		log_set_quiet(1);
		kern_init();
		init = 1;
	}
	if (size < 1)
		return 0;
	int mode = data[0] % 3;
	data++;
	size--;
	if (mode == 1) {
		struct wire_trace t;
		if (wire_decode_trace(data, size, &t) == 0) {
			size_t n = (size_t)t.n_rows * t.k;
			for (size_t i = 0; i < n; i++)
				if (t.ids[i] < -1)
					abort();
			wire_trace_free(&t);
		}
		return 0;
	}
	const uint8_t *hdr = data, *frame = NULL;
	size_t hdr_len = size, frame_len = 0;
	uint32_t n_embd = 0;
	if (mode == 2) {
		if (size < 3)
			return 0;
		n_embd = 32u * (1u + data[0] % 8);
		hdr_len = data[1] | (size_t)data[2] << 8;
		if (hdr_len > size - 3)
			hdr_len = size - 3;
		hdr = data + 3;
		frame = hdr + hdr_len;
		frame_len = size - 3 - hdr_len;
	}
	struct wire_msg m;
	if (wire_decode(hdr, hdr_len, "fuzz", &m))
		return 0;
	fuzz_round_trip(&m);
	if (mode == 2)
		fuzz_frame(&m, frame, frame_len, n_embd);
	wire_msg_free(&m);
	return 0;
}
