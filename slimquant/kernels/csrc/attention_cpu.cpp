// Decode-step attention over a paged KV cache, with rotary embedding and the cache write fused: one call per
// layer instead of a dozen small torch ops. fp32 throughout; built with -ffp-contract=off so the rotation
// rounds exactly like torch's x * cos + rotate_half(x) * sin. DeepSeek's absorbed MLA decode runs the same
// kernel (one kv head for every query head, its value the latent part of the row), and its two products by
// kv_b_proj's halves run the kernel's two halves per head (sq_head_matmul).
//
// q [B, NH, D] at row stride ldq (elements per token), k / v [B, KVH, D] at ldk / ldv; caches [slots, KVH, D],
// fp32 or bf16 (stored rounded to nearest even, as torch's .to(torch.bfloat16), and read back exactly widened)
// or int8 (stored clamp(round(x * inv + offset)) per channel, as format.primitives.quantize_kv, and read back as
// (q - offset) * scale: the scale is folded into the query for k and into the output for v);
// the rows' slots, block tables and context lengths in an SqStep (exports.h); cos / sin [B, D] or null (no rope).
#include "exports.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace {

// out[i] = x[i] * cos[i] + (-x[i + h]) * sin[i]; out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h], for i
// from `from` (the rest of a row whose start was rotated 8 lanes at a time) to h = d / 2.
void rope_neox(const float* x, const float* cos, const float* sin, int d, float* out, int from = 0) {
  const int h = d / 2;
  for (int i = from; i < h; ++i) {
    const float a = x[i] * cos[i], b = -x[i + h] * sin[i];
    const float c = x[i + h] * cos[i + h], e = x[i] * sin[i + h];
    out[i] = a + b;
    out[i + h] = c + e;
  }
}

// x [D] rotated on its first r values by cos / sin [r] (rope_neox within them), the rest copied: rope on part of a
// head (partial rotary, GLM-4.5), or on all of it where r = D.
void rope_part(const float* x, const float* cos, const float* sin, int r, int d, float* out) {
  rope_neox(x, cos, sin, r, out);
  std::copy(x + r, x + d, out + r);
}

// A cached row's values as fp32: fp32 rows as they are, bf16 rows (uint16_t) widened exactly.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float load1(float x) { return x; }
inline float load1(int8_t x) { return static_cast<float>(x); }
inline float load1(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// fp32 -> bf16 rounded to nearest even, NaN kept a (quiet) NaN: torch's c10::BFloat16 conversion.
inline uint16_t to_bf16(float x) {
  if (std::isnan(x)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
inline void store_row(const float* x, int d, float* out) { std::copy(x, x + d, out); }
inline void store_row(const float* x, int d, uint16_t* out) {
  for (int i = 0; i < d; ++i) out[i] = to_bf16(x[i]);
}
// clamp(round(x * inv + offset)), rounded half to even (the default rounding mode), in two roundings as torch.
inline void store_row(const float* x, int d, int8_t* out, const float* inv, const float* offset) {
  for (int i = 0; i < d; ++i) {
    const float y = std::nearbyint(x[i] * inv[i] + offset[i]);
    out[i] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, y)));
  }
}

template <class C>
inline float dot(const float* a, const C* b, int d) {
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float r = _mm_cvtss_f32(s);
  for (; i < d; ++i) r += a[i] * load1(b[i]);
  return r;
}

template <class C>
inline void axpy(float w, const C* x, float* y, int d) {
  const __m256 wv = _mm256_set1_ps(w);
  int i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += w * load1(x[i]);
}

// Lane j = the sum of the 8 lanes of v[j].
inline __m256 hsum8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [sums 0-3 | sums 4-7], lane halves
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Lane j = q . rows[j] over d (a multiple of 8): 8 dot products reduced together.
template <class C>
inline __m256 dot8(const float* q, const C* const* rows, int d) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int i = 0; i < d; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(rows[j] + i), acc[j]);
  }
  return hsum8(acc);
}

constexpr int kAhead = 16;  // cached rows are prefetched this many positions ahead (blocks are scattered)

template <class C>
inline void prefetch_row(const C* row, int d) {
  for (int i = 0; i < d; i += 64 / sizeof(C)) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
}

