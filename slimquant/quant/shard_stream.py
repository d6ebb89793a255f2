"""A safetensors file written tensor by tensor through temporary files, so memory never holds a whole shard.

Tensors go to one spill file per element size; at finish the header and the spill files (8-, 4-, 2-, then
1-byte elements, so every tensor stays aligned) are concatenated into the final file, with no metadata.
"""

from __future__ import annotations

import json
import shutil
import struct
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
