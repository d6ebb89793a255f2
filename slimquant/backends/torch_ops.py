"""The ops a model's layers call, defined in plain torch: the torch-reference backend, and the definition that
every other backend's ops (native_ops.py, triton_ops.py) must equal. Each op always returns its result.

int8 weights are held in a runtime form made by `pack_weight`: on CUDA, int8 [N, K] for torch._int_mm (cuBLASLt);
on the CPU, an exact fp32 [K, N] copy multiplied in K-chunks of at most 1024 columns, so every partial sum is an
integer below 2^24 that fp32 holds exactly (torch._int_mm has no vectorised CPU kernel without VNNI / AMX).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.format.primitives import QMAX, QMIN, dequantize_kv, int8_matmul_reference, quantize_kv
from slimquant.format.primitives import quantize_per_token as _quantize_per_token
from slimquant.kernels.int8_input import InputQuant, Int8Rows
from slimquant.kernels.int_mm import cuda_int8_mm, exact_float_mm
from slimquant.layers.context import ForwardContext
from slimquant.layers.rotary import apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) [T, D] of the tokens' positions, or no rope


class KvQuant(NamedTuple):
    """An int8 KV cache's runtime parameters, fp32 [KVH, D] each, holding model-dtype values (docs/FORMAT.md)."""

    k_scale: torch.Tensor
    k_inv: torch.Tensor
    k_offset: torch.Tensor
    v_scale: torch.Tensor
    v_inv: torch.Tensor
    v_offset: torch.Tensor


