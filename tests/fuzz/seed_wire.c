/* seed_wire: writes the seed corpus of fuzz_wire (one file per message kind,
 * in each of the target's modes) into the directory given.  Not built by
 * make; regenerate with:
 *   cc -I. -Ibuild -o /tmp/seed_wire tests/fuzz/seed_wire.c build/libmoefleet.a \
 *      build/libkern_avx2.a -lprotobuf-c -lm && /tmp/seed_wire tests/fuzz/corpus/wire */
#include "../../common/wire.h"
#include "../../kernels/kern.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *dir;

static void put(const char *name, int mode, const uint8_t *hdr, size_t len, const void *frame,
		size_t frame_len, uint8_t embd_sel)
{
	char path[1024];
	snprintf(path, sizeof(path), "%s/%s-%d", dir, name, mode);
	FILE *f = fopen(path, "wb");
	if (!f)
		exit(1);
	fputc(mode, f);
	if (mode == 2) {
		fputc(embd_sel, f);
		fputc((int)(len & 0xff), f);
		fputc((int)(len >> 8), f);
	}
	fwrite(hdr, 1, len, f);
	if (mode == 2 && frame)
		fwrite(frame, 1, frame_len, f);
	fclose(f);
}

int main(int argc, char **argv)
{
	if (argc != 2)
		return 2;
	dir = argv[1];
	uint8_t *buf = NULL;
	size_t cap = 0, len = 0;
	struct wire_msg m;
	int32_t ids[4] = {0, 1, -1, 2};
	float w[4] = {0.5f, 0.5f, 0, 1};
	uint32_t pl[3] = {0, 0, 1}, pe[3] = {0, 1, 2};
	static uint8_t frame[2 * 34 * 8]; /* two Q8_0 rows of 256 (n_embd selector 7) */

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_HELLO;
	m.u.hello.cores = 2;
	m.u.hello.memory_bytes = 1 << 30;
	m.u.hello.kv_bytes = 1 << 29;
	snprintf(m.u.hello.name, sizeof(m.u.hello.name), "w1");
	wire_encode(&m, &buf, &cap, &len);
	put("hello", 0, buf, len, NULL, 0, 0);
	m.u.hello.has_model = 1;
	m.u.hello.shard_file = 1;
	m.u.hello.n_held = 3;
	m.u.hello.held_layer = pl;
	m.u.hello.held_expert = pe;
	wire_encode(&m, &buf, &cap, &len);
	put("hello-shard", 0, buf, len, NULL, 0, 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_ASSIGN;
	m.u.assign.worker_id = 1;
	m.u.assign.spec.n_layer = 2;
	m.u.assign.spec.n_embd = 64;
	m.u.assign.spec.n_ff_exp = 32;
	m.u.assign.spec.n_expert = 4;
	m.u.assign.spec.n_expert_used = 2;
	m.u.assign.spec.layer_moe[0] = m.u.assign.spec.layer_moe[1] = 1;
	m.u.assign.n_pairs = 3;
	m.u.assign.pair_layer = pl;
	m.u.assign.pair_expert = pe;
	wire_encode(&m, &buf, &cap, &len);
	put("assign", 0, buf, len, NULL, 0, 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_WEIGHT_CHUNK;
	m.u.chunk = (struct wire_weight_chunk){1, 2, 0, KERN_F32, 0, 4096};
	wire_encode(&m, &buf, &cap, &len);
	put("chunk", 0, buf, len, NULL, 0, 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_READY;
	m.u.ready.n_experts = 3;
	wire_encode(&m, &buf, &cap, &len);
	put("ready", 0, buf, len, NULL, 0, 0);

	uint32_t dtypes[3] = {KERN_F32, KERN_BF16, KERN_Q8_0};
	for (int d = 0; d < 3; d++) {
		memset(&m, 0, sizeof(m));
		m.kind = WIRE_BATCH;
		m.u.batch = (struct wire_batch){7, 1, 2, 2, dtypes[d], ids, w};
		wire_encode(&m, &buf, &cap, &len);
		char name[32];
		snprintf(name, sizeof(name), "batch%d", d);
		size_t fb = wire_batch_frame_bytes(&m.u.batch, 32);
		put(name, 0, buf, len, NULL, 0, 0);
		put(name, 2, buf, len, frame, fb <= sizeof(frame) ? fb : 0, 0);
	}
	memset(&m, 0, sizeof(m));
	m.kind = WIRE_RESULT;
	m.u.result = (struct wire_result){7, 1, 1, 0.001};
	wire_encode(&m, &buf, &cap, &len);
	put("result", 0, buf, len, NULL, 0, 0);
	put("result", 2, buf, len, frame, 32 * sizeof(float), 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_KV_PAGE;
	m.u.kv_page = (struct wire_kv_page){1, 0, 2, 64, 2, 0, WIRE_KV_ATTN};
	wire_encode(&m, &buf, &cap, &len);
	put("kv_page", 0, buf, len, NULL, 0, 0);
	put("kv_page", 2, buf, len, frame, wire_kv_page_frame_bytes(&m.u.kv_page), 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_KV_FREE;
	m.u.kv_free.seq = 3;
	wire_encode(&m, &buf, &cap, &len);
	put("kv_free", 0, buf, len, NULL, 0, 0);

	int32_t seq[2] = {0, 1}, at[2] = {64, 200};
	memset(&m, 0, sizeof(m));
	m.kind = WIRE_ATTN_BATCH;
	m.u.attn_batch = (struct wire_attn_batch){8, 1, 2, 2, 1, 8, 8, 0.35f, 64, 4, 0, 2, seq, at};
	wire_encode(&m, &buf, &cap, &len);
	put("attn_batch", 0, buf, len, NULL, 0, 0);
	put("attn_batch", 2, buf, len, frame, wire_attn_batch_frame_bytes(&m.u.attn_batch), 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_ATTN_RESULT;
	m.u.attn_result = (struct wire_attn_result){8, 1, 2, 2, 8, 0.001};
	wire_encode(&m, &buf, &cap, &len);
	put("attn_result", 0, buf, len, NULL, 0, 0);
	put("attn_result", 2, buf, len, frame, wire_attn_result_frame_bytes(&m.u.attn_result), 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_KV_PAGE;
	m.u.kv_page = (struct wire_kv_page){1, 0, 2, 16, 2, 0, WIRE_KV_IDX};
	wire_encode(&m, &buf, &cap, &len);
	put("kv_page_idx", 0, buf, len, NULL, 0, 0);
	put("kv_page_idx", 2, buf, len, frame, wire_kv_page_frame_bytes(&m.u.kv_page), 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_IDX_BATCH;
	m.u.idx_batch = (struct wire_idx_batch){9, 1, 2, 2, 4, 16, 4, 0, 2, seq, at};
	wire_encode(&m, &buf, &cap, &len);
	put("idx_batch", 0, buf, len, NULL, 0, 0);
	put("idx_batch", 2, buf, len, frame, wire_idx_batch_frame_bytes(&m.u.idx_batch), 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_IDX_RESULT;
	m.u.idx_result = (struct wire_idx_result){9, 1, 2, 16, 0.001};
	wire_encode(&m, &buf, &cap, &len);
	put("idx_result", 0, buf, len, NULL, 0, 0);
	put("idx_result", 2, buf, len, frame, wire_idx_result_frame_bytes(&m.u.idx_result), 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_HEARTBEAT;
	m.u.heartbeat_nonce = 42;
	wire_encode(&m, &buf, &cap, &len);
	put("heartbeat", 0, buf, len, NULL, 0, 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_STATS;
	m.u.stats.rows = 10;
	wire_encode(&m, &buf, &cap, &len);
	put("stats", 0, buf, len, NULL, 0, 0);

	memset(&m, 0, sizeof(m));
	m.kind = WIRE_SHUTDOWN;
	snprintf(m.u.text, sizeof(m.u.text), "done");
	wire_encode(&m, &buf, &cap, &len);
	put("shutdown", 0, buf, len, NULL, 0, 0);
	m.kind = WIRE_ERROR;
	wire_encode(&m, &buf, &cap, &len);
	put("error", 0, buf, len, NULL, 0, 0);

	struct wire_trace t = {0};
	uint64_t eb[2] = {100, 200};
	int32_t holders[2 * 4] = {0, 1, 0, 1, 1, 0, 1, 0};
	int32_t pos[2] = {0, 1};
	t = (struct wire_trace){3, 0, 2, 2, ids, w, pos, 2, 4, 1, 64, eb, holders, 1};
	wire_encode_trace(&t, &buf, &cap, &len);
	put("trace", 1, buf, len, NULL, 0, 0);
	free(buf);
	return 0;
}
