"""ModelRunner: owns the model and its KV cache; turns a ScheduledBatch into tensors, runs it, samples."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from slimquant.config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from slimquant.engine.cuda_graphs import CudaGraphDecoder, graphs_supported
from slimquant.engine.scheduler import ScheduledBatch
from slimquant.engine.sequence import Sequence
from slimquant.layers import greedy_head
from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import ForwardContext, forward_context
from slimquant.layers.sampler import (
    SAMPLING_EPS,
    Sampler,
    SamplerOutput,
    SamplingBatch,
    TopLogprobs,
    top_logprobs,
)
from slimquant.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptScores = tuple[Sequence, list[TopLogprobs]]  # a sequence and its next prompt tokens' logprobs
PromptRows = tuple[Sequence, list[int]]  # a sequence and the packed rows that score its prompt tokens


@dataclass
class LogitRows:
    """Which packed rows need logits: each sampling sequence's last token, and rows that score prompt tokens."""

    sample_rows: list[int] = field(default_factory=list)  # [S]
    sample_seqs: list[Sequence] = field(default_factory=list)  # [S]
    prompt_rows: list[PromptRows] = field(default_factory=list)

    def add(self, seq: Sequence, start: int, end: int, row0: int) -> None:
        """seq runs positions [start, end) at packed rows row0 ...; note the rows it needs logits for."""
        if end == seq.num_tokens:
            self.sample_rows.append(row0 + end - start - 1)
            self.sample_seqs.append(seq)
        if seq.needs_prompt_logprobs:
            first = max(start, len(seq.prompt_logprobs) - 1)  # row at position p scores prompt token p + 1
            last = min(end, seq.num_prompt_tokens - 1)
            self.prompt_rows.append((seq, [row0 + p - start for p in range(first, last)]))

    def indices(self) -> list[int]:
        """Rows to compute logits for: sampling rows first, then prompt-scoring rows."""
        return self.sample_rows + [r for _, rows in self.prompt_rows for r in rows]


