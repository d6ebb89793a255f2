// One decode step (or a few prefill tokens, one attention row each) of a stack of pre-norm Llama-style decoder
// layers in one call; per layer:
//   s = x + residual; h = rmsnorm(s); qkv = Wqkv h; (q, k per-head rmsnorm: Qwen3)
//   o = Wo attention(rope(q), rope(k), v);
//   s2 = o + s; h2 = rmsnorm(s2); x' = Wdown (silu(gate) * up)(Wgate_up h2),
// or, in a MoE layer (Qwen3-MoE, GLM-4.5, DeepSeek), x' = the sum over h2's top-k routed experts of weight *
// expert(h2) (+ the shared experts' MLP of h2: GLM-4.5, DeepSeek). DeepSeek's MLA layers attend over their latent
// cache in place of q, k, v (mla_slice: absorbed decode, as the per-op path's).
// At a small model's decode size the arithmetic is a few microseconds per op and the per-op overhead of
// Python and torch dominates; here the whole stack runs inside one OpenMP parallel region instead of a
// fork/join per parallel op: each thread computes a fixed slice of every linear's output rows with the serial
// kernels that the per-op entry points run (cpu_kernels.h), quantizing the activation rows itself (redundantly:
// the same values on every thread), and barriers separate the dependent phases. The same kernels on the same
// values in the same order: the per-op path's bits. Under tensor parallel a row-parallel int8 linear (split_k) has
// thread 0 call the ranks' reduction (SqRanks) between barriers: the absmax, then the int32 products.
#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "exports.h"


namespace {

enum LinearKind : int32_t { kDynamic = 1, kStatic = 2, kBf16 = 3 };

}  // namespace


