"""The CUDA path: int8 GEMMs, quantized models, the engine and calibration on a GPU against CPU references.

Skipped where torch sees no CUDA GPU (CI has none); run on a GPU machine with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from slimquant.backends.torch_ops import TorchOps, quantize_static
from slimquant.format import primitives as P
from slimquant.kernels.int8_input import PER_TOKEN, InputQuant
from slimquant.kernels.triton_kernels import triton_module
from slimquant.models.loader import load_model
from tests.engine.reference import tokens_and_logprobs
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner, assert_close
from tests.models.reference import reference_logits, reference_model
from tests.models.test_model_deepseek_quantized import deepseek_mix
from tests.models.test_model_quantized import dynamic, mixed, static
from tests.test_kernels.moe_reference import moe_inputs, one_expert_at_a_time, rank_split_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _triton_ops():
    """The cuda-triton backend's ops (CUDA builds of torch ship Triton)."""
    from slimquant.backends.triton_ops import TritonOps

    return TritonOps()


# (tokens, K, N): decode, a few tokens, cuBLASLt's minimum of 17 rows, a batch, and K / N off the grid of 8
SHAPES = [(1, 64, 48), (5, 72, 40), (17, 128, 24), (40, 96, 200), (3, 100, 30), (2, 64, 36)]


def _int8(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@pytest.mark.parametrize("t,k,n", SHAPES)
def test_int8_gemm_is_exact(t, k, n):
    x_q, w_q = _int8(t, k, seed=t), _int8(n, k, seed=k + n)  # -128 included
    K = _triton_ops()
    packed = K.pack_weight(w_q.cuda())
    assert torch.equal(K.int8_mm(x_q.cuda(), packed).cpu(), P.int8_matmul_reference(x_q, w_q))


@pytest.mark.parametrize("t,k,n", SHAPES)
def test_dynamic_and_static_linears_match_the_math(t, k, n):
    gen = torch.Generator().manual_seed(t * k)
    x, w_q = torch.randn(t, k, generator=gen) * 3, _int8(n, k, seed=n)
    w_s, bias = torch.rand(n, generator=gen) / 100, torch.randn(n, generator=gen)
    x_q, s_t = P.quantize_per_token(x)  # [T, K], [T, 1]
    expected = P.int8_matmul_reference(x_q, w_q).float() * s_t * w_s + bias
    K = _triton_ops()
    packed = K.pack_weight(w_q.cuda())
    y = K.dynamic_linear(x.cuda(), packed, w_s.cuda(), bias.cuda(), torch.float32).cpu()
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-5)

    inv, off = torch.tensor([0.7]), torch.tensor([3.0])
    qbias, deq = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=gen), torch.rand(n, generator=gen)
    acc = P.int8_matmul_reference(quantize_static(x, inv, off), w_q)
    args = [a.cuda() for a in (x, packed, inv, off, qbias, deq)]
    y = K.static_linear(*args, torch.float32).cpu()
    torch.testing.assert_close(y, (acc + qbias).float() * deq, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 4, None])
