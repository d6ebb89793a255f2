"""The cpu-native backend's ops: the native CPU kernels (kernels/csrc; AVX2, AVX-512 VNNI or AMX) for fp32
activations, computing TorchOps' numbers bit for bit (exact int32 products, then the same float steps in the same
order).

Weight forms: `pack_weight` pads int8 [N, K] to Kp (a multiple of 32, one byte per weight); the AVX-512 VNNI and
AMX builds lay each whole block of 16 rows out as [Kp / 4, 16, 4] so that one 64-byte load feeds 16 rows (and
each 64 bytes of K of a block is one AMX tile). A weight holding -128 (which the AVX2 kernel's sign trick cannot
take) keeps TorchOps' exact fp32 form. `pack_float_weight` holds an fp32 weight whose values are all exact bf16 as
bf16: half the bytes, the same values, multiplied in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimquant.backends.native_ranks import NativeRanks
from slimquant.backends.torch_ops import KvQuant, Rope, TorchOps
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.format.primitives import QMIN
from slimquant.kernels import native, weight_memory
from slimquant.layers.context import ForwardContext

# The native bf16 kernel runs up to this many rows; above, fp32 BLAS on a temporary fp32 copy is faster
# (docs/benchmarks.md). Its sums per (row, token) do not depend on the batch below it.
NATIVE_MAX_TOKENS = 128
KV_CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # what the native attention holds: SqStep
W_TYPES = {torch.float32: 0, torch.bfloat16: 1}  # the weights sq_head_matmul reads
_BLOCK_ROWS = 16  # the VNNI build's row blocks (csrc/int8_cpu.cpp: kBlockRows)
_K_MULTIPLE = 8  # the bf16 kernel reads 8 values at a time


class NativeOps(TorchOps):
    """TorchOps with the native kernels wherever the activations are fp32 on the CPU (the cpu-native backend's
    activation dtype); other inputs take TorchOps' definitions."""

    name = "native"

    def __init__(self, lib: native.Library, hugepages: bool = True, bf16_prefill_attention: bool = False):
        """bf16_prefill_attention: see TorchOps (the backend sets it where the CPU has native bf16)."""
        self.lib, self.hugepages = lib, hugepages
        self.bf16_prefill_attention = bf16_prefill_attention
        self.native_ranks: NativeRanks | None = None  # the split experts' ranks (_ranks)

    # ---- norms and activation ----

    def add_rms_norm(self, x, residual, weight, bias, eps):
        unit_stride = x.dim() == 2 and x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
        if not (unit_stride and _fp32(x, residual, weight, bias)):
            return super().add_rms_norm(x, residual, weight, bias, eps)
        t, h = x.shape
        summed, y = torch.empty(t, h), torch.empty(t, h)  # [T, H] each
        self.lib.sq_add_rms_norm(
            x=x.data_ptr(), t=t, h=h, ldx=x.stride(0), residual=_ptr(residual),
            ldr=0 if residual is None else residual.stride(0), weight=weight.data_ptr(), bias=_ptr(bias), eps=eps,
            sum_out=summed.data_ptr(), y=y.data_ptr(),
        )  # fmt: skip
        return y, summed

    def rms_norm(self, x, weight, bias, eps):
        if x.dim() == 2:
            return self.add_rms_norm(x, None, weight, bias, eps)[0]
        if not (heads_packed(x) and _fp32(x, weight, bias)):  # [T, heads, D], each token's heads contiguous
            return super().rms_norm(x, weight, bias, eps)
        t, heads, d = x.shape
        y = torch.empty(t, heads, d)
        self.lib.sq_rms_norm_heads(
            x=x.data_ptr(), t=t, heads=heads, d=d, ldx=x.stride(0), weight=weight.data_ptr(), bias=_ptr(bias),
            eps=eps, y=y.data_ptr(), ldy=heads * d,
        )  # fmt: skip
        return y

    def silu_and_mul(self, x):
        if x.dim() != 2 or x.stride(-1) != 1 or not _fp32(x):
            return super().silu_and_mul(x)
        t, inter = x.shape[0], x.shape[1] // 2
        y = torch.empty(t, inter)  # [T, I]
        self.lib.sq_silu_and_mul(x=x.data_ptr(), t=t, inter=inter, ldx=x.stride(0), y=y.data_ptr())
        return y

    # ---- attention ----

    def attention(
        self, q, k, v, rope: Rope, kv_cache, ctx: ForwardContext, scale: float, kv_quant=None, out_quant=None
    ):
        """Decode steps: rope (on all of each head or its first part), cache write and attention in one native call;
        prefill: TorchOps (SDPA)."""
        cos, sin = (None, None) if rope is None else (rope[0].contiguous(), rope[1].contiguous())  # [B, R <= D]
        native_step = ctx.is_decode and not ctx.graph_step and kv_cache_ready(kv_cache)
        if not (native_step and _fp32(q, k, v, cos, sin) and all(heads_packed(t) for t in (q, k, v))):
            return super().attention(q, k, v, rope, kv_cache, ctx, scale, kv_quant)
        kq = kv_quant_struct(self.lib, kv_quant)
        b, nh, d = q.shape
        out = torch.empty(b, nh * d)  # [B, NH * D]
        step = step_rows(self.lib, ctx.slot_mapping, ctx.block_tables, ctx.context_lens_tensor, kv_cache)
        self.lib.sq_decode_attention(
            q=q.data_ptr(), ldq=q.stride(0), k=k.data_ptr(), ldk=k.stride(0), v=v.data_ptr(), ldv=v.stride(0),
            cos=_ptr(cos), sin=_ptr(sin), rope_dim=0 if cos is None else cos.shape[1], k_cache=kv_cache[0].data_ptr(),
            v_cache=kv_cache[1].data_ptr(), step=step, num_heads=nh, num_kv_heads=k.shape[1], head_dim=d,
            scale=scale, kv_quant=kq, out=out.data_ptr(),
        )  # fmt: skip
        return out

    def mla_decode(self, q, cache, ctx: ForwardContext, scale: float, rank: int):
        """One native call over the paged latent cache (fp32 or bf16): each row's cached entries read once for all
        its heads, in place (no gathered fp32 copy); a head's sums do not depend on the heads beside it."""
        if ctx.graph_step or not (heads_packed(q) and _fp32(q) and kv_cache_ready(cache) and cache.dtype != torch.int8):
            return super().mla_decode(q, cache, ctx, scale, rank)
        b, nh, d = q.shape
        out = torch.empty(b, nh, rank)  # [B, NH, R]
        step = step_rows(self.lib, ctx.slot_mapping, ctx.block_tables, ctx.context_lens_tensor, cache[..., None, :])
        self.lib.sq_mla_decode_attention(
            q=q.data_ptr(), ldq=q.stride(0), cache=cache.data_ptr(), step=step, num_heads=nh, head_dim=d, rank=rank,
            scale=scale, out=out.data_ptr(),
        )  # fmt: skip
        return out

    def head_matmul(self, x, w, transposed=False):
        """One native call over every head, reading a bf16 (or fp32) w in place instead of an fp32 copy of it."""
        k, n = (w.shape[2], w.shape[1]) if transposed else (w.shape[1], w.shape[2])
        columns = k if transposed else n  # the kernels read w_h's rows 8 values at a time
        fits = x.dim() == w.dim() == 3 and x.stride(2) == w.stride(2) == 1 and columns % 8 == 0
        if not (fits and _fp32(x) and w.dtype in W_TYPES and w.device.type == "cpu"):
            return super().head_matmul(x, w, transposed)
        b, nh = x.shape[:2]
        y = torch.empty(b, nh, n)  # [B, NH, N]
        self.lib.sq_head_matmul(
            x=x.data_ptr(), b=b, heads=nh, k=k, ldx_b=x.stride(0), ldx_h=x.stride(1), w=w.data_ptr(),
            w_type=W_TYPES[w.dtype], n=n, ldw=w.stride(1), ldw_head=w.stride(0), transposed=int(transposed),
            y=y.data_ptr(),
        )  # fmt: skip
        return y

    def rotate(self, x, rope):
        cos, sin = rope
        fits = heads_packed(x) and cos.shape == sin.shape == (x.shape[0], x.shape[2])
        if not (fits and _fp32(x, cos, sin) and cos.is_contiguous() and sin.is_contiguous()):
            return super().rotate(x, rope)
        t, heads, d = x.shape
        y = torch.empty(t, heads, d)  # [T, heads, D]
        self.lib.sq_rope_heads(
            x=x.data_ptr(), t=t, heads=heads, d=d, ldx=x.stride(0), cos=cos.data_ptr(), sin=sin.data_ptr(),
            y=y.data_ptr(), ldy=heads * d,
        )  # fmt: skip
        return y

    # ---- int8 linears ----

    def pack_weight(self, w_q):
        if w_q.device.type != "cpu" or (w_q.numel() and int(w_q.min()) <= QMIN):
            return super().pack_weight(w_q)
        k = w_q.shape[-1]
        padded = self._empty((*w_q.shape[:-1], -(-k // native.K_ALIGN) * native.K_ALIGN), torch.int8)  # [..., N, Kp]
        padded[..., k:] = 0
        padded[..., :k] = w_q
        if self.lib.isa != "avx2":  # the VNNI and AMX builds read 16-row blocks
            block_rows(padded)
        return padded

    def int8_mm(self, x_q, packed):
        if not is_native_weight(packed):
            return super().int8_mm(x_q, packed)
        x_q = native.rows_contiguous(x_q)
        out = torch.empty(x_q.shape[0], packed.shape[0], dtype=torch.int32)  # [T, N]
        self.lib.sq_int8_gemm(
            xq=x_q.data_ptr(), m=x_q.shape[0], k=x_q.shape[1], ldx=x_q.stride(0), w=packed.data_ptr(),
            n=packed.shape[0], kp=packed.shape[1], out=out.data_ptr(),
        )  # fmt: skip
        return out

    def quantize_per_token(self, x, absmax=None):
        if absmax is not None:
            return super().quantize_per_token(x, absmax)
        xf = native.rows_contiguous(x.float())  # [T, K]
        x_q = torch.empty(xf.shape, dtype=torch.int8)
        scale = torch.empty(xf.shape[0], 1, dtype=torch.float32)
        self.lib.sq_quantize_per_token(
            x=xf.data_ptr(), m=xf.shape[0], k=xf.shape[1], ldx=xf.stride(0), xq=x_q.data_ptr(), scales=scale.data_ptr()
        )
        return x_q, scale

    def dynamic_linear(self, x, packed, w_scale, bias, out_dtype, tp=SINGLE):
        if tp.size > 1 or not is_native_weight(packed):  # the fused kernel cannot reduce across ranks
            return super().dynamic_linear(x, packed, w_scale, bias, out_dtype, tp)
        xf = native.rows_contiguous(x.float())  # [T, K]
        bias = None if bias is None else bias.float()
        y = torch.empty(xf.shape[0], packed.shape[0], dtype=torch.float32)  # [T, N]
        self.lib.sq_dynamic_linear(
            x=xf.data_ptr(), m=xf.shape[0], k=xf.shape[1], ldx=xf.stride(0), w=packed.data_ptr(), n=packed.shape[0],
            kp=packed.shape[1], w_scale=w_scale.data_ptr(), bias=_ptr(bias), y=y.data_ptr(),
        )  # fmt: skip
        return y.to(out_dtype)

    def static_linear(self, x, packed, inv_scale, offset, quant_bias, deq_scale, out_dtype, tp=SINGLE):
        fits = is_native_weight(packed) and x.dtype == torch.float32 and inv_scale.dtype == torch.float32
        if tp.size > 1 or not fits:
            return super().static_linear(x, packed, inv_scale, offset, quant_bias, deq_scale, out_dtype, tp)
        x = native.rows_contiguous(x)  # [T, K]
        y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32)  # [T, N]
        self.lib.sq_static_linear(
            x=x.data_ptr(), m=x.shape[0], k=x.shape[1], ldx=x.stride(0), inv_scale=float(inv_scale),
            offset=float(offset), w=packed.data_ptr(), n=packed.shape[0], kp=packed.shape[1],
            quant_bias=quant_bias.data_ptr(), deq=deq_scale.data_ptr(), y=y.data_ptr(),
        )  # fmt: skip
        return y.to(out_dtype)

    # ---- MoE ----

    def softmax_topk(self, x, weight, top_k, renormalize, scaling, n_group=1, topk_group=1):
        """The router in one native call (csrc/moe_cpu.cpp), in the serial pieces the decoder stack routes with:
        a MoE layer routes alike per op and in the whole step. Other inputs: TorchOps'."""
        rows_ok = x.dim() == 2 and x.stride(-1) == 1 and _fp32(x, weight) and weight.is_contiguous()  # [T, H]
        if not rows_ok or x.shape[1] != weight.shape[1]:
            return super().softmax_topk(x, weight, top_k, renormalize, scaling, n_group, topk_group)
        t, logits = x.shape[0], _blas_logits(x, weight)
        ids, weights = torch.empty(t, top_k, dtype=torch.int64), torch.empty(t, top_k)  # [T, K] each
        self.lib.sq_moe_route(
            x=x.data_ptr(), t=t, h=x.shape[1], ldx=x.stride(0), router=weight.data_ptr(), num_experts=weight.shape[0],
            logits=_ptr(logits), n_group=n_group, topk_group=topk_group, top_k=top_k, renormalize=int(renormalize),
            scaling=scaling, ids=ids.data_ptr(), weights=weights.data_ptr(),
        )  # fmt: skip
        return weights, ids

    def biased_group_topk(self, x, weight, bias, n_group, topk_group, top_k, renormalize, scaling):
        """The biased sigmoid router in one native call (csrc/moe_cpu.cpp's serial pieces, as softmax_topk's).
        Other inputs: TorchOps'."""
        rows_ok = x.dim() == 2 and x.stride(-1) == 1 and _fp32(x, weight, bias) and weight.is_contiguous()  # [T, H]
        if not rows_ok or x.shape[1] != weight.shape[1] or not bias.is_contiguous():
            return super().biased_group_topk(x, weight, bias, n_group, topk_group, top_k, renormalize, scaling)
        t, logits = x.shape[0], _blas_logits(x, weight)
        ids, weights = torch.empty(t, top_k, dtype=torch.int64), torch.empty(t, top_k)  # [T, K] each
        self.lib.sq_moe_route_biased(
            x=x.data_ptr(), t=t, h=x.shape[1], ldx=x.stride(0), router=weight.data_ptr(), num_experts=weight.shape[0],
            logits=_ptr(logits), bias=bias.data_ptr(), n_group=n_group, topk_group=topk_group, top_k=top_k,
            renormalize=int(renormalize), scaling=scaling, ids=ids.data_ptr(), weights=weights.data_ptr(),
        )  # fmt: skip
        return weights, ids

    def shared_gate(self, x, weight):
        """The gate in one native call (csrc/moe_cpu.cpp's shared_gate, which the decoder stack calls too), for fp32
        rows and weight; other inputs: TorchOps'."""
        rows_ok = x.dim() == 2 and x.stride(-1) == 1 and _fp32(x, weight) and weight.is_contiguous()  # [T, H]
        if not rows_ok or weight.shape != (1, x.shape[1]):
            return super().shared_gate(x, weight)
        out = torch.empty(x.shape[0], 1)  # [T, 1]
        self.lib.sq_shared_gate(
            x=x.data_ptr(), t=x.shape[0], h=x.shape[1], ldx=x.stride(0), w=weight.data_ptr(), out=out.data_ptr()
        )
        return out

    groups_experts = True
    groups_split_experts = True

    def grouped_experts(
        self, x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, first=None, tp=SINGLE, summed=False
    ):
        """The routed experts of fp32 rows in one native call (csrc/moe_cpu.cpp), which calls tp's collectives back
        where the experts are split and adds each token's products in expert order where summed: RoutedExperts'
        expert-by-expert numbers; None for other inputs (it then runs them one by one)."""
        rows_ok = isinstance(x, torch.Tensor) and x.dim() == 2 and x.stride(-1) == 1 and _fp32(x)  # [T, H]
        weights_ok = all(is_native_weight(w) and w.is_contiguous() for w in (w13, w2))
        scales_ok = w13_scale.dtype == w2_scale.dtype and w13_scale.dtype in (torch.float32, torch.bfloat16)
        if not (rows_ok and weights_ok and scales_ok and w13_scale.is_contiguous() and w2_scale.is_contiguous()):
            return None
        t, k = topk_ids.shape
        ids = topk_ids.to(torch.int64).contiguous()  # [T, K]
        weights = topk_weights.float().contiguous()  # [T, K]
        out = torch.empty(t, x.shape[1]) if summed else torch.empty(t, k, x.shape[1])  # [T, H] or [T, K, H]
        ranks = self._ranks(tp)
        failed = self.lib.sq_routed_experts(
            x=x.data_ptr(), t=t, h=x.shape[1], ldx=x.stride(0), ids=ids.data_ptr(), weights=weights.data_ptr(), k=k,
            first=first or 0, num_local=w13.shape[0], inter=w13.shape[1] // 2, w13=w13.data_ptr(), kp13=w13.shape[2],
            w2=w2.data_ptr(), kp2=w2.shape[2], s13=w13_scale.data_ptr(), s2=w2_scale.data_ptr(),
            scales_bf16=int(w13_scale.dtype == torch.bfloat16), ranks=None if ranks is None else ranks.struct,
            summed=int(summed), out=out.data_ptr(),
        )  # fmt: skip
        if failed:
            assert ranks is not None, "only a reduction across ranks fails"
            ranks.raise_failure()
        return out

    def _ranks(self, tp: TensorParallel) -> NativeRanks | None:
        """tp as the native calls reduce across it (kept while tp stays the same); None for one process."""
        if tp.size == 1:
            return None
        if self.native_ranks is None or self.native_ranks.tp is not tp:
            self.native_ranks = NativeRanks(self.lib, tp)
        return self.native_ranks

    # ---- float linears ----

    def pack_float_weight(self, w):
        exact_bf16 = w.dim() == 2 and w.shape[1] % _K_MULTIPLE == 0 and w.dtype == torch.float32
        if w.device.type != "cpu" or not exact_bf16 or not torch.equal((w16 := w.bfloat16()).float(), w):
            return w
        return self._empty(tuple(w16.shape), torch.bfloat16).copy_(w16)

    def float_linear(self, x, w, bias=None):
        if w.dtype != torch.bfloat16 or x.dtype != torch.float32 or x.shape[0] > NATIVE_MAX_TOKENS:
            return super().float_linear(x, w, bias)
        x = native.rows_contiguous(x)  # [T, K]
        bias = None if bias is None else bias.float().contiguous()
        y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)  # [T, N]
        self.lib.sq_bf16_linear(
            x=x.data_ptr(), m=x.shape[0], k=x.shape[1], ldx=x.stride(0), w=w.data_ptr(), n=w.shape[0], bias=_ptr(bias),
            y=y.data_ptr(),
        )  # fmt: skip
        return y

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return weight_memory.empty(shape, dtype) if self.hugepages else torch.empty(shape, dtype=dtype)


def block_rows(padded: torch.Tensor) -> None:
    """In place: each whole block of 16 rows [16, Kp] of padded [..., N, Kp] laid out as [Kp / 4, 16, 4], the
    VNNI kernels' form (csrc/int8_cpu.cpp); the last N % 16 rows stay as they are."""
    n, kp = padded.shape[-2:]
    full = n - n % _BLOCK_ROWS
    for matrix in padded.view(-1, n, kp) if full else ():  # one expert at a time: a temporary of one matrix
        rows = matrix[:full]  # [full, Kp], contiguous
        blocks = rows.view(full // _BLOCK_ROWS, _BLOCK_ROWS, kp // 4, 4)  # [B, 16, Kp/4, 4]
        rows.copy_(blocks.transpose(1, 2).reshape(full, kp))  # [B, Kp/4, 16, 4]


def is_native_weight(packed: torch.Tensor) -> bool:
    """An int8 weight in NativeOps.pack_weight's form (not TorchOps' fp32 one)."""
    return packed.dtype == torch.int8 and packed.device.type == "cpu"


def heads_packed(x: torch.Tensor) -> bool:
    """x [T, heads, D] with each token's heads contiguous (a row stride of its own is fine)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def kv_cache_ready(*caches: torch.Tensor) -> bool:
    """Every cache is contiguous on the CPU in one dtype the native kernels hold (fp32, bf16 or int8)."""
    dtype = caches[0].dtype
    return dtype in KV_CACHE_TYPES and all(
        c.dtype == dtype and c.device.type == "cpu" and c.is_contiguous() for c in caches
    )


def step_rows(lib: native.Library, slots, block_tables, context_lens, cache: torch.Tensor):
    """An SqStep (csrc/exports.h) for rows with these slots [B] int64, block tables [B, W] int32 and context
    lengths [B] int32 over caches like `cache` [.., NB, BS, KVH, D] (its dtype and block size)."""
    return lib.structs["SqStep"](
        batch=slots.shape[0], kv_type=KV_CACHE_TYPES[cache.dtype], block_size=cache.shape[-3],
        max_blocks=block_tables.shape[1], slots=slots.data_ptr(), block_tables=block_tables.data_ptr(),
        context_lens=context_lens.data_ptr(),
    )  # fmt: skip


def kv_quant_struct(lib: native.Library, kv_quant: KvQuant | None):
    """The SqKvQuant (csrc/exports.h) of an int8 cache's parameters (fp32 [KVH, D] each); all null without."""
    if kv_quant is None:
        return lib.structs["SqKvQuant"]()
    assert all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu" for t in kv_quant)
    return lib.structs["SqKvQuant"](**{name: t.data_ptr() for name, t in kv_quant._asdict().items()})


def _blas_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """A router's logits [T, E] by BLAS above NATIVE_MAX_TOKENS rows (its GEMM is faster there), else None: the
    native router computes them, as the decoder stack does (whose MoE steps stay within NATIVE_MAX_TOKENS rows)."""
    return F.linear(x, weight).contiguous() if x.shape[0] > NATIVE_MAX_TOKENS else None


def _fp32(*ts: torch.Tensor | None) -> bool:
    """Every tensor given (None skipped) is fp32 on the CPU: the native kernels' dtype."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in ts)


def _ptr(t: torch.Tensor | None) -> int | None:
    """t's data pointer, or None (a null pointer)."""
    return None if t is None else t.data_ptr()