// o[j][c, c + 8W) += sum over t in [t0, t1) of p[j][t] * v_t[c, c + 8W) for the G heads of a group (p: [G, n]),
// the sums in registers, each lane in the order of t (as axpy's); every v row chunk is loaded once for all heads.
template <int G, int W, class C>
inline void group_weighted_sum(const float* p, int n, int t0, int t1, const C* const* v_rows, int c, int d,
                               float* o) {
  __m256 acc[G][W];
  for (int j = 0; j < G; ++j)
    for (int u = 0; u < W; ++u) acc[j][u] = _mm256_loadu_ps(o + (size_t)j * d + c + 8 * u);
  for (int t = t0; t < t1; ++t) {
    if (t + kAhead < t1) _mm_prefetch(reinterpret_cast<const char*>(v_rows[t + kAhead] + c), _MM_HINT_T0);
    __m256 v[W];
    for (int u = 0; u < W; ++u) v[u] = load8(v_rows[t] + c + 8 * u);
    for (int j = 0; j < G; ++j) {
      const __m256 pv = _mm256_set1_ps(p[(size_t)j * n + t]);
      for (int u = 0; u < W; ++u) acc[j][u] = _mm256_fmadd_ps(pv, v[u], acc[j][u]);
    }
  }
  for (int j = 0; j < G; ++j)
    for (int u = 0; u < W; ++u) _mm256_storeu_ps(o + (size_t)j * d + c + 8 * u, acc[j][u]);
}

#ifdef SQ_AVX512VNNI
constexpr int kAccumulators = 24;  // of AVX-512's 32 vector registers (AVX-512 VL gives 256-bit code all 32)
#else
constexpr int kAccumulators = 12;  // of AVX2's 16
#endif

// Column chunk width, in vectors of 8, for G heads: the widest power of two up to 8 with at most kAccumulators.
constexpr int chunk_width(int g) {
  int w = 8;
  while (w > 1 && g * w > kAccumulators) w /= 2;
  return w;
}

// All heads of a group over rows [t0, t1), in column chunks of chunk_width(G) vectors (d a multiple of 8).
template <int G, class C>
void group_weighted_sums(const float* p, int n, int t0, int t1, const C* const* v_rows, int d, float* o) {
  constexpr int W = chunk_width(G);
  int c = 0;
  for (; c + 8 * W <= d; c += 8 * W) group_weighted_sum<G, W, C>(p, n, t0, t1, v_rows, c, d, o);
  for (; c < d; c += 8) group_weighted_sum<G, 1, C>(p, n, t0, t1, v_rows, c, d, o);
}

// Rows per pass of the weighted sums: a pass's value rows stay in L2 while every head's column chunks read them.
constexpr int kRowsPerPass = 256;

// o [heads, d] = (sum over t of p[j][t] * v_t) * inv[j] (p: [heads, n]; d a multiple of 8): eight heads at a time,
// rows in passes of kRowsPerPass; each lane still sums in the order of t (the fp32 sums are stored between
// passes), so a head's numbers do not depend on the heads beside it.
template <class C>
void weighted_sums(const float* p, int n, const C* const* v_rows, int d, int heads, const float* inv, float* o) {
  std::fill(o, o + (size_t)heads * d, 0.0f);
  for (int t0 = 0; t0 < n; t0 += kRowsPerPass) {
    const int t1 = std::min(n, t0 + kRowsPerPass);
    int j = 0;
    for (; j + 8 <= heads; j += 8)
      group_weighted_sums<8, C>(p + (size_t)j * n, n, t0, t1, v_rows, d, o + (size_t)j * d);
    const float* pj = p + (size_t)j * n;
    float* oj = o + (size_t)j * d;
    switch (heads - j) {  // the rest of the heads together
      case 1: group_weighted_sums<1, C>(pj, n, t0, t1, v_rows, d, oj); break;
      case 2: group_weighted_sums<2, C>(pj, n, t0, t1, v_rows, d, oj); break;
      case 3: group_weighted_sums<3, C>(pj, n, t0, t1, v_rows, d, oj); break;
      case 4: group_weighted_sums<4, C>(pj, n, t0, t1, v_rows, d, oj); break;
      case 5: group_weighted_sums<5, C>(pj, n, t0, t1, v_rows, d, oj); break;
      case 6: group_weighted_sums<6, C>(pj, n, t0, t1, v_rows, d, oj); break;
      case 7: group_weighted_sums<7, C>(pj, n, t0, t1, v_rows, d, oj); break;
    }
  }
  for (int j = 0; j < heads; ++j)
    for (int i = 0; i < d; ++i) o[(size_t)j * d + i] *= inv[j];
}

