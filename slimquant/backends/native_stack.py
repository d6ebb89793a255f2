"""Every decoder layer of a CPU step in one native call (csrc/layer_cpu.cpp: sq_decoder_model).

At a small model's decode size every op is a few microseconds of arithmetic and the per-op overhead of Python
and torch dominates. A layer whose linears all have a native form (int8 dynamic / static, bf16 float), and whose
routed experts, where it has them, are W8A8_DYNAMIC behind a softmax router (Qwen3-MoE, DeepSeek-V2) or
DeepSeek-V3's biased one, with shared experts (GLM-4.5; gated: Qwen2-MoE) or none, gets a plan once (pointers to
its weights, in an SqDecoderLayer struct, csrc/exports.h); each step then runs the same native kernels the per-op
path calls, in the same order, so the results are bit-identical to it. DeepSeek's MLA layers (a float kv_b_proj) run
there in decode steps only, absorbed as the per-op decode absorbs them (its prefill up-projects the latents instead).
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from slimquant.backends.native_ops import (
    NATIVE_MAX_TOKENS,
    is_native_weight,
    kv_cache_ready,
    kv_quant_struct,
    step_rows,
)
from slimquant.backends.native_ranks import NativeRanks
from slimquant.kernels import native
from slimquant.layers.context import ForwardContext
from slimquant.layers.mla import absorbable
from slimquant.layers.quant_methods import UnquantizedMethod, W8A8DynamicMethod, W8A8StaticMethod
from slimquant.models.base import LayerParts, MlaParts

_LINEAR_KIND = {"dynamic": 1, "static": 2, "bf16": 3}
_SLICE_ROWS = 16  # csrc/layer_cpu.cpp: kSliceAlign, the blocked int8 layout's rows per block


@dataclass
class LinearForm:
    """What the stack needs of one linear: kind ('dynamic' | 'static' | 'bf16'), shape, tensors, scalars."""

    kind: str
    n: int
    k: int
    weight: torch.Tensor  # int8 [N, Kp] or bf16 [N, K]
    tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)  # w_scale, bias, quant_bias, deq_scale
    inv_scale: float = 0.0
    offset: float = 0.0
    split_k: bool = False  # row-parallel int8: this rank's part of K, the ranks reduce (NativeRanks)


@dataclass
class DecoderLayerPlan:
    """A layer's native form (an SqDecoderLayer); holds the tensors its pointers refer to."""

    struct: ctypes.Structure
    keep: list[torch.Tensor]
    max_batch: int  # float linears and routers switch to BLAS above NATIVE_MAX_TOKENS rows: no bit-equal form there
    int8_kv: bool = False  # the struct holds int8 KV-cache parameters: it can run over int8 caches
    decode_only: bool = False  # MLA: the per-op path up-projects the latents in prefill, absorbs them in decode


def linear_form(layer: nn.Module) -> LinearForm | str:
    """A Linear's native form, or why it has none."""
    method, w = layer.method, layer.weight
    if layer.gather_input or layer.partial_sum:
        return f"{layer.prefix}: a row-parallel linear that gathers its input or sums float parts runs per op"
    if isinstance(method, UnquantizedMethod):
        if w.dtype != torch.bfloat16:
            return f"{layer.prefix}: float weights that are not exactly bf16 run through BLAS"
        return LinearForm("bf16", *w.shape, w, {"bias": layer.bias})
    if not is_native_weight(w):
        return f"{layer.prefix}: an int8 weight holding -128 runs on the exact fp32 path"
    n, k = w.shape[0], layer.in_features
    if isinstance(method, W8A8DynamicMethod):
        tensors = {"w_scale": layer.weight_scale, "bias": layer.bias}
        return LinearForm("dynamic", n, k, w, tensors, split_k=layer.split_k)
    if isinstance(method, W8A8StaticMethod):
        if layer.input_inv_scale.dtype != torch.float32:
            return f"{layer.prefix}: static activations quantized in {layer.input_inv_scale.dtype}, not fp32"
        tensors = {"quant_bias": layer.quant_bias, "deq_scale": layer.deq_scale}
        scalars = (float(layer.input_inv_scale), float(layer.input_offset_rt))
        return LinearForm("static", n, k, w, tensors, *scalars, split_k=layer.split_k)
    return f"{layer.prefix}: no native form for {type(method).__name__}"


