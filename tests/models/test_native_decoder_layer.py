"""The cpu-native backend's whole step (one native call for every layer) equals the per-op path bit for bit."""

from __future__ import annotations

import pytest
import torch

from slimquant.backends import cpu_native
from slimquant.backends.native_ops import NATIVE_MAX_TOKENS, NativeOps
from slimquant.backends.torch_ops import TorchOps
from slimquant.kernels import native
from slimquant.layers.norm import RMSNorm
from slimquant.models.loader import load_model
from slimquant.random_models import make_tiny_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner
from tests.models.test_model_deepseek_quantized import deepseek_mix, kv_b_quantized
from tests.models.test_model_deepseek_variants import YARN
from tests.models.test_model_qwen3_moe import moe_mix

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")


def mixed(prefix: str) -> str:
    """Layer 0's MLP float (bf16 weights), layer 1's attention dynamic, the rest static."""
    if prefix.startswith("model.layers.0.mlp"):
        return "FLOAT"
    return "W8A8_DYNAMIC" if prefix.startswith("model.layers.1.self_attn") else "W8A8"


SCHEMES = {"dynamic": lambda p: "W8A8_DYNAMIC", "static": lambda p: "W8A8", "mixed": mixed}


def decode_run(
    folder, mode: str, steps: int = 3, kv_dtype: torch.dtype = torch.float32, dtype: torch.dtype | str = torch.float32
) -> tuple[torch.Tensor, list[torch.Tensor], object]:
    """Logits of three sequences (prefill, then `steps` batched decode steps), the KV caches, the stack's plan.

    mode: "stack" (the cpu-native backend: one native call for all layers) or "per-op" (its stack off).
    """
    loaded = load_model(str(folder), dtype=dtype)
    assert loaded.backend.name == "cpu-native"
    if mode == "per-op":
        loaded.backend.stack = None  # never stack
    layers = list(loaded.model.model.layers)
    runner = PagedRunner.of(loaded, kv_dtype)
    prompts = {0: PROMPT[:5], 1: PROMPT[3:12], 2: PROMPT[:1]}
    logits = [runner.step({seq: tokens}) for seq, tokens in prompts.items()]
    for i in range(steps):
        logits.append(runner.step({seq: [PROMPT[i + seq]] for seq in prompts}))  # one token per sequence
    caches = [layer.kv_cache for layer in layers]
    return torch.cat(logits), caches, loaded.backend.stack


def count_stack_calls(monkeypatch) -> list[int]:
    """The token count of every whole-step native call from now on."""
    calls: list[int] = []
    step = cpu_native.decoder_model
    monkeypatch.setattr(cpu_native, "decoder_model", lambda *a: calls.append(a[2].shape[0]) or step(*a))
    return calls


@pytest.mark.parametrize(
    "arch, scheme, kv_dtype",
    [(arch, scheme, torch.float32) for arch in ("llama", "qwen2", "qwen3") for scheme in sorted(SCHEMES)]
    + [("llama", "mixed", torch.bfloat16), ("qwen3", "dynamic", torch.bfloat16)]
    + [("llama", "mixed", torch.int8), ("qwen3", "dynamic", torch.int8)],  # int8 (C8) caches, asymmetric
)
def test_fused_layers_equal_per_op_path(tiny_model, tmp_path, monkeypatch, arch, scheme, kv_dtype):
    src = tiny_model(arch, dtype=torch.bfloat16)  # bf16 float weights: the fused layer takes them too
    kv_cache = "asym" if kv_dtype == torch.int8 else None
    dst = write_ascend(src, tmp_path / "q", SCHEMES[scheme], dtype=torch.bfloat16, shift=True, kv_cache=kv_cache)
    monkeypatch.setattr(cpu_native, "STACK_PREFILL_TOKENS", 0)  # prefills per op in every mode: decode alone
    per_op, per_op_caches, _ = decode_run(dst, "per-op", kv_dtype=kv_dtype)
    assert all(c.dtype == kv_dtype for c in per_op_caches)
    calls = count_stack_calls(monkeypatch)
    fused, fused_caches, stack = decode_run(dst, "stack", kv_dtype=kv_dtype)
    assert calls == [1, 3, 3, 3] and stack is not None  # the stack ran: the one-token prompt, every decode step
    assert torch.equal(fused, per_op)
    assert all(torch.equal(a, b) for a, b in zip(fused_caches, per_op_caches, strict=True))


