"""ModelRunner: owns the model and its KV cache; turns a ScheduledBatch into tensors, runs it, samples."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from slimquant.config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from slimquant.engine.scheduler import ScheduledBatch
from slimquant.engine.sequence import Sequence
from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import ForwardContext, forward_context
from slimquant.layers.sampler import Sampler, SamplerOutput, SamplingBatch, TopLogprobs, top_logprobs

logger = logging.getLogger(__name__)


PromptScores = tuple[Sequence, list[TopLogprobs]]  # a sequence and its next prompt tokens' logprobs


@dataclass
class StepInputs:
    """Packed inputs of one forward and which hidden rows need logits."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    context: ForwardContext
    sample_rows: list[int] = field(default_factory=list)  # [S] row of each sampling sequence's last token
    sample_seqs: list[Sequence] = field(default_factory=list)
    prompt_rows: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # rows scoring prompt tokens


@dataclass
class StepResult:
    """Sampled tokens of the sequences that reached their end, and new prompt logprobs."""

    seqs: list[Sequence]
    sampled: SamplerOutput | None
    prompt_logprobs: list[PromptScores]


class ModelRunner:
    """Runs the model over the paged KV cache it allocates on every KVCacheLayer."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, dtype: torch.dtype):
        self.config = config
        self.model = model
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.num_blocks = self._allocate_kv_cache(dtype)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))

    def _allocate_kv_cache(self, dtype: torch.dtype) -> int:
        """Zero KV tensors for the configured budget on every KVCacheLayer; returns the number of blocks."""
        layers = [m for m in self.model.modules() if isinstance(m, KVCacheLayer)]
        assert layers, "the model has no KVCacheLayer"
        block_bytes = sum(math.prod(layer.cache_shape(1, self.block_size)) for layer in layers) * dtype.itemsize
        num_blocks = self.config.num_kv_blocks or self._blocks_for_budget(block_bytes)
        if num_blocks * self.block_size < self.config.max_model_len:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {self.block_size} tokens) cannot hold one sequence of "
                f"max_model_len={self.config.max_model_len} tokens; raise kv_cache_memory_bytes / num_kv_blocks "
                "or lower max_model_len"
            )
        for layer in layers:
            layer.kv_cache = torch.zeros(
                layer.cache_shape(num_blocks, self.block_size), dtype=dtype, device=self.device
            )
        logger.info(
            "KV cache: %d blocks x %d tokens (%.1f MiB)", num_blocks, self.block_size, num_blocks * block_bytes / 2**20
        )
        return num_blocks

    def _blocks_for_budget(self, block_bytes: int) -> int:
        budget = self.config.kv_cache_memory_bytes
        if budget is None:  # enough for max_num_seqs full-length sequences, capped
            wanted = self.config.max_num_seqs * -(-self.config.max_model_len // self.block_size) * block_bytes
            budget = min(wanted, DEFAULT_KV_CACHE_BYTES)
        return budget // block_bytes

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepResult:
        """Run one forward over the batch, sample where a sequence reached its last token."""
        inputs = self.prepare(batch)
        with forward_context(inputs.context):
            hidden = self.model(inputs.input_ids, inputs.positions)  # [T, H]
        prompt_index = [r for _, rows in inputs.prompt_rows for r in rows]
        rows = torch.tensor(inputs.sample_rows + prompt_index, dtype=torch.long, device=hidden.device)
        logits = self.model.compute_logits(hidden[rows]) if len(rows) else None  # [S + P, V] float32
        sampled = None
        if inputs.sample_seqs:
            sampled = self.sampler(logits[: len(inputs.sample_rows)], self.sampling_batch(inputs.sample_seqs))
        return StepResult(inputs.sample_seqs, sampled, self._prompt_logprobs(inputs, logits))

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Pack the scheduled tokens of all sequences along one axis and describe them in a ForwardContext."""
        ids, positions, slots, context_lens, tables = [], [], [], [], []
        sample_rows, sample_seqs, prompt_rows = [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end, row0 = seq.num_computed_tokens, seq.num_computed_tokens + n, len(ids)
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [
                seq.block_table[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, end)
            ]
            context_lens.append(end)
            tables.append(seq.block_table)
            if end == seq.num_tokens:
                sample_rows.append(row0 + n - 1)
                sample_seqs.append(seq)
            if seq.needs_prompt_logprobs:
                first = max(start, len(seq.prompt_logprobs) - 1)  # row p scores prompt token p + 1
                prompt_rows.append((seq, [row0 + p - start for p in range(first, min(end, seq.num_prompt_tokens - 1))]))
        width = max(len(t) for t in tables)
        context = ForwardContext(
            query_lens=list(batch.num_new_tokens),
            context_lens=context_lens,
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor([t + [-1] * (width - len(t)) for t in tables], torch.int32),
            block_size=self.block_size,
        )
        return StepInputs(
            self._tensor(ids, torch.int64),
            self._tensor(positions, torch.int64),
            context,
            sample_rows,
            sample_seqs,
            prompt_rows,
        )

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """Per-row sampling settings of the sequences being sampled."""
        params = [s.params for s in seqs]

        def column(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return self._tensor([getattr(p, name) for p in params], dtype)

        return SamplingBatch(
            temperature=column("temperature"),
            top_k=column("top_k", torch.int64),
            top_p=column("top_p"),
            min_p=column("min_p"),
            presence_penalty=column("presence_penalty"),
            frequency_penalty=column("frequency_penalty"),
            repetition_penalty=column("repetition_penalty"),
            prompt_ids=[s.token_ids[: s.num_prompt_tokens] for s in seqs],
            output_ids=[s.output_token_ids for s in seqs],
            logit_bias=[p.logit_bias for p in params],
            allowed_ids=[p.allowed_token_ids for p in params],
            banned_ids=[sorted(s.stop_ids) if s.num_output_tokens < s.params.min_tokens else [] for s in seqs],
            generators=[s.generator for s in seqs],
            num_logprobs=[p.logprobs for p in params],
        )

    def _prompt_logprobs(
        self, inputs: StepInputs, logits: torch.Tensor | None
    ) -> list[tuple[Sequence, list[TopLogprobs]]]:
        out, offset = [], len(inputs.sample_rows)
        for seq, rows in inputs.prompt_rows:
            if rows:
                first = len(seq.prompt_logprobs)  # prompt token index scored by the first row
                targets = self._tensor(seq.token_ids[first : first + len(rows)], torch.int64)
                raw = torch.log_softmax(logits[offset : offset + len(rows)], dim=-1)  # [R, V]
                out.append((seq, top_logprobs(raw, targets, [seq.params.prompt_logprobs] * len(rows))))
            offset += len(rows)
        return out

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)
