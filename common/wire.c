#include "wire.h"
#include "err.h"
#include "log.h"
#include "../kernels/kern.h"
#include "proto/moefleet.pb-c.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *wire_kind_name(enum wire_kind k)
{
	static const char *names[] = {"none",	   "hello",	 "assign",     "weight_chunk",
				      "ready",	   "batch",	 "result",     "heartbeat",
				      "stats",	   "shutdown",	 "error",      "release",
				      "progress",  "kv_page",	 "attn_batch", "attn_result",
				      "idx_batch", "idx_result", "kv_free"};
	return (unsigned)k <= WIRE_KV_FREE ? names[k] : "?";
}

static int wire_dtype_ok(uint32_t t)
{
	return t == KERN_F32 || t == KERN_BF16 || t == KERN_Q8_0 || t == KERN_Q8_1 ||
	       t == KERN_Q8_K;
}

size_t wire_batch_frame_bytes(const struct wire_batch *b, uint32_t n_embd)
{
	return kern_row_bytes(b->dtype, n_embd) * b->n_rows;
}

size_t wire_result_frame_bytes(const struct wire_result *r, uint32_t n_embd)
{
	return (size_t)r->n_items * n_embd * sizeof(float);
}

/* a * b * c * d, or SIZE_MAX when it does not fit a size_t. */
static size_t wire_product(uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
	uint64_t x;
	if (__builtin_mul_overflow(a, b, &x) || __builtin_mul_overflow(x, c, &x) ||
	    __builtin_mul_overflow(x, d, &x) || x > SIZE_MAX)
		return SIZE_MAX;
	return (size_t)x;
}

size_t wire_kv_page_frame_bytes(const struct wire_kv_page *p)
{
	return wire_product(p->n_pos, (uint64_t)p->k_width + p->v_width, sizeof(uint16_t), 1);
}

size_t wire_attn_batch_frame_bytes(const struct wire_attn_batch *b)
{
	return wire_product(b->n_rows, b->n_head, b->head_dim_k, sizeof(float));
}

size_t wire_attn_result_frame_bytes(const struct wire_attn_result *r)
{
	return wire_product(r->n_rows, r->n_head, 2 + (uint64_t)r->head_dim_v, sizeof(float));
}

size_t wire_idx_batch_frame_bytes(const struct wire_idx_batch *b)
{
	return wire_product(b->n_rows, b->n_head, (uint64_t)b->dim + 1, sizeof(float));
}

size_t wire_idx_result_frame_bytes(const struct wire_idx_result *r)
{
	return wire_product(r->n_scores, sizeof(float), 1, 1);
}

/* ------------------------------------------------------------ encode */

/* Groups (layer, expert) pairs by layer (layers < MOE_MAX_LAYERS, keeping
 * their order) into *layers (MOE_MAX_LAYERS entries, each experts array to be
 * freed) and the non-empty ones' pointers into *ptrs (*n_layers of them). */
static int wire_group_pairs(uint32_t n_pairs, const uint32_t *pl, const uint32_t *pe,
			    Moefleet__LayerExperts **layers, Moefleet__LayerExperts ***ptrs,
			    size_t *n_layers)
{
	*layers = calloc(MOE_MAX_LAYERS, sizeof(**layers));
	*ptrs = calloc(MOE_MAX_LAYERS, sizeof(**ptrs));
	if (!*layers || !*ptrs)
		return ERR_NOMEM;
	uint32_t cnt[MOE_MAX_LAYERS] = {0};
	for (uint32_t i = 0; i < n_pairs; i++) {
		if (pl[i] >= MOE_MAX_LAYERS)
			return ERR_RANGE;
		cnt[pl[i]]++;
	}
	for (uint32_t l = 0; l < MOE_MAX_LAYERS; l++) {
		if (!cnt[l])
			continue;
		Moefleet__LayerExperts *le = &(*layers)[l];
		moefleet__layer_experts__init(le);
		le->layer = l;
		le->experts = malloc(cnt[l] * sizeof(uint32_t));
		if (!le->experts)
			return ERR_NOMEM;
		for (uint32_t i = 0; i < n_pairs; i++)
			if (pl[i] == l)
				le->experts[le->n_experts++] = pe[i];
		(*ptrs)[(*n_layers)++] = le;
	}
	return 0;
}

