"""Checkpoints in the layouts ModelSlim's two savers write (V0, V1) and slimquant's own load, and compute the
same: the same model written in each layout gives identical logits, equal to docs/FORMAT.md's reference math."""

from __future__ import annotations

import json

import pytest
import torch

from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import LAYOUTS, write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close
from tests.models.reference import reference_logits, reference_model


def mixed(prefix: str) -> str:
    """Static attention, dynamic MLP, one float linear."""
    if prefix.endswith("layers.1.mlp.down_proj"):
        return "FLOAT"
    return "W8A8_DYNAMIC" if ".mlp." in prefix else "W8A8"


def _logits(folder, dtype: str) -> torch.Tensor:
    loaded = load_model(str(folder), dtype=dtype)
    runner = PagedRunner.of(loaded)
    return torch.cat([runner.step({0: PROMPT[:7]}), *[runner.step({0: [t]}) for t in PROMPT[7:]]])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases (fp32 in V1)
@pytest.mark.parametrize("dtype", ["bfloat16", "auto"])  # auto on the CPU: fp32 activations, bf16 scales
def test_every_layout_loads_and_computes_alike(tiny_model, tmp_path, arch, dtype):
    src = tiny_model(arch, dtype=torch.bfloat16, tie_word_embeddings=True)
    folders = {layout: write_ascend(src, tmp_path / layout, mixed, torch.bfloat16, layout=layout) for layout in LAYOUTS}
    v1 = json.loads((folders["v1"] / "quant_model_description.json").read_text())
    assert list(v1)[-5:] == ["version", "model_quant_type", "metadata", "group_size", "optional"]
    assert "model.layers.0.self_attn.q_proj.weight_scale" not in v1  # V1 writes static linears without it
    logits = {layout: _logits(folder, dtype) for layout, folder in folders.items()}
    assert torch.equal(logits["v1"], logits["slimquant"]) and torch.equal(logits["v0"], logits["slimquant"])
    if dtype == "auto":
        ref = reference_logits(reference_model(src, folders["v1"], torch.float32, torch.bfloat16), PROMPT)
        assert_close(logits["v1"], ref, rel=1e-3)
