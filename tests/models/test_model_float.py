"""Float path: our llama / qwen2 / qwen3 / qwen2_moe / qwen3_moe / glm4_moe code equals transformers' logits through
the paged KV cache."""

from __future__ import annotations

import pytest
import torch

from slimquant.models.loader import load_model
from tests.models.paged import PROMPT, PagedRunner, assert_close, hf_logits

ARCHS = ["llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "glm4_moe"]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(tiny_model, arch):
    folder = tiny_model(arch)
    loaded = load_model(str(folder))
    assert not loaded.quantized and loaded.dtype == torch.float32
    logits = PagedRunner.of(loaded).step({0: PROMPT})
    assert_close(logits, hf_logits(folder, PROMPT))


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_then_decode(tiny_model, arch):
    folder = tiny_model(arch)
    runner = PagedRunner.of(load_model(str(folder)), torch.float32)
    first = runner.step({0: PROMPT[:6]})
    rest = [runner.step({0: [t]}) for t in PROMPT[6:]]
    assert_close(torch.cat([first, *rest]), hf_logits(folder, PROMPT))


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_two_sequences(tiny_model, arch):
    folder = tiny_model(arch)
    runner = PagedRunner.of(load_model(str(folder)), torch.float32)
    a, b = PROMPT, PROMPT[3:9]
    logits = runner.step({0: a[:-2], 1: b[:-2]})  # mixed-length prefill in one step
    decode1 = runner.step({0: [a[-2]], 1: [b[-2]]})  # batched decode
    decode2 = runner.step({0: [a[-1]], 1: [b[-1]]})
    ours_a = torch.cat([logits[: len(a) - 2], decode1[:1], decode2[:1]])
    ours_b = torch.cat([logits[len(a) - 2 :], decode1[1:], decode2[1:]])
    assert_close(ours_a, hf_logits(folder, a))
    assert_close(ours_b, hf_logits(folder, b))
