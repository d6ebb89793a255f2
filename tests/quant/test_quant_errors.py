"""Bad input gets a clear ValueError (one line from the CLI), and nothing half-written is left behind."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

import slimquant.quant.pipeline as pipeline
from slimquant.entrypoints.cli import main
from slimquant.quant.pipeline import quantize
from tests.quant.common import FAST, read_source


@pytest.fixture
def src(tiny_model, tmp_path):
    """A private copy of the tiny llama, free to damage."""
    return shutil.copytree(tiny_model("llama"), tmp_path / "src")


def split_in_two(folder) -> list[str]:
    """Rewrite model.safetensors as two shards plus an index; returns the shard names."""
    tensors = read_source(folder)
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    for file, half in zip(files, halves, strict=True):
        save_file({k: tensors[k] for k in half}, str(folder / file))
    (folder / "model.safetensors").unlink()
    weight_map = {k: f for f, half in zip(files, halves, strict=True) for k in half}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def expect_error(src, dst, match: str, **kw) -> None:
    with pytest.raises(ValueError, match=match):
        quantize(src, dst, **{**FAST, **kw})
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")], "temporary folder left"


def test_unknown_type(src, tmp_path):
    expect_error(src, tmp_path / "out", "unknown quant type 'w4a4'.*w8a8, w8a8_dynamic", quant_type="w4a4")


def test_unsupported_architecture(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    expect_error(src, tmp_path / "out", "unsupported architecture 'gpt2'.*llama, qwen2, qwen2_moe, qwen3")


def test_missing_shard(src, tmp_path):
    (src / split_in_two(src)[1]).unlink()
    expect_error(src, tmp_path / "out", "missing")


def test_corrupt_shard(src, tmp_path):
    file = src / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    expect_error(src, tmp_path / "out", "corrupt or truncated")


def test_incomplete_checkpoint(src, tmp_path):
    tensors = read_source(src)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    expect_error(src, tmp_path / "out", "lacks 1 tensor.*model.layers.1.mlp.up_proj.weight")


@pytest.mark.parametrize("content", ["[]", '["", "  "]'])
def test_empty_calibration(src, tmp_path, content):
    (tmp_path / "calib.json").write_text(content)
    expect_error(src, tmp_path / "out", "calibration data .* is empty", calib_data=tmp_path / "calib.json")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"keep_float": ["*.mlp.nope"]}, "--keep-float '\\*.mlp.nope' matches no linear"),
        ({"mix": ["*.attn.*=w8a8_dynamic"]}, "--mix '\\*.attn.\\*' matches no linear"),
        ({"mix": ["*.mlp.*"]}, "--mix expects GLOB=TYPE"),
        ({"mix": ["lm_head=w8a8"]}, "--mix 'lm_head' matches only lm_head, which always stays float"),
        ({"mix": ["*.mlp.*=int4"]}, "unknown quant type 'int4'"),
        ({"keep_float": ["*.q_proj"]}, "fused linears must share one quant type.*q_proj=FLOAT, k_proj=W8A8"),
        ({"shard_size": "lots"}, "cannot read size 'lots'"),
        ({"anti_outlier": "awq"}, "unknown anti-outlier method 'awq'"),
        ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ({"alpha": 1.5}, "--alpha must be in \\[0, 1\\]"),
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"num_samples": 0}, "need num_samples >= 1"),
    ],
)
def test_bad_options(src, tmp_path, kw, match):
    expect_error(src, tmp_path / "out", match, **kw)


def test_missing_source(tmp_path):
    expect_error(tmp_path / "nowhere", tmp_path / "out", "does not exist")


def test_destination_inside_source(src):
    with pytest.raises(ValueError, match="must be outside SRC"):
        quantize(src, src / "out", **FAST)
    with pytest.raises(ValueError, match="must be outside SRC"):
        quantize(src, src, overwrite=True, **FAST)
    assert not (src / "out").exists() and (src / "model.safetensors").is_file()


def test_already_quantized_source(quantized, tmp_path):
    _, dst, _ = quantized("llama", "w8a8_dynamic")
    expect_error(dst, tmp_path / "out", "already an ascend \\(ModelSlim\\) checkpoint")


def test_existing_destination_refused_then_overwritten(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        quantize(src, dst, **FAST)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    quantize(src, dst, overwrite=True, **FAST)
    assert not (dst / "keep.txt").exists() and (dst / "quant_model_description.json").is_file()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("layer", [0, 1])
def test_interrupt_leaves_no_output(src, tmp_path, monkeypatch, exc, layer):
    """No DST; the hidden partial run stays only where a layer finished (to --resume: test_quant_resume.py)."""
    real = pipeline.quantize_layer

    def fail_on_layer(i, *args):
        if i == layer:
            raise exc("stop")
        return real(i, *args)

    monkeypatch.setattr(pipeline, "quantize_layer", fail_on_layer)
    dst = tmp_path / "out"
    with pytest.raises(exc):
        quantize(src, dst, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ([".out.partial"] if layer else []) + ["src"]


def test_existing_destination_kept_after_failure(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    quantize(src, dst, **FAST)
    before = sorted(p.name for p in dst.iterdir())
    monkeypatch.setattr(pipeline, "quantize_layer", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        quantize(src, dst, overwrite=True, **FAST)
    assert sorted(p.name for p in dst.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no layer finished: no partial run kept


def test_cli_prints_one_line(src, tmp_path, capsys):
    assert main(["quantize", str(src), str(tmp_path / "out"), "--type", "int3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown quant type 'int3'") and "\n" not in err


def test_cli_success_prints_summary(src, tmp_path, capsys):
    args = ["quantize", str(src), str(tmp_path / "out"), "--num-samples", "2", "--seq-len", "16", "--no-progress"]
    assert (
        main(args + ["--mix", "*.mlp.*=w8a8_dynamic", "--keep-float", "*.0.mlp.down_proj", "--shard-size", "100KB"])
        == 0
    )
    out = capsys.readouterr().out
    assert "8 W8A8, 5 W8A8_DYNAMIC" in out and "linears kept float  2" in out and "smoothquant" in out
    peak = next(line for line in out.splitlines() if line.startswith("peak memory"))
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB: the run was in this process
    value, unit = peak.split()[2:4]
    mib = 1024 if unit == "GiB" else 1
    # printed with 2 decimals: up to half of the last digit above the peak (5 MiB in GiB)
    assert unit in ("MiB", "GiB") and 0 < float(value) * mib <= mine + 0.005 * mib + 1


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="Linux's /proc (elsewhere: ru_maxrss)")
def test_peak_memory_is_the_process_own():
    """The peak memory printed (and bench/parallel.py's per rank) counts from the process's start: a process
    started by one holding 512 MiB reports its own few MiB, where ru_maxrss would report the parent's."""
    child = "from slimquant.quant.memory import peak_rss_bytes; print(peak_rss_bytes())"
    parent = (
        "import subprocess, sys\n"
        "held = b'x' * (512 << 20)  # written: resident\n"
        f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, check=True).stdout)"
    )
    run = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, timeout=60)
    assert 0 < int(run.stdout) < 256 << 20, run.stdout


def test_keep_float_lm_head_is_accepted():
    from slimquant.format.architectures import ARCHS
    from slimquant.quant.plan import plan_types

    plan = plan_types(ARCHS["llama"], 2, "W8A8", [("*.down_proj", "FLOAT")], ["lm_head"])
    assert len(plan) == 14 and sum(t == "FLOAT" for t in plan.values()) == 2


def test_shard_size_units():
    from slimquant.quant.output import parse_size

    assert parse_size("500MB") == 500 * 10**6 and parse_size("4GiB") == 4 * 2**30 and parse_size(1024) == 1024
    assert parse_size(" 1.5 GB ") == 1_500_000_000
    with pytest.raises(ValueError, match="must be positive"):
        parse_size("0MB")
