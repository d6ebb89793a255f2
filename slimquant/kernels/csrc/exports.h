// The library's C interface, written once. Every exported function and struct is listed here by X-macro:
// - each .cpp includes this header, so the compiler checks every definition against its declaration;
// - sq_signatures() and sq_struct_layouts() (exports.cpp) return the same lists as text, from which
//   kernels/native.py builds its ctypes prototypes (parameter names included) and structs (checked against
//   sizeof / offsetof) when it loads the library. Python holds no copy of a signature or a field order.
#pragma once

#include <cstdint>

// ---- structs: X(type, name) per field; a field's type is a scalar, a pointer or another struct below ----

// A linear's runtime form: kind 1 = int8 dynamic, 2 = int8 static, 3 = bf16 float.
#define SQ_LINEAR_FIELDS(X)                                                                              \
  X(int32_t, kind)                                                                                      \
  X(int32_t, n)                                                                                         \
  X(int32_t, k)                                                                                         \
  X(int32_t, kp) /* padded K of int8 weights */                                                         \
  X(const void*, w) /* int8 [N, Kp] (dynamic, static) or bf16 [N, K] (float) */                        \
  X(const float*, w_scale) /* dynamic: [N] */                                                           \
  X(const float*, bias) /* dynamic, float: [N] or null */                                               \
  X(const int32_t*, quant_bias) /* static: [N] */                                                       \
  X(const float*, deq_scale) /* static: [N] */                                                          \
  X(float, inv_scale) /* static: the per-tensor activation quantization */                              \
  X(float, offset)                                                                                      \
  X(int32_t, split_k) /* int8, row-parallel: this rank's part of K, reduced across ranks (SqRanks) */

// An int8 KV cache's per-channel parameters, fp32 [KVH * D] each (model-dtype values): a row is stored as
// clamp(round(x * inv + offset)) and read back as (q - offset) * scale. All null for a float cache.
#define SQ_KV_QUANT_FIELDS(X)                                                                            \
  X(const float*, k_scale)                                                                              \
  X(const float*, k_inv)                                                                                \
  X(const float*, k_offset)                                                                             \
  X(const float*, v_scale)                                                                              \
  X(const float*, v_inv)                                                                                \
  X(const float*, v_offset)

// A MoE layer's router (softmax and a greedy top-k: Qwen3-MoE; limited to the best topk_group of n_group groups:
// DeepSeek-V2; or, where bias is set, DeepSeek-V3's biased sigmoid one: GLM-4.5), its routed W8A8_DYNAMIC experts
// and its shared experts (shared_inter > 0: GLM-4.5, Qwen2-MoE whose output a gate scales; the layer's gate_up /
// down), added after the routed ones; num_experts 0: the layer's MLP is dense (gate_up, down). Under tensor parallel
// (SqRanks) the experts held here are first .. first + num_local - 1 and the ranks exchange their weighted products
// (swap: expert parallel), or every expert with this rank's `inter` of its intermediate rows, reduced across the
// ranks (split).
#define SQ_MOE_FIELDS(X)                                                                                 \
  X(int32_t, num_experts) /* the router's */                                                            \
  X(int32_t, first)                                                                                     \
  X(int32_t, num_local) /* the experts w13 / w2 / s13 / s2 hold */                                      \
  X(int32_t, split)                                                                                     \
  X(int32_t, swap)                                                                                      \
  X(int32_t, top_k)                                                                                     \
  X(int32_t, renormalize) /* 1: the top-k weights divided by their sum (norm_topk_prob) */              \
  X(float, scaling) /* the weights' factor (routed_scaling_factor; 1 where none) */                     \
  X(const float*, router) /* fp32 [E, H] */                                                             \
  X(const int8_t*, w13) /* packed [E, 2I, kp13], gate rows first */                                     \
  X(int32_t, kp13)                                                                                      \
  X(const int8_t*, w2) /* packed [E, H, kp2] */                                                         \
  X(int32_t, kp2)                                                                                       \
  X(const void*, s13) /* [E, 2I], fp32 or bf16 (scales_bf16) */                                        \
  X(const void*, s2) /* [E, H] */                                                                       \
  X(int32_t, scales_bf16)                                                                               \
  X(const float*, bias) /* e_score_correction_bias fp32 [E] (route_row_biased), or null (route_row) */   \
  X(int32_t, n_group)                                                                                   \
  X(int32_t, topk_group)                                                                                \
  X(int32_t, shared_inter) /* the shared experts' (the layer's gate_up / down) rows held here; 0: none */   \
  X(const float*, shared_gate) /* fp32 [H]: the shared experts' output times shared_gate(row) (Qwen2-MoE); or null */

