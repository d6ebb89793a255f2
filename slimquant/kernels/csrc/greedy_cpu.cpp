// The greedy head (slimquant/backends/greedy_screen.py, whose `screen_reference` defines the screen): the argmax of
// each token's logits x W^T without reading most of the bf16 head W, screened by an int8 copy of it.
//
// Each token row x is held as s_x * p with p = round(x / s_x) in 16 bits (|p| <= kPMax), split into two int8
// rows p = 256 * hi + lo that the int8 GEMM multiplies exactly. Logit n is approx = (256 * dot(hi) + dot(lo)) *
// s_x * s_w[n] within bound = ((c0 * s_w[n] + c1 * (s_w[n] * |q|_1[n])) + c2 * |w|_1[n]) * slack of the float
// head's value; a row is a candidate when approx + bound reaches the token's max over rows of approx - bound.
// Those steps repeat the reference's double-precision operations in the same order (built with
// -ffp-contract=off). Candidates get their float logit from bf16_linear_rows, which gives every (row, token)
// the bits of the full head's sq_bf16_linear; the largest wins, the first index on ties (as torch.argmax).
#include "exports.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "cpu_kernels.h"


namespace {

constexpr int kPMax = 127 * 256 + 127;  // both int8 halves of p stay within [-127, 127]
constexpr int kChunk = 1024;  // head rows per parallel work item

struct TokenTerms {
  double s_x, c0, c1, c2;  // scale of p, then the bound's per-token factors
};

// Row x [k] -> hi, lo int8 [k] and its terms; false when x holds a NaN or an infinity.
bool split_row(const float* x, int k, double fp_term, int8_t* hi, int8_t* lo, TokenTerms& terms) {
  float amax = 0.0f;
  for (int j = 0; j < k; ++j) {
    const float a = std::fabs(x[j]);
    if (!std::isfinite(a)) return false;
    amax = std::max(amax, a);
  }
  double l1 = 0.0;
  for (int j = 0; j < k; ++j) l1 += std::fabs(static_cast<double>(x[j]));  // left to right, as the reference
  const double s_x = amax > 0.0f ? static_cast<double>(amax) / kPMax : 1.0;
  for (int j = 0; j < k; ++j) {
    const double p = std::min<double>(kPMax, std::max<double>(-kPMax, std::nearbyint(x[j] / s_x)));
    const int pi = static_cast<int>(p), l = ((pi + 128) % 256 + 256) % 256 - 128;
    lo[j] = static_cast<int8_t>(l);
    hi[j] = static_cast<int8_t>((pi - l) / 256);
  }
  terms = TokenTerms{s_x, l1 / 2, s_x / 2, static_cast<double>(amax) * (fp_term * k)};
  return true;
}

// The head's per-row factors: s_w, |q|_1 and |w|_1 (rounded up), float32 [3, N].
struct RowTerms {
  const float *s_w, *q_l1, *w_l1;
};

inline double approx_at(const int32_t* hi, const int32_t* lo, const TokenTerms& t, const RowTerms& r, int j) {
  return (static_cast<double>(hi[j]) * 256 + lo[j]) * t.s_x * static_cast<double>(r.s_w[j]);
}

inline double bound_at(const TokenTerms& t, const RowTerms& r, int j, double slack) {
  const double s_w = r.s_w[j];
  return ((t.c0 * s_w + t.c1 * (s_w * static_cast<double>(r.q_l1[j]))) + t.c2 * static_cast<double>(r.w_l1[j])) * slack;
}

// approx - bound and approx + bound of rows [j, j + 4): the scalar steps above, four lanes at a time.
inline void bounds4(const int32_t* h, const int32_t* l, const TokenTerms& t, const RowTerms& r, int j, double slack,
                    __m256d& lower, __m256d& upper) {
  const __m256d hi = _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + j)));
  const __m256d lo = _mm256_cvtepi32_pd(_mm_loadu_si128(reinterpret_cast<const __m128i*>(l + j)));
  const __m256d s_w = _mm256_cvtps_pd(_mm_loadu_ps(r.s_w + j));
  const __m256d q_l1 = _mm256_cvtps_pd(_mm_loadu_ps(r.q_l1 + j));
  const __m256d w_l1 = _mm256_cvtps_pd(_mm_loadu_ps(r.w_l1 + j));
  const __m256d dot = _mm256_add_pd(_mm256_mul_pd(hi, _mm256_set1_pd(256)), lo);
  const __m256d approx = _mm256_mul_pd(_mm256_mul_pd(dot, _mm256_set1_pd(t.s_x)), s_w);
  const __m256d first = _mm256_add_pd(_mm256_mul_pd(_mm256_set1_pd(t.c0), s_w),
                                      _mm256_mul_pd(_mm256_set1_pd(t.c1), _mm256_mul_pd(s_w, q_l1)));
  const __m256d bound = _mm256_mul_pd(_mm256_add_pd(first, _mm256_mul_pd(_mm256_set1_pd(t.c2), w_l1)),
                                      _mm256_set1_pd(slack));
  lower = _mm256_sub_pd(approx, bound);
  upper = _mm256_add_pd(approx, bound);
}

