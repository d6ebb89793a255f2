"""DeepSeek config variants against transformers: YaRN rope with mscale, rope layouts, V2-Lite, MTP tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimquant.layers.rotary import inverse_frequencies
from slimquant.models.loader import load_model
from slimquant.random_models import make_tiny_model
from tests.models.paged import PROMPT, PagedRunner, assert_close, hf_logits

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.8,
    "mscale_all_dim": 1.0,
}
VARIANTS = {
    "v3_yarn": ("deepseek_v3", {"rope_parameters": YARN}),
    "v3_rotate_half": ("deepseek_v3", {"rope_interleave": False}),
    "v3_no_norm_topk_single_group": ("deepseek_v3", {"norm_topk_prob": False, "n_group": 1, "topk_group": 1}),
    "v2_yarn": ("deepseek_v2", {"rope_parameters": YARN, "norm_topk_prob": False}),
    "v2_lite_greedy": (
        "deepseek_v2",
        {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False},
    ),
}


def chunked_then_decode(folder) -> torch.Tensor:
    runner = PagedRunner.of(load_model(str(folder)), torch.float32)
    return torch.cat([runner.step({0: PROMPT[:5]}), *[runner.step({0: [t]}) for t in PROMPT[5:]]])


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_matches_transformers(tmp_path, variant):
    arch, overrides = VARIANTS[variant]
    folder = make_tiny_model(arch, tmp_path, **overrides)
    config = json.loads((folder / "config.json").read_text())
    for key, value in overrides.items():
        assert config.get(key) == value or config.get("rope_scaling") == value, f"{key} did not reach config.json"
    assert_close(chunked_then_decode(folder), hf_logits(folder, PROMPT))


def test_mtp_layer_tensors_are_ignored(tiny_model, tmp_path):
    """V3 checkpoints carry a multi-token-prediction layer model.layers.{num_hidden_layers}; the engine skips it."""
    src = tiny_model("deepseek_v3")
    dst = tmp_path / "with_mtp"
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    mtp = {k.replace("layers.1.", "layers.2."): v.clone() for k, v in tensors.items() if ".layers.1." in k}
    mtp |= {f"model.layers.2.{n}.weight": torch.ones(64) for n in ("enorm", "hnorm", "shared_head.norm")}
    mtp["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors | mtp, dst / "model.safetensors")
    assert_close(chunked_then_decode(dst), hf_logits(src, PROMPT))


def test_yarn_settings_missing_are_a_clear_error():
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        inverse_frequencies(8, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
