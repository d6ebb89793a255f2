"""Quantization steps as plug-ins, one object of each kind per run, built by name from QuantizeOptions: a smoother
(anti-outlier), an alpha chooser and a rounder. A new algorithm is a class in one of these modules (or a new file)
and one line in its registry below. The registries name classes as "module:Class", imported when first used, so
that listing the choices (the CLI's --help) imports nothing heavy."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimquant.quant.steps.alpha import FixedAlpha
    from slimquant.quant.steps.rounding import NearestRounding
    from slimquant.quant.steps.smoothing import Smoother

_HERE = "slimquant.quant.steps"
SMOOTHERS = {
    "none": f"{_HERE}.smoothing:Smoother",
    "smoothquant": f"{_HERE}.smoothing:SmoothQuant",
    "iterative": f"{_HERE}.smoothing:IterativeSmooth",
}
ALPHA_SEARCHES = {"auto": f"{_HERE}.alpha:SearchedAlpha"}  # a number instead: alpha:FixedAlpha(number)
ROUNDERS = {"nearest": f"{_HERE}.rounding:NearestRounding", "gptq": f"{_HERE}.rounding:GPTQRounding"}


def smoother(name: str) -> Smoother:
    """The smoother registered as name; ValueError naming the choices."""
    return _build(SMOOTHERS, name, "anti-outlier method")


def alpha_chooser(alpha: float | str) -> FixedAlpha:
    """A number in [0, 1] or a registered search ('auto'); ValueError otherwise."""
    if isinstance(alpha, str) and alpha.strip().lower() in ALPHA_SEARCHES:
        return _build(ALPHA_SEARCHES, alpha.strip().lower(), "alpha")
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        choices = "a number in [0, 1] or " + " or ".join(repr(name) for name in ALPHA_SEARCHES)
        raise ValueError(f"--alpha must be {choices}, got {alpha!r}") from None
    return _load(f"{_HERE}.alpha:FixedAlpha")(value)


def rounder(name: str) -> NearestRounding:
    """The rounder registered as name; ValueError naming the choices."""
    return _build(ROUNDERS, name, "rounding")


def _build(registry: dict[str, str], name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(registry)}")
    return _load(registry[name])()


def _load(path: str) -> type:
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)