@dataclass
class StepInputs:
    """Packed inputs of one forward and which hidden rows need logits."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    context: ForwardContext
    rows: LogitRows


@dataclass
class StepResult:
    """Sampled tokens of the sequences that reached their end, and new prompt logprobs."""

    seqs: list[Sequence]
    sampled: SamplerOutput | None
    prompt_logprobs: list[PromptScores]


class ModelRunner:
    """Runs the model over the paged KV cache it allocates on every KVCacheLayer."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, kv_dtype: torch.dtype):
        self.config = config
        self.model = model
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        use_graphs = self._use_graphs()
        self.num_blocks = self._allocate_kv_cache(kv_dtype, scratch_blocks=int(use_graphs))
        self.graphs = None
        if use_graphs:  # the scratch block (id num_blocks) takes the padding rows' KV writes
            max_blocks = -(-config.max_model_len // self.block_size)
            self.graphs = CudaGraphDecoder(model, config.max_num_seqs, max_blocks, self.block_size, self.num_blocks)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))

    def _use_graphs(self) -> bool:
        """Decode by CUDA graph replay: on a GPU, unless enforce_eager, where the model's forward allows it."""
        return self.device.type == "cuda" and not self.config.enforce_eager and graphs_supported(self.model)

    def _allocate_kv_cache(self, dtype: torch.dtype, scratch_blocks: int = 0) -> int:
        """Zero KV tensors for the configured budget (+ scratch blocks) on every KVCacheLayer; returns the number
        of blocks for sequences."""
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
                layer.cache_shape(num_blocks + scratch_blocks, self.block_size), dtype=dtype, device=self.device
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
        hidden = None if self.graphs is None else self.graphs.run(inputs.input_ids, inputs.positions, inputs.context)
        if hidden is None:
            with forward_context(inputs.context):
                hidden = self.model(inputs.input_ids, inputs.positions)  # [T, H]
        rows = inputs.rows
        greedy = bool(rows.sample_seqs) and all(plain_greedy(s) for s in rows.sample_seqs)
        if greedy and not rows.prompt_rows:  # only argmaxes wanted: the model may skip most of the head
            tokens = self.model.greedy_tokens(self._rows(hidden, rows.sample_rows))
            return StepResult(rows.sample_seqs, Sampler.unscored_output(tokens), [])
        if (screened := self._sample_top_k(hidden, rows)) is not None:
            return screened
        logits = self._logits(hidden, rows.indices())  # [S + P, V] float32, or None
        sampled = None
        if greedy:
            sampled = Sampler.argmax(logits[: len(rows.sample_rows)])
        elif rows.sample_seqs:
            sampled = self.sampler(logits[: len(rows.sample_rows)], self.sampling_batch(rows.sample_seqs))
        return StepResult(rows.sample_seqs, sampled, self._prompt_logprobs(rows, logits))

    def _sample_top_k(self, hidden: torch.Tensor, rows: LogitRows) -> StepResult | None:
        """Top-k sampling among the head screen's candidates (layers/greedy_head.py) where each sampled row needs
        only its top-k logits; None where that does not apply."""
        top_k = screened_top_k(rows.sample_seqs)
        if top_k is None or rows.prompt_rows:
            return None
        found = self.model.top_k_candidates(self._rows(hidden, rows.sample_rows), top_k)
        if found is None:
            return None
        ids, logits = found  # [S, C] each
        picked = self.sampler.sample(logits, self.sampling_batch(rows.sample_seqs))  # [S] positions in C
        return StepResult(rows.sample_seqs, Sampler.unscored_output(ids.gather(1, picked[:, None])[:, 0].tolist()), [])

    def _logits(self, hidden: torch.Tensor, indices: list[int]) -> torch.Tensor | None:
        """Logits of the hidden rows at indices."""
        return self.model.compute_logits(self._rows(hidden, indices)) if indices else None

    @staticmethod
    def _rows(hidden: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """hidden [T, H] -> the rows at indices (a plain slice when they are 0 .. n-1, as in decode)."""
        if indices == list(range(len(indices))):
            return hidden[: len(indices)]
        return hidden[torch.tensor(indices, dtype=torch.long, device=hidden.device)]

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Pack the scheduled tokens of all sequences along one axis and describe them in a ForwardContext."""
        ids, positions, slots, rows = [], [], [], LogitRows()
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            rows.add(seq, start, end, len(ids))
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [self._slot(seq, p) for p in range(start, end)]
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in batch.seqs]  # [B, width]
        context = ForwardContext(
            query_lens=list(batch.num_new_tokens),
            context_lens=[s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)],
            slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._tensor(tables, torch.int32),
            block_size=self.block_size,
        )
        return StepInputs(self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), context, rows)

    def _slot(self, seq: Sequence, position: int) -> int:
        """Flat KV slot of a token position: block id * block_size + offset in its block."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

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
            prompt_ids=[s.token_ids[: s.num_prompt_tokens] if penalized(s.params) else [] for s in seqs],
            output_ids=[s.output_token_ids if penalized(s.params) else [] for s in seqs],
            logit_bias=[p.logit_bias for p in params],
            allowed_ids=[p.allowed_token_ids for p in params],
            banned_ids=[sorted(s.stop_ids) if s.num_output_tokens < s.params.min_tokens else [] for s in seqs],
            generators=[s.generator for s in seqs],
            num_logprobs=[p.logprobs for p in params],
        )

    def _prompt_logprobs(self, rows: LogitRows, logits: torch.Tensor | None) -> list[PromptScores]:
        """Logprobs of the prompt tokens scored this step, per sequence."""
        out, offset = [], len(rows.sample_rows)
        for seq, prompt_rows in rows.prompt_rows:
            n = len(prompt_rows)
            if n:
                first = len(seq.prompt_logprobs)  # prompt token index scored by the first row
                targets = self._tensor(seq.token_ids[first : first + n], torch.int64)
                raw = torch.log_softmax(logits[offset : offset + n], dim=-1)  # [n, V]
                out.append((seq, top_logprobs(raw, targets, [seq.params.prompt_logprobs] * n)))
            offset += n
        return out

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)


def plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing to apply or report (no logprobs, penalties, biases, allowed or banned tokens): argmax."""
    return seq.params.temperature < SAMPLING_EPS and plain_logits(seq)


def plain_logits(seq: Sequence) -> bool:
    """The row's raw logits decide alone: no logprobs to report, no penalties, biases, allowed or banned tokens."""
    p = seq.params
    return (
        p.logprobs is None
        and not penalized(p)
        and not p.logit_bias
        and p.allowed_token_ids is None
        and seq.num_output_tokens >= p.min_tokens
    )


def screened_top_k(seqs: list[Sequence]) -> int | None:
    """The largest top_k of sampling rows that need only their top-k logits (top-k sampling with nothing else to
    apply or report, as plain_greedy), or None where a row needs more or there are none."""
    if not seqs:
        return None
    ks = [s.params.top_k for s in seqs]
    plain = all(plain_logits(s) for s in seqs)
    return max(ks) if plain and all(0 < k <= greedy_head.TOP_K_MAX for k in ks) else None


def penalized(params: SamplingParams) -> bool:
    """Whether any penalty applies (then the sampler needs the token history)."""
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