int wire_encode(const struct wire_msg *m, uint8_t **buf, size_t *cap, size_t *len)
{
	int rc = 0;
	Moefleet__Envelope env = MOEFLEET__ENVELOPE__INIT;
	Moefleet__Hello hello = MOEFLEET__HELLO__INIT;
	Moefleet__Assign assign = MOEFLEET__ASSIGN__INIT;
	Moefleet__ExpertSpec spec = MOEFLEET__EXPERT_SPEC__INIT;
	Moefleet__WeightChunk chunk = MOEFLEET__WEIGHT_CHUNK__INIT;
	Moefleet__Ready ready = MOEFLEET__READY__INIT;
	Moefleet__Batch batch = MOEFLEET__BATCH__INIT;
	Moefleet__Result result = MOEFLEET__RESULT__INIT;
	Moefleet__Heartbeat hb = MOEFLEET__HEARTBEAT__INIT;
	Moefleet__Stats stats = MOEFLEET__STATS__INIT;
	Moefleet__Shutdown shutdown = MOEFLEET__SHUTDOWN__INIT;
	Moefleet__Error error = MOEFLEET__ERROR__INIT;
	Moefleet__Release release = MOEFLEET__RELEASE__INIT;
	Moefleet__Progress progress = MOEFLEET__PROGRESS__INIT;
	Moefleet__KvPage kv_page = MOEFLEET__KV_PAGE__INIT;
	Moefleet__KvFree kv_free = MOEFLEET__KV_FREE__INIT;
	Moefleet__AttnBatch attn_batch = MOEFLEET__ATTN_BATCH__INIT;
	Moefleet__AttnResult attn_result = MOEFLEET__ATTN_RESULT__INIT;
	Moefleet__IdxBatch idx_batch = MOEFLEET__IDX_BATCH__INIT;
	Moefleet__IdxResult idx_result = MOEFLEET__IDX_RESULT__INIT;
	Moefleet__LayerExperts *layers = NULL, **layer_ptrs = NULL;
	int n_group = 0; /* entries of layers[] whose experts arrays to free */
	protobuf_c_boolean *moe_flags = NULL;
	env.version = WIRE_VERSION;
	switch (m->kind) {
	case WIRE_HELLO:
		hello.cores = m->u.hello.cores;
		hello.memory_bytes = m->u.hello.memory_bytes;
		hello.expert_rows_per_sec = m->u.hello.expert_rows_per_sec;
		hello.has_model = m->u.hello.has_model;
		hello.model_sha = (char *)m->u.hello.model_sha;
		hello.name = (char *)m->u.hello.name;
		hello.shard_file = m->u.hello.shard_file != 0;
		hello.kv_bytes = m->u.hello.kv_bytes;
		hello.kv_shared = m->u.hello.kv_shared != 0;
		if (m->u.hello.shard_file) {
			size_t n_layers = 0;
			n_group = MOE_MAX_LAYERS;
			rc = wire_group_pairs(m->u.hello.n_held, m->u.hello.held_layer,
					      m->u.hello.held_expert, &layers, &layer_ptrs,
					      &n_layers);
			if (rc)
				goto out;
			hello.n_held = n_layers;
			hello.held = layer_ptrs;
		}
		env.body_case = MOEFLEET__ENVELOPE__BODY_HELLO;
		env.hello = &hello;
		break;
	case WIRE_ASSIGN: {
		const struct wire_assign *a = &m->u.assign;
		const struct moe_spec *s = &a->spec;
		if (s->n_layer < 0 || s->n_layer > MOE_MAX_LAYERS)
			return ERR_RANGE;
		spec.n_layer = (uint32_t)s->n_layer;
		spec.n_embd = (uint32_t)s->n_embd;
		spec.n_ff_exp = (uint32_t)s->n_ff_exp;
		spec.n_expert = (uint32_t)s->n_expert;
		spec.n_expert_used = (uint32_t)s->n_expert_used;
		spec.act = (uint32_t)s->act;
		spec.act_alpha = s->act_alpha;
		spec.n_act_limit = (size_t)s->n_layer;
		spec.act_limit = (float *)s->act_limit;
		moe_flags = calloc((size_t)s->n_layer + 1, sizeof(*moe_flags));
		/* group the (layer, expert) pairs by layer, keeping their order */
		layers = calloc((size_t)s->n_layer + 1, sizeof(*layers));
		layer_ptrs = calloc((size_t)s->n_layer + 1, sizeof(*layer_ptrs));
		n_group = s->n_layer + 1;
		if (!moe_flags || !layers || !layer_ptrs) {
			rc = ERR_NOMEM;
			goto out;
		}
		for (int l = 0; l < s->n_layer; l++)
			moe_flags[l] = s->layer_moe[l];
		spec.n_layer_moe = (size_t)s->n_layer;
		spec.layer_moe = moe_flags;
		spec.has_bias = s->has_bias;
		size_t n_layers = 0;
		for (int l = 0; l < s->n_layer; l++) {
			size_t cnt = 0;
			for (uint32_t i = 0; i < a->n_pairs; i++)
				cnt += a->pair_layer[i] == (uint32_t)l;
			if (!cnt)
				continue;
			Moefleet__LayerExperts *le = &layers[n_layers];
			moefleet__layer_experts__init(le);
			le->layer = (uint32_t)l;
			le->experts = malloc(cnt * sizeof(uint32_t));
			if (!le->experts) {
				rc = ERR_NOMEM;
				goto out;
			}
			for (uint32_t i = 0; i < a->n_pairs; i++)
				if (a->pair_layer[i] == (uint32_t)l)
					le->experts[le->n_experts++] = a->pair_expert[i];
			layer_ptrs[n_layers] = le;
			n_layers++;
		}
		assign.worker_id = a->worker_id;
		assign.spec = &spec;
		assign.n_experts = n_layers;
		assign.experts = layer_ptrs;
		assign.stream = a->stream;
		assign.placement_epoch = a->placement_epoch;
		env.body_case = MOEFLEET__ENVELOPE__BODY_ASSIGN;
		env.assign = &assign;
		break;
	}
	case WIRE_WEIGHT_CHUNK:
		chunk.layer = m->u.chunk.layer;
		chunk.expert = m->u.chunk.expert;
		chunk.tensor = m->u.chunk.tensor;
		chunk.type = m->u.chunk.type;
		chunk.offset = m->u.chunk.offset;
		chunk.total = m->u.chunk.total;
		env.body_case = MOEFLEET__ENVELOPE__BODY_WEIGHT_CHUNK;
		env.weight_chunk = &chunk;
		break;
	case WIRE_READY:
		ready.placement_epoch = m->u.ready.placement_epoch;
		ready.n_experts = m->u.ready.n_experts;
		ready.bytes = m->u.ready.bytes;
		ready.released = m->u.ready.released != 0;
		env.body_case = MOEFLEET__ENVELOPE__BODY_READY;
		env.ready = &ready;
		break;
	case WIRE_PROGRESS:
		progress.placement_epoch = m->u.progress.placement_epoch;
		progress.done_bytes = m->u.progress.done;
		progress.total_bytes = m->u.progress.total;
		env.body_case = MOEFLEET__ENVELOPE__BODY_PROGRESS;
		env.progress = &progress;
		break;
	case WIRE_BATCH: {
		const struct wire_batch *b = &m->u.batch;
		if (b->n_rows > WIRE_MAX_ROWS || b->k > WIRE_MAX_K)
			return ERR_RANGE;
		batch.step = b->step;
		batch.layer = b->layer;
		batch.n_rows = b->n_rows;
		batch.k = b->k;
		batch.dtype = b->dtype;
		batch.n_ids = (size_t)b->n_rows * b->k;
		batch.ids = b->ids;
		batch.n_weights = batch.n_ids;
		batch.weights = b->weights;
		env.body_case = MOEFLEET__ENVELOPE__BODY_BATCH;
		env.batch = &batch;
		break;
	}
	case WIRE_RESULT:
		result.step = m->u.result.step;
		result.layer = m->u.result.layer;
		result.n_items = m->u.result.n_items;
		result.compute_seconds = m->u.result.compute_seconds;
		env.body_case = MOEFLEET__ENVELOPE__BODY_RESULT;
		env.result = &result;
		break;
	case WIRE_KV_PAGE: {
		const struct wire_kv_page *p = &m->u.kv_page;
		kv_page.layer = p->layer;
		kv_page.seq = p->seq;
		kv_page.page = p->page;
		kv_page.n_pos = p->n_pos;
		kv_page.k_width = p->k_width;
		kv_page.v_width = p->v_width;
		kv_page.kind = p->kind;
		env.body_case = MOEFLEET__ENVELOPE__BODY_KV_PAGE;
		env.kv_page = &kv_page;
		break;
	}
	case WIRE_KV_FREE:
		kv_free.seq = m->u.kv_free.seq;
		env.body_case = MOEFLEET__ENVELOPE__BODY_KV_FREE;
		env.kv_free = &kv_free;
		break;
	case WIRE_ATTN_BATCH: {
		const struct wire_attn_batch *b = &m->u.attn_batch;
		if (b->n_rows > WIRE_MAX_ROWS)
			return ERR_RANGE;
		attn_batch.step = b->step;
		attn_batch.layer = b->layer;
		attn_batch.n_rows = b->n_rows;
		attn_batch.n_head = b->n_head;
		attn_batch.n_head_kv = b->n_head_kv;
		attn_batch.head_dim_k = b->head_dim_k;
		attn_batch.head_dim_v = b->head_dim_v;
		attn_batch.scale = b->scale;
		attn_batch.page = b->page;
		attn_batch.n_shard = b->n_shard;
		attn_batch.v0 = b->v0;
		attn_batch.v1 = b->v1;
		attn_batch.n_seq = attn_batch.n_pos = b->n_rows;
		attn_batch.seq = b->seq;
		attn_batch.pos = b->pos;
		env.body_case = MOEFLEET__ENVELOPE__BODY_ATTN_BATCH;
		env.attn_batch = &attn_batch;
		break;
	}
	case WIRE_ATTN_RESULT: {
		const struct wire_attn_result *r = &m->u.attn_result;
		attn_result.step = r->step;
		attn_result.layer = r->layer;
		attn_result.n_rows = r->n_rows;
		attn_result.n_head = r->n_head;
		attn_result.head_dim_v = r->head_dim_v;
		attn_result.compute_seconds = r->compute_seconds;
		env.body_case = MOEFLEET__ENVELOPE__BODY_ATTN_RESULT;
		env.attn_result = &attn_result;
		break;
	}
	case WIRE_IDX_BATCH: {
		const struct wire_idx_batch *b = &m->u.idx_batch;
		if (b->n_rows > WIRE_MAX_ROWS)
			return ERR_RANGE;
		idx_batch.step = b->step;
		idx_batch.layer = b->layer;
		idx_batch.n_rows = b->n_rows;
		idx_batch.n_head = b->n_head;
		idx_batch.dim = b->dim;
		idx_batch.page = b->page;
		idx_batch.n_shard = b->n_shard;
		idx_batch.v0 = b->v0;
		idx_batch.v1 = b->v1;
		idx_batch.n_seq = idx_batch.n_pos = b->n_rows;
		idx_batch.seq = b->seq;
		idx_batch.pos = b->pos;
		env.body_case = MOEFLEET__ENVELOPE__BODY_IDX_BATCH;
		env.idx_batch = &idx_batch;
		break;
	}
	case WIRE_IDX_RESULT: {
		const struct wire_idx_result *r = &m->u.idx_result;
		idx_result.step = r->step;
		idx_result.layer = r->layer;
		idx_result.n_rows = r->n_rows;
		idx_result.n_scores = r->n_scores;
		idx_result.compute_seconds = r->compute_seconds;
		env.body_case = MOEFLEET__ENVELOPE__BODY_IDX_RESULT;
		env.idx_result = &idx_result;
		break;
	}
	case WIRE_HEARTBEAT:
		hb.nonce = m->u.heartbeat_nonce;
		env.body_case = MOEFLEET__ENVELOPE__BODY_HEARTBEAT;
		env.heartbeat = &hb;
		break;
	case WIRE_STATS:
		stats.rows = m->u.stats.rows;
		stats.items = m->u.stats.items;
		stats.bytes_in = m->u.stats.bytes_in;
		stats.bytes_out = m->u.stats.bytes_out;
		stats.compute_seconds = m->u.stats.compute_seconds;
		stats.idle_seconds = m->u.stats.idle_seconds;
		stats.attn_batches = m->u.stats.attn_batches;
		stats.attn_rows = m->u.stats.attn_rows;
		stats.attn_seconds = m->u.stats.attn_seconds;
		stats.kv_pages = m->u.stats.kv_pages;
		stats.kv_bytes = m->u.stats.kv_bytes;
		env.body_case = MOEFLEET__ENVELOPE__BODY_STATS;
		env.stats = &stats;
		break;
	case WIRE_SHUTDOWN:
		shutdown.reason = (char *)m->u.text;
		shutdown.rejoin = m->shutdown_rejoin != 0;
		env.body_case = MOEFLEET__ENVELOPE__BODY_SHUTDOWN;
		env.shutdown = &shutdown;
		break;
	case WIRE_ERROR:
		error.message = (char *)m->u.text;
		env.body_case = MOEFLEET__ENVELOPE__BODY_ERROR;
		env.error = &error;
		break;
	case WIRE_RELEASE: {
		const struct wire_release *r = &m->u.release;
		size_t n_layers = 0;
		n_group = MOE_MAX_LAYERS;
		rc = wire_group_pairs(r->n_pairs, r->pair_layer, r->pair_expert, &layers,
				      &layer_ptrs, &n_layers);
		if (rc)
			goto out;
		release.placement_epoch = r->placement_epoch;
		release.n_experts = n_layers;
		release.experts = layer_ptrs;
		env.body_case = MOEFLEET__ENVELOPE__BODY_RELEASE;
		env.release = &release;
		break;
	}
	default: return ERR_RANGE;
	}
	size_t need = moefleet__envelope__get_packed_size(&env);
	if (need > WIRE_MAX_HEADER) {
		rc = ERR_RANGE;
		goto out;
	}
	if (need > *cap || !*buf) {
		uint8_t *nb = realloc(*buf, need + 64);
		if (!nb) {
			rc = ERR_NOMEM;
			goto out;
		}
		*buf = nb;
		*cap = need + 64;
	}
	*len = moefleet__envelope__pack(&env, *buf);
out:
	if (layers)
		for (int l = 0; l < n_group; l++)
			free(layers[l].experts);
	free(layers);
	free(layer_ptrs);
	free(moe_flags);
	return rc;
}

