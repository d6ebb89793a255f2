"""Paged attention units: cache writes with padding slots, and attention against a dense reference."""

from __future__ import annotations

import torch

from slimquant.layers.attention import paged_attention, store_kv


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
