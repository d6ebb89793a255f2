"""slimquant: int8 (W8A8 / W8A8_DYNAMIC, ascend format) quantizer and inference engine for LLMs."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> the module that defines them; imported on first use so `import slimquant` stays light.
_EXPORTS = {
    "quantize": "slimquant.convert",
    "LLM": "slimquant.entrypoints.llm",
    "SamplingParams": "slimquant.sampling_params",
    "StructuredOutputsParams": "slimquant.sampling_params",
    "RequestOutput": "slimquant.outputs",
    "CompletionOutput": "slimquant.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slimquant' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
