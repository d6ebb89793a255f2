"""LLMEngine: add requests, step the continuous batch, get incremental RequestOutputs, abort.

engine = LLMEngine.from_kwargs("path/to/model", max_model_len=2048)
engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
while engine.has_unfinished_requests():
    for out in engine.step(): ...
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from slimquant.config import EngineConfig
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.distributed.workers import WorkerGroup, close_exchange, launched_group
from slimquant.engine.block_manager import BlockManager
from slimquant.engine.detokenizer import IncrementalDetokenizer, TokenTexts
from slimquant.engine.inputs import (
    PromptType,
    bad_word_ids,
    load_tokenizer,
    model_max_len,
    parse_prompt,
    stop_token_ids,
    truncated,
)
from slimquant.engine.model_runner import ModelRunner
from slimquant.engine.output_processor import advance_grammar, make_output, process_token, to_logprobs
from slimquant.engine.scheduler import Scheduler
from slimquant.engine.sequence import Request, Sequence
from slimquant.engine.step_sampler import StepResult
from slimquant.engine.structured_output import Grammars
from slimquant.errors import ParamError
from slimquant.outputs import RequestOutput
from slimquant.sampling_params import SamplingParams

if TYPE_CHECKING:
    from slimquant.models.loader import LoadedModel


class LLMEngine:
    """The offline engine: a scheduler over a paged KV cache and a model runner."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.workers: WorkerGroup | None = None
        self._detach: weakref.finalize | None = None  # leaves torchrun's shared memory (external_launcher)
        self.tp, broadcast = SINGLE, False
        if config.tensor_parallel_size > 1:
            launched = dist.is_initialized()  # torchrun (or the caller) made the group
            if (config.distributed_executor_backend or ("external_launcher" if launched else "mp")) == "mp":
                self.workers = WorkerGroup.attach(config) if launched else WorkerGroup.start(config)
                self.tp, broadcast = self.workers.tp, True  # this process drives the other ranks
            else:  # every rank runs this engine on the same requests
                self.tp = launched_group(config)
                self._detach = weakref.finalize(self, close_exchange, self.tp)  # also when dropped or at exit
        if self.workers is None:
            self.runner, loaded = load_runner(config, self.tp, broadcast)
        else:
            try:
                self.runner, loaded = self.workers.guard_load(load_runner, config, self.tp, broadcast)
            except BaseException:
                self.workers.kill()
                raise
            self._stop_ranks = weakref.finalize(self, self.workers.stop, self.runner)  # also when dropped or at exit
            self.workers.keep_alive(self.runner)
        self.hf_config = loaded.hf_config
        self.bytes_read = loaded.bytes_read  # of the checkpoint, by this rank
        self.tokenizer = load_tokenizer(config)
        self.vocab_size = int(loaded.hf_config.vocab_size)
        self.eos_token_ids, self.generation_defaults = stop_token_ids(config, loaded.hf_config, self.tokenizer)
        block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, block_manager)
        self.requests: dict[str, Request] = {}
        self.token_texts = TokenTexts(self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)

    def check_health(self) -> None:
        """RankFailure if a tensor-parallel rank this engine started has died (nothing to check otherwise)."""
        if self.workers is not None:
            self.workers.check()

    def shutdown(self) -> None:
        """Stop the ranks this engine started, or leave the shared memory of torchrun's (nothing for one process);
        the engine cannot step afterwards."""
        if self.workers is not None:
            self._stop_ranks()
            self.workers = None
        if self._detach is not None:
            self._detach()

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> LLMEngine:
        """Build from LLM()-style keyword arguments."""
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    def get_tokenizer(self):
        """The tokenizer used for prompts and outputs."""
        return self.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json sampling defaults applied."""
        return SamplingParams(**self.generation_defaults)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a prompt (text, token ids, or {"prompt"/"prompt_token_ids": ...}); ValueError on bad input."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params if params is not None else self.default_sampling_params()
        text, ids = parse_prompt(prompt, self.tokenizer)
        ids = truncated(ids, params.truncate_prompt_tokens, self.config.max_model_len)
        self._validate(ids, params)
        request = Request(request_id, text, ids, params, bad_word_ids(params.bad_words, self.tokenizer))
        if arrival_time is not None:
            request.metrics.arrival_time = arrival_time
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        grammars = [None] * params.n
        if params.structured_outputs is not None:
            grammars = self.grammars.matchers(params.structured_outputs, params.n)
        for i, grammar in enumerate(grammars):
            detok = IncrementalDetokenizer(self.tokenizer, ids, params)
            request.seqs.append(Sequence(request, i, self._generator(params.seed, i), detok, stop_ids, grammar))
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def _generator(self, seed: int | None, index: int) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.runner.device).manual_seed(seed + index)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ParamError("prompt", "the prompt is empty (0 tokens)")
        max_len = self.config.max_model_len
        if len(ids) >= max_len:
            raise ParamError(
                "prompt",
                f"the prompt has {len(ids)} tokens but max_model_len is {max_len}: "
                "it must leave room for at least one generated token",
            )
        for name, tokens in (
            ("prompt", ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", list(params.logit_bias or ())),
            ("allowed_token_ids", params.allowed_token_ids or []),
        ):
            bad = [t for t in tokens if not 0 <= t < self.vocab_size]
            if bad:
                raise ParamError(name, f"{name} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Cancel requests (unknown or finished ids are ignored) and free their KV blocks."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            request = self.requests.pop(rid, None)
            for seq in request.seqs if request else []:
                if not seq.is_finished:
                    seq.finish("abort")
                    self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        """True while any request waits or runs."""
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        """Requests not yet finished."""
        return len(self.requests)

    def stats(self) -> dict[str, float]:
        """Gauges: running and waiting sequences, fraction of KV blocks in use, preemptions so far."""
        bm = self.scheduler.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": 1.0 - bm.num_free_blocks / len(bm.blocks),
            "num_preemptions": self.scheduler.num_preemptions,
        }

    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled batch; returns an output for each request with news this step."""
        batch = self.scheduler.schedule()
        if not batch:
            assert not self.scheduler.has_unfinished(), "sequences are waiting but none could be scheduled"
            return []
        now = time.time()
        for seq in batch.seqs:
            metrics = seq.request.metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time, metrics.time_in_queue = now, now - metrics.arrival_time
        result = self.workers.guard(self.runner.execute, batch) if self.workers else self.runner.execute(batch)
        self.scheduler.update(batch)
        return self._process(result)

    def _process(self, result: StepResult) -> list[RequestOutput]:
        for seq, entries in result.prompt_logprobs:
            seq.prompt_logprobs.extend(to_logprobs(e, self.token_texts) for e in entries)
        touched: dict[str, Request] = {}
        now = time.time()
        for i, seq in enumerate(result.seqs):
            out = result.sampled
            top = out.top_logprobs[i]
            seq.append_token(out.token_ids[i], out.logprobs[i], to_logprobs(top, self.token_texts))
            process_token(seq, out.token_ids[i], self.config.max_model_len)
            advance_grammar(seq, out.token_ids[i])
            if seq.is_finished:
                self.scheduler.finish(seq)
            touched[seq.request.request_id] = seq.request
            _update_metrics(seq.request, now)
        outputs = [o for r in touched.values() if (o := make_output(r)) is not None]
        for request in touched.values():
            if request.is_finished:
                del self.requests[request.request_id]
        return outputs


def load_runner(config: EngineConfig, tp: TensorParallel, broadcast: bool) -> tuple[ModelRunner, LoadedModel]:
    """This rank's part of the model and its KV cache (config.max_model_len resolved from the model)."""
    from slimquant.models.loader import kv_cache_dtype, load_model

    order, experts = config.tensor_parallel_order, config.enable_expert_parallel
    split = dataclasses.replace(tp, expert_parallel=experts, order=order)  # how the layers split and reduce
    device = config.rank_device(tp.rank)
    loaded = load_model(
        config.model,
        dtype=config.dtype,
        device=device,
        quantization=config.quantization,
        trust_remote_code=config.trust_remote_code,
        kernels=config.kernels,
        enforce_eager=config.enforce_eager,
        tp=split,
    )
    config.resolve(model_max_len(loaded.hf_config))
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, config.dtype, loaded, device)
    return ModelRunner(config, loaded.model, loaded.backend, kv_dtype, tp, broadcast), loaded


def _update_metrics(request: Request, now: float) -> None:
    metrics = request.metrics
    if metrics.first_token_time is None:
        metrics.first_token_time = now
    metrics.last_token_time = now
    if request.is_finished:
        metrics.finished_time = now
