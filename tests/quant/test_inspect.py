"""`slimquant inspect` on our own checkpoints, on both ModelSlim layouts, and on purposely broken ones: each
broken checkpoint is reported under the vLLM-Ascend rule it breaks, and the slimquant verdict is what loading it
actually does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from slimquant.entrypoints.cli import main
from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.format.schemes import SCHEME_TENSORS
from slimquant.format.validation import rule_for
from slimquant.layers.quant_methods import METHODS_BY_TYPE, UnquantizedMethod
from slimquant.models.compat import SLIMQUANT, VLLM_ASCEND, inspect_checkpoint
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend

DESC = "quant_model_description.json"


def rules(report, loader: str) -> set[str]:
    return {f.rule for f in report.findings if f.loader == loader}


def slimquant_loads(folder: Path) -> bool:
    """The independent reference for the slimquant verdict: load it."""
    try:
        load_model(str(folder))
    except ValueError:
        return False
    return True


def static_qkv(prefix: str) -> str:
    return "W8A8_DYNAMIC" if ".mlp." in prefix else "W8A8"


def rewrite(src: Path, dst: Path, drop=(), change=None, describe=None) -> Path:
    """A copy of checkpoint src with tensors dropped or changed ({name: tensor}) and the description edited
    (describe(desc) -> desc), written as one shard with its index."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            dst.joinpath(f.name).write_bytes(f.read_bytes())
    tensors = {n: t for n, t in SafetensorsFolder(src).items() if n not in drop} | (change or {})
    save_file(
        {n: t.contiguous() for n, t in tensors.items()}, str(dst / "quant_model_weight_w8a8-00001-of-00001.safetensors")
    )
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "quant_model_weight_w8a8-00001-of-00001.safetensors")}
    (dst / "quant_model_weight_w8a8.safetensors.index.json").write_text(json.dumps(index))
    desc = json.loads((src / DESC).read_text())
    (dst / DESC).write_text(json.dumps(describe(desc) if describe else desc))
    return dst


@pytest.mark.parametrize(
    "arch,quant_type,options",
    [
        ("llama", "w8a8", {"config": {"tie_word_embeddings": True}}),
        ("qwen2", "w8a8", {}),
        ("llama", "w8a8_dynamic", {}),
        ("deepseek_v3", "w8a8", {}),
        ("glm4_moe_lite", "w8a8_dynamic", {}),  # GLM-4.7-Flash: DeepSeek-V3's layout, MoE layers by mlp_layer_types
        ("qwen3", "w8a8", {"kv_cache": "int8"}),
        ("qwen3_moe", "w8a8", {"kv_cache": "int8"}),  # C8 with routed experts
        ("glm4_moe", "w8a8", {"kv_cache": "int8"}),  # shared experts, q/k/v biases, C8 over partial rope
        ("qwen2_moe", "w8a8", {}),  # the gated shared expert, its gate float
    ],
)
def test_our_checkpoints_break_no_rule(tiny_model, tmp_path, arch, quant_type, options):
    from slimquant.quant.pipeline import quantize
    from tests.quant.common import FAST

    config, options = options.get("config", {}), {k: v for k, v in options.items() if k != "config"}
    src, dst = tiny_model(arch, torch.bfloat16, **config), tmp_path / "q"
    summary = quantize(src, dst, quant_type, **FAST, **options)
    report = inspect_checkpoint(dst)
    assert report.kv_cache == ("int8 (C8)" if options.get("kv_cache") == "int8" else "float")
    assert report.findings == [] and report.layout == "ModelSlim V0"
    assert report.loads(SLIMQUANT) and report.loads(VLLM_ASCEND)
    assert report.linears_by_scheme == {k: v for k, v in summary.linears.items() if v}
    assert report.layers[0].first == 0 and report.layers[-1].last == report.num_layers - 1


