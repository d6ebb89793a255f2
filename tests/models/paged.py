"""A minimal stand-in for the engine in model tests: allocates KV blocks and builds ForwardContexts."""

from __future__ import annotations

import torch

from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import ForwardContext, forward_context
from slimquant.models.loader import LoadedModel

PROMPT = [5, 17, 300, 42, 7, 99, 250, 3, 11, 60, 128, 77, 1]  # 13 tokens: spans several 4-token blocks


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """Max abs error within rel x the reference's largest logit."""
    err = (ours - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max abs error {err} vs logits scale {ref.abs().max().item()}"


class PagedRunner:
    """Runs a CausalLM step by step over a paged KV cache; blocks are handed out in a shuffled order. Steps go
    through the backend where one is given (as the engine's), else through the model's per-op forward."""

    def __init__(
        self,
        model: torch.nn.Module,
        dtype: torch.dtype,
        num_blocks: int = 64,
        block_size: int = 4,
        device="cpu",
        backend=None,
    ):
        self.model, self.backend, self.block_size, self.device = model, backend, block_size, torch.device(device)
        for layer in model.modules():
            if isinstance(layer, KVCacheLayer):
                layer.kv_cache = torch.zeros(layer.cache_shape(num_blocks, block_size), dtype=dtype, device=device)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.blocks: dict[int, list[int]] = {}  # seq id -> block ids
        self.lengths: dict[int, int] = {}  # seq id -> tokens cached

    @classmethod
    def of(cls, loaded: LoadedModel, kv_dtype: torch.dtype | None = None, **kw) -> PagedRunner:
        """A runner over a loaded model, stepping through its backend; the KV cache in the model's dtype."""
        return cls(loaded.model, kv_dtype or loaded.dtype, backend=loaded.backend, **kw)

    def step(self, chunks: dict[int, list[int]]) -> torch.Tensor:
        """Feed each sequence its new tokens (seq id -> token ids) in one step; fp32 logits [T, V]."""
        ids, positions, slots, query_lens, context_lens = [], [], [], [], []
        for seq, tokens in chunks.items():
            start = self.lengths.get(seq, 0)
            self._reserve(seq, start + len(tokens))
            for pos in range(start, start + len(tokens)):
                slots.append(self.blocks[seq][pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += tokens
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            context_lens.append(start + len(tokens))
            self.lengths[seq] = start + len(tokens)
        tables = self._tables(chunks).to(self.device)
        ctx = ForwardContext(query_lens, context_lens, self._tensor(slots), tables, self.block_size)
        ids, positions = self._tensor(ids), self._tensor(positions)
        with torch.inference_mode():
            if self.backend is not None:
                hidden = self.backend.forward(self.model, ids, positions, ctx)
            else:
                with forward_context(ctx):
                    hidden = self.model(ids, positions)
            return self.model.compute_logits(hidden).cpu()

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, device=self.device)

    def _reserve(self, seq: int, length: int) -> None:
        blocks = self.blocks.setdefault(seq, [])
        while len(blocks) * self.block_size < length:
            blocks.append(self.free.pop())

    def _tables(self, chunks: dict[int, list[int]]) -> torch.Tensor:
        width = max(len(self.blocks[s]) for s in chunks)
        rows = [self.blocks[s] + [-1] * (width - len(self.blocks[s])) for s in chunks]
        return torch.tensor(rows, dtype=torch.int32)


def hf_logits(folder, token_ids: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' fp32 logits [T, V] for one sequence (the float reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()
