"""safetensors files, tensor by tensor: StreamingShard writes one, SafetensorsFolder reads a folder of them.

Writing: tensors go to one spill file per element size; at finish the header and the spill files (8-, 4-, 2-,
then 1-byte elements, so every tensor stays aligned) are concatenated into the final file, with no metadata.
Reading: one tensor at a time with plain file reads (no mmap: mapped pages would count towards the process's
memory for as long as the file stays open), so memory never holds more than the tensor asked for.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
SAFETENSORS_DTYPES = {code: dtype for dtype, code in _CODES.items()}  # "BF16" -> torch.bfloat16, ...


class StreamingShard:
    """Append tensors one at a time; finish() writes the safetensors file at `path`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, bucket, nbytes)
        self._spill = {size: open(self._spill_path(size), "wb") for size in (8, 4, 2, 1)}  # noqa: SIM115 (closed in finish/discard)

    def _spill_path(self, size: int) -> Path:
        return self.path.with_name(f"{self.path.name}.spill{size}")

    @property
    def names(self) -> list[str]:
        """Tensor names, in the order added."""
        return list(self._entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes to its spill file."""
        if tensor.dtype not in _CODES:
            raise ValueError(f"cannot store {name!r}: dtype {tensor.dtype} has no safetensors code")
        t = tensor.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        self._spill[t.element_size()].write(memoryview(raw))
        self._entries[name] = (_CODES[t.dtype], list(t.shape), t.element_size(), raw.nbytes)

    def finish(self) -> None:
        """Write header + data to `path` and remove the spill files."""
        for f in self._spill.values():
            f.close()
        header, offset = {}, 0
        for size in (8, 4, 2, 1):
            for name, (dtype, shape, bucket, nbytes) in self._entries.items():
                if bucket == size:
                    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                    offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for size in (8, 4, 2, 1):
                with open(self._spill_path(size), "rb") as src:
                    shutil.copyfileobj(src, out, 16 * 2**20)
        self.discard()

    def discard(self) -> None:
        """Remove the spill files (after finish, or on abort)."""
        for size, f in self._spill.items():
            f.close()
            self._spill_path(size).unlink(missing_ok=True)

    def state(self) -> dict:
        """What reopen() needs to go on with this shard from now, whatever happens to it later: its tensors and
        the length of each spill file (written through to disk)."""
        lengths = {}
        for size, f in self._spill.items():
            f.flush()
            os.fsync(f.fileno())
            lengths[str(size)] = f.tell()
        return {"path": self.path.name, "entries": self._entries, "lengths": lengths}

    @classmethod
    def reopen(cls, folder: Path, state: dict) -> StreamingShard:
        """The shard as state() saw it: its spill files cut back to their lengths then, or rebuilt from the shard
        file where a later finish() wrote it and removed them; ValueError where neither is there."""
        shard = cls.__new__(cls)
        shard.path = Path(folder) / state["path"]
        shard._entries = {name: tuple(entry) for name, entry in state["entries"].items()}
        lengths = {int(size): n for size, n in state["lengths"].items()}
        spilled = all(
            shard._spill_path(s).exists() and shard._spill_path(s).stat().st_size >= n for s, n in lengths.items()
        )
        if not spilled:
            shard._spill_from_file()
        shard.path.unlink(missing_ok=True)
        shard._spill = {}
        for size, n in lengths.items():
            f = open(shard._spill_path(size), "r+b")  # noqa: SIM115 (closed in finish/discard)
            f.truncate(n)
            f.seek(n)
            shard._spill[size] = f
        return shard

    def _spill_from_file(self) -> None:
        """Write the spill files of this shard's tensors from the finished shard file (which may hold more)."""
        if not self.path.is_file():
            raise ValueError(f"{self.path.name} and its spill files are gone: the partial run cannot go on")
        start, header = read_header(self.path)
        with open(self.path, "rb") as src:
            for size in (8, 4, 2, 1):
                with open(self._spill_path(size), "wb") as out:
                    for name, (_, _, bucket, nbytes) in self._entries.items():
                        if bucket == size:
                            src.seek(start + header[name]["data_offsets"][0])
                            _copy_bytes(src, out, nbytes)


def _copy_bytes(src, out, n: int, chunk: int = 16 * 2**20) -> None:
    """n bytes from src's position to out, a chunk at a time."""
    while n > 0:
        data = src.read(min(chunk, n))
        if not data:
            raise ValueError(f"{src.name} ends early: it is truncated")
        out.write(data)
        n -= len(data)


class SafetensorsFolder:
    """Lazy, name-addressed access to every tensor in a folder of safetensors files (read one at a time)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where = _locate_tensors(self.path)  # name -> (file name, data start, header entry)
        self.bytes_read = 0  # tensor bytes read so far

    def keys(self) -> list[str]:
        """Every tensor name: file by file, sorted within each (as safetensors lists them)."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, part: Part | None = None) -> torch.Tensor:
        """Load one tensor (a fresh copy read from its file), or only part = (dim, start, length) of it: the bytes
        of that slice are all that is copied (a tensor-parallel rank's rows or columns)."""
        if name not in self._where:
            raise KeyError(name)
        file, data_start, entry = self._where[name]
        if part is None:
            tensor = _read_tensor(self.path / file, name, data_start, entry)
        else:
            tensor = _read_part(self.path / file, name, data_start, entry, part)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def info(self, name: str) -> TensorInfo:
        """A tensor's file, dtype code ("BF16", "I8", ...), shape and size, from the header (no data read)."""
        file, _, entry = self._where[name]
        start, end = entry["data_offsets"]
        return TensorInfo(file, entry["dtype"], tuple(entry["shape"]), end - start)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time."""
        for name in self._where:
            yield name, self.get(name)


Part = tuple[int, int, int]  # (dim, start, length): a slice of a tensor to read


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    file: str
    dtype: str  # safetensors code: "BF16", "F32", "I8", ...
    shape: tuple[int, ...]
    nbytes: int


def read_header(file: Path) -> tuple[int, dict[str, dict]]:
    """(data start, name -> {dtype, shape, data_offsets}) of one safetensors file; ValueError if it is not one."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
    except (struct.error, ValueError, AttributeError) as e:
        raise ValueError(f"cannot read {file}: {e}; the file is corrupt or truncated") from e
    for name, entry in header.items():
        problem = _entry_problem(entry, size - 8 - n)
        if problem:
            raise ValueError(f"cannot read {file}: tensor {name!r} {problem}; the file is corrupt or truncated")
    return 8 + n, header


def _entry_problem(entry, data_size: int) -> str | None:
    """What is wrong with one header entry (as the safetensors spec has it), or None."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return "has no dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"has an unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return f"has a bad shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return f"has bad data_offsets {offsets!r}"
    start, end = offsets
    if not 0 <= start <= end <= data_size:
        return "ends past the file" if end > data_size else f"has bad data_offsets {offsets!r}"
    if (end - start) != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
        return f"has {end - start} bytes for shape {shape} of {dtype}"
    return None


def _read_tensor(file: Path, name: str, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor of a safetensors file via its header entry: [8-byte length][JSON header][data]."""
    start, end = entry["data_offsets"]
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
    if end == start:
        return torch.empty(shape, dtype=dtype)
    with open(file, "rb") as f:
        f.seek(data_start + start)
        buf = bytearray(end - start)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"cannot read {name!r} from {file}: the file is truncated")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _read_part(file: Path, name: str, data_start: int, entry: dict, part: Part) -> torch.Tensor:
    """Slice `start:start + length` along `dim` of one tensor, copied out of a memory map of its file."""
    dim, start, length = part
    shape = entry["shape"]
    if not (0 <= dim < len(shape) and start >= 0 and start + length <= shape[dim]):
        raise ValueError(
            f"{name}: stored shape {shape} has no slice {start}:{start + length} along dim {dim}; the checkpoint does "
            "not match config.json"
        )
    begin, end = entry["data_offsets"]
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        view = memoryview(mapped)[data_start + begin : data_start + end]
        whole = torch.frombuffer(view, dtype=SAFETENSORS_DTYPES[entry["dtype"]]).reshape(shape)
        out = whole.narrow(dim, start, length).clone()
        del whole
        view.release()
    return out


