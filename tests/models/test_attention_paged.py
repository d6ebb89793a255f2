"""Paged attention units: cache writes with padding slots, and attention against a dense reference."""

from __future__ import annotations

import pytest
import torch

from slimquant.backends.torch_ops import TorchOps, causal_attention, paged_attention, store_kv
from slimquant.layers.context import ForwardContext


def test_store_kv_skips_padding_slots():
    k_cache, v_cache = torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4)  # [NB, BS, KVH, D]
    k, v = torch.ones(3, 1, 4), 2 * torch.ones(3, 1, 4)
    store_kv(k_cache, v_cache, k, v, torch.tensor([5, -1, 0]))
    assert k_cache.flatten(0, 1)[[0, 5]].eq(1).all() and k_cache.flatten(0, 1)[1:5].eq(0).all()
    assert v_cache.flatten(0, 1)[[0, 5]].eq(2).all()


def dense_attention(q, k, v, scale):
    """q [Q, H, D] as the last Q positions over k/v [S, KVH, D], causal, GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # [S, H, D]
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    q_pos = torch.arange(k.shape[0] - q.shape[0], k.shape[0])[:, None]
    scores = scores.masked_fill(torch.arange(k.shape[0])[None] > q_pos, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)


def test_paged_attention_equals_dense_reference():
    torch.manual_seed(0)
    block_size, heads, kv_heads, d = 4, 4, 2, 8
    k_cache, v_cache = torch.randn(2, 12, block_size, kv_heads, d).unbind(0)
    tables = torch.tensor([[7, 2, 9, -1], [3, 11, 0, 5]], dtype=torch.int32)
    context_lens = [10, 15]  # neither a multiple of the block size
    for q_len in (1, 3):
        q = torch.randn(2, q_len, heads, d)
        out = paged_attention(q, k_cache, v_cache, tables, context_lens, d**-0.5)  # batched, contexts padded
        for i, n in enumerate(context_lens):
            slots = torch.tensor([int(tables[i, p // block_size]) * block_size + p % block_size for p in range(n)])
            k, v = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
            one = paged_attention(q[i : i + 1], k_cache, v_cache, tables[i : i + 1], [n], d**-0.5)[0]
            expected = dense_attention(q[i], k, v, d**-0.5)
            assert torch.allclose(one, expected, atol=1e-5) and torch.allclose(out[i], expected, atol=1e-5)


def test_causal_attention_of_a_fresh_chunk_equals_dense_reference():
    """A first prefill chunk attends to its own k / v (no gather from the cache)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(13, 6, 8), torch.randn(13, 2, 8), torch.randn(13, 2, 8)  # [Q, H | KVH, D]
    out = causal_attention(q[None], k[None], v[None], 8**-0.5)[0]
    torch.testing.assert_close(out, dense_attention(q, k, v, 8**-0.5), rtol=1e-5, atol=1e-5)


def test_paged_attention_with_device_lengths_masks_the_rest_of_the_table():
    """CUDA-graph steps pass lengths as a tensor: attention spans the whole table, masked past each length."""
    torch.manual_seed(2)
    k_cache, v_cache = torch.randn(2, 12, 4, 2, 8).unbind(0)
    tables = torch.tensor([[7, 2, 9, 1], [3, 11, 0, 5]], dtype=torch.int32)
    q = torch.randn(2, 1, 4, 8)
    by_list = paged_attention(q, k_cache, v_cache, tables, [10, 15], 8**-0.5)
    by_tensor = paged_attention(q, k_cache, v_cache, tables, torch.tensor([10, 15], dtype=torch.int32), 8**-0.5)
    torch.testing.assert_close(by_tensor, by_list, rtol=1e-6, atol=1e-6)


def _prefill_context(q_lens: list[int], context_lens: list[int], block_size: int = 4) -> ForwardContext:
    """Prefill chunks of sequence i over blocks 8i.. (a chunk's tokens are the last q_len of its context)."""
    pairs = enumerate(zip(q_lens, context_lens, strict=True))
    slots = [8 * i * block_size + p for i, (q, n) in pairs for p in range(n - q, n)]
    tables = torch.arange(8 * len(q_lens), dtype=torch.int32).reshape(len(q_lens), 8)
    return ForwardContext(q_lens, context_lens, torch.tensor(slots), tables, block_size)


