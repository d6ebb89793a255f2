"""Native fused ops for a decoder layer's non-GEMM work: residual add + RMSNorm, SiLU-and-mul, decode attention.

A decode step of a small model is dominated by per-op overhead, not arithmetic: these replace a dozen torch
ops each with one call. Each returns None where it does not apply (not CPU fp32, no native kernels), and the
caller then runs its pure-torch definition.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch

from slimquant.kernels import native
from slimquant.kernels.float_ops import NATIVE_MAX_TOKENS


def _fp32_cpu(*ts: torch.Tensor | None) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in ts)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(norm(x + residual) * weight (+ bias), x + residual) for x [T, H]; None where the native op does not apply."""
    if x.dim() != 2 or not native.available() or not _fp32_cpu(x, residual, weight, bias):
        return None
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        return None
    t, h = x.shape
    summed, y = torch.empty(t, h), torch.empty(t, h)  # [T, H] each
    native.library().sq_add_rms_norm(
        x.data_ptr(), t, h, x.stride(0), None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(),
        eps, summed.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    return y, summed


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor | None:
    """Per-head RMSNorm of x [T, heads, D] (each token's heads contiguous) -> [T, heads, D]; None where the
    native op does not apply."""
    if not native.available() or not _fp32_cpu(x, weight, bias) or not _heads_packed(x):
        return None
    t, heads, d = x.shape
    y = torch.empty(t, heads, d)  # [T, heads, D]
    native.library().sq_rms_norm_heads(
        x.data_ptr(), t, heads, d, x.stride(0), weight.data_ptr(), _ptr(bias), eps, y.data_ptr(), heads * d
    )
    return y


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for x [T, 2I] = [gate | up] -> [T, I]; None where the native op does not apply."""
    if x.dim() != 2 or x.stride(-1) != 1 or not native.available() or not _fp32_cpu(x):
        return None
    t, inter = x.shape[0], x.shape[1] // 2
    y = torch.empty(t, inter)  # [T, I]
    native.library().sq_silu_and_mul(x.data_ptr(), t, inter, x.stride(0), y.data_ptr())
    return y


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    caches: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """One decode token per sequence: rotate q/k (neox, if rope), store k/v at slots, attend -> [B, NH * D].

    q [B, NH, D], k/v [B, KVH, D] (rows may be strided); rope: (cos, sin) [B, D]; caches [NB, BS, KVH, D];
    slots int64 [B]; block_tables int32 [B, max_blocks]; context_lens int32 [B]. None where it does not apply.
    """
    k_cache, v_cache = caches
    cos, sin = rope if rope is not None else (None, None)
    if not native.available() or not _fp32_cpu(q, k, v, k_cache, v_cache, cos, sin):
        return None
    if not (_heads_packed(q) and _heads_packed(k) and _heads_packed(v) and k_cache.is_contiguous()):
        return None
    if not (v_cache.is_contiguous() and (cos is None or (cos.is_contiguous() and sin.is_contiguous()))):
        return None
    b, nh, d = q.shape
    out = torch.empty(b, nh * d)  # [B, NH * D]
    native.library().sq_decode_attention(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1],
        context_lens.data_ptr(), k_cache.shape[1], b, nh, k.shape[1], d, scale, out.data_ptr(),
    )  # fmt: skip
    return out


def _heads_packed(x: torch.Tensor) -> bool:
    """x [T, heads, D] with each token's heads contiguous (a row stride of its own is fine)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


# ---- a whole decoder layer per decode step (csrc/layer_cpu.cpp) ----

_LINEAR_KIND = {"dynamic": 1, "static": 2, "bf16": 3}


class NativeLinear(ctypes.Structure):
    """A linear's runtime form for sq_decoder_layer (field order = struct SqLinear)."""

    _fields_ = [
        ("kind", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("kp", ctypes.c_int32),
        ("w", ctypes.c_void_p), ("w_scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("quant_bias", ctypes.c_void_p), ("deq_scale", ctypes.c_void_p),
        ("inv_scale", ctypes.c_float), ("offset", ctypes.c_float),
    ]  # fmt: skip


class NativeDecoderLayer(ctypes.Structure):
    """A pre-norm decoder layer's weights and shapes for sq_decoder_layer (field order = struct SqDecoderLayer)."""

    _fields_ = [
        ("hidden", ctypes.c_int32), ("num_heads", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32), ("inter", ctypes.c_int32),
        ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
        ("in_norm_w", ctypes.c_void_p), ("in_norm_b", ctypes.c_void_p),
        ("post_norm_w", ctypes.c_void_p), ("post_norm_b", ctypes.c_void_p),
        ("q_norm_w", ctypes.c_void_p), ("q_norm_b", ctypes.c_void_p),
        ("k_norm_w", ctypes.c_void_p), ("k_norm_b", ctypes.c_void_p),
        ("qkv", NativeLinear), ("o", NativeLinear), ("gate_up", NativeLinear), ("down", NativeLinear),
    ]  # fmt: skip


@dataclass
class LinearForm:
    """What sq_decoder_layer needs of one linear: kind ('dynamic' | 'static' | 'bf16'), shape, tensors, scalars."""

    kind: str
    n: int
    k: int
    weight: torch.Tensor  # int8 [N, Kp] or bf16 [N, K]
    tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)  # w_scale, bias, quant_bias, deq_scale
    inv_scale: float = 0.0
    offset: float = 0.0


@dataclass
class DecoderLayerPlan:
    """A layer's native form; holds the tensors its pointers refer to."""

    struct: NativeDecoderLayer
    keep: list[torch.Tensor]
    max_batch: int  # float linears switch to BLAS above NATIVE_MAX_TOKENS rows: no bit-equal native form there


NormWeights = tuple[torch.Tensor, torch.Tensor | None]  # an RMSNorm's (weight, bias or None)


def decoder_layer_plan(
    norms: dict[str, NormWeights],
    eps: float,
    linears: dict[str, LinearForm | None],
    heads: tuple[int, int, int],
    attn_scale: float,
) -> DecoderLayerPlan | None:
    """The native form of a layer: norms "input", "post" (and per-head "q", "k": Qwen3), linears qkv / o /
    gate_up / down, heads (num_heads, num_kv_heads, head_dim); None where any piece has no native form (then
    the per-op path runs)."""
    if not native.available() or any(lf is None or not _valid_form(lf) for lf in linears.values()):
        return None
    norm_tensors = [t for pair in norms.values() for t in pair]
    keep = [t for t in norm_tensors if t is not None]
    keep += [t for lf in linears.values() for t in (lf.weight, *lf.tensors.values()) if t is not None]
    if not (_fp32_cpu(*norm_tensors) and all(t.is_contiguous() for t in keep)):
        return None
    hidden = norms["input"][0].shape[0]
    if not _shapes_agree(hidden, linears, heads) or any(norms[n][0].numel() != heads[2] for n in norms if n in "qk"):
        return None
    num_heads, num_kv_heads, head_dim = heads
    no_norm = (None, None)
    norm_ptrs = [_ptr(t) for name in ("input", "post", "q", "k") for t in norms.get(name, no_norm)]
    struct = NativeDecoderLayer(
        hidden, num_heads, num_kv_heads, head_dim, linears["down"].k, eps, attn_scale, *norm_ptrs,
        *(_native_linear(linears[name]) for name in ("qkv", "o", "gate_up", "down")),
    )  # fmt: skip
    has_float = any(lf.kind == "bf16" for lf in linears.values())
    return DecoderLayerPlan(struct, keep, NATIVE_MAX_TOKENS if has_float else 1 << 30)


def decoder_layer(
    plan: DecoderLayerPlan,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    kv_cache: torch.Tensor,
    ctx,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One decode step of a planned layer: (mlp output [B, H], residual [B, H], updated in place); x [B, H]
    with one token per sequence, kv_cache [2, NB, BS, KVH, D], ctx the step's ForwardContext. None where it
    does not apply (the caller runs the per-op path)."""
    cos, sin = rope if rope is not None else (None, None)
    b, h = x.shape
    if b > plan.max_batch or not _fp32_cpu(x, residual, cos, sin, kv_cache) or not kv_cache.is_contiguous():
        return None
    if not all(t is None or t.is_contiguous() for t in (x, residual, cos, sin)):
        return None
    first = residual is None
    residual = torch.empty(b, h) if first else residual  # [B, H]
    out = torch.empty(b, h)  # [B, H]
    tables = ctx.block_tables
    native.library().sq_decoder_layer(
        ctypes.byref(plan.struct), b, x.data_ptr(), residual.data_ptr(), int(first), out.data_ptr(),
        _ptr(cos), _ptr(sin), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), ctx.slot_mapping.data_ptr(),
        tables.data_ptr(), tables.shape[1], ctx.context_lens_tensor.data_ptr(), kv_cache.shape[2],
    )  # fmt: skip
    return out, residual


_FORM_DTYPES = {  # kind -> (weight dtype, {tensor name: dtype})
    "dynamic": (torch.int8, {"w_scale": torch.float32, "bias": torch.float32}),
    "static": (torch.int8, {"quant_bias": torch.int32, "deq_scale": torch.float32}),
    "bf16": (torch.bfloat16, {"bias": torch.float32}),
}


class DecoderStackPlan:
    """Every layer's plan with the pointer arrays sq_decoder_stack reads (cache pointers refreshed on change)."""

    def __init__(self, plans: list[DecoderLayerPlan]):
        self.plans = plans
        self.layers = (ctypes.c_void_p * len(plans))(*(ctypes.addressof(p.struct) for p in plans))
        self.max_batch = min(p.max_batch for p in plans)
        self.caches: list[torch.Tensor] = []
        self.k_ptrs = self.v_ptrs = None

    def cache_pointers(self, caches: list[torch.Tensor]) -> tuple[ctypes.Array, ctypes.Array]:
        """(k, v) pointer arrays for the layers' caches [2, NB, BS, KVH, D], rebuilt when a cache is replaced."""
        if len(caches) != len(self.caches) or any(a is not b for a, b in zip(caches, self.caches, strict=False)):
            array = ctypes.c_void_p * len(caches)
            self.k_ptrs = array(*(c[0].data_ptr() for c in caches))
            self.v_ptrs = array(*(c[1].data_ptr() for c in caches))
            self.caches = list(caches)
        return self.k_ptrs, self.v_ptrs


def decoder_stack(
    stack: DecoderStackPlan,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    kv_caches: list[torch.Tensor],
    ctx,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One decode step of every layer in one native call: x [B, H] embeddings -> (last MLP output [B, H],
    residual [B, H]); None where it does not apply (the caller runs the layers one by one)."""
    cos, sin = rope if rope is not None else (None, None)
    b, h = x.shape
    if b > stack.max_batch or not _fp32_cpu(x, cos, sin, *kv_caches):
        return None
    if not all(t is None or t.is_contiguous() for t in (x, cos, sin, *kv_caches)):
        return None
    residual, out = torch.empty(b, h), torch.empty(b, h)  # [B, H] each
    k_ptrs, v_ptrs = stack.cache_pointers(kv_caches)
    tables = ctx.block_tables
    native.library().sq_decoder_stack(
        stack.layers, k_ptrs, v_ptrs, len(stack.plans), b, x.data_ptr(), residual.data_ptr(), out.data_ptr(),
        _ptr(cos), _ptr(sin), ctx.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1],
        ctx.context_lens_tensor.data_ptr(), kv_caches[0].shape[2],
    )  # fmt: skip
    return out, residual


def _valid_form(lf: LinearForm) -> bool:
    """Every tensor on the CPU in the dtype and length the kernel reads; no unknown tensors."""
    weight_dtype, dtypes = _FORM_DTYPES[lf.kind]
    if lf.weight.dtype != weight_dtype or lf.weight.device.type != "cpu" or lf.weight.shape[0] != lf.n:
        return False
    if set(lf.tensors) - set(dtypes) or any(lf.tensors.get(name) is None for name in dtypes if name != "bias"):
        return False
    present = [(t, dtypes[name]) for name, t in lf.tensors.items() if t is not None]
    return all(t.dtype == dt and t.device.type == "cpu" and t.numel() == lf.n for t, dt in present)


def _shapes_agree(hidden: int, linears: dict[str, LinearForm], heads: tuple[int, int, int]) -> bool:
    """The linears chain as qkv [H -> (NH + 2 KVH) D], o [NH D -> H], gate_up [H -> 2I], down [I -> H]."""
    nh, kvh, d = heads
    qkv, o, gate_up, down = (linears[name] for name in ("qkv", "o", "gate_up", "down"))
    attention_ok = (qkv.k, qkv.n, o.k, o.n) == (hidden, (nh + 2 * kvh) * d, nh * d, hidden)
    return attention_ok and (gate_up.k, gate_up.n, down.n) == (hidden, 2 * down.k, hidden)


def _native_linear(lf: LinearForm) -> NativeLinear:
    t = lf.tensors
    kp = lf.weight.shape[1]
    return NativeLinear(
        _LINEAR_KIND[lf.kind], lf.n, lf.k, kp, lf.weight.data_ptr(), _ptr(t.get("w_scale")), _ptr(t.get("bias")),
        _ptr(t.get("quant_bias")), _ptr(t.get("deq_scale")), lf.inv_scale, lf.offset,
    )  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
