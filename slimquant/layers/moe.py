"""Mixture of experts (DeepSeek V2 / V3, Kimi-K2, Qwen2-MoE, Qwen3-MoE, GLM-4.5): top-k router (grouped for
DeepSeek), routed experts (float or W8A8_DYNAMIC), shared experts where the model has them (Qwen2-MoE's gated).

Routed experts are read from `<prefix>.{e}.{gate_proj,up_proj,down_proj}.*` and held packed as in vLLM:
w13 [E, 2I, H] (gate rows first), w2 [E, H, I]; int8 scales w13_scale [E, 2I, 1], w2_scale [E, H, 1].

Tensor parallel: with expert parallel (tp.expert_parallel) each rank holds E / tp whole experts and the ranks swap
their weighted outputs once per layer; without, each rank holds 1 / tp of every expert's intermediate size (its
gate and up rows, its down columns: E, 2I / tp, H and E, H, I / tp) and the ranks agree on the activation's absmax
and sum the int32 down products (int8), or gather the activation (float experts keep their whole down weights).
Either way each token's expert outputs are added in ascending expert order, as one process adds them. Ops that run
experts grouped (one pass for all, no host values) do so for whole experts, and, where they say so
(groups_split_experts), for split int8 ones with the same two reductions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from slimquant.backends.torch_ops import (
    TORCH_OPS,
    TorchOps,
    add_in_expert_order,
    best_groups_only,
    routing_weights,
)
from slimquant.distributed.tensor_parallel import SINGLE, TensorParallel
from slimquant.format.architectures import is_moe_layer, num_routed_experts
from slimquant.format.safetensors_io import Part
from slimquant.format.schemes import FLOAT
from slimquant.format.validation import FLOAT_TENSOR, INT8_WEIGHT, WEIGHT_OFFSET, WEIGHT_SCALE
from slimquant.kernels.int8_input import PER_TOKEN, Int8Rows
from slimquant.layers.mlp import GatedMLP, check_activation, dense_mlp
from slimquant.layers.quant_config import QuantConfig
from slimquant.layers.quant_methods import replace_param

PROJS = ("gate_proj", "up_proj", "down_proj")
# A model's packed_modules_mapping entry for its routed experts (vLLM's FusedMoE: one layer of every expert's linears)
PACKED_EXPERTS = {"experts": [f"experts.0.{p}" for p in PROJS]}


class TopkRouter(nn.Module):
    """gate.weight [E, H] (fp32) -> (topk_weights fp32 [T, K], topk_ids [T, K]) as DeepSeek V2/V3 and Qwen3-MoE
    route (Qwen3-MoE: softmax, greedy top-k, renormalized where norm_topk_prob)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = num_routed_experts(config), config.num_experts_per_tok
        self.n_group, self.topk_group = getattr(config, "n_group", None) or 1, getattr(config, "topk_group", None) or 1
        v3 = getattr(config, "model_type", "") not in SOFTMAX_GREEDY_MODELS  # V3's routing unless the config says
        self.scoring = getattr(config, "scoring_func", None) or ("sigmoid" if v3 else "softmax")
        self.topk_method = getattr(config, "topk_method", None) or ("noaux_tc" if v3 else "greedy")
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", False))
        scaling = getattr(config, "routed_scaling_factor", None)  # DeepSeek's; none in Qwen3-MoE's config
        self.scaling = 1.0 if scaling is None else float(scaling)
        _check_routing(self.scoring, self.topk_method, self.num_experts, self.n_group, self.topk_group, self.top_k)
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size), requires_grad=False)
        self.e_score_correction_bias = None
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, H] -> weights fp32, ids: [T, K]
        if self.plain_softmax:  # one op, which the native backend runs in one call
            return self.ops.softmax_topk(x, self.weight, self.top_k, self.norm_topk_prob, self.scaling, *self.groups)
        if self.topk_method == "noaux_tc":  # sigmoid scores whose bias picks the experts: one op too
            bias = self.e_score_correction_bias
            return self.ops.biased_group_topk(
                x, self.weight, bias, *self.groups, self.top_k, self.norm_topk_prob, self.scaling
            )
        scores = F.linear(x.float(), self.weight.float())  # [T, E]
        scores = scores.sigmoid()  # greedy or group-limited (softmax scores took ops.softmax_topk)
        weights, ids = torch.topk(best_groups_only(scores, *self.groups), self.top_k, dim=-1)
        return routing_weights(weights, self.norm_topk_prob, self.scaling), ids

    @property
    def plain_softmax(self) -> bool:
        """Whether it routes by softmax and a greedy top-k (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2-Lite) or one limited to
        the best groups (DeepSeek-V2): ops.softmax_topk."""
        return self.scoring == "softmax" and self.topk_method in ("greedy", "group_limited_greedy")

    @property
    def groups(self) -> tuple[int, int]:
        """(n_group, topk_group) that limit its top-k: (1, 1) for a greedy one."""
        return (1, 1) if self.topk_method == "greedy" else (self.n_group, self.topk_group)