def test_decode_attention_in_splits_matches_the_torch_path(splits):
    """Paged decode attention at Qwen2.5-7B's heads over a 64-block table, in one pass and as flash-decoding's
    parts (None: as many as decode_splits gives one stream), against TorchOps' attention; quantized for a static
    o_proj, the int8 rows of quantizing that output."""
    from slimquant.backends.torch_ops import paged_attention
    from slimquant.kernels import cuda_int8, cuda_layers

    gen = torch.Generator().manual_seed(5)
    b, nh, kvh, d, bs, w = 3, 28, 4, 128, 16, 64
    lens = [1000, 1, 0]  # 0: a padding row, all zeros
    caches = [torch.randn(b * w, bs, kvh, d, generator=gen).bfloat16() for _ in range(2)]
    tables = torch.randperm(b * w, generator=gen).view(b, w).to(torch.int32)  # [B, W]
    q = torch.randn(b, nh, d, generator=gen).bfloat16()
    args = [t.cuda() for t in (q, *caches, tables, torch.tensor(lens, dtype=torch.int32))]
    out = cuda_layers.paged_decode_attention(*args, d**-0.5, splits).cpu()
    ref = paged_attention(q[:2, None], *caches, tables[:2], lens[:2], d**-0.5)[:, 0]
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(out[:2], ref, rtol=4 * eps, atol=4 * eps)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    quant = InputQuant(torch.tensor([30.0]).bfloat16().cuda(), torch.tensor([1.0]).bfloat16().cuda())
    a = cuda_layers.paged_decode_attention(*args, d**-0.5, splits, quant=quant)  # for a static o_proj
    assert torch.equal(a.q[:b].cpu(), cuda_int8.quantize(out.cuda().reshape(b, -1), quant).q[:b].cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,n", [(1, 64, 48), (5, 72, 40), (40, 96, 200), (3, 2048, 16)])
def test_triton_linears_match_the_torch_path(t, k, n, dtype):
    """The three-kernel path (kernels/cuda_int8.py): the torch path's int8 activations and scales exactly, its
    outputs to 2 ulps (an H200 run before FMA contraction was turned off missed exactness by that much)."""
    from slimquant.kernels import cuda_int8

    assert triton_module("cuda_int8") is not None, "CUDA builds of torch ship Triton"
    K, T = _triton_ops(), TorchOps()
    gen = torch.Generator().manual_seed(t + k + n)
    x = (torch.randn(t, k, generator=gen) * 3).to(dtype).cuda()
    w_q = _int8(n, k, seed=n).cuda()
    w_s, bias = (torch.rand(n, generator=gen) / 100).cuda(), torch.randn(n, generator=gen).to(dtype).cuda()
    ulps = dict(rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)
    a = cuda_int8.quantize(x, PER_TOKEN)
    x_q, s_t = P.quantize_per_token(x)
    assert torch.equal(a.q[:t], x_q) and torch.equal(a.scale, s_t[:, 0])
    assert torch.equal(s_t.cpu(), P.quantize_per_token(x.cpu())[1]), "the GPU's scales are the CPU's"
    torch_path = T.dynamic_linear(x, w_q, w_s, bias, dtype)
    torch.testing.assert_close(K.dynamic_linear(x, w_q, w_s, bias, dtype), torch_path, **ulps)

    inv, off = torch.tensor([0.7], dtype=dtype).cuda(), torch.tensor([3.0], dtype=dtype).cuda()
    assert torch.equal(cuda_int8.quantize(x, InputQuant(inv, off)).q[:t], quantize_static(x, inv, off))
    qbias = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=gen).cuda()
    deq = torch.rand(n, generator=gen).cuda()
    torch_path = T.static_linear(x, w_q, inv, off, qbias, deq, dtype)
    torch.testing.assert_close(K.static_linear(x, w_q, inv, off, qbias, deq, dtype), torch_path, **ulps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,n", [(1, 576, 960), (5, 72, 40), (40, 96, 200), (300, 1536, 576), (2, 4096, 4096)])
def test_triton_gemm_equals_cublas(t, k, n, dtype):
    """KernelConfig.cuda_int8_gemm "triton" (its decode tiles split K): cuBLASLt's outputs, bit for bit, and the
    norm's and SiLU-and-mul's own quantization the linear's."""
    from slimquant.kernels import cuda_int8, cuda_layers

    gen = torch.Generator().manual_seed(t + k + n)
    x = (torch.randn(t, k, generator=gen) * 3).to(dtype).cuda()
    w_q, w_s = _int8(n, k, seed=n).cuda(), (torch.rand(n, generator=gen) / 100).cuda()
    bias = torch.randn(n, generator=gen).to(dtype).cuda()
    static = InputQuant(torch.tensor([0.7], dtype=dtype).cuda(), torch.tensor([3.0], dtype=dtype).cuda())
    qbias = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=gen).cuda()
    deq = torch.rand(n, generator=gen).cuda()
    for quant, scale, add in ((PER_TOKEN, w_s, bias), (PER_TOKEN, w_s, None), (static, deq, qbias)):
        a = cuda_int8.quantize(x, quant)
        ref = cuda_int8.int8_linear(a, w_q, scale, add, "cublas")
        assert torch.equal(cuda_int8.int8_linear(a, w_q, scale, add, "triton"), ref)
    weight = (torch.rand(k, generator=gen) + 0.5).to(dtype).cuda()
    for quant in (PER_TOKEN, static):
        a, _ = cuda_layers.add_rms_norm(x, x, weight, None, 1e-6, quant)
        y, _ = cuda_layers.add_rms_norm(x, x, weight, None, 1e-6)
        assert torch.equal(a.q[:t], cuda_int8.quantize(y, quant).q[:t])
        g = torch.cat([x, x.flip(0)], dim=1)  # [T, 2K]
        a = cuda_layers.silu_and_mul(g, quant)
        assert torch.equal(a.q[:t], cuda_int8.quantize(cuda_layers.silu_and_mul(g), quant).q[:t])


