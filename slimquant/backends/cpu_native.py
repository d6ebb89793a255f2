"""The cpu-native backend: the native kernels (AVX2, AVX-512 VNNI or AMX) for every op, and whole steps in one call.

Per op (NativeOps), every layer's kernels equal TorchOps' numbers. A decode step, or a prefill chunk of up to
STACK_PREFILL_TOKENS tokens, of a model whose every layer has a native form runs embeddings, all layers and the
final norm in one native call (native_stack.py), with the per-op path's bits. A model with bf16 activations (a
float checkpoint on a CPU with native bf16) runs that step in fp32 over its bf16 weights only while the step's
multiply-adds stay below BF16_STEP_MAX_MACS; above, the per-op path's bf16 GEMMs are faster. Where the CPU has
native bf16, larger prefills over fp32 activations (int8 models) attend in bf16 over a bf16 KV cache
(TorchOps.bf16_prefill_attention). The head screens greedy and top-k steps with an int8 copy of itself
(greedy_screen.py).

The two thresholds were measured with bench/float_step.py and bench/step_split.py (docs/benchmarks.md).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from slimquant.backends import greedy_screen
from slimquant.backends.base import Backend, LogitsHead
from slimquant.backends.native_ops import NativeOps
from slimquant.backends.native_ranks import NativeRanks
from slimquant.backends.native_stack import (
    DecoderStackPlan,
    ModelEnds,
    decoder_layer_plan,
    decoder_model,
    fp32_copy,
)
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.kernels import native
from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import ForwardContext

logger = logging.getLogger(__name__)

STACK_PREFILL_TOKENS = 16  # prefill chunks up to this size run the stack too (its attention walks row by row)
_BF16_ATTENTION = "prefill over a bf16 KV cache attends in bf16"  # a note, where the ops do
BF16_STEP_MAX_MACS = 4_000_000_000  # bf16 activations: the stack runs while a step's linears stay below this


class CpuNativeBackend(Backend):
    """Native kernels per op, and the whole-model native step where it applies."""

    name = "cpu-native"

    def __init__(
        self,
        lib: native.Library,
        greedy_screen: bool = True,
        hugepages: bool = True,
        tp: TensorParallel = SINGLE,
        bf16_prefill_attention: bool = False,
    ):
        """tp: this process's tensor-parallel group; its whole steps reduce across the ranks from inside the
        native call (NativeRanks). bf16_prefill_attention: see TorchOps (for a CPU with native bf16)."""
        super().__init__(NativeOps(lib, hugepages, bf16_prefill_attention))
        self.lib, self.greedy_screen, self.tp = lib, greedy_screen, tp
        self.ranks = NativeRanks(lib, tp) if tp.size > 1 else None
        self._ranks_agree = tp.size == 1  # the ranks agreed which steps run the stack (on the first step)
        self.stack: DecoderStackPlan | None = None
        self.fp32_steps_only = True  # the stack pays at any size (fp32 activations); else up to BF16_STEP_MAX_MACS
        self._final_norm: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._caches: tuple[int, list[torch.Tensor]] = (-1, [])  # (KVCacheLayer.generation, each layer's cache)

    def describe(self) -> str:
        build = native.ISA_NAMES[self.lib.isa]
        return super().describe().replace(self.name, f"{self.name} ({build} build)", 1)

    def prepare(self, model: nn.Module) -> None:
        """Plan every layer for the stack (or note which one cannot be, and why)."""
        decoder = model.model
        fp32_activations = decoder.norm.weight.dtype == torch.float32
        if self.ops.bf16_prefill_attention and fp32_activations:
            self.notes.append(_BF16_ATTENTION)
        parts = [layer.stack_parts() if hasattr(layer, "stack_parts") else None for layer in decoder.layers]
        if (first := next((i for i, p in enumerate(parts) if p is None), None)) is not None:
            layer = decoder.layers[first]
            what = type(layer).__name__ + (f" with {type(layer.mlp).__name__}" if hasattr(layer, "mlp") else "")
            self.notes.append(f"steps run per op: layer {first} ({what}) has no native stack form")
            return
        plans = [decoder_layer_plan(self.lib, p) for p in parts]
        if reasons := [(i, r) for i, r in enumerate(plans) if isinstance(r, str)]:
            i, reason = reasons[0]
            self.notes.append(f"steps run per op: layer {i} ({reason})")
            return
        self.stack = DecoderStackPlan(plans)
        self.fp32_steps_only = fp32_activations
        self._final_norm = (fp32_copy(decoder.norm.weight), fp32_copy(decoder.norm.bias))
        limit = "" if self.fp32_steps_only else f", up to {BF16_STEP_MAX_MACS / 1e9:g} G multiply-adds per step"
        ranks = f", reduced across {self.tp.size} ranks from inside it" if self.tp.size > 1 else ""
        steps = "decode" if self.stack.decode_only else f"decode and prefill chunks <= {STACK_PREFILL_TOKENS} tokens"
        self.notes.append(f"{steps} in one native call{limit}{ranks}")

    def forward(
        self, model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        if not self._ranks_agree:
            self._agree()
        if self._stack_takes(input_ids.shape[0], ctx):
            hidden = self._stack_step(model, input_ids, positions, ctx)
            if hidden is not None:
                return hidden
        return super().forward(model, input_ids, positions, ctx)

    def head(self, model: nn.Module) -> LogitsHead:
        return ScreenedHead(model, self.ops) if self.greedy_screen else LogitsHead(model)

    def _agree(self) -> None:
        """Every rank runs the stack, or none (a rank's part of a weight may hold -128, which has no native form):
        the ranks run the same steps' collectives. And every rank attends in bf16 in prefill, or none (a node's
        CPU may lack native bf16): the ranks' heads round alike."""
        lacking = self.tp.max(torch.tensor([int(self.stack is None), int(not self.ops.bf16_prefill_attention)]))
        if lacking[0].item() and self.stack is not None:
            self.stack = None
            self.notes.append("steps run per op: another tensor-parallel rank's layers have no native stack form")
        if lacking[1].item() and self.ops.bf16_prefill_attention:
            self.ops.bf16_prefill_attention = False
            self.notes = [n for n in self.notes if n != _BF16_ATTENTION]
            self.notes.append("prefill attends in fp32: another tensor-parallel rank's CPU has no native bf16")
        self._ranks_agree = True

    def _stack_takes(self, tokens: int, ctx: ForwardContext) -> bool:
        """Whether this step runs the stack: a decode step or a small prefill (not for MLA), within the bf16 work
        limit."""
        if self.stack is None:
            return False
        if not (ctx.is_decode or (tokens <= STACK_PREFILL_TOKENS and not self.stack.decode_only)):
            return False
        return self.fp32_steps_only or tokens * self.stack.macs_per_token <= BF16_STEP_MAX_MACS

    def _stack_step(self, model: nn.Module, input_ids, positions, ctx: ForwardContext) -> torch.Tensor | None:
        """hidden fp32 [T, H] of one native call, or None where the step's tensors are not in its layout."""
        decoder = model.model
        if self._caches[0] != KVCacheLayer.generation:  # a cache was (re)assigned since the last step
            self._caches = (KVCacheLayer.generation, [layer.kv_cache for layer in decoder.layers])
        if self._caches[1][0].dtype == torch.int8 and any(
            q > 1 and n == q for q, n in zip(ctx.query_lens, ctx.context_lens, strict=True)
        ):
            return None  # a new prompt over an int8 cache attends to its own float k / v: the per-op path's SDPA
        rope = decoder.rotary.table(max(ctx.context_lens))  # rows for every position of the step
        embed = decoder.embed_tokens
        vocab = dict(vocab_start=embed.start, vocab_split=embed.tp.size > 1)  # this rank's rows of the table
        ends = ModelEnds(embed.weight, rope, *self._final_norm, decoder.norm.eps, **vocab)
        return decoder_model(self.lib, self.stack, input_ids, positions, ends, self._caches[1], ctx, self.ranks)