def decoder_layer_plan(lib: native.Library, parts: LayerParts) -> DecoderLayerPlan | str:
    """The native form of a layer, or why it has none (then the per-op path runs). The kernels compute in fp32:
    float norms and biases of a bf16 model are held as fp32 copies."""
    forms = {name: linear_form(lin) for name, lin in parts.linears.items()}
    if reasons := [f for f in forms.values() if isinstance(f, str)]:
        return reasons[0]
    linears = {name: _fp32_tensors(lf) for name, lf in forms.items()}
    norms = {name: (fp32_copy(w), fp32_copy(b)) for name, (w, b) in parts.norms.items()}
    keep = [t for pair in norms.values() for t in pair if t is not None]
    keep += [t for lf in linears.values() for t in (lf.weight, *lf.tensors.values()) if t is not None]
    hidden, (num_heads, num_kv_heads, head_dim) = norms["input"][0].shape[0], parts.heads
    if not all(norms[n][0].numel() == head_dim for n in norms if n in ("q", "k")):
        return "per-head norms of another size than head_dim"
    if parts.mla is None:
        why = _attention_shapes_disagree(hidden, linears, parts.heads)
    else:
        why = _mla_shapes_disagree(hidden, linears, num_heads, parts.mla)
    if (why := why or _mlp_shapes_disagree(hidden, linears)) is not None:
        return why
    shared_inter = linears["down"].k if parts.moe is not None and "down" in linears else 0
    moe = lib.structs["SqMoe"]() if parts.moe is None else _moe_form(lib, parts.moe, hidden, shared_inter)
    if isinstance(moe, str):
        return moe
    mla = lib.structs["SqMla"]() if parts.mla is None else _mla_form(lib, parts.mla, linears, norms)
    no_norm = (None, None)
    norm_ptrs = {
        f"{short}_norm_{part}": _ptr(t)
        for name, short in (("input", "in"), ("post", "post"), ("q", "q"), ("k", "k"))
        for part, t in zip("wb", norms.get(name, no_norm), strict=True)
    }
    inter = linears["down"].k if parts.moe is None else parts.moe.experts.inter  # the routed experts'
    layer_linears = {name: _native_linear(lib, lf) for name, lf in linears.items() if name not in _MLA_LINEARS}
    struct = lib.structs["SqDecoderLayer"](
        hidden=hidden, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, inter=inter,
        eps=parts.eps, attn_scale=parts.attn_scale, **norm_ptrs, kv_quant=kv_quant_struct(lib, parts.kv_quant),
        **layer_linears, moe=moe, mla=mla,
    )  # fmt: skip
    keep += list(parts.kv_quant or ()) + ([] if parts.mla is None else [parts.mla.kv_b_proj.weight])
    if parts.moe is not None:
        experts = parts.moe.experts
        keep += [parts.moe.gate.weight, experts.w13, experts.w2, experts.w13_scale, experts.w2_scale]
        keep += [b] if (b := parts.moe.gate.e_score_correction_bias) is not None else []
        keep += [g.weight] if (g := parts.moe.shared_expert_gate) is not None else []
    # float linears and a router's logits go to BLAS above NATIVE_MAX_TOKENS rows on the per-op path
    to_blas = any(lf.kind == "bf16" for lf in linears.values()) or parts.moe is not None
    max_batch = NATIVE_MAX_TOKENS if to_blas else 1 << 30
    return DecoderLayerPlan(struct, keep, max_batch, parts.kv_quant is not None, decode_only=parts.mla is not None)


