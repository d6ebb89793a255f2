// RMSNorm with the residual add fused: s = x + residual; y = weight * (s / sqrt(mean(s^2) + eps)) (+ bias).
// fp32 rows of H at row strides ldx / ldr; s and y are written contiguous [T, H]. One call per norm.
#include "exports.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace sq {

void norm_row(const float* x, const float* r, int h, const float* weight, const float* bias, float eps, float* s,
              float* y) {
  double sum_sq = 0.0;  // a double sum of fp32 squares: closer to the exact mean than any fp32 order
  for (int j = 0; j < h; ++j) {
    s[j] = r ? x[j] + r[j] : x[j];
    sum_sq += (double)s[j] * s[j];
  }
  const float inv = 1.0f / std::sqrt((float)(sum_sq / h) + eps);
  for (int j = 0; j < h; ++j) {
    const float v = weight[j] * (s[j] * inv);
    y[j] = bias ? v + bias[j] : v;
  }
}

void silu_and_mul_range(const float* g, const float* u, int j0, int j1, float* y) {
  // 8 lanes at a time, the last few through a masked load: every element takes the same steps wherever its
  // range starts (the decoder stack splits it between threads)
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (int j = j0; j < j1; j += 8) {
    const int left = std::min(8, j1 - j);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 gv = _mm256_maskload_ps(g + j, mask), uv = _mm256_maskload_ps(u + j, mask);
    const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
    _mm256_maskstore_ps(y + j, mask, _mm256_mul_ps(silu, uv));
  }
}

}  // namespace sq

using sq::norm_row;

extern "C" {

void sq_add_rms_norm(const float* x, int t, int h, int ldx, const float* residual, int ldr, const float* weight,
                     const float* bias, float eps, float* sum_out, float* y) {
#pragma omp parallel for schedule(static) if ((int64_t)t * h > 65536)
  for (int i = 0; i < t; ++i) {
    const float* r = residual ? residual + (int64_t)i * ldr : nullptr;
    norm_row(x + (int64_t)i * ldx, r, h, weight, bias, eps, sum_out + (int64_t)i * h, y + (int64_t)i * h);
  }
}

// Per-head RMSNorm (Qwen3's q/k norms): x [T, heads, D] with token rows at stride ldx, y at stride ldy (y == x
// normalizes in place); the same arithmetic per head as sq_add_rms_norm per row.
void sq_rms_norm_heads(const float* x, int t, int heads, int d, int ldx, const float* weight, const float* bias,
                       float eps, float* y, int ldy) {
#pragma omp parallel for schedule(static) if ((int64_t)t * heads * d > 65536)
  for (int i = 0; i < t; ++i) {
    std::vector<float> s(d);
    for (int h = 0; h < heads; ++h) {
      const int64_t off = (int64_t)h * d;
      norm_row(x + (int64_t)i * ldx + off, nullptr, d, weight, bias, eps, s.data(), y + (int64_t)i * ldy + off);
    }
  }
}

}  // extern "C"

extern "C" {

// y [T, I] = silu(gate) * up for x [T, 2I] = [gate | up] (row stride ldx): gate / (1 + exp(-gate)) * up.
void sq_silu_and_mul(const float* x, int t, int inter, int ldx, float* y) {
#pragma omp parallel for schedule(static) if ((int64_t)t * inter > 65536)
  for (int i = 0; i < t; ++i) {
    const float* g = x + (int64_t)i * ldx;
    sq::silu_and_mul_range(g, g + inter, 0, inter, y + (int64_t)i * inter);
  }
}

}  // extern "C"
