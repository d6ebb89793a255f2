"""GGUF import: turn a .gguf file into a Hugging Face safetensors folder that the quantizer reads.

transformers de-quantizes the GGUF tensors (Q4/Q8/F16 ...) on load; we save the result in bf16 with
the GGUF's quantization_config removed, plus its tokenizer, chat template and generation config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert gguf_path to a HF folder at out_dir (created); returns out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("reading %s (transformers de-quantizes GGUF tensors; this takes a while)", gguf_path)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, KeyError, RuntimeError) as e:
        raise ValueError(f"cannot read GGUF file {gguf_path}: {e}") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in source.state_dict().items()})
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
