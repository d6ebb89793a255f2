"""Quantized path: our int8 model equals an independent plain implementation of docs/FORMAT.md's runtime math."""

from __future__ import annotations

import json

import pytest
import torch

from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close
from tests.models.reference import reference_logits, reference_model


def static(prefix: str) -> str:
    return "W8A8"


def dynamic(prefix: str) -> str:
    return "W8A8_DYNAMIC"


def mixed(prefix: str) -> str:
    """Layer 0's MLP float, layer 1's attention dynamic, the rest static."""
    if prefix.startswith("model.layers.0.mlp"):
        return "FLOAT"
    return "W8A8_DYNAMIC" if prefix.startswith("model.layers.1.self_attn") else "W8A8"


def weight_only(prefix: str, rest=dynamic) -> str:
    """Every down_proj and layer 1's attention W8A16 (int8 weights, float activations), the rest as rest()."""
    if prefix.endswith("mlp.down_proj") or prefix.startswith("model.layers.1.self_attn"):
        return "W8A16"
    return rest(prefix)


def run_both(float_folder, ascend_folder, dtype=torch.float32, chunked=True) -> tuple[torch.Tensor, torch.Tensor]:
    """(our logits, reference logits) for PROMPT; chunked = a prefill chunk then decode steps."""
    loaded = load_model(str(ascend_folder), dtype=dtype)
    assert loaded.quantized and loaded.dtype == dtype
    runner = PagedRunner.of(loaded, dtype)
    if chunked:
        ours = torch.cat([runner.step({0: PROMPT[:7]}), *[runner.step({0: [t]}) for t in PROMPT[7:]]])
    else:
        ours = runner.step({0: PROMPT})
    return ours, reference_logits(reference_model(float_folder, ascend_folder, dtype), PROMPT)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("scheme", [static, dynamic, mixed, weight_only])
def test_quantized_matches_reference(tiny_model, tmp_path, arch, scheme):
    src = tiny_model(arch)
    ours, ref = run_both(src, write_ascend(src, tmp_path / "q", scheme))
    assert_close(ours, ref, rel=1e-4)


@pytest.mark.parametrize("deq_int64", [False, True])
def test_static_deq_scale_forms_and_shift(tiny_model, tmp_path, deq_int64):
    src = tiny_model("qwen2")
    dst = write_ascend(src, tmp_path / "q", static, deq_int64=deq_int64, shift=True)
    ours, ref = run_both(src, dst)
    assert_close(ours, ref, rel=1e-4)
    plain, _ = run_both(src, write_ascend(src, tmp_path / "nobias", static))
    assert (plain - ours).abs().max() > 1e-2  # the norm bias really changed the output


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shift_biases_on_linears_without_native_bias(tiny_model, tmp_path, arch):
    """The anti-outlier shift gives bias-free linears a float bias: static folds it, dynamic/FLOAT add it."""
    src = tiny_model(arch)
    ours, ref = run_both(src, write_ascend(src, tmp_path / "q", mixed, shift=True))
    assert_close(ours, ref, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(tiny_model, tmp_path, dtype):
    """fp16 stores deq_scale as int64, bf16 as fp32; one prefill step runs the reference's exact op order."""
    src = tiny_model("qwen2", dtype=dtype)
    dst = write_ascend(src, tmp_path / "q", mixed, dtype=dtype, shift=True)
    deq = SafetensorsFolder(dst).get("model.layers.1.mlp.gate_proj.deq_scale")
    assert deq.dtype == (torch.int64 if dtype == torch.float16 else torch.float32)
    ours, ref = run_both(src, dst, dtype, chunked=False)
    assert_close(ours, ref, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weight_only(tiny_model, tmp_path, dtype):
    """W8A16's scale and offset are rounded to the model dtype before they dequantize the weight: exact."""
    src = tiny_model("llama", dtype=dtype)
    dst = write_ascend(src, tmp_path / "q", lambda prefix: weight_only(prefix, rest=mixed), dtype=dtype)
    ours, ref = run_both(src, dst, dtype, chunked=False)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("layout", ["v0", "v1"])
def test_modelslim_weight_only_checkpoints_run(tiny_model, tmp_path, layout):
    """A whole-model W8A16 checkpoint as ModelSlim's savers write it (model_quant_type W8A16, asymmetric weights)
    runs as the reference says, and `slimquant inspect` finds nothing against it for either loader."""
    from slimquant.models.compat import inspect_checkpoint

    src = tiny_model("qwen2", dtype=torch.bfloat16)
    dst = write_ascend(src, tmp_path / "q", lambda p: "W8A16", torch.bfloat16, layout=layout, model_quant_type="W8A16")
    assert json.loads((dst / "quant_model_description.json").read_text())["model_quant_type"] == "W8A16"
    ours, ref = run_both(src, dst)  # in fp32 (bf16's exact roundings: test_half_precision_weight_only)
    assert_close(ours, ref, rel=1e-4)
    report = inspect_checkpoint(dst)
    assert report.findings == [] and report.linears_by_scheme["W8A16"] == 14