namespace {

// Per-thread scratch, grown on demand: a decode step allocates nothing once warm.
float* scratch(std::vector<float>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

namespace {

using sq::kMaxFloat, sq::kSumDisjoint, sq::kSumInt32, sq::reduce, sq::slice;

// One thread's scratch in the region: its copy of the residual stream, the normed rows, the quantized rows.
struct ThreadScratch {
  std::vector<float> residual, normed, head, scales;
  sq::QuantizedX xq;
  std::vector<int64_t> ids;  // a MoE layer's routes [B, K], their weights, the slots sorted by expert
  std::vector<float> weights, rows, s13, s2;
  std::vector<int> order, begin;
  std::vector<float> q_a, entry, sums;  // an MLA layer's normed q_a rows [B, Q_R], a cache entry, a norm's sums
};

// A linear's input rows x [M, K] (stride ldx) quantized into t (on this thread; nothing for bf16 weights).
void quantize_input(const SqLinear& l, const float* x, int m, int ldx, ThreadScratch& t) {
  if (l.kind == kBf16) return;
  t.xq.reset(m, l.k, l.kp);
  if (l.kind == kDynamic) sq::quantize_dynamic_rows(x, m, l.k, ldx, t.xq, t.scales.data());
  else sq::quantize_static_rows(x, m, l.k, ldx, l.inv_scale, l.offset, t.xq);
}

// Output rows [n0, n1) of y [M, N] = linear(x [M, K] at stride ldx), x quantized into t by quantize_input.
void linear_rows(const SqLinear& l, const float* x, int m, int ldx, int n0, int n1, const ThreadScratch& t,
                 float* y) {
  const int8_t* w8 = static_cast<const int8_t*>(l.w);
  switch (l.kind) {
    case kDynamic: sq::dynamic_linear_rows(w8, t.xq, m, l.n, n0, n1, t.scales.data(), l.w_scale, l.bias, y); break;
    case kStatic: sq::static_linear_rows(w8, t.xq, m, l.n, n0, n1, l.quant_bias, l.deq_scale, y); break;
    case kBf16: sq::bf16_linear_rows(x, m, l.k, ldx, static_cast<const uint16_t*>(l.w), l.n, n0, n1, l.bias, y); break;
  }
}

// quantize_input, then linear_rows on this thread's slice of the rows (nothing where the slice is empty).
void linear_slice(const SqLinear& l, const float* x, int m, int ldx, int tid, int nt, ThreadScratch& t, float* y) {
  int n0, n1;
  slice(l.n, tid, nt, n0, n1);
  if (n0 >= n1) return;
  quantize_input(l, x, m, ldx, t);
  linear_rows(l, x, m, ldx, n0, n1, t, y);
}

// What a row-parallel (split_k) linear shares across the team: each token's absmax [M], the int32 products [M, N],
// whether a reduction failed.
struct SplitKShared {
  float* absmax;
  int32_t* acc;
  int failed;
};

// A row-parallel int8 linear, x this rank's part of K: the ranks agree on each token's absmax (dynamic), each
// thread computes its slice of the int32 products, thread 0 sums them over the ranks, each thread dequantizes its
// slice: one process's numbers over the whole K. Every thread of the team calls it (it holds barriers).
void split_k_slice(const SqLinear& l, const float* x, int m, int ldx, int tid, int nt, ThreadScratch& t,
                   const SqRanks* ranks, SplitKShared& shared, float* y) {
  if (l.kind == kDynamic) {
    if (tid == 0) {
      sq::abs_max_rows(x, m, l.k, ldx, shared.absmax);
      reduce(ranks, kMaxFloat, shared.absmax, m, shared.failed);
    }
#pragma omp barrier
    t.xq.reset(m, l.k, l.kp);
    sq::quantize_dynamic_rows_at(x, m, l.k, ldx, shared.absmax, t.xq, t.scales.data());
  } else {
    quantize_input(l, x, m, ldx, t);
  }
  int n0, n1;
  slice(l.n, tid, nt, n0, n1);
  if (n0 < n1) sq::int32_rows(static_cast<const int8_t*>(l.w), t.xq, m, l.n, n0, n1, shared.acc);
#pragma omp barrier
  if (tid == 0) reduce(ranks, kSumInt32, shared.acc, (int64_t)m * l.n, shared.failed);
#pragma omp barrier
  if (n0 >= n1) return;
  if (l.kind == kDynamic)
    sq::dynamic_epilogue_rows(shared.acc, m, l.n, n0, n1, t.scales.data(), l.w_scale, l.bias, y);
  else
    sq::static_epilogue_rows(shared.acc, m, l.n, n0, n1, l.quant_bias, l.deq_scale, y);
}

// linear_slice, or split_k_slice for a row-parallel linear.
void output_slice(const SqLinear& l, const float* x, int m, int ldx, int tid, int nt, ThreadScratch& t,
                  const SqRanks* ranks, SplitKShared& shared, float* y) {
  if (l.split_k) split_k_slice(l, x, m, ldx, tid, nt, t, ranks, shared, y);
  else linear_slice(l, x, m, ldx, tid, nt, t, y);
}

// silu(gate) * up of rows x [M, K] (stride ldx) through a gate | up linear l [2I, K]: this thread's gate rows
// [n0, n1) and the matching up rows into gate_up [M, 2I], those columns of act [M, I] (nothing for an empty slice).
void gated_slice(const SqLinear& l, const float* x, int m, int ldx, int inter, int n0, int n1,
                 ThreadScratch& t, float* gate_up, float* act) {
  if (n0 >= n1) return;
  quantize_input(l, x, m, ldx, t);
  linear_rows(l, x, m, ldx, n0, n1, t, gate_up);
  linear_rows(l, x, m, ldx, inter + n0, inter + n1, t, gate_up);
  for (int i = 0; i < m; ++i) {
    const float* g = gate_up + (size_t)i * 2 * inter;
    sq::silu_and_mul_range(g, g + inter, n0, n1, act + (size_t)i * inter);
  }
}

// A gated MLP (gate_up [2I, H], down [H, I]) on the normed rows [B, H] -> out [B, H]: gated_slice of this thread's
// intermediate rows into act [B, I], then (after a barrier) its slice of the down projection's output columns.
void gated_mlp_slice(const SqLinear& gate_up_l, const SqLinear& down, int inter, int h, const float* normed, int b,
                     int tid, int nt, ThreadScratch& t, const SqRanks* ranks, SplitKShared& shared, float* gate_up,
                     float* act, float* out) {
  int n0, n1;
  slice(inter, tid, nt, n0, n1);
  gated_slice(gate_up_l, normed, b, h, inter, n0, n1, t, gate_up, act);
#pragma omp barrier
  output_slice(down, act, b, inter, tid, nt, t, ranks, shared, out);
}

// What a MoE layer shares across the team: the router's logits [B, E]; every routed row's gate | up [R, 2I] and
// activation [R, I] (R <= B * K rows, grouped by expert in ascending id), its absmax [R] and int32 down products
// [R, H] (split experts); one expert's down outputs [B, H]; the weighted products per slot [B * K, H] (swap).
struct MoeShared {
  float *logits, *gate_up, *act, *absmax, *y, *slots;
  int32_t* acc;
};

// Expert e's W8A8_DYNAMIC linear of packed weights [E, n, kp] (k inputs) with its scales w_scale fp32 [n].
SqLinear expert_linear(int n, int k, int kp, const int8_t* w, int e, const float* w_scale) {
  SqLinear l{};
  l.kind = kDynamic, l.n = n, l.k = k, l.kp = kp, l.w = w + (size_t)e * n * kp, l.w_scale = w_scale;
  return l;
}

// The routed rows of every local expert with tokens (t.order / t.begin): each expert's rows (in token order)
// through gate_up and SiLU-and-mul, this thread's slice [g0, g1) of the intermediate rows, into s.act.
void expert_activations(const SqMoe& m, const float* normed, int h, int inter, int g0, int g1, ThreadScratch& t,
                        const MoeShared& s) {
  float* s13 = scratch(t.s13, (size_t)2 * inter);
  for (int e = 0; e < m.num_local && g0 < g1; ++e) {
    const int first = t.begin[e], n = t.begin[e + 1] - first;
    if (n == 0) continue;
    const SqLinear w13 = expert_linear(2 * inter, h, m.kp13, m.w13, e, s13);
    sq::scales_fp32_range(m.s13, m.scales_bf16, e, 2 * inter, g0, g1, s13);
    sq::scales_fp32_range(m.s13, m.scales_bf16, e, 2 * inter, inter + g0, inter + g1, s13);
    float* rows = scratch(t.rows, (size_t)n * h);  // [n, H]
    for (int r = 0; r < n; ++r)
      std::memcpy(rows + (size_t)r * h, normed + (size_t)(t.order[first + r] / m.top_k) * h, sizeof(float) * h);
    float* gate_up = s.gate_up + (size_t)first * 2 * inter;  // [n, 2I]
    gated_slice(w13, rows, n, h, inter, g0, g1, t, gate_up, s.act + (size_t)first * inter);
  }
}

// The down projections of s.act, this thread's output columns [c0, c1), each product times its routing weight
// added into its token's row of out, or (swap) written to its slot's row of s.slots (sq::write_weighted). Whole
// experts: each expert's rows quantized per token and its dynamic linear. Split (each rank `inter` of every
// expert's rows): the ranks' MAX of each row's absmax, each expert's rows quantized with it and their int32
// products, the ranks' SUM, the epilogue: moe_cpu.cpp's split_experts, one process's numbers. Every thread calls
// it (barriers).
void expert_downs(const SqMoe& m, int h, int inter, int tid, int c0, int c1, ThreadScratch& t, const SqRanks* ranks,
                  int& failed, const MoeShared& s, float* out) {
  const int rows = t.begin[m.num_local];
  float* s2 = scratch(t.s2, h);
  float* scales = scratch(t.scales, rows);  // each row's activation scale
  if (m.split) {
    if (tid == 0) {
      sq::abs_max_rows(s.act, rows, inter, inter, s.absmax);
      reduce(ranks, kMaxFloat, s.absmax, rows, failed);
    }
#pragma omp barrier
  }
  for (int e = 0; e < m.num_local; ++e) {
    const int first = t.begin[e], n = t.begin[e + 1] - first;
    if (n == 0 || c0 >= c1) continue;
    const SqLinear w2 = expert_linear(h, inter, m.kp2, m.w2, e, s2);
    const float* act = s.act + (size_t)first * inter;
    if (m.split) {
      t.xq.reset(n, inter, m.kp2);
      sq::quantize_dynamic_rows_at(act, n, inter, inter, s.absmax + first, t.xq, scales + first);
      sq::int32_rows(static_cast<const int8_t*>(w2.w), t.xq, n, h, c0, c1, s.acc + (size_t)first * h);
      continue;
    }
    sq::scales_fp32_range(m.s2, m.scales_bf16, e, h, c0, c1, s2);
    quantize_input(w2, act, n, inter, t);
    linear_rows(w2, act, n, inter, c0, c1, t, s.y);
    sq::write_weighted(s.y, n, h, c0, c1, &t.order[first], t.weights.data(), m.top_k, !m.swap, m.swap ? s.slots : out);
  }
  if (!m.split) return;
#pragma omp barrier
  if (tid == 0) reduce(ranks, kSumInt32, s.acc, (int64_t)rows * h, failed);
#pragma omp barrier
  for (int e = 0; e < m.num_local; ++e) {
    const int first = t.begin[e], n = t.begin[e + 1] - first;
    if (n == 0 || c0 >= c1) continue;
    sq::scales_fp32_range(m.s2, m.scales_bf16, e, h, c0, c1, s2);
    sq::dynamic_epilogue_rows(s.acc + (size_t)first * h, n, h, c0, c1, scales + first, s2, nullptr, s.y);
    sq::write_weighted(s.y, n, h, c0, c1, &t.order[first], t.weights.data(), m.top_k, !m.swap, m.swap ? s.slots : out);
  }
}

// Expert parallel: the ranks' weighted products per slot (0 where another rank's expert) summed over the ranks,
// then each token's K slots added into its row of out, columns [c0, c1), in ascending expert id: RoutedExperts'
// sum_disjoint then add_in_expert_order. Every thread calls it (barriers).
void swapped_sums(const SqMoe& m, int b, int h, int tid, int c0, int c1, const ThreadScratch& t, const SqRanks* ranks,
                  int& failed, const MoeShared& s, float* out) {
  const int k = m.top_k;
#pragma omp barrier
  if (tid == 0) reduce(ranks, kSumDisjoint, s.slots, (int64_t)b * k * h, failed);
#pragma omp barrier
  std::vector<int> order(k);
  for (int i = 0; i < b; ++i) {
    const int64_t* ids = &t.ids[(size_t)i * k];
    for (int j = 0; j < k; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return ids[x] < ids[y]; });
    float* o = out + (size_t)i * h;
    for (const int slot : order) {
      const float* v = s.slots + ((size_t)i * k + slot) * h;
      for (int j = c0; j < c1; ++j) o[j] += v[j];
    }
  }
}

// A MoE layer (L.moe) on the normed rows [B, H] -> out [B, H]: each thread the logits of its slice of the experts;
// every thread each token's route (the same ones) and the slots sorted by expert; every local expert's rows
// through gate_up and SiLU-and-mul (each thread a slice of the intermediate rows), then down (a slice of the
// output columns), each product times its weight added into its token's row of out in ascending expert id; then the
// shared experts (y: scratch [B, H]; times each row's sq_shared_gate where gated: Qwen2-MoE) added to that sum.
// sq_moe_route (or sq_moe_route_biased), sq_routed_experts (summed; or its slots, swapped and added in expert order),
// the shared experts' linears and sq_shared_gate do the same, kernel for kernel, on the same rows: the per-op path's
// bits. Every thread of the team calls it (barriers).
void moe_slice(const SqDecoderLayer& L, const float* normed, int b, int tid, int nt, ThreadScratch& t,
               const SqRanks* ranks, SplitKShared& shared, const MoeShared& s, float* gate_up, float* act, float* y,
               float* out) {
  int& failed = shared.failed;
  const SqMoe& m = L.moe;
  const int h = L.hidden, inter = L.inter, k = m.top_k;
  int e0, e1, g0, g1, c0, c1;
  slice(m.num_experts, tid, nt, e0, e1);
  slice(inter, tid, nt, g0, g1);
  slice(h, tid, nt, c0, c1);
  sq::router_logits(normed, b, h, h, m.router, m.num_experts, e0, e1, s.logits);
  for (int i = 0; i < b; ++i) {
    std::fill(out + (size_t)i * h + c0, out + (size_t)i * h + c1, 0.0f);
    for (int j = 0; j < k && m.swap; ++j) {
      float* slot = s.slots + ((size_t)i * k + j) * h;
      std::fill(slot + c0, slot + c1, 0.0f);  // 0 in the slots of other ranks' experts
    }
  }
#pragma omp barrier
  t.ids.resize((size_t)b * k);
  t.weights.resize((size_t)b * k);
  for (int i = 0; i < b; ++i) {
    const float* logits = s.logits + (size_t)i * m.num_experts;
    int64_t* ids = &t.ids[(size_t)i * k];
    float* weights = &t.weights[(size_t)i * k];
    if (m.bias)
      sq::route_row_biased(logits, m.num_experts, m.bias, m.n_group, m.topk_group, k, m.renormalize, m.scaling, ids,
                           weights);
    else
      sq::route_row(logits, m.num_experts, m.n_group, m.topk_group, k, m.renormalize, m.scaling, ids, weights);
  }
  sq::sort_slots(t.ids.data(), b * k, m.first, m.num_local, t.order, t.begin);
  expert_activations(m, normed, h, inter, g0, g1, t, s);
#pragma omp barrier
  expert_downs(m, h, inter, tid, c0, c1, t, ranks, failed, s, out);
  if (m.swap) swapped_sums(m, b, h, tid, c0, c1, t, ranks, failed, s, out);
  if (m.shared_inter == 0) return;
  // the shared experts into y, each thread then adding its own columns (those it summed the routed experts into),
  // times each row's gate where the layer has one (every thread computes the rows' gates: a dot product each)
  gated_mlp_slice(L.gate_up, L.down, m.shared_inter, h, normed, b, tid, nt, t, ranks, shared, gate_up, act, y);
  for (int i = 0; i < b; ++i) {
    const float* yi = y + (size_t)i * h;
    float* oi = out + (size_t)i * h;
    if (!m.shared_gate) {
      for (int j = c0; j < c1; ++j) oi[j] += yi[j];
      continue;
    }
    const float g = sq::shared_gate(normed + (size_t)i * h, m.shared_gate, h);
    for (int j = c0; j < c1; ++j) oi[j] += g * yi[j];  // the per-op path's (gate * shared), then routed + it
  }
}

// Standard attention of the normed rows [B, H] into attn [B, NH * D]: this thread's slice of qkv, then (after a
// barrier) the new rows' k (normed per head: Qwen3; rotated) and v into the caches, then its share of the query heads.
// Every thread of the team calls it (it holds barriers); the caller's barrier ends it.
template <class C>
void attention_slice(const SqDecoderLayer& L, C* k_cache, C* v_cache, const SqStep& step, const float* cos,
                     const float* sin, int rope_dim, const float* normed, int tid, int nt, ThreadScratch& t,
                     float* qkv, float* attn) {
  const int b = step.batch, d = L.head_dim, nh = L.num_heads, kvh = L.num_kv_heads, ld_qkv = L.qkv.n;
  float* head = scratch(t.head, d);
  linear_slice(L.qkv, normed, b, L.hidden, tid, nt, t, qkv);
#pragma omp barrier
  float* k_heads = qkv + (size_t)nh * d;
  const float* v_heads = k_heads + (size_t)kvh * d;
#pragma omp for schedule(static)
  for (int it = 0; it < b * kvh; ++it) {
    const int bi = it / kvh, g = it % kvh;
    if (L.k_norm_w) {
      float* kh = k_heads + (size_t)bi * ld_qkv + (size_t)g * d;
      sq::norm_row(kh, nullptr, d, L.k_norm_w, L.k_norm_b, L.eps, head, kh);
    }
    sq::kv_store(k_heads, ld_qkv, v_heads, ld_qkv, cos, sin, rope_dim, k_cache, v_cache, step.slots, kvh, d, bi, g,
                 &L.kv_quant);
  }
  sq::for_attention_share(b, nh, kvh, tid, nt, [&](int bi, int g, int j0, int j1) {
    if (std::is_same_v<C, int8_t> && step.context_lens[bi] == 1)  // nothing cached before: its own float v
      return sq::own_value(v_heads, ld_qkv, bi, g, j0, j1, nh, kvh, d, attn);
    for (int hd = g * (nh / kvh) + j0; hd < g * (nh / kvh) + j1 && L.q_norm_w; ++hd) {
      float* qh = qkv + (size_t)bi * ld_qkv + (size_t)hd * d;
      sq::norm_row(qh, nullptr, d, L.q_norm_w, L.q_norm_b, L.eps, head, qh);
    }
    sq::attend_group<C>(qkv, ld_qkv, cos, sin, rope_dim, k_cache, v_cache, step.block_tables, step.max_blocks,
                        step.context_lens, step.block_size, nh, kvh, d, d, L.attn_scale, bi, g, j0, j1, &L.kv_quant,
                        attn);
  });
}

// What an MLA layer's attention shares across the team: kv_a_proj_with_mqa's rows [B, R + rope] (where q_proj is
// separate), q_b_proj's [B, NH * (nope + rope)], the absorbed queries [B, NH, R + rope], the latent outputs
// [B, NH, R].
struct MlaShared {
  float *kv_a, *q, *q_full, *latent;
};

// fn(w) with kv_b_proj's weight [NH, nope + V, R] as its element type (fp32 or bf16).
template <class Fn>
void with_kv_b(const SqMla& a, const Fn& fn) {
  if (a.kv_b_bf16) fn(static_cast<const uint16_t*>(a.kv_b));
  else fn(static_cast<const float*>(a.kv_b));
}

// MLA attention of the normed rows [B, H] into attn [B, NH * V], the per-op path's absorbed decode step by step
// (DeepseekMLA, MLAttention._decode_absorbed): q_a | kv_a (or q_proj, kv_a) -> q_a normed -> q_b; each row's latent
// normed and k_pe rotated into the cache; per head q_nope @ W_UK beside the rotated q_pe, attention over the latent
// rows, @ W_UV^T. Every thread of the team calls it (it holds barriers); the caller's barrier ends it.
template <class C>
void mla_slice(const SqDecoderLayer& L, C* cache, const SqStep& step, const float* cos, const float* sin,
               int rope_dim, const float* normed, int tid, int nt, ThreadScratch& t, float* qkv, const MlaShared& s,
               float* attn) {
  const SqMla& a = L.mla;
  const int b = step.batch, nh = L.num_heads, r = a.rank, qk = a.nope + a.rope, d = r + a.rope, q_r = a.q_lora_rank;
  linear_slice(L.qkv, normed, b, L.hidden, tid, nt, t, qkv);
  if (q_r == 0) linear_slice(a.kv_a, normed, b, L.hidden, tid, nt, t, s.kv_a);
#pragma omp barrier
  const float* q = q_r ? s.q : qkv;
  const float* kv_a = q_r ? qkv + q_r : s.kv_a;
  const int ldq = q_r ? a.q_b.n : L.qkv.n, ld_kv = q_r ? L.qkv.n : a.kv_a.n;
  if (q_r) {  // every thread: q_a's rows normed (its own copy), then its slice of q_b_proj
    float* q_a = scratch(t.q_a, (size_t)b * q_r);
    for (int i = 0; i < b; ++i)
      sq::norm_row(qkv + (size_t)i * L.qkv.n, nullptr, q_r, a.q_a_norm_w, a.q_a_norm_b, L.eps,
                   scratch(t.sums, q_r), q_a + (size_t)i * q_r);
    linear_slice(a.q_b, q_a, b, q_r, tid, nt, t, s.q);
  }
  float* entry = scratch(t.entry, d);
#pragma omp for schedule(static)
  for (int i = 0; i < b; ++i) {  // the new rows' cache entries: [normed latent | rotated k_pe]
    const float* row = kv_a + (size_t)i * ld_kv;
    sq::norm_row(row, nullptr, r, a.kv_a_norm_w, a.kv_a_norm_b, L.eps, scratch(t.sums, r), entry);
    sq::rope_mla(row + r, cos + (size_t)i * rope_dim, sin + (size_t)i * rope_dim, a.rope, a.interleave, entry + r);
    sq::mla_store(entry, d, cache, step.slots[i]);
  }  // the loop's barrier: q_b's rows are complete too
  int h0, h1;
  slice(nh, tid, nt, h0, h1);
  const int64_t ld_head = (int64_t)(a.nope + a.v_dim) * r;  // kv_b_proj's values per head
  with_kv_b(a, [&](auto w) {
    for (int hd = h0; hd < h1; ++hd) {  // the absorbed queries: [q_nope @ W_UK | rotated q_pe]
      sq::head_product(q + (size_t)hd * qk, b, a.nope, ldq, w + hd * ld_head, r, r, false, s.q_full + (size_t)hd * d,
                       (int64_t)nh * d);
      for (int i = 0; i < b; ++i)
        sq::rope_mla(q + (size_t)i * ldq + (size_t)hd * qk + a.nope, cos + (size_t)i * rope_dim,
                     sin + (size_t)i * rope_dim, a.rope, a.interleave, s.q_full + ((size_t)i * nh + hd) * d + r);
    }
  });
#pragma omp barrier
  sq::for_attention_share(b, nh, 1, tid, nt, [&](int bi, int g, int j0, int j1) {
    sq::attend_group<C>(s.q_full, nh * d, nullptr, nullptr, 0, cache, cache, step.block_tables, step.max_blocks,
                        step.context_lens, step.block_size, nh, 1, d, r, L.attn_scale, bi, g, j0, j1, nullptr,
                        s.latent);
  });
#pragma omp barrier
  with_kv_b(a, [&](auto w) {
    for (int hd = h0; hd < h1; ++hd)  // the heads' outputs: latent @ W_UV^T
      sq::head_product(s.latent + (size_t)hd * r, b, r, (int64_t)nh * r, w + hd * ld_head + (int64_t)a.nope * r,
                       a.v_dim, r, true, attn + (size_t)hd * a.v_dim, (int64_t)nh * a.v_dim);
  });
}

// Every layer of a decoder stack, in one parallel region: x [B, H] (the embeddings) in, out [B, H] (the last
// layer's MLP output) and residual [B, H] written; one pair of caches per layer, of element C (float, uint16_t
// holding bf16, or int8_t with each layer's kv_quant); cos / sin [B, rope_dim] (null: no rope; rope_dim < D: on the
// first rope_dim values of each head); the rows of the step as in sq_decode_attention.
template <class C>
int decoder_stack(const SqDecoderLayer* const* layers, C* const* k_caches, C* const* v_caches, int num_layers,
                  const SqStep& step, const SqRanks* ranks, const float* x, float* residual, float* out,
                  const float* cos, const float* sin, int rope_dim) {
  const int b = step.batch;
  int max_qkv = 0, max_attn = 0, max_inter = 0, max_experts = 0, max_top_k = 0, max_moe_inter = 0;
  int max_kv_a = 0, max_q = 0, max_latent = 0;  // MLA layers': kv_a_proj's rows, q_b_proj's, NH * R
  for (int l = 0; l < num_layers; ++l) {
    const SqDecoderLayer& L = *layers[l];
    max_qkv = std::max(max_qkv, L.qkv.n);
    max_attn = std::max(max_attn, L.num_heads * L.head_dim);
    max_inter = std::max({max_inter, L.inter, L.moe.shared_inter});
    max_experts = std::max(max_experts, L.moe.num_experts);
    max_top_k = std::max(max_top_k, L.moe.top_k);
    if (L.moe.num_experts > 0) max_moe_inter = std::max(max_moe_inter, L.inter);
    max_kv_a = std::max(max_kv_a, L.mla.kv_a.n);
    max_q = std::max(max_q, L.mla.q_b.n);
    max_latent = std::max(max_latent, L.num_heads * L.mla.rank);
  }
  const int h = layers[0]->hidden;
  thread_local std::vector<float> qkv_buf, attn_buf, o_buf, gu_buf, act_buf;  // shared by the team
  float* qkv = scratch(qkv_buf, (size_t)b * max_qkv);
  float* attn = scratch(attn_buf, (size_t)b * max_attn);
  float* o = scratch(o_buf, (size_t)b * h);
  float* gate_up = scratch(gu_buf, (size_t)b * 2 * max_inter);
  float* act = scratch(act_buf, (size_t)b * max_inter);
  thread_local std::vector<float> logits_buf, moe_gu_buf, moe_act_buf, moe_absmax_buf, moe_y_buf, moe_slots_buf;
  thread_local std::vector<int32_t> moe_acc_buf;
  const size_t routed = (size_t)b * max_top_k;  // rows of the routed experts, at most
  if (moe_acc_buf.size() < routed * h) moe_acc_buf.resize(routed * h);
  const MoeShared moe{scratch(logits_buf, (size_t)b * max_experts), scratch(moe_gu_buf, routed * 2 * max_moe_inter),
                      scratch(moe_act_buf, routed * max_moe_inter), scratch(moe_absmax_buf, routed),
                      scratch(moe_y_buf, (size_t)b * h), scratch(moe_slots_buf, routed * h), moe_acc_buf.data()};
  thread_local std::vector<float> absmax_buf;
  thread_local std::vector<int32_t> acc_buf;
  if (acc_buf.size() < (size_t)b * h) acc_buf.resize((size_t)b * h);  // the row-parallel linears' outputs: [B, H]
  SplitKShared shared{scratch(absmax_buf, b), acc_buf.data(), 0};
  thread_local std::vector<float> kv_a_buf, q_buf, q_full_buf, latent_buf;
  const MlaShared mla{scratch(kv_a_buf, (size_t)b * max_kv_a), scratch(q_buf, (size_t)b * max_q),
                      scratch(q_full_buf, (size_t)b * max_attn), scratch(latent_buf, (size_t)b * max_latent)};
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    thread_local ThreadScratch t;
    float* res = scratch(t.residual, (size_t)b * h);
    float* normed = scratch(t.normed, (size_t)b * h);
    scratch(t.scales, b);
    for (int l = 0; l < num_layers; ++l) {
      const SqDecoderLayer& L = *layers[l];
      const float* in = l == 0 ? x : out;
      // every thread: s = x + residual into its own residual copy, the normed rows, their quantization
      for (int i = 0; i < b; ++i)
        sq::norm_row(in + (size_t)i * h, l == 0 ? nullptr : res + (size_t)i * h, h, L.in_norm_w, L.in_norm_b,
                     L.eps, res + (size_t)i * h, normed + (size_t)i * h);
      if (L.mla.rank == 0) {
        attention_slice(L, k_caches[l], v_caches[l], step, cos, sin, rope_dim, normed, tid, nt, t, qkv, attn);
      } else if constexpr (!std::is_same_v<C, int8_t>) {  // MLA caches no int8 rows (the plan says so)
        mla_slice(L, k_caches[l], step, cos, sin, rope_dim, normed, tid, nt, t, qkv, mla, attn);
      }
#pragma omp barrier
      output_slice(L.o, attn, b, L.o.k, tid, nt, t, ranks, shared, o);
#pragma omp barrier
      for (int i = 0; i < b; ++i)
        sq::norm_row(o + (size_t)i * h, res + (size_t)i * h, h, L.post_norm_w, L.post_norm_b, L.eps,
                     res + (size_t)i * h, normed + (size_t)i * h);
      if (L.moe.num_experts > 0)
        moe_slice(L, normed, b, tid, nt, t, ranks, shared, moe, gate_up, act, o, out);  // o is free again
      else
        gated_mlp_slice(L.gate_up, L.down, L.inter, h, normed, b, tid, nt, t, ranks, shared, gate_up, act, out);
#pragma omp barrier
    }
    if (tid == 0) std::copy(res, res + (size_t)b * h, residual);
  }
  return shared.failed;
}

}  // namespace

