"""Int sources (compressed-tensors' pack-quantized: llm-compressor's W4A16, Kimi-K2-Thinking's int4 release; and
asymmetric int8): each is read as the bf16 compressed-tensors itself decompresses it to, written by
compressed-tensors' own compressors and decompressed by transformers or compressed-tensors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from slimquant.quant.pipeline import quantize
from slimquant.quant.sources import HFCheckpoint, unpack_ints
from tests.quant.common import FAST, read_output, read_source

GROUP = 32
# Kimi-K2-Thinking's config.json: only the routed experts are int4
KIMI_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


def scheme(bits: int = 4, **weights) -> QuantizationScheme:
    args = dict(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=GROUP) | weights
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))


COMPRESSORS = {"pack-quantized": PackedQuantizationCompressor, "int-quantized": IntQuantizationCompressor}


def pack(w: torch.Tensor, s: QuantizationScheme, fmt: str = "pack-quantized") -> dict[str, torch.Tensor]:
    """w [M, N] -> compressed-tensors' own tensors for it (weight_packed, weight_scale, weight_shape, and
    weight_zero_point when asymmetric): scales (and zero points) from each group's (or row's) range, the ints and
    their packing by compressed-tensors' compressor of that format."""
    bits, m, n = s.weights.num_bits, *w.shape
    size = GROUP if s.weights.strategy == "group" else n
    x = w.float().view(m, n // size, size)
    parts = {"weight": w}
    if s.weights.symmetric:
        scale = x.abs().amax(-1) / (2 ** (bits - 1) - 1)  # [M, N / size]
    else:
        low, high = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scale = (high - low) / (2**bits - 1)
        zero = (-low / scale.clamp(min=1e-6)).round() - 2 ** (bits - 1)
        parts["weight_zero_point"] = zero.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)
    parts["weight_scale"] = scale.clamp(min=1e-6).to(torch.bfloat16)
    return COMPRESSORS[fmt].compress(parts, s)


def write_packed(src, dst, packed, s: QuantizationScheme, ignore: list[str], fmt: str = "pack-quantized") -> None:
    """A copy of the HF folder src whose linears `packed(name)` selects are stored as compressed-tensors packs them,
    with the quantization_config llm-compressor writes."""
    stored = {}
    for key, t in read_source(src).items():
        if packed(key):
            stored |= {key[: -len("weight")] + k: v for k, v in pack(t, s, fmt).items()}
        else:
            stored[key] = t
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(stored, str(dst / "model.safetensors"))
    qc = QuantizationConfig(config_groups={"group_0": s}, format=fmt, ignore=ignore)
    qc = qc.model_dump(mode="json") | {"quantization_status": "compressed"}
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))


def write_float(src, dst, tensors: dict) -> None:
    """A copy of the HF folder src holding `tensors` and no quantization_config."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config))


def assert_same_output(a, b) -> None:
    (desc_a, ta), (desc_b, tb) = read_output(a), read_output(b)
    assert desc_a == desc_b and ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert not any(k.endswith(("_packed", "_shape", "_scale_inv")) for k in ta)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 4), cols=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_unpack_reads_what_compressed_tensors_packs(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, cols), generator=g).to(torch.int8)
    assert torch.equal(unpack_ints(pack_to_int32(q, bits), bits, cols), q)


def test_unpack_refuses_words_too_few():
    with pytest.raises(ValueError, match="100 ints of 4 bits do not fit"):
        unpack_ints(torch.zeros(2, 12, dtype=torch.int32), 4, 100)


@pytest.mark.parametrize(
    "fmt, bits, strategy, symmetric",
    [
        ("pack-quantized", 4, "group", True),
        ("pack-quantized", 4, "group", False),
        ("pack-quantized", 8, "group", True),
        ("pack-quantized", 4, "channel", False),
        ("pack-quantized", 3, "group", True),
        ("int-quantized", 8, "channel", False),
    ],
)
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # transformers: it reads ours
def test_int_source_reads_as_transformers_decompresses_it(tiny_model, tmp_path, fmt, bits, strategy, symmetric):
    """llm-compressor's W4A16 (every linear int4, a scale per 32 columns) and W4A16_ASYM (AWQ's: a zero point
    too), 8- / 3-bit or per-channel packs, asymmetric int8: each weight the quantizer reads equals the bf16
    transformers decompresses it to (with compressed-tensors), and the quantized output equals that of the bf16
    folder transformers' weights make."""
    src = tiny_model("llama", torch.bfloat16)
    s = scheme(bits, strategy=strategy, group_size=GROUP if strategy == "group" else None, symmetric=symmetric)
    write_packed(src, tmp_path / "int", lambda k: k.endswith("_proj.weight"), s, ["lm_head"], fmt)
    config = CompressedTensorsConfig(dequantize=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "int", dtype=torch.bfloat16, quantization_config=config)
    expected = reference.state_dict()
    ckpt = HFCheckpoint(tmp_path / "int")
    assert sorted(ckpt.keys()) == sorted(read_source(src))
    for name in ckpt.keys():
        if name.endswith("_proj.weight"):
            assert torch.equal(ckpt.get(name), expected[name]), name
    write_float(src, tmp_path / "bf16", {k: expected[k].clone() for k in read_source(src)})
    a = quantize(tmp_path / "int", tmp_path / "q-int", "w8a8_dynamic", **FAST).output
    assert_same_output(a, quantize(tmp_path / "bf16", tmp_path / "q-bf16", "w8a8_dynamic", **FAST).output)
    assert "quantization_config" not in json.loads((a / "config.json").read_text())