// Token i's best lower bound over rows [j0, j1), folded into m; and the rows' largest upper bound (a chunk whose
// largest upper bound is below the token's floor holds no candidate, and its second pass is skipped).
double floor_of(const int32_t* h, const int32_t* l, const TokenTerms& t, const RowTerms& r, int j0, int j1,
                double slack, double m, double& top) {
  __m256d best = _mm256_set1_pd(m), most = _mm256_set1_pd(-INFINITY), lower, upper;
  int j = j0;
  for (; j + 4 <= j1; j += 4) {
    bounds4(h, l, t, r, j, slack, lower, upper);
    best = _mm256_max_pd(best, lower);
    most = _mm256_max_pd(most, upper);
  }
  alignas(32) double lanes[4], tops[4];
  _mm256_store_pd(lanes, best);
  _mm256_store_pd(tops, most);
  top = -INFINITY;
  for (int u = 0; u < 4; ++u) m = std::max(m, lanes[u]), top = std::max(top, tops[u]);
  for (; j < j1; ++j) {
    const double approx = approx_at(h, l, t, r, j), bound = bound_at(t, r, j, slack);
    m = std::max(m, approx - bound), top = std::max(top, approx + bound);
  }
  return m;
}

// The screen of T token rows: their terms and the exact int8 dot products of their hi and lo halves with every
// row of the int8 copy (the bound's per-row factors in r).
struct Screen {
  int t = 0, n = 0;
  std::vector<TokenTerms> terms;
  int32_t* dots = nullptr;  // [2T, N]: the hi rows, then the lo rows
  RowTerms r{};
  const int32_t* hi(int i) const { return dots + (size_t)i * n; }
  const int32_t* lo(int i) const { return dots + (size_t)(t + i) * n; }
};

// Split and multiply x [T, K] (row stride ldx) against wq [N, Kp]; false when x holds a NaN or an infinity.
bool screen(const float* x, int t, int k, int ldx, const int8_t* wq, int n, int kp, const float* rows,
            double fp_term, Screen& s) {
  std::vector<int8_t> halves((size_t)2 * t * k);  // [2T, K]: hi rows, then lo rows
  s.t = t, s.n = n, s.terms.resize(t);
  for (int i = 0; i < t; ++i)
    if (!split_row(x + (size_t)i * ldx, k, fp_term, &halves[(size_t)i * k], &halves[(size_t)(t + i) * k], s.terms[i]))
      return false;
  thread_local std::vector<int32_t> acc;  // [2T, N], exact; kept between calls (no page faults per step)
  if (acc.size() < (size_t)2 * t * n) acc.resize((size_t)2 * t * n);
  s.dots = acc.data();  // a plain pointer: inside a parallel region `acc` would be each thread's own
  sq_int8_gemm(halves.data(), 2 * t, k, k, wq, n, kp, s.dots);
  s.r = RowTerms{rows, rows + n, rows + 2 * (size_t)n};
  return true;
}

// Row j's logit for token row x, with the bits of the full head's (sq_bf16_linear's).
inline float exact_logit(const float* x, int k, int ldx, const uint16_t* w, int j) {
  float logit;
  sq::bf16_linear_rows(x, 1, k, ldx, w + (size_t)j * k, 1, 0, 1, nullptr, &logit);
  return logit;
}

// fn(j, lower, upper) for token i's rows [j0, j1): the bounds of bounds4, four rows at a time, then the scalar
// steps for the rest (the same values).
template <class Fn>
void each_bound(const Screen& sc, int i, int j0, int j1, double slack, const Fn& fn) {
  alignas(32) double lo4[4], up4[4];
  int j = j0;
  for (; j + 4 <= j1; j += 4) {
    __m256d lower, upper;
    bounds4(sc.hi(i), sc.lo(i), sc.terms[i], sc.r, j, slack, lower, upper);
    _mm256_store_pd(lo4, lower);
    _mm256_store_pd(up4, upper);
    for (int u = 0; u < 4; ++u) fn(j + u, lo4[u], up4[u]);
  }
  for (; j < j1; ++j) {
    const double approx = approx_at(sc.hi(i), sc.lo(i), sc.terms[i], sc.r, j);
    const double bound = bound_at(sc.terms[i], sc.r, j, slack);
    fn(j, approx - bound, approx + bound);
  }
}

// The `size` largest values offered, as a min-heap (front: the smallest kept).
struct Largest {
  size_t size;
  std::vector<double> heap;
  void offer(double v) {
    if (heap.size() < size) {
      heap.push_back(v);
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    } else if (v > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<>());
      heap.back() = v;
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
  }
  double floor() const { return heap.size() < size ? -INFINITY : heap.front(); }  // the size-th largest
};

struct Best {
  float logit = -INFINITY;
  int64_t row = -1;
  void offer(float v, int64_t j) {  // the larger logit; on a tie the smaller row
    if (row < 0 || v > logit || (v == logit && j < row)) logit = v, row = j;
  }
};

}  // namespace

