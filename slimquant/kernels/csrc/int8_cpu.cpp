// int8 x int8 -> int32 GEMM for AVX2 CPUs, with the activation quantization and the dequantization fused.
//
// The products are exact integers: vpmaddubsw multiplies |x| (u8) by sign(x) * w (s8) in pairs, and a pair
// never saturates int16 because |x| <= 128 and |w| <= 127 (the caller keeps weights of -128 off this path).
// Every float step repeats, in the same order, what the pure-torch path of slimquant/kernels computes, so
// the results are bit-identical to it; build with -ffp-contract=off so that no multiply-add is fused.
//
// Layouts: activations x fp32 [M, K] (row stride ldx); weights int8 [N, Kp], K padded with zeros to Kp, a
// multiple of 32; outputs row-major [M, N].
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kTokTile = 64;  // tokens whose quantized rows stay in L2 while a row group streams past
constexpr int kRowTile = 16;  // weight rows per parallel work item
constexpr float kTinyScale = 1e-8f;

struct QuantizedX {
  std::vector<int8_t> q;     // [M, Kp] x_q
  std::vector<uint8_t> abs;  // [M, Kp] |x_q|
  int kp;
};

inline __m256i dot32(__m256i acc, __m256i w, __m256i xs, __m256i xa) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i pairs = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(w, xs));  // 16 x int16, exact
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));       // 8 x int32
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// R weight rows x T tokens of dot products over Kp; acc[r][t] -> out[r * T + t].
template <int R, int T>
inline void block_dot(const int8_t* w, const QuantizedX& x, int m0, int kp, int32_t* out) {
  __m256i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int k = 0; k < kp; k += 32) {
    __m256i xs[T], xa[T];
    for (int t = 0; t < T; ++t) {
      xs[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.q[(size_t)(m0 + t) * kp + k]));
      xa[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.abs[(size_t)(m0 + t) * kp + k]));
    }
    for (int r = 0; r < R; ++r) {
      __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (size_t)r * kp + k));
      for (int t = 0; t < T; ++t) acc[r][t] = dot32(acc[r][t], wv, xs[t], xa[t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * T + t] = hsum(acc[r][t]);
}

// One row group [n0, n1) x token tile [m0, m1): epi(m, n, acc) receives every exact int32 result.
template <class Epi>
void tile(const int8_t* w, const QuantizedX& x, int m0, int m1, int n0, int n1, const Epi& epi) {
  const int kp = x.kp;
  int32_t r[8];
  int n = n0;
  for (; n + 4 <= n1; n += 4) {
    const int8_t* wn = w + (size_t)n * kp;
    int m = m0;
    for (; m + 2 <= m1; m += 2) {
      block_dot<4, 2>(wn, x, m, kp, r);
      for (int i = 0; i < 4; ++i) epi(m, n + i, r[2 * i]), epi(m + 1, n + i, r[2 * i + 1]);
    }
    for (; m < m1; ++m) {
      block_dot<4, 1>(wn, x, m, kp, r);
      for (int i = 0; i < 4; ++i) epi(m, n + i, r[i]);
    }
  }
  for (; n < n1; ++n)
    for (int m = m0; m < m1; ++m) {
      block_dot<1, 1>(w + (size_t)n * kp, x, m, kp, r);
      epi(m, n, r[0]);
    }
}

template <class Epi>
void gemm(const int8_t* w, const QuantizedX& x, int m, int n, const Epi& epi) {
  const int tok_tiles = (m + kTokTile - 1) / kTokTile, row_tiles = (n + kRowTile - 1) / kRowTile;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)m * n * x.kp > 65536)
  for (int mt = 0; mt < tok_tiles; ++mt)
    for (int nt = 0; nt < row_tiles; ++nt)
      tile(w, x, mt * kTokTile, std::min(m, (mt + 1) * kTokTile), nt * kRowTile, std::min(n, (nt + 1) * kRowTile),
           epi);
}

inline void store_row(QuantizedX& out, int row, const float* q, int k) {
  // q: k integer-valued floats in [-128, 127]
  int8_t* dst = &out.q[(size_t)row * out.kp];
  uint8_t* dabs = &out.abs[(size_t)row * out.kp];
  for (int i = 0; i < k; ++i) {
    const int v = static_cast<int>(q[i]);
    dst[i] = static_cast<int8_t>(v);
    dabs[i] = static_cast<uint8_t>(v < 0 ? -v : v);
  }
}

inline float clamp_round(float v) { return std::min(127.0f, std::max(-128.0f, std::nearbyint(v))); }

// Per-token symmetric quantization: scale = max(amax / 127, 1e-8), q = clamp(round(x / scale)).
void quantize_dynamic(const float* x, int m, int k, int ldx, QuantizedX& out, float* scales) {
#pragma omp parallel for schedule(static) if ((size_t)m * k > 65536)
  for (int i = 0; i < m; ++i) {
    const float* row = x + (size_t)i * ldx;
    float amax = 0.0f;
    for (int j = 0; j < k; ++j) amax = std::max(amax, std::fabs(row[j]));
    const float scale = std::max(amax / 127.0f, kTinyScale);
    std::vector<float> q(k);
    for (int j = 0; j < k; ++j) q[j] = clamp_round(row[j] / scale);
    store_row(out, i, q.data(), k);
    scales[i] = scale;
  }
}

// Static per-tensor quantization: q = clamp(round(x * inv_scale + offset)).
void quantize_static(const float* x, int m, int k, int ldx, float inv, float off, QuantizedX& out) {
#pragma omp parallel for schedule(static) if ((size_t)m * k > 65536)
  for (int i = 0; i < m; ++i) {
    const float* row = x + (size_t)i * ldx;
    std::vector<float> q(k);
    for (int j = 0; j < k; ++j) {
      const float scaled = row[j] * inv;
      q[j] = clamp_round(scaled + off);
    }
    store_row(out, i, q.data(), k);
  }
}