@pytest.mark.parametrize("bf16", [False, True])
def test_prefill_attends_in_bf16_over_a_bf16_cache_where_set(bf16):
    """fp32 activations over a bf16 cache: with bf16_prefill_attention, both a fresh chunk (its own k / v) and a
    chunk after cached tokens attend in bf16 (outputs bf16 values, near the math of the bf16-rounded q / k / v);
    without it, the fp32 path's exact numbers."""
    torch.manual_seed(3)
    ops = TorchOps()
    ops.bf16_prefill_attention = bf16
    cache = torch.randn(2, 16, 4, 2, 8).bfloat16()  # [2, NB, BS, KVH, D]: sequence 1's first 6 tokens cached
    q, k, v = torch.randn(13, 6, 8), torch.randn(13, 2, 8), torch.randn(13, 2, 8)  # chunks of 7 and 6 tokens
    ctx = _prefill_context([7, 6], [7, 12])
    out = ops.attention(q, k, v, None, cache, ctx, 8**-0.5).view(13, 6, 8)
    fp32_ops = TorchOps()
    expected = fp32_ops.attention(q, k, v, None, cache.clone(), ctx, 8**-0.5).view(13, 6, 8)
    if not bf16:
        assert torch.equal(out, expected)
        return
    assert out.dtype == torch.float32 and torch.equal(out.bfloat16().float(), out)  # computed in bf16
    assert not torch.equal(out, expected)
    cached = cache[:, 8:11].flatten(1, 2)[:, :12].float()  # [2, 12, KVH, D]: sequence 1's context as the cache holds it
    own = [t[:7].bfloat16().float() for t in (q, k, v)]
    rounded = dense_attention(*own, 8**-0.5), dense_attention(q[7:].bfloat16().float(), *cached, 8**-0.5)
    torch.testing.assert_close(out, torch.cat(rounded), rtol=0, atol=2e-2)


def test_prefill_attention_dtype():
    ops, fp32, bf16 = TorchOps(), torch.float32, torch.bfloat16
    assert ops.prefill_attention_dtype(fp32, bf16) == fp32  # not set: the activations'
    ops.bf16_prefill_attention = True
    assert ops.prefill_attention_dtype(fp32, bf16) == bf16
    for activations, cache in [(fp32, fp32), (fp32, torch.int8), (fp32, torch.float16), (bf16, bf16)]:
        assert ops.prefill_attention_dtype(activations, cache) == activations