/* ------------------------------------------------------------ decode */

static int wire_bad(const char *peer, const char *what)
{
	log_error("%s: invalid message: %s", peer ? peer : "peer", what);
	return ERR_PROTO;
}

static void *wire_dup(const void *src, size_t n)
{
	void *p = malloc(n ? n : 1);
	if (p && n)
		memcpy(p, src, n);
	return p;
}

/* A page of n_pos positions: a positive multiple of WIRE_ATTN_PAGE_ALIGN up to
 * WIRE_ATTN_MAX_PAGE. */
static int wire_page_ok(uint32_t n_pos)
{
	return n_pos && n_pos % WIRE_ATTN_PAGE_ALIGN == 0 && n_pos <= WIRE_ATTN_MAX_PAGE;
}

/* Heads and a per-head size within the attention caps. */
static int wire_heads_ok(uint32_t n_head, uint32_t head_dim)
{
	return n_head && n_head <= WIRE_ATTN_MAX_HEADS && head_dim &&
	       head_dim <= WIRE_ATTN_MAX_HEAD_DIM;
}

/* A page of n entries of indexer keys: a positive multiple of
 * WIRE_IDX_PAGE_ALIGN up to WIRE_ATTN_MAX_PAGE. */
static int wire_idx_page_ok(uint32_t n)
{
	return n && n % WIRE_IDX_PAGE_ALIGN == 0 && n <= WIRE_ATTN_MAX_PAGE;
}

