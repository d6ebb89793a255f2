"""The quantization schemes a description names, as one enum (docs/FORMAT.md, "Tensors of each scheme")."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum


class Scheme(str, Enum):
    """A description's type of a tensor; equal to its string ("W8A8" == Scheme.W8A8), so JSON reads compare."""

    FLOAT = "FLOAT"
    W8A8 = "W8A8"  # static: per-tensor asymmetric activations, calibrated
    W8A8_DYNAMIC = "W8A8_DYNAMIC"  # per-token symmetric activations
    W8A16 = "W8A16"  # weight-only: int8 weights, float activations

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


FLOAT, W8A8, W8A8_DYNAMIC, W8A16 = Scheme.FLOAT, Scheme.W8A8, Scheme.W8A8_DYNAMIC, Scheme.W8A16
QUANT_SCHEMES = (W8A8, W8A8_DYNAMIC, W8A16)  # the int8-weight ones
INPUT_QUANT_SCHEMES = (W8A8, W8A8_DYNAMIC)  # the ones that quantize their input (smoothing serves them)


def quantizes_input(types: Iterable[str]) -> bool:
    """Whether any of these linear types quantizes its input: then smoothing their shared input serves them (a
    float or W8A16 linear's input stays float, and smoothing would only coarsen its weight)."""
    return any(t in INPUT_QUANT_SCHEMES for t in types)


def parse_scheme(name: str, allow_float: bool = False, allow_weight_only: bool = False) -> Scheme:
    """'w8a8' / 'w8a8_dynamic' (any case; 'float' and 'w8a16' if allowed) -> the Scheme; ValueError naming the
    choices."""
    choices = [s for s in Scheme if (allow_float or s != FLOAT) and (allow_weight_only or s != W8A16)]
    for scheme in choices:
        if str(name).strip().upper() == scheme.value:
            return scheme
    raise ValueError(f"unknown quant type {name!r}; choose one of: {', '.join(s.value.lower() for s in choices)}")


# The tensors each linear of a scheme stores, besides an optional float bias (docs/FORMAT.md): (required, optional).
# weight_scale / weight_offset of a static linear are unused at run time; ModelSlim's V1 saver leaves them out.
SCHEME_TENSORS: dict[Scheme, tuple[tuple[str, ...], tuple[str, ...]]] = {
    FLOAT: (("weight",), ()),
    W8A8: (("weight", "input_scale", "input_offset", "quant_bias", "deq_scale"), ("weight_scale", "weight_offset")),
    W8A8_DYNAMIC: (("weight", "weight_scale", "weight_offset"), ()),
    W8A16: (("weight", "weight_scale", "weight_offset"), ()),
}
