// int8 x int8 -> int32 GEMM for AVX2 / AVX-512 VNNI CPUs, with the activation quantization and the
// dequantization fused.
//
// Two builds of the same source (slimquant/kernels/native.py picks one, SQ_AVX512VNNI marks the second):
// - AVX2: vpmaddubsw multiplies |x| (u8) by sign(x) * w (s8) in pairs; a pair never saturates int16 because
//   |x| <= 128 and |w| <= 127 (the caller keeps weights of -128 off this path).
// - AVX-512 VNNI: vpdpbusd multiplies u = x + 128 (u8) by w (s8) in groups of 4 straight into int32 lanes,
//   without saturation; sum(u * w) = sum(x * w) + 128 * sum(w), and the second term, computed by the same
//   instruction on a row of 128s, is subtracted. int32 arithmetic wraps, so the result is exact whenever the
//   true dot product fits int32.
// - AMX (a third build, SQ_AMX on top of the VNNI one): tdpbssd multiplies the int8 activations by the weights,
//   16 tokens x 16 rows x 64 bytes of K per instruction, where at least 16 tokens come together and Kp is a
//   multiple of 64; the rest runs the VNNI kernels.
// The products are exact integers either way. Every float step repeats, in the same order, what the
// pure-torch path of slimquant/kernels computes, so the results are bit-identical to it; build with
// -ffp-contract=off so that no multiply-add is fused.
//
// Layouts: activations x fp32 [M, K] (row stride ldx); weights int8 [N, Kp], K padded with zeros to Kp, a
// multiple of 32; outputs row-major [M, N]. The VNNI build takes its weights blocked (int8_ops.pack_weight):
// each whole block of 16 rows [16, Kp] is stored as [Kp / 4, 16, 4] (four bytes of each row in turn), so one
// 64-byte load feeds 16 rows' dot products; the last N % 16 rows stay plain rows, at the same offsets.
#include "exports.h"

#include <immintrin.h>
#include <omp.h>
#ifdef SQ_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int kTokTile = 64;  // tokens whose quantized rows stay in L2 while a row group streams past
constexpr int kRowTile = 16;  // weight rows per parallel work item (AMX build, 32 tokens or more: two)
constexpr int kBlockRows = 16;  // VNNI build: rows per block of the blocked weight layout (one per kRowTile)
constexpr int kBf16BlockTokens = 9;  // from this many tokens, bf16 linears take 4 x 4 register blocks
constexpr float kTinyScale = 1e-8f;

using sq::QuantizedX;

// The GEMM's unsigned operand for one int8 activation value.
inline uint8_t gemm_operand(int8_t v) {
#ifdef SQ_AVX512VNNI
  return static_cast<uint8_t>(v) ^ 0x80;  // v + 128
#else
  return static_cast<uint8_t>(v < 0 ? -v : v);
#endif
}

inline __m256i gemm_operand32(__m256i v) {
#ifdef SQ_AVX512VNNI
  return _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
#else
  return _mm256_abs_epi8(v);  // |-128| = 0x80 = 128 as u8
#endif
}

#ifdef SQ_AVX512VNNI

// ---- AVX-512 VNNI inner kernels ----

