"""Helpers shared by the quantizer tests: settings, checkpoint readers and FORMAT's runtime math written out."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from slimquant.quant.calibration import load_texts, load_tokenizer, token_batches
from slimquant.quant.decoder import BiasedNorm, replace_module

FAST = dict(num_samples=2, seq_len=16, progress=False)


def read_output(folder: Path) -> tuple[dict, dict]:
    """(description, {name: tensor}) of a written checkpoint, via its index."""
    desc = json.loads((folder / "quant_model_description.json").read_text())
    (index_file,) = folder.glob("*.safetensors.index.json")
    weight_map = json.loads(index_file.read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return desc, tensors


def read_source(folder: Path) -> dict:
    """{name: tensor} of a source HF folder."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def calibration_ids(src, n=2, t=24) -> torch.Tensor:
    return token_batches(load_tokenizer(src), load_texts(), n, t)  # [S, T]


def load_float(src) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


class RuntimeLinear(nn.Module):
    """docs/FORMAT.md runtime math, written out independently of slimquant.format.primitives."""

    def __init__(self, t: dict, name: str, qtype: str):
        super().__init__()
        self.t = {k[len(name) + 1 :]: v for k, v in t.items() if k.startswith(name + ".")}
        self.qtype = qtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, K] fp32
        t, w = self.t, self.t["weight"].double()
        if self.qtype == "W8A8":
            x_q = torch.clamp(torch.round(x.double() / t["input_scale"].double() + t["input_offset"]), -128, 127)
            deq = (
                t["deq_scale"].to(torch.int32).view(torch.float32)
                if t["deq_scale"].dtype == torch.int64
                else t["deq_scale"]
            )
            return ((x_q @ w.T + t["quant_bias"]) * deq.double()).float()
        s = x.double().abs().amax(-1, keepdim=True) / 127  # [B, T, 1]
        y = torch.round(x.double() / s) @ w.T * t["weight_scale"].double().T * s
        return (y + t.get("bias", torch.zeros(1)).double()).float()


def load_quantized(src, dst) -> nn.Module:
    """The float transformers model with every quantized linear replaced by RuntimeLinear, and the checkpoint's float
    tensors loaded: norms (+bias), embeddings, float linears and the LM head (a rotated checkpoint changes them all;
    a tied head gets the checkpoint's own)."""
    desc, t = read_output(dst)
    model = load_float(src)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and desc.get(name + ".weight") not in (None, "FLOAT"):
            replace_module(model, name, RuntimeLinear(t, name, desc[name + ".weight"]))
        elif isinstance(mod, (nn.Linear, nn.Embedding)) and name + ".weight" in t:
            mod.weight = nn.Parameter(t[name + ".weight"].float().clone(), requires_grad=False)
            if getattr(mod, "bias", None) is not None and name + ".bias" in t:
                mod.bias = nn.Parameter(t[name + ".bias"].float().clone(), requires_grad=False)
        elif name.endswith("norm"):
            mod.weight.data.copy_(t[name + ".weight"])
            if name + ".bias" in t:
                replace_module(model, name, BiasedNorm(mod, t[name + ".bias"]))
    return model
