"""quantize(rotate=True) (quant/rotation.py): the Hadamard matrices are Hadamard, the rotated float model computes
what the source computes (checked through a written all-FLOAT checkpoint run by the engine, against transformers on
the unrotated source), and an outlier channel of the residual stream costs int8 much less once rotated."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimquant import quantize
from slimquant.evaluation import score_window
from slimquant.models.loader import load_model
from slimquant.quant.rotation import hadamard, rotation_matrix
from tests.quant.common import FAST, read_output, read_source


@pytest.mark.parametrize("n", [1, 12, 64, 576, 896, 1536, 7168])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 36])  # 36: no Sylvester x Paley factor here, a random orthogonal matrix
def test_rotations_are_orthogonal_and_fixed_by_the_seed(n):
    r = rotation_matrix(n, seed=3)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(r, rotation_matrix(n, seed=3)) and not torch.equal(r, rotation_matrix(n, seed=4))
    assert (hadamard(n) is None) == (n == 36)


def nll(model_dir, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [T-1] of the engine's fp32 forward."""
    return score_window(load_model(str(model_dir), dtype="float32"), ids)[0]


def reference_nll(src, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0, :-1].float(), -1)
    return -logp.gather(1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False), ("qwen3", True)])
def test_the_rotated_model_computes_the_sources_function(tiny_model, tmp_path, arch, tied):
    src = tiny_model(arch, tie_word_embeddings=tied)
    quantize(src, tmp_path / "out", "w8a8_dynamic", rotate=True, keep_float=["*"], anti_outlier="none", **FAST)
    desc, out = read_output(tmp_path / "out")
    source = read_source(src)
    assert (
        "lm_head.weight" in out
        and json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    )
    assert torch.equal(out["model.layers.0.input_layernorm.weight"], torch.ones(64))  # folded into q/k/v
    assert not torch.allclose(out["model.embed_tokens.weight"], source["model.embed_tokens.weight"])  # rotated
    ids = torch.randint(0, 400, (40,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nll(tmp_path / "out", ids), reference_nll(src, ids), rtol=1e-4, atol=1e-4)


def test_rotation_spreads_an_outlier_channel(tiny_model, tmp_path):
    """Channel 5 of every norm's output made 40x the others, the linears reading it scaled back (the same float
    model): one static scale per tensor then crushes every other channel; rotated (the norms folded first), the
    int8 model follows the float one far closer."""
    from tests.quant.test_quant_deepseek import copy_with

    src = tiny_model("llama")
    tensors = read_source(src)
    for name, t in tensors.items():
        if name.endswith("layernorm.weight"):
            t[5] *= 40.0
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            t[:, 5] /= 40.0
    copy_with(src, tmp_path / "src", tensors)
    ids = torch.randint(0, 400, (64,), generator=torch.Generator().manual_seed(1))
    ref = reference_nll(tmp_path / "src", ids)
    torch.testing.assert_close(ref, reference_nll(src, ids), rtol=1e-4, atol=1e-4)  # the same float model
    err = {}
    for rotate in (False, True):
        dst = tmp_path / f"rotate-{rotate}"
        quantize(tmp_path / "src", dst, "w8a8", static_all=True, anti_outlier="none", rotate=rotate, **FAST)
        err[rotate] = (nll(dst, ids) - ref).abs().mean().item()
    assert err[True] < err[False] / 3, err


def test_rotate_refuses_architectures_it_does_not_fold(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="--rotate supports LlamaForCausalLM"):
        quantize(tiny_model("deepseek_v3"), tmp_path / "out", rotate=True, **FAST)


def test_w8a8_rotates_by_default_where_it_folds(tiny_model, tmp_path):
    """--type w8a8 on Llama / Qwen rotates unless told not to; w8a8_dynamic and DeepSeek do not; the rotated default
    checkpoint breaks no loader rule (the tiny model's float32 dtype aside)."""
    from slimquant.models.compat import inspect_checkpoint

    src = tiny_model("llama", tie_word_embeddings=True)
    runs = {
        "w8a8": quantize(src, tmp_path / "w8a8", "w8a8", **FAST),
        "no-rotate": quantize(src, tmp_path / "no-rotate", "w8a8", rotate=False, **FAST),
        "dyn": quantize(src, tmp_path / "dyn", "w8a8_dynamic", **FAST),
        "dyn-rotate": quantize(src, tmp_path / "dyn-rotate", "w8a8_dynamic", rotate=True, **FAST),
        "deepseek": quantize(tiny_model("deepseek_v3"), tmp_path / "deepseek", "w8a8", **FAST),
    }
    assert {k: s.rotated for k, s in runs.items()} == {
        "w8a8": True, "no-rotate": False, "dyn": False, "dyn-rotate": True, "deepseek": False
    }  # fmt: skip
    assert re.search(r"\nrotation +Hadamard", str(runs["w8a8"])) and re.search(r"\nrotation +none", str(runs["dyn"]))
    for name in ("w8a8", "no-rotate"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["tie_word_embeddings"] is (name == "no-rotate")
    assert {f.rule for f in inspect_checkpoint(tmp_path / "w8a8").findings} == {"float32-model"}
