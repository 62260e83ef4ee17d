#include "model.h"
#include "ops.h"
#include "arch.h"
#include "../../common/err.h"
#include "../../common/log.h"
#include "../../common/shardfile.h"
#include "../../kernels/kern.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct arch_vtable *const model_archs[] = {
    &arch_deepseek2,
    &arch_qwen3moe,
    &arch_gptoss,
    &arch_deepseek4,
};

struct model {
	gguf *g;
	pool *pool;
	struct arch_env env;
	const struct arch_vtable *arch;
	void *state;
	struct model_info info;
	expert_backend *experts;
	int32_t *seq_len;    /* [n_seq] next position expected per sequence */
	uint8_t *all_logits; /* [n_batch] of 1, used when the caller passes NULL */
	struct route_opts route;
	struct route_counts route_counts;
	void (*observer)(void *ctx, const model_batch *ub); /* model_set_batch_observer */
	void *observer_ctx;
};

void model_params_default(struct model_params *p)
{
	p->n_threads = 0;
	p->n_ctx = 4096;
	p->n_seq = 1;
	p->n_batch = 512;
	p->kv_f32 = 0;
	p->kv_shards = 0;
	p->kv_page = 1024;
	route_opts_default(&p->route);
}

int model_open(const char *path, const struct model_params *params, model **out)
{
	int rc = 0;
	*out = NULL;
	kern_init();
	if (params->n_ctx < 1 || params->n_seq < 1 || params->n_batch < 1 ||
	    params->n_ctx > (1 << 24) || params->n_seq > 4096 || params->n_batch > 65536) {
		log_error("invalid model parameters: ctx %d, sequences %d, batch %d", params->n_ctx,
			  params->n_seq, params->n_batch);
		return ERR_CONFIG;
	}
	model *m = calloc(1, sizeof(*m));
	if (!m)
		return ERR_NOMEM;
	rc = gguf_open(path, &m->g);
	if (rc)
		goto out;
	if (gguf_find_kv(m->g, SHARDFILE_KEY_HELD) >= 0) {
		log_error("%s: is a per-node shard file (moefleet split-experts) for "
			  "moefleet-worker -m; the coordinator needs the full model",
			  path);
		rc = ERR_FORMAT;
		goto out;
	}
	char arch[64];
	rc = gguf_get_cstr(m->g, "general.architecture", arch, sizeof(arch));
	if (rc) {
		if (rc == ERR_RANGE)
			log_error("%s: missing key general.architecture", path);
		rc = ERR_FORMAT;
		goto out;
	}
	for (size_t i = 0; i < sizeof(model_archs) / sizeof(model_archs[0]); i++)
		if (strcmp(model_archs[i]->name, arch) == 0)
			m->arch = model_archs[i];
	if (!m->arch) {
		log_error("%s: unknown architecture '%s' (supported: deepseek2, qwen3moe, gpt-oss, "
			  "deepseek4)",
			  path, arch);
		rc = ERR_FORMAT;
		goto out;
	}
	rc = pool_new(params->n_threads, &m->pool);
	if (rc)
		goto out;
	m->env.g = m->g;
	m->env.pool = m->pool;
	m->env.n_ctx = params->n_ctx;
	m->env.n_seq = params->n_seq;
	m->env.n_batch = params->n_batch;
	m->route = params->route;
	m->env.route = &m->route;
	m->env.route_counts = &m->route_counts;
	m->env.kv_f32 = params->kv_f32;
	m->env.kv_shards = params->kv_shards;
	m->env.kv_page = params->kv_page;
	snprintf(m->info.arch, sizeof(m->info.arch), "%s", arch);
	m->info.bos_id = -1;
	m->info.eos_id = -1;
	uint32_t id;
	if (gguf_get_u32(m->g, "tokenizer.ggml.bos_token_id", &id) == 0)
		m->info.bos_id = (int32_t)id;
	if (gguf_get_u32(m->g, "tokenizer.ggml.eos_token_id", &id) == 0)
		m->info.eos_id = (int32_t)id;
	rc = m->arch->load(&m->env, &m->info, &m->state);
	if (rc)
		goto out;
	if (m->info.n_vocab < 1 || m->info.n_embd < 1) {
		log_error("%s: architecture loader reported no vocabulary", path);
		rc = ERR_FORMAT;
		goto out;
	}
	rc = experts_new_local(m->g, &m->info.moe, m->pool, &m->experts);
	if (rc)
		goto out;
	m->env.experts = m->experts;
	m->seq_len = calloc((size_t)params->n_seq, sizeof(int32_t));
	m->all_logits = malloc((size_t)params->n_batch);
	if (!m->seq_len || !m->all_logits) {
		rc = ERR_NOMEM;
		goto out;
	}
	memset(m->all_logits, 1, (size_t)params->n_batch);
out:
	if (rc)
		model_destroy(&m);
	*out = m;
	return rc;
}

