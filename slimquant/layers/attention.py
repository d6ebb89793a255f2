"""Attention over a paged KV cache, driven by the engine's ForwardContext.

Every attention module is a KVCacheLayer: it says what cache it needs (`cache_shape`) and the engine assigns
`kv_cache` (model dtype, zero-initialised). Standard attention stores (2, num_blocks, block_size, kv_heads, D);
MLA (later) stores a latent cache with its own shape.
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, TorchOps
from slimquant.layers.context import get_context


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

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

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
        assert self.kv_cache is not None, "the engine must assign kv_cache before running attention"
        return self.ops.attention(q, k, v, rope, self.kv_cache, get_context(), self.scale)
