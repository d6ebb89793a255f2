"""DeepSeek mixture of experts: grouped top-k router, routed experts (float or W8A8_DYNAMIC), shared experts.

Routed experts are read from `<prefix>.{e}.{gate_proj,up_proj,down_proj}.*` and held packed as in vLLM:
w13 [E, 2I, H] (gate rows first), w2 [E, H, I]; int8 scales w13_scale [E, 2I, 1], w2_scale [E, H, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.backends.torch_ops import TORCH_OPS, TorchOps
from slimquant.format.schemes import FLOAT
from slimquant.format.validation import FLOAT_TENSOR, INT8_WEIGHT, WEIGHT_OFFSET, WEIGHT_SCALE
from slimquant.layers.linear import Linear
from slimquant.layers.quant_config import QuantConfig
from slimquant.layers.quant_methods import replace_param

PROJS = ("gate_proj", "up_proj", "down_proj")


class GatedMLP(nn.Module):
    """down_proj(silu(gate_proj x) * up_proj x), gate and up fused (dense layers and shared experts)."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(
        self, hidden: int, inter: int, quant_config: QuantConfig, prefix: str, dtype: torch.dtype, bias: bool = False
    ):
        super().__init__()
        common = dict(quant_config=quant_config, dtype=dtype, bias=bias)
        self.gate_up_proj = Linear(
            hidden, [inter, inter], prefix=f"{prefix}.gate_up_proj", shards=["gate_proj", "up_proj"], **common
        )
        self.down_proj = Linear(inter, [hidden], prefix=f"{prefix}.down_proj", **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))  # [T, H] -> [T, 2I] -> [T, I] -> [T, H]