void model_destroy(model **pm)
{
	model *m = *pm;
	if (!m)
		return;
	if (m->arch && m->state)
		m->arch->destroy(&m->state);
	expert_backend_destroy(&m->experts);
	pool_destroy(&m->pool);
	gguf_destroy(&m->g);
	free(m->seq_len);
	free(m->all_logits);
	free(m);
	*pm = NULL;
}

const struct model_info *model_get_info(const model *m)
{
	return &m->info;
}
const gguf *model_get_gguf(const model *m)
{
	return m->g;
}
pool *model_get_pool(model *m)
{
	return m->pool;
}

void model_set_experts(model *m, expert_backend *b)
{
	expert_backend_destroy(&m->experts);
	m->experts = b;
	m->env.experts = b;
}

int model_set_kv_hosts(model *m, const struct attn_remote_ops *ops, void *self, int n_hosts)
{
	if (m->arch->kv_hosts)
		return m->arch->kv_hosts(m->state, ops, self, n_hosts);
	attn_cache *c = m->arch->kv_cache ? m->arch->kv_cache(m->state) : NULL;
	if (!c) {
		log_warn("%s: %s keeps its KV on the coordinator: no KV hosts", gguf_path(m->g),
			 m->info.arch);
		return 0;
	}
	return attn_cache_set_remote(c, ops, self, n_hosts);
}

void model_kv_room(model *m, struct attn_kv_room *r)
{
	attn_cache *c = m->arch->kv_cache ? m->arch->kv_cache(m->state) : NULL;
	if (c)
		attn_cache_kv_room(c, r);
	else
		memset(r, 0, sizeof(*r));
}

void model_set_batch_observer(model *m, void (*fn)(void *ctx, const model_batch *ub), void *ctx)
{
	m->observer = fn;
	m->observer_ctx = ctx;
}

expert_backend *model_take_experts(model *m)
{
	expert_backend *b = m->experts;
	m->experts = NULL;
	m->env.experts = NULL;
	return b;
}

void model_reset_seq(model *m, int seq)
{
	if (seq < 0 || seq >= m->env.n_seq)
		return;
	m->seq_len[seq] = 0;
	m->arch->reset_seq(m->state, seq);
}

int model_fill_random(model *m, int seq, int n_pos, uint64_t seed)
{
	attn_cache *c = m->arch->kv_cache ? m->arch->kv_cache(m->state) : NULL;
	if (!c) {
		log_error("%s: %s keeps per-position state besides one KV cache: no "
			  "pseudo-random fill (bench --random-kv)",
			  gguf_path(m->g), m->info.arch);
		return ERR_CONFIG;
	}
	if (seq < 0 || seq >= m->env.n_seq || n_pos < 0 || n_pos > m->env.n_ctx) {
		log_error("cannot fill %d positions of sequence %d (%d slots of %d positions)",
			  n_pos, seq, m->env.n_seq, m->env.n_ctx);
		return ERR_RANGE;
	}
	model_reset_seq(m, seq);
	int rc = attn_cache_fill_random(c, seq, n_pos, seed);
	if (!rc)
		m->seq_len[seq] = n_pos;
	return rc;
}

static int model_check_batch(const model *m, const model_batch *b)
{
	if (b->n_tokens < 0)
		return ERR_RANGE;
	for (int i = 0; i < b->n_tokens; i++) {
		if (b->token[i] < 0 || b->token[i] >= m->info.n_vocab) {
			log_error("token id %d at batch index %d is out of range (vocabulary %d)",
				  b->token[i], i, m->info.n_vocab);
			return ERR_RANGE;
		}
		if (b->seq[i] < 0 || b->seq[i] >= m->env.n_seq) {
			log_error("sequence %d at batch index %d is out of range (%d slots)",
				  b->seq[i], i, m->env.n_seq);
			return ERR_RANGE;
		}
		if (b->pos[i] < 0 || b->pos[i] >= m->env.n_ctx) {
			log_error("position %d at batch index %d exceeds the context size %d",
				  b->pos[i], i, m->env.n_ctx);
			return ERR_RANGE;
		}
	}
	return 0;
}

