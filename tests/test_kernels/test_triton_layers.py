"""The CUDA layer kernels (kernels/cuda_layers.py) against the layers' pure-torch forms, run by Triton's interpreter
on the CPU (tests/gpu runs them compiled on a GPU). Rotary and the KV store are exact; norms, SiLU and attention
reduce in another order, so they are compared to a few ulps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimquant.backends.torch_ops import TorchOps, paged_attention, store_kv
from slimquant.layers.norm import RMSNorm
from slimquant.layers.rotary import apply_rotary

if torch.cuda.is_available():
    pytest.skip("tests/gpu runs these kernels compiled", allow_module_level=True)
pytest.importorskip("triton")
from slimquant.kernels import cuda_layers  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ulps(dtype: torch.dtype, n: int = 2) -> dict:
    return dict(rtol=n * torch.finfo(dtype).eps, atol=n * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_add_rms_norm(dtype, with_residual, with_bias):
    gen = torch.Generator().manual_seed(3)
    t, h = 5, 96
    norm = RMSNorm(h, 1e-5, dtype, bias=with_bias)
    norm.weight.copy_(torch.rand(h, generator=gen) + 0.5)
    if with_bias:
        norm.bias.copy_(torch.randn(h, generator=gen) / 10)
    wide = (torch.randn(t, 2 * h, generator=gen) * 2).to(dtype)
    x = wide[:, :h]  # a strided view, as a split projection output
    residual = torch.randn(t, h, generator=gen).to(dtype) if with_residual else None
    y, summed = cuda_layers.add_rms_norm(x, residual, norm.weight, norm.bias, norm.eps)
    expected_sum = x + residual if with_residual else x
    assert torch.equal(summed, expected_sum)
    torch.testing.assert_close(y, TorchOps().rms_norm(expected_sum, norm.weight, norm.bias, norm.eps), **_ulps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_rms_norm_heads(dtype, with_bias):
    gen = torch.Generator().manual_seed(5)
    t, heads, d = 3, 4, 48
    norm = RMSNorm(d, 1e-6, dtype, bias=with_bias)
    norm.weight.copy_(torch.rand(d, generator=gen) + 0.5)
    if with_bias:
        norm.bias.copy_(torch.randn(d, generator=gen) / 10)
    qkv = (torch.randn(t, (heads + 4) * d, generator=gen) * 2).to(dtype)
    q = qkv[:, : heads * d].view(t, heads, d)  # a strided view, as Qwen3's q before its norm
    torch.testing.assert_close(
        cuda_layers.rms_norm_heads(q, norm.weight, norm.bias, norm.eps),
        TorchOps().rms_norm(q, norm.weight, norm.bias, norm.eps),
        **_ulps(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [40, 1500])  # 1500: columns over one program's block
def test_silu_and_mul(dtype, inter):
    gen = torch.Generator().manual_seed(inter)
    x = (torch.randn(3, 2 * inter, generator=gen) * 4).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cuda_layers.silu_and_mul(x), F.silu(gate) * up, **_ulps(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 48])
@pytest.mark.parametrize("with_rope", [True, False])
def test_rope_store_equals_rotary_then_store(dtype, d, with_rope):
    gen = torch.Generator().manual_seed(d)
    t, nh, kvh, nb, bs = 4, 6, 2, 5, 4
    qkv = torch.randn(t, (nh + 2 * kvh) * d, generator=gen).to(dtype)
    q, k, v = (part.view(t, -1, d) for part in qkv.split([nh * d, kvh * d, kvh * d], dim=-1))  # strided views
    angles = torch.rand(t, d // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    rope = (cos, sin) if with_rope else None
    slots = torch.tensor([3, -1, 17, 8])  # -1: a padding token, not stored
    caches = [torch.zeros(nb, bs, kvh, d, dtype=dtype) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    q_rot, k_rot = cuda_layers.rope_store(q, k, v, rope, *caches, slots)
    q_ref, k_ref = (apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)) if with_rope else (q, k)
    store_kv(*expected_caches, k_ref, v, slots)
    assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,kvh,d,bs", [(9, 3, 64, 16), (4, 4, 48, 8), (8, 1, 32, 16), (28, 4, 128, 16)])
def test_paged_decode_attention(dtype, nh, kvh, d, bs):
    gen = torch.Generator().manual_seed(nh + d)
    nb, lens = 12, [1, 37, 16, 0]  # 0: a padding row, all zeros
    caches = [torch.randn(nb, bs, kvh, d, generator=gen).to(dtype) for _ in range(2)]
    tables = torch.randperm(nb, generator=gen)[: 4 * 3].view(4, 3).to(torch.int32)  # [B, W]
    q = torch.randn(4, nh, d, generator=gen).to(dtype)
    scale = d**-0.5
    out = cuda_layers.paged_decode_attention(q, *caches, tables, torch.tensor(lens, dtype=torch.int32), scale)
    live = [i for i, n in enumerate(lens) if n]
    ref = paged_attention(q[live][:, None], *caches, tables[live], [lens[i] for i in live], scale)[:, 0]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else _ulps(dtype, 4)
    torch.testing.assert_close(out[live], ref, **tol)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [2, 3, 8, None])
def test_paged_decode_attention_in_splits(dtype, splits):
    """Flash-decoding: the block table's parts run as programs of their own and are combined after. The same
    attention to a few ulps; a part past a sequence's end adds nothing, and a zero-length row stays zeros."""
    gen = torch.Generator().manual_seed(11)
    b, nh, kvh, d, bs, w = 5, 8, 2, 32, 4, 8
    lens = [1, 5 * bs + 3, w * bs, 0, bs]  # within the first part only, across parts, the whole table, padding
    caches = [torch.randn(2 * w * b, bs, kvh, d, generator=gen).to(dtype) for _ in range(2)]
    tables = torch.randperm(2 * w * b, generator=gen)[: b * w].view(b, w).to(torch.int32)  # [B, W]
    q = torch.randn(b, nh, d, generator=gen).to(dtype)
    scale = d**-0.5
    out = cuda_layers.paged_decode_attention(q, *caches, tables, torch.tensor(lens, dtype=torch.int32), scale, splits)
    live = [i for i, n in enumerate(lens) if n]
    ref = paged_attention(q[live][:, None], *caches, tables[live], [lens[i] for i in live], scale)[:, 0]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else _ulps(dtype, 4)
    torch.testing.assert_close(out[live], ref, **tol)
    assert torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_decode_attention_quantizes_for_a_static_linear(dtype, splits):
    """With o_proj's static quant, in one pass and in parts: the int8 rows of quantizing its own float output, bit
    for bit (a zero-length row quantizes zeros)."""
    from slimquant.kernels import cuda_int8
    from slimquant.kernels.int8_input import InputQuant

    gen = torch.Generator().manual_seed(splits)
    b, nh, kvh, d, bs, w = 3, 8, 2, 32, 4, 6
    lens = [5, w * bs, 0]
    caches = [(torch.randn(w * b, bs, kvh, d, generator=gen) * 3).to(dtype) for _ in range(2)]
    tables = torch.randperm(w * b, generator=gen).view(b, w).to(torch.int32)  # [B, W]
    q, lens = torch.randn(b, nh, d, generator=gen).to(dtype), torch.tensor(lens, dtype=torch.int32)
    quant = InputQuant(torch.tensor([40.0], dtype=dtype), torch.tensor([3.0], dtype=dtype))
    out = cuda_layers.paged_decode_attention(q, *caches, tables, lens, d**-0.5, splits)  # [B, NH, D]
    a = cuda_layers.paged_decode_attention(q, *caches, tables, lens, d**-0.5, splits, quant=quant)
    ref = cuda_int8.quantize(out.reshape(b, -1), quant)
    assert a.t == b and a.dtype == dtype and a.scale is None and a.q.shape[1] == nh * d
    assert torch.equal(a.q[:b], ref.q[:b]) and len(ref.q[:b].unique()) > 100