class DecoderStackPlan:
    """Every layer's plan with the pointer arrays sq_decoder_model reads (cache pointers refreshed on change)."""

    def __init__(self, plans: list[DecoderLayerPlan]):
        self.plans = plans
        self.layers = (ctypes.c_void_p * len(plans))(*(ctypes.addressof(p.struct) for p in plans))
        self.max_batch = min(p.max_batch for p in plans)
        self.int8_kv = all(p.int8_kv for p in plans)  # every layer has int8 KV-cache parameters
        self.decode_only = any(p.decode_only for p in plans)
        linears = [lin for p in plans for lin in (p.struct.qkv, p.struct.o, p.struct.gate_up, p.struct.down)]
        linears += [lin for p in plans for lin in (p.struct.mla.kv_a, p.struct.mla.q_b)]
        experts = sum(_moe_macs(p.struct) + _absorbed_macs(p.struct) for p in plans)
        self.macs_per_token = sum(lin.n * lin.k for lin in linears) + experts  # of the linears and experts, per token
        self.caches: list[torch.Tensor] = []
        self.k_ptrs = self.v_ptrs = None

    def cache_pointers(self, caches: list[torch.Tensor]) -> tuple[ctypes.Array, ctypes.Array] | None:
        """(k, v) pointer arrays for the layers' caches [2, NB, BS, KVH, D] (MLA's latent cache [NB, BS, R + rope]:
        k and v both), or None where they are not contiguous on the CPU in one dtype the kernels hold (fp32, bf16,
        or int8 with every layer's parameters); the caller passes a new list object whenever a cache is replaced,
        and the arrays (and that check) are redone then."""
        if caches is not self.caches:
            self.caches = caches
            self.k_ptrs = self.v_ptrs = None
            int8_ready = caches[0].dtype != torch.int8 or self.int8_kv
            if kv_cache_ready(*caches) and int8_ready:
                array = ctypes.c_void_p * len(caches)
                self.k_ptrs = array(*(c.data_ptr() if c.dim() == 3 else c[0].data_ptr() for c in caches))
                self.v_ptrs = array(*(c.data_ptr() if c.dim() == 3 else c[1].data_ptr() for c in caches))
        return None if self.k_ptrs is None else (self.k_ptrs, self.v_ptrs)


@dataclass
class ModelEnds:
    """What a whole-model step adds around the stack: the embedding table [V, H] (bf16 or fp32; under tensor
    parallel this rank's rows from vocab_start, summed across ranks where vocab_split), the rope tables (cos, sin)
    fp32 [P, D] covering every position of the step (None: no rope), the final norm."""

    embed: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor | None
    eps: float
    vocab_start: int = 0
    vocab_split: bool = False