// scores [heads, n] = (q_j . k_t - shift[j]) * scale (shift null: none), q [heads, d], d a multiple of 8: eight
// rows at a time, multiplied by every head while they are in L1; rows of another type than fp32 are widened once
// per eight rows for all the heads where four or more read them (exactly, so the same sums; for fewer heads the
// widening cost more than it saved).
template <class C>
void score_rows(const float* q, const C* const* k_rows, int n, int d, int heads, const float* shift, float scale,
                float* scores) {
  thread_local std::vector<float> wide;  // [8, d]: eight rows widened
  const bool widen = !std::is_same_v<C, float> && heads >= 4;
  if (widen && wide.size() < (size_t)8 * d) wide.resize((size_t)8 * d);
  const float* rows[8];  // the widened rows
  for (int r = 0; r < 8 && widen; ++r) rows[r] = &wide[(size_t)r * d];
  int t = 0;
  for (; t + 8 <= n; t += 8) {
    for (int i = t + kAhead; i < std::min(n, t + kAhead + 8); ++i) prefetch_row(k_rows[i], d);
    for (int r = 0; r < 8 && widen; ++r)
      for (int i = 0; i < d; i += 8) _mm256_storeu_ps(&wide[(size_t)r * d + i], load8(k_rows[t + r] + i));
    for (int j = 0; j < heads; ++j) {
      __m256 s8 = widen ? dot8(q + (size_t)j * d, rows, d) : dot8(q + (size_t)j * d, &k_rows[t], d);
      if (shift) s8 = _mm256_sub_ps(s8, _mm256_set1_ps(shift[j]));
      _mm256_storeu_ps(&scores[(size_t)j * n + t], _mm256_mul_ps(s8, _mm256_set1_ps(scale)));
    }
  }
  for (; t < n; ++t)
    for (int j = 0; j < heads; ++j) {
      float s1 = dot(q + (size_t)j * d, k_rows[t], d);
      if (shift) s1 -= shift[j];
      scores[(size_t)j * n + t] = s1 * scale;
    }
}

// scores [n] -> their unnormalized softmax weights e^(s - max), in place; returns 1 / their sum (0 if n is 0).
float softmax_weights(float* scores, int n) {
  float top = -INFINITY;
  for (int t = 0; t < n; ++t) top = std::max(top, scores[t]);
  int t = 0;
  for (; t + 8 <= n; t += 8)
    _mm256_storeu_ps(&scores[t], sq::exp8(_mm256_sub_ps(_mm256_loadu_ps(&scores[t]), _mm256_set1_ps(top))));
  for (; t < n; ++t) scores[t] = std::exp(scores[t] - top);
  float total = 0.0f;
  for (t = 0; t < n; ++t) total += scores[t];
  return n > 0 ? 1.0f / total : 0.0f;
}

}  // namespace

