// The serial building blocks the per-op entry points (int8_cpu.cpp, norm_cpu.cpp, attention_cpu.cpp) run
// inside their own OpenMP loops, shared with the decoder stack (layer_cpu.cpp), which calls them on a slice
// of rows from inside one parallel region. None of them opens a parallel region. The same function on the
// same values gives the same bits, whichever path calls it.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "exports.h"

namespace sq {

// Quantized activations: the int8 values and the form the GEMM multiplies (|x| for AVX2, x + 128 for VNNI).
struct QuantizedX {
  std::vector<int8_t> q;   // [M, Kp] x_q
  std::vector<uint8_t> a;  // [M, Kp] |x_q| (AVX2) or x_q + 128 (VNNI); zero in the padding
  int kp = 0;
  const uint8_t* row(int i) const { return &a[(size_t)i * kp]; }

  // Room for m rows of kp (grown, never shrunk: a reused scratch), the padding [k, kp) of each row zeroed.
  void reset(int m, int k, int kp_) {
    kp = kp_;
    if (q.size() < (size_t)m * kp) q.resize((size_t)m * kp), a.resize((size_t)m * kp);
    for (int i = 0; i < m && k < kp; ++i) {
      std::memset(&q[(size_t)i * kp + k], 0, kp - k);
      std::memset(&a[(size_t)i * kp + k], 0, kp - k);
    }
  }
};

// e^x, 8 lanes: Cephes' expf (x = n ln 2 + r, e^r by a degree-5 polynomial, times 2^n), within a few ulp of
// std::exp (at most 1 over [-90, 0]); lanes below -87.3 (or -inf) give 0, above 88.37 +inf, as std::exp.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447f), hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ), over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: r exact to fp32
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n in two factors: n reaches 128 at the top of the range, one past the largest fp32 exponent
  const __m256i half_n = _mm256_srai_epi32(_mm256_cvtps_epi32(n), 1);
  const __m256i rest = _mm256_sub_epi32(_mm256_cvtps_epi32(n), half_n);
  const __m256 two_a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half_n, _mm256_set1_epi32(127)), 23));
  const __m256 two_b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, _mm256_set1_epi32(127)), 23));
  const __m256 e = _mm256_mul_ps(_mm256_mul_ps(y, two_a), two_b);
  return _mm256_blendv_ps(_mm256_andnot_ps(under, e), _mm256_set1_ps(INFINITY), over);
}

// ---- teams and ranks ----

constexpr int kSliceAlign = 16;  // slice boundaries on 16 rows: the packed weights' blocks, whole cache lines of fp32

// Thread `tid` of `nt`'s share [n0, n1) of n output rows.
inline void slice(int n, int tid, int nt, int& n0, int& n1) {
  const int blocks = (n + kSliceAlign - 1) / kSliceAlign;
  n0 = std::min(n, (int)((int64_t)blocks * tid / nt) * kSliceAlign);
  n1 = std::min(n, (int)((int64_t)blocks * (tid + 1) / nt) * kSliceAlign);
}

enum ReduceOp : int { kSumInt32 = 0, kMaxFloat = 1, kSumDisjoint = 2 };  // SqRanks.reduce's ops
using ReduceFn = int (*)(int op, void* data, int64_t count);

// One reduction over the ranks (SqRanks); after a failure, none: failed stays set and the call's numbers are void.
inline void reduce(const SqRanks* ranks, int op, void* data, int64_t count, int& failed) {
  if (!failed) failed = reinterpret_cast<ReduceFn>(ranks->reduce)(op, data, count) != 0;
}

// ---- int8_cpu.cpp ----

// Rows 0..m-1 of x (stride ldx, k values each) quantized into out (kp set): per token, scales[i] written.
void quantize_dynamic_rows(const float* x, int m, int k, int ldx, QuantizedX& out, float* scales);
// Static per-tensor quantization of rows 0..m-1: q = clamp(round(x * inv + off)).
void quantize_static_rows(const float* x, int m, int k, int ldx, float inv, float off, QuantizedX& out);
// Output columns [n0, n1) of y [M, N] = dynamic / static linear of the quantized x, every token.
void dynamic_linear_rows(const int8_t* w, const QuantizedX& x, int m, int n, int n0, int n1, const float* scales,
                         const float* w_scale, const float* bias, float* y);
