"""Writer and reader of the ascend (ModelSlim) checkpoint layout (docs/FORMAT.md).

A checkpoint folder holds `quant_model_description.json` (version, model_quant_type, then every tensor
name -> type in write order), shards `quant_model_weight_<type>-0000i-of-0000N.safetensors` and their index
`quant_model_weight_<type>.safetensors.index.json`, plus config and tokenizer files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slimquant.format.safetensors_io import StreamingShard
from slimquant.format.schemes import QUANT_SCHEMES

DESCRIPTION_FILE = "quant_model_description.json"
FORMAT_VERSION = "1.0.0"
DEFAULT_SHARD_BYTES = 4 * 1024**3
C8 = "C8"  # an int8 KV cache: the header's kv_cache_type (older: kv_quant_type) and its tensors' type
# the int8 KV-cache tensors of one attention layer, relative to its self_attn prefix: scale and offset per channel
# [kv_heads * head_dim] (or one value), keys taken after RoPE
KV_CACHE_TENSORS = (
    "k_proj.kv_cache_scale",
    "k_proj.kv_cache_offset",
    "v_proj.kv_cache_scale",
    "v_proj.kv_cache_offset",
)


def shard_prefix(model_quant_type: str) -> str:
    """File-name stem of the shards, e.g. 'quant_model_weight_w8a8_dynamic'."""
    return f"quant_model_weight_{model_quant_type.lower()}"


class ModelSlimWriter:
    """Streams tensors into size-capped safetensors shards and records their description types."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        model_quant_type: str,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        kv_cache_type: str | None = None,
    ):
        if model_quant_type not in QUANT_SCHEMES:
            names = [str(s) for s in QUANT_SCHEMES]
            raise ValueError(f"model_quant_type must be one of {names}, got {model_quant_type!r}")
        if shard_bytes <= 0:
            raise ValueError(f"shard size must be positive, got {shard_bytes}")
        self.out_dir = Path(out_dir)
        self.model_quant_type = model_quant_type
        self.shard_bytes = shard_bytes
        self.description: dict[str, str] = {"version": FORMAT_VERSION, "model_quant_type": model_quant_type}
        if kv_cache_type:  # both keys, as ModelSlim's V1 saver writes them (vLLM-Ascend reads kv_cache_type)
            self.description |= {"kv_cache_type": kv_cache_type, "kv_quant_type": kv_cache_type}
        self._pending: StreamingShard | None = None  # the open shard, spilled to disk tensor by tensor
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor, quant_type: str) -> None:
        """Queue one tensor; flushes a shard first if this tensor would push it past the cap."""
        if name in self.description:
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending is not None and self._pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        if self._pending is None:
            self._pending = StreamingShard(self.out_dir / f".shard-{len(self._shards):05d}.safetensors")
        self._pending.add(name, tensor)
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.description[name] = quant_type

    def flush(self) -> None:
        """Write the queued tensors as one shard (no-op when nothing is queued)."""
        if self._pending is None:
            return
        self._pending.finish()  # no metadata, as ModelSlim writes
        self._shards.append((self._pending.path.name, self._pending.names))
        self._pending, self._pending_bytes = None, 0

    def state(self) -> dict:
        """What restore() needs to go on from here after a crash (JSON): the finished shards, the open one."""
        pending = None if self._pending is None else self._pending.state()
        return {
            "description": self.description,
            "shards": self._shards,
            "pending": pending,
            "pending_bytes": self._pending_bytes,
            "total_bytes": self.total_bytes,
        }

    def restore(self, state: dict) -> None:
        """Go on from state(): shards finished after it are removed and close()'s renames undone, so that what is
        written from here on gives the bytes an uninterrupted run gives; ValueError where that cannot be."""
        self._undo_close()
        self.description = dict(state["description"])
        self._shards = [(name, list(tensors)) for name, tensors in state["shards"]]
        self._pending_bytes, self.total_bytes = state["pending_bytes"], state["total_bytes"]
        pending = state["pending"]
        self._pending = None if pending is None else StreamingShard.reopen(self.out_dir, pending)
        keep = {name for name, _ in self._shards} | ({pending["path"]} if pending else set())
        for file in self.out_dir.glob(".shard-*.safetensors*"):
            if file.name.split(".safetensors")[0] + ".safetensors" not in keep:
                file.unlink()

    def _undo_close(self) -> None:
        """Shards an interrupted close() renamed i-of-N get their temporary names back; its index and description
        go."""
        stem = shard_prefix(self.model_quant_type)
        for file in self.out_dir.glob(f"{stem}-*-of-*.safetensors"):
            i = int(file.name[len(stem) + 1 :].split("-", 1)[0])
            os.replace(file, self.out_dir / f".shard-{i - 1:05d}.safetensors")
        for name in (f"{stem}.safetensors.index.json", DESCRIPTION_FILE):
            (self.out_dir / name).unlink(missing_ok=True)

    def close(self) -> list[str]:
        """Flush, name the shards i-of-N, write index and description; returns the shard file names."""
        self.flush()
        n = len(self._shards)
        stem = shard_prefix(self.model_quant_type)
        weight_map, names = {}, []
        for i, (tmp_name, tensors) in enumerate(self._shards, start=1):
            final = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / tmp_name, self.out_dir / final)
            weight_map.update({t: final for t in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        _dump_json(self.out_dir / f"{stem}.safetensors.index.json", index, indent=2)
        _dump_json(self.out_dir / DESCRIPTION_FILE, self.description, indent=2)
        return names


def _dump_json(path: Path, obj: dict, indent: int) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)


def is_modelslim_dir(path: str | os.PathLike) -> bool:
    """True if the folder holds a quant_model_description.json."""
    return (Path(path) / DESCRIPTION_FILE).is_file()


def read_description(path: str | os.PathLike) -> dict[str, str]:
    """The description dict of a checkpoint folder, with a clear error when missing or malformed."""
    file = Path(path) / DESCRIPTION_FILE
    if not file.is_file():
        raise ValueError(f"{path} has no {DESCRIPTION_FILE}: it is not an ascend (ModelSlim) checkpoint")
    try:
        desc = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); re-run the quantizer to write it again") from e
    if not isinstance(desc, dict):
        raise ValueError(f"{file} must hold a JSON object of tensor name -> quant type")
    return desc