def test_layouts_are_told_apart(tiny_model, tmp_path):
    """A tied model written by the older saver has no lm_head entry (vLLM-Ascend's KeyError); V1 writes one."""
    src = tiny_model("llama", torch.bfloat16, tie_word_embeddings=True)
    reports = {
        layout: inspect_checkpoint(write_ascend(src, tmp_path / layout, static_qkv, torch.bfloat16, layout=layout))
        for layout in ("slimquant", "v0", "v1")
    }
    assert {k: r.layout for k, r in reports.items()} == {
        "slimquant": "ModelSlim V0",
        "v0": "ModelSlim V0",
        "v1": "ModelSlim V1",
    }
    assert [f.rule for f in reports["v0"].findings] == ["missing-entry"]
    assert reports["v0"].findings[0].names == ["lm_head.weight"] and reports["v0"].loads(SLIMQUANT)
    assert reports["v1"].findings == []


Q = "model.layers.0.self_attn.q_proj"


def _only(linear_suffix: str, qtype: str):
    """static_qkv, but qtype for linears whose name ends with linear_suffix."""
    return lambda prefix: qtype if prefix.endswith(linear_suffix) else static_qkv(prefix)


def _retype(qtype: str, prefix: str = "model.layers.0.mlp.down_proj"):
    return lambda desc: {k: (qtype if k.startswith(prefix + ".") else v) for k, v in desc.items()}


def written(quant_type, **kw):
    """Build a checkpoint of the bf16 source with write_ascend."""
    return lambda model, base, tmp: write_ascend(model(torch.bfloat16), tmp, quant_type, torch.bfloat16, **kw)


