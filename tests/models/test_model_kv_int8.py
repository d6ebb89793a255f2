"""int8 (C8) KV cache: checkpoints with per-channel KV-cache scales, in every layout, run docs/FORMAT.md's math
(against transformers with a cache that stores and reads k / v that way), and only where the cache is read."""

from __future__ import annotations

import json

import pytest
import torch

from slimquant.config import KernelConfig
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import LAYOUTS, write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close
from tests.models.reference import c8_cache, reference_model, reference_steps

FIRST = 7  # the prompt's first chunk: attends to its own float k / v; every later token reads the int8 cache


def mixed(prefix: str) -> str:
    return "W8A8_DYNAMIC" if ".mlp." in prefix else "W8A8"


def run_steps(folder, kv_dtype: torch.dtype | None, first: int = FIRST, backend: str = "auto") -> torch.Tensor:
    """Logits [T, V]: the first chunk as one prefill step, then one token per step (decode)."""
    # torch-reference: fp32 given (its "auto" would run bf16 here), so fp32 is the model dtype scales round to
    dtype = "float32" if backend == "torch-reference" else "auto"
    runner = PagedRunner.of(load_model(str(folder), dtype=dtype, kernels=KernelConfig(backend=backend)), kv_dtype)
    return torch.cat([runner.step({0: PROMPT[:first]}), *[runner.step({0: [t]}) for t in PROMPT[first:]]])


@pytest.mark.parametrize(
    "arch,offsets,first,backend",
    [
        ("llama", "sym", FIRST, "auto"),
        ("llama", "asym", FIRST, "auto"),
        ("llama", "asym", 1, "auto"),  # a one-token prompt: its own float v, then decode steps
        ("llama", "asym", FIRST, "torch-reference"),
        ("llama", "asym", 1, "torch-reference"),
        ("qwen2", "sym", FIRST, "auto"),  # q/k/v biases
        ("qwen3", "sym", FIRST, "auto"),  # q / k norms before RoPE
    ],
)
def test_int8_kv_cache_is_format_math(tiny_model, tmp_path, arch, offsets, first, backend):
    src = tiny_model(arch, dtype=torch.bfloat16)
    folder = write_ascend(src, tmp_path / "c8", mixed, torch.bfloat16, layout="v1", kv_cache=offsets)
    ours = run_steps(folder, torch.int8, first, backend)
    scale_dtype = torch.float32 if backend == "torch-reference" else torch.bfloat16
    model = reference_model(src, folder, torch.float32, scale_dtype)
    n_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    chunks = [PROMPT[:first]] + [[t] for t in PROMPT[first:]]
    ref = reference_steps(model, chunks, c8_cache(folder, n_layers, scale_dtype))
    assert_close(ours, ref, rel=1e-3)
    float_cache, ours_float = reference_steps(model, chunks, None), run_steps(folder, torch.float32, first, backend)
    assert_close(ours_float, float_cache, rel=1e-3)  # the same model over a float cache
    assert torch.equal(ours[:first], ours_float[:first])  # the first chunk never reads the cache
    drift = (ref[FIRST:] - float_cache[FIRST:]).abs().max().item()
    assert drift > 10 * (ours - ref).abs().max().item()  # the int8 cache is really read: a visible difference


def test_every_layout_of_c8_gives_the_same_logits(tiny_model, tmp_path):
    src = tiny_model("llama", dtype=torch.bfloat16, tie_word_embeddings=True)
    logits = {
        layout: run_steps(
            write_ascend(src, tmp_path / layout, mixed, torch.bfloat16, layout=layout, kv_cache="asym"), None
        )
        for layout in LAYOUTS
    }
    assert torch.equal(logits["v0"], logits["slimquant"]) and torch.equal(logits["v1"], logits["slimquant"])


def test_cache_dtype_follows_the_checkpoint_unless_told(tiny_model, tmp_path):
    """auto: int8 for a C8 checkpoint (as vLLM-Ascend); an explicit float cache ignores the scales; int8 without
    scales is refused with the way to get them."""
    from slimquant import LLM

    src = tiny_model("llama", dtype=torch.bfloat16)
    c8 = write_ascend(src, tmp_path / "c8", mixed, torch.bfloat16, kv_cache="sym")
    plain = write_ascend(src, tmp_path / "plain", mixed, torch.bfloat16)
    caches = {}
    for setting in ("auto", "bfloat16"):
        llm = LLM(str(c8), kv_cache_dtype=setting, max_model_len=64, num_kv_blocks=8, block_size=16)
        caches[setting] = {m.kv_cache.dtype for m in llm.llm_engine.runner.model.modules() if hasattr(m, "kv_quant")}
    assert caches == {"auto": {torch.int8}, "bfloat16": {torch.bfloat16}}
    with pytest.raises(ValueError, match="--kv-cache int8"):
        LLM(str(plain), kv_cache_dtype="int8", max_model_len=64, num_kv_blocks=8)


def test_mla_refuses_a_c8_description(tiny_model, tmp_path):
    src = tiny_model("deepseek_v3", dtype=torch.bfloat16)
    folder = write_ascend(src, tmp_path / "q", lambda p: "W8A8_DYNAMIC" if ".mlp." in p else "W8A8", torch.bfloat16)
    desc = json.loads((folder / "quant_model_description.json").read_text()) | {"kv_cache_type": "C8"}
    (folder / "quant_model_description.json").write_text(json.dumps(desc))
    with pytest.raises(ValueError, match="MLA caches one latent"):
        load_model(str(folder))