def decoder_model(
    lib: native.Library,
    stack: DecoderStackPlan,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    ends: ModelEnds,
    kv_caches: list[torch.Tensor],
    ctx: ForwardContext,
    ranks: NativeRanks | None = None,
) -> torch.Tensor | None:
    """A whole step in one native call, one attention row per token (ctx.token_rows: a decode step, or small
    prefill chunks): input_ids, positions [T] -> the final norm's output [T, H] (embeddings, every layer, final
    norm); None where the step's tensors are not in the layout the kernel reads."""
    b, h = input_ids.shape[0], ends.embed.shape[1]
    pointers = stack.cache_pointers(kv_caches)
    cos, sin = ends.rope if ends.rope is not None else (None, None)
    if pointers is None or b > stack.max_batch or not _ends_ready(ends, input_ids, positions):
        return None
    k_ptrs, v_ptrs = pointers
    like = kv_caches[0] if kv_caches[0].dim() != 3 else kv_caches[0][..., None, :]  # [.., NB, BS, KVH, D]
    hidden = torch.empty(b, h)  # [T, H]
    tables, lens = ctx.token_rows  # [T, W], [T]
    model_ends = lib.structs["SqModelEnds"](
        embed=ends.embed.data_ptr(), embed_bf16=int(ends.embed.dtype == torch.bfloat16),
        rope_dim=0 if cos is None else cos.shape[1], cos_table=_ptr(cos), sin_table=_ptr(sin),
        norm_w=ends.norm_weight.data_ptr(), norm_b=_ptr(ends.norm_bias), eps=ends.eps,
        vocab_start=ends.vocab_start, vocab_rows=ends.embed.shape[0], vocab_split=int(ends.vocab_split),
    )  # fmt: skip
    failed = lib.sq_decoder_model(
        layers=stack.layers, num_layers=len(stack.plans), k_caches=k_ptrs, v_caches=v_ptrs,
        step=step_rows(lib, ctx.slot_mapping, tables, lens, like), ends=model_ends,
        ranks=None if ranks is None else ranks.struct, ids=input_ids.data_ptr(), positions=positions.data_ptr(),
        hidden=hidden.data_ptr(),
    )  # fmt: skip
    if failed:
        assert ranks is not None, "only a reduction across ranks fails"
        ranks.raise_failure()
    return hidden


def fp32_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float tensor as the native kernels read it: fp32 and contiguous (t itself if it is already)."""
    return t if t is None or not t.is_floating_point() else t.float().contiguous()


def _ends_ready(ends: ModelEnds, input_ids: torch.Tensor, positions: torch.Tensor) -> bool:
    """The tensors in the dtypes, device and layout sq_decoder_model reads."""

    def on_cpu(t: torch.Tensor | None, *dtypes: torch.dtype) -> bool:
        return t is None or (t.dtype in dtypes and t.device.type == "cpu" and t.is_contiguous())

    ids_ok = on_cpu(input_ids, torch.int64) and on_cpu(positions, torch.int64)
    embed_ok = on_cpu(ends.embed, torch.bfloat16, torch.float32)
    floats = [ends.norm_weight, ends.norm_bias, *(ends.rope or ())]
    return ids_ok and embed_ok and all(on_cpu(t, torch.float32) for t in floats)


_FORM_DTYPES = {  # kind -> (weight dtype, {tensor name: dtype})
    "dynamic": (torch.int8, {"w_scale": torch.float32, "bias": torch.float32}),
    "static": (torch.int8, {"quant_bias": torch.int32, "deq_scale": torch.float32}),
    "bf16": (torch.bfloat16, {"bias": torch.float32}),
}


def _fp32_tensors(lf: LinearForm) -> LinearForm:
    """lf with its float tensors other than the weight (scales, biases) in fp32, the kernels' dtype."""
    tensors = {name: fp32_copy(t) for name, t in lf.tensors.items()}
    form = dataclasses.replace(lf, tensors=tensors)
    weight_dtype, dtypes = _FORM_DTYPES[lf.kind]
    assert lf.weight.dtype == weight_dtype and lf.weight.shape[0] == lf.n, f"{lf.kind} weight {lf.weight.shape}"
    assert all(t is None or (t.dtype == dtypes[n] and t.numel() == lf.n) for n, t in tensors.items()), lf.kind
    return form


def _attention_shapes_disagree(hidden: int, linears: dict[str, LinearForm], heads: tuple[int, int, int]) -> str | None:
    """None when the attention's linears chain as qkv [H -> (NH + 2 KVH) D], o [NH D -> H]; else what does not fit."""
    nh, kvh, d = heads
    qkv, o = linears["qkv"], linears["o"]
    if (qkv.k, qkv.n, o.k, o.n) != (hidden, (nh + 2 * kvh) * d, nh * d, hidden):
        return "attention linears of other shapes than the heads'"
    return None


