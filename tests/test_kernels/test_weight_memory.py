"""Weights carved out of huge-page chunks: right shape and dtype, aligned, never overlapping, kept alive."""

from __future__ import annotations

import gc

import torch

from slimquant.kernels import weight_memory


def test_slices_are_aligned_disjoint_and_outlive_their_chunk():
    shapes = [((7, 33), torch.int8), ((5, 8), torch.bfloat16), ((3,), torch.float32), ((1000, 1000), torch.int8)]
    tensors = [weight_memory.empty(shape, dtype) for shape, dtype in shapes]
    for t, (shape, dtype) in zip(tensors, shapes, strict=True):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.data_ptr() % 64 == 0
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))  # no shared byte
    for i, t in enumerate(tensors):
        t.fill_(i + 1)
    weight_memory._ARENA.chunk = None  # the arena lets go of its chunk: the views keep it alive
    gc.collect()
    assert all(bool((t == i + 1).all()) for i, t in enumerate(tensors))


def test_a_tensor_larger_than_a_chunk_gets_its_own():
    big = weight_memory.empty((weight_memory.CHUNK + 5,), torch.int8)
    assert big.numel() == weight_memory.CHUNK + 5 and big.data_ptr() % 64 == 0
