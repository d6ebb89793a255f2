"""What each checkpoint tensor must be, checked as it loads: its stored dtype, and values the format's math can take
(finite scales, positive where they are inverted, integer offsets in int8's range). A corrupt tensor is refused
with its name, never run as an answer made of NaNs or nonsense."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimquant.format.primitives import QMAX, QMIN

FINITE_CHECK_MAX = 1 << 22  # float weights above this many values are checked for dtype only (a pass over them)


@dataclass(frozen=True)
class TensorRule:
    """A checkpoint tensor's stored dtypes ("float": any float dtype) and what its values must be (after any load
    transform): None, "finite", "nonneg" (finite, >= 0), "positive" (finite, > 0) or "offset" (an integer in
    [-128, 127])."""

    dtypes: tuple[torch.dtype, ...] | str
    values: str | None = None

    def check(self, name: str, stored: torch.Tensor, value: torch.Tensor | None = None) -> None:
        """ValueError naming the tensor when stored (its dtype) or value (stored after the load transform) break
        the rule."""
        value = stored if value is None else value
        if not _dtype_ok(stored.dtype, self.dtypes):
            want = "a float dtype" if self.dtypes == "float" else " or ".join(str(d) for d in self.dtypes)
            _refuse(name, f"is stored as {stored.dtype}, where the format has {want}")
        if self.values is None or (self.values == "finite" and value.numel() > FINITE_CHECK_MAX):
            return
        v = value.double()
        if not bool(torch.isfinite(v).all()):
            _refuse(name, f"holds {int((~torch.isfinite(v)).sum())} NaN or infinite values")
        if self.values == "nonneg" and bool((v < 0).any()):
            _refuse(name, f"holds negative values (min {v.min().item():g}); scales are >= 0")
        if self.values == "positive" and bool((v <= 0).any()):
            _refuse(name, f"holds values <= 0 (min {v.min().item():g}); this scale is inverted, so it must be > 0")
        if self.values == "offset" and not bool(((v == v.round()) & (v >= QMIN) & (v <= QMAX)).all()):
            _refuse(name, f"must hold integers in [{QMIN}, {QMAX}] (int8 offsets), got e.g. {_odd_offset(v):g}")


def _dtype_ok(dtype: torch.dtype, allowed: tuple[torch.dtype, ...] | str) -> bool:
    return dtype.is_floating_point if allowed == "float" else dtype in allowed


def _odd_offset(v: torch.Tensor) -> float:
    bad = v[(v != v.round()) | (v < QMIN) | (v > QMAX)]
    return bad.flatten()[0].item()


def _refuse(name: str, problem: str) -> None:
    raise ValueError(
        f"{name} {problem}: the checkpoint is corrupt, its description does not match its tensors, or it is not in "
        "the ascend format (docs/FORMAT.md); re-download it, or quantize the float model again"
    )


_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)
FLOAT_TENSOR = TensorRule("float", "finite")  # float weights, biases, norms (values checked while small)
INT8_WEIGHT = TensorRule((torch.int8,))
WEIGHT_SCALE = TensorRule("float", "nonneg")  # a zero row of weights has scale 0
WEIGHT_OFFSET = TensorRule("float", "finite")  # unused (symmetric weights)
INPUT_SCALE = TensorRule("float", "positive")  # 1 / input_scale quantizes
OFFSET = TensorRule((*_INTS, torch.float32, torch.float16, torch.bfloat16), "offset")  # input / KV-cache offsets
QUANT_BIAS = TensorRule((torch.int32, torch.int64))
DEQ_SCALE = TensorRule((torch.float32, torch.int64), "nonneg")  # checked after decode_deq_scale
KV_CACHE_SCALE = TensorRule("float", "positive")

_LEAF_RULES = {
    "weight_scale": WEIGHT_SCALE,
    "weight_offset": WEIGHT_OFFSET,
    "input_scale": INPUT_SCALE,
    "input_offset": OFFSET,
    "quant_bias": QUANT_BIAS,
    "deq_scale": DEQ_SCALE,
    "bias": FLOAT_TENSOR,
    "kv_cache_scale": KV_CACHE_SCALE,
    "kv_cache_offset": OFFSET,
}


def rule_for(leaf: str, scheme: str) -> TensorRule | None:
    """The rule of a linear's (or attention's KV-cache) tensor `<prefix>.<leaf>` of a scheme; None for a leaf the
    format does not define."""
    if leaf == "weight":
        return FLOAT_TENSOR if scheme == "FLOAT" else INT8_WEIGHT
    return _LEAF_RULES.get(leaf)