int model_forward(model *m, const model_batch *b, float *logits)
{
	int rc = model_check_batch(m, b);
	if (rc)
		return rc;
	/* positions of each sequence must continue where it left off */
	for (int i = 0; i < b->n_tokens; i++) {
		int s = b->seq[i];
		if (b->pos[i] != m->seq_len[s]) {
			log_error("sequence %d: position %d given, %d expected", s, b->pos[i],
				  m->seq_len[s]);
			for (int j = 0; j < i; j++) /* undo */
				m->seq_len[b->seq[j]] = b->pos[j];
			return ERR_RANGE;
		}
		m->seq_len[s]++;
	}
	float *lo = logits;
	for (int start = 0; start < b->n_tokens; start += m->env.n_batch) {
		int n = b->n_tokens - start;
		if (n > m->env.n_batch)
			n = m->env.n_batch;
		model_batch ub = {
		    .n_tokens = n,
		    .token = b->token + start,
		    .pos = b->pos + start,
		    .seq = b->seq + start,
		    .logits = b->logits ? b->logits + start : m->all_logits,
		};
		if (m->observer)
			m->observer(m->observer_ctx, &ub);
		ops_batch_rows(ub.seq, n);
		rc = m->arch->forward(m->state, &ub, lo);
		ops_batch_rows(NULL, 0);
		if (rc)
			return rc;
		for (int i = 0; i < n; i++)
			if (ub.logits[i])
				lo += m->info.n_vocab;
	}
	return 0;
}

const struct route_counts *model_get_route_counts(const model *m)
{
	return &m->route_counts;
}

/* ---------------------------------------------------- helpers for arch files */

static int arch_key(char *buf, size_t cap, const char *arch, const char *key)
{
	int n = snprintf(buf, cap, "%s.%s", arch, key);
	return n < 0 || (size_t)n >= cap ? ERR_CONFIG : 0;
}

#define ARCH_GET(fn_req, fn_opt, ctype, getter)                                                    \
	int fn_opt(const struct arch_env *env, const char *arch, const char *key, ctype *out)      \
	{                                                                                          \
		char k[256];                                                                       \
		if (arch_key(k, sizeof(k), arch, key))                                             \
			return ERR_CONFIG;                                                         \
		int rc = getter(env->g, k, out);                                                   \
		return rc == ERR_RANGE ? 0 : rc;                                                   \
	}                                                                                          \
	int fn_req(const struct arch_env *env, const char *arch, const char *key, ctype *out)      \
	{                                                                                          \
		char k[256];                                                                       \
		if (arch_key(k, sizeof(k), arch, key))                                             \
			return ERR_CONFIG;                                                         \
		int rc = getter(env->g, k, out);                                                   \
		if (rc == ERR_RANGE) {                                                             \
			log_error("%s: missing key %s", gguf_path(env->g), k);                     \
			return ERR_FORMAT;                                                         \
		}                                                                                  \
		return rc;                                                                         \
	}
ARCH_GET(arch_u32_req, arch_u32_opt, uint32_t, gguf_get_u32)
ARCH_GET(arch_f32_req, arch_f32_opt, float, gguf_get_f32)

/* Which layers use the sliding window: "attention.sliding_window_pattern" as a u32
 * period p (layer il is SWA iff il % p < p - 1; p = 0: all), or as an array with one
 * bool/u32/i32 per layer; absent = period 2 (the even layers). */
int arch_swa_layers(const struct arch_env *env, const char *arch, int n_layer, uint8_t *is_swa)
{
	char key[256];
	if (arch_key(key, sizeof(key), arch, "attention.sliding_window_pattern"))
		return ERR_CONFIG;
	const char *path = gguf_path(env->g);
	int64_t kid = gguf_find_kv(env->g, key);
	uint32_t period = 2;
	if (kid >= 0 && gguf_kv_type(env->g, (uint64_t)kid) == GGUF_TYPE_ARRAY) {
		enum gguf_type et;
		uint64_t count;
		const void *data;
		int rc = gguf_get_arr(env->g, key, &et, &count, &data);
		if (rc)
			return rc;
		if (count != (uint64_t)n_layer) {
			log_error("%s: key %s has %llu entries, expected one per layer (%d)", path,
				  key, (unsigned long long)count, n_layer);
			return ERR_FORMAT;
		}
		for (int il = 0; il < n_layer; il++) {
			if (et == GGUF_TYPE_BOOL || et == GGUF_TYPE_U8 || et == GGUF_TYPE_I8) {
				uint8_t b;
				memcpy(&b, (const uint8_t *)data + il, 1);
				is_swa[il] = b != 0;
			} else if (et == GGUF_TYPE_U32 || et == GGUF_TYPE_I32) {
				uint32_t w;
				memcpy(&w, (const uint8_t *)data + 4 * (size_t)il, 4);
				is_swa[il] = w != 0;
			} else {
				log_error("%s: key %s: unsupported array element type %d", path,
					  key, (int)et);
				return ERR_FORMAT;
			}
		}
		return 0;
	}
	int rc = arch_u32_opt(env, arch, "attention.sliding_window_pattern", &period);
	if (rc)
		return rc;
	for (int il = 0; il < n_layer; il++)
		is_swa[il] = period == 0 || (uint32_t)il % period < period - 1;
	return 0;
}