def _logits_on_cuda(ascend_dir) -> torch.Tensor:
    """Our logits for PROMPT on the GPU: a prefill chunk, then decode steps."""
    loaded = load_model(str(ascend_dir), dtype=torch.float32, device="cuda")
    runner = PagedRunner.of(loaded, torch.float32, device="cuda")
    return torch.cat([runner.step({0: PROMPT[:7]}), *[runner.step({0: [t]}) for t in PROMPT[7:]]])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("scheme", [static, dynamic, mixed])
def test_quantized_model_matches_reference(tiny_model, tmp_path, arch, scheme):
    src = tiny_model(arch)
    dst = write_ascend(src, tmp_path / "q", scheme)
    assert_close(_logits_on_cuda(dst), reference_logits(reference_model(src, dst, torch.float32), PROMPT), rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "t,e,top_k,h,inter", [(1, 64, 6, 256, 64), (5, 8, 2, 72, 40), (40, 8, 2, 96, 24), (300, 16, 4, 512, 128)]
)
def test_grouped_moe_equals_one_expert_at_a_time(t, e, top_k, h, inter, dtype):
    """kernels/cuda_moe.py compiled: decode (few rows per expert) and prefill tiles, shapes off every tile."""
    from slimquant.kernels import cuda_moe

    inputs = [v.cuda() for v in moe_inputs(t, e, top_k, h, inter, dtype, seed=t + e)]
    assert torch.equal(cuda_moe.routed_experts(*inputs), one_expert_at_a_time(*inputs))


def test_grouped_moe_split_over_ranks_equals_the_whole_layer():
    """Tensor parallel without expert parallel, compiled: two ranks on one GPU (gloo between them), each with half
    of every expert's intermediate size, give the whole layer's values bit for bit (bf16 only: each dtype compiles
    the kernels again, and gpu_check.sh gives the tests 240 s)."""
    from slimquant.distributed.launch import run_ranks

    for rank, same in enumerate(run_ranks(rank_split_experts, 2, "cuda", (torch.bfloat16,))):
        assert same and all(same), f"rank {rank}: {same}"


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, 2e-5)])
@pytest.mark.parametrize("b,nh,lens", [(1, 16, [700]), (4, 128, [1, 33, 300, 2000]), (2, 8, [17, 5])])
def test_mla_decode_kernel_matches_gather_and_sdpa(b, nh, lens, dtype, tol):
    """kernels/cuda_mla.py compiled at DeepSeek's latent sizes (512 + 64), one pass and in splits."""
    from slimquant.kernels import cuda_mla
    from slimquant.layers.context import ForwardContext

    gen = torch.Generator().manual_seed(b * nh)
    width = max(-(-n // 16) for n in lens)
    tables = torch.randperm(b * width, generator=gen).view(b, width).int().cuda()
    cache = torch.randn(b * width, 16, 576, generator=gen).to(dtype).cuda()
    q = torch.randn(b, nh, 576, generator=gen).to(dtype).cuda()
    ctx = ForwardContext([1] * b, list(lens), torch.zeros(b, dtype=torch.int64), tables, 16)
    want = TorchOps().mla_decode(q, cache, ctx, 576**-0.5, 512).float()
    for splits in (1, None):
        got = cuda_mla.mla_decode(q, cache, tables, ctx.lens_on_device, 576**-0.5, 512, splits).float()
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "arch,overrides", [("deepseek_v3", {}), ("deepseek_v2", {"norm_topk_prob": False}), ("glm4_moe_lite", {})]
)
def test_deepseek_mla_moe_matches_reference(tiny_model, tmp_path, arch, overrides):
    src = tiny_model(arch, **overrides)
    dst = write_ascend(src, tmp_path / "q", deepseek_mix)
    assert_close(_logits_on_cuda(dst), reference_logits(reference_model(src, dst, torch.float32), PROMPT), rel=1e-3)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "glm4_moe"])