def test_kimi_k2_thinking_int4_experts_quantize_as_their_decompression(tiny_model, tmp_path):
    """Kimi-K2-Thinking's layout (model_type kimi_k2, only the routed experts int4 in groups of 32): the W8A8 mix
    comes out as from the bf16 that compressed-tensors decompresses the experts to."""
    src = tiny_model("deepseek_v3", torch.bfloat16)
    kimi = tmp_path / "kimi-src"
    shutil.copytree(src, kimi)
    config = json.loads((kimi / "config.json").read_text())
    (kimi / "config.json").write_text(json.dumps(config | {"model_type": "kimi_k2"}))
    routed = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
    write_packed(kimi, tmp_path / "int4", routed.fullmatch, scheme(), KIMI_IGNORE)
    tensors = read_source(tmp_path / "int4")
    assert sum(k.endswith("weight_packed") for k in tensors) == 3 * 8  # one MoE layer of 8 experts
    decompressed = {}
    for key, t in tensors.items():
        if key.endswith("weight_packed"):
            base = key[: -len("weight_packed")]
            parts = {k: tensors[base + k] for k in ("weight_packed", "weight_scale", "weight_shape")}
            decompressed[base + "weight"] = PackedQuantizationCompressor.decompress(parts, scheme())["weight"]
        elif not key.endswith(("weight_scale", "weight_shape")):
            decompressed[key] = t
    write_float(kimi, tmp_path / "bf16", decompressed)
    a = quantize(tmp_path / "int4", tmp_path / "q-int4", "w8a8", **FAST).output
    assert_same_output(a, quantize(tmp_path / "bf16", tmp_path / "q-bf16", "w8a8", **FAST).output)
    assert json.loads((a / "config.json").read_text())["model_type"] == "kimi_k2"


def test_gptq_column_order_is_followed(tiny_model, tmp_path):
    """Older compressed-tensors checkpoints of GPTQ's activation order store `weight_g_idx`, each column's group:
    column j dequantizes with scale[:, g_idx[j]] (the format's math written out here)."""
    src = tiny_model("llama", torch.bfloat16)
    write_packed(src, tmp_path / "int", lambda k: k.endswith("_proj.weight"), scheme(), ["lm_head"])
    tensors = read_source(tmp_path / "int")
    name = "model.layers.1.mlp.down_proj.weight"
    m, n = tensors[name + "_shape"].tolist()
    g_idx = torch.randperm(n, generator=torch.Generator().manual_seed(0)) % (n // GROUP)  # [N]
    tensors[name + "_g_idx"] = g_idx.to(torch.int32)
    save_file(tensors, str(tmp_path / "int" / "model.safetensors"))
    q = pack_to_int32_inverse(tensors[name + "_packed"], n)
    expected = torch.stack([q[:, j].float() * tensors[name + "_scale"][:, g_idx[j]].float() for j in range(n)], 1)
    ckpt = HFCheckpoint(tmp_path / "int")
    assert torch.equal(ckpt.get(name), expected.to(torch.bfloat16)) and name + "_g_idx" not in ckpt
    for bad in (g_idx[:-1], torch.cat([g_idx[:-1], torch.tensor([-1])])):  # a column short; one index negative
        tensors[name + "_g_idx"] = bad.to(torch.int32)
        save_file(tensors, str(tmp_path / "int" / "model.safetensors"))
        with pytest.raises(ValueError, match=re.escape(f"a weight [{m}, {n}] in blocks of 1 x 32 (with g_idx)")):
            HFCheckpoint(tmp_path / "int").get(name)


def pack_to_int32_inverse(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int4 ints [M, cols] from int32 words, bit by bit: int j of a row is bits 4j .. 4j + 3, less 8."""
    words = packed.to(torch.int64) & 0xFFFFFFFF  # [M, W]
    return torch.stack([((words[:, j // 8] >> (4 * (j % 8))) & 15) - 8 for j in range(cols)], 1)


@pytest.mark.parametrize(
    "fmt, weights, message",
    [
        ("float-quantized", dict(type="float", num_bits=8, symmetric=False), "8 bits, asymmetric float"),
        ("pack-quantized", dict(num_bits=1), "1 bits"),
        ("int-quantized", dict(num_bits=4), "4 bits, symmetric int"),
    ],
)
def test_schemes_it_cannot_read_are_refused_by_name(tiny_model, tmp_path, fmt, weights, message):
    src = tiny_model("llama")
    qc = {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": {}}}
    qc["config_groups"]["group_0"] = {"targets": ["Linear"], "weights": scheme().weights.model_dump(mode="json")}
    qc["config_groups"]["group_0"]["weights"] |= weights
    shutil.copytree(src, tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    (tmp_path / "src" / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
    with pytest.raises(ValueError, match=re.escape(message)):
        quantize(tmp_path / "src", tmp_path / "q", "w8a8_dynamic", **FAST)


def test_a_packed_weight_without_its_shape_is_named(tiny_model, tmp_path):
    src = tiny_model("llama", torch.bfloat16)
    write_packed(src, tmp_path / "int", lambda k: k.endswith("_proj.weight"), scheme(), ["lm_head"])
    tensors = read_source(tmp_path / "int")
    del tensors["model.layers.0.mlp.up_proj.weight_shape"]
    save_file(tensors, str(tmp_path / "int" / "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.up_proj.weight_scale has no")):
        HFCheckpoint(tmp_path / "int").get("model.layers.0.mlp.up_proj.weight")
