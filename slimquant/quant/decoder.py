"""One decoder layer at a time, with transformers' own layer classes: build, load, run, patch."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from slimquant.format.architectures import ArchSpec
from slimquant.quant.activations import Activations
from slimquant.quant.moe import is_routed_expert, unfuse_experts


class BiasedNorm(nn.Module):
    """A norm followed by a per-channel bias (what iterative smoothing's shift adds)."""

    def __init__(self, norm: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., H]
        return self.norm(x) + self.bias.to(x.dtype)


class LayerRunner:
    """Builds decoder layer i of the source model from a state dict and runs it on calibration hidden states."""

    def __init__(self, src_dir: str | os.PathLike, spec: ArchSpec, dtype: torch.dtype, device: str):
        module = importlib.import_module(spec.module)
        self.config = _load_config(src_dir, getattr(module, spec.config_class) if spec.config_class else None)
        self.config._attn_implementation = "sdpa"  # with no mask, sdpa applies the causal mask itself
        self.layer_cls = getattr(module, spec.decoder_layer)
        self.expert_mlp = getattr(module, spec.expert_mlp) if spec.expert_mlp else None
        self.rotary = getattr(module, spec.rotary)(config=self.config).to(device)
        self.device = torch.device(device)
        # CPUs run bf16/fp16 GEMMs many times slower than fp32: compute there in fp32. SimLinear still rounds
        # every linear's input and output to the model dtype, as the runtime does.
        self.dtype = torch.float32 if self.device.type == "cpu" else dtype
        self._pos: tuple[torch.Tensor, torch.Tensor] | None = None

    def param_names(self, i: int) -> list[str]:
        """Names of layer i's parameters, relative to the layer."""
        return list(self._meta_layer(i).state_dict())

    def _meta_layer(self, i: int) -> nn.Module:
        """Layer i without storage, routed experts one module per expert (the checkpoint's layout)."""
        with torch.device("meta"):
            layer = self.layer_cls(_reaching(self.config, i), layer_idx=i)
            unfuse_experts(layer, self.expert_mlp, self.config)
        return layer

    def build(self, i: int, state: dict[str, torch.Tensor]) -> nn.Module:
        """Layer i with the given weights (assigned), in eval mode, on the device in the compute dtype; routed
        experts, which state leaves out, stay on the meta device (quant/expert_stream.py loads them a group at a
        time)."""
        layer = self._meta_layer(i)
        missing, unexpected = layer.load_state_dict(self.to_compute(state), strict=False, assign=True)
        assert not unexpected and all(is_routed_expert(k) for k in missing), (unexpected, missing)
        return layer.eval()

    def to_compute(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors on the device in the compute dtype."""
        return {k: v.to(self.device, self.dtype) for k, v in state.items()}

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: Activations, cache=None, keep: bool = True) -> Activations | None:
        """The layer over each batch [B, T, H] of hidden -> its outputs, batch by batch (keep=False: none, for a run
        that only observes); cache: what the attention hands its k / v to (transformers' cache interface), e.g. an
        observers.KvRange."""
        out = hidden.like() if keep else None
        cached = {cache_argument(layer.forward): cache} if cache is not None else {}
        for h in hidden:
            y = layer(h, attention_mask=None, position_embeddings=self._position_embeddings(h.shape[1]), **cached)
            if out is not None:
                out.append(y[0] if isinstance(y, tuple) else y)
        return out

    def _position_embeddings(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pos is None or self._pos[0].shape[1] != seq_len:
            ids = torch.arange(seq_len, device=self.device)[None]  # [1, T]
            dummy = torch.empty(0, device=self.device, dtype=self.dtype)
            self._pos = self.rotary(dummy, ids)  # cos, sin: [1, T, D]
        return self._pos


def cache_argument(forward) -> str:
    """The name under which a transformers forward takes its KV cache: `cache` since transformers 5.2x, before it
    `past_key_values` (`past_key_value` in a decoder layer of 4.x); passed under another name, it is dropped
    silently."""
    params = inspect.signature(forward).parameters
    return next((n for n in ("cache", "past_key_values", "past_key_value") if n in params), "cache")


def _load_config(src_dir: str | os.PathLike, config_cls: type | None):
    """AutoConfig of the folder, or config_cls built from its config.json (model types transformers lacks)."""
    from transformers import AutoConfig

    if config_cls is None:
        return AutoConfig.from_pretrained(str(src_dir))
    raw = json.loads((Path(src_dir) / "config.json").read_text())
    return config_cls(**{k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")})


def _reaching(config, i: int):
    """The config, its mlp_layer_types (GLM-4.7-Flash's, one per main layer) grown with "sparse" to reach an MTP
    layer i past them, which is MoE as DeepSeek-V3's (format.architectures.is_moe_layer)."""
    types = getattr(config, "mlp_layer_types", None)
    if types is None or i < len(types):
        return config
    grown = copy.copy(config)
    grown.mlp_layer_types = [*types, *["sparse"] * (i + 1 - len(types))]
    return grown


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted `name` for `new`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