void static_linear_rows(const int8_t* w, const QuantizedX& x, int m, int n, int n0, int n1,
                        const int32_t* quant_bias, const float* deq, float* y);
// Split K (tensor parallel): each row's max |x| into absmax [M]; rows quantized per token with given maxima (the
// whole row's, agreed across ranks; scales[i] written); int32 output columns [n0, n1) of acc [M, N]; and those
// columns of y from summed accumulators, as dynamic_linear_rows / static_linear_rows finish them.
void abs_max_rows(const float* x, int m, int k, int ldx, float* absmax);
void quantize_dynamic_rows_at(const float* x, int m, int k, int ldx, const float* absmax, QuantizedX& out,
                              float* scales);
void int32_rows(const int8_t* w, const QuantizedX& x, int m, int n, int n0, int n1, int32_t* acc);
void dynamic_epilogue_rows(const int32_t* acc, int m, int n, int n0, int n1, const float* scales,
                           const float* w_scale, const float* bias, float* y);
void static_epilogue_rows(const int32_t* acc, int m, int n, int n0, int n1, const int32_t* quant_bias,
                          const float* deq, float* y);
// Output columns [n0, n1) of y [M, N] = x [M, K] (stride ldx) @ w bf16 [N, K]^T (+ bias).
void bf16_linear_rows(const float* x, int m, int k, int ldx, const uint16_t* w, int n, int n0, int n1,
                      const float* bias, float* y);

// ---- norm_cpu.cpp ----

// One row: s = x (+ r); y = weight * (s * inv_rms(s)) (+ bias). y may be x, s may be r (in place).
void norm_row(const float* x, const float* r, int h, const float* weight, const float* bias, float eps, float* s,
              float* y);
// y[j] = silu(g[j]) * u[j] for j in [j0, j1).
void silu_and_mul_range(const float* g, const float* u, int j0, int j1, float* y);

// ---- moe_cpu.cpp ----

// sum_j a[j] * b[j] in one fixed order (fp32): a router's logit.
float dot_fp32(const float* a, const float* b, int n);
// Columns [e0, e1) of logits [M, E] = x [M, H] (stride ldx) @ router fp32 [E, H]^T.
void router_logits(const float* x, int m, int h, int ldx, const float* router, int num_experts, int e0, int e1,
                   float* logits);
// Qwen2-MoE's shared-expert gate of one row x [H]: sigmoid(dot_fp32(x, w)), w fp32 [H].
float shared_gate(const float* x, const float* w, int h);
// One token's route from its logits [E]: softmax, the top_k largest scores (ties to the lower id; where topk_group <
// n_group, among the topk_group groups whose best score is largest: DeepSeek-V2's group_limited_greedy) into ids /
// weights [K], divided by their sum (+ 1e-20) where renormalize, times scaling.
void route_row(const float* logits, int num_experts, int n_group, int topk_group, int top_k, int renormalize,
               float scaling, int64_t* ids, float* weights);
// One token's route by sigmoid scores and their bias (DeepSeek-V3's noaux_tc): choice = score + bias [E]; the
// topk_group groups (of n_group) with the largest sum of their two best choices; the top_k largest choices in
// them (ties to the lower group / id) into ids [K]; weights [K] their scores, renormalized / scaled as route_row.
void route_row_biased(const float* logits, int num_experts, const float* bias, int n_group, int topk_group,
                      int top_k, int renormalize, float scaling, int64_t* ids, float* weights);
// The slots (t * K + k) routed to experts first .. first + num_experts - 1, sorted by expert (in slot order within
// one), and where each expert's run begins: begin [E + 1].
void sort_slots(const int64_t* ids, int slots, int first, int num_experts, std::vector<int>& order,
                std::vector<int>& begin);
// Each of the n slots' row of y [n, H], columns [c0, c1), times its routing weight (weights [T * K]): written to the
// slot's row of out [T * K, H], or (summed) added to its token's row of out [T, H]; a token has one slot per expert,
// and the experts come in ascending id, so each token's products are added in that order (multiply, then add: no
// contraction).
void write_weighted(const float* y, int n, int h, int c0, int c1, const int* slots, const float* weights, int k,
                    int summed, float* out);
// out[j] for j in [j0, j1) = row `row` of n scales (fp32, or bf16 where bf16 != 0: the model dtype the NPU holds
// them in), as fp32.
void scales_fp32_range(const void* scales, int bf16, int64_t row, int n, int j0, int j1, float* out);