// A layer's MLA attention (DeepSeek V2 / V3, Kimi-K2) in place of standard attention where rank > 0, decode only
// (absorbed: q_nope @ W_UK, attention over the latent cache [slots, rank + rope], then @ W_UV^T). The layer's qkv is
// q_a_proj | kv_a_proj_with_mqa fused (q_lora_rank > 0: q_a normed, then q_b) or q_proj (then kv_a here).
#define SQ_MLA_FIELDS(X)                                                                                 \
  X(int32_t, rank) /* kv_lora_rank: the latent's width */                                                \
  X(int32_t, nope)                                                                                      \
  X(int32_t, rope) /* qk_rope_head_dim: the rope tables' width */                                       \
  X(int32_t, v_dim)                                                                                     \
  X(int32_t, q_lora_rank) /* 0: q_proj */                                                               \
  X(int32_t, interleave) /* 1: rope on interleaved pairs (rope_mla) */                                  \
  X(SqLinear, kv_a) /* kv_a_proj_with_mqa where q_lora_rank is 0 */                                     \
  X(SqLinear, q_b)                                                                                      \
  X(const float*, q_a_norm_w)                                                                           \
  X(const float*, q_a_norm_b)                                                                           \
  X(const float*, kv_a_norm_w)                                                                          \
  X(const float*, kv_a_norm_b)                                                                          \
  X(const void*, kv_b) /* kv_b_proj's weight [NH, nope + V, rank], fp32 or bf16 (kv_b_bf16) */           \
  X(int32_t, kv_b_bf16)

// A pre-norm decoder layer's weights and shapes; norm biases and the per-head norms (Qwen3) may be null.
#define SQ_DECODER_LAYER_FIELDS(X)                                                                       \
  X(int32_t, hidden)                                                                                    \
  X(int32_t, num_heads)                                                                                 \
  X(int32_t, num_kv_heads)                                                                              \
  X(int32_t, head_dim)                                                                                  \
  X(int32_t, inter) /* the dense MLP's intermediate size, or each routed expert's */                  \
  X(float, eps)                                                                                         \
  X(float, attn_scale)                                                                                  \
  X(const float*, in_norm_w)                                                                            \
  X(const float*, in_norm_b)                                                                            \
  X(const float*, post_norm_w)                                                                          \
  X(const float*, post_norm_b)                                                                          \
  X(const float*, q_norm_w)                                                                             \
  X(const float*, q_norm_b)                                                                             \
  X(const float*, k_norm_w)                                                                             \
  X(const float*, k_norm_b)                                                                             \
  X(SqLinear, qkv)                                                                                      \
  X(SqLinear, o)                                                                                        \
  X(SqLinear, gate_up) /* the dense MLP's, or a MoE layer's shared experts' (moe.shared_inter > 0) */   \
  X(SqLinear, down)                                                                                     \
  X(SqKvQuant, kv_quant) /* read when the step's caches are int8 */                                     \
  X(SqMoe, moe) /* routed experts in place of gate_up / down where moe.num_experts > 0 */            \
  X(SqMla, mla) /* MLA attention in place of qkv's heads where mla.rank > 0 (o is o_proj) */