class ScreenedHead(LogitsHead):
    """The LM head with an int8 screen for greedy and top-k steps (greedy_screen.py), built on first use where
    the head is a plain bf16 weight; the full head otherwise. Same tokens, same probabilities as the full head.
    Where the head is split over ranks, the screen covers this rank's rows (local_best)."""

    def __init__(self, model: nn.Module, ops: NativeOps):
        super().__init__(model)
        self.ops = ops
        self._screen: greedy_screen.GreedyHead | None | bool = False  # False: not built yet

    def screen(self) -> greedy_screen.GreedyHead | None:
        """The screen of the head rows held here, built on the first call where the head allows one."""
        if self._screen is False:
            weight = self.model.local_head_weight()
            usable = weight is not None and greedy_screen.usable(weight)
            self._screen = greedy_screen.GreedyHead(weight, self.ops) if usable else None
        return self._screen

    def screens(self, top_k: int | None = None) -> bool:
        whole = self.model.vocab_tp.size == 1
        return whole and self.screen() is not None and (top_k is None or 0 < top_k <= greedy_screen.TOP_K_MAX)

    def argmax_bytes(self) -> int | None:
        return self.screen().screen_bytes() if self.screens() else None

    def argmax(self, hidden: torch.Tensor) -> list[int]:
        tokens = self.screen().argmax(hidden) if self.screens() else None
        return tokens if tokens is not None else super().argmax(hidden)

    def top_k(self, hidden: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.screen().top_k_candidates(hidden, top_k) if self.screens(top_k) else None
        return found if found is not None else super().top_k(hidden, top_k)

    def screens_locally(self) -> bool:
        return self.model.vocab_tp.size > 1 and self.screen() is not None

    def local_best(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        found = self.screen().top_k_candidates(hidden, 1) if self.screens_locally() else None
        if found is None:
            return None
        ids, logits = found  # [N, C] each: the rows that can hold the maximum, ascending, with their exact logits
        best = logits.argmax(dim=1, keepdim=True)  # [N, 1]: the first of equal logits
        return ids.gather(1, best)[:, 0], logits.gather(1, best)[:, 0]
