"""Hypothesis mutates tiny ascend checkpoints (values, dtypes, shapes and presence of tensors; truncated shards;
flipped header bytes; broken description and config files) and loads them: every load either refuses with a
ValueError that names what is wrong, or, where the mutation leaves a valid checkpoint, loads. Nothing else escapes.

The expectations are this file's own reading of the format (docs/FORMAT.md), not the loader's rule table."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.test_model_deepseek_errors import deepseek_mix

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))  # counts: the Hypothesis profile

# (arch, layout, quant type of every linear, KV cache): ModelSlim's current and older savers and ours; MLA + MoE.
CHECKPOINTS = [
    ("llama", "v1", "W8A8", None),
    ("llama", "slimquant", "W8A8_DYNAMIC", "asym"),
    ("deepseek_v3", "v0", "mix", None),
]
VALUE_KINDS = {"nan": float("nan"), "inf": float("inf"), "neg": -1.0, "zero": 0.0, "half": 0.5}
SCALES = ("weight_scale", "input_scale", "deq_scale", "kv_cache_scale")  # multiply, so never negative
INVERTED = ("input_scale", "kv_cache_scale")  # divided by, so never zero
OFFSETS = ("input_offset", "kv_cache_offset")  # int8 zero points: whole numbers, any integer or float dtype


@dataclass
class Checkpoint:
    folder: Path
    tensors: dict[str, torch.Tensor] = field(repr=False)


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory) -> list[Checkpoint]:
    """The CHECKPOINTS, written once."""
    out = []
    for arch, layout, qtype, kv in CHECKPOINTS:
        kind = deepseek_mix if qtype == "mix" else (lambda _, q=qtype: q)
        folder = write_ascend(tiny_model(arch), tmp_path_factory.mktemp(arch), kind, layout=layout, kv_cache=kv)
        out.append(Checkpoint(folder, load_file(_shard(folder))))
    return out


def _shard(folder: Path) -> Path:
    (shard,) = folder.glob("*.safetensors")
    return shard


def _copy(folder: Path, into: str) -> Path:
    return Path(shutil.copytree(folder, Path(into) / "ckpt"))


def _load(folder: Path) -> str | None:
    """None when it loads, else the ValueError's message; any other exception fails the test."""
    try:
        load_model(str(folder))
    except ValueError as e:
        assert str(e), "a ValueError without a message"
        return str(e)
    return None


def _mutated(tensor: torch.Tensor, kind: str) -> torch.Tensor | None:
    """tensor with one mutation; None where it cannot apply (a NaN in an int8 tensor)."""
    if kind == "shape":  # one value short, or one more
        flat = tensor.flatten()
        return flat[:-1].clone() if flat.numel() > 1 else torch.cat([flat, flat])
    if kind == "dtype":
        return tensor.to(torch.int8 if tensor.is_floating_point() else torch.float32)
    if not tensor.is_floating_point():
        return None
    out = tensor.clone()
    out.view(-1)[0] = VALUE_KINDS[kind]
    return out


def _must_refuse(name: str, kind: str) -> bool:
    """Whether the format forbids this mutation of this tensor (else the checkpoint stays valid)."""
    leaf = name.rsplit(".", 1)[-1]
    if kind in ("drop", "shape", "nan", "inf"):
        return True
    if kind == "dtype":  # int8 <-> float; offsets take any, deq_scale is fp32 or int64 (fp32 bits)
        return leaf not in (*OFFSETS, "deq_scale")
    return {
        "neg": leaf in SCALES,
        "zero": leaf in INVERTED,
        "half": leaf in OFFSETS,
    }[kind]


@FUZZ
@given(data=st.data(), which=st.integers(0, len(CHECKPOINTS) - 1))
def test_a_mutated_tensor_is_refused_by_name_or_is_harmless(checkpoints, data, which):
    folder, tensors = checkpoints[which].folder, checkpoints[which].tensors
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    kind = data.draw(st.sampled_from(["drop", "shape", "dtype", *VALUE_KINDS]), label="mutation")
    new = None if kind == "drop" else _mutated(tensors[name], kind)
    if new is None and kind != "drop":
        return
    with tempfile.TemporaryDirectory() as tmp:
        mutant = _copy(folder, tmp)
        changed = {k: v for k, v in tensors.items() if k != name} | ({} if new is None else {name: new})
        save_file(changed, _shard(mutant), metadata={"format": "pt"})
        message = _load(mutant)
    if _must_refuse(name, kind):
        assert message is not None, f"{kind} of {name} loaded"
        assert name in message, message
    else:
        assert message is None, message


@FUZZ
@given(which=st.integers(0, len(CHECKPOINTS) - 1), data=st.data())
def test_a_damaged_file_is_refused_or_harmless(checkpoints, which, data):
    """Truncated shards, flipped bytes in a shard's header, cut or edited JSON files."""
    folder = checkpoints[which].folder
    with tempfile.TemporaryDirectory() as tmp:
        mutant = _copy(folder, tmp)
        target = data.draw(st.sampled_from(["shard-cut", "shard-header", "description", "config", "index"]))
        must_refuse = _damage(mutant, target, data)
        message = _load(mutant)
    if must_refuse:
        assert message is not None, f"{target} damage loaded"


def _damage(folder: Path, target: str, data: st.DataObject) -> bool:
    """Damage one file of folder; whether the result is certainly invalid."""
    if target.startswith("shard"):
        path = _shard(folder)
        raw = bytearray(path.read_bytes())
        header_end = 8 + int.from_bytes(raw[:8], "little")
        if target == "shard-cut":
            path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="cut at")])
            return True
        at = data.draw(st.integers(0, header_end - 1), label="byte")
        raw[at] ^= data.draw(st.integers(1, 255), label="xor")
        path.write_bytes(raw)
        return at < 8  # a changed header length; elsewhere a flip may leave valid JSON (a padding space)
    path = {"description": "quant_model_description.json", "config": "config.json"}.get(target)
    path = folder / path if path else next(folder.glob("*.index.json"))
    text = path.read_text().rstrip()
    if data.draw(st.booleans(), label="cut"):
        path.write_text(text[: data.draw(st.integers(0, len(text) - 1), label="cut at")])
        return True
    content = json.loads(text)
    table = content.get("weight_map", content)
    key = data.draw(st.sampled_from(sorted(table)), label="key")
    table[key] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=8), st.just([1])), label="value")
    path.write_text(json.dumps(content))
    return False
