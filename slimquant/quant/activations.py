"""Calibration activations held in bounded memory: the hidden states each decoder layer calibrates on, and the MoE
inputs a layer records for its routed experts, as lists of batches that live in memory up to a byte budget shared by
the whole run (`--activation-memory`) and in files of the run's staging folder beyond it.

At the default calibration (16 x 256 tokens) everything stays in memory; at 512 x 2048 tokens on Kimi-K2's hidden
size (7168) one copy of the hidden states is 30 GB in fp32, and a MoE layer holds five. Spilled batches are read
back one at a time, so memory holds the budget plus one batch; the batches and their order are the same either
way, and so are the output's bytes.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ACTIVATION_BYTES = 4 * 2**30  # activations held in memory by default
Batch = torch.Tensor | tuple[torch.Tensor, ...]


class Spill:
    """The in-memory byte budget that all the activation stores of one run share (None: unbounded), and the folder
    their other batches are written to."""

    def __init__(self, folder: Path | None = None, budget: int | None = None):
        assert budget is None or folder is not None, "a bounded budget needs a folder to spill to"
        self.folder, self.budget, self.held = folder, budget, 0
        self._names = itertools.count()

    def admit(self, nbytes: int) -> bool:
        """Whether nbytes more fit in memory (and if so, count them)."""
        if self.budget is not None and self.held + nbytes > self.budget:
            return False
        self.held += nbytes
        return True

    def free(self, nbytes: int) -> None:
        """nbytes held in memory no longer."""
        self.held -= nbytes
        assert self.held >= 0, self.held

    def new_file(self) -> Path:
        """A fresh file name in the spill folder."""
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"{next(self._names)}.safetensors"


@dataclass
class _OnDisk:
    """A batch in a file; owned: the store made it (and deletes it), else it is a checkpoint's."""

    path: Path
    owned: bool


class Activations:
    """A list of batches (a tensor or a tuple of tensors each), each held in memory or in a file."""

    def __init__(self, spill: Spill, device: torch.device | str = "cpu"):
        self.spill, self.device = spill, torch.device(device)
        self._items: list[Batch | _OnDisk] = []

    @classmethod
    def of(cls, batches: Iterable[Batch], spill: Spill | None = None, device: torch.device | str = "cpu"):
        """A store of these batches (spill None: all in memory)."""
        store = cls(spill or Spill(), device)
        for b in batches:
            store.append(b)
        return store

    def like(self) -> Activations:
        """An empty store with the same budget and device."""
        return Activations(self.spill, self.device)

    def map(self, fn: Callable[[int, Batch], Batch]) -> Activations:
        """A new store of fn(index, batch) for each batch."""
        return Activations.of((fn(b, x) for b, x in enumerate(self)), self.spill, self.device)

    def append(self, batch: Batch) -> None:
        """Add a batch at the end: in memory if the budget allows, else to a new file."""
        self._items.append(self._place(batch))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, b: int) -> Batch:
        item = self._items[b]
        return self._read(item.path) if isinstance(item, _OnDisk) else item

    def __setitem__(self, b: int, batch: Batch) -> None:
        """Replace batch b (a batch of the same shapes; in memory, the same tensors is a no-op)."""
        item = self._items[b]
        if isinstance(item, _OnDisk) and item.owned:
            self._write(batch, item.path)  # its own file, rewritten
        elif item is not batch:  # a new batch in memory or a file of its own (a checkpoint's file stays as it is)
            if not isinstance(item, _OnDisk):
                self.spill.free(_nbytes(item))
            self._items[b] = self._place(batch)

    def __iter__(self) -> Iterator[Batch]:
        for b in range(len(self)):
            yield self[b]

    def tensor(self) -> torch.Tensor:
        """All the batches of a tensor store concatenated (for tests and small runs)."""
        return torch.cat(list(self))

    @property
    def spilled(self) -> int:
        """How many batches are in files."""
        return sum(isinstance(item, _OnDisk) for item in self._items)

    def release(self) -> None:
        """Empty the store: its memory back to the budget, its own files deleted."""
        for item in self._items:
            if isinstance(item, _OnDisk):
                if item.owned:
                    item.path.unlink(missing_ok=True)
            else:
                self.spill.free(_nbytes(item))
        self._items = []

    def save(self, folder: Path) -> None:
        """Write every batch into folder (a checkpoint): spilled ones hard-linked where the file system allows."""
        folder.mkdir(parents=True)
        for b, item in enumerate(self._items):
            dest = folder / f"{b}.safetensors"
            if isinstance(item, _OnDisk):
                _link_or_copy(item.path, dest)
            else:
                self._write(item, dest)

    @classmethod
    def load(cls, folder: Path, spill: Spill, device: torch.device | str = "cpu") -> Activations:
        """The store save() wrote into folder, its batches read from there when used (the files stay)."""
        store = cls(spill, device)
        count = len(list(folder.glob("*.safetensors")))
        store._items = [_OnDisk(folder / f"{b}.safetensors", owned=False) for b in range(count)]
        return store

    def _place(self, batch: Batch) -> Batch | _OnDisk:
        if self.spill.admit(_nbytes(batch)):
            return batch
        path = self.spill.new_file()
        self._write(batch, path)
        return _OnDisk(path, owned=True)

    @staticmethod
    def _write(batch: Batch, path: Path) -> None:
        """The batch into path (atomically): a tensor under the key "tensor", a tuple's under "0", "1", ..."""
        parts = {"tensor": batch} if isinstance(batch, torch.Tensor) else {str(i): t for i, t in enumerate(batch)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: t.detach().cpu().contiguous() for k, t in parts.items()}, str(tmp))
        os.replace(tmp, path)

    def _read(self, path: Path) -> Batch:
        parts = load_file(str(path), device=str(self.device))
        return parts["tensor"] if "tensor" in parts else tuple(parts[str(i)] for i in range(len(parts)))


def _nbytes(batch: Batch) -> int:
    parts = (batch,) if isinstance(batch, torch.Tensor) else batch
    return sum(t.numel() * t.element_size() for t in parts)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(src, dest)