# name -> (build(model(dtype) -> float source, base checkpoint, folder) -> folder, vLLM-Ascend's rules, slimquant's)
BROKEN = {
    "q entry missing": (
        lambda model, base, tmp: rewrite(
            base, tmp, describe=lambda d: {k: v for k, v in d.items() if k != f"{Q}.weight"}
        ),
        {"missing-entry"},
        {"missing-entry"},
    ),
    "k float in a static qkv": (
        written(_only("k_proj", "FLOAT"), layout="v1"),
        {"mixed-group"},
        {"layer-type"},
    ),
    "v dynamic in a static qkv": (
        written(_only("v_proj", "W8A8_DYNAMIC"), layout="v1"),
        {"mixed-group"},
        {"layer-type"},
    ),
    "a type neither runs": (
        lambda model, base, tmp: rewrite(base, tmp, describe=_retype("W4A8_DYNAMIC")),
        {"unsupported-type"},
        {"layer-type"},
    ),
    "a type only vLLM-Ascend runs": (
        lambda model, base, tmp: rewrite(base, tmp, describe=_retype("W8A8_MIX")),
        set(),
        {"layer-type"},
    ),
    "a dynamic linear retyped W8A16 (both run it, same tensors)": (
        lambda model, base, tmp: rewrite(base, tmp, describe=_retype("W8A16")),
        set(),
        set(),
    ),
    "deq_scale missing": (
        lambda model, base, tmp: rewrite(base, tmp, drop=[f"{Q}.deq_scale"]),
        {"missing-tensor"},
        {"missing-tensor"},
    ),
    "shift bias on dynamic linears": (
        written(lambda p: "W8A8_DYNAMIC", shift=True),
        {"dropped-bias"},
        set(),
    ),
    "int64 deq_scale in a bf16 model": (
        written(static_qkv, deq_int64=True, layout="v1"),
        {"deq-scale-dtype"},
        set(),
    ),
    "fractional input_offset": (
        lambda model, base, tmp: rewrite(
            base, tmp, change={f"model.layers.0.self_attn.{p}_proj.input_offset": torch.tensor([3.5]) for p in "qkv"}
        ),
        {"tensor-value"},
        {"tensor-value"},
    ),
    "NaN weight scale": (
        lambda model, base, tmp: rewrite(
            base, tmp, change={"model.layers.0.mlp.down_proj.weight_scale": torch.full((64, 1), float("nan"))}
        ),
        {"tensor-value"},
        {"tensor-value"},
    ),
    "zero input scale": (
        lambda model, base, tmp: rewrite(
            base, tmp, change={f"model.layers.0.self_attn.{p}_proj.input_scale": torch.zeros(1) for p in "qkv"}
        ),
        {"tensor-value"},
        {"tensor-value"},
    ),
    "int8 weight stored as float": (
        lambda model, base, tmp: rewrite(base, tmp, change={f"{Q}.weight": torch.zeros(64, 64)}),
        {"tensor-value"},
        {"tensor-value"},
    ),
    "fused shards calibrated apart": (
        lambda model, base, tmp: rewrite(
            base, tmp, change={"model.layers.0.self_attn.k_proj.input_scale": torch.tensor([0.0123])}
        ),
        {"fused-input-scale"},
        {"fused-input-scale"},
    ),
    "float32 model": (
        lambda model, base, tmp: write_ascend(model(torch.float32), tmp, static_qkv, torch.float32, layout="v1"),
        {"float32-model"},
        set(),
    ),
    "asymmetric KV cache": (written(static_qkv, layout="v1", kv_cache="asym"), {"kv-cache-offset"}, set()),
    "C8 without its scales": (
        lambda model, base, tmp: rewrite(base, tmp, describe=lambda d: d | {"kv_cache_type": "C8"}),
        {"missing-tensor"},
        {"missing-tensor"},
    ),
    "only the older KV key": (
        lambda model, base, tmp: rewrite(
            write_ascend(model(torch.bfloat16), tmp.parent / "c8", static_qkv, torch.bfloat16, kv_cache="sym"),
            tmp,
            describe=lambda d: {k: v for k, v in d.items() if k != "kv_cache_type"},
        ),
        {"kv-quant-type"},
        set(),
    ),
    "quantized attention": (
        lambda model, base, tmp: rewrite(base, tmp, describe=lambda d: d | {"fa_quant_type": "FAKQuant"}),
        set(),
        {"header"},
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_are_reported(tiny_model, tmp_path, case):
    build, vllm_rules, our_rules = BROKEN[case]
    model = lambda dtype: tiny_model("llama", dtype)  # noqa: E731
    base = write_ascend(model(torch.bfloat16), tmp_path / "base", static_qkv, torch.bfloat16, layout="v1")
    assert inspect_checkpoint(base).findings == []
    report = inspect_checkpoint(build(model, base, tmp_path / "broken"))
    assert rules(report, VLLM_ASCEND) == vllm_rules
    assert rules(report, SLIMQUANT) == our_rules
    assert report.loads(SLIMQUANT) == slimquant_loads(tmp_path / "broken")


def test_static_routed_experts_are_refused_by_both(tiny_model, tmp_path):
    """vLLM-Ascend has no static MoE method; slimquant's loader refuses it too (plan time refuses to write it)."""
    folder = write_ascend(tiny_model("deepseek_v3", torch.bfloat16), tmp_path / "q", lambda p: "W8A8", torch.bfloat16)
    report = inspect_checkpoint(folder)
    assert rules(report, VLLM_ASCEND) == {"moe-type"} and rules(report, SLIMQUANT) == {"layer-type"}
    assert not slimquant_loads(folder)


def test_shift_into_routed_experts_is_refused_by_both(tiny_model, tmp_path):
    """Expert biases (an anti-outlier shift into the experts): vLLM-Ascend drops them; slimquant's loader names
    them instead of failing later on a float / int8 dtype mismatch."""
    model = tiny_model("qwen3_moe", torch.bfloat16)
    base = write_ascend(model, tmp_path / "q", lambda p: "W8A8_DYNAMIC", torch.bfloat16, shift=True)
    assert rules(inspect_checkpoint(base), VLLM_ASCEND) == {"dropped-bias"}  # on q / k / v and the dense gate / up
    assert rules(inspect_checkpoint(base), SLIMQUANT) == set()
    biases = {
        f"model.layers.1.mlp.experts.{e}.{p}.bias": torch.ones(32) for e in range(8) for p in ("gate_proj", "up_proj")
    }
    folder = rewrite(base, tmp_path / "shifted", change=biases, describe=lambda d: d | dict.fromkeys(biases, "FLOAT"))
    report = inspect_checkpoint(folder)
    assert rules(report, VLLM_ASCEND) == {"dropped-bias"} and rules(report, SLIMQUANT) == {"layer-type"}
    with pytest.raises(ValueError, match=r"experts: the routed experts carry float biases \(model.layers.1.mlp"):
        load_model(str(folder))


@pytest.mark.parametrize("layer", ["gate", "shared_expert_gate"])
def test_quantized_router_or_shared_expert_gate_is_refused_by_both(tiny_model, tmp_path, layer):
    """vLLM builds a MoE router and Qwen2-MoE's shared_expert_gate float (quant_config=None): one written as a
    W8A8_DYNAMIC linear (int8 weight, scale, offset) is an error for both loaders, and slimquant's loader refuses it
    by name."""
    base = write_ascend(
        tiny_model("qwen2_moe", torch.bfloat16), tmp_path / "q", lambda p: "W8A8_DYNAMIC", torch.bfloat16
    )
    assert rules(inspect_checkpoint(base), VLLM_ASCEND) == set() == rules(inspect_checkpoint(base), SLIMQUANT)
    prefix = f"model.layers.1.mlp.{layer}"
    rows = SafetensorsFolder(base).get(f"{prefix}.weight").shape[0]
    int8 = {
        f"{prefix}.weight": torch.ones(rows, 64, dtype=torch.int8),
        f"{prefix}.weight_scale": torch.full((rows, 1), 0.01),
        f"{prefix}.weight_offset": torch.zeros(rows, 1),
    }
    folder = rewrite(base, tmp_path / "int8", change=int8, describe=lambda d: d | dict.fromkeys(int8, "W8A8_DYNAMIC"))
    name = f"{prefix}.weight"
    report = inspect_checkpoint(folder)
    assert rules(report, VLLM_ASCEND) == {"float-layer"} == rules(report, SLIMQUANT)
    with pytest.raises(ValueError, match=f"quantizes {{'{name}': 'W8A8_DYNAMIC'}}"):
        load_model(str(folder))


def test_cli_exit_status_follows_the_chosen_loader(tiny_model, tmp_path, capsys):
    """Exit 1 when a loader fails it; --loader picks whose verdict counts; --json has both verdicts."""
    tied = write_ascend(tiny_model("llama", torch.bfloat16, tie_word_embeddings=True), tmp_path / "v0", static_qkv,
                        torch.bfloat16, layout="v0")  # fmt: skip
    assert main(["inspect", str(tied)]) == 1
    text = capsys.readouterr().out
    assert "vLLM-Ascend: fails" in text and "KeyError" in text and "slimquant: loads it" in text
    assert main(["inspect", str(tied), "--loader", "slimquant"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tied), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["loads"] == {"slimquant": True, "vllm-ascend": False}
    assert main(["inspect", str(tmp_path)]) == 1  # not a checkpoint: one clear line
    assert "no quant_model_description.json" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", list(SCHEME_TENSORS))
def test_scheme_tensors_are_what_the_methods_load(scheme):
    """The format's table (which inspect checks) against the parameters each quant method registers."""
    layer = torch.nn.Module()
    layer.shard_prefixes = ["x"]
    method = METHODS_BY_TYPE.get(scheme, UnquantizedMethod)(torch.bfloat16)
    method.create_weights(layer, 16, 8, torch.bfloat16)
    params = dict(layer.named_parameters())
    required = tuple(n for n, p in params.items() if not getattr(p, "optional", False))
    optional = tuple(n for n, p in params.items() if getattr(p, "optional", False))
    assert (set(required), set(optional)) == tuple(set(x) for x in SCHEME_TENSORS[scheme])
    assert all(p.rule is rule_for(name, scheme) for name, p in params.items())  # the rules inspect checks