// Lane i of the result = the sum of the 16 int32 lanes of v[i] (a transpose-and-add tree: 45 ops for 16 sums).
inline __m512i reduce16(const __m512i* v) {
  __m512i s[8], t[4], u[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lane: [v2i, v2i+1, v2i, v2i+1] partials
    s[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // 128-bit lane: [v4i .. v4i+3] partials of that lane
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_epi64(s[2 * i], s[2 * i + 1]));
  for (int i = 0; i < 2; ++i)  // lanes: [t2i lanes 0+1, t2i lanes 2+3, t2i+1 lanes 0+1, t2i+1 lanes 2+3]
    u[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(t[2 * i], t[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(t[2 * i], t[2 * i + 1], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xdd));
}

// acc += u . w (vpdpbusd); inline asm because GCC 12 wraps the intrinsic in two register copies per call.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(w));
  return acc;
}

inline __m512i load64(const void* p) { return _mm512_loadu_si512(p); }
inline __m512i load32(const void* p) { return _mm512_maskz_loadu_epi8(0xffffffffull, p); }  // upper half zero

// One K step of R weight rows x T activation rows: acc[t * R + r] += u[t] . w[r] in groups of 4 bytes.
template <int R, int T, bool Full>
inline void vnni_step(__m512i* acc, const int8_t* w, size_t kp, const uint8_t* const* x, size_t k) {
  __m512i xv[T];
  for (int t = 0; t < T; ++t) xv[t] = Full ? load64(x[t] + k) : load32(x[t] + k);
  for (int r = 0; r < R; ++r) {
    const __m512i wv = Full ? load64(w + r * kp + k) : load32(w + r * kp + k);
    for (int t = 0; t < T; ++t) acc[t * R + r] = dpbusd(acc[t * R + r], xv[t], wv);
  }
}

// R weight rows (stride kp) x T u8 activation rows of dot products over kp: out[t * R + r], R * T <= 16.
template <int R, int T>
inline void block_dot(const int8_t* w, size_t kp, const uint8_t* const* x, int32_t* out) {
  static_assert(R * T <= 16, "one reduce16 per block");
  __m512i acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  size_t k = 0;
  for (; k + 64 <= kp; k += 64) vnni_step<R, T, true>(acc, w, kp, x, k);
  if (k < kp) vnni_step<R, T, false>(acc, w, kp, x, k);  // kp is a multiple of 32: one half step left
  if constexpr (R * T <= 4) {  // decode: a few sums, each reduced alone
    for (int i = 0; i < R * T; ++i) out[i] = _mm512_reduce_add_epi32(acc[i]);
  } else {
    _mm512_storeu_si512(out, reduce16(acc));
  }
}

// Row n x tokens [m, m + T) to epi, 128 * sum(w[n]) computed as one more activation row (of 128s).
template <int T, class Epi>
inline void emit(const int8_t* w, const QuantizedX& x, const uint8_t* c128, int m, int n, const Epi& epi) {
  const uint8_t* rows[T + 1];
  for (int t = 0; t < T; ++t) rows[t] = x.row(m + t);
  rows[T] = c128;
  alignas(64) int32_t r[16];
  block_dot<1, T + 1>(w + (size_t)n * x.kp, x.kp, rows, r);  // r[T] = 128 * sum(w[n])
  for (int t = 0; t < T; ++t) epi(m + t, n, r[t] - r[T]);
}

// One token (decode) against rows [n0, n1), each row streamed once from memory: u . w - 128 * sum(w), the
// second sum from a register of 128s (no activation row to load for it).
template <class Epi>
void gemv_rows(const int8_t* w, const uint8_t* u, size_t kp, int m, int n0, int n1, const Epi& epi) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int n = n0; n < n1; ++n) {
    const int8_t* wn = w + (size_t)n * kp;
    __m512i dot = _mm512_setzero_si512(), comp = _mm512_setzero_si512(), dot2 = dot, comp2 = dot;
    size_t k = 0;
    for (; k + 128 <= kp; k += 128) {  // two chains each: the dpbusd latency stays hidden
      const __m512i wv = load64(wn + k), wv2 = load64(wn + k + 64);
      dot = dpbusd(dot, load64(u + k), wv);
      comp = dpbusd(comp, c128, wv);
      dot2 = dpbusd(dot2, load64(u + k + 64), wv2);
      comp2 = dpbusd(comp2, c128, wv2);
    }
    dot = _mm512_add_epi32(dot, dot2);
    comp = _mm512_add_epi32(comp, comp2);
    for (; k + 64 <= kp; k += 64) {
      const __m512i wv = load64(wn + k);
      dot = dpbusd(dot, load64(u + k), wv);
      comp = dpbusd(comp, c128, wv);
    }
    if (k < kp) {  // kp is a multiple of 32: one half step left (upper lanes zero)
      const __m512i wv = load32(wn + k);
      dot = dpbusd(dot, load32(u + k), wv);
      comp = dpbusd(comp, c128, wv);
    }
    epi(m, n, _mm512_reduce_add_epi32(dot) - _mm512_reduce_add_epi32(comp));
  }
}

// Lane r = 128 * sum(w[n + r]) of one block in the blocked layout (see pack_weight): the VNNI offset's term.
__attribute__((noinline)) __m512i block16_comp(const int8_t* blk, int kp) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i comp = _mm512_setzero_si512(), comp2 = comp;
  int c = 0;
  for (; c + 2 <= kp / 4; c += 2) {
    comp = dpbusd(comp, c128, load64(blk + 64 * c));
    comp2 = dpbusd(comp2, c128, load64(blk + 64 * c + 64));
  }
  if (c < kp / 4) comp = dpbusd(comp, c128, load64(blk + 64 * c));
  return _mm512_add_epi32(comp, comp2);
}

// Tokens [m, m + T) x the 16 rows [n, n + 16) of one block in the blocked layout (byte (r, 4c + i) of the
// block at 64c + 4r + i). Lane r of a vpdpbusd sums row r's products with four bytes of a token broadcast to
// every lane: no horizontal sums. comp: block16_comp of the block, or (OwnComp) zero and summed here alongside.
template <int T, bool OwnComp, class Epi>
__attribute__((noinline)) void block16(const int8_t* blk, int kp, const QuantizedX& x, int m, int n, __m512i comp,
                                       const Epi& epi) {
  // noinline: inlined into tile(), GCC 12 runs out of registers and spills the row pointers
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_si512();
  const uint8_t* xa = x.row(m);  // T rows at stride kp
  for (int c = 0; c < kp / 4; ++c) {
    const __m512i wv = load64(blk + 64 * c);
    if (OwnComp) comp = dpbusd(comp, c128, wv);
    for (int t = 0; t < T; ++t) {
      int32_t four;
      std::memcpy(&four, xa + (size_t)t * kp + 4 * c, 4);
      acc[t] = dpbusd(acc[t], _mm512_set1_epi32(four), wv);
    }
  }
  for (int t = 0; t < T; ++t) epi.rows16(m + t, n, _mm512_sub_epi32(acc[t], comp));
}

