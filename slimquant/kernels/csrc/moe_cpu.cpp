// A MoE layer's routed W8A8_DYNAMIC experts for one step in one call (DeepSeek, Kimi-K2, Qwen3-MoE). Per local
// expert, in ascending id, the rows of its tokens (in token order) go through the per-op path's kernels in its order:
//   y13 = dynamic linear (gate | up); a = silu(gate) * up; y2 = dynamic linear (down); out = y2 * routing weight,
// and each product lands at its token's slot of out [T, K, H] (0 in the slots of experts held elsewhere), or, summed,
// is added into its token's row of out [T, H] (from 0, in ascending expert id: the sum RoutedExperts makes of the
// slots, with no [T, K, H] held or read back). The same entry points on the same rows: the bits of RoutedExperts'
// expert-by-expert path, without its per-expert Python and torch ops (about a third of a decode step's expert time
// on a 2-core machine).
//
// Under tensor parallel without expert parallel (ranks given) each rank holds `inter` of every expert's
// intermediate rows, and the down projection is split at two reductions, as the per-op path splits it: every
// expert's y13 and SiLU-and-mul first (its rows kept in expert order), then the ranks' MAX of each row's absmax,
// each expert's rows quantized with it and their int32 down products, the ranks' SUM of those, and last the
// dequantization and the routing weight: one process's numbers on every rank.
//
// The routers are here too, in serial pieces that the decoder stack (layer_cpu.cpp) calls as well, so that a MoE layer
// routes alike on both paths: softmax and a greedy top-k, or one limited to the best groups (sq_moe_route: Qwen2-MoE,
// Qwen3-MoE, DeepSeek-V2 and V2-Lite), and sigmoid scores whose bias picks the groups and experts
// (sq_moe_route_biased: DeepSeek-V3, Kimi-K2, GLM-4.5).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "exports.h"

namespace sq {

float dot_fp32(const float* a, const float* b, int n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
  }
  if (j + 8 <= n) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    j += 8;
  }
  float lane[8];
  _mm256_storeu_ps(lane, _mm256_add_ps(acc0, acc1));
  float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

namespace {

// dot_fp32 of four rows a[0..3] with one b (each sum in dot_fp32's order: its bits), b's loads shared; the eight
// accumulators named, so that they stay in registers.
void dot4_fp32(const float* const* a, const float* b, int n, float* out) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 b0 = _mm256_loadu_ps(b + j), b1 = _mm256_loadu_ps(b + j + 8);
    p0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + j), b0, p0);
    q0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + j + 8), b1, q0);
    p1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + j), b0, p1);
    q1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + j + 8), b1, q1);
    p2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + j), b0, p2);
    q2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + j + 8), b1, q2);
    p3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + j), b0, p3);
    q3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + j + 8), b1, q3);
  }
  if (j + 8 <= n) {
    const __m256 b0 = _mm256_loadu_ps(b + j);
    p0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + j), b0, p0);
    p1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + j), b0, p1);
    p2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + j), b0, p2);
    p3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + j), b0, p3);
    j += 8;
  }
  const __m256 sums[4] = {_mm256_add_ps(p0, q0), _mm256_add_ps(p1, q1), _mm256_add_ps(p2, q2), _mm256_add_ps(p3, q3)};
  for (int r = 0; r < 4; ++r) {
    float lane[8];
    _mm256_storeu_ps(lane, sums[r]);
    float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (int i = j; i < n; ++i) sum += a[r][i] * b[i];
    out[r] = sum;
  }
}

}  // namespace

