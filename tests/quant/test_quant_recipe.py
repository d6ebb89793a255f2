"""The default --type w8a8 recipe: Llama/Qwen mlp.down_proj W8A8_DYNAMIC, the rest static; static_all: all static."""

from __future__ import annotations

import pytest
import torch

from slimquant.entrypoints.cli import main
from slimquant.format.architectures import ARCHS
from slimquant.quant.plan import plan_types
from tests.quant.common import calibration_ids, load_float, load_quantized, read_output

STATIC_SUFFIXES = ("input_scale", "input_offset", "quant_bias", "deq_scale")


def expected_plan(num_layers: int, static_all: bool) -> dict[str, str]:
    """Written out by hand: every decoder linear static, except down_proj dynamic unless static_all."""
    rels = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    return {
        f"model.layers.{i}.{rel}": "W8A8_DYNAMIC" if rel == "mlp.down_proj" and not static_all else "W8A8"
        for i in range(num_layers)
        for rel in rels
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("static_all", [False, True])
def test_plan_of_the_default_recipe(arch, static_all):
    assert plan_types(ARCHS[arch], 3, "W8A8", [], [], static_all=static_all) == expected_plan(3, static_all)


def test_recipe_leaves_dynamic_and_user_choices_alone():
    spec = ARCHS["llama"]
    assert set(plan_types(spec, 2, "W8A8_DYNAMIC", [], []).values()) == {"W8A8_DYNAMIC"}
    plan = plan_types(spec, 2, "W8A8", [("*.1.mlp.down_proj", "W8A8")], ["*.0.mlp.down_proj"])  # the user's win
    assert plan["model.layers.0.mlp.down_proj"] == "FLOAT" and plan["model.layers.1.mlp.down_proj"] == "W8A8"
    assert plan["model.layers.1.mlp.up_proj"] == "W8A8"


def test_deepseek_recipe_is_unchanged_by_static_all():
    spec, config = ARCHS["deepseek_v3"], {"q_lora_rank": 8, "kv_lora_rank": 4}
    assert plan_types(spec, 2, "W8A8", [], [], config) == plan_types(spec, 2, "W8A8", [], [], config, static_all=True)


@pytest.mark.parametrize("static_all", [False, True])
def test_checkpoint_follows_the_recipe_and_stays_close_to_float(quantized, static_all):
    src, dst, summary = quantized("llama", "w8a8", static_all=static_all)
    desc, tensors = read_output(dst)
    types = {k[: -len(".weight")]: v for k, v in desc.items() if k.endswith("_proj.weight")}
    assert types == expected_plan(2, static_all)
    for prefix, t in types.items():
        has_static = [f"{prefix}.{s}" in tensors for s in STATIC_SUFFIXES]
        assert has_static == [t == "W8A8"] * len(STATIC_SUFFIXES), prefix
    assert desc["model_quant_type"] == "W8A8"
    assert summary.linears == ({"W8A8": 14, "FLOAT": 1} if static_all else {"W8A8": 12, "W8A8_DYNAMIC": 2, "FLOAT": 1})
    assert ("default mix" in str(summary)) is (not static_all)
    assert summary.default_mix == ("" if static_all else "*.mlp.down_proj=W8A8_DYNAMIC (2 linears)")
    ids = calibration_ids(src, 2, 16)
    with torch.no_grad():
        want, got = load_float(src)(ids).logits, load_quantized(src, dst)(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 0.05


def test_cli_prints_the_mix_and_static_all_turns_it_off(tiny_model, tmp_path, capsys):
    src = tiny_model("llama")
    args = ["quantize", str(src), "--num-samples", "2", "--seq-len", "16", "--no-progress"]
    assert main(args[:2] + [str(tmp_path / "a")] + args[2:]) == 0
    out = capsys.readouterr().out
    assert (
        "default mix" in out and "*.mlp.down_proj=W8A8_DYNAMIC (2 linears)" in out and "12 W8A8, 2 W8A8_DYNAMIC" in out
    )
    assert main(args[:2] + [str(tmp_path / "b"), "--static-all"] + args[2:]) == 0
    out = capsys.readouterr().out
    assert "default mix" not in out and "14 W8A8" in out and "W8A8_DYNAMIC" not in out
    desc, _ = read_output(tmp_path / "b")
    assert {v for k, v in desc.items() if k.endswith("_proj.weight")} == {"W8A8"}


def test_no_default_mix_is_reported_where_the_users_mix_took_every_linear(quantized):
    _, _, summary = quantized("llama", "w8a8", mix=["*.mlp.down_proj=w8a16"])
    assert summary.default_mix == "" and "default mix" not in str(summary)
    assert summary.linears == {"W8A8": 12, "W8A16": 2, "FLOAT": 1}
