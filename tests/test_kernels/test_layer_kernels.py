"""NativeOps' decode attention (rope + cache write fused), residual RMSNorm and SiLU-and-mul vs TorchOps'
definitions."""

from __future__ import annotations

import dataclasses
from unittest.mock import patch

import pytest
import torch

from slimquant.backends.native_ops import NativeOps
from slimquant.backends.torch_ops import KvQuant, TorchOps, paged_attention, store_kv
from slimquant.kernels import native
from slimquant.layers.context import ForwardContext
from slimquant.layers.norm import RMSNorm
from slimquant.layers.rotary import apply_rotary

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
kernels = NativeOps(native.load()) if native.available() else None


def decode_attention(ops, q, k, v, rope, cache, slots, tables, lens, scale):
    """ops.attention of one decode step: q [B, NH, D], k / v [B, KVH, D], cache [2, NB, BS, KVH, D]."""
    ctx = ForwardContext([1] * len(lens), list(lens), slots, tables, cache.shape[2])
    return ops.attention(q, k, v, rope, cache, ctx, scale)


def _case(nh: int, kvh: int, d: int, lens: list[int], block_size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, width = len(lens), max(8, -(-max(lens) // block_size))
    nb = max(32, b * width)
    cache = torch.randn(2, nb, block_size, kvh, d, generator=g)  # old context: random
    tables = torch.randperm(nb, generator=g)[: b * width].reshape(b, width).to(torch.int32)  # [B, W]
    slots = torch.tensor(
        [int(tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size for i, n in enumerate(lens)]
    )
    qkv = torch.randn(b, (nh + 2 * kvh) * d, generator=g)  # rows of a fused projection: strided views
    q, k, v = qkv.split([nh * d, kvh * d, kvh * d], dim=-1)
    angles = torch.rand(b, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [B, D]
    return cache, tables, slots, q.view(b, nh, d), k.view(b, kvh, d), v.view(b, kvh, d), (cos, sin)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("nh", "kvh", "d", "lens"),
    [(4, 2, 16, [1, 7, 9]), (3, 3, 12, [13]), (8, 1, 64, [5, 30]), (12, 1, 16, [300, 9])],  # 300: two row passes
)
def test_decode_attention_equals_torch_path(nh, kvh, d, lens, cache_dtype):
    cache, tables, slots, q, k, v, rope = _case(nh, kvh, d, lens)
    cache = cache.to(cache_dtype)
    v[0, 0, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("nan")])  # bf16 ties and a NaN
    ref_cache = cache.clone()
    qr, kr = apply_rotary(q, *rope), apply_rotary(k, *rope)
    store_kv(ref_cache[0], ref_cache[1], kr, v, slots)  # (bf16: rounded by torch's conversion)
    ref = paged_attention(qr[:, None], ref_cache[0], ref_cache[1], tables, lens, d**-0.5)  # [B, 1, NH, D]
    out = decode_attention(kernels, q, k, v, rope, cache, slots, tables, lens, d**-0.5)
    # rotated k and v stored as the torch path stores them: the same values, NaN where it has NaN
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out, ref.reshape(len(lens), -1), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize(("nh", "kvh", "d", "lens"), [(4, 2, 16, [1, 7, 9]), (3, 3, 12, [13]), (8, 1, 64, [5, 30])])
def test_int8_cache_decode_attention_equals_torch_path(nh, kvh, d, lens, offsets):
    """An int8 (C8) cache: k / v stored as format.primitives.quantize_kv stores them (bit for bit, ties to even),
    read back as (q - offset) * scale."""
    cache, tables, slots, q, k, v, rope = _case(nh, kvh, d, lens)
    g = torch.Generator().manual_seed(1)
    cache = torch.randint(-128, 128, cache.shape, generator=g, dtype=torch.int8)  # old context
    scale = (0.02 + 0.03 * torch.rand(2, kvh, d, generator=g)).bfloat16().float()  # model-dtype values
    offset = torch.randint(-6, 7, (2, kvh, d), generator=g).float() if offsets else torch.zeros(2, kvh, d)
    kv_quant = KvQuant(scale[0], 1 / scale[0], offset[0], scale[1], 1 / scale[1], offset[1])
    v[0, 0, :3] = torch.tensor([2.5, -0.5, 3.5]) * scale[1, 0, :3] - offset[1, 0, :3] * scale[1, 0, :3]  # ties
    v[-1, -1, :2] = torch.tensor([1e3, -1e3])  # clamped
    ref_cache = cache.clone()
    ctx = ForwardContext([1] * len(lens), list(lens), slots, tables, cache.shape[2])
    ref = TorchOps().attention(q, k, v, rope, ref_cache, ctx, d**-0.5, kv_quant)  # a length-1 row: its own v
    with patch.object(TorchOps, "attention", side_effect=AssertionError("fell back to the torch path")):
        out = kernels.attention(q, k, v, rope, cache, ctx, d**-0.5, kv_quant)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_attention_skips_padding_slots_and_runs_without_rope():
    cache, tables, slots, q, k, v, _ = _case(2, 1, 8, [3, 4])
    before = cache.clone()
    slots[1] = -1
    out = decode_attention(kernels, q, k, v, None, cache, slots, tables, [3, 4], 0.3)
    store_kv(before[0], before[1], k, v, slots)
    assert torch.equal(cache, before)
    ref = paged_attention(q[:, None], before[0], before[1], tables, [3, 4], 0.3)
    torch.testing.assert_close(out, ref.reshape(2, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_of_other_dtypes_is_the_torch_definition(dtype):
    """Activations the native kernel does not take (bf16, fp16) get TorchOps' attention, bit for bit."""
    cache, tables, slots, q, k, v, rope = _case(2, 1, 8, [3])
    q, k, v, cache = q.to(dtype), k.to(dtype), v.to(dtype), cache.to(dtype)
    rope = tuple(r.to(dtype) for r in rope)
    ref_cache = cache.clone()
    ref = decode_attention(TorchOps(), q, k, v, rope, ref_cache, slots, tables, [3], 1.0)
    out = decode_attention(kernels, q, k, v, rope, cache, slots, tables, [3], 1.0)
    assert torch.equal(out, ref) and torch.equal(cache, ref_cache)


def _mla_case(heads: int, lens: list[int], dtype: torch.dtype, block_size: int = 16, seed: int = 0):
    """q [B, NH, 80] and a paged latent cache [NB, BS, 80] (rows [latent 64 | k_pe 16]) of contexts `lens`."""
    g = torch.Generator().manual_seed(seed)
    width = -(-max(lens) // block_size)
    nb = len(lens) * width + 3
    cache = torch.randn(nb, block_size, 80, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g)[: len(lens) * width].reshape(len(lens), width).to(torch.int32)
    ctx = ForwardContext([1] * len(lens), list(lens), torch.full((len(lens),), -1), tables, block_size)
    return torch.randn(len(lens), heads, 80, generator=g), cache, ctx


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "lens"), [(1, [1, 5]), (3, [9, 17]), (19, [300, 7]), (16, [530])])
def test_mla_decode_equals_torch_path_and_each_rank_share(heads, lens, cache_dtype):
    """Absorbed MLA decode in one native call: TorchOps' numbers (the dense math) to fp32 rounding, and every
    head's numbers bit for bit those of a tensor-parallel rank holding a share of the heads (19 heads: two groups
    of eight and three; 300 and 530 cached rows: several passes of the weighted sums)."""
    q, cache, ctx = _mla_case(heads, lens, cache_dtype)
    with patch.object(TorchOps, "mla_decode", side_effect=AssertionError("fell back to the torch path")):
        out = kernels.mla_decode(q, cache, ctx, 0.1, 64)  # [B, NH, 64]
        shares = [kernels.mla_decode(q[:, s].contiguous(), cache, ctx, 0.1, 64) for s in (slice(1), slice(1, None))]
    torch.testing.assert_close(out, TorchOps().mla_decode(q, cache, ctx, 0.1, 64), rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.cat(shares, dim=1), out)


def test_mla_decode_of_other_inputs_is_the_torch_definition():
    """bf16 queries (a bf16 model) and a CUDA-graph step's context get TorchOps' MLA decode, bit for bit."""
    q, cache, ctx = _mla_case(4, [9, 3], torch.bfloat16)
    half = q.bfloat16()
    assert torch.equal(kernels.mla_decode(half, cache, ctx, 0.1, 64), TorchOps().mla_decode(half, cache, ctx, 0.1, 64))
    graph = dataclasses.replace(ctx, device_context_lens=ctx.context_lens_tensor)
    assert torch.equal(kernels.mla_decode(q, cache, graph, 0.1, 64), TorchOps().mla_decode(q, cache, graph, 0.1, 64))


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("b", "heads", "k", "n", "transposed"),
    [(1, 4, 16, 40, False), (11, 3, 20, 16, False), (2, 5, 36, 32, False)]
    + [(1, 4, 16, 40, True), (11, 3, 24, 16, True), (2, 5, 32, 36, True)],
)
def test_head_matmul_equals_torch_and_each_head_alone(b, heads, k, n, transposed, w_dtype):
    """MLA's absorbed kv_b_proj: x [B, NH, K] (a strided view, as q_nope) times each head's rows of one weight in
    place (bf16 or fp32): TorchOps' numbers to fp32 rounding, and each head's bits those of the head alone (11 rows:
    a group of eight and three; w_h's rows not a multiple of 8: K = 20, 36, or N = 36 when transposed)."""
    g = torch.Generator().manual_seed(b + heads)
    weight = torch.randn(heads * (k + n + 8), k + n, generator=g).to(w_dtype)  # [NH * rows, cols]: kv_b_proj-like
    per_head = weight.view(heads, k + n + 8, k + n)
    w = per_head[:, 8 : 8 + n, :k] if transposed else per_head[:, 8 : 8 + k, :n]  # [NH, N, K] or [NH, K, N]
    x = torch.randn(b, heads, k + 8, generator=g)[..., :k]  # [B, NH, K], rows strided
    with patch.object(TorchOps, "head_matmul", side_effect=AssertionError("fell back to the torch path")):
        out = kernels.head_matmul(x, w, transposed)  # [B, NH, N]
        alone = torch.cat([kernels.head_matmul(x[:, h : h + 1], w[h : h + 1], transposed) for h in range(heads)], 1)
    torch.testing.assert_close(out, TorchOps().head_matmul(x, w, transposed), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, alone)


def test_head_matmul_of_other_shapes_and_dtypes_is_the_torch_definition():
    """Columns of w_h not a multiple of 8 (N, or K when transposed), or bf16 activations: TorchOps' einsum, bit for
    bit."""
    x, w = torch.randn(2, 3, 16), torch.randn(3, 16, 12).bfloat16()  # N = 12
    assert torch.equal(kernels.head_matmul(x, w), TorchOps().head_matmul(x, w))
    x12 = torch.randn(2, 3, 12)  # K = 12, transposed
    assert torch.equal(kernels.head_matmul(x12, w, transposed=True), TorchOps().head_matmul(x12, w, transposed=True))
    assert torch.equal(kernels.head_matmul(x.bfloat16(), w), TorchOps().head_matmul(x.bfloat16(), w))


@pytest.mark.parametrize(("t", "nh", "kvh", "d"), [(1, 4, 2, 16), (5, 3, 1, 40), (37, 9, 3, 64), (600, 8, 2, 128)])
def test_rope_of_prefill_heads_equals_the_torch_rotation(t, nh, kvh, d):
    """q / k as views of a fused qkv projection's rows (their own row stride), cos / sin tables of any values (D
    not a multiple of 16: the lanes' tail): the bits of TorchOps' rotation (600 tokens: the threads split the rows)."""
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(t, (nh + 2 * kvh) * d, generator=g) * 4
    q, k, _ = (x.view(t, -1, d) for x in qkv.split([nh * d, kvh * d, kvh * d], dim=-1))  # [T, heads, D]
    rope = torch.rand(t, d, generator=g) * 2 - 1, torch.rand(t, d, generator=g) * 2 - 1  # [T, D] each, any values
    for x in (q, k):
        out = kernels.rotate(x, rope)
        assert out.is_contiguous() and torch.equal(out, TorchOps().rotate(x, rope))
    half = q.bfloat16(), tuple(r.bfloat16() for r in rope)  # not fp32: the torch definition
    assert torch.equal(kernels.rotate(*half), TorchOps().rotate(*half))


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("t", "h"), [(1, 8), (3, 576), (70, 1000)])
def test_add_rms_norm_equals_torch_norm(t, h, with_residual, with_bias):
    g = torch.Generator().manual_seed(t + h)
    norm = RMSNorm(h, 1e-5, torch.float32, bias=with_bias)
    norm.weight.data = torch.randn(h, generator=g)
    if with_bias:
        norm.bias.data = torch.randn(h, generator=g)
    x, res = torch.randn(t, h, generator=g) * 3, torch.randn(t, h, generator=g) if with_residual else None
    y, summed = kernels.add_rms_norm(x, res, norm.weight, norm.bias, norm.eps)
    ref_sum = x if res is None else x + res
    assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(y, TorchOps().rms_norm(ref_sum, norm.weight, norm.bias, norm.eps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("t", "inter"), [(1, 3), (5, 64), (40, 1000)])
def test_silu_and_mul_equals_torch(t, inter):
    x = torch.randn(t, 2 * inter + 7)[:, : 2 * inter] * 4  # rows with a stride of their own
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(x), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_silu_and_mul_at_the_ends_of_exp():
    """Gates where e^-g overflows (g < -88.4: silu is -0) or underflows (g > 87.3: silu is g), and between."""
    gate = torch.tensor([[-1000.0, -100.0, -88.5, -88.3, -87.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 87.2, 87.4, 100.0]])
    x = torch.cat([gate, torch.full_like(gate, 1.5)], dim=1)
    torch.testing.assert_close(kernels.silu_and_mul(x), torch.nn.functional.silu(gate) * 1.5, rtol=1e-6, atol=1e-30)