void router_logits(const float* x, int m, int h, int ldx, const float* router, int num_experts, int e0, int e1,
                   float* logits) {
  constexpr int kRows = 32;  // rows per block: they stay in cache while every expert's router row passes by once
  for (int i0 = 0; i0 < m; i0 += kRows) {
    const int i1 = std::min(m, i0 + kRows);
    for (int e = e0; e < e1; ++e) {
      const float* w = router + (size_t)e * h;
      int i = i0;
      for (; i + 4 <= i1; i += 4) {
        const float* rows[4] = {x + (size_t)i * ldx, x + (size_t)(i + 1) * ldx, x + (size_t)(i + 2) * ldx,
                                x + (size_t)(i + 3) * ldx};
        float out[4];
        dot4_fp32(rows, w, h, out);
        for (int r = 0; r < 4; ++r) logits[(size_t)(i + r) * num_experts + e] = out[r];
      }
      for (; i < i1; ++i) logits[(size_t)i * num_experts + e] = dot_fp32(x + (size_t)i * ldx, w, h);
    }
  }
}

// router_logits of t rows into logits [T, E], in parallel: blocks of rows times slices of the experts (decode's one
// row too is split among the threads).
void router_logits_parallel(const float* x, int t, int h, int ldx, const float* router, int num_experts,
                            float* logits) {
  constexpr int kRows = 32;
  const int blocks = (t + kRows - 1) / kRows, parts = std::max(1, omp_get_max_threads());
#pragma omp parallel for schedule(static)
  for (int it = 0; it < blocks * parts; ++it) {
    const int i0 = it / parts * kRows;
    int e0, e1;
    slice(num_experts, it % parts, parts, e0, e1);
    router_logits(x + (size_t)i0 * ldx, std::min(kRows, t - i0), h, ldx, router, num_experts, e0, e1,
                  logits + (size_t)i0 * num_experts);
  }
}

namespace {

// allowed [G]: 1 for the topk groups of the largest score [G] (the first of equal scores), else 0.
void best_groups(const float* score, int n_group, int topk, std::vector<char>& allowed) {
  allowed.assign(n_group, 0);
  for (int s = 0; s < topk; ++s) {
    int best = -1;
    for (int g = 0; g < n_group; ++g)
      if (!allowed[g] && (best < 0 || score[g] > score[best])) best = g;
    allowed[best] = 1;
  }
}

// The top_k largest of rank [N] (where allowed, by group of per_group: null, all), ties to the lower index, into
// ids [K]; weights [K] their values in weigh, divided by their sum (+ 1e-20) where renormalize, times scaling.
void pick_top_k(const float* rank, const float* weigh, int n, const char* allowed, int per_group, int top_k,
                int renormalize, float scaling, int64_t* ids, float* weights) {
  thread_local std::vector<char> taken;
  taken.assign(n, 0);
  float chosen = 0.0f;
  for (int s = 0; s < top_k; ++s) {
    int best = -1;
    for (int e = 0; e < n; ++e)
      if ((!allowed || allowed[e / per_group]) && !taken[e] && (best < 0 || rank[e] > rank[best])) best = e;
    taken[best] = 1;
    ids[s] = best;
    chosen += (weights[s] = weigh[best]);
  }
  for (int s = 0; s < top_k; ++s) {
    if (renormalize) weights[s] = weights[s] / (chosen + 1e-20f);
    weights[s] *= scaling;
  }
}

}  // namespace

float shared_gate(const float* x, const float* w, int h) { return 1.0f / (1.0f + std::exp(-dot_fp32(x, w, h))); }

void route_row(const float* logits, int num_experts, int n_group, int topk_group, int top_k, int renormalize,
               float scaling, int64_t* ids, float* weights) {
  thread_local std::vector<float> p, group_score;
  thread_local std::vector<char> allowed;
  p.resize(num_experts);
  float top = -INFINITY, sum = 0.0f;
  for (int e = 0; e < num_experts; ++e) top = std::max(top, logits[e]);
  for (int e = 0; e < num_experts; ++e) sum += (p[e] = std::exp(logits[e] - top));
  for (int e = 0; e < num_experts; ++e) p[e] /= sum;
  if (topk_group >= n_group) {
    pick_top_k(p.data(), p.data(), num_experts, nullptr, 1, top_k, renormalize, scaling, ids, weights);
    return;
  }
  const int per_group = num_experts / n_group;
  group_score.resize(n_group);
  for (int g = 0; g < n_group; ++g)  // a group's score: its best expert's
    group_score[g] = *std::max_element(p.data() + (size_t)g * per_group, p.data() + (size_t)(g + 1) * per_group);
  best_groups(group_score.data(), n_group, topk_group, allowed);
  pick_top_k(p.data(), p.data(), num_experts, allowed.data(), per_group, top_k, renormalize, scaling, ids, weights);
}