/* n_shard chains, a power of two up to WIRE_ATTN_MAX_SHARDS, of which the
 * range [v0, v1). */
static int wire_chains_ok(uint32_t n_shard, uint32_t v0, uint32_t v1)
{
	return n_shard && n_shard <= WIRE_ATTN_MAX_SHARDS && !(n_shard & (n_shard - 1)) &&
	       v0 < v1 && v1 <= n_shard;
}

/* proto3 writes no singular field equal to zero, so a -0.0 sent arrives as
 * +0.0: decoding gives every such field +0.0 at once, so that what decodes
 * encodes to the same message. */
static double wire_plus_zero(double x)
{
	return x == 0 ? 0.0 : x;
}

static int wire_decode_kv_page(const Moefleet__KvPage *p, const char *peer,
			       struct wire_kv_page *out)
{
	const int idx = p->kind == WIRE_KV_IDX;
	if (p->layer >= MOE_MAX_LAYERS || p->seq > INT32_MAX || (p->kind != WIRE_KV_ATTN && !idx) ||
	    !(idx ? wire_idx_page_ok(p->n_pos) : wire_page_ok(p->n_pos)) ||
	    (uint64_t)(p->page + 1ull) * p->n_pos > (uint64_t)INT32_MAX + 1 || !p->k_width ||
	    p->k_width > WIRE_ATTN_MAX_WIDTH || p->v_width > WIRE_ATTN_MAX_WIDTH ||
	    (idx && p->v_width))
		return wire_bad(peer, "kv page out of range");
	*out = (struct wire_kv_page){p->layer,	 p->seq,     p->page, p->n_pos,
				     p->k_width, p->v_width, p->kind};
	return 0;
}

static int wire_decode_attn_batch(const Moefleet__AttnBatch *b, const char *peer,
				  struct wire_attn_batch *o)
{
	if (b->layer >= MOE_MAX_LAYERS || b->n_rows > WIRE_MAX_ROWS ||
	    !wire_heads_ok(b->n_head, b->head_dim_k) || !wire_heads_ok(b->n_head, b->head_dim_v) ||
	    !b->n_head_kv || b->n_head % b->n_head_kv || !isfinite(b->scale) ||
	    !wire_page_ok(b->page) || !wire_chains_ok(b->n_shard, b->v0, b->v1) ||
	    b->n_seq != b->n_rows || b->n_pos != b->n_rows)
		return wire_bad(peer, "attention batch header out of range");
	for (size_t i = 0; i < b->n_rows; i++)
		if (b->seq[i] < 0 || b->pos[i] < 0)
			return wire_bad(peer,
					"attention batch with a negative sequence or position");
	*o = (struct wire_attn_batch){b->step,
				      b->layer,
				      b->n_rows,
				      b->n_head,
				      b->n_head_kv,
				      b->head_dim_k,
				      b->head_dim_v,
				      (float)wire_plus_zero(b->scale),
				      b->page,
				      b->n_shard,
				      b->v0,
				      b->v1,
				      wire_dup(b->seq, b->n_rows * sizeof(int32_t)),
				      wire_dup(b->pos, b->n_rows * sizeof(int32_t))};
	return o->seq && o->pos ? 0 : ERR_NOMEM;
}

