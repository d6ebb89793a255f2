"""Calibration text -> token batches: the built-in prompt set or a user .txt / .json / .jsonl file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slimquant.format import tokenizer as format_tokenizer

BUILTIN = Path(__file__).parent / "data" / "calibration.json"


def load_texts(path: str | os.PathLike | None = None) -> list[str]:
    """The calibration texts: built-in prompts when path is None, else a .txt, .json list or .jsonl file."""
    file = Path(path) if path is not None else BUILTIN
    if not file.is_file():
        raise ValueError(f"calibration file {file} does not exist; pass a .txt, .json or .jsonl file")
    raw = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        texts = [_jsonl_text(line, file, n) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    elif file.suffix == ".json":
        texts = _json_list(raw, file)
    else:
        texts = [p for p in raw.split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(
            f"calibration data {file} is empty; give a file with some text (or omit it for the built-in set)"
        )
    return texts


def _json_list(raw: str, file: Path) -> list[str]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {file} is not valid JSON ({e})") from e
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise ValueError(f"calibration file {file} must hold a JSON list of strings")
    return data


def _jsonl_text(line: str, file: Path, n: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} line {n} is not valid JSON ({e})") from e
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise ValueError(f'{file} line {n} must be an object with a "text" string field')
    return row["text"]


def token_batches(tokenizer, texts: list[str], num_samples: int, seq_len: int) -> torch.Tensor:
    """Pack the tokenized texts (eos-separated, cycled if short) into ids [num_samples, seq_len]."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
    if len(stream) <= len(sep) * len(texts):
        raise ValueError("calibration data is empty after tokenization; give text the tokenizer can encode")
    need = num_samples * seq_len
    ids = torch.tensor((stream * (need // len(stream) + 1))[:need], dtype=torch.long)
    return ids.view(num_samples, seq_len)  # [S, T]


def load_tokenizer(model_dir: str | os.PathLike, trust_remote_code: bool = False):
    """The model folder's own tokenizer, with a clear error when it has none."""
    try:
        return format_tokenizer.load_tokenizer(model_dir, trust_remote_code)
    except ValueError as e:
        raise ValueError(f"{e}; calibration needs the model's tokenizer") from e