@pytest.mark.parametrize(
    "arch, scheme, load_dtype, kv_dtype",
    [("qwen3_moe", "dynamic", torch.float32, torch.float32), ("qwen3_moe", "moe_mix", "auto", torch.float32)]
    + [("qwen3_moe", "moe_mix", "auto", torch.int8), ("qwen3_moe", "dynamic", "auto", torch.bfloat16)]
    + [("glm4_moe", "dynamic", torch.float32, torch.float32), ("glm4_moe", "moe_mix", "auto", torch.int8)]
    + [("glm4_moe", "moe_mix", "auto", torch.bfloat16)]
    + [("qwen2_moe", "dynamic", torch.float32, torch.float32), ("qwen2_moe", "moe_mix", "auto", torch.bfloat16)],
)
def test_moe_layers_run_in_the_stack_as_per_op(tiny_model, tmp_path, monkeypatch, arch, scheme, load_dtype, kv_dtype):
    """Qwen3-MoE (layer 0 dense, layer 1 eight routed experts, two per token; softmax router), Qwen2-MoE (the same
    with q/k/v biases and a gated shared expert) and GLM-4.5 (shared experts, the biased sigmoid router, rope on half
    of each head): the stack routes and runs the experts itself, with the per-op path's bits (its native router,
    expert call, shared experts' linears and gate). Loaded
    in fp32, the scales are fp32; in the checkpoint's dtype (bf16, as LLM loads it), the scales are bf16 and the
    activations fp32."""
    src = tiny_model(arch, dtype=torch.bfloat16)
    kv_cache = "asym" if kv_dtype == torch.int8 else None
    quant_type = moe_mix if scheme == "moe_mix" else SCHEMES[scheme]
    dst = write_ascend(src, tmp_path / "q", quant_type, dtype=torch.bfloat16, kv_cache=kv_cache)
    monkeypatch.setattr(cpu_native, "STACK_PREFILL_TOKENS", 0)  # prefills per op in every mode: decode alone
    per_op, per_op_caches, _ = decode_run(dst, "per-op", steps=5, kv_dtype=kv_dtype, dtype=load_dtype)
    calls = count_stack_calls(monkeypatch)
    fused, fused_caches, stack = decode_run(dst, "stack", steps=5, kv_dtype=kv_dtype, dtype=load_dtype)
    assert calls == [1, 3, 3, 3, 3, 3]
    assert [p.struct.moe.num_experts for p in stack.plans] == [0, 8]
    assert stack.max_batch == NATIVE_MAX_TOKENS  # above it, the per-op router's logits come from BLAS
    moe = stack.plans[1].struct.moe
    shared_inter = {"glm4_moe": 32, "qwen2_moe": 64}.get(arch, 0)
    assert (moe.shared_inter, bool(moe.bias), bool(moe.shared_gate)) == (
        shared_inter,
        arch == "glm4_moe",
        arch == "qwen2_moe",
    )
    assert stack.plans[1].struct.moe.scales_bf16 == int(load_dtype == "auto")
    assert torch.equal(fused, per_op)
    assert all(torch.equal(a, b) for a, b in zip(fused_caches, per_op_caches, strict=True))


# tiny configs' overrides: V3 (q_lora, interleaved rope), V3 with YaRN (scaled cos / sin and softmax scale), V3
# rotating halves, V2 (a softmax router limited to the best of 2 groups), V2-Lite (q_proj, a greedy softmax router)
DEEPSEEK = {
    "v3": ("deepseek_v3", {}),
    "v3-yarn": ("deepseek_v3", {"rope_parameters": YARN}),
    "v3-halves": ("deepseek_v3", {"rope_interleave": False}),
    "v2": ("deepseek_v2", {}),
    "v2-lite": ("deepseek_v2", {"q_lora_rank": None, "topk_method": "greedy", "norm_topk_prob": False}),
    "glm-4.7-flash": ("glm4_moe_lite", {}),
}