// One token x one block: block16<1> with two chains each for the sums and comp (even and odd steps), so that
// the vpdpbusd latency is hidden where there is only one token to multiply.
template <class Epi>
__attribute__((noinline)) void block16_one(const int8_t* blk, int kp, const QuantizedX& x, int m, int n,
                                           const Epi& epi) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc = _mm512_setzero_si512(), acc2 = acc, comp = acc, comp2 = acc;
  const uint8_t* xa = x.row(m);
  int c = 0;
  for (; c + 2 <= kp / 4; c += 2) {
    const __m512i wv = load64(blk + 64 * c), wv2 = load64(blk + 64 * c + 64);
    int32_t four[2];
    std::memcpy(four, xa + 4 * c, 8);
    acc = dpbusd(acc, _mm512_set1_epi32(four[0]), wv);
    comp = dpbusd(comp, c128, wv);
    acc2 = dpbusd(acc2, _mm512_set1_epi32(four[1]), wv2);
    comp2 = dpbusd(comp2, c128, wv2);
  }
  if (c < kp / 4) {
    const __m512i wv = load64(blk + 64 * c);
    int32_t four;
    std::memcpy(&four, xa + 4 * c, 4);
    acc = dpbusd(acc, _mm512_set1_epi32(four), wv);
    comp = dpbusd(comp, c128, wv);
  }
  epi.rows16(m, n, _mm512_sub_epi32(_mm512_add_epi32(acc, acc2), _mm512_add_epi32(comp, comp2)));
}

#ifdef SQ_AMX
// ---- AMX tiles (Intel Xeon since Sapphire Rapids) ----
// A block of the blocked layout is an AMX weight tile as it stands: the 64-byte chunk [k, k + 64) of K is the
// block's 16 groups of 4 bytes [k / 4, k / 4 + 16), 16 tile rows of 64 bytes (16 rows x 4 bytes), contiguous
// at 16 k. An activation tile is 16 tokens' int8 rows of that chunk. tdpbssd adds x . w of each (token, row) pair
// into a tile of 16 x 16 int32 sums (signed x signed: no offset term to subtract), exact.

constexpr int kAmxTokens = 16;  // tokens per tile (its rows)
constexpr int kAmxChunk = 64;   // bytes of K per tile row

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether this process may use the tiles: Linux grants their state on request, once per process.
bool amx_permitted() {
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  return ok;
}

// The calling thread's tiles, configured for amx_block16 / amx_block32 while it lives: gemm() and gemm_rows() open
// one around their tiles wherever 16 tokens or more come (torch's oneDNN configures the same threads' tiles its
// own way between our calls). All eight are 16 rows of 64 bytes: 0-3 hold sums, 4 and 6 activations, 5 and 7
// weights.
class TileSession {
 public:
  explicit TileSession(int tokens) : active_(tokens >= kAmxTokens && amx_permitted()) {
    if (!active_) return;
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = kAmxTokens, cfg.colsb[t] = kAmxChunk;
    _tile_loadconfig(&cfg);
  }
  ~TileSession() {
    if (active_) _tile_release();
  }
  TileSession(const TileSession&) = delete;
  TileSession& operator=(const TileSession&) = delete;

 private:
  bool active_;
};

// Whether the tiles take a GEMM whose padded K is kp (whole 64-byte chunks) in this process.
inline bool amx_fits(int kp) { return kp % kAmxChunk == 0 && amx_permitted(); }

// A stored tile of sums, tokens [m, m + 16) x rows [n, n + 16), to epi.rows16.
template <class Epi>
inline void emit_tile(const int32_t (*sums)[16], int m, int n, const Epi& epi) {
  for (int t = 0; t < kAmxTokens; ++t) epi.rows16(m + t, n, _mm512_load_si512(sums[t]));
}

// Tokens [m, m + 16 G) x the block of 16 rows at n (kp a multiple of 64), G <= 4 tiles of sums, to epi.rows16.
// Each weight tile feeds G products; the activation tiles alternate between 4 and 6, so that a load need not wait
// for the product before it.
template <int G, class Epi>
__attribute__((noinline)) void amx_block16(const int8_t* blk, int kp, const QuantizedX& x, int m, int n,
                                           const Epi& epi) {
  static_assert(G >= 1 && G <= 4, "four tiles of sums");
  _tile_zero(0);
  if constexpr (G > 1) _tile_zero(1);
  if constexpr (G > 2) _tile_zero(2);
  if constexpr (G > 3) _tile_zero(3);
  const int8_t* xq = &x.q[(size_t)m * kp];  // 16 G rows at stride kp
  const size_t group = (size_t)kAmxTokens * kp;
  for (int k = 0; k < kp; k += kAmxChunk) {
    _tile_loadd(5, blk + 16 * k, 64);
    _tile_loadd(4, xq + k, kp);
    _tile_dpbssd(0, 4, 5);
    if constexpr (G > 1) {
      _tile_loadd(6, xq + group + k, kp);
      _tile_dpbssd(1, 6, 5);
    }
    if constexpr (G > 2) {
      _tile_loadd(4, xq + 2 * group + k, kp);
      _tile_dpbssd(2, 4, 5);
    }
    if constexpr (G > 3) {
      _tile_loadd(6, xq + 3 * group + k, kp);
      _tile_dpbssd(3, 6, 5);
    }
  }
  alignas(64) int32_t sums[G][kAmxTokens][16];  // the tile numbers are immediates: each stored by name
  _tile_stored(0, sums[0], 64);
  if constexpr (G > 1) _tile_stored(1, sums[1], 64);
  if constexpr (G > 2) _tile_stored(2, sums[2], 64);
  if constexpr (G > 3) _tile_stored(3, sums[3], 64);
  for (int g = 0; g < G; ++g) emit_tile(sums[g], m + g * kAmxTokens, n, epi);
}

