"""A model folder's tokenizer, for both halves: the quantizer's calibration and the engine.

Some models ship their tokenizer as code (Kimi-K2: `tokenization_kimi.py`, a tiktoken BPE in `tiktoken.model`),
loaded only with trust_remote_code. Such files were written against transformers 4 and import
`bytes_to_unicode` from the GPT-2 tokenizer module, where transformers 5 no longer has it: it is put back
there (the same function, from transformers' own converter) before loading, so that they load unedited.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, flag: str = "--trust-remote-code"):
    """The folder's tokenizer; ValueError saying what is wrong (flag: how the caller's user allows remote code)."""
    from transformers import AutoTokenizer

    if _has_own_code(Path(path)) and not trust_remote_code:
        raise ValueError(
            f"the tokenizer in {path} is the model's own code (its tokenizer_config.json maps AutoTokenizer to a "
            f".py file there); allow it with {flag} if you trust that folder"
        )
    _restore_transformers4_names()
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise ValueError(f"cannot load a tokenizer from {path} ({e})") from e


def _has_own_code(path: Path) -> bool:
    """Whether tokenizer_config.json's auto_map names a tokenizer class in the folder's own code."""
    file = path / "tokenizer_config.json"
    try:
        auto_map = json.loads(file.read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(auto_map, dict) and "AutoTokenizer" in auto_map


def _restore_transformers4_names() -> None:
    """transformers 5 moved gpt2's bytes_to_unicode; remote tokenizer code still imports it from there."""
    from transformers.models.gpt2 import tokenization_gpt2

    if not hasattr(tokenization_gpt2, "bytes_to_unicode"):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        tokenization_gpt2.bytes_to_unicode = bytes_to_unicode