namespace sq {

template <class C>
void kv_store(const float* k, int ldk, const float* v, int ldv, const float* cos, const float* sin, int rope_dim,
              C* k_cache, C* v_cache, const int64_t* slots, int num_kv_heads, int head_dim, int b, int h,
              const SqKvQuant* kq) {
  if (slots[b] < 0) return;
  thread_local std::vector<float> rotated;
  const int d = head_dim;
  const size_t at = ((size_t)slots[b] * num_kv_heads + h) * d;
  const float* kn = k + (size_t)b * ldk + (size_t)h * d;
  if (cos) {
    if (rotated.size() < (size_t)d) rotated.resize(d);
    rope_part(kn, cos + (size_t)b * rope_dim, sin + (size_t)b * rope_dim, rope_dim, d, rotated.data());
    kn = rotated.data();
  }
  const float* vn = v + (size_t)b * ldv + (size_t)h * d;
  if constexpr (std::is_same_v<C, int8_t>) {
    const size_t c = (size_t)h * d;  // this kv head's channels
    store_row(kn, d, k_cache + at, kq->k_inv + c, kq->k_offset + c);
    store_row(vn, d, v_cache + at, kq->v_inv + c, kq->v_offset + c);
  } else {
    store_row(kn, d, k_cache + at);
    store_row(vn, d, v_cache + at);
  }
}

template <class C>
void attend_group(const float* q, int ldq, const float* cos, const float* sin, int rope_dim, const C* k_cache,
                  const C* v_cache, const int32_t* block_tables, int max_blocks, const int32_t* context_lens,
                  int block_size, int num_heads, int num_kv_heads, int head_dim, int value_dim, float scale, int b,
                  int g, int j0, int j1, const SqKvQuant* kq, float* out) {
  constexpr bool int8 = std::is_same_v<C, int8_t>;
  thread_local std::vector<float> qr, scores, inv, shift;  // per-thread scratch, grown: [G, D], [G, n], [G], [G]
  thread_local std::vector<const C*> k_rows, v_rows;
  const int d = head_dim, dv = value_dim, n = context_lens[b], heads = j1 - j0;
  const int h0 = g * (num_heads / num_kv_heads) + j0;
  if (qr.size() < (size_t)heads * d) qr.resize((size_t)heads * d);
  if (scores.size() < (size_t)heads * n) scores.resize((size_t)heads * n);
  if (k_rows.size() < (size_t)n) k_rows.resize(n), v_rows.resize(n);
  if (inv.size() < (size_t)heads) inv.resize(heads), shift.resize(heads);
  for (int j = 0; j < heads; ++j) {  // the group's query heads, rotated
    const float* qh = q + (size_t)b * ldq + (size_t)(h0 + j) * d;
    if (cos) rope_part(qh, cos + (size_t)b * rope_dim, sin + (size_t)b * rope_dim, rope_dim, d, &qr[(size_t)j * d]);
    else std::copy(qh, qh + d, qr.begin() + (size_t)j * d);
  }
  if constexpr (int8) {  // q . ((k_q - offset) * scale) = (q * scale) . k_q - (q * scale) . offset
    const float *ks = kq->k_scale + (size_t)g * d, *ko = kq->k_offset + (size_t)g * d;
    for (int j = 0; j < heads; ++j) {
      float* qj = &qr[(size_t)j * d];
      float sum = 0.0f;
      for (int i = 0; i < d; ++i) qj[i] *= ks[i], sum += qj[i] * ko[i];
      shift[j] = sum;
    }
  }
  for (int t = 0; t < n;) {  // each position's cached k / v row of kv head g, block by block
    const size_t block = (size_t)block_tables[(size_t)b * max_blocks + t / block_size] * block_size;
    for (int off = 0; off < block_size && t < n; ++off, ++t) {
      const size_t at = ((block + off) * num_kv_heads + g) * d;
      k_rows[t] = k_cache + at, v_rows[t] = v_cache + at;
    }
  }
  if (d % 8 == 0) score_rows(qr.data(), k_rows.data(), n, d, heads, int8 ? shift.data() : nullptr, scale,
                             scores.data());
  else
    for (int t = 0; t < n; ++t)
      for (int j = 0; j < heads; ++j) {
        float s1 = dot(&qr[(size_t)j * d], k_rows[t], d);
        if constexpr (int8) s1 -= shift[j];
        scores[(size_t)j * n + t] = s1 * scale;
      }
  for (int j = 0; j < heads; ++j) inv[j] = softmax_weights(&scores[(size_t)j * n], n);
  float* o = out + ((size_t)b * num_heads + h0) * dv;  // the group's heads are consecutive: [G, Dv]
  if (dv % 8 == 0) {
    weighted_sums(scores.data(), n, v_rows.data(), dv, heads, inv.data(), o);
  } else {
    for (int j = 0; j < heads; ++j) {
      float* oj = o + (size_t)j * dv;
      std::fill(oj, oj + dv, 0.0f);
      for (int t = 0; t < n; ++t) axpy(scores[(size_t)j * n + t], v_rows[t], oj, dv);
      for (int i = 0; i < dv; ++i) oj[i] *= inv[j];
    }
  }
  if constexpr (int8) {  // the weights sum to one: sum_t p_t (v_q - offset) * scale = (sum_t p_t v_q - offset) * scale
    const float *vs = kq->v_scale + (size_t)g * dv, *vo = kq->v_offset + (size_t)g * dv;
    for (int j = 0; j < heads; ++j)
      for (int i = 0; i < dv; ++i) o[(size_t)j * dv + i] = (o[(size_t)j * dv + i] - vo[i]) * vs[i];
  }
}

// One head of sq_head_matmul: y [B, N] (row stride ldy) = x [B, K] (row stride ldx) @ w_h [K, N], or @ w_h^T where
// transposed (w_h [N, K]); w_h's rows ldw apart. x's rows gathered, then the weighted sums or the scores of
// attention, whose sums per row do not depend on the rows or heads beside it.
template <class W>
void head_product(const float* x, int b, int k, int64_t ldx, const W* w_h, int n, int64_t ldw, bool transposed,
                  float* y, int64_t ldy) {
  thread_local std::vector<float> xs, ys, ones;  // [B, K], [B, N], [B]
  thread_local std::vector<const W*> rows;       // w_h's rows
  xs.resize((size_t)b * k), ys.resize((size_t)b * n), ones.assign(b, 1.0f);
  for (int i = 0; i < b; ++i) std::copy(x + i * ldx, x + i * ldx + k, &xs[(size_t)i * k]);
  rows.resize(transposed ? n : k);
  for (size_t r = 0; r < rows.size(); ++r) rows[r] = w_h + (int64_t)r * ldw;
  if (transposed) score_rows(xs.data(), rows.data(), n, k, b, nullptr, 1.0f, ys.data());  // x . w_h's rows
  else weighted_sums(xs.data(), k, rows.data(), n, b, ones.data(), ys.data());  // sum over k of x_k w_h[k]
  for (int i = 0; i < b; ++i) std::copy(&ys[(size_t)i * n], &ys[(size_t)i * n] + n, y + i * ldy);
}

// sq_head_matmul (exports.h) for weights of type W: head_product per head.
template <class W>
void head_matmul(const float* x, int b, int heads, int k, int ldx_b, int ldx_h, const W* w, int n, int64_t ldw,
                 int64_t ldw_head, bool transposed, float* y) {
#pragma omp parallel for schedule(static) if (heads > 1)
  for (int h = 0; h < heads; ++h)
    head_product(x + (int64_t)h * ldx_h, b, k, ldx_b, w + h * ldw_head, n, ldw, transposed, y + (int64_t)h * n,
                 (int64_t)heads * n);
}

void rope_mla(const float* x, const float* cos, const float* sin, int r, bool interleave, float* out) {
  if (!interleave) return rope_neox(x, cos, sin, r, out);
  const int h = r / 2;
  for (int i = 0; i < h; ++i) {
    const float a = x[2 * i] * cos[i], b = x[2 * i + 1] * sin[i];
    const float c = x[2 * i + 1] * cos[i], e = x[2 * i] * sin[i];
    out[i] = a - b;
    out[h + i] = c + e;
  }
}

template <class C>
void mla_store(const float* entry, int width, C* cache, int64_t slot) {
  if (slot >= 0) store_row(entry, width, cache + slot * width);
}

void own_value(const float* v, int ldv, int b, int g, int j0, int j1, int num_heads, int num_kv_heads,
               int head_dim, float* out) {
  const float* vg = v + (size_t)b * ldv + (size_t)g * head_dim;
  const int h0 = g * (num_heads / num_kv_heads);
  for (int j = j0; j < j1; ++j) std::copy(vg, vg + head_dim, out + ((size_t)b * num_heads + h0 + j) * head_dim);
}

#define SQ_INSTANTIATE(C)                                                                                     \
  template void kv_store(const float*, int, const float*, int, const float*, const float*, int, C*, C*,         \
                         const int64_t*, int, int, int, int, const SqKvQuant*);                                  \
  template void attend_group(const float*, int, const float*, const float*, int, const C*, const C*,              \
                             const int32_t*, int, const int32_t*, int, int, int, int, int, float, int, int, int, \
                             int, const SqKvQuant*, float*);
SQ_INSTANTIATE(float)
SQ_INSTANTIATE(uint16_t)
SQ_INSTANTIATE(int8_t)
#undef SQ_INSTANTIATE
template void head_product(const float*, int, int, int64_t, const float*, int, int64_t, bool, float*, int64_t);
template void head_product(const float*, int, int, int64_t, const uint16_t*, int, int64_t, bool, float*, int64_t);
template void mla_store(const float*, int, float*, int64_t);
template void mla_store(const float*, int, uint16_t*, int64_t);

}  // namespace sq

