"""slimquant: int8 (W8A8 / W8A8_DYNAMIC, ascend format) quantizer and inference engine for LLMs."""

__version__ = "0.1.0"
