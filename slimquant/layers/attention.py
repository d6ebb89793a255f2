"""Attention over a paged KV cache, driven by the engine's ForwardContext.

Every attention module is a KVCacheLayer: it says what cache it needs (`cache_shape`) and the engine assigns
`kv_cache` (zero-initialised, in the engine's KV-cache dtype). Standard attention stores (2, num_blocks,
block_size, kv_heads, D); MLA stores a latent cache with its own shape. An int8 (C8) cache holds k / v quantized
per channel with the checkpoint's scales (docs/FORMAT.md, "Int8 KV cache").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, KvQuant, TorchOps
from slimquant.format.checkpoint import KV_CACHE_TENSORS
from slimquant.format.primitives import kv_cache_runtime_params
from slimquant.format.validation import KV_CACHE_SCALE, OFFSET
from slimquant.kernels.int8_input import InputQuant, Int8Rows
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
    """Multi-head / grouped-query attention: q [T, H, D], k/v [T, KVH, D] -> [T, H * D].

    With int8 KV-cache scales (kv_scales_dtype set: the model dtype they are rounded to), it loads
    `<self_attn>.{k,v}_proj.kv_cache_{scale,offset}` and runs an int8 cache when the engine assigns one."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        prefix: str = "",
        kv_scales_dtype: torch.dtype | None = None,
        kv_heads: tuple[int, int] | None = None,
    ):
        """Heads are this rank's; kv_heads (tensor parallel): (its first kv head, the model's kv heads), whose rows
        of the KV-cache scales it takes."""
        super().__init__()
        self.kv_head_start, self.kv_heads_total = kv_heads or (0, num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.prefix, self.kv_scales_dtype = prefix, kv_scales_dtype  # prefix: this module's name, "<self_attn>.attn"
        self.kv_quant: KvQuant | None = None  # the int8 cache's runtime scales, after loading
        if kv_scales_dtype is not None:
            for name in KV_CACHE_TENSORS:  # [KVH, D] fp32 each; a checkpoint's single value is broadcast
                self.register_buffer(_buffer(name), torch.empty(num_kv_heads, head_dim))

    def checkpoint_entries(self) -> Iterator[tuple[str, Callable[[torch.Tensor], None], bool]]:
        """(checkpoint name, loader, optional) of the int8 KV-cache scales, if this layer has them."""
        if self.kv_scales_dtype is None:
            return
        self_attn = self.prefix.rpartition(".")[0]
        for name in KV_CACHE_TENSORS:
            yield f"{self_attn}.{name}", partial(self._load_kv_tensor, name), False

    def _load_kv_tensor(self, name: str, tensor: torch.Tensor) -> None:
        target = getattr(self, _buffer(name))
        (KV_CACHE_SCALE if name.endswith("scale") else OFFSET).check(f"{self.prefix.rpartition('.')[0]}.{name}", tensor)
        if tensor.numel() == self.kv_heads_total * self.head_dim > target.numel():  # every kv head's: take this rank's
            tensor = tensor.reshape(-1, self.head_dim).narrow(0, self.kv_head_start, self.num_kv_heads)
        if tensor.numel() not in (1, target.numel()):
            raise ValueError(
                f"{self.prefix.rpartition('.')[0]}.{name}: {tensor.numel()} values, expected "
                f"{self.num_kv_heads} kv heads x {self.head_dim} = {target.numel()} (or one); the checkpoint does "
                "not match config.json"
            )
        target.copy_(tensor.float().reshape(-1).expand(target.numel()).reshape(target.shape))

    def process_weights_after_loading(self) -> None:
        """The int8 cache's runtime scales: rounded to the model dtype, the reciprocals taken there."""
        if self.kv_scales_dtype is None:
            return
        k = kv_cache_runtime_params(self.k_cache_scale, self.k_cache_offset, self.kv_scales_dtype)
        v = kv_cache_runtime_params(self.v_cache_scale, self.v_cache_offset, self.kv_scales_dtype)
        self.kv_quant = KvQuant(*k, *v)

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        out_quant: InputQuant | None = None,
    ) -> torch.Tensor | Int8Rows:
        """Rotate q/k by rope (cos, sin) [T, D] if given (neox layout), store k/v, attend: -> [T, H * D], or
        quantized as out_quant says (o_proj's input) where the ops fuse that."""
        assert self.kv_cache is not None, "the engine must assign kv_cache before running attention"
        kv_quant = self.kv_quant if self.kv_cache.dtype == torch.int8 else None
        assert kv_quant is not None or self.kv_cache.dtype != torch.int8, "an int8 KV cache without its scales"
        return self.ops.attention(q, k, v, rope, self.kv_cache, get_context(), self.scale, kv_quant, out_quant)


def _buffer(name: str) -> str:
    """'k_proj.kv_cache_scale' -> 'k_cache_scale' (vLLM-Ascend's attention-layer names)."""
    return name.replace("_proj.kv_cache", "_cache")