extern "C" {

void sq_decode_attention(const float* q, int ldq, const float* k, int ldk, const float* v, int ldv, const float* cos,
                         const float* sin, int rope_dim, void* k_cache, void* v_cache, const SqStep* step,
                         int num_heads, int num_kv_heads, int head_dim, float scale, const SqKvQuant* kv_quant,
                         float* out) {
  const int batch = step->batch, max_blocks = step->max_blocks, block_size = step->block_size;
  const int64_t* slots = step->slots;
  const int32_t *block_tables = step->block_tables, *context_lens = step->context_lens;
  sq::with_cache_type(step->kv_type, [&](auto element) {
    using C = decltype(element);
    C *kc = static_cast<C*>(k_cache), *vc = static_cast<C*>(v_cache);
    for (int b = 0; b < batch; ++b)  // write the new token's k (rotated) and v into the cache
      for (int h = 0; h < num_kv_heads; ++h)
        sq::kv_store(k, ldk, v, ldv, cos, sin, rope_dim, kc, vc, slots, num_kv_heads, head_dim, b, h, kv_quant);
#pragma omp parallel if (batch * num_heads > 1)
    sq::for_attention_share(batch, num_heads, num_kv_heads, omp_get_thread_num(), omp_get_num_threads(),
                            [&](int b, int g, int j0, int j1) {
                              if (std::is_same_v<C, int8_t> && context_lens[b] == 1)
                                return sq::own_value(v, ldv, b, g, j0, j1, num_heads, num_kv_heads, head_dim, out);
                              sq::attend_group<C>(q, ldq, cos, sin, rope_dim, kc, vc, block_tables, max_blocks,
                                                  context_lens, block_size, num_heads, num_kv_heads, head_dim,
                                                  head_dim, scale, b, g, j0, j1, kv_quant, out);
                            });
  });
}

// Absorbed MLA decode: standard decode attention's group kernel with one kv head of every query head, whose value
// is the first `rank` values of the cached row (the latent; the rest is k_pe).
void sq_mla_decode_attention(const float* q, int ldq, const void* cache, const SqStep* step, int num_heads,
                             int head_dim, int rank, float scale, float* out) {
  sq::with_cache_type(step->kv_type, [&](auto element) {
    using C = decltype(element);
    if constexpr (!std::is_same_v<C, int8_t>) {  // MLA caches no int8 rows
      const C* rows = static_cast<const C*>(cache);
#pragma omp parallel if (step->batch * num_heads > 1)
      sq::for_attention_share(step->batch, num_heads, 1, omp_get_thread_num(), omp_get_num_threads(),
                              [&](int b, int g, int j0, int j1) {
                                sq::attend_group<C>(q, ldq, nullptr, nullptr, 0, rows, rows, step->block_tables,
                                                    step->max_blocks, step->context_lens, step->block_size,
                                                    num_heads, 1, head_dim, rank, scale, b, g, j0, j1, nullptr, out);
                              });
    }
  });
}

void sq_head_matmul(const float* x, int b, int heads, int k, int ldx_b, int ldx_h, const void* w, int w_type,
                    int n, int64_t ldw, int64_t ldw_head, int transposed, float* y) {
  if (w_type == 1)
    sq::head_matmul(x, b, heads, k, ldx_b, ldx_h, static_cast<const uint16_t*>(w), n, ldw, ldw_head, transposed, y);
  else
    sq::head_matmul(x, b, heads, k, ldx_b, ldx_h, static_cast<const float*>(w), n, ldw, ldw_head, transposed, y);
}

// y [T, heads, D] (row stride ldy) = x [T, heads, D] (row stride ldx, each token's heads contiguous) rotated by its
// token's cos / sin [T, D] (neox): the bits of torch's x * cos + rotate_half(x) * sin, 8 lanes at a time (a + (-p)
// is a - p exactly).
void sq_rope_heads(const float* x, int t, int heads, int d, int ldx, const float* cos, const float* sin, float* y,
                   int ldy) {
  const int half = d / 2, lanes = half - half % 8;
#pragma omp parallel for schedule(static) if ((int64_t)t * heads * d > 65536)
  for (int i = 0; i < t; ++i) {
    const float *c = cos + (int64_t)i * d, *s = sin + (int64_t)i * d;
    for (int h = 0; h < heads; ++h) {
      const float* xh = x + (int64_t)i * ldx + (int64_t)h * d;
      float* yh = y + (int64_t)i * ldy + (int64_t)h * d;
      for (int j = 0; j < lanes; j += 8) {
        const __m256 lo = _mm256_loadu_ps(xh + j), hi = _mm256_loadu_ps(xh + half + j);
        const __m256 a = _mm256_mul_ps(lo, _mm256_loadu_ps(c + j)), p = _mm256_mul_ps(hi, _mm256_loadu_ps(s + j));
        const __m256 e = _mm256_mul_ps(hi, _mm256_loadu_ps(c + half + j));
        const __m256 f = _mm256_mul_ps(lo, _mm256_loadu_ps(s + half + j));
        _mm256_storeu_ps(yh + j, _mm256_sub_ps(a, p));
        _mm256_storeu_ps(yh + half + j, _mm256_add_ps(e, f));
      }
      rope_neox(xh, c, s, d, yh, lanes);
    }
  }
}

}  // extern "C"
