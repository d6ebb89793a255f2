// RMSNorm with the residual add fused: s = x + residual; y = weight * (s / sqrt(mean(s^2) + eps)) (+ bias).
// fp32 rows of H at row strides ldx / ldr; s and y are written contiguous [T, H]. One call per norm.
#include <omp.h>

#include <cmath>
#include <cstdint>

extern "C" {

void sq_add_rms_norm(const float* x, int t, int h, int ldx, const float* residual, int ldr, const float* weight,
                     const float* bias, float eps, float* sum_out, float* y) {
#pragma omp parallel for schedule(static) if ((int64_t)t * h > 65536)
  for (int i = 0; i < t; ++i) {
    float* s = sum_out + (int64_t)i * h;
    const float* xi = x + (int64_t)i * ldx;
    double sq = 0.0;  // a double sum of fp32 squares: closer to the exact mean than any fp32 order
    for (int j = 0; j < h; ++j) {
      s[j] = residual ? xi[j] + residual[(int64_t)i * ldr + j] : xi[j];
      sq += (double)s[j] * s[j];
    }
    const float inv = 1.0f / std::sqrt((float)(sq / h) + eps);
    float* yi = y + (int64_t)i * h;
    for (int j = 0; j < h; ++j) {
      const float v = weight[j] * (s[j] * inv);
      yi[j] = bias ? v + bias[j] : v;
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
    const float* u = g + inter;
    float* yi = y + (int64_t)i * inter;
    for (int j = 0; j < inter; ++j) yi[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
  }
}

}  // extern "C"