def _mla_shapes_disagree(hidden: int, linears: dict[str, LinearForm], num_heads: int, mla: MlaParts) -> str | None:
    """None when MLA's linears chain as the widths say (q_a | kv_a, q_b, or q_proj and kv_a; o [NH V -> H]) and the
    per-op path's native kernels take its latent (R a multiple of 8: the head products' rows); else what does not."""
    qk, kv_a = num_heads * (mla.nope + mla.rope), mla.rank + mla.rope
    if mla.q_lora_rank:
        qkv, q_b = linears["qkv"], linears["q_b"]
        chain = (qkv.k, qkv.n, q_b.k, q_b.n) == (hidden, mla.q_lora_rank + kv_a, mla.q_lora_rank, qk)
    else:
        q, kv = linears["qkv"], linears["kv_a"]
        chain = (q.k, q.n, kv.k, kv.n) == (hidden, qk, hidden, kv_a)
    o = linears["o"]
    if not chain or (o.k, o.n) != (num_heads * mla.v_dim, hidden):
        return "MLA linears of other shapes than its widths'"
    kv_b = mla.kv_b_proj
    if not absorbable(kv_b):
        return f"{kv_b.prefix}: a quantized kv_b_proj runs per op (decode up-projects the latents through it)"
    if mla.rank % 8 or kv_b.weight.dtype not in (torch.float32, torch.bfloat16) or not kv_b.weight.is_contiguous():
        return f"{kv_b.prefix}: a {kv_b.weight.dtype} weight over a latent of {mla.rank} runs per op"
    return None


def _mlp_shapes_disagree(hidden: int, linears: dict[str, LinearForm]) -> str | None:
    """None when (a dense MLP, or shared experts) gate_up [H -> 2I], down [I -> H] chain, the up half of gate_up
    starting a block of int8 rows, or there are none (routed experts alone: _moe_form); else what does not fit."""
    if "down" not in linears:
        return None
    gate_up, down = linears["gate_up"], linears["down"]
    if (gate_up.k, gate_up.n, down.n) != (hidden, 2 * down.k, hidden):
        return "MLP linears of other shapes than [H -> 2I -> H]"
    # each thread computes its slice of the gate rows and the same slice of the up rows, which start at row
    # inter: for int8 weights (blocks of 16 rows in the VNNI layout) that must fall on a block boundary
    if gate_up.kind != "bf16" and down.k % _SLICE_ROWS:
        return f"intermediate_size {down.k} is not a multiple of {_SLICE_ROWS} (the int8 row blocks)"
    return None


_MLA_LINEARS = ("kv_a", "q_b")  # linears of the SqMla, not the SqDecoderLayer


def _mla_form(
    lib: native.Library, mla: MlaParts, linears: dict[str, LinearForm], norms: dict[str, tuple]
) -> ctypes.Structure:
    """The SqMla (csrc/exports.h) of MLA attention whose shapes _mla_shapes_disagree passed."""
    parts = {name: _native_linear(lib, linears[name]) for name in _MLA_LINEARS if name in linears}
    (q_a_w, q_a_b), (kv_a_w, kv_a_b) = norms.get("q_a", (None, None)), norms["kv_a"]
    return lib.structs["SqMla"](
        rank=mla.rank, nope=mla.nope, rope=mla.rope, v_dim=mla.v_dim, q_lora_rank=mla.q_lora_rank,
        interleave=int(mla.interleave), **parts, q_a_norm_w=_ptr(q_a_w), q_a_norm_b=_ptr(q_a_b),
        kv_a_norm_w=_ptr(kv_a_w), kv_a_norm_b=_ptr(kv_a_b), kv_b=mla.kv_b_proj.weight.data_ptr(),
        kv_b_bf16=int(mla.kv_b_proj.weight.dtype == torch.bfloat16),
    )  # fmt: skip