static int wire_decode_attn_result(const Moefleet__AttnResult *r, const char *peer,
				   struct wire_attn_result *out)
{
	if (r->layer >= MOE_MAX_LAYERS || r->n_rows > WIRE_MAX_ROWS ||
	    !wire_heads_ok(r->n_head, r->head_dim_v) || !isfinite(r->compute_seconds) ||
	    r->compute_seconds < 0)
		return wire_bad(peer, "attention result out of range");
	*out =
	    (struct wire_attn_result){r->step,	 r->layer,	r->n_rows,
				      r->n_head, r->head_dim_v, wire_plus_zero(r->compute_seconds)};
	return 0;
}

static int wire_decode_idx_batch(const Moefleet__IdxBatch *b, const char *peer,
				 struct wire_idx_batch *o)
{
	if (b->layer >= MOE_MAX_LAYERS || b->n_rows > WIRE_MAX_ROWS ||
	    !wire_heads_ok(b->n_head, b->dim) || !wire_idx_page_ok(b->page) ||
	    !wire_chains_ok(b->n_shard, b->v0, b->v1) || b->n_seq != b->n_rows ||
	    b->n_pos != b->n_rows)
		return wire_bad(peer, "indexer batch header out of range");
	for (size_t i = 0; i < b->n_rows; i++)
		if (b->seq[i] < 0 || b->pos[i] < 0)
			return wire_bad(peer, "indexer batch with a negative sequence or position");
	*o = (struct wire_idx_batch){b->step,
				     b->layer,
				     b->n_rows,
				     b->n_head,
				     b->dim,
				     b->page,
				     b->n_shard,
				     b->v0,
				     b->v1,
				     wire_dup(b->seq, b->n_rows * sizeof(int32_t)),
				     wire_dup(b->pos, b->n_rows * sizeof(int32_t))};
	return o->seq && o->pos ? 0 : ERR_NOMEM;
}

static int wire_decode_idx_result(const Moefleet__IdxResult *r, const char *peer,
				  struct wire_idx_result *out)
{
	if (r->layer >= MOE_MAX_LAYERS || r->n_rows > WIRE_MAX_ROWS ||
	    !isfinite(r->compute_seconds) || r->compute_seconds < 0)
		return wire_bad(peer, "indexer result out of range");
	*out = (struct wire_idx_result){r->step, r->layer, r->n_rows, r->n_scores,
					wire_plus_zero(r->compute_seconds)};
	return 0;
}

static void wire_copy_str(char *dst, size_t cap, const char *src)
{
	snprintf(dst, cap, "%s", src ? src : "");
}

static int wire_decode_spec(const Moefleet__ExpertSpec *s, const char *peer, struct moe_spec *out)
{
	if (!s)
		return wire_bad(peer, "assign without expert spec");
	if (s->n_layer > MOE_MAX_LAYERS || s->n_embd == 0 || s->n_embd > (1u << 20) ||
	    s->n_ff_exp == 0 || s->n_ff_exp > (1u << 20) || s->n_expert == 0 ||
	    s->n_expert > WIRE_MAX_EXPERTS || s->n_expert_used == 0 ||
	    s->n_expert_used > s->n_expert || s->n_expert_used > WIRE_MAX_K ||
	    s->act > MOE_ACT_SWIGLU_CLAMP || s->n_act_limit != s->n_layer ||
	    s->n_layer_moe != s->n_layer)
		return wire_bad(peer, "expert spec out of range");
	memset(out, 0, sizeof(*out));
	out->n_layer = (int)s->n_layer;
	out->n_embd = (int)s->n_embd;
	out->n_ff_exp = (int)s->n_ff_exp;
	out->n_expert = (int)s->n_expert;
	out->n_expert_used = (int)s->n_expert_used;
	out->act = (enum moe_act)s->act;
	out->act_alpha = (float)wire_plus_zero(s->act_alpha);
	out->has_bias = s->has_bias != 0;
	for (uint32_t l = 0; l < s->n_layer; l++) {
		out->act_limit[l] = s->act_limit[l];
		out->layer_moe[l] = s->layer_moe[l] != 0;
	}
	return 0;
}

/* (layer, expert) pairs of a list of LayerExperts: layers < MOE_MAX_LAYERS,
 * experts < WIRE_MAX_EXPERTS, at most one entry per pair in all; one entry
 * per layer, in increasing order (as wire_group_pairs writes them). */
static int wire_decode_pairs(Moefleet__LayerExperts *const *les, size_t n, const char *peer,
			     const char *what, uint32_t *n_pairs, uint32_t **pl, uint32_t **pe)
{
	char why[96];
	uint64_t total = 0;
	for (size_t i = 0; i < n; i++) {
		if (les[i]->layer >= MOE_MAX_LAYERS) {
			snprintf(why, sizeof(why), "%s layer out of range", what);
			return wire_bad(peer, why);
		}
		if (i > 0 && les[i]->layer <= les[i - 1]->layer) {
			/* one entry per layer, in order, as every encoder writes them */
			snprintf(why, sizeof(why), "%s layers out of order", what);
			return wire_bad(peer, why);
		}
		total += les[i]->n_experts;
	}
	if (total > (uint64_t)MOE_MAX_LAYERS * WIRE_MAX_EXPERTS) {
		snprintf(why, sizeof(why), "more experts %s than can exist", what);
		return wire_bad(peer, why);
	}
	*pl = malloc((total ? total : 1) * sizeof(uint32_t));
	*pe = malloc((total ? total : 1) * sizeof(uint32_t));
	if (!*pl || !*pe)
		return ERR_NOMEM;
	for (size_t i = 0; i < n; i++) {
		const Moefleet__LayerExperts *le = les[i];
		for (size_t j = 0; j < le->n_experts; j++) {
			if (le->experts[j] >= WIRE_MAX_EXPERTS) {
				snprintf(why, sizeof(why), "%s expert id out of range", what);
				return wire_bad(peer, why);
			}
			(*pl)[*n_pairs] = le->layer;
			(*pe)[*n_pairs] = le->experts[j];
			(*n_pairs)++;
		}
	}
	return 0;
}