extern "C" {

// A whole step of a decoder model: the embedding rows of ids [B], the rope rows of positions [B], every layer, then
// the final norm of out + residual into hidden [B, H] (ends: exports.h's SqModelEnds). The same steps as the
// per-op path (F.embedding, RotaryEmbedding rows, add_rms_norm): the same bits. Under tensor parallel (ranks) a
// split table's rows and the row-parallel linears' products are reduced across the ranks as the per-op path does.
int sq_decoder_model(const SqDecoderLayer* const* layers, int num_layers, void* const* k_caches,
                     void* const* v_caches, const SqStep* step, const SqModelEnds* ends, const SqRanks* ranks,
                     const int64_t* ids, const int64_t* positions, float* hidden) {
  if (num_layers <= 0) return 0;
  const int h = layers[0]->hidden, batch = step->batch, rope_dim = ends->rope_dim;
  thread_local std::vector<float> x_buf, res_buf, out_buf, cos_buf, sin_buf;
  float* x = scratch(x_buf, (size_t)batch * h);
  float* residual = scratch(res_buf, (size_t)batch * h);
  float* out = scratch(out_buf, (size_t)batch * h);
  float *cos = nullptr, *sin = nullptr;
  for (int i = 0; i < batch; ++i) {
    float* row = x + (size_t)i * h;
    const int64_t id = ids[i] - ends->vocab_start;  // the row in this rank's part of the table
    if (id < 0 || id >= ends->vocab_rows) {
      std::fill(row, row + h, 0.0f);  // another rank's row
    } else if (ends->embed_bf16) {
      const uint16_t* e = static_cast<const uint16_t*>(ends->embed) + (size_t)id * h;
      for (int j = 0; j < h; ++j) {
        const uint32_t bits = static_cast<uint32_t>(e[j]) << 16;
        std::memcpy(row + j, &bits, 4);
      }
    } else {
      std::memcpy(row, static_cast<const float*>(ends->embed) + (size_t)id * h, sizeof(float) * h);
    }
  }
  int failed = 0;
  if (ends->vocab_split) reduce(ranks, kSumDisjoint, x, (int64_t)batch * h, failed);
  if (ends->cos_table) {
    cos = scratch(cos_buf, (size_t)batch * rope_dim);
    sin = scratch(sin_buf, (size_t)batch * rope_dim);
    for (int i = 0; i < batch; ++i) {
      const size_t row = (size_t)positions[i] * rope_dim;
      std::memcpy(cos + (size_t)i * rope_dim, ends->cos_table + row, sizeof(float) * rope_dim);
      std::memcpy(sin + (size_t)i * rope_dim, ends->sin_table + row, sizeof(float) * rope_dim);
    }
  }
  if (failed) return failed;  // the step's numbers are void: no more reductions (each would wait for the ranks)
  sq::with_cache_type(step->kv_type, [&](auto element) {
    using C = decltype(element);
    failed |= decoder_stack(layers, reinterpret_cast<C* const*>(k_caches), reinterpret_cast<C* const*>(v_caches),
                            num_layers, *step, ranks, x, residual, out, cos, sin, rope_dim);
  });
  for (int i = 0; i < batch; ++i)
    sq::norm_row(out + (size_t)i * h, residual + (size_t)i * h, h, ends->norm_w, ends->norm_b, ends->eps,
                 residual + (size_t)i * h, hidden + (size_t)i * h);
  return failed;
}

}  // extern "C"
