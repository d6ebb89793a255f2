"""quantize --resume: a run interrupted anywhere (an error at each tensor the writer takes, inside a shard's finish,
inside close, or SIGKILL of the CLI) goes on from its last finished layer, and the folder it gives is byte for byte
the uninterrupted run's. The partial output is never taken for a finished one, and a resumption with other
options or another source is refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimquant import quantize
from slimquant.format import checkpoint
from slimquant.format.safetensors_io import StreamingShard
from slimquant.quant import pipeline

KW = dict(num_samples=8, seq_len=32, shard_size="150KB", progress=False)  # small shards: several per layer


@pytest.fixture(scope="module")
def src(tiny_model):
    """A 3-layer DeepSeek-V3 (MLA + MoE layers)."""
    return tiny_model("deepseek_v3", num_hidden_layers=3)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """The uninterrupted run's folder."""
    dst = tmp_path_factory.mktemp("resume") / "whole"
    quantize(src, dst, "w8a8_dynamic", **KW)
    return dst


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_same_folder(got: Path, want: Path) -> None:
    a, b = files(got), files(want)
    assert sorted(a) == sorted(b)
    assert [n for n in a if a[n] != b[n]] == []


class Crash(Exception):
    pass


def crash_at(monkeypatch, target, name: str, n: int) -> None:
    """target.name raises Crash on its n-th call (counting from 1)."""
    real, calls = getattr(target, name), [0]

    def counted(*args, **kw):
        calls[0] += 1
        if calls[0] == n:
            raise Crash(f"{name} call {n}")
        return real(*args, **kw)

    monkeypatch.setattr(target, name, counted)


def count_adds(src, tmp_path) -> int:
    n = [0]
    real = checkpoint.ModelSlimWriter.add

    def add(self, *a, **kw):
        n[0] += 1
        return real(self, *a, **kw)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(checkpoint.ModelSlimWriter, "add", add)
        quantize(src, tmp_path / "count", "w8a8_dynamic", **KW)
    return n[0]


def interrupted_then_resumed(src, dst: Path, monkeypatch, target, name: str, n: int) -> None:
    with monkeypatch.context() as m:
        crash_at(m, target, name, n)
        with pytest.raises(Crash):
            quantize(src, dst, "w8a8_dynamic", **KW)
    state = dst.parent / f".{dst.name}.partial" / "resume-state.json"
    done = json.loads(state.read_text())["layers_done"] if state.exists() else 0
    assert not dst.exists()  # the partial output is never the finished one
    summary = quantize(src, dst, "w8a8_dynamic", resume=True, **KW)
    assert summary.resumed_layers == min(done, summary.num_layers)  # from the checkpoint, not from the start


def test_an_error_at_any_tensor_resumes_to_the_same_bytes(src, reference, tmp_path, monkeypatch):
    total = count_adds(src, tmp_path)
    for n in range(1, total + 1, 5):  # every fifth tensor: in the embeddings, mid-layer (experts), at a layer's end
        dst = tmp_path / f"at-{n}"
        interrupted_then_resumed(src, dst, monkeypatch, checkpoint.ModelSlimWriter, "add", n)
        assert_same_folder(dst, reference)


@pytest.mark.parametrize(
    "target,name,n",
    [
        (StreamingShard, "discard", 2),  # a shard's file written, its spill files not yet all removed
        (StreamingShard, "finish", 3),
        (checkpoint, "_dump_json", 2),  # in close(): shards renamed, the index written, not the description
        (pipeline, "write_model_files", 1),  # after close()
    ],
)
def test_an_error_inside_the_writer_resumes_to_the_same_bytes(src, reference, tmp_path, monkeypatch, target, name, n):
    dst = tmp_path / "out"
    interrupted_then_resumed(src, dst, monkeypatch, target, name, n)
    assert_same_folder(dst, reference)


def test_sigkill_of_the_cli_resumes_to_the_same_bytes(tiny_model, tmp_path):
    """Killed while layers run (right after the first checkpoint, or within the next layer: six layers of about
    50 ms each leave the kill time to land before the end)."""
    src = tiny_model("deepseek_v3", num_hidden_layers=6)
    quantize(src, tmp_path / "whole", "w8a8_dynamic", **(KW | {"num_samples": 32}))
    cmd = [sys.executable, "-m", "slimquant.entrypoints.cli", "quantize", str(src), "DST", "--type", "w8a8_dynamic"]
    cmd += ["--num-samples", "32", "--seq-len", "32", "--shard-size", "150KB", "--no-progress"]
    for delay in (0.0, 0.02):
        dst = tmp_path / f"killed-{delay}"
        run = [a if a != "DST" else str(dst) for a in cmd]
        proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state = dst.parent / f".{dst.name}.partial" / "resume-state.json"
        deadline = time.time() + 120
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and not dst.exists()
        done = subprocess.run([*run, "--resume"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert re.search(r"resumed +after layer [0-5] ", done.stdout), done.stdout  # not a run from the start
        assert_same_folder(dst, tmp_path / "whole")


def test_resume_refuses_other_options_and_starts_over_without_a_partial_run(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    with monkeypatch.context() as m:
        crash_at(m, checkpoint.ModelSlimWriter, "add", 40)
        with pytest.raises(Crash):
            quantize(src, dst, "w8a8_dynamic", **KW)
    with pytest.raises(ValueError, match="different option num_samples"):
        quantize(src, dst, "w8a8_dynamic", resume=True, **(KW | {"num_samples": 4}))
    with pytest.raises(ValueError, match="--max-loss runs several"):
        quantize(src, dst, "w8a8_dynamic", resume=True, max_loss=1.0, **KW)
    quantize(src, tmp_path / "fresh", "w8a8_dynamic", resume=True, **KW)  # nothing to resume: a whole run
    assert (tmp_path / "fresh" / "quant_model_description.json").is_file()


def test_a_second_run_into_the_same_folder_is_refused(src, tmp_path):
    dst = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    import fcntl

    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another slimquant quantize is writing"):
            quantize(src, dst, "w8a8_dynamic", **KW)