// One step's rows over the paged KV cache (the engine's ForwardContext): row b stores its new k / v at
// slots[b] (-1: nowhere) and attends to the first context_lens[b] positions of its block table.
#define SQ_STEP_FIELDS(X)                                                                                \
  X(int32_t, batch)                                                                                     \
  X(int32_t, kv_type) /* caches hold fp32 (0), bf16 (1, rounded to nearest even) or int8 (2, SqKvQuant) */ \
  X(int32_t, block_size)                                                                                \
  X(int32_t, max_blocks) /* block_tables' row width */                                                  \
  X(const int64_t*, slots) /* [B] */                                                                    \
  X(const int32_t*, block_tables) /* [B, max_blocks] */                                                 \
  X(const int32_t*, context_lens) /* [B] */

// What a whole-model step adds around the layers: embedding rows, rope rows, the final norm.
#define SQ_MODEL_ENDS_FIELDS(X)                                                                          \
  X(const void*, embed) /* [V, H], bf16 when embed_bf16 != 0, else fp32 */                              \
  X(int32_t, embed_bf16)                                                                                \
  X(int32_t, rope_dim) /* columns of the rope tables */                                                 \
  X(const float*, cos_table) /* [P, rope_dim], or null: no rope */                                      \
  X(const float*, sin_table)                                                                            \
  X(const float*, norm_w) /* [H] */                                                                     \
  X(const float*, norm_b) /* [H] or null */                                                             \
  X(float, eps)                                                                                         \
  X(int64_t, vocab_start) /* the id of embed's first row */                                              \
  X(int32_t, vocab_rows) /* embed's rows: ids outside them give zero rows */                            \
  X(int32_t, vocab_split) /* 1: the ranks hold parts of the table, their rows are summed (SqRanks) */

// The tensor-parallel ranks a whole step reduces across. reduce, an int (*)(int op, void* data, int64_t count),
// replaces data in place by every rank's: op 0 int32 sum, 1 fp32 maximum, 2 fp32 sum of values non-zero on one
// rank at most; it returns 0, or non-zero when the ranks failed (the step then reduces nothing more).
#define SQ_RANKS_FIELDS(X)                                                                               \
  X(int32_t, size)                                                                                      \
  X(void*, reduce)

#define SQ_STRUCTS(X)                                                                                    \
  X(SqLinear, SQ_LINEAR_FIELDS)                                                                         \
  X(SqKvQuant, SQ_KV_QUANT_FIELDS)                                                                      \
  X(SqMoe, SQ_MOE_FIELDS)                                                                               \
  X(SqMla, SQ_MLA_FIELDS)                                                                               \
  X(SqDecoderLayer, SQ_DECODER_LAYER_FIELDS)                                                            \
  X(SqStep, SQ_STEP_FIELDS)                                                                             \
  X(SqModelEnds, SQ_MODEL_ENDS_FIELDS)                                                                  \
  X(SqRanks, SQ_RANKS_FIELDS)

// ---- functions: X(return type, name, (parameters)) ----

