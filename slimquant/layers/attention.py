"""Attention over a paged KV cache, driven by the engine's ForwardContext.

Every attention module is a KVCacheLayer: it says what cache it needs (`cache_shape`) and the engine assigns
`kv_cache` (model dtype, zero-initialised). Standard attention stores (2, num_blocks, block_size, kv_heads, D);
MLA (later) stores a latent cache with its own shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimquant import kernels
from slimquant.layers.context import get_context
from slimquant.layers.rotary import apply_rotary


class KVCacheLayer(nn.Module):
    """Base of layers that own a slice of the paged KV cache."""

    generation = 0  # bumped whenever any layer's cache is assigned: holders of cache pointers know to refresh

    def __init__(self):
        super().__init__()
        self._kv_cache: torch.Tensor | None = None

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """This layer's cache (assigned by the engine), or None before."""
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, value: torch.Tensor | None) -> None:
        self._kv_cache = value
        KVCacheLayer.generation += 1

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of this layer's cache tensor for the given block pool."""
        raise NotImplementedError


class Attention(KVCacheLayer):
    """Multi-head / grouped-query attention: q [T, H, D], k/v [T, KVH, D] -> [T, H * D]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Rotate q/k by rope (cos, sin) [T, D] if given (neox layout), store k/v, attend: -> [T, H * D]."""
        ctx = get_context()
        assert self.kv_cache is not None, "the engine must assign kv_cache before running attention"
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]  # [NB, BS, KVH, D]
        if ctx.is_decode and q.device.type == "cpu" and not ctx.graph_step:  # one fused native call
            caches, lens = (k_cache, v_cache), ctx.context_lens_tensor
            out = kernels.decode_attention(q, k, v, rope, caches, ctx.slot_mapping, ctx.block_tables, lens, self.scale)
            if out is not None:
                return out
        if (cuda := kernels.cuda_layer_ops(q, k, v, k_cache, v_cache, *(rope or ()))) is not None:  # Triton kernels
            q, k = cuda.rope_store(q, k, v, rope, k_cache, v_cache, ctx.slot_mapping)
            if ctx.is_decode:
                lens = ctx.lens_on_device  # [B] int32
                out = cuda.paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, lens, self.scale)
                return out.reshape(q.shape[0], -1)  # [B, NH, D] -> [T, NH * D]
        else:
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            store_kv(k_cache, v_cache, k, v, ctx.slot_mapping, check_slots=not ctx.graph_step)
        if ctx.is_decode:  # one batched call, contexts padded to the longest
            lens = ctx.device_context_lens if ctx.graph_step else ctx.context_lens
            out = paged_attention(q[:, None], k_cache, v_cache, ctx.block_tables, lens, self.scale)
            return out.reshape(q.shape[0], -1)  # [B, 1, H, D] -> [T, H * D]
        outs, start = [], 0
        for i, q_len in enumerate(ctx.query_lens):  # prefill chunks: one sequence at a time
            span = slice(start, start + q_len)
            if ctx.context_lens[i] == q_len:  # nothing cached before this chunk: attend to its own k / v
                outs.append(causal_attention(q[None, span], k[None, span], v[None, span], self.scale))
            else:
                tables, lens = ctx.block_tables[i : i + 1], ctx.context_lens[i : i + 1]
                outs.append(paged_attention(q[None, span], k_cache, v_cache, tables, lens, self.scale))
            start += q_len
        return torch.cat(outs, dim=1).reshape(q.shape[0], -1)


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    check_slots: bool = True,
) -> None:
    """Write k/v [T, KVH, D] into caches [NB, BS, KVH, D] at flat slots [T]; slots of -1 are skipped (when checked:
    that costs a host sync, which a CUDA graph cannot hold)."""
    slots = slot_mapping.to(device=k.device, dtype=torch.long)
    if check_slots and not bool((valid := slots >= 0).all()):
        slots, k, v = slots[valid], k[valid], v[valid]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int] | torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the last Q tokens of each of B sequences over their cached context.

    q: [B, Q, H, D] (the queries sit at positions ctx_len - Q .. ctx_len - 1; in a decode batch Q = 1);
    block_tables: [B, max_blocks]; returns [B, Q, H, D]. Lengths as a device tensor (a CUDA-graph step) attend
    over every block of the table, masked, so that shapes do not depend on them.
    """
    b, q_len = q.shape[:2]
    if isinstance(context_lens, torch.Tensor):
        length, lens = block_tables.shape[1] * k_cache.shape[1], context_lens.to(q.device)
    else:
        length, lens = max(context_lens), torch.tensor(context_lens, device=q.device)
    k = gather_context(k_cache, block_tables, length).to(q.dtype)  # [B, S, KVH, D] (the cache may hold bf16)
    v = gather_context(v_cache, block_tables, length).to(q.dtype)
    ctx = lens[:, None, None]  # [B, 1, 1]
    last_key = ctx - q_len + torch.arange(q_len, device=q.device)[None, :, None]  # [B, Q, 1]
    mask = torch.arange(k.shape[1], device=q.device)[None, None, :] <= last_key  # [B, Q, S]
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
