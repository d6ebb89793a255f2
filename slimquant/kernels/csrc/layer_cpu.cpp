// One decode step of a whole pre-norm Llama-style decoder layer in one call:
//   s = x + residual; h = rmsnorm(s); qkv = Wqkv h; (q, k per-head rmsnorm: Qwen3)
//   o = Wo attention(rope(q), rope(k), v);
//   s2 = o + s; h2 = rmsnorm(s2); x' = Wdown (silu(gate) * up)(Wgate_up h2).
// At a small model's decode size the arithmetic is a few microseconds per op and the per-op overhead of
// Python and torch dominates; here the layer is a plain sequence of the same native kernels the per-op path
// calls (int8_cpu.cpp, attention_cpu.cpp, norm_cpu.cpp), in the same order on the same values, so its result
// is bit-identical to that path's.
#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" {
void sq_dynamic_linear(const float* x, int m, int k, int ldx, const int8_t* w, int n, int kp, const float* w_scale,
                       const float* bias, float* y);
void sq_static_linear(const float* x, int m, int k, int ldx, float inv_scale, float offset, const int8_t* w, int n,
                      int kp, const int32_t* quant_bias, const float* deq, float* y);
void sq_bf16_linear(const float* x, int m, int k, int ldx, const uint16_t* w, int n, const float* bias, float* y);
void sq_add_rms_norm(const float* x, int t, int h, int ldx, const float* residual, int ldr, const float* weight,
                     const float* bias, float eps, float* sum_out, float* y);
void sq_silu_and_mul(const float* x, int t, int inter, int ldx, float* y);
void sq_rms_norm_heads(const float* x, int t, int heads, int d, int ldx, const float* weight, const float* bias,
                       float eps, float* y, int ldy);
void sq_decode_attention(const float* q, int ldq, const float* k, int ldk, const float* v, int ldv, const float* cos,
                         const float* sin, float* k_cache, float* v_cache, const int64_t* slots,
                         const int32_t* block_tables, int max_blocks, const int32_t* context_lens, int block_size,
                         int batch, int num_heads, int num_kv_heads, int head_dim, float scale, float* out);
}

namespace {

enum LinearKind : int32_t { kDynamic = 1, kStatic = 2, kBf16 = 3 };

}  // namespace

extern "C" {

// A linear's runtime form (mirrored by ctypes in kernels/decoder_ops.py: keep the field order).
struct SqLinear {
  int32_t kind, n, k, kp;     // kp: padded K of int8 weights
  const void* w;              // int8 [N, Kp] (kDynamic, kStatic) or bf16 [N, K] (kBf16)
  const float* w_scale;       // kDynamic: [N]
  const float* bias;          // kDynamic, kBf16: [N] or null
  const int32_t* quant_bias;  // kStatic: [N]
  const float* deq_scale;     // kStatic: [N]
  float inv_scale, offset;    // kStatic: the per-tensor activation quantization
};

// A decoder layer's weights and shapes (mirrored in kernels/decoder_ops.py).
struct SqDecoderLayer {
  int32_t hidden, num_heads, num_kv_heads, head_dim, inter;
  float eps, attn_scale;
  const float *in_norm_w, *in_norm_b, *post_norm_w, *post_norm_b;  // [H]; biases may be null
  const float *q_norm_w, *q_norm_b, *k_norm_w, *k_norm_b;  // [D] per-head norms (Qwen3), or all null
  SqLinear qkv, o, gate_up, down;
};

}  // extern "C"