QuantizedX empty_x(int m, int kp) { return QuantizedX{std::vector<int8_t>((size_t)m * kp), std::vector<uint8_t>((size_t)m * kp), kp}; }


// ---- float linears with bf16-stored weights: y = x W^T computed in fp32 (a bf16 value is exact in fp32) ----

inline __m256 load_bf16x8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R rows x T tokens over K (a multiple of 8): x rows at stride ldx, weights at stride k.
template <int R, int T>
inline void block_dot_bf16(const uint16_t* w, int k, const float* x, int ldx, float* out) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int j = 0; j < k; j += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + (size_t)t * ldx + j);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load_bf16x8(w + (size_t)r * k + j);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * T + t] = hsum_ps(acc[r][t]);
}

void bf16_tile(const float* x, int ldx, const uint16_t* w, int k, int n, int m0, int m1, int n0, int n1,
               const float* bias, float* y) {
  float r[8];
  auto put = [&](int i, int j, float v) { y[(size_t)i * n + j] = bias ? v + bias[j] : v; };
  int j = n0;
  for (; j + 4 <= n1; j += 4) {
    int i = m0;
    for (; i + 2 <= m1; i += 2) {
      block_dot_bf16<4, 2>(w + (size_t)j * k, k, x + (size_t)i * ldx, ldx, r);
      for (int c = 0; c < 4; ++c) put(i, j + c, r[2 * c]), put(i + 1, j + c, r[2 * c + 1]);
    }
    for (; i < m1; ++i) {
      block_dot_bf16<4, 1>(w + (size_t)j * k, k, x + (size_t)i * ldx, ldx, r);
      for (int c = 0; c < 4; ++c) put(i, j + c, r[c]);
    }
  }
  for (; j < n1; ++j)
    for (int i = m0; i < m1; ++i) {
      block_dot_bf16<1, 1>(w + (size_t)j * k, k, x + (size_t)i * ldx, ldx, r);
      put(i, j, r[0]);
    }
}

}  // namespace

extern "C" {

int sq_abi_version() { return 1; }

// out int32 [M, N] = x_q int8 [M, K] (row stride ldx) @ w int8 [N, Kp]^T.
void sq_int8_gemm(const int8_t* xq, int m, int k, int ldx, const int8_t* w, int n, int kp, int32_t* out) {
  QuantizedX x = empty_x(m, kp);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < k; ++j) {
      const int8_t v = xq[(size_t)i * ldx + j];
      x.q[(size_t)i * kp + j] = v;
      x.abs[(size_t)i * kp + j] = static_cast<uint8_t>(v < 0 ? -v : v);
    }
  gemm(w, x, m, n, [=](int i, int j, int32_t acc) { out[(size_t)i * n + j] = acc; });
}

// W8A8_DYNAMIC: y [M, N] = (acc * s_t) * w_scale (+ bias), x quantized per token.
void sq_dynamic_linear(const float* x, int m, int k, int ldx, const int8_t* w, int n, int kp, const float* w_scale,
                       const float* bias, float* y) {
  QuantizedX xq = empty_x(m, kp);
  std::vector<float> s_t(m);
  quantize_dynamic(x, m, k, ldx, xq, s_t.data());
  const float* st = s_t.data();
  if (bias)
    gemm(w, xq, m, n, [=](int i, int j, int32_t acc) {
      const float v = static_cast<float>(acc) * st[i] * w_scale[j];
      y[(size_t)i * n + j] = v + bias[j];
    });
  else
    gemm(w, xq, m, n, [=](int i, int j, int32_t acc) { y[(size_t)i * n + j] = static_cast<float>(acc) * st[i] * w_scale[j]; });
}

// W8A8 (static): y [M, N] = float(acc + quant_bias) * deq_scale, x quantized with one scale and offset.
void sq_static_linear(const float* x, int m, int k, int ldx, float inv_scale, float offset, const int8_t* w, int n,
                      int kp, const int32_t* quant_bias, const float* deq, float* y) {
  QuantizedX xq = empty_x(m, kp);
  quantize_static(x, m, k, ldx, inv_scale, offset, xq);
  gemm(w, xq, m, n, [=](int i, int j, int32_t acc) {
    y[(size_t)i * n + j] = static_cast<float>(acc + quant_bias[j]) * deq[j];
  });
}

// Per-token quantization alone: x_q int8 [M, K] and scales fp32 [M].
void sq_quantize_per_token(const float* x, int m, int k, int ldx, int8_t* xq, float* scales) {
  QuantizedX q = empty_x(m, k);
  quantize_dynamic(x, m, k, ldx, q, scales);
  std::memcpy(xq, q.q.data(), (size_t)m * k);
}

// y fp32 [M, N] = x fp32 [M, K] (row stride ldx) @ w bf16 [N, K]^T (+ bias fp32 [N]); K a multiple of 8.
void sq_bf16_linear(const float* x, int m, int k, int ldx, const uint16_t* w, int n, const float* bias, float* y) {
  const int tok_tiles = (m + kTokTile - 1) / kTokTile, row_tiles = (n + kRowTile - 1) / kRowTile;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)m * n * k > 65536)
  for (int mt = 0; mt < tok_tiles; ++mt)
    for (int nt = 0; nt < row_tiles; ++nt)
      bf16_tile(x, ldx, w, k, n, mt * kTokTile, std::min(m, (mt + 1) * kTokTile), nt * kRowTile,
                std::min(n, (nt + 1) * kRowTile), bias, y);
}

}  // extern "C"