class TorchOps:
    """Norms, activation, attention over the paged cache, int8 and float linears, in torch."""

    name = "torch"
    # Prefill over fp32 activations and a bf16 KV cache attends in bf16 where set: the q / k / v values rounded
    # as the cache holds k / v for later steps (MLA: as a bf16 model's kv_b_proj writes them), at the speed of bf16
    # attention (CPUs with native bf16); else fp32.
    bf16_prefill_attention = False

    # ---- norms and activation ----

    def add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s) * weight (+ bias), s) with s = x + residual (x without one); x [T, H]."""
        s = x if residual is None else x + residual
        return rms_norm(s, weight, bias, eps), s

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        """x / rms(x) * weight (+ bias) over the last dim, in fp32 like transformers: x [..., D]."""
        return rms_norm(x, weight, bias, eps)

    def add_rms_norm_quant(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        eps: float,
        quant: InputQuant | None,
    ) -> tuple[torch.Tensor | Int8Rows, torch.Tensor]:
        """add_rms_norm's pair for an int8 linear that quantizes its input as quant says (None: a float linear):
        the norm's output quantized where the ops fuse that (Int8Rows), else float (here: float)."""
        if residual is None:
            return self.rms_norm(x, weight, bias, eps), x
        return self.add_rms_norm(x, residual, weight, bias, eps)

    def silu_and_mul_quant(self, x: torch.Tensor, quant: InputQuant | None) -> torch.Tensor | Int8Rows:
        """silu_and_mul(x) for the int8 linear that reads it, as add_rms_norm_quant (here: float)."""
        return self.silu_and_mul(x)

    def quantize_input(self, x: torch.Tensor, quant: InputQuant) -> torch.Tensor | Int8Rows:
        """x [T, K] quantized once, as quant says, for the int8 layers that read it (a MoE layer's routed and
        shared experts) where the ops fuse input quantization (Int8Rows), else x (each layer quantizes it)."""
        return x

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for x = [gate | up]: [T, 2I] -> [T, I]. On the CPU silu runs in float64: float32's
        vectorized and scalar exp differ in the last bit, and which one an element gets depends on the tensor's
        shape and thread split, so a tensor-parallel rank's part of the columns would round unlike one process."""
        gate, up = x.chunk(2, dim=-1)
        if x.device.type == "cpu":
            return F.silu(gate.double()).to(x.dtype) * up
        return F.silu(gate) * up

    # ---- attention over the paged KV cache ----

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: Rope,
        kv_cache: torch.Tensor,
        ctx: ForwardContext,
        scale: float,
        kv_quant: KvQuant | None = None,
        out_quant: InputQuant | None = None,
    ) -> torch.Tensor | Int8Rows:
        """Rotate q [T, NH, D] / k [T, KVH, D] by rope (neox), store k / v in kv_cache [2, NB, BS, KVH, D] at the
        step's slots (quantized with kv_quant in an int8 cache), attend over each sequence's context: -> [T, NH * D].
        out_quant: how the int8 linear after it (o_proj) quantizes its input, for ops that fuse that (here: float).
        """
        k_cache, v_cache = kv_cache[0], kv_cache[1]  # [NB, BS, KVH, D]
        if rope is not None:
            q, k = self.rotate(q, rope), self.rotate(k, rope)
        store_kv(k_cache, v_cache, k, v, ctx.slot_mapping, check_slots=not ctx.graph_step, kv_quant=kv_quant)
        return self.attend(q, k, v, k_cache, v_cache, ctx, scale, kv_quant)

    def rotate(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, heads, D] rotated by rope's cos / sin [T, R] (neox layout; R < D: partial rotary)."""
        return apply_rotary(x, *rope)

    def attend(self, q, k, v, k_cache, v_cache, ctx: ForwardContext, scale: float, kv_quant=None) -> torch.Tensor:
        """Attention of the rotated q [T, NH, D] once k / v are stored: decode batched, prefill per sequence (in
        prefill_attention_dtype). A chunk with nothing cached before it attends to its own float k / v; everything
        else reads the cache (as vLLM-Ascend does with an int8 cache)."""
        if ctx.is_decode:  # one batched call, contexts padded to the longest
            out = paged_attention(q[:, None], k_cache, v_cache, ctx.block_tables, decode_lens(ctx), scale, kv_quant)
            out = out[:, 0]
            if kv_quant is not None:  # a one-token prompt (nothing cached before) attends to its own float v
                own = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # [B, KVH, D] -> [B, NH, D]
                out = torch.where((ctx.lens_on_device == 1)[:, None, None], own.to(out.dtype), out)
            return out.reshape(q.shape[0], -1)  # [B, NH, D] -> [T, NH * D]
        dtype = self.prefill_attention_dtype(q.dtype, k_cache.dtype)
        outs, start = [], 0
        for i, q_len in enumerate(ctx.query_lens):  # prefill chunks: one sequence at a time
            span = slice(start, start + q_len)
            q_span = q[None, span].to(dtype)  # [1, Q, NH, D]
            if ctx.context_lens[i] == q_len:  # nothing cached before this chunk: attend to its own k / v
                outs.append(causal_attention(q_span, k[None, span].to(dtype), v[None, span].to(dtype), scale))
            else:  # the cache is read in q_span's dtype
                tables, lens = ctx.block_tables[i : i + 1], ctx.context_lens[i : i + 1]
                outs.append(paged_attention(q_span, k_cache, v_cache, tables, lens, scale, kv_quant))
            start += q_len
        return torch.cat(outs, dim=1).to(q.dtype).reshape(q.shape[0], -1)

    def prefill_attention_dtype(self, activations: torch.dtype, cache: torch.dtype) -> torch.dtype:
        """The dtype prefill attention runs in: bf16 for fp32 activations over a bf16 cache where
        bf16_prefill_attention is set, else the activations' dtype."""
        bf16 = self.bf16_prefill_attention and activations == torch.float32 and cache == torch.bfloat16
        return torch.bfloat16 if bf16 else activations

    def mla_decode(
        self, q: torch.Tensor, cache: torch.Tensor, ctx: ForwardContext, scale: float, rank: int
    ) -> torch.Tensor:
        """Absorbed MLA decode, one query token per sequence: q [B, NH, R + P] over the latent cache
        [NB, BS, R + P] (tokens' [latent | k_pe]) -> softmax(q . cached) @ latent [B, NH, R], R = rank. Every head
        reads the same cached rows: each head's products are one [1, R + P] @ [R + P, S] of a batch whose cache
        operand repeats at stride 0 (not copied per head, 40x the time at 4000 tokens; and a head's numbers do not
        depend on how many heads a tensor-parallel rank holds)."""
        lens, length = context_span(decode_lens(ctx), ctx.block_tables, cache.shape[1], q.device)
        cached = gather_context(cache, ctx.block_tables, length).to(q.dtype)  # [B, S, R + P]
        masks = causal_mask(lens, 1, length)  # [B, 1, S]
        heads = q.shape[1]
        outs = []
        for q_b, cached_b, mask in zip(q, cached, masks, strict=True):  # one sequence at a time
            keys = cached_b.T.expand(heads, -1, -1)  # [NH, R + P, S], stride 0 over the heads
            scores = torch.bmm(q_b[:, None], keys)[:, 0].float() * scale  # [NH, S]
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)  # [NH, S]
            latents = cached_b[:, :rank].expand(heads, -1, -1)  # [NH, S, R]
            outs.append(torch.bmm(probs[:, None], latents)[:, 0])  # [NH, R]
        return torch.stack(outs)

    def head_matmul(self, x: torch.Tensor, w: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """x [B, NH, K] times each head's matrix w [NH, K, N] (or w [NH, N, K] with transposed: x @ w_h^T) ->
        [B, NH, N] in x's dtype; w is converted to it (MLA's absorbed kv_b_proj, held in bf16)."""
        return torch.einsum("bhk,hnk->bhn" if transposed else "bhk,hkn->bhn", x, w.to(x.dtype))

    # ---- int8 linears (docs/FORMAT.md's runtime math) ----

    def pack_weight(self, w_q: torch.Tensor) -> torch.Tensor:
        """Runtime form of int8 weights [..., N, K] (a stack of experts packs alike): see the module docstring."""
        if w_q.device.type == "cuda":
            return w_q
        return w_q.float().transpose(-1, -2).contiguous()  # [..., K, N]

    def int8_mm(self, x_q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """Exact int32 product x_q int8 [T, K] @ W^T for a weight from pack_weight -> int32 [T, N]."""
        if packed.dtype != torch.int8:
            return exact_float_mm(x_q, packed)
        if x_q.device.type == "cuda":
            return cuda_int8_mm(x_q, packed)
        if x_q.device.type == "cpu":
            return torch._int_mm(x_q, packed.t())
        return int8_matmul_reference(x_q, packed)

    def quantize_per_token(
        self, x: torch.Tensor, absmax: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic symmetric per-token int8: x [T, K] -> (x_q int8 [T, K], scale fp32 [T, 1]); absmax [T, 1]: the
        row's max |x| where x is a part of it."""
        return _quantize_per_token(x, absmax)

    def dynamic_linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        w_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
        tp: TensorParallel = SINGLE,
    ) -> torch.Tensor:
        """W8A8_DYNAMIC: y [T, N] = (int8(x) @ W^T) * s_t * w_scale (+ bias) in fp32, x [T, K] quantized per
        token; w_scale fp32 [N] (already rounded to the model dtype); returned in out_dtype. Row-parallel (tp): x
        and W hold this rank's part of K; the ranks agree on each token's absmax and sum the int32 products."""
        absmax = None if tp.size == 1 else tp.max(x.float().abs().amax(dim=-1, keepdim=True))  # [T, 1]
        x_q, s_t = self.quantize_per_token(x, absmax)  # [T, K] int8, [T, 1] fp32
        y = tp.sum(self.int8_mm(x_q, packed)).float() * s_t * w_scale  # [T, N]
        return (y if bias is None else y + bias.float()).to(out_dtype)

    def static_linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        inv_scale: torch.Tensor,
        offset: torch.Tensor,
        quant_bias: torch.Tensor,
        deq_scale: torch.Tensor,
        out_dtype: torch.dtype,
        tp: TensorParallel = SINGLE,
    ) -> torch.Tensor:
        """W8A8: y [T, N] = float(int8(x) @ W^T + quant_bias) * deq_scale, x [T, K] quantized with one scale and
        offset ([1] each, in x's dtype: the quantization runs in it); returned in out_dtype. Row-parallel (tp): x
        and W hold this rank's part of K; the ranks sum the int32 products."""
        acc = tp.sum(self.int8_mm(quantize_static(x, inv_scale, offset), packed))  # [T, N] int32
        return ((acc + quant_bias).float() * deq_scale).to(out_dtype)

    # ---- MoE ----

    def softmax_topk(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        top_k: int,
        renormalize: bool,
        scaling: float,
        n_group: int = 1,
        topk_group: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A softmax router: x [T, H] @ weight fp32 [E, H]^T in fp32, softmax, each row's top_k largest (where
        topk_group < n_group, in the topk_group groups whose best score is largest: DeepSeek-V2's
        group_limited_greedy) -> (weights fp32 [T, K], ids [T, K]), the weights divided by their sum where
        renormalize, times scaling."""
        scores = F.linear(x.float(), weight.float()).softmax(dim=-1)  # [T, E]
        weights, ids = torch.topk(best_groups_only(scores, n_group, topk_group), top_k, dim=-1)
        return routing_weights(weights, renormalize, scaling), ids

    def biased_group_topk(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        n_group: int,
        topk_group: int,
        top_k: int,
        renormalize: bool,
        scaling: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3's router (noaux_tc): sigmoid scores of x [T, H] @ weight fp32 [E, H]^T; choice = score +
        bias [E]; the topk_group of n_group groups with the best sum of their two best choices; the top_k best
        choices in them -> (weights fp32 [T, K]: their scores, as routing_weights; ids [T, K])."""
        scores = F.linear(x.float(), weight.float()).sigmoid()  # [T, E]
        choice = scores + bias  # the bias picks experts, never weighs them
        group_scores = choice.view(x.shape[0], n_group, -1).topk(2, dim=-1)[0].sum(-1)  # [T, G]
        ids = torch.topk(group_masked(choice, group_scores, topk_group, float("-inf")), top_k, dim=-1)[1]
        return routing_weights(scores.gather(1, ids), renormalize, scaling), ids

    def shared_gate(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Qwen2-MoE's shared-expert gate: sigmoid(x [T, H] @ weight [1, H]^T) -> [T, 1], in x's dtype (as
        transformers and vLLM compute it)."""
        return torch.sigmoid(F.linear(x, weight.to(x.dtype)))

    groups_experts = False  # grouped_experts computes something (RoutedExperts.grouped)
    groups_split_experts = False  # ... also for experts split over tensor-parallel ranks (its tp argument)

    def grouped_experts(
        self,
        x: torch.Tensor | Int8Rows,
        w13: torch.Tensor,
        w13_scale: torch.Tensor,
        w2: torch.Tensor,
        w2_scale: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        first: int | None = None,
        tp: TensorParallel = SINGLE,
        summed: bool = False,
    ) -> torch.Tensor | None:
        """Every routed slot's weighted int8 expert output [T, K, H] in one pass, where the backend has kernels
        for it (x: float, or Int8Rows per token from quantize_input; first: the weights are experts first.. of
        more, expert parallel; other slots 0; tp: the weights are this rank's part of every expert's
        intermediate size, and the ranks agree on the activations' absmax and sum the int32 down products), or
        with summed their add_in_expert_order sum [T, H]; None here: RoutedExperts runs its experts one by one
        with the ops above."""
        return None

    # ---- float linears ----

    def pack_float_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Runtime form of a float weight [N, K]: as it is."""
        return w

    def float_linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """y [T, N] = x [T, K] @ w^T (+ bias), in x's dtype."""
        if w.dtype == x.dtype:
            return F.linear(x, w, bias)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """TorchOps.rms_norm's definition (each op set's fallback calls this, not a method it may override)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if bias is None else out + bias


def quantize_static(x: torch.Tensor, inv_scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8: clamp(round(x * inv_scale + offset)); x [T, K], inv_scale / offset in x's dtype."""
    return torch.clamp(torch.round(x * inv_scale + offset), QMIN, QMAX).to(torch.int8)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    check_slots: bool = True,
    kv_quant: KvQuant | None = None,
) -> None:
    """Write k/v [T, KVH, D] into caches [NB, BS, KVH, D] at flat slots [T], quantized with kv_quant into an int8
    cache; slots of -1 are skipped (when checked: that costs a host sync, which a CUDA graph cannot hold)."""
    slots = slot_mapping.to(device=k.device, dtype=torch.long)
    if check_slots and not bool((valid := slots >= 0).all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    if kv_quant is not None:
        k, v = quantize_kv(k, kv_quant.k_inv, kv_quant.k_offset), quantize_kv(v, kv_quant.v_inv, kv_quant.v_offset)
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def decode_lens(ctx: ForwardContext) -> list[int] | torch.Tensor:
    """A decode step's context lengths: host values, or in a CUDA-graph step the device tensor (a graph reads no
    host value; attention then spans the block table's whole width: context_span)."""
    return ctx.device_context_lens if ctx.graph_step else ctx.context_lens


def context_span(
    context_lens: list[int] | torch.Tensor, block_tables: torch.Tensor, block_size: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """(context lengths [B] on device, tokens to gather per sequence): the longest of host lengths, or for a device
    tensor (a CUDA-graph step) every block of the table, so that shapes do not depend on the lengths."""
    if isinstance(context_lens, torch.Tensor):
        return context_lens.to(device), block_tables.shape[1] * block_size
    return torch.tensor(context_lens, device=device), max(context_lens)


def causal_mask(lens: torch.Tensor, q_len: int, length: int) -> torch.Tensor:
    """[B, Q, S] bool: the Q queries sit at positions len - Q .. len - 1 of each sequence (lens [B])."""
    last_key = lens[:, None, None] - q_len + torch.arange(q_len, device=lens.device)[None, :, None]  # [B, Q, 1]
    return torch.arange(length, device=lens.device)[None, None, :] <= last_key


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int] | torch.Tensor,
    scale: float,
    kv_quant: KvQuant | None = None,
) -> torch.Tensor:
    """Causal attention of the last Q tokens of each of B sequences over their cached context (an int8 cache
    dequantized with kv_quant).

    q: [B, Q, H, D] (the queries sit at positions ctx_len - Q .. ctx_len - 1; in a decode batch Q = 1);
    block_tables: [B, max_blocks]; returns [B, Q, H, D]. Lengths as a device tensor (a CUDA-graph step) attend
    over every block of the table, masked, so that shapes do not depend on them.
    """
    lens, length = context_span(context_lens, block_tables, k_cache.shape[1], q.device)
    k = gather_context(k_cache, block_tables, length)  # [B, S, KVH, D] (the cache may hold bf16 or int8)
    v = gather_context(v_cache, block_tables, length)
    if kv_quant is None:
        k, v = k.to(q.dtype), v.to(q.dtype)
    else:
        k = dequantize_kv(k, kv_quant.k_scale, kv_quant.k_offset, q.dtype)
        v = dequantize_kv(v, kv_quant.v_scale, kv_quant.v_offset, q.dtype)
    mask = causal_mask(lens, q.shape[1], k.shape[1])  # [B, Q, S]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scale, enable_gqa=True
    )  # [B, H, Q, D]
    return out.transpose(1, 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of one chunk: q [1, Q, H, D], k / v [1, Q, KVH, D] -> [1, Q, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
    )  # [1, H, Q, D]
    return out.transpose(1, 2)


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of each sequence: cache [NB, BS, KVH, D] -> [B, length, KVH, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    ids = block_tables[:, :num_blocks].to(device=cache.device, dtype=torch.long).clamp(min=0)  # [B, nb]
    return cache[ids].flatten(1, 2)[:, :length]  # [B, nb * BS, KVH, D] -> [B, length, KVH, D]


TORCH_OPS = TorchOps()  # what layers call until a backend binds its own ops (Backend.bind)


def group_masked(scores: torch.Tensor, group_scores: torch.Tensor, topk_group: int, fill: float) -> torch.Tensor:
    """scores [T, E] with the experts outside each row's topk_group best groups (group_scores [T, G]) set to fill."""
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, G]
    mask = group_mask[:, :, None].expand(-1, -1, scores.shape[1] // group_scores.shape[1]).reshape(scores.shape)
    return scores.masked_fill(~mask.bool(), fill)


def best_groups_only(scores: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """scores [T, E] > 0 with 0 outside each row's topk_group groups (of n_group) whose best score is largest
    (DeepSeek-V2's group_limited_greedy); scores themselves where topk_group >= n_group."""
    if topk_group >= n_group:
        return scores
    group_scores = scores.view(scores.shape[0], n_group, -1).max(dim=-1).values  # [T, G]
    return group_masked(scores, group_scores, topk_group, 0.0)


def routing_weights(weights: torch.Tensor, renormalize: bool, scaling: float) -> torch.Tensor:
    """A router's top-k weights [T, K], divided by their sum (+ 1e-20) where renormalize, times scaling."""
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling


def add_in_expert_order(outs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """outs [T, K, H] summed over K in ascending expert id per token, in outs' dtype -> [T, H]: the order in which
    one process adds its experts' outputs, whichever rank (or kernel) made them."""
    order = topk_ids.argsort(dim=-1, stable=True)  # [T, K]
    ordered = outs.gather(1, order[..., None].expand_as(outs))  # [T, K, H]
    total = torch.zeros_like(ordered[:, 0])  # [T, H]
    for k in range(ordered.shape[1]):
        total += ordered[:, k]
    return total
