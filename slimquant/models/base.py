"""What every decoder-only model shares: embeddings -> layers -> final norm, and the LM head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, KvQuant, TorchOps
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.layers.embedding import VocabEmbedding, vocab_group
from slimquant.layers.linear import Linear
from slimquant.layers.moe import SparseMoE
from slimquant.layers.norm import RMSNorm
from slimquant.layers.quant_config import QuantConfig
from slimquant.layers.quant_methods import UnquantizedMethod
from slimquant.layers.rotary import RotaryEmbedding, rope_parameters

NormWeights = tuple[torch.Tensor, torch.Tensor | None]  # an RMSNorm's (weight, bias or None)


@dataclass
class MlaParts:
    """What a whole-step backend needs of MLA attention (DeepSeek) beside LayerParts' linears and norms: its widths,
    the rope layout (interleaved pairs or neox halves) and kv_b_proj, whose float weight decode absorbs."""

    rank: int
    nope: int
    rope: int
    v_dim: int
    q_lora_rank: int  # 0: q_proj
    interleave: bool
    kv_b_proj: nn.Module


@dataclass
class LayerParts:
    """What a whole-step backend needs of a pre-norm decoder layer (its stack_parts()): norms "input", "post" (and
    per-head "q", "k": Qwen3; "q_a", "kv_a": MLA) with one eps, linears qkv / o (MLA: qkv is fused_qkv_a_proj or
    q_proj, beside q_b or kv_a) and the dense MLP's gate_up / down (or the routed experts, moe, and its shared
    experts' gate_up / down where it has them), heads (num_heads, num_kv_heads, head_dim), the attention's scale
    and its int8 KV-cache parameters."""

    norms: dict[str, NormWeights]
    eps: float
    linears: dict[str, nn.Module]
    heads: tuple[int, int, int]
    attn_scale: float
    kv_quant: KvQuant | None = None  # the int8 KV cache's parameters, where the checkpoint has them
    moe: nn.Module | None = None  # the layer's layers.moe.SparseMoE in place of gate_up / down
    mla: MlaParts | None = None  # MLA attention in place of qkv's heads


class PreNormDecoderLayer(nn.Module):
    """x -> norm -> self_attn -> (+ residual) -> norm -> mlp, residual adds fused into the norms.

    Subclasses create input_layernorm, self_attn, post_attention_layernorm and mlp; self_attn and mlp say how their
    first linear quantizes its input (input_quant), which the norm before them does where the backend fuses it.
    """

    @property
    def kv_cache(self) -> torch.Tensor | None:
        """This layer's paged KV cache ([2, NB, BS, KVH, D], or MLA's latent cache [NB, BS, R + rope])."""
        return self.self_attn.attn.kv_cache

    def mlp_parts(self) -> tuple[dict[str, nn.Module], nn.Module | None]:
        """stack_parts' MLP half: the dense MLP's (or a MoE layer's shared experts') gate_up / down, and the routed
        experts (a layers.moe.SparseMoE) or None."""
        moe = self.mlp if isinstance(self.mlp, SparseMoE) else None
        dense = self.mlp if moe is None else moe.shared
        linears = {} if dense is None else {"gate_up": dense.gate_up_proj, "down": dense.down_proj}
        return linears, moe

    def forward(self, x, residual, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, H] (residual None on the first layer)
        x, residual = self.input_layernorm.for_linear(x, residual, self.self_attn.input_quant)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm.for_linear(x, residual, self.mlp.input_quant)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    """Embeddings, decoder layers, final norm: (input_ids [T], positions [T]) -> hidden [T, H].

    Each layer is called as layer(x, residual, cos, sin) -> (x, residual), residual None on the first.
    """

    def __init__(
        self, config, quant_config: QuantConfig, dtype: torch.dtype, rope_dim: int, layers: list[nn.Module],
        tp: TensorParallel = SINGLE,
    ):  # fmt: skip
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype, tp=tp)
        self.rotary = RotaryEmbedding(rope_dim, rope_parameters(config))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, bias=quant_config.norm_has_bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [T, H]
        cos, sin = self.rotary(positions, x.dtype)  # [T, rope_dim]
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """A DecoderModel plus LM head (tied to the embeddings when the config says so). Under tensor parallel the head
    is split by vocabulary like the embeddings (vocab_tp): each rank computes its logits, gathered in rank order."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind): the tied head's float linear

    def __init__(
        self, config, quant_config: QuantConfig, dtype: torch.dtype, model: DecoderModel, tp: TensorParallel = SINGLE
    ):
        super().__init__()
        self.config = config
        self.model = model
        self.vocab_tp = vocab_group(config.vocab_size, tp)
        self.lm_head = None
        if not getattr(config, "tie_word_embeddings", False):
            h, v = config.hidden_size, config.vocab_size
            self.lm_head = Linear(
                h, [v], bias=False, quant_config=quant_config, prefix="lm_head", dtype=dtype, parallel="column",
                tp=self.vocab_tp,
            )  # fmt: skip

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden [T, H] (per op; the backend may run the step another way)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> fp32 logits [N, V] (a collective where the head is split: every rank calls it)."""
        if self.lm_head is None:
            logits = self.ops.float_linear(hidden, self.model.embed_tokens.weight).float()  # [N, V / tp]
        else:
            logits = self.lm_head(hidden).float()
        return self.vocab_tp.gather(logits)

    def float_head_weight(self) -> torch.Tensor | None:
        """The head's float weight [V, H] when it is a plain float linear without bias and whole here, else None."""
        return self.local_head_weight() if self.vocab_tp.size == 1 else None

    def split_argmax(self, local: tuple[torch.Tensor, torch.Tensor] | None, rows: int) -> list[int] | None:
        """Greedy tokens of N rows whose logits are split over ranks, from each rank's best (ids [N] among its rows
        and their exact logits [N], or None where it has none); a collective: every rank calls it and gets the same.
        The largest logit wins, the lowest id on ties (torch.argmax over the gathered logits); None where a rank has
        none."""
        start, _ = self.vocab_tp.share(self.config.vocab_size, "vocab_size")
        assert self.config.vocab_size < 2**24, "ids travel as exact fp32 integers"
        mine = torch.zeros(rows, 3)  # [N, 3]: found, logit, global id
        if local is not None:
            ids, logits = local
            mine[:, 0], mine[:, 1], mine[:, 2] = 1.0, logits, (ids + start).float()
        every = self.vocab_tp.gather(mine).view(rows, self.vocab_tp.size, 3)  # [N, R, 3], ranks in vocabulary order
        if not bool(every[:, :, 0].all()):
            return None
        best = every[:, :, 1].argmax(dim=1, keepdim=True)  # [N, 1]: the first rank on ties
        return every[:, :, 2].gather(1, best)[:, 0].long().tolist()

    def local_head_weight(self) -> torch.Tensor | None:
        """The head's float weight rows held here ([V / tp, H] where split) when it is a plain float linear without
        bias, else None."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight
        plain = isinstance(self.lm_head.method, UnquantizedMethod) and self.lm_head.bias is None
        return self.lm_head.weight if plain else None
