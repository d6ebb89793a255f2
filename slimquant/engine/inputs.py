"""Prompt parsing and what the engine reads from the model folder: tokenizer, context length, EOS, defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from slimquant.config import EngineConfig
from slimquant.errors import ParamError
from slimquant.format import tokenizer as format_tokenizer

# A prompt: text, token ids, or a vLLM TextPrompt / TokensPrompt dict.
PromptType = Union[str, list[int], dict[str, Any]]  # noqa: UP007 (a runtime alias)
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def parse_prompt(prompt: PromptType, tokenizer) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of a prompt; ValueError for a malformed one."""
    if isinstance(prompt, dict):
        text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if ids is None and text is None:
            raise ParamError("prompt", f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    elif isinstance(prompt, str):
        text, ids = prompt, None
    elif isinstance(prompt, (list, tuple)):
        text, ids = None, prompt
    else:
        raise ParamError(
            "prompt", f"a prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}"
        )
    if ids is None:
        if not isinstance(text, str):
            raise ParamError("prompt", f"'prompt' must be a str, got {type(text).__name__}")
        ids = tokenizer.encode(text)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ParamError("prompt", "prompt token ids must be ints")
    return text, list(ids)


def truncated(ids: list[int], keep: int | None, context: int) -> list[int]:
    """ids cut to their last keep tokens (vLLM's truncate_prompt_tokens; -1: the context's length; None: all)."""
    return ids if keep is None else ids[-(context if keep == -1 else keep) :]


def load_tokenizer(config: EngineConfig):
    """The tokenizer of config.tokenizer (or the model folder)."""
    path = config.tokenizer or config.model
    try:
        return format_tokenizer.load_tokenizer(path, config.trust_remote_code, "trust_remote_code=True")
    except ValueError as e:
        raise ValueError(f"{e}; pass tokenizer= a folder that has one") from e


def model_max_len(hf_config) -> int | None:
    """The longest context the model config allows, if it says."""
    lengths = [getattr(hf_config, k) for k in _LENGTH_KEYS if isinstance(getattr(hf_config, k, None), int)]
    return min(lengths) if lengths else None


def stop_token_ids(config: EngineConfig, hf_config, tokenizer) -> tuple[frozenset[int], dict[str, Any]]:
    """EOS token ids (generation_config.json, config.json, tokenizer) and the sampling defaults it sets."""
    generation = _generation_config(Path(config.model))
    eos: set[int] = set()
    for value in (generation.get("eos_token_id"), getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id):
        eos.update(value if isinstance(value, list) else [] if value is None else [value])
    defaults = {k: generation[k] for k in _SAMPLING_DEFAULTS if generation.get(k) is not None}
    if generation.get("max_new_tokens") is not None:
        defaults["max_tokens"] = generation["max_new_tokens"]
    return frozenset(int(t) for t in eos), defaults


def _generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def bad_word_ids(words: list[str] | None, tokenizer: Any) -> list[list[int]]:
    """The token ids of each bad word as it starts a text and, where that tokenizes differently into as many tokens,
    after a space (in the middle of a text), as vLLM bans them."""
    out = []
    for word in words or []:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        out.append(alone)
        if len(spaced) == len(alone) and spaced[0] != alone[0]:
            out.append(spaced)
    return out