// The whole groups of 16 of tokens [m0, m1) x one block, on the tiles where they run (else none); returns the
// first token left to the VNNI kernels.
template <class Epi>
int amx_tokens(const int8_t* blk, int kp, const QuantizedX& x, int m0, int m1, int n, const Epi& epi) {
  if (m1 - m0 < kAmxTokens || !amx_fits(kp)) return m0;
  int m = m0;
  for (; m + 4 * kAmxTokens <= m1; m += 4 * kAmxTokens) amx_block16<4>(blk, kp, x, m, n, epi);
  switch ((m1 - m) / kAmxTokens) {
    case 3: amx_block16<3>(blk, kp, x, m, n, epi); return m + 3 * kAmxTokens;
    case 2: amx_block16<2>(blk, kp, x, m, n, epi); return m + 2 * kAmxTokens;
    case 1: amx_block16<1>(blk, kp, x, m, n, epi); return m + kAmxTokens;
  }
  return m;
}

// Tokens [m, m + 32) x the two blocks of 16 rows at n and n + 16 (kp a multiple of 64): each activation tile and
// each weight tile feeds two products, four loads for four products (amx_block16<4>: five). gemm() hands out
// such pairs of blocks where 32 tokens or more come.
template <class Epi>
__attribute__((noinline)) void amx_block32(const int8_t* blk, int kp, const QuantizedX& x, int m, int n,
                                           const Epi& epi) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int8_t* xq = &x.q[(size_t)m * kp];
  const int8_t* blk2 = blk + (size_t)kAmxTokens * kp;
  const size_t group = (size_t)kAmxTokens * kp;
  for (int k = 0; k < kp; k += kAmxChunk) {
    _tile_loadd(4, xq + k, kp);
    _tile_loadd(5, blk + 16 * k, 64);
    _tile_dpbssd(0, 4, 5);
    _tile_loadd(7, blk2 + 16 * k, 64);
    _tile_dpbssd(1, 4, 7);
    _tile_loadd(6, xq + group + k, kp);
    _tile_dpbssd(2, 6, 5);
    _tile_dpbssd(3, 6, 7);
  }
  alignas(64) int32_t sums[4][kAmxTokens][16];
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  _tile_stored(2, sums[2], 64);
  _tile_stored(3, sums[3], 64);
  for (int g = 0; g < 4; ++g)  // tile g: tokens m + 16 (g / 2), rows n + 16 (g % 2)
    emit_tile(sums[g], m + (g / 2) * kAmxTokens, n + (g % 2) * kBlockRows, epi);
}
#endif  // SQ_AMX

// Tokens [m0, m1) x one block of 16 rows at n, in groups of 8 tokens.
template <class Epi>
void block16_tokens(const int8_t* blk, int kp, const QuantizedX& x, int m0, int m1, int n, const Epi& epi) {
  // a few tokens (decode of a few streams): comp rides along, one pass over the block from memory (a separate
  // comp pass first cost a fifth of the bandwidth at 2 tokens)
  const __m512i zero = _mm512_setzero_si512();
  switch (m1 - m0) {
    case 1: return block16_one(blk, kp, x, m0, n, epi);
    case 2: return block16<2, true>(blk, kp, x, m0, n, zero, epi);
    case 3: return block16<3, true>(blk, kp, x, m0, n, zero, epi);
    case 4: return block16<4, true>(blk, kp, x, m0, n, zero, epi);
  }
  int m = m0;
#ifdef SQ_AMX
  m = amx_tokens(blk, kp, x, m0, m1, n, epi);
  if (m == m1) return;
#endif
  const __m512i comp = block16_comp(blk, kp);  // once for every token group
  for (; m + 8 <= m1; m += 8) block16<8, false>(blk, kp, x, m, n, comp, epi);
  for (; m + 4 <= m1; m += 4) block16<4, false>(blk, kp, x, m, n, comp, epi);
  for (; m + 2 <= m1; m += 2) block16<2, false>(blk, kp, x, m, n, comp, epi);
  if (m < m1) block16<1, false>(blk, kp, x, m, n, comp, epi);
}