def tensor_types(desc: dict) -> dict[str, str]:
    """Only the tensor-name entries of a description (drops version, model_quant_type, metadata, ...)."""
    return {k: v for k, v in desc.items() if isinstance(v, str) and k not in _HEADER_KEYS}


_HEADER_KEYS = {
    "version",
    "model_quant_type",
    "kv_cache_type",
    "kv_quant_type",
    "fa_quant_type",
    "group_size",
    "reduce_quant_type",
}


# Header keys of features slimquant does not run: refused at load with what they are, never run as something else.
UNSUPPORTED_HEADER = {
    "fa_quant_type": "quantized attention (FAQuant / FAKQuant)",
    "reduce_quant_type": "quantized tensor-parallel reductions",
}


def unsupported_features(desc: dict) -> list[str]:
    """What the description's header asks for that slimquant cannot run, one sentence each (empty: nothing)."""
    out = [
        f"quant_model_description.json says {key}={desc[key]!r}: {what}, which slimquant does not run (it runs "
        "W8A8 and W8A8_DYNAMIC linears); quantize the float model again without it"
        for key, what in UNSUPPORTED_HEADER.items()
        if desc.get(key)
    ]
    for key in ("kv_cache_type", "kv_quant_type"):
        if desc.get(key) and desc[key] != C8:
            out.append(
                f"quant_model_description.json says {key}={desc[key]!r}: slimquant runs int8 KV caches of type "
                f"{C8!r} only; quantize the float model again with `--kv-cache int8`, or without it"
            )
    return out


def kv_cache_int8(desc: dict) -> bool:
    """Whether the description asks for an int8 (C8) KV cache: kv_cache_type, or the older saver's kv_quant_type."""
    return C8 in (desc.get("kv_cache_type"), desc.get("kv_quant_type"))