# model types whose router defaults to softmax + greedy top-k
SOFTMAX_GREEDY_MODELS = ("deepseek_v2", "qwen2_moe", "qwen3_moe")


def _check_routing(scoring: str, topk_method: str, num_experts: int, n_group: int, topk_group: int, top_k: int) -> None:
    if scoring not in ("sigmoid", "softmax"):
        raise ValueError(f"scoring_func {scoring!r} is not supported; supported: 'sigmoid', 'softmax'")
    if topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ValueError(f"topk_method {topk_method!r} is not supported: 'noaux_tc', 'greedy', 'group_limited_greedy'")
    if topk_method == "noaux_tc" and scoring != "sigmoid":
        raise ValueError(
            f"topk_method 'noaux_tc' routes by sigmoid scores (DeepSeek-V3); scoring_func {scoring!r} "
            "is not supported with it"
        )
    if num_experts % n_group:
        raise ValueError(f"n_routed_experts {num_experts} is not a multiple of n_group {n_group}")
    if not 1 <= topk_group <= n_group or not 1 <= top_k <= topk_group * (num_experts // n_group):
        raise ValueError(
            f"num_experts_per_tok {top_k} experts from topk_group {topk_group} of n_group {n_group} groups of "
            f"{num_experts // n_group} experts: it needs 1 <= topk_group <= n_group and 1 <= num_experts_per_tok "
            "<= the experts in topk_group groups"
        )


class RoutedExperts(nn.Module):
    """E gated MLPs; forward(x, topk_weights, topk_ids) = sum_k weight_k * expert_k(x) per token."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inter: int,
        quant_config: QuantConfig,
        prefix: str,
        dtype: torch.dtype,
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        self.num_experts, self.prefix, self.dtype, self.tp = num_experts, prefix, dtype, tp
        expert_linears = [f"{prefix}.{e}.{p}" for e in range(num_experts) for p in PROJS]
        self.quant_type = quant_config.moe_quant_type(prefix, expert_linears)
        self.scale_dtype = quant_config.model_dtype or dtype  # the NPU holds the scales in the model dtype
        self.quantized = self.quant_type != FLOAT
        self.expert_parallel = tp.size > 1 and tp.expert_parallel
        split = tp.size > 1 and not self.expert_parallel  # each expert's intermediate size split over the ranks
        self.first, self.num_local = 0, num_experts  # this rank's experts
        if self.expert_parallel:
            self.first, self.num_local = tp.share(num_experts, "routed experts per layer")
        self.inter = tp.share(inter, "moe_intermediate_size")[1] if split else inter  # this rank's gate / up rows
        self.gather = split and not self.quantized  # float: gather the activation, whole down weights
        self.reduce = tp if split and self.quantized else SINGLE  # int8: absmax MAX, int32 SUM
        down_in = inter if self.gather else self.inter
        w_dtype = torch.int8 if self.quantized else dtype
        self.w13 = _param((self.num_local, 2 * self.inter, hidden), w_dtype)
        self.w2 = _param((self.num_local, hidden, down_in), w_dtype)
        if self.quantized:
            e, i2 = self.num_local, 2 * self.inter
            self.w13_scale, self.w13_offset = _param((e, i2, 1)), _param((e, i2, 1))
            self.w2_scale, self.w2_offset = _param((e, hidden, 1)), _param((e, hidden, 1))

    def checkpoint_entries(self) -> Iterator[tuple[str, Callable[[torch.Tensor], None], bool, Part | None]]:
        """(checkpoint tensor name, loader, optional, the part this rank reads) for its experts' gate/up/down
        tensors."""
        leaves = {"weight": ""} | ({"weight_scale": "_scale", "weight_offset": "_offset"} if self.quantized else {})
        for e in range(self.first, self.first + self.num_local):
            for proj in PROJS:
                for leaf, suffix in leaves.items():
                    name, param = f"{self.prefix}.{e}.{proj}.{leaf}", ("w2" if proj == "down_proj" else "w13") + suffix
                    load = partial(self._load, name, param, e - self.first, proj)
                    yield name, load, False, self._part(proj, leaf)

    def _part(self, proj: str, leaf: str) -> Part | None:
        """This rank's rows of gate/up tensors and columns of the down weight, where the experts are split."""
        if self.reduce.size == 1 and not self.gather:
            return None
        start = self.tp.rank * self.inter
        if proj != "down_proj":
            return 0, start, self.inter
        return (1, start, self.inter) if leaf == "weight" and not self.gather else None

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
            replace_param(self, f"{name}_scale", scale.to(self.scale_dtype).reshape(self.num_local, -1))  # [E, N]
            packed = self.ops.pack_weight(getattr(self, name).data)  # [E, ...]: one form for all experts
            replace_param(self, name, packed)

    @property
    def grouped(self) -> bool:
        """Whether the backend's ops run all these experts in one pass, with no host value (CUDA graphs can
        capture them); else they run one by one after the expert ids come to the host."""
        whole = self.tp.size == 1 or self.expert_parallel  # each expert's matrices on one rank
        return self.quantized and self.ops.groups_experts and (whole or self.ops.groups_split_experts)

    def forward(self, x: torch.Tensor | Int8Rows, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # x: [T, H] (Int8Rows from ops.quantize_input where grouped); topk_weights fp32 / topk_ids: [T, K] -> [T, H]
        if self.grouped:
            first = self.first if self.expert_parallel else None
            weights = (self.w13, self.w13_scale, self.w2, self.w2_scale)
            summed = not self.expert_parallel  # [T, H] (one process's sum), else the slots [T, K, H] to swap
            outs = self.ops.grouped_experts(x, *weights, topk_weights, topk_ids, first, self.reduce, summed=summed)
            if outs is not None:
                return outs if summed else add_in_expert_order(self._swap(outs), topk_ids)
        assert not isinstance(x, Int8Rows), "quantized input is for the ops that run the experts grouped"
        routes = self._routes(topk_ids)
        ys = self._weighted_outputs(x, topk_weights, routes)  # [n_e, H] per expert
        if self.expert_parallel:  # the ranks' slots to one [T, K, H], added in one process's order
            outs = x.new_zeros(*topk_ids.shape, x.shape[-1])  # [T, K, H]: 0 in other ranks' slots
            for (_, tokens, slots), y in zip(routes, ys, strict=True):
                outs[tokens, slots] = y
            return add_in_expert_order(self._swap(outs), topk_ids)
        total = x.new_zeros(x.shape)  # [T, H]
        for (_, tokens, _), y in zip(routes, ys, strict=True):  # ascending expert ids: add_in_expert_order's sums
            total.index_add_(0, tokens, y)
        return total

    def _swap(self, outs: torch.Tensor) -> torch.Tensor:
        """Each slot's output [T, K, H] from the one rank that holds its expert (expert parallel), else outs."""
        return self.tp.sum_disjoint(outs) if self.expert_parallel else outs

    def _routes(self, topk_ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(local expert index, token indices [n], their slots [n]) of each local expert that has tokens, in
        ascending expert id."""
        local = (topk_ids >= self.first) & (topk_ids < self.first + self.num_local)
        ids = topk_ids[local].unique().tolist()  # ascending; the same on every rank unless expert parallel
        return [(e - self.first, *torch.where(topk_ids == e)) for e in ids]

    def _weighted_outputs(
        self, x: torch.Tensor, topk_weights: torch.Tensor, routes: list[tuple[int, torch.Tensor, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Each routed expert's output on its tokens times their routing weights, in x's dtype: [n_e, H] each."""
        if not routes:
            return []
        experts = [e for e, _, _ in routes]
        acts = [self._gate_up(e, x[tokens]) for e, tokens, _ in routes]
        downs = self._down(experts, acts, x.dtype)  # [n_e, H] per expert
        pairs = zip(routes, downs, strict=True)
        return [(y * topk_weights[tokens, slots, None]).to(x.dtype) for (_, tokens, slots), y in pairs]

    def _gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of local expert e on its tokens' rows x [n, H] -> [n, I / tp] (int8: x quantized per
        token, as a W8A8_DYNAMIC linear does)."""
        if not self.quantized:
            return self.ops.silu_and_mul(F.linear(x, self.w13[e]))
        return self.ops.silu_and_mul(self.ops.dynamic_linear(x, self.w13[e], self.w13_scale[e].float(), None, x.dtype))

    def _down(self, experts: list[int], acts: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """Each local expert's down projection of its activation [n_e, I / tp] -> [n_e, H]: int8 whole experts as
        W8A8_DYNAMIC linears, split ones with one collective (or two) for all experts."""
        if self.quantized and self.reduce.size == 1:
            pairs = zip(experts, acts, strict=True)
            return [self.ops.dynamic_linear(a, self.w2[e], self.w2_scale[e].float(), None, dtype) for e, a in pairs]
        sizes, a = [len(t) for t in acts], torch.cat(acts)  # [N, I / tp]
        if not self.quantized:
            a = self.tp.gather(a) if self.gather else a  # [N, I]
            return [F.linear(part, self.w2[e]) for e, part in zip(experts, a.split(sizes), strict=True)]
        absmax = self.reduce.max(a.float().abs().amax(dim=-1, keepdim=True))  # [N, 1]: the whole rows'
        a_q, s2 = self.ops.quantize_per_token(a, absmax)  # [N, I / tp] int8, [N, 1]
        parts = zip(experts, a_q.split(sizes), strict=True)
        acc = self.reduce.sum(torch.cat([self.ops.int8_mm(q, self.w2[e]) for e, q in parts]))  # [N, H] int32
        return [
            (part.float() * s * self.w2_scale[e].float()).to(dtype)
            for e, part, s in zip(experts, acc.split(sizes), s2.split(sizes), strict=True)
        ]


def _param(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class SparseMoE(nn.Module):
    """Router + routed experts (+ shared experts where the config has them): y = experts(x) (+ shared(x)), Qwen2-MoE's
    shared expert times sigmoid(shared_expert_gate x)."""

    def __init__(self, config, quant_config: QuantConfig, prefix: str, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        h, i, e = config.hidden_size, config.moe_intermediate_size, num_routed_experts(config)
        check_activation(config)
        self.gate = TopkRouter(config)
        self.experts = RoutedExperts(e, h, i, quant_config, f"{prefix}.experts", dtype, tp)
        self.shared_experts = self.shared_expert = self.shared_expert_gate = None
        bias = bool(getattr(config, "mlp_bias", False))
        if getattr(config, "n_shared_experts", None):  # DeepSeek, GLM-4.5
            shared = i * config.n_shared_experts
            self.shared_experts = GatedMLP(h, shared, quant_config, f"{prefix}.shared_experts", dtype, bias, tp)
        elif size := getattr(config, "shared_expert_intermediate_size", None):  # Qwen2-MoE
            self.shared_expert = GatedMLP(h, size, quant_config, f"{prefix}.shared_expert", dtype, bias, tp)
            self.shared_expert_gate = SharedExpertGate(h, f"{prefix}.shared_expert_gate")
        quant_config.check_float(float_layers(prefix))  # vLLM builds them float: an int8 one loads in neither

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)
    input_quant = None  # the router reads the float input too (PreNormDecoderLayer)

    @property
    def shared(self) -> GatedMLP | None:
        """The shared experts' MLP (DeepSeek's shared_experts, Qwen2-MoE's shared_expert), or None."""
        return self.shared_experts if self.shared_experts is not None else self.shared_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H]
        weights, ids = self.gate(x)
        if self.shared is None:
            return self.experts(x, weights, ids)
        x_in = self.ops.quantize_input(x, PER_TOKEN) if self._one_quantization() else x  # for both
        shared = self.shared(x_in)  # [T, H]
        if self.shared_expert_gate is not None:
            shared = self.shared_expert_gate(x) * shared  # [T, 1] * [T, H], as transformers
        return self.experts(x_in, weights, ids) + shared

    def _one_quantization(self) -> bool:
        """Whether the routed and the shared experts quantize their input alike (per token) and the routed ones
        run grouped (where the ops take quantized input), so that it is quantized once for both."""
        quant = self.shared.input_quant
        return self.experts.grouped and quant is not None and quant.inv_scale is None


def float_layers(prefix: str) -> list[str]:
    """The layers of the MoE at prefix that vLLM builds float (quant_config=None) where the model has them: the
    router, Qwen2-MoE's shared_expert_gate."""
    return [f"{prefix}.gate", f"{prefix}.shared_expert_gate"]


class SharedExpertGate(nn.Module):
    """Qwen2-MoE's gate on its shared expert: x [T, H] -> sigmoid(x @ weight^T) [T, 1], weight [1, H] held in fp32
    (its checkpoint values) and whole on every rank; float, as vLLM builds it (quant_config=None)."""

    ops: TorchOps = TORCH_OPS  # the backend's ops (Backend.bind)

    def __init__(self, hidden: int, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.weight = nn.Parameter(torch.empty(1, hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H] -> [T, 1]
        return self.ops.shared_gate(x, self.weight)


def sparse_or_dense_mlp(
    config, quant_config: QuantConfig, index: int, prefix: str, dtype: torch.dtype, tp: TensorParallel
) -> nn.Module:
    """Layer index's MLP: routed experts where format.architectures.is_moe_layer says so, else the dense MLP."""
    if is_moe_layer(config, index):
        return SparseMoE(config, quant_config, prefix, dtype, tp)
    return dense_mlp(config, quant_config, prefix, dtype, tp)
