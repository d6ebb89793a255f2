"""Paged attention units: cache writes with padding slots, and attention against a dense reference."""

from __future__ import annotations

import torch

from slimquant.backends.torch_ops import causal_attention, paged_attention, store_kv


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