int wire_decode(const uint8_t *buf, size_t len, const char *peer, struct wire_msg *out)
{
	int rc = 0;
	memset(out, 0, sizeof(*out));
	if (len > WIRE_MAX_HEADER)
		return wire_bad(peer, "header larger than the cap");
	Moefleet__Envelope *env = moefleet__envelope__unpack(NULL, len, buf);
	if (!env)
		return wire_bad(peer, "undecodable envelope");
	if (env->version != WIRE_VERSION) {
		char why[96];
		snprintf(why, sizeof(why), "protocol version %u, expected %u", env->version,
			 WIRE_VERSION);
		rc = wire_bad(peer, why);
		goto out;
	}
	switch (env->body_case) {
	case MOEFLEET__ENVELOPE__BODY_HELLO: {
		const Moefleet__Hello *h = env->hello;
		out->kind = WIRE_HELLO;
		out->u.hello.cores = h->cores;
		out->u.hello.memory_bytes = h->memory_bytes;
		out->u.hello.expert_rows_per_sec = wire_plus_zero(h->expert_rows_per_sec);
		out->u.hello.has_model = h->has_model;
		wire_copy_str(out->u.hello.model_sha, sizeof(out->u.hello.model_sha), h->model_sha);
		wire_copy_str(out->u.hello.name, sizeof(out->u.hello.name), h->name);
		out->u.hello.shard_file = h->shard_file;
		out->u.hello.kv_bytes = h->kv_bytes;
		out->u.hello.kv_shared = h->kv_shared;
		if (!h->shard_file && h->n_held) {
			rc = wire_bad(peer, "hello lists held experts without a shard file");
			goto out;
		}
		rc = wire_decode_pairs(h->held, h->n_held, peer, "held", &out->u.hello.n_held,
				       &out->u.hello.held_layer, &out->u.hello.held_expert);
		if (rc)
			goto out;
		break;
	}
	case MOEFLEET__ENVELOPE__BODY_ASSIGN: {
		const Moefleet__Assign *a = env->assign;
		struct wire_assign *o = &out->u.assign;
		out->kind = WIRE_ASSIGN;
		rc = wire_decode_spec(a->spec, peer, &o->spec);
		if (rc)
			goto out;
		o->worker_id = a->worker_id;
		o->stream = a->stream;
		o->placement_epoch = a->placement_epoch;
		uint64_t total = 0;
		for (size_t i = 0; i < a->n_experts; i++) {
			const Moefleet__LayerExperts *le = a->experts[i];
			if (le->layer >= (uint32_t)o->spec.n_layer ||
			    !o->spec.layer_moe[le->layer]) {
				rc = wire_bad(peer, "assigned layer has no routed experts");
				goto out;
			}
			total += le->n_experts;
		}
		if (total > (uint64_t)o->spec.n_layer * (uint64_t)o->spec.n_expert) {
			rc = wire_bad(peer, "more experts assigned than exist");
			goto out;
		}
		o->pair_layer = malloc((total ? total : 1) * sizeof(uint32_t));
		o->pair_expert = malloc((total ? total : 1) * sizeof(uint32_t));
		if (!o->pair_layer || !o->pair_expert) {
			rc = ERR_NOMEM;
			goto out;
		}
		for (size_t i = 0; i < a->n_experts; i++) {
			const Moefleet__LayerExperts *le = a->experts[i];
			if (i > 0 && le->layer <= a->experts[i - 1]->layer) {
				/* one entry per layer, in order, as wire_encode writes them */
				rc = wire_bad(peer, "assigned layers out of order");
				goto out;
			}
			for (size_t j = 0; j < le->n_experts; j++) {
				if (le->experts[j] >= (uint32_t)o->spec.n_expert) {
					rc = wire_bad(peer, "assigned expert id out of range");
					goto out;
				}
				o->pair_layer[o->n_pairs] = le->layer;
				o->pair_expert[o->n_pairs] = le->experts[j];
				o->n_pairs++;
			}
		}
		break;
	}
	case MOEFLEET__ENVELOPE__BODY_WEIGHT_CHUNK: {
		const Moefleet__WeightChunk *c = env->weight_chunk;
		out->kind = WIRE_WEIGHT_CHUNK;
		if (c->tensor > 5 || !kern_type_dot(c->type) || c->total > (1ull << 40) ||
		    c->offset > c->total) {
			rc = wire_bad(peer, "weight chunk out of range");
			goto out;
		}
		out->u.chunk = (struct wire_weight_chunk){c->layer, c->expert, c->tensor,
							  c->type,  c->offset, c->total};
		break;
	}
	case MOEFLEET__ENVELOPE__BODY_READY:
		out->kind = WIRE_READY;
		out->u.ready.placement_epoch = env->ready->placement_epoch;
		out->u.ready.n_experts = env->ready->n_experts;
		out->u.ready.bytes = env->ready->bytes;
		out->u.ready.released = env->ready->released;
		break;
	case MOEFLEET__ENVELOPE__BODY_PROGRESS:
		if (env->progress->done_bytes > env->progress->total_bytes) {
			rc = wire_bad(peer, "progress beyond its total");
			goto out;
		}
		out->kind = WIRE_PROGRESS;
		out->u.progress =
		    (struct wire_progress){env->progress->placement_epoch,
					   env->progress->done_bytes, env->progress->total_bytes};
		break;
	case MOEFLEET__ENVELOPE__BODY_RELEASE: {
		const Moefleet__Release *r = env->release;
		struct wire_release *o = &out->u.release;
		out->kind = WIRE_RELEASE;
		o->placement_epoch = r->placement_epoch;
		rc = wire_decode_pairs(r->experts, r->n_experts, peer, "released", &o->n_pairs,
				       &o->pair_layer, &o->pair_expert);
		if (rc)
			goto out;
		break;
	}
	case MOEFLEET__ENVELOPE__BODY_BATCH: {
		const Moefleet__Batch *b = env->batch;
		struct wire_batch *o = &out->u.batch;
		out->kind = WIRE_BATCH;
		if (b->n_rows > WIRE_MAX_ROWS || b->k == 0 || b->k > WIRE_MAX_K ||
		    !wire_dtype_ok(b->dtype) || b->n_ids != (size_t)b->n_rows * b->k ||
		    b->n_weights != b->n_ids) {
			rc = wire_bad(peer, "batch header out of range");
			goto out;
		}
		o->step = b->step;
		o->layer = b->layer;
		o->n_rows = b->n_rows;
		o->k = b->k;
		o->dtype = b->dtype;
		size_t n = b->n_ids ? b->n_ids : 1;
		o->ids = malloc(n * sizeof(int32_t));
		o->weights = malloc(n * sizeof(float));
		if (!o->ids || !o->weights) {
			rc = ERR_NOMEM;
			goto out;
		}
		if (b->n_ids) { /* protobuf-c leaves empty arrays NULL */
			memcpy(o->ids, b->ids, b->n_ids * sizeof(int32_t));
			memcpy(o->weights, b->weights, b->n_ids * sizeof(float));
		}
		for (size_t i = 0; i < b->n_ids; i++) {
			if (o->ids[i] < -1 || o->ids[i] >= WIRE_MAX_EXPERTS) {
				rc = wire_bad(peer, "batch expert id out of range");
				goto out;
			}
		}
		break;
	}
	case MOEFLEET__ENVELOPE__BODY_RESULT: {
		const Moefleet__Result *r = env->result;
		out->kind = WIRE_RESULT;
		if (r->n_items > (uint64_t)WIRE_MAX_ROWS * WIRE_MAX_K) {
			rc = wire_bad(peer, "result item count out of range");
			goto out;
		}
		out->u.result = (struct wire_result){r->step, r->layer, r->n_items,
						     wire_plus_zero(r->compute_seconds)};
		break;
	}
	case MOEFLEET__ENVELOPE__BODY_KV_PAGE:
		out->kind = WIRE_KV_PAGE;
		rc = wire_decode_kv_page(env->kv_page, peer, &out->u.kv_page);
		break;
	case MOEFLEET__ENVELOPE__BODY_KV_FREE:
		out->kind = WIRE_KV_FREE;
		if (env->kv_free->seq > INT32_MAX) {
			rc = wire_bad(peer, "kv free of a sequence out of range");
			goto out;
		}
		out->u.kv_free.seq = env->kv_free->seq;
		break;
	case MOEFLEET__ENVELOPE__BODY_ATTN_BATCH:
		out->kind = WIRE_ATTN_BATCH;
		rc = wire_decode_attn_batch(env->attn_batch, peer, &out->u.attn_batch);
		break;
	case MOEFLEET__ENVELOPE__BODY_ATTN_RESULT:
		out->kind = WIRE_ATTN_RESULT;
		rc = wire_decode_attn_result(env->attn_result, peer, &out->u.attn_result);
		break;
	case MOEFLEET__ENVELOPE__BODY_IDX_BATCH:
		out->kind = WIRE_IDX_BATCH;
		rc = wire_decode_idx_batch(env->idx_batch, peer, &out->u.idx_batch);
		break;
	case MOEFLEET__ENVELOPE__BODY_IDX_RESULT:
		out->kind = WIRE_IDX_RESULT;
		rc = wire_decode_idx_result(env->idx_result, peer, &out->u.idx_result);
		break;
	case MOEFLEET__ENVELOPE__BODY_HEARTBEAT:
		out->kind = WIRE_HEARTBEAT;
		out->u.heartbeat_nonce = env->heartbeat->nonce;
		break;
	case MOEFLEET__ENVELOPE__BODY_STATS: {
		const Moefleet__Stats *s = env->stats;
		out->kind = WIRE_STATS;
		out->u.stats =
		    (struct wire_stats){.rows = s->rows,
					.items = s->items,
					.bytes_in = s->bytes_in,
					.bytes_out = s->bytes_out,
					.compute_seconds = wire_plus_zero(s->compute_seconds),
					.idle_seconds = wire_plus_zero(s->idle_seconds),
					.attn_batches = s->attn_batches,
					.attn_rows = s->attn_rows,
					.attn_seconds = wire_plus_zero(s->attn_seconds),
					.kv_pages = s->kv_pages,
					.kv_bytes = s->kv_bytes};
		break;
	}
	case MOEFLEET__ENVELOPE__BODY_SHUTDOWN:
		out->kind = WIRE_SHUTDOWN;
		wire_copy_str(out->u.text, sizeof(out->u.text), env->shutdown->reason);
		out->shutdown_rejoin = env->shutdown->rejoin;
		break;
	case MOEFLEET__ENVELOPE__BODY_ERROR:
		out->kind = WIRE_ERROR;
		wire_copy_str(out->u.text, sizeof(out->u.text), env->error->message);
		break;
	default: rc = wire_bad(peer, "envelope without a body"); goto out;
	}
out:
	moefleet__envelope__free_unpacked(env, NULL);
	if (rc)
		wire_msg_free(out);
	return rc;
}