void route_row_biased(const float* logits, int num_experts, const float* bias, int n_group, int topk_group,
                      int top_k, int renormalize, float scaling, int64_t* ids, float* weights) {
  thread_local std::vector<float> score, choice, group_score;
  thread_local std::vector<char> allowed;
  score.resize(num_experts);
  choice.resize(num_experts);
  group_score.resize(n_group);
  const int per_group = num_experts / n_group;
  for (int e = 0; e < num_experts; ++e) {
    score[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    choice[e] = score[e] + bias[e];  // the bias picks experts, never weighs them
  }
  for (int g = 0; g < n_group; ++g) {  // a group's score: the sum of its two best choices
    const float* c = &choice[(size_t)g * per_group];
    float best = -INFINITY, second = -INFINITY;
    for (int j = 0; j < per_group; ++j) {
      if (c[j] > best) second = best, best = c[j];
      else if (c[j] > second) second = c[j];
    }
    group_score[g] = per_group > 1 ? best + second : best;
  }
  best_groups(group_score.data(), n_group, topk_group, allowed);
  pick_top_k(choice.data(), score.data(), num_experts, allowed.data(), per_group, top_k, renormalize, scaling, ids,
             weights);
}

void scales_fp32_range(const void* scales, int bf16, int64_t row, int n, int j0, int j1, float* out) {
  if (!bf16) {
    std::memcpy(out + j0, static_cast<const float*>(scales) + row * n + j0, sizeof(float) * (j1 - j0));
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(scales) + row * n;
  for (int j = j0; j < j1; ++j) {
    const uint32_t bits = (uint32_t)s[j] << 16;  // bf16 -> fp32 is exact
    std::memcpy(&out[j], &bits, sizeof(float));
  }
}

void sort_slots(const int64_t* ids, int slots, int first, int num_experts, std::vector<int>& order,
                std::vector<int>& begin) {
  begin.assign(num_experts + 1, 0);
  for (int i = 0; i < slots; ++i)
    if (ids[i] >= first && ids[i] < first + num_experts) ++begin[ids[i] - first + 1];
  for (int e = 0; e < num_experts; ++e) begin[e + 1] += begin[e];
  order.resize(begin[num_experts]);
  std::vector<int> next(begin.begin(), begin.end() - 1);
  for (int i = 0; i < slots; ++i)
    if (ids[i] >= first && ids[i] < first + num_experts) order[next[ids[i] - first]++] = i;
}

void write_weighted(const float* y, int n, int h, int c0, int c1, const int* slots, const float* weights, int k,
                    int summed, float* out) {
  for (int r = 0; r < n; ++r) {
    const float w = weights[slots[r]];
    const float* yr = y + (size_t)r * h;
    if (summed) {
      float* o = out + (size_t)(slots[r] / k) * h;
      for (int j = c0; j < c1; ++j) o[j] += yr[j] * w;
    } else {
      float* o = out + (size_t)slots[r] * h;
      for (int j = c0; j < c1; ++j) o[j] = yr[j] * w;
    }
  }
}

}  // namespace sq

namespace {

// Row of n scales as fp32 (see scales_fp32_range).
void scales_fp32(const void* scales, int bf16, int64_t row, int n, std::vector<float>& out) {
  out.resize(n);
  sq::scales_fp32_range(scales, bf16, row, n, 0, n, out.data());
}

// One call's scratch, reused from expert to expert and freed at the end (a long prefill's rows are not kept).
struct ExpertScratch {
  std::vector<float> x, y13, act, y2, s13, s2;
};

// act [n, I] = silu(gate) * up of local expert e on the token rows of its n slots (x fp32 [T, H] at row stride ldx).
void expert_activation(const float* x, int h, int ldx, int k, const int* slots, int n, int e, int inter,
                       const int8_t* w13, int kp13, const void* s13, int scales_bf16, ExpertScratch& s, float* act) {
  s.x.resize((size_t)n * h);
  for (int r = 0; r < n; ++r) std::memcpy(&s.x[(size_t)r * h], x + (size_t)(slots[r] / k) * ldx, sizeof(float) * h);
  scales_fp32(s13, scales_bf16, e, 2 * inter, s.s13);
  s.y13.resize((size_t)n * 2 * inter);
  sq_dynamic_linear(s.x.data(), n, h, h, w13 + (size_t)e * 2 * inter * kp13, 2 * inter, kp13, s.s13.data(),
                    nullptr, s.y13.data());
  sq_silu_and_mul(s.y13.data(), n, inter, 2 * inter, act);
}

// acc int32 [M, N] = x @ w^T, the output columns shared by the team.
void int32_products(const int8_t* w, const sq::QuantizedX& x, int m, int n, int32_t* acc) {
#pragma omp parallel
  {
    int n0, n1;
    sq::slice(n, omp_get_thread_num(), omp_get_num_threads(), n0, n1);
    if (n0 < n1) sq::int32_rows(w, x, m, n, n0, n1, acc);
  }
}

// y [M, N] = (acc * scales) * w_scale, the columns shared by the team.
void dynamic_epilogue(const int32_t* acc, int m, int n, const float* scales, const float* w_scale, float* y) {
#pragma omp parallel
  {
    int n0, n1;
    sq::slice(n, omp_get_thread_num(), omp_get_num_threads(), n0, n1);
    if (n0 < n1) sq::dynamic_epilogue_rows(acc, m, n, n0, n1, scales, w_scale, nullptr, y);
  }
}

// Each expert split over the ranks (see the top), its slots sorted by sort_slots: 0, or 1 when a reduction failed
// (out then holds no numbers).
int split_experts(const float* x, int h, int ldx, const float* weights, int k, const std::vector<int>& order,
                  const std::vector<int>& begin, int inter, const int8_t* w13, int kp13, const int8_t* w2, int kp2,
                  const void* s13, const void* s2, int scales_bf16, const SqRanks* ranks, int summed, float* out) {
  const int num_experts = (int)begin.size() - 1, rows = (int)order.size();
  std::vector<float> act((size_t)rows * inter), absmax(rows), scales(rows);  // in expert order
  ExpertScratch s;
  for (int e = 0; e < num_experts; ++e) {
    const int b = begin[e], n = begin[e + 1] - b;
    if (n > 0) expert_activation(x, h, ldx, k, &order[b], n, e, inter, w13, kp13, s13, scales_bf16, s,
                                 &act[(size_t)b * inter]);
  }
  int failed = 0;
  sq::abs_max_rows(act.data(), rows, inter, inter, absmax.data());
  sq::reduce(ranks, sq::kMaxFloat, absmax.data(), rows, failed);
  if (failed) return 1;
  std::vector<int32_t> acc((size_t)rows * h);
  sq::QuantizedX xq;
  for (int e = 0; e < num_experts; ++e) {
    const int b = begin[e], n = begin[e + 1] - b;
    if (n == 0) continue;
    xq.reset(n, inter, kp2);
    sq::quantize_dynamic_rows_at(&act[(size_t)b * inter], n, inter, inter, &absmax[b], xq, &scales[b]);
    int32_products(w2 + (size_t)e * h * kp2, xq, n, h, &acc[(size_t)b * h]);
  }
  sq::reduce(ranks, sq::kSumInt32, acc.data(), (int64_t)rows * h, failed);
  if (failed) return 1;
  for (int e = 0; e < num_experts; ++e) {
    const int b = begin[e], n = begin[e + 1] - b;
    if (n == 0) continue;
    scales_fp32(s2, scales_bf16, e, h, s.s2);
    s.y2.resize((size_t)n * h);
    dynamic_epilogue(&acc[(size_t)b * h], n, h, &scales[b], s.s2.data(), s.y2.data());
    sq::write_weighted(s.y2.data(), n, h, 0, h, &order[b], weights, k, summed, out);
  }
  return 0;
}

}  // namespace

namespace {

// logits [T, E] as given (BLAS's, for many rows), or router_logits' into buf.
const float* logits_of(const float* x, int t, int h, int ldx, const float* router, int num_experts, const float* given,
                       std::vector<float>& buf) {
  if (given) return given;
  buf.resize((size_t)t * num_experts);
  sq::router_logits_parallel(x, t, h, ldx, router, num_experts, buf.data());
  return buf.data();
}

}  // namespace

void sq_moe_route(const float* x, int t, int h, int ldx, const float* router, int num_experts, const float* logits,
                  int n_group, int topk_group, int top_k, int renormalize, float scaling, int64_t* ids,
                  float* weights) {
  std::vector<float> buf;
  const float* z = logits_of(x, t, h, ldx, router, num_experts, logits, buf);  // [T, E]
#pragma omp parallel for schedule(static)
  for (int i = 0; i < t; ++i)
    sq::route_row(z + (size_t)i * num_experts, num_experts, n_group, topk_group, top_k, renormalize, scaling,
                  ids + (size_t)i * top_k, weights + (size_t)i * top_k);
}

int sq_routed_experts(const float* x, int t, int h, int ldx, const int64_t* ids, const float* weights, int k,
                      int first, int num_local, int inter, const int8_t* w13, int kp13, const int8_t* w2, int kp2,
                      const void* s13, const void* s2, int scales_bf16, const SqRanks* ranks, int summed,
                      float* out) {
  std::memset(out, 0, sizeof(float) * (size_t)t * (summed ? 1 : k) * h);
  std::vector<int> order, begin;
  sq::sort_slots(ids, t * k, first, num_local, order, begin);
  if (ranks != nullptr)
    return split_experts(x, h, ldx, weights, k, order, begin, inter, w13, kp13, w2, kp2, s13, s2, scales_bf16,
                         ranks, summed, out);
  ExpertScratch s;
  for (int e = 0; e < num_local; ++e) {
    const int b = begin[e], n = begin[e + 1] - b;
    if (n == 0) continue;
    s.act.resize((size_t)n * inter);
    expert_activation(x, h, ldx, k, &order[b], n, e, inter, w13, kp13, s13, scales_bf16, s, s.act.data());
    scales_fp32(s2, scales_bf16, e, h, s.s2);
    s.y2.resize((size_t)n * h);
    sq_dynamic_linear(s.act.data(), n, inter, inter, w2 + (size_t)e * h * kp2, h, kp2, s.s2.data(), nullptr,
                      s.y2.data());
    sq::write_weighted(s.y2.data(), n, h, 0, h, &order[b], weights, k, summed, out);
  }
  return 0;
}

void sq_moe_route_biased(const float* x, int t, int h, int ldx, const float* router, int num_experts,
                         const float* logits, const float* bias, int n_group, int topk_group, int top_k,
                         int renormalize, float scaling, int64_t* ids, float* weights) {
  std::vector<float> buf;
  const float* z = logits_of(x, t, h, ldx, router, num_experts, logits, buf);  // [T, E]
#pragma omp parallel for schedule(static)
  for (int i = 0; i < t; ++i)
    sq::route_row_biased(z + (size_t)i * num_experts, num_experts, bias, n_group, topk_group, top_k, renormalize,
                         scaling, ids + (size_t)i * top_k, weights + (size_t)i * top_k);
}

void sq_shared_gate(const float* x, int t, int h, int ldx, const float* w, float* out) {
  for (int i = 0; i < t; ++i) out[i] = sq::shared_gate(x + (size_t)i * ldx, w, h);
}
