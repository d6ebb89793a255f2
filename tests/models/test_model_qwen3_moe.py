"""Qwen3-MoE: a dense layer then a layer of routed experts (softmax top-k, renormalized, no shared experts). Float
equals transformers (tests/models/test_model_float.py); int8 checkpoints equal transformers' model with plain
docs/FORMAT.md math in its linears and experts; the project's quantizer writes the MoE recipe vLLM-Ascend loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from slimquant.format.checkpoint import read_description, tensor_types
from slimquant.layers.mlp import GatedMLP
from slimquant.layers.moe import SparseMoE
from slimquant.models.loader import load_model
from slimquant.random_models import make_tiny_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close, hf_logits
from tests.models.test_model_deepseek_quantized import assert_bf16_as_close_as_transformers, run_both


def moe_mix(prefix: str) -> str:
    """ModelSlim's Qwen3-MoE recipe (quant_qwen_moe_w8a8.py: mix_cfg {"*.mlp.*": "w8a8_dynamic", "*": "w8a8"}),
    which `slimquant quantize --type w8a8` writes too: every MLP linear dynamic, attention static."""
    return "W8A8_DYNAMIC" if ".mlp." in prefix else "W8A8"


def dynamic(prefix: str) -> str:
    return "W8A8_DYNAMIC"


def experts_float(prefix: str) -> str:
    """Routed experts float (the float FusedMoE path), the rest static."""
    return "FLOAT" if ".mlp.experts." in prefix else "W8A8"


# Qwen2-MoE: q/k/v biases, the gated shared expert; GLM-4.5: shared experts, biased router, half rope
@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "glm4_moe"])
@pytest.mark.parametrize("scheme", [moe_mix, dynamic, experts_float])
@pytest.mark.parametrize("layout", ["slimquant", "v1"])
def test_quantized_matches_reference(tiny_model, tmp_path, arch, scheme, layout):
    src = tiny_model(arch)
    ours, ref = run_both(src, write_ascend(src, tmp_path / "q", scheme, layout=layout))
    assert_close(ours, ref, rel=1e-4)


def test_layers_are_dense_or_routed_as_the_config_says(tmp_path):
    """decoder_sparse_step 2 and mlp_only_layers [3]: layers 1 and 5 routed, 0 2 3 4 dense, as transformers builds
    them; int8 experts packed per expert, the router float."""
    from transformers import AutoModelForCausalLM

    sparse = dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    src = make_tiny_model("qwen3_moe", tmp_path / "src", **sparse)
    theirs = [type(layer.mlp).__name__ for layer in AutoModelForCausalLM.from_pretrained(src).model.layers]
    loaded = load_model(str(write_ascend(src, tmp_path / "q", moe_mix)))
    layers = loaded.model.model.layers
    assert [isinstance(layer.mlp, SparseMoE) for layer in layers] == [n.endswith("MoeBlock") for n in theirs]
    assert [i for i, layer in enumerate(layers) if isinstance(layer.mlp, SparseMoE)] == [1, 5]
    moe = layers[1].mlp
    assert moe.shared_experts is None and isinstance(layers[0].mlp, GatedMLP)
    assert moe.experts.quant_type == "W8A8_DYNAMIC" and moe.experts.w13_scale.shape == (8, 64)
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.scoring == "softmax"
    ours = PagedRunner.of(load_model(str(src))).step({0: PROMPT})
    assert_close(ours, hf_logits(src, PROMPT))


@pytest.mark.parametrize("quant_type", ["w8a8", "w8a8_dynamic"])
def test_project_quantizer_checkpoint_matches_reference(tiny_model, tmp_path, quant_type):
    """`slimquant quantize` of a bf16 Qwen3-MoE writes ModelSlim's recipe (moe_mix; the router float; config.json's
    "quantize" key); prefill then decode in bf16 as close to the reference math in fp32 as transformers' own bf16
    run of the same int8 checkpoint is (their exact agreement in fp32: test_quantized_matches_reference)."""
    from slimquant.quant.pipeline import quantize

    src, dst = tiny_model("qwen3_moe", dtype=torch.bfloat16), tmp_path / "q"
    quantize(src, dst, quant_type, num_samples=2, seq_len=16, progress=False)
    types = tensor_types(read_description(dst))
    assert json.loads((dst / "config.json").read_text())["quantize"] == "w8a8_dynamic"
    assert types["model.layers.1.mlp.gate.weight"] == "FLOAT"
    assert {t for n, t in types.items() if ".mlp.experts." in n} == {"W8A8_DYNAMIC"}
    want = moe_mix if quant_type == "w8a8" else dynamic
    for name, t in types.items():
        if name.endswith(".weight_scale"):
            assert t == want(name.rsplit(".", 1)[0]), name
    assert_bf16_as_close_as_transformers(src, dst)


def test_a_hub_config_that_says_num_experts(tiny_model, tmp_path):
    """The Hub's Qwen3-MoE config.json counts the experts in num_experts (transformers 5 writes num_local_experts):
    the quantizer and the runtime both find them."""
    from slimquant.quant.pipeline import quantize

    src = tmp_path / "hub"
    shutil.copytree(tiny_model("qwen3_moe"), src)
    config = json.loads((src / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    (src / "config.json").write_text(json.dumps(config))
    quantize(src, tmp_path / "q", "w8a8_dynamic", num_samples=2, seq_len=16, progress=False)
    types = tensor_types(read_description(tmp_path / "q"))
    assert {n.split(".")[5] for n in types if ".mlp.experts." in n} == {str(e) for e in range(8)}
    moe = load_model(str(tmp_path / "q")).model.model.layers[1].mlp
    assert isinstance(moe, SparseMoE) and moe.experts.num_experts == 8 and moe.experts.quantized


def test_a_decode_step_is_said_to_read_its_top_k_experts(tiny_model, tmp_path):
    """`slimquant bench`'s bandwidth limit: one stream's decode step reads 2 of the 8 experts of a MoE layer."""
    from slimquant.config import KernelConfig
    from slimquant.entrypoints.commands.bench import decode_weight_bytes

    folder = write_ascend(tiny_model("qwen3_moe"), tmp_path / "q", moe_mix)
    loaded = load_model(str(folder), kernels=KernelConfig(backend="torch-reference"))
    model, head = loaded.model, loaded.backend.head(loaded.model)
    assert head.argmax_bytes() is None  # the float head is read whole

    def nbytes(params) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    experts = nbytes(model.model.layers[1].mlp.experts.parameters())
    rest = nbytes(model.parameters()) - experts - nbytes([model.model.embed_tokens.weight])
    assert decode_weight_bytes(model, head) == rest + experts * 2 // 8
