"""Token embedding table (float, never quantized in the ascend format)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, TorchOps


class VocabEmbedding(nn.Module):
    """ids [T] -> embeddings [T, H]; weight created empty, filled by the loader."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype), requires_grad=False)

    def process_weights_after_loading(self) -> None:
        """The table in the backend's float form (cpu-native: bf16 where exact); rows come out in the model dtype."""
        self.weight = nn.Parameter(self.ops.pack_float_weight(self.weight.data), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)
