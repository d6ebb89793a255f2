"""A quantize run's staging folder, kept so that an interrupted run can go on (`--resume`) where it stopped.

The output is staged in `.DST.partial` beside DST and renamed into place only when complete, so a partial output
is never taken for a finished one. After each decoder layer the run saves a checkpoint there: the hidden states
the next layer calibrates on, the writer's shards (the open one's spill-file lengths) and what the run has
counted. A resumed run starts after the last checkpoint and writes exactly the bytes an uninterrupted run writes.
The checkpoint file is replaced atomically and names its own hidden-state folder, so a kill at any moment leaves the
previous checkpoint whole. A lock keeps two runs out of one folder. Activations that do not fit their memory budget
are spilled into its `activations` folder (quant/activations.py), which no checkpoint needs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from slimquant.quant.activations import Activations
from slimquant.quant.options import QuantizeOptions
from slimquant.quant.output import check_destination, replace_folder

log = logging.getLogger(__name__)
STATE_FILE = "resume-state.json"
_HIDDEN = "resume-hidden-{}"  # the hidden states after that many layers: a folder of batches
SPILL_FOLDER = "activations"
_MEMORY_OPTIONS = ("expert_memory", "activation_memory")


@dataclass
class Checkpoint:
    """Where a run stood after its last finished layer."""

    layers_done: int
    hidden: Path  # the next layer's input: the folder Activations.save wrote
    writer: dict  # ModelSlimWriter.state()
    job: dict  # what LayerJob has counted (idle_experts, alphas)


class PartialRun:
    """The staging folder of one run into dst, and its checkpoints."""

    def __init__(self, dst: Path, fingerprint: dict):
        self.dst, self.fingerprint = dst, fingerprint
        self.path = dst.parent / f".{dst.name}.partial"
        self.spill_folder = self.path / SPILL_FOLDER

    @contextmanager
    def staged(self, resume: bool, overwrite: bool) -> Iterator[Checkpoint | None]:
        """The staging folder, locked, with the checkpoint to go on from (resume) or emptied; on success it
        replaces dst, on failure it stays where it holds a checkpoint (to resume) and goes otherwise."""
        check_destination(self.dst, overwrite)
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            checkpoint = self._load() if resume else None
            if checkpoint is None:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path.mkdir()
            shutil.rmtree(self.spill_folder, ignore_errors=True)
            try:
                yield checkpoint
            except BaseException:
                shutil.rmtree(self.spill_folder, ignore_errors=True)
                self._keep_or_remove()
                raise
            shutil.rmtree(self.spill_folder, ignore_errors=True)
            for entry in self.path.glob("resume-*"):
                _remove(entry)
            replace_folder(self.path, self.dst)

    def save(self, layers_done: int, hidden: Activations, writer: dict, job: dict) -> None:
        """Checkpoint after layers_done layers (the hidden states first, then the state that names them)."""
        hidden_dir = _HIDDEN.format(layers_done)
        _remove(self.path / hidden_dir)  # a kill's leftover: no checkpoint names it
        hidden.save(self.path / hidden_dir)
        state = {"fingerprint": self.fingerprint, "layers_done": layers_done, "hidden": hidden_dir}
        _write_atomic(self.path / STATE_FILE, json.dumps(state | {"writer": writer, "job": job}))
        for entry in self.path.glob(_HIDDEN.format("*")):
            if entry.name != hidden_dir:
                _remove(entry)

    def _load(self) -> Checkpoint | None:
        """The folder's checkpoint, or None (nothing to resume: the run starts over); ValueError for one made from
        another source or with other options."""
        file = self.path / STATE_FILE
        if not file.is_file():
            if self.path.exists():
                log.warning("%s has no checkpoint (no layer finished): starting over", self.path)
            return None
        state = json.loads(file.read_text())
        if state["fingerprint"] != self.fingerprint:
            differs = _differences(state["fingerprint"], self.fingerprint)
            raise ValueError(
                f"the partial run in {self.path} was made with a different {', '.join(differs)}; run again with the "
                "same source and options, or without --resume to start over"
            )
        log.info("resuming %s after layer %d", self.dst, state["layers_done"] - 1)
        return Checkpoint(state["layers_done"], self.path / state["hidden"], state["writer"], state["job"])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.dst.parent / f".{self.dst.name}.lock"
        with open(lock, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another slimquant quantize is writing {self.dst} (it holds {lock})") from None
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)

    def _keep_or_remove(self) -> None:
        if (self.path / STATE_FILE).is_file():
            log.warning("the partial run stays in %s: the same command with --resume goes on from it", self.path)
        else:
            shutil.rmtree(self.path, ignore_errors=True)


def fingerprint(src: Path, opts: QuantizeOptions) -> dict:
    """What must not change between a run and its resumption: slimquant's version, the options (but the memory
    budgets, which change no byte of the output: a run that ran out of memory resumes with smaller ones), and each
    source file's name, size and modification time."""
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in _MEMORY_OPTIONS}
    return {
        "slimquant": importlib.metadata.version("slimquant"),
        "options": json.loads(json.dumps(options, default=str)),
        "source": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files},
    }


def _differences(old: dict, new: dict) -> list[str]:
    """Names of what differs: option names, 'source files', 'slimquant version'."""
    out = [f"option {k}" for k in sorted(new["options"]) if old.get("options", {}).get(k) != new["options"][k]]
    if old.get("source") != new["source"]:
        out.append("source (files changed)")
    if old.get("slimquant") != new["slimquant"]:
        out.append(f"slimquant version ({old.get('slimquant')} then)")
    return out or ["run"]


def _remove(path: Path) -> None:
    """A file or folder, if there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