def test_llama_shaped_moe_matches_reference(tiny_model, tmp_path, arch):
    """Qwen3-MoE's int8 experts (no shared experts), Qwen2-MoE's (a gated shared expert) and GLM-4.5's (shared
    experts, sigmoid router, rope on half of each head) in the grouped kernels, attention static."""
    from tests.models.test_model_qwen3_moe import moe_mix

    src = tiny_model(arch)
    dst = write_ascend(src, tmp_path / "q", moe_mix)
    assert_close(_logits_on_cuda(dst), reference_logits(reference_model(src, dst, torch.float32), PROMPT), rel=1e-3)


@pytest.fixture(scope="module")
def quantized_llama(tiny_model, tmp_path_factory):
    """A tiny llama quantized W8A8_DYNAMIC by slimquant's own quantizer (on the CPU)."""
    from slimquant import quantize

    dst = tmp_path_factory.mktemp("cuda") / "w8a8-dynamic"
    quantize(tiny_model("llama"), dst, "w8a8_dynamic", num_samples=4, seq_len=32, progress=False)
    return dst


def test_engine_on_cuda_agrees_with_cpu(quantized_llama):
    """Greedy continuations scored on both devices: the same logprobs; batched streams equal single runs."""
    from slimquant import LLM, SamplingParams

    prompts = [[5, 17, 300, 42], [7, 99], [250, 3, 11, 60, 128], [77]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cpu = LLM(str(quantized_llama), max_model_len=64, dtype="float32")
    gpu = LLM(str(quantized_llama), max_model_len=64, dtype="float32", device="cuda")
    ref = [o.outputs[0].token_ids for o in cpu.generate(prompts, greedy, use_tqdm=False)]
    batched = [o.outputs[0].token_ids for o in gpu.generate(prompts, greedy, use_tqdm=False)]
    single = [gpu.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert batched == single

    score = SamplingParams(max_tokens=1, prompt_logprobs=0)
    full = [p + list(r) for p, r in zip(prompts, ref, strict=True)]
    for a, b in zip(cpu.generate(full, score, use_tqdm=False), gpu.generate(full, score, use_tqdm=False), strict=True):
        lp_cpu = [next(iter(d.values())).logprob for d in a.prompt_logprobs[1:]]
        lp_gpu = [next(iter(d.values())).logprob for d in b.prompt_logprobs[1:]]
        torch.testing.assert_close(torch.tensor(lp_gpu), torch.tensor(lp_cpu), rtol=0, atol=2e-3)


def _greedy_with_logprobs(path, dtype: str, eager: bool) -> tuple[list, object]:
    from slimquant import LLM, SamplingParams

    llm = LLM(str(path), max_model_len=64, dtype=dtype, device="cuda", enforce_eager=eager)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    outs = llm.generate([[5, 17, 300, 42], [7, 99], [250, 3, 11, 60, 128]], params, use_tqdm=False)
    return tokens_and_logprobs(outs), llm.llm_engine.runner.backend.graphs


def test_cuda_graph_decode_matches_eager(quantized_llama):
    """Decode by graph replay (the default on CUDA) gives the eager steps' tokens; 3 sequences pad to a bucket of 4."""
    eager, none = _greedy_with_logprobs(quantized_llama, "float32", eager=True)
    graphed, graphs = _greedy_with_logprobs(quantized_llama, "float32", eager=False)
    assert none is None and list(graphs.graphs) == [(4, 4)]
    assert all(isinstance(g, torch.cuda.CUDAGraph) for g in graphs.graphs.values())
    for (tokens_e, lp_e), (tokens_g, lp_g) in zip(eager, graphed, strict=True):
        assert tokens_g == tokens_e
        torch.testing.assert_close(torch.tensor(lp_g), torch.tensor(lp_e), rtol=0, atol=1e-3)


def test_deepseek_cuda_graph_decode_matches_eager(tiny_model, tmp_path):
    """DeepSeek-V3 with int8 experts (grouped) and MLA over the table width: graph replays give eager's tokens."""
    dst = write_ascend(tiny_model("deepseek_v3"), tmp_path / "q", deepseek_mix)
    eager, none = _greedy_with_logprobs(dst, "float32", eager=True)
    graphed, graphs = _greedy_with_logprobs(dst, "float32", eager=False)
    assert none is None and all(isinstance(g, torch.cuda.CUDAGraph) for g in graphs.graphs.values())
    assert graphs.graphs, "no graph was captured (a host sync in the forward makes capture fail: see the log)"
    for (tokens_e, lp_e), (tokens_g, lp_g) in zip(eager, graphed, strict=True):
        assert tokens_g == tokens_e
        torch.testing.assert_close(torch.tensor(lp_g), torch.tensor(lp_e), rtol=0, atol=1e-3)


def test_cuda_graph_decode_in_bf16(quantized_llama):
    """The default dtype on CUDA: same first tokens as eager (later ones may part at bf16 near-ties)."""
    eager, _ = _greedy_with_logprobs(quantized_llama, "bfloat16", eager=True)
    graphed, graphs = _greedy_with_logprobs(quantized_llama, "bfloat16", eager=False)
    assert graphs.graphs and [t[:1] for t, _ in graphed] == [t[:1] for t, _ in eager]
    assert all(len(t) == 10 for t, _ in graphed)


def test_seeded_sampling_on_cuda_is_reproducible(quantized_llama):
    from slimquant import LLM, SamplingParams

    llm = LLM(str(quantized_llama), max_model_len=64, device="cuda")
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=12, seed=7, ignore_eos=True)
    runs = [llm.generate([[5, 17, 300]], params, use_tqdm=False)[0].outputs[0].token_ids for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 12


def test_top_k_top_p_candidates_on_cuda_keep_the_sorting_masks_tokens():
    from slimquant.layers.sampler import apply_top_k_top_p, top_k_top_p_candidates

    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [[0.5], [1.0], [2.0], [0.3]]
    )
    top_k, top_p = torch.tensor([0, 40, 0, 0]), torch.tensor([0.9, 1.0, 0.5, 0.999])
    want = apply_top_k_top_p(logits, top_k, top_p) > float("-inf")
    ids, kept = top_k_top_p_candidates(logits.cuda(), top_k.cuda(), top_p.cuda(), width=16)
    got = torch.zeros_like(want).scatter_(1, ids.cpu(), (kept > float("-inf")).cpu())
    assert torch.equal(got, want)


def test_calibration_on_cuda_matches_cpu(tiny_model, tmp_path):
    """quantize(device="cuda") writes the checkpoint the CPU writes, up to float rounding in the statistics."""
    from slimquant import quantize
    from slimquant.format.safetensors_io import SafetensorsFolder

    src = tiny_model("qwen2")
    kw = dict(num_samples=4, seq_len=32, progress=False)
    a = SafetensorsFolder(quantize(src, tmp_path / "cpu", "w8a8", device="cpu", **kw).output)
    b = SafetensorsFolder(quantize(src, tmp_path / "gpu", "w8a8", device="cuda", **kw).output)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        x, y = a.get(name), b.get(name)
        if name.endswith("deq_scale"):
            x, y = P.decode_deq_scale(x), P.decode_deq_scale(y)
        if x.dtype == torch.int8:
            assert (x != y).float().mean() < 1e-3, name  # a rare rounding tie may land the other way
        elif x.dtype == torch.int32:  # quant_bias: rounded from float statistics
            assert ((x - y).abs() <= 1 + x.abs() // 1000).all(), name
        else:
            torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-6, msg=name)
