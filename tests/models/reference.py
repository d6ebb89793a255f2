"""Independent reference for quantized checkpoints: transformers' model with every quantized nn.Linear
replaced by a plain per-linear implementation of docs/FORMAT.md's runtime math, read straight from the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.format.checkpoint import read_description, tensor_types
from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.format.schemes import FLOAT


class StaticRef(nn.Module):
    """W8A8: y = ((clamp(round(x * (1 / s_in) + o_in)) @ W^T) + quant_bias) * deq_scale, with s_in cast to the
    model dtype (scale_dtype) and its reciprocal taken there, as vLLM-Ascend does."""

    def __init__(self, t: dict[str, torch.Tensor], scale_dtype: torch.dtype):
        super().__init__()
        self.t, self.scale_dtype = t, scale_dtype

    def forward(self, x):
        t = self.t
        inv = (1.0 / t["input_scale"].to(self.scale_dtype)).to(x.dtype)
        x_q = torch.clamp(torch.round(x * inv + t["input_offset"].to(x.dtype)), -128, 127)
        acc = x_q.long() @ t["weight"].long().T + t["quant_bias"].long()
        deq = t["deq_scale"]
        deq = deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 else deq.float()
        return (acc.float() * deq).to(x.dtype)


class DynamicRef(StaticRef):
    """W8A8_DYNAMIC: y = (round(x / s_t) @ W^T) * weight_scale (model dtype) * s_t + bias."""

    def forward(self, x):
        t = self.t
        s_t = x.float().abs().amax(-1, keepdim=True) / 127.0
        x_q = torch.clamp(torch.round(x.float() / s_t), -128, 127)
        w_s = t["weight_scale"].to(self.scale_dtype).float().reshape(-1)
        y = (x_q.long() @ t["weight"].long().T).float() * s_t * w_s
        if "bias" in t:
            y = y + t["bias"].float()
        return y.to(x.dtype)


class WeightOnlyRef(StaticRef):
    """W8A16: y = x @ ((W_q + weight_offset) * weight_scale)^T + bias, scale and offset in the model dtype and the
    weight rounded to it (npu_weight_quant_batchmatmul's antiquant form)."""

    def forward(self, x):
        t = self.t
        scale = t["weight_scale"].to(self.scale_dtype).float()  # [N, 1]
        offset = t["weight_offset"].to(self.scale_dtype).float()  # [N, 1]
        w = ((t["weight"].float() + offset) * scale).to(x.dtype)  # [N, K]
        b = t["bias"].to(x.dtype) if "bias" in t else None
        return nn.functional.linear(x, w, b)


REFS = {"W8A8": StaticRef, "W8A8_DYNAMIC": DynamicRef, "W8A16": WeightOnlyRef}


class ExpertsRef(nn.Module):
    """W8A8_DYNAMIC routed experts of transformers' DeepSeek MoE, token by token and expert by expert:
    gate/up = DynamicRef(x), a = silu(gate) * up, down = DynamicRef(a), out = sum_k weight_k * down."""

    def __init__(self, experts: list[dict[str, DynamicRef]]):
        super().__init__()
        self.experts = experts  # [E] of {"gate_proj" | "up_proj" | "down_proj": DynamicRef}

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)  # [T, H]
        for t in range(hidden_states.shape[0]):
            x = hidden_states[t : t + 1]
            for k in range(top_k_index.shape[1]):
                e = self.experts[int(top_k_index[t, k])]
                a = torch.nn.functional.silu(e["gate_proj"](x)) * e["up_proj"](x)
                out[t] += (e["down_proj"](a)[0] * top_k_weights[t, k]).to(out.dtype)
        return out


def experts_ref(name: str, tensors: SafetensorsFolder, types: dict[str, str], scale_dtype) -> ExpertsRef | None:
    """An ExpertsRef for the MoE experts module `name` if the checkpoint holds them W8A8_DYNAMIC."""
    if types.get(f"{name}.0.gate_proj.weight") != "W8A8_DYNAMIC":
        return None
    experts, e = [], 0
    while f"{name}.{e}.gate_proj.weight" in types:
        linears = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            prefix = f"{name}.{e}.{proj}"
            t = {k.rpartition(".")[2]: tensors.get(k) for k in types if k.startswith(prefix + ".")}
            linears[proj] = DynamicRef(t, scale_dtype)
        experts.append(linears)
        e += 1
    return ExpertsRef(experts)