#define SQ_FUNCTIONS(X)                                                                                  \
  /* The instruction set of this build: 2 = AMX (on AVX-512 VNNI), 1 = AVX-512 VNNI, 0 = AVX2. */       \
  X(int, sq_isa, ())                                                                                    \
  /* Whether the AMX build's tiles run in this process (the OS granted their state); 0 elsewhere. */    \
  X(int, sq_amx_ready, ())                                                                              \
  /* out int32 [M, N] = x_q int8 [M, K] (row stride ldx) @ w int8 [N, Kp]^T. */                         \
  X(void, sq_int8_gemm, (const int8_t* xq, int m, int k, int ldx, const int8_t* w, int n, int kp,         \
                         int32_t* out))                                                                 \
  /* W8A8_DYNAMIC: y [M, N] = (acc * s_t) * w_scale (+ bias), x quantized per token. */                \
  X(void, sq_dynamic_linear, (const float* x, int m, int k, int ldx, const int8_t* w, int n, int kp,    \
                              const float* w_scale, const float* bias, float* y))                       \
  /* W8A8: y [M, N] = float(acc + quant_bias) * deq_scale, x quantized with one scale and offset. */   \
  X(void, sq_static_linear, (const float* x, int m, int k, int ldx, float inv_scale, float offset,      \
                             const int8_t* w, int n, int kp, const int32_t* quant_bias, const float* deq, \
                             float* y))                                                                 \
  /* Per-token quantization alone: x_q int8 [M, K] and scales fp32 [M]. */                              \
  X(void, sq_quantize_per_token, (const float* x, int m, int k, int ldx, int8_t* xq, float* scales))    \
  /* y fp32 [M, N] = x fp32 [M, K] (row stride ldx) @ w bf16 [N, K]^T (+ bias [N]); K % 8 == 0. */    \
  X(void, sq_bf16_linear, (const float* x, int m, int k, int ldx, const uint16_t* w, int n,             \
                           const float* bias, float* y))                                                \
  /* One token per row of step: rotate q / k (neox; cos / sin [B, rope_dim <= D] or null), store k / v, */ \
  /* attend; an int8 cache (step->kv_type 2) with kv_quant's parameters. */                              \
  X(void, sq_decode_attention, (const float* q, int ldq, const float* k, int ldk, const float* v,         \
                                int ldv, const float* cos, const float* sin, int rope_dim,              \
                                void* k_cache, void* v_cache,                                           \
                                const SqStep* step, int num_heads, int num_kv_heads, int head_dim,      \
                                float scale, const SqKvQuant* kv_quant, float* out))                    \
  /* Absorbed MLA decode, one query token per row of step: out [B, NH, R] = softmax(q . c * scale) @ */  \
  /* c[:R] over the row's cached context c [S, D] (cache [slots, D], fp32 or bf16; nothing stored). */   \
  X(void, sq_mla_decode_attention, (const float* q, int ldq, const void* cache, const SqStep* step,      \
                                    int num_heads, int head_dim, int rank, float scale, float* out))    \
  /* y [B, NH, N] = x [B, NH, K] (strides ldx_b / ldx_h) times each head's w_h: [K, N] (x @ w_h), or */ \
  /* [N, K] where transposed (x @ w_h^T); rows ldw apart, heads ldw_head; fp32 or bf16 (w_type 0 / 1); */ \
  /* w_h's rows a multiple of 8 wide. Each head's numbers are those of the head alone (MLA's kv_b_proj). */ \
  X(void, sq_head_matmul, (const float* x, int b, int heads, int k, int ldx_b, int ldx_h, const void* w, \
                           int w_type, int n, int64_t ldw, int64_t ldw_head, int transposed, float* y))  \
  /* y [T, heads, D] = x rotated by its token's cos / sin [T, D] (neox); rows at strides ldx / ldy. */   \
  X(void, sq_rope_heads, (const float* x, int t, int heads, int d, int ldx, const float* cos,            \
                          const float* sin, float* y, int ldy))                                         \
  /* s = x + residual (or x); y = rmsnorm(s) * weight (+ bias); rows of H at strides ldx / ldr. */      \
  X(void, sq_add_rms_norm, (const float* x, int t, int h, int ldx, const float* residual, int ldr,      \
                            const float* weight, const float* bias, float eps, float* sum_out, float* y)) \
  /* Per-head RMSNorm: x [T, heads, D] at row stride ldx -> y at row stride ldy (may be x). */          \
  X(void, sq_rms_norm_heads, (const float* x, int t, int heads, int d, int ldx, const float* weight,    \
                              const float* bias, float eps, float* y, int ldy))                         \
  /* y [T, I] = silu(gate) * up for x [T, 2I] = [gate | up] at row stride ldx. */                       \
  X(void, sq_silu_and_mul, (const float* x, int t, int inter, int ldx, float* y))                       \
  /* A MoE layer's routed W8A8_DYNAMIC experts (moe_cpu.cpp): out fp32 [T, K, H] = each */              \
  /* slot's expert output times its weight, for experts first .. first + num_local - 1 (the */          \
  /* rest 0), or (summed) out [T, H] = each token's products added in ascending expert id; x */         \
  /* fp32 [T, H] at row stride ldx; ids int64, weights fp32 [T, K]; w13 packed [E, 2I, kp13], */        \
  /* w2 [E, H, kp2]; their scales [E, 2I] / [E, H] fp32 or bf16 (scales_bf16). ranks (null: */           \
  /* whole experts): each rank holds inter of every expert's intermediate rows (first 0), */             \
  /* reduced across the ranks; 0, or 1 when a reduction failed. */                                      \
  X(int, sq_routed_experts, (const float* x, int t, int h, int ldx, const int64_t* ids,                 \
                             const float* weights, int k, int first, int num_local, int inter,          \
                             const int8_t* w13, int kp13, const int8_t* w2, int kp2, const void* s13,   \
                             const void* s2, int scales_bf16, const SqRanks* ranks, int summed,         \
                             float* out))                                                               \
  /* A softmax router (moe_cpu.cpp): logits x fp32 [T, H] (row stride ldx) @ router fp32 [E, H]^T, or */ \
  /* the logits [T, E] given (null: computed here), softmax, each row's top_k largest (ties to the lower */\
  /* id; in its topk_group best groups of n_group where fewer: route_row) into ids int64 / weights fp32 */ \
  /* [T, K], divided by their sum where renormalize, times scaling. */                                   \
  X(void, sq_moe_route, (const float* x, int t, int h, int ldx, const float* router, int num_experts,    \
                         const float* logits, int n_group, int topk_group, int top_k, int renormalize,   \
                         float scaling, int64_t* ids, float* weights))                                   \
  /* The biased sigmoid router (moe_cpu.cpp: DeepSeek-V3, Kimi-K2, GLM-4.5): route_row_biased of each */ \
  /* row's logits (as sq_moe_route's), bias fp32 [E] -> ids, weights [T, K]. */                          \
  X(void, sq_moe_route_biased, (const float* x, int t, int h, int ldx, const float* router,              \
                                int num_experts, const float* logits, const float* bias, int n_group,    \
                                int topk_group, int top_k, int renormalize, float scaling, int64_t* ids, \
                                float* weights))                                                         \
  /* Qwen2-MoE's shared-expert gate (moe_cpu.cpp): out fp32 [T] = shared_gate of each row of x fp32 */  \
  /* [T, H] (row stride ldx) and w fp32 [H]. */                                                          \
  X(void, sq_shared_gate, (const float* x, int t, int h, int ldx, const float* w, float* out))          \
  /* Greedy head (greedy_cpu.cpp): 0, or 1 when x is not finite. */                                     \
  X(int, sq_greedy_argmax, (const float* x, int t, int k, int ldx, const int8_t* wq, int n, int kp,     \
                            const float* rows, const uint16_t* w, double slack, double fp_term,         \
                            int64_t* tokens))                                                           \
  /* Top-k candidates (greedy_cpu.cpp): 0; 1 when x is not finite; 2 when a token has more than cap. */  \
  X(int, sq_topk_screen, (const float* x, int t, int k, int ldx, const int8_t* wq, int n, int kp,       \
                          const float* rows, const uint16_t* w, double slack, double fp_term, int top_k, \
                          int cap, int64_t* rows_out, float* logits_out, int32_t* counts))              \
  /* A whole step (layer_cpu.cpp): embeddings of ids, every layer, final norm -> hidden [B, H]; ranks */ \
  /* (null: one process) reduce row-parallel linears and a split table. 0, or 1 when a reduction failed. */ \
  X(int, sq_decoder_model, (const SqDecoderLayer* const* layers, int num_layers,                        \
                            void* const* k_caches,                                                      \
                            void* const* v_caches, const SqStep* step, const SqModelEnds* ends,         \
                            const SqRanks* ranks, const int64_t* ids, const int64_t* positions,         \
                            float* hidden))                                                             \
  /* The two lists above as text (exports.cpp). */                                                      \
  X(const char*, sq_signatures, ())                                                                     \
  X(const char*, sq_struct_layouts, ())

#define SQ_FIELD(type, name) type name;
#define SQ_DEFINE_STRUCT(name, fields) \
  struct name {                        \
    fields(SQ_FIELD)                   \
  };
#define SQ_DECLARE_FUNCTION(ret, name, params) ret name params;

extern "C" {
SQ_STRUCTS(SQ_DEFINE_STRUCT)
SQ_FUNCTIONS(SQ_DECLARE_FUNCTION)
}
