"""GLM-4.5 (glm4_moe): a dense layer, then shared + routed experts behind DeepSeek-V3's sigmoid router; q/k/v biases,
rope on half of each head. Float equals transformers (also tests/models/test_model_float.py); int8 checkpoints equal
transformers' model with plain docs/FORMAT.md math in its linears and experts (tests/models/test_model_qwen3_moe.py);
the project's quantizer writes the MoE recipe (attention static, every MLP linear dynamic, the router float)."""

from __future__ import annotations

import pytest
import torch

from slimquant.format.checkpoint import read_description, tensor_types
from slimquant.layers.moe import SparseMoE
from slimquant.layers.rotary import apply_rotary, inverse_frequencies
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close, hf_logits
from tests.models.test_model_deepseek_quantized import assert_bf16_as_close_as_transformers
from tests.models.test_model_qwen3_moe import moe_mix


def test_partial_rotary_is_transformers():
    """Rope on the first half of each head (the rest kept), as transformers' GLM-4.5 applies it."""
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

    t, heads, d = 5, 3, 16
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(t, heads, d, generator=gen), torch.randn(t, 1, d, generator=gen)
    inv_freq = inverse_frequencies(d, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    assert inv_freq.shape == (4,)
    freqs = torch.arange(t)[:, None].float() * inv_freq  # [T, 4]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()  # [T, 8]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(apply_rotary(q, cos, sin), want_q[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos, sin), want_k[0].transpose(0, 1))
    assert torch.equal(apply_rotary(q, cos, sin)[..., 8:], q[..., 8:])


def test_a_partial_rotary_factor_that_turns_an_odd_dim_count_is_a_value_error():
    with pytest.raises(ValueError, match="turns 3 of a head's 16 dims"):
        inverse_frequencies(16, {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.1875})


@pytest.mark.parametrize("qk_norm", [False, True])
def test_chunked_prefill_then_decode_matches_transformers(tiny_model, qk_norm):
    folder = tiny_model("glm4_moe", use_qk_norm=qk_norm)
    loaded = load_model(str(folder))
    layers = loaded.model.model.layers
    assert [isinstance(layer.mlp, SparseMoE) for layer in layers] == [False, True]
    assert layers[1].mlp.shared_experts is not None and layers[1].mlp.gate.scoring == "sigmoid"
    assert (layers[0].self_attn.q_norm is not None) == qk_norm
    runner = PagedRunner.of(loaded, torch.float32)
    first = runner.step({0: PROMPT[:6]})
    rest = [runner.step({0: [t]}) for t in PROMPT[6:]]
    assert_close(torch.cat([first, *rest]), hf_logits(folder, PROMPT))


def test_int8_steps_run_in_one_native_call(tiny_model, tmp_path):
    """The whole-step native call takes GLM-4.5's layers (rope on half of each head, shared experts, the biased
    router; tests/models/test_native_decoder_layer.py checks its bits against the per-op path's)."""
    loaded = load_model(str(write_ascend(tiny_model("glm4_moe"), tmp_path / "q", moe_mix)))
    if type(loaded.backend).__name__ != "CpuNativeBackend":
        pytest.skip("native kernels unavailable")
    assert loaded.backend.stack is not None, loaded.backend.describe()
    assert "in one native call" in loaded.backend.describe()


def test_project_quantizer_checkpoint_matches_reference(tiny_model, tmp_path):
    """`slimquant quantize --type w8a8` of a bf16 GLM-4.5: attention static, every MLP linear (dense, shared and
    routed experts) dynamic, the router and its bias float; bf16 decode as close to the reference math as
    transformers' own bf16 run."""
    from slimquant.quant.pipeline import quantize

    src, dst = tiny_model("glm4_moe", dtype=torch.bfloat16), tmp_path / "q"
    quantize(src, dst, "w8a8", num_samples=2, seq_len=16, progress=False)
    types = tensor_types(read_description(dst))
    assert types["model.layers.1.mlp.gate.weight"] == types["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert types["model.layers.1.mlp.gate.weight"] == "FLOAT"
    weights = {n.removesuffix(".weight"): t for n, t in types.items() if n.endswith(".weight") and ".layers." in n}
    linears = {n: t for n, t in weights.items() if not n.endswith(("norm", "mlp.gate"))}
    assert {n.split(".")[-1] for n in linears if ".shared_experts." in n} == {"gate_proj", "up_proj", "down_proj"}
    assert {n: t for n, t in linears.items() if t != moe_mix(n)} == {}
    assert_bf16_as_close_as_transformers(src, dst)


def test_mtp_layer_quantized_or_not_and_skipped_at_run_time(tiny_model, tmp_path):
    """GLM-4.5 checkpoints carry an MTP layer (model.layers.{num_hidden_layers}, DeepSeek-V3's extras): the quantizer
    writes it float, or by the MoE mix with --quant-mtp; the engine skips it, so the main layers give the logits of
    the checkpoint quantized without it, bit for bit."""
    from slimquant.quant.pipeline import quantize
    from tests.quant.common import FAST, read_output, read_source
    from tests.quant.test_quant_deepseek import copy_with
    from tests.quant.test_quant_deepseek_sources import mtp_tensors

    src = tiny_model("glm4_moe", dtype=torch.bfloat16)
    source = read_source(src)
    extra = mtp_tensors(source, 2)
    copy_with(src, tmp_path / "src", source | extra)
    quantize(src, tmp_path / "plain", "w8a8", **FAST)
    quantize(tmp_path / "src", tmp_path / "float-mtp", "w8a8", **FAST)
    quantize(tmp_path / "src", tmp_path / "int8-mtp", "w8a8", quant_mtp=True, **FAST)
    assert {t for n, t in read_output(tmp_path / "float-mtp")[0].items() if n in extra} == {"FLOAT"}
    desc = read_output(tmp_path / "int8-mtp")[0]
    assert desc["model.layers.2.self_attn.q_proj.weight"] == "W8A8" and desc["model.layers.2.eh_proj.weight"] == "FLOAT"
    assert desc["model.layers.2.mlp.experts.3.down_proj.weight"] == "W8A8_DYNAMIC"

    def logits(folder) -> torch.Tensor:
        runner = PagedRunner.of(load_model(str(folder)))
        return torch.cat([runner.step({0: PROMPT[:7]}), *[runner.step({0: [t]}) for t in PROMPT[7:]]])

    want = logits(tmp_path / "plain")
    assert torch.equal(logits(tmp_path / "float-mtp"), want) and torch.equal(logits(tmp_path / "int8-mtp"), want)


def test_a_hub_config_with_top_level_rope_keys(tiny_model, tmp_path):
    """The Hub's GLM-4.5 config.json gives rope_theta and partial_rotary_factor at its top level (no
    rope_parameters): both are read, and the logits are transformers' on the same file."""
    import json
    import shutil

    src = tmp_path / "hub"
    shutil.copytree(tiny_model("glm4_moe"), src)
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config |= {"rope_theta": 500.0, "partial_rotary_factor": rope["partial_rotary_factor"]}
    (src / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(src))
    assert loaded.model.model.rotary.inv_freq.shape == (4,)
    assert_close(PagedRunner.of(loaded).step({0: PROMPT}), hf_logits(src, PROMPT))