void wire_msg_free(struct wire_msg *m)
{
	if (m->kind == WIRE_ASSIGN) {
		free(m->u.assign.pair_layer);
		free(m->u.assign.pair_expert);
	} else if (m->kind == WIRE_RELEASE) {
		free(m->u.release.pair_layer);
		free(m->u.release.pair_expert);
	} else if (m->kind == WIRE_HELLO) {
		free(m->u.hello.held_layer);
		free(m->u.hello.held_expert);
	} else if (m->kind == WIRE_BATCH) {
		free(m->u.batch.ids);
		free(m->u.batch.weights);
	} else if (m->kind == WIRE_ATTN_BATCH) {
		free(m->u.attn_batch.seq);
		free(m->u.attn_batch.pos);
	} else if (m->kind == WIRE_IDX_BATCH) {
		free(m->u.idx_batch.seq);
		free(m->u.idx_batch.pos);
	}
	memset(m, 0, sizeof(*m));
}

/* ------------------------------------------------------------ traces */

int wire_encode_trace(const struct wire_trace *t, uint8_t **buf, size_t *cap, size_t *len)
{
	if (t->n_rows > WIRE_MAX_ROWS || t->k > WIRE_MAX_K)
		return ERR_RANGE;
	Moefleet__TraceRecord r = MOEFLEET__TRACE_RECORD__INIT;
	r.version = WIRE_VERSION;
	r.step = t->step;
	r.layer = t->layer;
	r.n_rows = t->n_rows;
	r.k = t->k;
	r.n_ids = r.n_weights = (size_t)t->n_rows * t->k;
	r.ids = t->ids;
	r.weights = t->weights;
	r.n_positions = t->positions ? t->n_rows : 0;
	r.positions = t->positions;
	r.n_layer = t->n_layer;
	r.n_expert = t->n_expert;
	r.n_embd = t->n_embd;
	r.n_replica = t->n_replica;
	r.n_expert_bytes = t->expert_bytes ? t->n_layer : 0;
	r.expert_bytes = t->expert_bytes;
	r.n_holders = t->holders ? (size_t)t->n_layer * t->n_expert * t->n_replica : 0;
	r.holders = t->holders;
	r.placement_epoch = t->placement_epoch;
	size_t need = moefleet__trace_record__get_packed_size(&r);
	if (need > WIRE_MAX_HEADER)
		return ERR_RANGE;
	if (need > *cap || !*buf) {
		uint8_t *nb = realloc(*buf, need + 64);
		if (!nb)
			return ERR_NOMEM;
		*buf = nb;
		*cap = need + 64;
	}
	*len = moefleet__trace_record__pack(&r, *buf);
	return 0;
}