// ---- attention_cpu.cpp ----

// KV caches hold C = float (fp32), uint16_t (bf16) or int8_t values: fn(C{}) with the type kv_type names
// (SqStep: 0, 1, 2).
template <class Fn>
void with_cache_type(int kv_type, const Fn& fn) {
  if (kv_type == 2) fn(int8_t{});
  else if (kv_type == 1) fn(uint16_t{});
  else fn(float{});
}

// Token b's k (its first rope_dim values rotated by cos / sin [B, rope_dim]) and v of kv head h into the caches at
// slots[b] (nothing where slots[b] < 0); bf16 caches get each value rounded to nearest even, int8 caches
// clamp(round(x * inv + offset)) with kq's parameters.
template <class C>
void kv_store(const float* k, int ldk, const float* v, int ldv, const float* cos, const float* sin, int rope_dim,
              C* k_cache, C* v_cache, const int64_t* slots, int num_kv_heads, int head_dim, int b, int h,
              const SqKvQuant* kq);
// out [B, NH, Dv] for token b, query heads [j0, j1) of kv head g's group: softmax(rope(q) . K * scale) V (rope as
// kv_store's) over the token's cached context, its cached rows read once for all those heads (per head, the sums
// of one head alone); int8 rows are read as (q - offset) * scale with kq's parameters. Rows of both caches are
// head_dim wide; V is the first value_dim (Dv) values of each v row (MLA: the latent part of the one cached row).
template <class C>
void attend_group(const float* q, int ldq, const float* cos, const float* sin, int rope_dim, const C* k_cache,
                  const C* v_cache, const int32_t* block_tables, int max_blocks, const int32_t* context_lens,
                  int block_size, int num_heads, int num_kv_heads, int head_dim, int value_dim, float scale, int b,
                  int g, int j0, int j1, const SqKvQuant* kq, float* out);

// MLA (DeepSeek) pieces of the whole step. One head of sq_head_matmul: y [B, N] (row stride ldy) = x [B, K] (row
// stride ldx) @ w_h [K, N] (rows ldw apart), or @ w_h^T (w_h [N, K]) where transposed; w_h's rows a multiple of 8
// wide; W float or uint16_t (bf16). The numbers of that head in sq_head_matmul.
template <class W>
void head_product(const float* x, int b, int k, int64_t ldx, const W* w_h, int n, int64_t ldw, bool transposed,
                  float* y, int64_t ldy);
// x [r] (q_pe or k_pe) rotated by cos / sin [r]: in pairs (x0, x1), (x2, x3), ... written de-interleaved as
// [evens' | odds'] where interleave (transformers' DeepSeek; the bits of layers.rotary.apply_rotary_interleaved),
// else in neox halves (apply_rotary).
void rope_mla(const float* x, const float* cos, const float* sin, int r, bool interleave, float* out);
// A latent-cache row entry [width] (the normed latent, then the rotated k_pe) into cache [slots, width] at slot,
// stored as kv_store stores values; nothing where slot < 0.
template <class C>
void mla_store(const float* entry, int width, C* cache, int64_t slot);

// Row b of a sequence with nothing cached before it (context length 1) over an int8 cache attends to its own float
// v, as vLLM-Ascend does: its query heads [j0, j1) of kv group g get v's row of kv head g.
void own_value(const float* v, int ldv, int b, int g, int j0, int j1, int num_heads, int num_kv_heads,
               int head_dim, float* out);

// Thread tid's share of the batch * num_heads query heads, a contiguous range, as runs of heads within one kv
// group: fn(b, g, j0, j1) for token b, kv group g, its heads [j0, j1). The shares are balanced to a head, and the
// heads of a group that fall in one share read the group's cached rows together.
template <class Fn>
void for_attention_share(int batch, int num_heads, int num_kv_heads, int tid, int nt, const Fn& fn) {
  const int total = batch * num_heads, heads = num_heads / num_kv_heads;
  const int end = (int)((int64_t)total * (tid + 1) / nt);
  for (int h = (int)((int64_t)total * tid / nt); h < end;) {
    const int b = h / num_heads, hd = h % num_heads, g = hd / heads, j0 = hd % heads;
    const int j1 = std::min(heads, j0 + (end - h));
    fn(b, g, j0, j1);
    h += j1 - j0;
  }
}

}  // namespace sq