// One row group [n0, n1) x token tile [m0, m1) of a weight of nrows rows: epi(m, n, acc) receives every exact
// int32 result. A whole block of 16 rows (below nrows - nrows % 16) is in the blocked layout; the rest in rows.
template <class Epi>
void tile(const int8_t* w, const QuantizedX& x, const uint8_t* c128, int m0, int m1, int n0, int n1, int nrows,
          const Epi& epi) {
  const int kp = x.kp;
#ifdef SQ_AMX
  if (n1 - n0 > kBlockRows) {  // gemm()'s row tiles of 32 (two blocks) where 32 tokens or more come
    const bool pair = n0 % kBlockRows == 0 && n1 <= nrows - nrows % kBlockRows && amx_fits(kp);
    int m = m0;
    if (pair)
      for (; m + 2 * kAmxTokens <= m1; m += 2 * kAmxTokens) amx_block32(w + (size_t)n0 * kp, kp, x, m, n0, epi);
    for (int r = n0; m < m1 && r < n1; r += kBlockRows)  // the rest, a block (or the plain rows) at a time
      tile(w, x, c128, m, m1, r, std::min(n1, r + kBlockRows), nrows, epi);
    return;
  }
#endif
  if (n1 - n0 == kBlockRows && n0 % kBlockRows == 0 && n1 <= nrows - nrows % kBlockRows)
    return block16_tokens(w + (size_t)n0 * kp, kp, x, m0, m1, n0, epi);
  // below: the plain rows past the last whole block (fewer than 16), each streamed once past every token
  if (m1 - m0 == 1) return gemv_rows(w, x.row(m0), kp, m0, n0, n1, epi);
  for (int n = n0; n < n1; ++n) {
    int m = m0;
    for (; m + 8 <= m1; m += 8) emit<8>(w, x, c128, m, n, epi);
    for (; m + 4 <= m1; m += 4) emit<4>(w, x, c128, m, n, epi);
    for (; m < m1; ++m) emit<1>(w, x, c128, m, n, epi);
  }
}

#else  // AVX2

// ---- AVX2 inner kernels ----

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
      xa[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&x.a[(size_t)(m0 + t) * kp + k]));
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
void tile(const int8_t* w, const QuantizedX& x, const uint8_t*, int m0, int m1, int n0, int n1, int,
          const Epi& epi) {
  const int kp = x.kp;
  int32_t r[8];
  int n = n0;
  const bool decode = m1 - m0 == 1;  // one token: rows one at a time below (a single sequential stream)
  for (; !decode && n + 4 <= n1; n += 4) {
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

#endif  // SQ_AVX512VNNI

#ifndef SQ_AMX
struct TileSession {  // the other builds have no tiles
  explicit TileSession(int) {}
};
#endif

// A row of kp 128s (the VNNI build's second operand for 128 * sum(w), see the header), per thread.
const uint8_t* row_of_128s(int kp) {
  thread_local std::vector<uint8_t> c128;
  if (c128.size() < (size_t)kp) c128.assign(kp, 0x80);
  return c128.data();
}

// Output columns [n0, n1) of n for every token, in the tiles gemm() runs (serial: one thread's slice of rows).
template <class Epi>
void gemm_rows(const int8_t* w, const QuantizedX& x, int m, int n, int n0, int n1, const Epi& epi) {
  const uint8_t* c128 = row_of_128s(x.kp);
  [[maybe_unused]] const TileSession tiles(m);
  for (int m0 = 0; m0 < m; m0 += kTokTile)
    for (int r = n0; r < n1; r += kRowTile)
      tile(w, x, c128, m0, std::min(m, m0 + kTokTile), r, std::min(n1, r + kRowTile), n, epi);
}

template <class Epi>
void gemm(const int8_t* w, const QuantizedX& x, int m, int n, const Epi& epi) {
  const uint8_t* c128 = row_of_128s(x.kp);  // the calling thread's, read by the whole team
#ifdef SQ_AMX
  const int row_tile = m >= 2 * kAmxTokens ? 2 * kRowTile : kRowTile;  // pairs of blocks for amx_block32
#else
  const int row_tile = kRowTile;
#endif
  const int tok_tiles = (m + kTokTile - 1) / kTokTile, row_tiles = (n + row_tile - 1) / row_tile;
#pragma omp parallel if ((size_t)m * n * x.kp > 65536)
  {
    [[maybe_unused]] const TileSession tiles(m);
#pragma omp for collapse(2) schedule(static)
    for (int mt = 0; mt < tok_tiles; ++mt)
      for (int nt = 0; nt < row_tiles; ++nt)
        tile(w, x, c128, mt * kTokTile, std::min(m, (mt + 1) * kTokTile), nt * row_tile,
             std::min(n, (nt + 1) * row_tile), n, epi);
  }
}

// ---- activation quantization (AVX2 in both builds: the same float steps as torch, 8 lanes at a time) ----

// clamp(round_half_even(v), -128, 127) as int32 lanes.
inline __m256i clamp_round8(__m256 v) {
  const __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-128.0f), r)));
}

inline float clamp_round(float v) { return std::min(127.0f, std::max(-128.0f, std::nearbyint(v))); }

