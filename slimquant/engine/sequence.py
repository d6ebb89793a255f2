"""Sequence (one sample being generated) and Request (a prompt with its n sequences): plain Python state."""

from __future__ import annotations

import itertools
import time
from enum import Enum, auto
from typing import Any

import torch

from slimquant.engine.detokenizer import IncrementalDetokenizer
from slimquant.outputs import Logprob, PromptLogprobs, RequestMetrics, SampleLogprobs
from slimquant.sampling_params import SamplingParams


class SequenceStatus(Enum):
    """Where a sequence is in the scheduler."""

    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids, KV block table and output state of one sample."""

    _ids = itertools.count()

    def __init__(
        self,
        request: Request,
        index: int,
        generator: torch.Generator | None,
        detok: IncrementalDetokenizer,
        stop_ids: frozenset[int],
        grammar: Any = None,
    ):
        self.seq_id = next(Sequence._ids)
        self.request = request
        self.index = index
        self.params: SamplingParams = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache when first admitted
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # content hashes of the full blocks of token_ids (prefix caching)
        self.num_committed_blocks = 0  # leading blocks registered in the prefix cache
        self.generator = generator
        self.stop_ids = stop_ids  # EOS (unless ignore_eos) and stop_token_ids
        self.grammar = grammar  # an xgrammar GrammarMatcher of the request's structured output, or None
        self.detok = detok
        self.logprobs: SampleLogprobs | None = [] if self.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: PromptLogprobs | None = None
        if index == 0 and self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_sent_tokens = 0  # DELTA outputs: what was already reported
        self.num_sent_chars = 0
        self.finish_reported = False

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated token ids."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        """True once stopped or aborted."""
        return self.status == SequenceStatus.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True while some prompt logprobs are still to be computed."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_token(self, token_id: int, logprob: float, top: dict[int, Logprob] | None) -> None:
        """Record a sampled token and its logprobs."""
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            self.logprobs.append(top)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark as finished; the scheduler frees its blocks."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason


class Request:
    """A prompt and the n sequences sampled from it."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        bad_word_ids: list[list[int]] | None = None,
    ):
        now = time.time()
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.bad_word_ids = bad_word_ids or []  # params.bad_words as token ids (engine/inputs.py bad_word_ids)
        self.metrics = RequestMetrics(arrival_time=now, last_token_time=now)
        self.seqs: list[Sequence] = []
        self.sent_prompt_logprobs = False

    @property
    def is_finished(self) -> bool:
        """True when every sequence finished."""
        return all(s.is_finished for s in self.seqs)
