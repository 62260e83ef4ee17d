/* moe: what a routed-expert computation needs to know about a model.
 *
 * The coordinator fills a moe_spec from the GGUF's architecture; the expert
 * code (common/shard.c, used in-process and by worker processes) computes
 *   out = w * down( act( gate(x) [+ b_gate], up(x) [+ b_up] ) ) [+ b_down]
 * for each (row, chosen expert, weight), using the tensors
 *   blk.L.ffn_{gate,up,down}_exps.weight  (ne: n_embd x n_ff_exp x n_expert,
 *                                          down: n_ff_exp x n_embd x n_expert)
 *   blk.L.ffn_{gate,up,down}_exps.bias    (gpt-oss only)
 * of every layer L with layer_moe[L] set. */
#ifndef MOEFLEET_MOE_H
#define MOEFLEET_MOE_H

#include <stdint.h>

enum moe_act {
	MOE_ACT_SWIGLU = 0,	  /* silu(g) * u */
	MOE_ACT_SWIGLU_OAI = 1,	  /* gpt-oss: g' = min(g, limit); g' * sigmoid(alpha g') * (clamp(u,
				     -limit, limit) + 1) */
	MOE_ACT_SWIGLU_CLAMP = 2, /* silu(min(g, limit)) * clamp(u, -limit, limit) (DeepSeek-V4) */
};

#define MOE_MAX_LAYERS 512

struct moe_spec {
	int n_layer;
	int n_embd;
	int n_ff_exp;
	int n_expert;
	int n_expert_used;
	enum moe_act act;
	float act_alpha;		   /* MOE_ACT_SWIGLU_OAI: 1.702 */
	float act_limit[MOE_MAX_LAYERS];   /* per layer; used by the clamped activations */
	uint8_t layer_moe[MOE_MAX_LAYERS]; /* 1 if layer L has routed experts */
	int has_bias;			   /* gpt-oss style expert biases */
};

#endif