int wire_decode_trace(const uint8_t *buf, size_t len, struct wire_trace *out)
{
	int rc = 0;
	memset(out, 0, sizeof(*out));
	if (len > WIRE_MAX_HEADER)
		return wire_bad("trace", "record larger than the cap");
	Moefleet__TraceRecord *r = moefleet__trace_record__unpack(NULL, len, buf);
	if (!r)
		return wire_bad("trace", "undecodable record");
	size_t slots = (size_t)r->n_rows * r->k;
	uint64_t table = (uint64_t)r->n_layer * r->n_expert * r->n_replica;
	if (r->version != WIRE_VERSION || r->n_rows > WIRE_MAX_ROWS || r->k > WIRE_MAX_K ||
	    r->n_ids != slots || r->n_weights != slots ||
	    (r->n_positions && r->n_positions != r->n_rows) || r->n_layer > MOE_MAX_LAYERS ||
	    r->n_expert > WIRE_MAX_EXPERTS || r->n_replica > WIRE_MAX_K ||
	    (r->n_layer && r->n_expert_bytes != r->n_layer) ||
	    (r->n_holders && r->n_holders != table)) {
		rc = wire_bad("trace", "record fields out of range");
		goto out;
	}
	for (size_t i = 0; i < slots; i++)
		if (r->ids[i] < -1 || r->ids[i] >= WIRE_MAX_EXPERTS) {
			rc = wire_bad("trace", "expert id out of range");
			goto out;
		}
	out->step = r->step;
	out->layer = r->layer;
	out->n_rows = r->n_rows;
	out->k = r->k;
	out->n_layer = r->n_layer;
	out->n_expert = r->n_expert;
	out->n_embd = r->n_embd;
	out->n_replica = r->n_holders ? r->n_replica : 0;
	out->placement_epoch = r->placement_epoch;
	out->ids = wire_dup(r->ids, slots * sizeof(int32_t));
	out->weights = wire_dup(r->weights, slots * sizeof(float));
	if (!out->ids || !out->weights)
		rc = ERR_NOMEM;
	if (!rc && r->n_positions &&
	    !(out->positions = wire_dup(r->positions, r->n_positions * sizeof(int32_t))))
		rc = ERR_NOMEM;
	if (!rc && r->n_layer &&
	    !(out->expert_bytes = wire_dup(r->expert_bytes, r->n_layer * sizeof(uint64_t))))
		rc = ERR_NOMEM;
	if (!rc && r->n_holders &&
	    !(out->holders = wire_dup(r->holders, r->n_holders * sizeof(int32_t))))
		rc = ERR_NOMEM;
out:
	moefleet__trace_record__free_unpacked(r, NULL);
	if (rc)
		wire_trace_free(out);
	return rc;
}

void wire_trace_free(struct wire_trace *t)
{
	free(t->ids);
	free(t->weights);
	free(t->positions);
	free(t->expert_bytes);
	free(t->holders);
	memset(t, 0, sizeof(*t));
}
