"""The output folder: its name checks, the files copied beside the weights, and its move into place when complete
(staged by quant/resume.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

# Files copied from the source folder besides the weights (config.json is rewritten, not copied).
COPY_GLOBS = ("*.json", "*.py", "*.model", "*.jinja", "*.tiktoken", "merges.txt", "vocab.txt")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_size(size: int | str, what: str = "shard size") -> int:
    """Bytes from an int or a string like '500MB', '4GiB', '1.5G'; ValueError naming what for a bad one."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"cannot read size {size!r}; write e.g. 500MB, 2GB or 4GiB")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return value


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse an existing DST unless overwrite."""
    if dst.exists() and not overwrite:
        raise ValueError(f"{dst} already exists; pass --overwrite (overwrite=True) to replace it")


def replace_folder(tmp: Path, dst: Path) -> None:
    """Put the finished folder tmp in dst's place (an old dst, with overwrite, goes afterwards)."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def write_model_files(src: Path, out: Path, config: dict, indent: int = 2) -> None:
    """config.json without quantization_config, plus tokenizer / generation / chat-template / *.py files."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(config, indent=indent) + "\n")
    for pattern in COPY_GLOBS:
        for f in src.glob(pattern):
            if f.is_file() and f.name != "config.json" and not f.name.endswith("index.json"):
                shutil.copy2(f, out / f.name)


def folder_bytes(path: Path, pattern: str = "*") -> int:
    """Total size of the files matching pattern directly in path (a file: its size)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())