def _mla_prefill(cache_dtype: torch.dtype, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """MLA prefill of two chunks (7 fresh tokens; 6 after 6 cached) -> (output [13, NH, V], q [13, NH, Dqk], each
    sequence's (k, v) up-projected in fp32 from its context as the cache holds it after the step); kv_b_proj is a
    float Linear held in bf16, as a bf16 checkpoint's."""
    from slimquant.layers.context import forward_context
    from slimquant.layers.linear import Linear
    from slimquant.layers.mla import MLAttention
    from slimquant.layers.quant_config import QuantConfig

    torch.manual_seed(4)
    heads, nope, rope, v_dim, rank = 4, 8, 4, 6, 16
    layer = MLAttention(heads, nope, rope, v_dim, rank, scale=0.3)
    layer.ops = TorchOps()
    layer.ops.bf16_prefill_attention = bf16
    layer.kv_cache = torch.randn(16, 4, rank + rope).to(cache_dtype)  # [NB, BS, R + rope]
    kv_b_proj = Linear(rank, [heads * (nope + v_dim)], bias=False, quant_config=QuantConfig(), prefix="kv_b_proj",
                       dtype=torch.bfloat16)  # fmt: skip
    kv_b_proj.weight.data.copy_(torch.randn(heads * (nope + v_dim), rank) / rank**0.5)
    q, latent, k_pe = torch.randn(13, heads, nope + rope), torch.randn(13, rank), torch.randn(13, rope)
    ctx = _prefill_context([7, 6], [7, 12])
    with torch.no_grad(), forward_context(ctx):
        out = layer(q, latent, k_pe, kv_b_proj).view(13, heads, v_dim)
    contexts = [layer.kv_cache[8 * i : 8 * i + 3].flatten(0, 1)[:n].float() for i, n in enumerate([7, 12])]
    return out, q, [_mla_dense(c, kv_b_proj, heads, nope, rank) for c in contexts]


def _mla_dense(context: torch.Tensor, kv_b_proj, heads: int, nope: int, rank: int):
    """A context [S, R + rope] up-projected in fp32 -> (k [S, NH, nope + rope], v [S, NH, V])."""
    kv = (context[:, :rank] @ kv_b_proj.weight.float().T).view(context.shape[0], heads, -1)  # [S, NH, nope + V]
    k_pe = context[:, None, rank:].expand(-1, heads, -1)  # [S, NH, rope]
    return torch.cat([kv[..., :nope], k_pe], dim=-1), kv[..., nope:]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_mla_prefill_equals_dense_reference(cache_dtype):
    """A fresh chunk (causal, no mask) and a chunk after cached tokens (masked), q / k's head dim (12) above v's
    (6): the fused kernel's padded v gives the dense math of the context as the cache holds it."""
    out, q, contexts = _mla_prefill(cache_dtype, bf16=False)
    expected = [dense_attention(q[:7], *contexts[0], 0.3), dense_attention(q[7:], *contexts[1], 0.3)]
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_mla_prefill_attends_in_bf16_over_a_bf16_cache_where_set():
    """As standard attention: with bf16_prefill_attention, fp32 activations over a bf16 latent cache attend in bf16
    (q and the up-projected k / v rounded; the up-projection of the bf16 latents by the bf16 weight runs in bf16),
    near the dense math of those rounded values."""
    out, q, contexts = _mla_prefill(torch.bfloat16, bf16=True)
    assert out.dtype == torch.float32 and torch.equal(out.bfloat16().float(), out)  # computed in bf16
    assert not torch.equal(out, _mla_prefill(torch.bfloat16, bf16=False)[0])
    spans = [slice(7), slice(7, 13)]
    rounded = [[t.bfloat16().float() for t in (q[span], *kv)] for span, kv in zip(spans, contexts, strict=True)]
    expected = torch.cat([dense_attention(*r, 0.3) for r in rounded])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-2)


def test_mla_up_projects_in_bf16_only_a_bf16_float_weight_for_bf16_attention():
    from slimquant.layers.linear import Linear
    from slimquant.layers.mla import bf16_up_projection
    from slimquant.layers.quant_config import QuantConfig

    def kv_b(dtype: torch.dtype, bias: bool = False) -> Linear:
        return Linear(8, [16], bias=bias, quant_config=QuantConfig(), prefix="kv_b_proj", dtype=dtype)

    assert bf16_up_projection(kv_b(torch.bfloat16), torch.bfloat16)
    assert not bf16_up_projection(kv_b(torch.bfloat16), torch.float32)  # fp32 attention: fp32 products
    assert not bf16_up_projection(kv_b(torch.float32), torch.bfloat16)  # an fp32 weight would be rounded
    assert not bf16_up_projection(kv_b(torch.bfloat16, bias=True), torch.bfloat16)


def test_mla_decode_equals_dense_math_and_each_head_alone():
    """Absorbed MLA decode of two sequences (21 and 9 cached tokens) over a latent cache: the dense math, and each
    head's numbers bit for bit those of the head computed alone (as a tensor-parallel rank holding fewer heads
    computes it)."""
    torch.manual_seed(5)
    rank, rope, heads = 64, 16, 8
    cache = torch.randn(16, 4, rank + rope)  # [NB, BS, R + P]
    tables = torch.tensor([[3, 9, 1, 12, 6, 0], [7, 2, 14, -1, -1, -1]], dtype=torch.int32)
    ctx = ForwardContext([1, 1], [21, 9], torch.tensor([-1, -1]), tables, 4)
    q = torch.randn(2, heads, rank + rope)
    out = TorchOps().mla_decode(q, cache, ctx, 0.1, rank)  # [B, NH, R]
    for b, n in enumerate([21, 9]):
        rows = cache[tables[b, : -(-n // 4)].long()].flatten(0, 1)[:n]  # [S, R + P]
        expected = ((q[b] @ rows.T) * 0.1).softmax(-1) @ rows[:, :rank]  # [NH, R]
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-5)
    alone = torch.cat([TorchOps().mla_decode(q[:, h : h + 1], cache, ctx, 0.1, rank) for h in range(heads)], dim=1)
    assert torch.equal(out, alone)
