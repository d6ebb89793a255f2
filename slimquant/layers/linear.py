"""One linear layer for plain and fused (packed) projections; its quant method does the math.

A fused layer such as qkv_proj is built from checkpoint linears (shards) q_proj, k_proj, v_proj whose
output rows are concatenated along N.

Tensor parallel (Megatron): a column-parallel layer holds this rank's part of every shard's output rows; a
row-parallel int8 layer holds its part of K, and the ranks agree on the per-token absmax (W8A8_DYNAMIC) and sum
the int32 products before dequantizing, so each rank's output is one process's, bit for bit. A row-parallel float
layer keeps its whole weight and gathers its input instead: a float sum split over ranks would round differently.
With tp.order "vllm-ascend" a row-parallel layer (int8 or float) computes its rank's float partial output instead,
and the ranks sum those (config.TENSOR_PARALLEL_ORDERS).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, TorchOps
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.format.safetensors_io import Part
from slimquant.format.validation import FLOAT_TENSOR
from slimquant.kernels.int8_input import InputQuant, Int8Rows
from slimquant.layers.quant_config import QuantConfig
from slimquant.layers.quant_methods import UnquantizedMethod, add_param

PARALLEL = (None, "column", "row")


class Linear(nn.Module):
    """y = x W^T (+ b) with W the concatenation of its shards' rows; quantized by its prefix's scheme."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind), which the quant method calls

    def __init__(
        self,
        in_features: int,
        out_sizes: list[int],
        *,
        bias: bool,
        quant_config: QuantConfig,
        prefix: str,
        dtype: torch.dtype,
        shards: list[str] | None = None,
        parallel: str | None = None,
        tp: TensorParallel = SINGLE,
        shard_groups: list[int] | None = None,
    ):
        """shard_groups (column-parallel): into how many parts each shard's rows split (default tp.size; fewer:
        each part held by several ranks, as replicated kv heads)."""
        super().__init__()
        if shards is not None and len(shards) != len(out_sizes):
            raise ValueError(f"{prefix}: {len(shards)} shard names for {len(out_sizes)} output sizes")
        assert parallel in PARALLEL, parallel
        self.prefix, self.tp = prefix, tp
        self.shard_prefixes = _shard_prefixes(prefix, shards)
        self.method = quant_config.linear_method(prefix, self.shard_prefixes)
        self.parallel = parallel if tp.size > 1 else None
        row = self.parallel == "row"
        self.partial_sum = row and tp.order == "vllm-ascend"  # each rank's float output, summed across ranks
        self.gather_input = row and not self.partial_sum and isinstance(self.method, UnquantizedMethod)
        self.split_k = row and not self.gather_input
        self.reduce = tp if self.split_k and not self.partial_sum else SINGLE  # sums int32 products
        if self.parallel == "column":  # this rank's rows of each shard: (start, length)
            groups = shard_groups or [tp.size] * len(out_sizes)
            what = f"{prefix}: output size"
            self.row_parts = [tp.share(n, what, g) for n, g in zip(out_sizes, groups, strict=True)]
            out_sizes = [length for _, length in self.row_parts]
        if self.split_k:  # this rank's columns
            in_features = tp.share(in_features, f"{prefix}: input size")[1]
        self.in_features, self.out_sizes = in_features, list(out_sizes)
        self.method.create_weights(self, in_features, sum(out_sizes), dtype)
        if bias or quant_config.linear_has_bias(self.shard_prefixes):
            add_param(self, "bias", (sum(out_sizes),), dtype, FLOAT_TENSOR)
            self.bias.optional = not bias  # a shift bias: zero for shards the checkpoint gives none
            if not bias:
                self.bias.data.zero_()
        else:
            self.bias = None

    @property
    def input_quant(self) -> InputQuant | None:
        """How this layer quantizes its input, for the op before it to do where the backend fuses that (its forward
        then takes Int8Rows); None for a float layer and where the ranks quantize together (split K)."""
        return None if self.split_k or self.gather_input else self.method.input_quant(self)

    def forward(self, x: torch.Tensor | Int8Rows) -> torch.Tensor:
        # x: [T, K] -> [T, N] (row-parallel float: [T, K / tp] gathered to [T, K] first)
        if self.gather_input:
            x = self.tp.gather(x)
        if not self.partial_sum:
            return self.method.apply(self, x, self.bias)
        y = self.method.apply(self, x, self.bias if self.tp.rank == 0 else None)  # [T, N]: this rank's part
        return self.tp.sum_float(y)

    def checkpoint_entries(self) -> Iterator[tuple[str, Callable[[torch.Tensor], None], bool, Part | None]]:
        """(checkpoint tensor name, function that loads it, optional, the part this rank reads) for every tensor
        this layer reads."""
        for name, param in self.named_parameters(recurse=False):
            for i, prefix in enumerate(self.shard_prefixes):
                optional = getattr(param, "optional", False)
                yield f"{prefix}.{name}", partial(self.load_shard, name, i), optional, self._part(name, i)

    def process_weights_after_loading(self) -> None:
        """Hand the loaded parameters to the quant method for their runtime form."""
        if self.partial_sum and self.tp.rank > 0 and hasattr(self, "quant_bias"):
            self.quant_bias.data.zero_()  # vLLM-Ascend: only rank 0 adds it
        self.method.process_weights_after_loading(self)

    def load_shard(self, name: str, shard: int, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor into parameter `name`: its shard's rows, or its per-shard slot."""
        param, stored = getattr(self, name), tensor
        if param.load_transform is not None:
            tensor = param.load_transform(tensor)
        param.rule.check(f"{self.shard_prefixes[shard]}.{name}", stored, tensor)
        if param.per_shard:
            target = param.data[shard : shard + 1]
        else:
            offset = sum(self.out_sizes[:shard])
            target = param.data.narrow(0, offset, self.out_sizes[shard])
        if tensor.numel() != target.numel():
            raise ValueError(
                f"{self.shard_prefixes[shard]}.{name}: checkpoint shape {tuple(tensor.shape)} does not fit "
                f"{tuple(target.shape)}; the checkpoint does not match config.json"
            )
        target.copy_(tensor.reshape(target.shape))

    def _part(self, name: str, shard: int) -> Part | None:
        """What this rank reads of a checkpoint tensor: its rows of a column-parallel layer's shard, its columns of a
        row-parallel layer's weight; None: all of it."""
        if self.parallel == "column" and not getattr(self, name).per_shard:
            start, size = self.row_parts[shard]
            return 0, start, size
        if self.split_k and name == "weight":
            return 1, self.tp.rank * self.in_features, self.in_features
        return None


def _shard_prefixes(prefix: str, shards: list[str] | None) -> list[str]:
    """Checkpoint prefixes of the shards: siblings of `prefix` (e.g. layers.0.self_attn.q_proj)."""
    if shards is None:
        return [prefix]
    parent = prefix.rpartition(".")[0]
    return [f"{parent}.{s}" if parent else s for s in shards]