int arch_bool_opt(const struct arch_env *env, const char *arch, const char *key, int *out)
{
	char k[256];
	if (arch_key(k, sizeof(k), arch, key))
		return ERR_CONFIG;
	int rc = gguf_get_bool(env->g, k, out);
	return rc == ERR_RANGE ? 0 : rc;
}

int arch_str_opt(const struct arch_env *env, const char *arch, const char *key, char *buf,
		 size_t cap)
{
	char k[256];
	if (arch_key(k, sizeof(k), arch, key))
		return ERR_CONFIG;
	int rc = gguf_get_cstr(env->g, k, buf, cap);
	return rc == ERR_RANGE ? 0 : rc;
}

int arch_rms_eps(const struct arch_env *env, const char *arch, float *out)
{
	int rc = arch_f32_req(env, arch, "attention.layer_norm_rms_epsilon", out);
	if (rc)
		return rc;
	if (!(*out > 0.0f) || !isfinite(*out)) {
		log_error("%s: key %s.attention.layer_norm_rms_epsilon must be positive",
			  gguf_path(env->g), arch);
		return ERR_FORMAT;
	}
	return 0;
}

int arch_vocab(const struct arch_env *env, int *n_vocab)
{
	const char *path = gguf_path(env->g);
	const gguf_tensor *emb = gguf_find_tensor(env->g, "token_embd.weight");
	if (!emb || emb->n_dims != 2) {
		log_error("%s: tensor token_embd.weight: %s", path,
			  emb ? "expected 2 dimensions" : "missing");
		return ERR_FORMAT;
	}
	if (emb->ne[1] < 1 || emb->ne[1] > INT32_MAX ||
	    (*n_vocab != 0 && emb->ne[1] != (uint64_t)*n_vocab)) {
		log_error("%s: tensor token_embd.weight: %llu rows, vocab_size says %d", path,
			  (unsigned long long)emb->ne[1], *n_vocab);
		return ERR_FORMAT;
	}
	*n_vocab = (int)emb->ne[1];
	return 0;
}

static int arch_tensor_v(const struct arch_env *env, const gguf_tensor **out, int64_t ne0,
			 int64_t ne1, int64_t ne2, int optional, int ids, const char *fmt,
			 va_list ap)
{
	char name[256];
	int n = vsnprintf(name, sizeof(name), fmt, ap);
	*out = NULL;
	if (n < 0 || (size_t)n >= sizeof(name))
		return ERR_CONFIG;
	if (optional && !gguf_find_tensor(env->g, name))
		return 0;
	uint64_t ne[3] = {(uint64_t)ne0, (uint64_t)ne1, (uint64_t)ne2};
	uint32_t nd = ne2 > 0 ? 3 : ne1 > 0 ? 2 : 1;
	if (ne0 <= 0 || (ne2 > 0 && ne1 <= 0)) {
		log_error("%s: tensor %s: invalid expected shape", gguf_path(env->g), name);
		return ERR_FORMAT;
	}
	int rc = gguf_expect_tensor(env->g, name, nd, ne, out);
	if (rc == 0 && (ids ? (*out)->type != KERN_I32 : !kern_type_dot((*out)->type))) {
		log_error("%s: tensor %s: type %s is not usable here (need %s)", gguf_path(env->g),
			  name, kern_type_name((*out)->type),
			  ids ? "I32" : "a matrix or vector type");
		*out = NULL;
		return ERR_FORMAT;
	}
	return rc;
}

int arch_tensor(const struct arch_env *env, const gguf_tensor **out, int64_t ne0, int64_t ne1,
		int64_t ne2, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int rc = arch_tensor_v(env, out, ne0, ne1, ne2, 0, 0, fmt, ap);
	va_end(ap);
	return rc;
}

int arch_tensor_opt(const struct arch_env *env, const gguf_tensor **out, int64_t ne0, int64_t ne1,
		    int64_t ne2, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int rc = arch_tensor_v(env, out, ne0, ne1, ne2, 1, 0, fmt, ap);
	va_end(ap);
	return rc;
}

int arch_tensor_ids(const struct arch_env *env, const gguf_tensor **out, int64_t ne0, int64_t ne1,
		    const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int rc = arch_tensor_v(env, out, ne0, ne1, 0, 0, 1, fmt, ap);
	va_end(ap);
	return rc;
}