// Four vectors of 8 int32 in [-128, 127] -> 32 int8 in order.
inline __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Row i of out from k floats: q = clamp(round(f(x))), f = x / scale (Div) or x * inv + off (static).
template <bool Div>
void quantize_row(const float* x, int k, float scale, float inv, float off, QuantizedX& out, int i) {
  int8_t* dst = &out.q[(size_t)i * out.kp];
  uint8_t* da = &out.a[(size_t)i * out.kp];
  const __m256 vs = _mm256_set1_ps(scale), vi = _mm256_set1_ps(inv), vo = _mm256_set1_ps(off);
  auto f = [&](__m256 v) { return Div ? _mm256_div_ps(v, vs) : _mm256_add_ps(_mm256_mul_ps(v, vi), vo); };
  int j = 0;
  for (; j + 32 <= k; j += 32) {
    __m256i q[4];
    for (int c = 0; c < 4; ++c) q[c] = clamp_round8(f(_mm256_loadu_ps(x + j + 8 * c)));
    const __m256i b = pack32(q[0], q[1], q[2], q[3]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(da + j), gemm_operand32(b));
  }
  for (; j < k; ++j) {
    if (Div) {
      dst[j] = static_cast<int8_t>(clamp_round(x[j] / scale));
    } else {
      const float scaled = x[j] * inv;
      dst[j] = static_cast<int8_t>(clamp_round(scaled + off));
    }
    da[j] = gemm_operand(dst[j]);
  }
}

