"""Token embedding table (float, never quantized in the ascend format), split by vocabulary under tensor parallel."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, TorchOps
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.format.safetensors_io import Part
from slimquant.format.validation import FLOAT_TENSOR


def vocab_group(vocab_size: int, tp: TensorParallel) -> TensorParallel:
    """The group the embeddings and LM head split over: tp where its size divides the vocabulary, else SINGLE
    (every rank holds the whole table)."""
    return tp if vocab_size % tp.size == 0 else SINGLE


class VocabEmbedding(nn.Module):
    """ids [T] -> embeddings [T, H]; weight created empty, filled by the loader. Under tensor parallel each rank
    holds its rows [V / tp, H] and the ranks add their lookups (each id's row is on one rank: an exact sum)."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(
        self, num_embeddings: int, dim: int, dtype: torch.dtype, prefix: str = "model.embed_tokens",
        tp: TensorParallel = SINGLE,
    ):  # fmt: skip
        super().__init__()
        self.dtype, self.prefix, self.tp = dtype, prefix, vocab_group(num_embeddings, tp)
        self.start, rows = self.tp.share(num_embeddings, "vocab_size")  # this rank's ids: start .. start + rows
        self.weight = nn.Parameter(torch.empty(rows, dim, dtype=dtype), requires_grad=False)

    def checkpoint_entries(self) -> Iterator[tuple[str, Callable[[torch.Tensor], None], bool, Part | None]]:
        """The table's checkpoint name, its loader, and the rows this rank reads."""
        part = None if self.tp.size == 1 else (0, self.start, self.weight.shape[0])
        yield f"{self.prefix}.weight", self._load, False, part

    def _load(self, tensor: torch.Tensor) -> None:
        FLOAT_TENSOR.check(f"{self.prefix}.weight", tensor)
        if tensor.shape != self.weight.shape:
            raise ValueError(
                f"{self.prefix}.weight: checkpoint shape {tuple(tensor.shape)} does not fit "
                f"{tuple(self.weight.shape)}; the checkpoint does not match config.json (vocab_size, hidden_size)"
            )
        self.weight.data.copy_(tensor)

    def process_weights_after_loading(self) -> None:
        """The table in the backend's float form (cpu-native: bf16 where exact); rows come out in the model dtype."""
        self.weight = nn.Parameter(self.ops.pack_float_weight(self.weight.data), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids [T] -> [T, H]
        if self.tp.size == 1:
            return F.embedding(ids, self.weight).to(self.dtype)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])  # [T]: rows other ranks hold
        rows = F.embedding(local.masked_fill(outside, 0), self.weight).to(self.dtype)  # [T, H]
        return self.tp.sum_disjoint(rows.masked_fill(outside[:, None], 0))