@pytest.mark.parametrize(
    "model, load_dtype, kv_dtype",
    [("v3", torch.float32, torch.float32), ("v3", "auto", torch.bfloat16), ("v3-halves", "auto", torch.float32)]
    + [("v3-yarn", "auto", torch.bfloat16)]
    + [("v2", "auto", torch.float32), ("v2-lite", torch.float32, torch.bfloat16), ("v2-lite", "auto", torch.float32)]
    + [("glm-4.7-flash", "auto", torch.bfloat16)],
)
def test_mla_layers_run_in_the_stack_as_per_op(tiny_model, tmp_path, monkeypatch, model, load_dtype, kv_dtype):
    """DeepSeek (layer 0 dense, layer 1 routed and shared experts; ModelSlim's mix, kv_b_proj float): decode steps
    run MLA in the stack, absorbed as the per-op path absorbs it (q_a norm, q_b, the latent's norm and k_pe's rope
    into the cache, the head products, attention over the latents), with its bits; prefills stay per op, which
    up-projects the latents."""
    arch, overrides = DEEPSEEK[model]
    src = tiny_model(arch, dtype=torch.bfloat16, **overrides)
    dst = write_ascend(src, tmp_path / "q", deepseek_mix, dtype=torch.bfloat16)
    per_op, per_op_caches, _ = decode_run(dst, "per-op", steps=5, kv_dtype=kv_dtype, dtype=load_dtype)
    calls = count_stack_calls(monkeypatch)
    fused, fused_caches, stack = decode_run(dst, "stack", steps=5, kv_dtype=kv_dtype, dtype=load_dtype)
    assert calls == [1, 3, 3, 3, 3, 3] and stack.decode_only  # the one-token prompt (a decode step) and the steps
    assert [p.struct.mla.q_lora_rank for p in stack.plans] == [0 if model == "v2-lite" else 48] * 2
    assert [p.struct.moe.num_experts for p in stack.plans] == [0, 8]
    assert bool(stack.plans[1].struct.moe.bias) == (arch != "deepseek_v2")
    assert (stack.plans[1].struct.moe.n_group, stack.plans[1].struct.moe.topk_group) == (
        (1, 1) if model == "v2-lite" else (2, 1)  # V2: the best 1 of 2 groups
    )
    assert per_op_caches[0].shape[-1] == 32 + 8 and per_op_caches[0].dtype == kv_dtype  # [NB, BS, R + rope]
    assert torch.equal(fused, per_op)
    assert all(torch.equal(a, b) for a, b in zip(fused_caches, per_op_caches, strict=True))


def test_mla_layers_the_stack_cannot_take_say_why(tiny_model, tmp_path):
    """A quantized kv_b_proj (decode up-projects through it) keeps the per-op path."""
    v3 = write_ascend(tiny_model("deepseek_v3"), tmp_path / "v3", kv_b_quantized)
    assert (
        "layer 0 (model.layers.0.self_attn.kv_b_proj: a quantized kv_b_proj" in load_model(str(v3)).backend.describe()
    )