inline float abs_max(const float* x, int k) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m8 = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= k; j += 8) m8 = _mm256_max_ps(m8, _mm256_and_ps(mask, _mm256_loadu_ps(x + j)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float amax = 0.0f;
  for (float v : lanes) amax = std::max(amax, v);
  for (; j < k; ++j) amax = std::max(amax, std::fabs(x[j]));
  return amax;
}

// A token's symmetric int8 scale from its absmax: max(amax / 127, 1e-8).
inline float dynamic_scale(float amax) { return std::max(amax / 127.0f, kTinyScale); }

// Per-token symmetric quantization of row i: scale = dynamic_scale(amax), q = clamp(round(x / scale)).
float quantize_dynamic_row(const float* row, int k, QuantizedX& out, int i) {
  const float scale = dynamic_scale(abs_max(row, k));
  quantize_row<true>(row, k, scale, 0.0f, 0.0f, out, i);
  return scale;
}

void quantize_dynamic(const float* x, int m, int k, int ldx, QuantizedX& out, float* scales) {
#pragma omp parallel for schedule(static) if ((size_t)m * k > 65536)
  for (int i = 0; i < m; ++i) scales[i] = quantize_dynamic_row(x + (size_t)i * ldx, k, out, i);
}

// Static per-tensor quantization: q = clamp(round(x * inv_scale + offset)).
void quantize_static(const float* x, int m, int k, int ldx, float inv, float off, QuantizedX& out) {
#pragma omp parallel for schedule(static) if ((size_t)m * k > 65536)
  for (int i = 0; i < m; ++i) quantize_row<false>(x + (size_t)i * ldx, k, 1.0f, inv, off, out, i);
}

QuantizedX empty_x(int m, int kp) {
  return QuantizedX{std::vector<int8_t>((size_t)m * kp), std::vector<uint8_t>((size_t)m * kp), kp};
}


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

#ifdef SQ_AVX512VNNI
// 16 bf16 weights as fp32 (the upper 8 zero when half is set: K's last 8 when K is not a multiple of 16).
inline __m512 load_bf16x16(const uint16_t* p, bool half) {
  const __m256i raw = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// One weight row x T tokens (T <= 8) with 512-bit FMAs: the row streams from memory once, the tokens' rows
// stay in L1. out[t] = w . x[t].
template <int T, bool Half>
inline void bf16_row_step(__m512* acc, const uint16_t* w, const float* x, int ldx, int j) {
  const __m512 wv = load_bf16x16(w + j, Half);
  for (int t = 0; t < T; ++t) {
    const float* xt = x + (size_t)t * ldx + j;
    acc[t] = _mm512_fmadd_ps(wv, Half ? _mm512_maskz_loadu_ps(0xff, xt) : _mm512_loadu_ps(xt), acc[t]);
  }
}

template <int T>
inline void row_dot_bf16_tokens(const uint16_t* w, int k, const float* x, int ldx, float* out) {
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  int j = 0;
  for (; j + 16 <= k; j += 16) bf16_row_step<T, false>(acc, w, x, ldx, j);
  if (j < k) bf16_row_step<T, true>(acc, w, x, ldx, j);  // k is a multiple of 8: one half step left
  for (int t = 0; t < T; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}

// 4 weight rows x T tokens (compute-bound batches): each weight and activation vector loaded feeds T and 4 FMAs,
// not 1. Each (row, token) sum runs over the same lanes in the same order as row_dot_bf16_tokens: the same bits.
// out[t * 4 + r] = w[r] . x[t]. (For decode, one row at a time is faster: 4 rows side by side ran 2x slower.)
template <int T, bool Half>
inline void bf16_block_step(__m512* acc, const uint16_t* w, int k, const float* x, int ldx, int j) {
  __m512 wv[4];
  for (int r = 0; r < 4; ++r) wv[r] = load_bf16x16(w + (size_t)r * k + j, Half);
  for (int t = 0; t < T; ++t) {
    const float* xt = x + (size_t)t * ldx + j;
    const __m512 xv = Half ? _mm512_maskz_loadu_ps(0xff, xt) : _mm512_loadu_ps(xt);
    for (int r = 0; r < 4; ++r) acc[t * 4 + r] = _mm512_fmadd_ps(wv[r], xv, acc[t * 4 + r]);
  }
}

template <int T>
inline void bf16_block4(const uint16_t* w, int k, const float* x, int ldx, float* out) {
  __m512 acc[4 * T];
  for (int i = 0; i < 4 * T; ++i) acc[i] = _mm512_setzero_ps();
  int j = 0;
  for (; j + 16 <= k; j += 16) bf16_block_step<T, false>(acc, w, k, x, ldx, j);
  if (j < k) bf16_block_step<T, true>(acc, w, k, x, ldx, j);  // k is a multiple of 8: one half step left
  for (int i = 0; i < 4 * T; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}
#endif

// Rows [n0, n1) x tokens [m0, m1) of y = x W^T (+ bias). Every (row, token) sum is one function of the weight row
// and the token row, whichever tile, block or batch computes it (batch-invariant): logits of a subset of rows or
// tokens have the same bits as those of the whole (the greedy head's screening relies on it).
void bf16_tile(const float* x, int ldx, const uint16_t* w, int k, int n, int m0, int m1, int n0, int n1,
               const float* bias, float* y) {
  float r[16];
  auto put = [&](int i, int j, float v) { y[(size_t)i * n + j] = bias ? v + bias[j] : v; };
#ifdef SQ_AVX512VNNI
  int j0 = n0;
  if (m1 - m0 >= kBf16BlockTokens) {  // compute-bound: 4 x 4 blocks, the tokens' remainder 4 rows at a time
    for (; j0 + 4 <= n1; j0 += 4) {
      int i = m0;
      for (; i + 4 <= m1; i += 4) {
        bf16_block4<4>(w + (size_t)j0 * k, k, x + (size_t)i * ldx, ldx, r);
        for (int t = 0; t < 4; ++t)
          for (int c = 0; c < 4; ++c) put(i + t, j0 + c, r[t * 4 + c]);
      }
      for (; i < m1; ++i) {
        bf16_block4<1>(w + (size_t)j0 * k, k, x + (size_t)i * ldx, ldx, r);
        for (int c = 0; c < 4; ++c) put(i, j0 + c, r[c]);
      }
    }
  }
  for (int j = j0; j < n1; ++j) {  // rows one at a time (one sequential stream from memory), tokens in groups
    const uint16_t* wj = w + (size_t)j * k;
    auto group = [&](auto tokens, int i) {
      constexpr int T = decltype(tokens)::value;
      row_dot_bf16_tokens<T>(wj, k, x + (size_t)i * ldx, ldx, r);
      for (int t = 0; t < T; ++t) put(i + t, j, r[t]);
    };
    int i = m0;
    for (; i + 8 <= m1; i += 8) group(std::integral_constant<int, 8>{}, i);
    for (; i + 4 <= m1; i += 4) group(std::integral_constant<int, 4>{}, i);
    for (; i + 2 <= m1; i += 2) group(std::integral_constant<int, 2>{}, i);
    for (; i < m1; ++i) group(std::integral_constant<int, 1>{}, i);
  }
  return;
#endif
  int j = n0;  // AVX2: one accumulator per (row, token), in blocks of 4 rows
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

// ---- epilogues: each exact int32 result (or 4 of one token's consecutive rows) to its output ----

struct StoreInt32 {
  int32_t* out;
  int n;
  void operator()(int i, int j, int32_t acc) const { out[(size_t)i * n + j] = acc; }
#ifdef SQ_AVX512VNNI
  void rows16(int i, int j, __m512i acc) const { _mm512_storeu_si512(out + (size_t)i * n + j, acc); }
#endif
};

// y = (acc * s_t) * w_scale (+ bias)
struct DynamicEpilogue {
  const float *st, *w_scale, *bias;
  float* y;
  int n;
  void operator()(int i, int j, int32_t acc) const {
    const float v = static_cast<float>(acc) * st[i] * w_scale[j];
    y[(size_t)i * n + j] = bias ? v + bias[j] : v;
  }
#ifdef SQ_AVX512VNNI
  void rows16(int i, int j, __m512i acc) const {
    const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(st[i]));
    __m512 v = _mm512_mul_ps(scaled, _mm512_loadu_ps(w_scale + j));
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    _mm512_storeu_ps(y + (size_t)i * n + j, v);
  }
#endif
};

// y = float(acc + quant_bias) * deq
struct StaticEpilogue {
  const int32_t* quant_bias;
  const float* deq;
  float* y;
  int n;
  void operator()(int i, int j, int32_t acc) const {
    y[(size_t)i * n + j] = static_cast<float>(acc + quant_bias[j]) * deq[j];
  }
#ifdef SQ_AVX512VNNI
  void rows16(int i, int j, __m512i acc) const {
    const __m512i a = _mm512_add_epi32(acc, _mm512_loadu_si512(quant_bias + j));
    _mm512_storeu_ps(y + (size_t)i * n + j, _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_loadu_ps(deq + j)));
  }
#endif
};

}  // namespace

namespace sq {

void quantize_dynamic_rows(const float* x, int m, int k, int ldx, QuantizedX& out, float* scales) {
  for (int i = 0; i < m; ++i) scales[i] = quantize_dynamic_row(x + (size_t)i * ldx, k, out, i);
}

void quantize_static_rows(const float* x, int m, int k, int ldx, float inv, float off, QuantizedX& out) {
  for (int i = 0; i < m; ++i) quantize_row<false>(x + (size_t)i * ldx, k, 1.0f, inv, off, out, i);
}

void dynamic_linear_rows(const int8_t* w, const QuantizedX& x, int m, int n, int n0, int n1, const float* scales,
                         const float* w_scale, const float* bias, float* y) {
  gemm_rows(w, x, m, n, n0, n1, DynamicEpilogue{scales, w_scale, bias, y, n});
}

void static_linear_rows(const int8_t* w, const QuantizedX& x, int m, int n, int n0, int n1,
                        const int32_t* quant_bias, const float* deq, float* y) {
  gemm_rows(w, x, m, n, n0, n1, StaticEpilogue{quant_bias, deq, y, n});
}

void abs_max_rows(const float* x, int m, int k, int ldx, float* absmax) {
  for (int i = 0; i < m; ++i) absmax[i] = abs_max(x + (size_t)i * ldx, k);
}

void quantize_dynamic_rows_at(const float* x, int m, int k, int ldx, const float* absmax, QuantizedX& out,
                              float* scales) {
  for (int i = 0; i < m; ++i) {
    scales[i] = dynamic_scale(absmax[i]);  // quantize_dynamic_row's scale, of the whole row
    quantize_row<true>(x + (size_t)i * ldx, k, scales[i], 0.0f, 0.0f, out, i);
  }
}

void int32_rows(const int8_t* w, const QuantizedX& x, int m, int n, int n0, int n1, int32_t* acc) {
  gemm_rows(w, x, m, n, n0, n1, StoreInt32{acc, n});
}

void dynamic_epilogue_rows(const int32_t* acc, int m, int n, int n0, int n1, const float* scales,
                           const float* w_scale, const float* bias, float* y) {
  const DynamicEpilogue epi{scales, w_scale, bias, y, n};
  for (int i = 0; i < m; ++i)
    for (int j = n0; j < n1; ++j) epi(i, j, acc[(size_t)i * n + j]);
}

void static_epilogue_rows(const int32_t* acc, int m, int n, int n0, int n1, const int32_t* quant_bias,
                          const float* deq, float* y) {
  const StaticEpilogue epi{quant_bias, deq, y, n};
  for (int i = 0; i < m; ++i)
    for (int j = n0; j < n1; ++j) epi(i, j, acc[(size_t)i * n + j]);
}

void bf16_linear_rows(const float* x, int m, int k, int ldx, const uint16_t* w, int n, int n0, int n1,
                      const float* bias, float* y) {
  for (int m0 = 0; m0 < m; m0 += kTokTile)  // the token tiles sq_bf16_linear runs (they set the sum order)
    for (int r = n0; r < n1; r += kRowTile)
      bf16_tile(x, ldx, w, k, n, m0, std::min(m, m0 + kTokTile), r, std::min(n1, r + kRowTile), bias, y);
}

}  // namespace sq

extern "C" {

// The instruction set this library was built for: 2 = AMX (on AVX-512 VNNI), 1 = AVX-512 VNNI, 0 = AVX2.
int sq_isa() {
#if defined(SQ_AMX)
  return 2;
#elif defined(SQ_AVX512VNNI)
  return 1;
#else
  return 0;
#endif
}

// Whether the AMX build's tiles run in this process (the OS granted their state); 0 in the other builds.
int sq_amx_ready() {
#ifdef SQ_AMX
  return amx_permitted();
#else
  return 0;
#endif
}

// out int32 [M, N] = x_q int8 [M, K] (row stride ldx) @ w int8 [N, Kp]^T.
void sq_int8_gemm(const int8_t* xq, int m, int k, int ldx, const int8_t* w, int n, int kp, int32_t* out) {
  QuantizedX x = empty_x(m, kp);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < k; ++j) {
      const int8_t v = xq[(size_t)i * ldx + j];
      x.q[(size_t)i * kp + j] = v;
      x.a[(size_t)i * kp + j] = gemm_operand(v);
    }
  gemm(w, x, m, n, StoreInt32{out, n});
}

// W8A8_DYNAMIC: y [M, N] = (acc * s_t) * w_scale (+ bias), x quantized per token.
void sq_dynamic_linear(const float* x, int m, int k, int ldx, const int8_t* w, int n, int kp, const float* w_scale,
                       const float* bias, float* y) {
  QuantizedX xq = empty_x(m, kp);
  std::vector<float> s_t(m);
  quantize_dynamic(x, m, k, ldx, xq, s_t.data());
  gemm(w, xq, m, n, DynamicEpilogue{s_t.data(), w_scale, bias, y, n});
}

// W8A8 (static): y [M, N] = float(acc + quant_bias) * deq_scale, x quantized with one scale and offset.
void sq_static_linear(const float* x, int m, int k, int ldx, float inv_scale, float offset, const int8_t* w, int n,
                      int kp, const int32_t* quant_bias, const float* deq, float* y) {
  QuantizedX xq = empty_x(m, kp);
  quantize_static(x, m, k, ldx, inv_scale, offset, xq);
  gemm(w, xq, m, n, StaticEpilogue{quant_bias, deq, y, n});
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