def _moe_form(lib: native.Library, moe: nn.Module, hidden: int, shared_inter: int) -> ctypes.Structure | str:
    """The SqMoe (csrc/exports.h) of a layers.moe.SparseMoE, whose shared experts (the layer's gate_up / down, of
    shared_inter rows here) the layer's plan holds, or why it runs per op."""
    router, experts = moe.gate, moe.experts
    biased = router.topk_method == "noaux_tc"  # DeepSeek-V3's router (GLM-4.5): route_row_biased
    if not (router.plain_softmax or biased):
        return f"{experts.prefix}: a {router.scoring} router with {router.topk_method} top-k runs per op"
    if not experts.quantized:
        return f"{experts.prefix}: float experts run per op"
    w13, w2, s13, s2 = experts.w13, experts.w2, experts.w13_scale, experts.w2_scale
    weights_ok = all(is_native_weight(w) and w.is_contiguous() for w in (w13, w2))
    if not weights_ok or s13.dtype not in (torch.float32, torch.bfloat16) or s2.dtype != s13.dtype:
        return f"{experts.prefix}: expert weights or scales the native call does not take run per op"
    if experts.inter % _SLICE_ROWS:
        why = f"are not a multiple of {_SLICE_ROWS} (the int8 row blocks)"
        return f"{experts.prefix}: {experts.inter} intermediate rows per expert held here {why}"
    bias = router.e_score_correction_bias if biased else None
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return f"{experts.prefix}: a router bias of dtype {bias.dtype} runs per op"
    assert router.weight.dtype == torch.float32 and router.weight.is_contiguous() and w2.shape[1] == hidden
    assert s13.is_contiguous() and s2.is_contiguous() and w13.shape[0] == experts.num_local
    assert (moe.shared is not None) == (shared_inter > 0), "the plan holds the shared experts' linears"
    gate = None if moe.shared_expert_gate is None else moe.shared_expert_gate.weight  # fp32 [1, H]
    assert gate is None or (gate.dtype == torch.float32 and gate.is_contiguous() and gate.shape == (1, hidden))
    return lib.structs["SqMoe"](
        num_experts=router.num_experts, first=experts.first, num_local=experts.num_local,
        split=int(experts.reduce.size > 1), swap=int(experts.expert_parallel), top_k=router.top_k,
        renormalize=int(router.norm_topk_prob), scaling=router.scaling,
        router=router.weight.data_ptr(), w13=w13.data_ptr(), kp13=w13.shape[2], w2=w2.data_ptr(), kp2=w2.shape[2],
        s13=s13.data_ptr(), s2=s2.data_ptr(), scales_bf16=int(s13.dtype == torch.bfloat16), bias=_ptr(bias),
        n_group=router.groups[0], topk_group=router.groups[1], shared_inter=shared_inter, shared_gate=_ptr(gate),
    )  # fmt: skip


def _moe_macs(layer: ctypes.Structure) -> int:
    """Multiply-adds per token of an SqDecoderLayer's router and its top_k experts (0 for a dense MLP; its shared
    experts count among the layer's linears)."""
    moe = layer.moe
    return moe.num_experts * layer.hidden + moe.top_k * 3 * layer.inter * layer.hidden


def _absorbed_macs(layer: ctypes.Structure) -> int:
    """Multiply-adds per token of an MLA layer's two products by kv_b_proj's halves (0 for other layers)."""
    mla = layer.mla
    return layer.num_heads * (mla.nope + mla.v_dim) * mla.rank


def _native_linear(lib: native.Library, lf: LinearForm) -> ctypes.Structure:
    """The SqLinear (csrc/exports.h) of a linear form."""
    t = {name: _ptr(lf.tensors.get(name)) for name in ("w_scale", "bias", "quant_bias", "deq_scale")}
    return lib.structs["SqLinear"](
        kind=_LINEAR_KIND[lf.kind], n=lf.n, k=lf.k, kp=lf.weight.shape[1], w=lf.weight.data_ptr(),
        inv_scale=lf.inv_scale, offset=lf.offset, split_k=int(lf.split_k), **t,
    )  # fmt: skip


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()