def reference_model(
    float_folder, ascend_folder, dtype: torch.dtype, scale_dtype: torch.dtype | None = None
) -> nn.Module:
    """transformers' model of float_folder in dtype, running the ascend checkpoint's tensors with reference math;
    scale_dtype: the model dtype the scales are rounded to (default: dtype)."""
    scale_dtype = scale_dtype or dtype
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_folder, dtype=dtype)
    tensors, types = SafetensorsFolder(ascend_folder), tensor_types(read_description(ascend_folder))
    floats = {k: tensors.get(k) for k, v in types.items() if v == FLOAT and not k.endswith("norm.bias")}
    model.load_state_dict(floats, strict=False)
    for name, module in list(model.named_modules()):
        if name.endswith("mlp.experts") and (experts := experts_ref(name, tensors, types, scale_dtype)) is not None:
            model.get_submodule(name.rpartition(".")[0]).experts = experts
            continue
        kind = types.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and kind in REFS:
            t = {k.rpartition(".")[2]: tensors.get(k) for k in types if k.rpartition(".")[0] == name}
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, REFS[kind](t, scale_dtype))
        if isinstance(module, nn.Linear) and kind == FLOAT and module.bias is None and f"{name}.bias" in types:
            module.bias = nn.Parameter(tensors.get(f"{name}.bias"))  # the anti-outlier shift's bias
        if f"{name}.bias" in types and name.endswith("norm"):
            bias = tensors.get(f"{name}.bias")
            module.register_forward_hook(lambda m, args, out, b=bias: out + b)
    return model.eval()


def reference_logits(model: nn.Module, token_ids: list[int]) -> torch.Tensor:
    """fp32 logits [T, V] of one sequence."""
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def c8_cache(ascend_folder, num_layers: int, scale_dtype: torch.dtype):
    """A transformers cache that holds k / v as docs/FORMAT.md's int8 KV cache reads them back: stored
    clamp(round(x * (1 / s) + o)) with s cast to scale_dtype and its reciprocal taken there, read (q - o) * s. The
    first chunk of the sequence attends to its own float k / v, every later step to the cache (vLLM-Ascend)."""
    from transformers import DynamicCache

    tensors = SafetensorsFolder(ascend_folder)

    def params(i: int, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        stem = f"model.layers.{i}.self_attn.{proj}.kv_cache_"
        return tensors.get(stem + "scale").to(scale_dtype), tensors.get(stem + "offset").to(scale_dtype)

    class C8Cache(DynamicCache):
        def __init__(self):
            super().__init__()
            self.kv = {i: (params(i, "k_proj"), params(i, "v_proj")) for i in range(num_layers)}
            self.seen: set[int] = set()

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            # key_states / value_states [B, KVH, T, D] (keys after RoPE); scales [KVH * D] -> [KVH, 1, D]
            stored = []
            for x, (scale, offset) in zip((key_states, value_states), self.kv[layer_idx], strict=True):
                s, o = (t.reshape(x.shape[1], 1, x.shape[3]).to(x.dtype) for t in (scale, offset))
                inv = (1.0 / scale).reshape(s.shape).to(x.dtype)
                x_q = torch.clamp(torch.round(x * inv + o), -128, 127)
                stored.append((x_q - o) * s)
            keys, values = super().update(*stored, layer_idx, *args, **kwargs)
            first = layer_idx not in self.seen
            self.seen.add(layer_idx)
            return (key_states, value_states) if first else (keys, values)

    return C8Cache()


def reference_steps(model: nn.Module, chunks: list[list[int]], cache) -> torch.Tensor:
    """fp32 logits [T, V] of one sequence fed chunk by chunk through transformers with the given cache (None: a
    float one)."""
    from transformers import DynamicCache

    from slimquant.quant.decoder import cache_argument

    cache, name = DynamicCache() if cache is None else cache, cache_argument(model.forward)
    out = []
    with torch.inference_mode():
        for chunk in chunks:
            out.append(model(torch.tensor([chunk]), **{name: cache}, use_cache=True).logits[0].float())
    return torch.cat(out)
