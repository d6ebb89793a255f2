"""Greedy decoding without reading the whole float LM head: an int8 copy screens, a few float rows decide.

Plain greedy sampling needs only the argmax of the logits x W^T, and on a small model's CPU decode step the LM
head's bf16 weight is a large share of the bytes read. A per-row int8 copy of W (half the bytes) gives every logit
to within a proven bound; only rows whose upper bound reaches the best lower bound can hold the maximum. Those few
rows (docs/benchmarks.md: how few) are computed with the float weight, by the same kernel as the full head, whose
sums do not depend on which rows share the call (csrc/int8_cpu.cpp: bf16_tile). So the token is the argmax of
exactly the logits the full head computes, ties going to the first index as torch.argmax does.

The bound, for a token row x [K] and a weight row w [K] with w = s_w * q + e (q int8, |e_i| <= s_w / 2), and x
held as s_x * p + d (p int16, |d_i| <= s_x / 2, split into two int8 halves for the int8 GEMM):
    |x . w - s_x * s_w * (p . q)| <= s_w / 2 * |x|_1 + s_x / 2 * s_w * |q|_1
plus the float kernel's own fp32 summation error, at most 2 K u |x|_inf |w|_1 (u = 2^-24). int8 activations
would not do: one outlier channel of the final norm's output (|x|_inf of 20 against a mean of 1) widens the
bound to thousands of candidates; 16-bit activations shrink that term 256-fold.
"""

from __future__ import annotations

import torch

from slimquant.backends.native_ops import NATIVE_MAX_TOKENS, NativeOps
from slimquant.format.primitives import int8_matmul_reference
from slimquant.kernels import native

P_MAX = 127 * 256 + 127  # |p| <= P_MAX keeps both int8 halves of p = 256 * hi + lo within [-127, 127]
_SLACK = 1.0 + 1e-4  # covers the fp32 rounding of q = round(w / s_w) and of s_w itself
_FP32_SUM = 2.0 * 2.0**-24  # per term: the float kernel's summation error, with room (K u / (1 - K u) <= 2 K u)
_BUILD_ROWS = 8192  # weight rows quantized at a time (bounds the fp32 temporary)
TOP_K_MAX = 256  # top-k sampling takes the screen up to this k
_CANDIDATE_CAP = 4096  # candidates per token above which the whole head is computed instead


class GreedyHead:
    """argmax(x W^T) per token row for a bf16 weight W [V, K] held for the native float kernel, on CPU."""

    def __init__(self, weight: torch.Tensor, ops: NativeOps):
        assert usable(weight), "GreedyHead needs a CPU bf16 weight"
        self.lib = ops.lib
        self.weight = weight  # [V, K] bf16, the float head's own tensor (not copied)
        q, self.row_terms = quantize_rows(weight)  # int8 [V, K]; [3, V] fp32: the bound's per-row factors
        self.packed = ops.pack_weight(q)  # int8 for the native GEMM

    def screen_bytes(self) -> int:
        """Bytes the screen reads per step (the int8 copy and the per-row factors; the candidates' rows aside)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.row_terms))

    def argmax(self, x: torch.Tensor) -> list[int] | None:
        """x fp32 [T, K] -> the argmax token of each row's logits; None where the screen does not apply
        (non-finite x, or more tokens than the native float kernel takes)."""
        if x.dtype != torch.float32 or x.shape[0] > NATIVE_MAX_TOKENS:
            return None
        x = native.rows_contiguous(x)
        (t, k), v = x.shape, self.weight.shape[0]
        tokens = torch.empty(t, dtype=torch.int64)
        status = self.lib.sq_greedy_argmax(
            x.data_ptr(), t, k, x.stride(0), self.packed.data_ptr(), v, self.packed.shape[1],
            self.row_terms.data_ptr(), self.weight.data_ptr(), _SLACK, _FP32_SUM, tokens.data_ptr(),
        )  # fmt: skip
        return None if status else tokens.tolist()

    def top_k_candidates(self, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x fp32 [T, K] -> (ids int64 [T, C], logits fp32 [T, C]): each token's rows that can be among its top_k
        largest logits, ascending, with their exact logits (the full head's bits), padded with -inf; None where
        the screen does not apply (as argmax, or too many candidates). Top-k sampling over them keeps the same
        tokens with the same probabilities as over the whole vocabulary."""
        if x.dtype != torch.float32 or x.shape[0] > NATIVE_MAX_TOKENS or not 0 < top_k <= TOP_K_MAX:
            return None
        x = native.rows_contiguous(x)
        (t, k), v = x.shape, self.weight.shape[0]
        ids = torch.empty(t, _CANDIDATE_CAP, dtype=torch.int64)
        logits = torch.empty(t, _CANDIDATE_CAP, dtype=torch.float32)
        counts = torch.empty(t, dtype=torch.int32)
        status = self.lib.sq_topk_screen(
            x.data_ptr(), t, k, x.stride(0), self.packed.data_ptr(), v, self.packed.shape[1],
            self.row_terms.data_ptr(), self.weight.data_ptr(), _SLACK, _FP32_SUM, top_k, _CANDIDATE_CAP,
            ids.data_ptr(), logits.data_ptr(), counts.data_ptr(),
        )  # fmt: skip
        if status:
            return None
        width = int(counts.max())
        ids, logits = ids[:, :width], logits[:, :width]  # [T, C]
        padding = torch.arange(width)[None, :] >= counts[:, None]  # [T, C]
        return ids.masked_fill(padding, 0), logits.masked_fill(padding, float("-inf"))


