"""Independent reference for quantized checkpoints: transformers' model with every quantized nn.Linear
replaced by a plain per-linear implementation of FORMAT.md's runtime math, read straight from the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from slimquant.quant.modelslim import FLOAT, read_description, tensor_types
from slimquant.quant.sources import SafetensorsFolder


class StaticRef(nn.Module):
    """W8A8: y = ((clamp(round(x / s_in + o_in)) @ W^T) + quant_bias) * deq_scale."""

    def __init__(self, t: dict[str, torch.Tensor]):
        super().__init__()
        self.t = t

    def forward(self, x):
        t = self.t
        inv = (1.0 / t["input_scale"].float()).to(x.dtype)
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
        w_s = t["weight_scale"].to(x.dtype).float().reshape(-1)
        y = (x_q.long() @ t["weight"].long().T).float() * s_t * w_s
        if "bias" in t:
            y = y + t["bias"].float()
        return y.to(x.dtype)


def reference_model(float_folder, ascend_folder, dtype: torch.dtype) -> nn.Module:
    """transformers' model of float_folder, running the ascend checkpoint's tensors with reference math."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_folder, dtype=dtype)
    tensors, types = SafetensorsFolder(ascend_folder), tensor_types(read_description(ascend_folder))
    floats = {k: tensors.get(k) for k, v in types.items() if v == FLOAT and not k.endswith("norm.bias")}
    model.load_state_dict(floats, strict=False)
    for name, module in list(model.named_modules()):
        kind = types.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and kind in ("W8A8", "W8A8_DYNAMIC"):
            t = {k.rpartition(".")[2]: tensors.get(k) for k in types if k.rpartition(".")[0] == name}
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, (StaticRef if kind == "W8A8" else DynamicRef)(t))
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
