// A MoE layer's routed W8A8_DYNAMIC experts for one step in one call (DeepSeek / Kimi-K2). Per local expert, in
// ascending id, the rows of its tokens (in token order) go through the per-op path's kernels in its order:
//   y13 = dynamic linear (gate | up); a = silu(gate) * up; y2 = dynamic linear (down); out = y2 * routing weight,
// and each product lands at its token's slot of out [T, K, H] (0 in the slots of experts held elsewhere). The same
// entry points on the same rows: the bits of RoutedExperts' expert-by-expert path, without its per-expert Python
// and torch ops (about a third of a decode step's expert time on a 2-core machine).
#include <cstdint>
#include <cstring>
#include <vector>

#include "exports.h"

namespace {

// Row of n scales (fp32, or bf16 where bf16 != 0: the model dtype the NPU holds them in) as fp32.
void scales_fp32(const void* scales, int bf16, int64_t row, int n, std::vector<float>& out) {
  out.resize(n);
  if (!bf16) {
    std::memcpy(out.data(), static_cast<const float*>(scales) + row * n, sizeof(float) * n);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(scales) + row * n;
  for (int j = 0; j < n; ++j) {
    const uint32_t bits = (uint32_t)s[j] << 16;  // bf16 -> fp32 is exact
    std::memcpy(&out[j], &bits, sizeof(float));
  }
}

// One call's scratch, reused from expert to expert and freed at the end (a long prefill's rows are not kept).
struct ExpertScratch {
  std::vector<int> slots;  // t * K + k of each row routed to the expert
  std::vector<float> x, y13, act, y2, s13, s2;
};

}  // namespace

void sq_routed_experts(const float* x, int t, int h, int ldx, const int64_t* ids, const float* weights, int k,
                       int first, int num_local, int inter, const int8_t* w13, int kp13, const int8_t* w2, int kp2,
                       const void* s13, const void* s2, int scales_bf16, float* out) {
  ExpertScratch s;
  std::memset(out, 0, sizeof(float) * (size_t)t * k * h);
  for (int e = 0; e < num_local; ++e) {
    s.slots.clear();
    for (int i = 0; i < t * k; ++i) {
      if (ids[i] == first + e) s.slots.push_back(i);
    }
    const int n = (int)s.slots.size();
    if (n == 0) continue;
    s.x.resize((size_t)n * h);
    for (int r = 0; r < n; ++r) {
      std::memcpy(&s.x[(size_t)r * h], x + (size_t)(s.slots[r] / k) * ldx, sizeof(float) * h);
    }
    scales_fp32(s13, scales_bf16, e, 2 * inter, s.s13);
    scales_fp32(s2, scales_bf16, e, h, s.s2);
    s.y13.resize((size_t)n * 2 * inter);
    s.act.resize((size_t)n * inter);
    s.y2.resize((size_t)n * h);
    sq_dynamic_linear(s.x.data(), n, h, h, w13 + (size_t)e * 2 * inter * kp13, 2 * inter, kp13, s.s13.data(),
                      nullptr, s.y13.data());
    sq_silu_and_mul(s.y13.data(), n, inter, 2 * inter, s.act.data());
    sq_dynamic_linear(s.act.data(), n, inter, inter, w2 + (size_t)e * h * kp2, h, kp2, s.s2.data(), nullptr,
                      s.y2.data());
    for (int r = 0; r < n; ++r) {
      const float w = weights[s.slots[r]];
      float* o = out + (size_t)s.slots[r] * h;
      const float* y = &s.y2[(size_t)r * h];
      for (int j = 0; j < h; ++j) o[j] = y[j] * w;
    }
  }
}