def test_moe_layers_the_stack_cannot_take_say_why(tiny_model, tmp_path):
    """Float experts keep the per-op path for every layer, and the backend says which layer and why."""
    src = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    loaded = load_model(str(write_ascend(src, tmp_path / "q", lambda p: "FLOAT" if ".experts." in p else "W8A8")))
    assert loaded.backend.stack is None
    assert "layer 1 (model.layers.1.mlp.experts: float experts run per op)" in loaded.backend.describe()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_small_prefills_run_the_stack(tiny_model, tmp_path, monkeypatch, arch):
    """Prefill chunks of up to STACK_PREFILL_TOKENS tokens take the native stack, one attention row per token;
    its attention sums in another order than torch's SDPA, so the logits agree to fp32 rounding."""
    dst = write_ascend(tiny_model(arch), tmp_path / "q", SCHEMES["dynamic"])
    per_op, _, _ = decode_run(dst, "per-op")
    calls = count_stack_calls(monkeypatch)
    stacked, _, _ = decode_run(dst, "stack")
    assert calls == [5, 9, 1, 3, 3, 3]  # the three prefills (5, 9 and 1 tokens), then three decode steps of 3
    torch.testing.assert_close(stacked, per_op, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(cpu_native, "STACK_PREFILL_TOKENS", 4)
    calls.clear()
    decode_run(dst, "stack")
    assert calls == [1, 3, 3, 3]  # the 5- and 9-token prefills ran per op


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # qwen2: biases on q/k/v; qwen3: per-head norms
def test_bf16_models_decode_in_fp32_natively(tiny_model, monkeypatch, arch):
    """A bf16 float model's decode steps (and small prefills) run the native step, in fp32 over the bf16 weights:
    the same logits, bit for bit, as the model loaded in fp32 over the same bf16 cache."""
    src = tiny_model(arch, dtype=torch.bfloat16)
    calls = count_stack_calls(monkeypatch)
    as_bf16, _, stack = decode_run(src, "stack", kv_dtype=torch.bfloat16, dtype=torch.bfloat16)
    assert len(calls) == 6 and stack is not None  # 3 small prefills + 3 decode steps
    as_fp32, _, _ = decode_run(src, "stack", kv_dtype=torch.bfloat16, dtype=torch.float32)
    assert as_bf16.dtype == torch.float32 and torch.equal(as_bf16, as_fp32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_models_step_natively_below_the_work_limit(tiny_model, monkeypatch, dtype):
    """A bf16 model's steps above BF16_STEP_MAX_MACS multiply-adds run per op (its bf16 GEMMs are faster there);
    an fp32 model's always run natively."""
    loaded = load_model(str(tiny_model("llama", dtype=torch.bfloat16)), dtype=dtype)
    runner = PagedRunner.of(loaded, torch.bfloat16)
    sizes = count_stack_calls(monkeypatch)
    runner.step({0: PROMPT[:2]})
    monkeypatch.setattr(cpu_native, "BF16_STEP_MAX_MACS", 2 * loaded.backend.stack.macs_per_token)
    runner.step({1: PROMPT[:3]})
    runner.step({0: [PROMPT[2]], 1: [PROMPT[3]]})
    assert sizes == ([2, 2] if dtype == torch.bfloat16 else [2, 3, 2])


def test_fp32_float_weights_keep_the_per_op_path(tiny_model, tmp_path):
    fp32_float = write_ascend(tiny_model("llama"), tmp_path / "f32", mixed)  # random fp32: not exact bf16
    loaded = load_model(str(fp32_float))
    assert loaded.backend.stack is None  # one layer without a native form: every step runs per op, and says why
    assert (
        "layer 0 (model.layers.0.mlp.gate_up_proj: float weights that are not exactly bf16" in loaded.backend.describe()
    )
    per_op, _, _ = decode_run(fp32_float, "per-op", steps=1)
    stacked, _, _ = decode_run(fp32_float, "stack", steps=1)
    assert torch.equal(stacked, per_op)


def test_per_head_norm_equals_torch_definition(monkeypatch):
    norm = RMSNorm(16, 1e-6, torch.float32)
    norm.ops = NativeOps(native.load())
    norm.weight.data = torch.randn(16)
    qkv = torch.randn(3, 5 * 16)  # a fused projection's rows: the heads are strided views
    q = qkv[:, : 4 * 16].view(3, 4, 16)
    calls = []
    monkeypatch.setattr(
        norm.ops.lib,
        "sq_rms_norm_heads",
        lambda *a, _f=norm.ops.lib.sq_rms_norm_heads, **k: calls.append(1) or _f(*a, **k),
    )
    got = norm(q)
    assert calls  # the native kernel ran
    torch.testing.assert_close(got, TorchOps().rms_norm(q, norm.weight, None, norm.eps), rtol=1e-6, atol=1e-6)


def test_intermediate_size_off_the_int8_blocks_keeps_the_per_op_path(tmp_path):
    """The stack splits gate_up's up half at row `intermediate_size`, which must start a block of 16 int8 rows."""
    src = make_tiny_model("llama", tmp_path / "src", dtype=torch.bfloat16, intermediate_size=72)
    dst = write_ascend(src, tmp_path / "q", SCHEMES["dynamic"], dtype=torch.bfloat16)
    per_op, _, _ = decode_run(dst, "per-op")
    stacked, _, stack = decode_run(dst, "stack")
    assert stack is None
    assert torch.equal(stacked, per_op)