namespace {

// y [M, N] = linear(x [M, K] at row stride ldx).
void run_linear(const SqLinear& l, const float* x, int m, int ldx, float* y) {
  const int8_t* w8 = static_cast<const int8_t*>(l.w);
  switch (l.kind) {
    case kDynamic: sq_dynamic_linear(x, m, l.k, ldx, w8, l.n, l.kp, l.w_scale, l.bias, y); break;
    case kStatic:
      sq_static_linear(x, m, l.k, ldx, l.inv_scale, l.offset, w8, l.n, l.kp, l.quant_bias, l.deq_scale, y);
      break;
    case kBf16: sq_bf16_linear(x, m, l.k, ldx, static_cast<const uint16_t*>(l.w), l.n, l.bias, y); break;
  }
}

// Per-thread scratch, grown on demand: a decode step allocates nothing once warm.
float* scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

extern "C" {

// x [B, H] in: the layer's input (the previous layer's MLP output, or the embeddings if first != 0);
// residual [B, H] in/out (written, not read, when first != 0); out [B, H]: this layer's MLP output.
// cos / sin [B, D] (null: no rope); caches [slots, KVH, D]; the rest as in sq_decode_attention.
void sq_decoder_layer(const SqDecoderLayer* L, int batch, const float* x, float* residual, int first, float* out,
                      const float* cos, const float* sin, float* k_cache, float* v_cache, const int64_t* slots,
                      const int32_t* block_tables, int max_blocks, const int32_t* context_lens, int block_size) {
  thread_local std::vector<float> norm_buf, qkv_buf, attn_buf, o_buf, gu_buf, act_buf;
  const int h = L->hidden, b = batch, d = L->head_dim, nh = L->num_heads, kvh = L->num_kv_heads;
  const int ld_qkv = L->qkv.n;
  float* normed = scratch(norm_buf, (size_t)b * h);
  // the sum x + residual goes straight back into residual (each element is read before it is written)
  sq_add_rms_norm(x, b, h, h, first ? nullptr : residual, h, L->in_norm_w, L->in_norm_b, L->eps, residual, normed);

  float* qkv = scratch(qkv_buf, (size_t)b * ld_qkv);
  run_linear(L->qkv, normed, b, h, qkv);
  if (L->q_norm_w) {  // normalize each q and k head in place, before rope
    sq_rms_norm_heads(qkv, b, nh, d, ld_qkv, L->q_norm_w, L->q_norm_b, L->eps, qkv, ld_qkv);
    float* k_heads = qkv + (size_t)nh * d;
    sq_rms_norm_heads(k_heads, b, kvh, d, ld_qkv, L->k_norm_w, L->k_norm_b, L->eps, k_heads, ld_qkv);
  }
  float* attn = scratch(attn_buf, (size_t)b * nh * d);
  const float *k = qkv + (size_t)nh * d, *v = k + (size_t)kvh * d;
  sq_decode_attention(qkv, ld_qkv, k, ld_qkv, v, ld_qkv, cos, sin, k_cache, v_cache, slots, block_tables, max_blocks,
                      context_lens, block_size, b, nh, kvh, d, L->attn_scale, attn);
  float* o = scratch(o_buf, (size_t)b * h);
  run_linear(L->o, attn, b, nh * d, o);

  sq_add_rms_norm(o, b, h, h, residual, h, L->post_norm_w, L->post_norm_b, L->eps, residual, normed);
  float* gate_up = scratch(gu_buf, (size_t)b * 2 * L->inter);
  run_linear(L->gate_up, normed, b, h, gate_up);
  float* act = scratch(act_buf, (size_t)b * L->inter);
  sq_silu_and_mul(gate_up, b, L->inter, 2 * L->inter, act);
  run_linear(L->down, act, b, L->inter, out);
}

// Every layer of a decoder stack in one call: x [B, H] (the embeddings) in, out [B, H] (the last layer's MLP
// output) and residual [B, H] written; k_caches / v_caches: one pair per layer. sq_decoder_layer reads its x
// before it writes its out, so the stack runs in place in out.
void sq_decoder_stack(const SqDecoderLayer* const* layers, float* const* k_caches, float* const* v_caches,
                      int num_layers, int batch, const float* x, float* residual, float* out, const float* cos,
                      const float* sin, const int64_t* slots, const int32_t* block_tables, int max_blocks,
                      const int32_t* context_lens, int block_size) {
  for (int l = 0; l < num_layers; ++l)
    sq_decoder_layer(layers[l], batch, l == 0 ? x : out, residual, l == 0, out, cos, sin, k_caches[l], v_caches[l],
                     slots, block_tables, max_blocks, context_lens, block_size);
}

}  // extern "C"
