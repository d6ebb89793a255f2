"""The CUDA int8 kernels (kernels/cuda_int8.py) equal docs/FORMAT.md's math, run by Triton's interpreter on the CPU
(tests/gpu runs them compiled on a GPU). Skipped where Triton is not installed (CI: it ships with CUDA torch)."""

from __future__ import annotations

import pytest
import torch

from slimquant.format import primitives as P

if torch.cuda.is_available():
    pytest.skip("tests/gpu runs these kernels compiled", allow_module_level=True)
pytest.importorskip("triton")
from slimquant.kernels import cuda_int8  # noqa: E402
from slimquant.kernels.int8_input import PER_TOKEN, InputQuant  # noqa: E402


@pytest.fixture(params=["cublas", "triton"])
def gemm(request) -> str:
    """Every linear test runs both GEMMs (KernelConfig.cuda_int8_gemm; torch._int_mm runs on the CPU too)."""
    return request.param


SHAPES = [(1, 64, 48), (5, 72, 40), (17, 128, 24), (40, 96, 200), (3, 2048, 16)]  # the last: K over one block


def _inputs(t: int, k: int, n: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(t * 1000 + k + n)
    x = (torch.randn(t, k, generator=gen) * 3).to(dtype)
    x[0, :6] = torch.tensor([0.5, 1.5, -2.5, 0.0, 127.0, -3.5])  # ties of round half to even at scale 1
    w_q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return x, w_q, gen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,n", SHAPES)
def test_dynamic_linear(t, k, n, dtype, gemm):
    x, w_q, gen = _inputs(t, k, n, dtype)
    w_s, bias = torch.rand(n, generator=gen) / 100, torch.randn(n, generator=gen).to(dtype)
    x_q, s_t = P.quantize_per_token(x)  # [T, K], [T, 1]
    expected = (P.int8_matmul_reference(x_q, w_q).float() * s_t * w_s + bias.float()).to(dtype)
    assert torch.equal(cuda_int8.dynamic_linear(x, w_q, w_s, bias, gemm), expected)
    no_bias = (P.int8_matmul_reference(x_q, w_q).float() * s_t * w_s).to(dtype)
    assert torch.equal(cuda_int8.dynamic_linear(x, w_q, w_s, None, gemm), no_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,n", SHAPES)
def test_static_linear(t, k, n, dtype, gemm):
    from slimquant.backends.torch_ops import quantize_static

    x, w_q, gen = _inputs(t, k, n, dtype)
    inv, off = torch.tensor([0.7], dtype=dtype), torch.tensor([3.0], dtype=dtype)  # in x's dtype, as at runtime
    qbias = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=gen)
    deq = torch.rand(n, generator=gen)
    acc = P.int8_matmul_reference(quantize_static(x, inv, off), w_q)
    expected = ((acc + qbias).float() * deq).to(dtype)
    assert torch.equal(cuda_int8.static_linear(x, w_q, inv, off, qbias, deq, gemm), expected)


def test_rows_with_a_stride(gemm):
    """A column slice of a wider tensor (as a fused projection's output) is read in place."""
    wide, w_q, gen = _inputs(3, 160, 32, torch.float32)
    x = wide[:, 16:80]  # [3, 64], row stride 160
    w_q, w_s = w_q[:, :64].contiguous(), torch.rand(32, generator=gen)
    x_q, s_t = P.quantize_per_token(x)
    expected = P.int8_matmul_reference(x_q, w_q).float() * s_t * w_s
    assert torch.equal(cuda_int8.dynamic_linear(x, w_q, w_s, None, gemm), expected)


@pytest.mark.parametrize("tiles", [(16, 32, 32, 1), (16, 32, 32, 3), (32, 64, 64, 2), (16, 16, 128, 8)])
@pytest.mark.parametrize("static", [False, True])
def test_triton_gemm_tiles_and_split_k(tiles, static):
    """Any tile shape and K split gives the same bits (int32 partial sums add exactly): K 520 leaves a tail in
    every split, T 19 and N 72 partial tiles."""
    t, k, n = 19, 520, 72
    x, w_q, gen = _inputs(t, k, n, torch.bfloat16)
    scale, add = torch.rand(n, generator=gen), torch.randint(-99, 99, (n,), dtype=torch.int32, generator=gen)
    if static:
        quant = InputQuant(torch.tensor([0.5], dtype=torch.bfloat16), torch.tensor([-2.0], dtype=torch.bfloat16))
    else:
        quant, add = PER_TOKEN, add.to(torch.bfloat16)
    a = cuda_int8.quantize(x, quant)
    expected = cuda_int8.int8_linear(a, w_q, scale, add, "cublas")
    got = cuda_int8.int8_linear(a, w_q, scale, add, "triton", cuda_int8.GemmTiles(*tiles))
    assert torch.equal(got, expected)


def test_gemm_tiles_split_k_only_for_few_tokens():
    """Decode shapes split K so that about `programs` programs stream the weight; prefill shapes do not."""
    decode = cuda_int8.gemm_tiles(1, 4096, 4096)  # 64 column tiles
    assert decode.block_m == 16 and decode.splits == 4
    assert cuda_int8.gemm_tiles(1, 28672, 4096).splits == 1  # 448 column tiles already
    prefill = cuda_int8.gemm_tiles(2048, 4096, 4096)
    assert prefill.block_m == 128 and prefill.splits == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_quantizes_for_its_linear(dtype, static, with_residual):
    """add_rms_norm with a quant: the int8 rows (and scales) of quantizing its own float output, bit for bit."""
    from slimquant.kernels import cuda_layers

    gen = torch.Generator().manual_seed(11)
    t, h = 6, 200
    x, res = ((torch.randn(t, h, generator=gen) * 3).to(dtype) for _ in range(2))
    w, b = (torch.rand(h, generator=gen) + 0.5).to(dtype), (torch.randn(h, generator=gen) / 9).to(dtype)
    quant = InputQuant(torch.tensor([30.0], dtype=dtype), torch.tensor([1.0], dtype=dtype)) if static else PER_TOKEN
    residual = res if with_residual else None
    y, summed = cuda_layers.add_rms_norm(x, residual, w, b, 1e-6)
    a, summed_q = cuda_layers.add_rms_norm(x, residual, w, b, 1e-6, quant)
    ref = cuda_int8.quantize(y, quant)
    assert torch.equal(summed_q, summed) and a.t == t and a.dtype == dtype
    assert torch.equal(a.q[:t], ref.q[:t]) and a.q.shape[0] >= 24  # rows for torch._int_mm
    assert (a.scale is None) == static and (static or torch.equal(a.scale, ref.scale))
    assert len(ref.q[:t].unique()) > 100  # the values spread over the int8 range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("inter", [40, 1500])  # 1500: over one block of columns
def test_silu_and_mul_quantizes_for_its_linear(dtype, static, inter):
    from slimquant.kernels import cuda_layers

    gen = torch.Generator().manual_seed(inter)
    x = (torch.randn(3, 2 * inter, generator=gen) * 4).to(dtype)
    quant = InputQuant(torch.tensor([5.0], dtype=dtype), torch.tensor([0.0], dtype=dtype)) if static else PER_TOKEN
    a, ref = cuda_layers.silu_and_mul(x, quant), cuda_int8.quantize(cuda_layers.silu_and_mul(x), quant)
    assert torch.equal(a.q[:3], ref.q[:3]) and (static or torch.equal(a.scale, ref.scale))


def _mixed(prefix: str) -> str:
    """Layer 0 static but its down_proj dynamic, layer 1 dynamic but its gate_up static (both fusions, both kinds)."""
    static = prefix.startswith("model.layers.0") != prefix.endswith(("gate_proj", "up_proj", "down_proj"))
    return "W8A8" if static else "W8A8_DYNAMIC"


@pytest.mark.parametrize("arch", ["qwen2"])  # biases: quant_bias (static) and the epilogue's bias (dynamic)
def test_int8_model_on_triton_kernels(tiny_model, tmp_path, monkeypatch, arch):
    """A bf16 int8 model (a prefill chunk, then decode steps of two sequences) on the cuda-triton ops in the
    interpreter: with the norms, SiLU-and-mul and decode attention (for a static o_proj) quantizing for their
    linears, bit for bit what the linears give quantizing themselves, with either GEMM; and close to the torch ops
    (whose float norms round otherwise)."""
    from slimquant.backends.base import Backend
    from slimquant.backends.torch_ops import TorchOps
    from slimquant.backends.triton_ops import TritonOps
    from slimquant.kernels import cuda_layers
    from slimquant.models import loader
    from tests.models.ascend_ckpt import write_ascend
    from tests.models.paged import PROMPT, PagedRunner, assert_close

    folder = write_ascend(tiny_model(arch), tmp_path / "q", _mixed, dtype=torch.bfloat16)
    monkeypatch.setattr(loader, "select_backend", lambda *a: Backend(TritonOps()))  # its weights: int8 [N, K]
    model = loader.load_model(str(folder), dtype=torch.bfloat16).model

    def logits(ops: TorchOps) -> torch.Tensor:
        Backend(ops).bind(model)
        runner = PagedRunner(model, torch.bfloat16)
        steps = [runner.step({0: PROMPT[:7], 1: PROMPT[3:5]})]
        steps += [runner.step({0: [t], 1: [t + 1]}) for t in PROMPT[7:]]
        return torch.cat(steps).float()

    expected = logits(TorchOps())
    fused_calls = []
    for name in ("add_rms_norm", "silu_and_mul"):
        kernel = getattr(cuda_layers, name)
        monkeypatch.setattr(
            cuda_layers, name, lambda *a, _k=kernel, _n=name: fused_calls.append((_n, len(a))) or _k(*a)
        )
    attention = cuda_layers.paged_decode_attention
    monkeypatch.setattr(
        cuda_layers,
        "paged_decode_attention",
        lambda *a, **kw: fused_calls.append(("attention", kw.get("quant") is not None)) or attention(*a, **kw),
    )
    fused = {gemm: logits(TritonOps(gemm)) for gemm in ("cublas", "triton")}
    runs = 2 * 2 * (1 + len(PROMPT[7:]))  # GEMMs x layers x steps
    assert fused_calls.count(("add_rms_norm", 6)) == 2 * runs  # with a quant: both norms of a layer (the first too)
    assert fused_calls.count(("silu_and_mul", 2)) == runs
    assert fused_calls.count(("attention", True)) == 2 * len(PROMPT[7:])  # decode steps: layer 0's static o_proj
    assert fused_calls.count(("attention", False)) == 2 * len(PROMPT[7:])  # layer 1's o_proj is per token

    class Unfused(TritonOps):  # the linears quantize their float input themselves
        def add_rms_norm_quant(self, x, residual, weight, bias, eps, quant):
            return TorchOps.add_rms_norm_quant(self, x, residual, weight, bias, eps, None)

        def silu_and_mul_quant(self, x, quant):
            return self.silu_and_mul(x)

        def attention(self, q, k, v, rope, kv_cache, ctx, scale, kv_quant=None, out_quant=None):
            return TritonOps.attention(self, q, k, v, rope, kv_cache, ctx, scale, kv_quant)

    unfused = logits(Unfused())
    assert torch.equal(fused["cublas"], unfused) and torch.equal(fused["triton"], unfused)
    assert_close(unfused, expected, rel=5e-2)