def _locate_tensors(path: Path) -> dict[str, tuple[str, int, dict]]:
    """Map tensor name -> (file name, data start, header entry) over every *.safetensors file; checks the index."""
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    where: dict[str, tuple[str, int, dict]] = {}
    for file in files:
        data_start, header = read_header(path / file)
        where.update({k: (file, data_start, header[k]) for k in sorted(header)})
    _check_index(path, where)
    return where


def _weight_map(index_file: Path) -> dict[str, str]:
    """The index's tensor -> shard file map; ValueError when the file is not such a map."""
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
    except (ValueError, AttributeError) as e:  # not JSON, or not an object
        raise ValueError(f"{index_file} is not a safetensors index (JSON with a weight_map): {e}") from e
    bad = [k for k, f in weight_map.items() if not isinstance(f, str)] if isinstance(weight_map, dict) else ["*"]
    if bad:
        raise ValueError(f"{index_file}: the weight_map must map tensor names to shard file names; bad: {bad[:5]}")
    return weight_map


def _check_index(path: Path, where: dict) -> None:
    """If an index names files or tensors that are not on disk, say which ones are missing."""
    for index_file in path.glob("*.safetensors.index.json"):
        weight_map = _weight_map(index_file)
        missing_files = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing_files:
            raise ValueError(f"{index_file.name} lists shards that are missing from {path}: {missing_files}")
        missing = [k for k in weight_map if k not in where]
        if missing:
            raise ValueError(f"{index_file.name} lists tensors that no shard holds: {missing[:5]}")