extern "C" {

// tokens[t] = argmax over rows of x[t] . w[row] for x fp32 [T, K] (row stride ldx), w bf16 [N, K], screened with
// its int8 copy wq [N, Kp] (int8_ops.pack_weight) and rows float32 [3, N]. Returns 0, or 1 when x is not finite.
int sq_greedy_argmax(const float* x, int t, int k, int ldx, const int8_t* wq, int n, int kp, const float* rows,
                     const uint16_t* w, double slack, double fp_term, int64_t* tokens) {
  Screen sc;
  if (!screen(x, t, k, ldx, wq, n, kp, rows, fp_term, sc)) return 1;
  const int chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> floor(t, -INFINITY);  // per token: the best lower bound
  std::vector<double> tops((size_t)chunks * t);  // [chunks, T]: each chunk's largest upper bound per token
  std::vector<Best> best(t);
#pragma omp parallel
  {
    std::vector<double> mine(t, -INFINITY);
#pragma omp for schedule(static)
    for (int c = 0; c < chunks; ++c)
      for (int i = 0; i < t; ++i)
        mine[i] = floor_of(sc.hi(i), sc.lo(i), sc.terms[i], sc.r, c * kChunk, std::min(n, (c + 1) * kChunk), slack,
                           mine[i], tops[(size_t)c * t + i]);
#pragma omp critical
    for (int i = 0; i < t; ++i) floor[i] = std::max(floor[i], mine[i]);
#pragma omp barrier
    std::vector<Best> found(t);
#pragma omp for schedule(static)
    for (int c = 0; c < chunks; ++c)
      for (int i = 0; i < t; ++i) {
        if (tops[(size_t)c * t + i] < floor[i]) continue;  // no row of the chunk reaches the floor
        each_bound(sc, i, c * kChunk, std::min(n, (c + 1) * kChunk), slack, [&](int j, double, double upper) {
          if (upper >= floor[i]) found[i].offer(exact_logit(x + (size_t)i * ldx, k, ldx, w, j), j);
        });
      }
#pragma omp critical
    for (int i = 0; i < t; ++i)
      if (found[i].row >= 0) best[i].offer(found[i].logit, found[i].row);
  }
  for (int i = 0; i < t; ++i) tokens[i] = best[i].row;
  return 0;
}

// For top-k sampling: every row that can be among each token's top_k largest logits of x[t] W^T (its upper
// bound reaches the top_k-th largest lower bound), with its exact logit (the full head's bits). Token i's
// counts[i] rows, ascending, and logits go to rows_out / logits_out [T, cap]. Returns 0; 1 when x is not finite;
// 2 when a token has more than cap candidates (the caller computes the whole head then).
int sq_topk_screen(const float* x, int t, int k, int ldx, const int8_t* wq, int n, int kp, const float* rows,
                   const uint16_t* w, double slack, double fp_term, int top_k, int cap, int64_t* rows_out,
                   float* logits_out, int32_t* counts) {
  Screen sc;
  if (!screen(x, t, k, ldx, wq, n, kp, rows, fp_term, sc)) return 1;
  const size_t keep = (size_t)std::max(1, std::min(top_k, n));
  const int chunks = (n + kChunk - 1) / kChunk;
  std::vector<Largest> lowest(t, Largest{keep, {}});  // per token: the `keep` largest lower bounds
  std::vector<double> floors(t);
  std::vector<std::vector<std::pair<int64_t, float>>> found(t);
#pragma omp parallel
  {
    std::vector<Largest> mine(t, Largest{keep, {}});
#pragma omp for schedule(static)
    for (int c = 0; c < chunks; ++c)
      for (int i = 0; i < t; ++i)
        each_bound(sc, i, c * kChunk, std::min(n, (c + 1) * kChunk), slack, [&](int, double lower, double) {
          mine[i].offer(lower);
        });
#pragma omp critical
    for (int i = 0; i < t; ++i)
      for (double v : mine[i].heap) lowest[i].offer(v);
#pragma omp barrier
#pragma omp single
    for (int i = 0; i < t; ++i) floors[i] = lowest[i].floor();
    std::vector<std::vector<std::pair<int64_t, float>>> picked(t);
#pragma omp for schedule(static)
    for (int c = 0; c < chunks; ++c)
      for (int i = 0; i < t; ++i)
        each_bound(sc, i, c * kChunk, std::min(n, (c + 1) * kChunk), slack, [&](int j, double, double upper) {
          if (upper >= floors[i]) picked[i].emplace_back(j, exact_logit(x + (size_t)i * ldx, k, ldx, w, j));
        });
#pragma omp critical
    for (int i = 0; i < t; ++i) found[i].insert(found[i].end(), picked[i].begin(), picked[i].end());
  }
  for (int i = 0; i < t; ++i) {
    if (found[i].size() > (size_t)cap) return 2;
    std::sort(found[i].begin(), found[i].end());
    counts[i] = static_cast<int32_t>(found[i].size());
    for (size_t c = 0; c < found[i].size(); ++c) {
      rows_out[(size_t)i * cap + c] = found[i][c].first;
      logits_out[(size_t)i * cap + c] = found[i][c].second;
    }
  }
  return 0;
}

}  // extern "C"