def test_decode_splits_fill_the_gpu_only_where_few_programs_run():
    assert cuda_layers.decode_splits(b=1, kvh=4, w=256) == 64  # 7B, one stream at 4,096 tokens: 256 programs
    assert cuda_layers.decode_splits(b=1, kvh=4, w=8) == 2  # short: parts of 4 blocks at least
    assert cuda_layers.decode_splits(b=1, kvh=4, w=3) == 1
    assert cuda_layers.decode_splits(b=64, kvh=4, w=256) == 1  # 256 programs already


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "qwen2_moe", "glm4_moe"])
def test_model_on_triton_layers_matches_torch_path(tiny_model, monkeypatch, arch):
    """A bf16 model's logits (a prefill chunk, then decode steps of two sequences) with the CUDA path's layer
    kernels standing in for the torch ops, against the torch ops."""
    from slimquant.backends.base import Backend
    from slimquant.backends.triton_ops import TritonOps
    from slimquant.config import KernelConfig
    from slimquant.models.loader import load_model
    from tests.models.paged import PROMPT, PagedRunner, assert_close

    torch_reference = KernelConfig(backend="torch-reference")
    model = load_model(str(tiny_model(arch)), dtype=torch.bfloat16, kernels=torch_reference).model

    def logits() -> torch.Tensor:
        runner = PagedRunner(model, torch.bfloat16)
        steps = [runner.step({0: PROMPT[:7], 1: PROMPT[3:5]})]
        steps += [runner.step({0: [t], 1: [t + 1]}) for t in PROMPT[7:]]
        return torch.cat(steps).float()

    expected = logits()
    calls: dict[str, int] = {}
    names = {"add_rms_norm", "silu_and_mul", "rope_store", "paged_decode_attention"}
    names |= {"rms_norm_heads"} if arch == "qwen3" else set()
    for name in names:
        kernel = getattr(cuda_layers, name)
        monkeypatch.setattr(
            cuda_layers, name, lambda *a, _k=kernel, _n=name, **kw: calls.update({_n: 1}) or _k(*a, **kw)
        )
    Backend(TritonOps()).bind(model)  # the cuda-triton backend's ops, on the CPU in Triton's interpreter
    got = logits()
    assert set(calls) == names
    assert_close(got, expected, rel=2e-2)  # bf16: about one ulp of the largest logit (a 1.2x softmax scale: 10%)