class TopkRouter(nn.Module):
    """gate.weight [E, H] (fp32) -> (topk_weights fp32 [T, K], topk_ids [T, K]) as DeepSeek V2/V3 route."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.n_group, self.topk_group = getattr(config, "n_group", None) or 1, getattr(config, "topk_group", None) or 1
        self.scoring = getattr(config, "scoring_func", None) or ("sigmoid" if _is_v3(config) else "softmax")
        self.topk_method = getattr(config, "topk_method", None) or ("noaux_tc" if _is_v3(config) else "greedy")
        self.norm_topk_prob, self.scaling = bool(config.norm_topk_prob), float(config.routed_scaling_factor)
        _check_routing(self.scoring, self.topk_method, self.num_experts, self.n_group)
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = None
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        if self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias  # the bias picks experts, never weighs them
            group_scores = choice.view(-1, self.n_group, self.num_experts // self.n_group).topk(2, dim=-1)[0].sum(-1)
            ids = torch.topk(self._group_masked(choice, group_scores, float("-inf")), self.top_k, dim=-1)[1]
            weights = scores.gather(1, ids)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(-1, self.n_group, self.num_experts // self.n_group).max(dim=-1).values
            weights, ids = torch.topk(self._group_masked(scores, group_scores, 0.0), self.top_k, dim=-1)
        else:
            weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids  # [T, K]

    def _group_masked(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        """scores [T, E] with experts outside the topk_group best groups set to `fill`."""
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1)[1]  # [T, topk_group]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, G]
        mask = group_mask[:, :, None].expand(-1, -1, self.num_experts // self.n_group).reshape(scores.shape)
        return scores.masked_fill(~mask.bool(), fill)


def _is_v3(config) -> bool:
    return getattr(config, "model_type", "") != "deepseek_v2"


def _check_routing(scoring: str, topk_method: str, num_experts: int, n_group: int) -> None:
    if scoring not in ("sigmoid", "softmax"):
        raise ValueError(f"scoring_func {scoring!r} is not supported; supported: 'sigmoid', 'softmax'")
    if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method {topk_method!r} is not supported: 'noaux_tc', 'greedy', 'group_limited_greedy'")
    if num_experts % n_group:
        raise ValueError(f"n_routed_experts {num_experts} is not a multiple of n_group {n_group}")


class RoutedExperts(nn.Module):
    """E gated MLPs; forward(x, topk_weights, topk_ids) = sum_k weight_k * expert_k(x) per token."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(
        self, num_experts: int, hidden: int, inter: int, quant_config: QuantConfig, prefix: str, dtype: torch.dtype
    ):
        super().__init__()
        self.num_experts, self.inter, self.prefix, self.dtype = num_experts, inter, prefix, dtype
        expert_linears = [f"{prefix}.{e}.{p}" for e in range(num_experts) for p in PROJS]
        self.quant_type = quant_config.moe_quant_type(prefix, expert_linears)
        self.scale_dtype = quant_config.model_dtype or dtype  # the NPU holds the scales in the model dtype
        self.quantized = self.quant_type != FLOAT
        w_dtype = torch.int8 if self.quantized else dtype
        self.w13 = _param((num_experts, 2 * inter, hidden), w_dtype)
        self.w2 = _param((num_experts, hidden, inter), w_dtype)
        if self.quantized:
            self.w13_scale, self.w13_offset = _param((num_experts, 2 * inter, 1)), _param((num_experts, 2 * inter, 1))
            self.w2_scale, self.w2_offset = _param((num_experts, hidden, 1)), _param((num_experts, hidden, 1))

    def checkpoint_entries(self) -> Iterator[tuple[str, Callable[[torch.Tensor], None], bool]]:
        """(checkpoint tensor name, loader, optional) for every expert's gate/up/down tensors."""
        leaves = {"weight": ""} | ({"weight_scale": "_scale", "weight_offset": "_offset"} if self.quantized else {})
        for e in range(self.num_experts):
            for proj in PROJS:
                for leaf, suffix in leaves.items():
                    name, param = f"{self.prefix}.{e}.{proj}.{leaf}", ("w2" if proj == "down_proj" else "w13") + suffix
                    yield name, partial(self._load, name, param, e, proj), False

    def _load(self, name: str, param_name: str, expert: int, proj: str, tensor: torch.Tensor) -> None:
        target = getattr(self, param_name).data[expert]  # [2I | H, ...]
        if proj != "down_proj":
            target = target.narrow(0, 0 if proj == "gate_proj" else self.inter, self.inter)
        rule = {"weight": INT8_WEIGHT if self.quantized else FLOAT_TENSOR, "weight_scale": WEIGHT_SCALE}
        rule.get(name.rpartition(".")[2], WEIGHT_OFFSET).check(name, tensor)
        if tensor.numel() != target.numel():
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} does not fit {tuple(target.shape)}; the checkpoint "
                "does not match config.json"
            )
        target.copy_(tensor.reshape(target.shape))

    def process_weights_after_loading(self) -> None:
        """int8: scales in the model dtype, weights packed per expert for the int8 GEMM."""
        if not self.quantized:
            return
        for name in ("w13", "w2"):
            scale = getattr(self, f"{name}_scale").data  # [E, N, 1] fp32
            replace_param(self, f"{name}_scale", scale.to(self.scale_dtype).reshape(self.num_experts, -1))  # [E, N]
            packed = self.ops.pack_weight(getattr(self, name).data)  # [E, ...]: one form for all experts
            replace_param(self, name, packed)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; topk_weights fp32 / topk_ids: [T, K]
        out = torch.zeros_like(x)
        x_in = self.ops.quantize_per_token(x) if self.quantized else x  # quantize once: per-token scales
        for e in topk_ids.unique().tolist():
            token_idx, pos = torch.where(topk_ids == e)
            y = self._expert(e, x_in, token_idx, x.dtype)  # [n, H]
            out.index_add_(0, token_idx, (y * topk_weights[token_idx, pos, None]).to(x.dtype))
        return out

    def _expert(self, e: int, x_in, token_idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Expert e on the tokens token_idx: [n, H]; x_in is x, or (x_q, s_t) when the experts are int8."""
        if not self.quantized:
            return F.linear(self.ops.silu_and_mul(F.linear(x_in[token_idx], self.w13[e])), self.w2[e])
        x_q, s_t = x_in[0][token_idx], x_in[1][token_idx]  # [n, H] int8, [n, 1]
        gate_up = (self.ops.int8_mm(x_q, self.w13[e]).float() * s_t * self.w13_scale[e].float()).to(dtype)
        a_q, s2 = self.ops.quantize_per_token(self.ops.silu_and_mul(gate_up))  # [n, I] int8, [n, 1]
        return (self.ops.int8_mm(a_q, self.w2[e]).float() * s2 * self.w2_scale[e].float()).to(dtype)


def _param(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class DeepseekMoE(nn.Module):
    """Router + routed experts + shared experts: y = experts(x) + shared(x)."""

    def __init__(self, config, quant_config: QuantConfig, prefix: str, dtype: torch.dtype):
        super().__init__()
        h, i = config.hidden_size, config.moe_intermediate_size
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; only 'silu'")
        self.gate = TopkRouter(config)
        self.experts = RoutedExperts(config.n_routed_experts, h, i, quant_config, f"{prefix}.experts", dtype)
        self.shared_experts = None
        if getattr(config, "n_shared_experts", None):
            bias = bool(getattr(config, "mlp_bias", False))
            shared = i * config.n_shared_experts
            self.shared_experts = GatedMLP(h, shared, quant_config, f"{prefix}.shared_experts", dtype, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)
