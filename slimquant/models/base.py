"""What every decoder-only model shares: embeddings -> layers -> final norm, and the LM head."""

from __future__ import annotations

import torch
from torch import nn

from slimquant import kernels
from slimquant.layers import greedy_head
from slimquant.layers.attention import KVCacheLayer
from slimquant.layers.context import get_context
from slimquant.layers.embedding import VocabEmbedding
from slimquant.layers.linear import Linear
from slimquant.layers.norm import RMSNorm
from slimquant.layers.quant_config import QuantConfig
from slimquant.layers.quant_methods import UnquantizedMethod
from slimquant.layers.rotary import RotaryEmbedding, rope_parameters

# A bf16 model's step runs natively (fp32 arithmetic over the bf16 weights) while its linears' multiply-adds stay
# below this; above, the per-op path's bf16 GEMMs (AVX512-BF16 / AMX) are faster. bench/float_step.py measures
# native / per-op tokens/s: Qwen2.5-1.5B's shape (1.31 G multiply-adds per token) 3.14x at 1 stream, 1.35x at
# 2, 1.17x at 4 (0.86x in another run), 0.79x at 8; SmolLM2 (0.106 G) 1.88x at 16, 1.01x at 64.
BF16_STEP_MAX_MACS = 4_000_000_000
# Prefill steps of up to this many tokens run the native decoder stack too, one attention row per token (its
# attention walks each token's context position by position: for long prompts torch's SDPA is faster).
STACK_PREFILL_TOKENS = 16


class PreNormDecoderLayer(nn.Module):
    """x -> norm -> self_attn -> (+ residual) -> norm -> mlp, residual adds fused into the norms.

    Subclasses create input_layernorm, self_attn, post_attention_layernorm and mlp.
    """

    def forward(self, x, residual, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, H] (residual None on the first layer)
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers, final norm: (input_ids [T], positions [T]) -> hidden [T, H].

    Each layer is called as layer(x, residual, cos, sin) -> (x, residual), residual None on the first.
    """

    def __init__(self, config, quant_config: QuantConfig, dtype: torch.dtype, rope_dim: int, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.rotary = RotaryEmbedding(rope_dim, rope_parameters(config))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, bias=quant_config.norm_has_bias)
        self._stack_plan: kernels.DecoderStackPlan | None | bool = False  # False: not built yet
        self._final_norm: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fp32 (weight, bias) for it
        self._caches: tuple[int, list[torch.Tensor]] = (-1, [])  # (KVCacheLayer.generation, each layer's cache)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        if ctx.is_decode or input_ids.shape[0] <= STACK_PREFILL_TOKENS:  # row-wise attention: cheap for few tokens
            hidden = self._native_step(input_ids, positions)
            if hidden is not None:
                return hidden
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        cos, sin = self.rotary(positions, x.dtype)  # [T, rope_dim]
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        x, _ = self.norm(x, residual)
        return x

    def _native_pays(self, tokens: int) -> bool:
        """Whether the native step beats the per-op path for this many tokens: always where the per-op path runs
        in fp32; for a bf16 model, up to BF16_STEP_MAX_MACS (above, its bf16 GEMMs win)."""
        bf16_ops = self.norm.weight.dtype != torch.float32
        return not bf16_ops or tokens * self._stack_plan.macs_per_token <= BF16_STEP_MAX_MACS

    def _native_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        """A CPU step (decode, or a few prefill tokens) of the whole model in one native call, where every layer
        has a native plan: embeddings, layers, final norm -> hidden fp32 [T, H]. The kernels compute in fp32 over
        the weights as held (int8, or bf16 for float layers), whatever dtype the per-op path runs in."""
        ctx = get_context()
        if input_ids.device.type != "cpu" or ctx.graph_step:
            return None
        if self._stack_plan is False:  # built on the first such step: every layer planned, or None
            plans = [layer.native_plan() if hasattr(layer, "native_plan") else None for layer in self.layers]
            self._stack_plan = kernels.DecoderStackPlan(plans) if plans and all(p is not None for p in plans) else None
            self._final_norm = (kernels.fp32_copy(self.norm.weight), kernels.fp32_copy(self.norm.bias))
        if self._stack_plan is None or not self._native_pays(input_ids.shape[0]):
            return None
        if self._caches[0] != KVCacheLayer.generation:  # a cache was (re)assigned since the last step
            self._caches = (KVCacheLayer.generation, [layer.kv_cache for layer in self.layers])
        rope = self.rotary.table(max(ctx.context_lens))  # rows for every position of the step
        ends = kernels.ModelEnds(self.embed_tokens.weight, rope, *self._final_norm, self.norm.eps)
        return kernels.decoder_model(self._stack_plan, input_ids, positions, ends, self._caches[1], ctx)


class CausalLM(nn.Module):
    """A DecoderModel plus LM head (tied to the embeddings when the config says so)."""

    def __init__(self, config, quant_config: QuantConfig, dtype: torch.dtype, model: DecoderModel):
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = None
        if not getattr(config, "tie_word_embeddings", False):
            h, v = config.hidden_size, config.vocab_size
            self.lm_head = Linear(h, [v], bias=False, quant_config=quant_config, prefix="lm_head", dtype=dtype)
        self._greedy: greedy_head.GreedyHead | None | bool = False  # False: not built yet

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden [T, H]; reads the engine's ForwardContext."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> fp32 logits [N, V]."""
        if self.lm_head is None:
            return kernels.float_linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """hidden [N, H] -> each row's argmax token, as compute_logits(hidden).argmax(-1); an int8 copy of the head
        screens the vocabulary where it can (layers/greedy_head.py)."""
        head = self._greedy_head(hidden)
        tokens = None if head is None else head.argmax(hidden)
        return tokens if tokens is not None else self.compute_logits(hidden).argmax(dim=-1).tolist()

    def top_k_candidates(self, hidden: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """hidden [N, H] -> (ids [N, C], logits [N, C]): the rows of compute_logits(hidden) that can be among each
        row's top_k largest, with their values (-inf padding); None where the head's screen does not apply."""
        head = self._greedy_head(hidden)
        return None if head is None else head.top_k_candidates(hidden, top_k)

    def _greedy_head(self, hidden: torch.Tensor) -> greedy_head.GreedyHead | None:
        """The screening head, built on the first fp32 call where the float head runs on the native kernel."""
        if self._greedy is False and hidden.dtype == torch.float32:
            weight = self._float_head_weight()
            usable = greedy_head.ENABLED and weight is not None and greedy_head.usable(weight)
            self._greedy = greedy_head.GreedyHead(weight) if usable else None
        return self.greedy_head()

    def greedy_head(self) -> greedy_head.GreedyHead | None:
        """The screening head if greedy steps have built one, else None."""
        return self._greedy or None

    def _float_head_weight(self) -> torch.Tensor | None:
        """The head's float weight [V, H] when it is a plain float linear without bias, else None."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        plain = isinstance(self.lm_head.method, UnquantizedMethod) and self.lm_head.bias is None
        return self.lm_head.weight if plain else None
