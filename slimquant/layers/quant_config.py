"""Quant configs: a layer asks for its method by dotted prefix, exactly the keys of quant_model_description.json."""

from __future__ import annotations

import os

import torch

from slimquant.format.checkpoint import kv_cache_int8, read_description, tensor_types, unsupported_features
from slimquant.format.schemes import FLOAT, W8A8_DYNAMIC
from slimquant.layers.quant_methods import METHODS_BY_TYPE, QuantMethod, UnquantizedMethod

MOE_TYPES = (W8A8_DYNAMIC,)


class QuantConfig:
    """No quantization: every linear is float, norms have no bias."""

    norm_has_bias: bool = False
    model_dtype: torch.dtype | None = None  # the format math's dtype (QuantMethod); None: the activations'
    kv_cache_int8: bool = False  # the checkpoint carries int8 (C8) KV-cache scales for every attention layer

    def linear_method(self, prefix: str, shard_prefixes: list[str]) -> QuantMethod:
        """The method for the linear at `prefix`, built from checkpoint linears `shard_prefixes`."""
        return UnquantizedMethod()

    def moe_quant_type(self, prefix: str, expert_prefixes: list[str]) -> str:
        """Quant type of the routed experts at `prefix`, made of the linears `expert_prefixes`."""
        return FLOAT

    def linear_has_bias(self, shard_prefixes: list[str]) -> bool:
        """Whether the checkpoint holds a float bias for any of these linears (the anti-outlier shift adds them)."""
        return False

    def check_float(self, prefixes: list[str]) -> None:
        """ValueError where the checkpoint quantizes any of these layers, which vLLM builds float (quant_config=None:
        a MoE router, Qwen2-MoE's shared_expert_gate)."""


class AscendQuantConfig(QuantConfig):
    """An ascend (ModelSlim) checkpoint's description: per-tensor quant types by name."""

    def __init__(self, description: dict, model_dtype: torch.dtype | None = None):
        if problems := unsupported_features(description):
            raise ValueError(problems[0])
        self.model_dtype = model_dtype  # the format math's dtype (QuantMethod); None: the activations'
        self.types = tensor_types(description)
        self.model_quant_type = description.get("model_quant_type")
        # vLLM-Ascend gives RMSNorm a bias whenever the anti-outlier shift wrote any "*norm.bias"
        self.norm_has_bias = any("norm.bias" in name for name in self.types)
        self.kv_cache_int8 = kv_cache_int8(description)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, model_dtype: torch.dtype | None = None) -> AscendQuantConfig:
        """Read quant_model_description.json of a checkpoint folder."""
        return cls(read_description(path), model_dtype)

    def linear_method(self, prefix: str, shard_prefixes: list[str]) -> QuantMethod:
        types = [self._weight_type(p, prefix) for p in shard_prefixes]
        named = dict(zip(shard_prefixes, types, strict=True))
        if all(t == FLOAT for t in types):
            return UnquantizedMethod()
        if FLOAT in types:
            raise ValueError(
                f"Detected some but not all shards of {prefix} are quantized: "
                f"{named}. All shards of a fused layer must share a scheme; "
                "re-quantize keeping all of them float or all of them int8."
            )
        if len(set(types)) > 1:
            raise ValueError(
                f"Not all shards of {prefix} have the same quant type: {named}. "
                "Re-quantize so the fused shards share one type."
            )
        if types[0] not in METHODS_BY_TYPE:
            raise ValueError(
                f"{prefix}: quant type {types[0]!r} is not supported; supported: {sorted(METHODS_BY_TYPE)}"
            )
        return METHODS_BY_TYPE[types[0]](self.model_dtype)

    def moe_quant_type(self, prefix: str, expert_prefixes: list[str]) -> str:
        types = {self._weight_type(p, prefix) for p in expert_prefixes}
        if len(types) > 1:
            raise ValueError(f"Not all experts of {prefix} have the same quant type: {sorted(types)}")
        if biases := [f"{p}.bias" for p in expert_prefixes if f"{p}.bias" in self.types]:
            raise ValueError(
                f"{prefix}: the routed experts carry float biases ({biases[0]} and {len(biases) - 1} more), the "
                "anti-outlier shift into the experts; no MoE runs them (vLLM-Ascend drops them silently and runs "
                "wrong). Re-quantize with `slimquant quantize` (it refuses this shift) or with --anti-outlier "
                "smoothquant"
            )
        (quant_type,) = types
        if quant_type not in (FLOAT, *MOE_TYPES):
            raise ValueError(f"{prefix}: expert quant type {quant_type!r} is not supported; supported: {MOE_TYPES}")
        return quant_type

    def linear_has_bias(self, shard_prefixes: list[str]) -> bool:
        # the anti-outlier shift adds `<linear>.bias` (FLOAT) to the linears a shifted norm feeds
        return any(f"{p}.bias" in self.types for p in shard_prefixes)

    def check_float(self, prefixes: list[str]) -> None:
        quantized = {f"{p}.weight": t for p in prefixes if (t := self.types.get(f"{p}.weight", FLOAT)) != FLOAT}
        if quantized:
            raise ValueError(
                f"quant_model_description.json quantizes {quantized}, which vLLM and vLLM-Ascend build float "
                "(quant_config=None: a MoE router, Qwen2-MoE's shared_expert_gate), so neither loads it: "
                "re-quantize the model with `slimquant quantize`, which keeps them float"
            )

    def _weight_type(self, shard_prefix: str, prefix: str) -> str:
        key = f"{shard_prefix}.weight"
        if key not in self.types:
            raise ValueError(
                f"quant_model_description.json has no entry {key!r} (needed by layer {prefix!r}). Likely causes: "
                "the checkpoint was not written by a ModelSlim-compatible quantizer; its tensor names carry a "
                "different prefix than this model expects (e.g. 'language_model.'); or entries are missing "
                "(e.g. MTP layers). Re-quantize with `slimquant quantize`, or fix the description."
            )
        return self.types[key]