def screen_reference(x: torch.Tensor, q: torch.Tensor, row_terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The screen's definition in torch (csrc/greedy_cpu.cpp computes the same): x fp32 [T, K], the head's int8 copy
    q [V, K] and row_terms [3, V] (quantize_rows) -> approximate logits [T, V] and their error bound, float64."""
    s_w, q_l1, w_l1 = row_terms.double()  # [V] each
    x64 = x.double()  # [T, K]
    amax = x.abs().amax(dim=1).double()  # [T]
    s_x = torch.where(amax > 0, amax / P_MAX, torch.ones_like(amax))  # [T]
    p = torch.round(x64 / s_x[:, None]).clamp_(-P_MAX, P_MAX).to(torch.int32)  # [T, K]
    lo = torch.remainder(p + 128, 256) - 128  # [T, K] in [-128, 127]
    hi = torch.div(p - lo, 256, rounding_mode="floor")  # [T, K] in [-127, 127]
    dots = [int8_matmul_reference(h.to(torch.int8), q).double() for h in (hi, lo)]  # [T, V] each, exact
    approx = (dots[0] * 256 + dots[1]) * s_x[:, None] * s_w  # [T, V]
    l1 = x64.abs().cumsum(dim=1)[:, -1]  # [T], summed left to right as the native screen does
    c0, c1, c2 = (c[:, None] for c in (l1 / 2, s_x / 2, amax * (_FP32_SUM * x.shape[1])))  # [T, 1] each
    bound = ((c0 * s_w + c1 * (s_w * q_l1)) + c2 * w_l1) * _SLACK  # [T, V]
    return approx, bound


def candidates(approx: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """[T, V] bool: rows whose upper bound reaches the token's best lower bound (every row that can be the max)."""
    return approx + bound >= (approx - bound).amax(dim=1, keepdim=True)


def usable(weight: torch.Tensor) -> bool:
    """Whether a head weight runs on the native bf16 kernel, which the screen's exactness needs."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of weight [V, K] -> q int8 [V, K] and fp32 [3, V]: s_w, |q|_1 (exact integers) and
    |w|_1 rounded up (so the bound stays a bound)."""
    v, k = weight.shape
    q = torch.empty(v, k, dtype=torch.int8)
    terms = torch.empty(3, v, dtype=torch.float32)
    for r0 in range(0, v, _BUILD_ROWS):
        w = weight[r0 : r0 + _BUILD_ROWS].float()  # [R, K]
        s = (w.abs().amax(dim=1) / 127).clamp_(min=1e-30)  # [R]
        qr = torch.round(w / s[:, None]).clamp_(-127, 127)  # [R, K]
        q[r0 : r0 + len(w)] = qr.to(torch.int8)
        w_l1 = w.double().abs().sum(dim=1)  # [R]
        up = w_l1.float()
        terms[:, r0 : r0 + len(w)] = torch.stack(
            [s, qr.abs().sum(dim=1), torch.where(up.double() < w_l1, torch.nextafter(up, up + 1), up)]
        )
    return q, terms
