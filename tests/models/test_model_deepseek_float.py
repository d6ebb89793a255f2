"""Float path: DeepSeek V2/V3 (MLA over a latent cache, grouped top-k MoE) equal transformers' logits."""

from __future__ import annotations

import pytest
import torch

from slimquant.layers.mla import MLAttention
from slimquant.models.loader import load_model
from tests.models.paged import PROMPT, PagedRunner, assert_close, hf_logits

# transformers' V2 router ignores norm_topk_prob (DeepSeek's own code and vLLM honour it): compare without it
ARCHS = {"deepseek_v3": {}, "deepseek_v2": {"norm_topk_prob": False}, "glm4_moe_lite": {}}


def folder_of(tiny_model, arch):
    return tiny_model(arch, **ARCHS[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_matches_transformers(tiny_model, arch):
    folder = folder_of(tiny_model, arch)
    loaded = load_model(str(folder))
    logits = PagedRunner.of(loaded).step({0: PROMPT})
    assert_close(logits, hf_logits(folder, PROMPT))


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_then_decode_through_latent_cache(tiny_model, arch):
    folder = folder_of(tiny_model, arch)
    model = load_model(str(folder)).model
    runner = PagedRunner(model, torch.float32)
    attn = next(m for m in model.modules() if isinstance(m, MLAttention))
    assert attn.kv_cache.shape == (64, 4, 32 + 8)  # kv_lora_rank + qk_rope_head_dim per token
    first = runner.step({0: PROMPT[:6]})
    rest = [runner.step({0: [t]}) for t in PROMPT[6:]]
    assert_close(torch.cat([first, *rest]), hf_logits(folder, PROMPT))


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_two_sequences(tiny_model, arch):
    folder = folder_of(tiny_model, arch)
    runner = PagedRunner.of(load_model(str(folder)), torch.float32)
    a, b = PROMPT, PROMPT[3:9]
    logits = runner.step({0: a[:-2], 1: b[:-2]})
    decode1 = runner.step({0: [a[-2]], 1: [b[-2]]})
    decode2 = runner.step({0: [a[-1]], 1: [b[-1]]})
    assert_close(torch.cat([logits[: len(a) - 2], decode1[:1], decode2[:1]]), hf_logits(folder, a))
    assert_close(torch.cat([logits[len(a) - 2 :], decode1[1:], decode2[1:]]), hf_logits(folder, b))


def test_absorbed_decode_equals_up_projected_decode(tiny_model, monkeypatch):
    """Decode folds a float kv_b_proj into q / the output; the plain up-projection gives the same logits."""
    import slimquant.layers.mla as mla

    folder = tiny_model("deepseek_v3")

    def decode_logits() -> torch.Tensor:
        runner = PagedRunner.of(load_model(str(folder)), torch.float32)
        runner.step({0: PROMPT[:6], 1: PROMPT[2:5]})
        return torch.cat([runner.step({0: [t], 1: [t]}) for t in PROMPT[6:]])

    absorbed = decode_logits()
    monkeypatch.setattr(mla, "absorbable", lambda kv_b_proj: False)
    assert_close(absorbed, decode_logits(), rel=1e-5)


def test_absorbed_decode_is_as_accurate_in_bf16(tiny_model, monkeypatch):
    """bf16 rounds the two decode orders differently; both stay as close to the fp32 truth."""
    import slimquant.layers.mla as mla

    folder = tiny_model("deepseek_v3", dtype=torch.bfloat16)
    truth = hf_logits(folder, PROMPT)[6:]  # fp32

    def decode_error() -> float:
        runner = PagedRunner.of(load_model(str(folder), dtype=torch.bfloat16), torch.bfloat16)
        runner.step({0: PROMPT[:6]})
        ours = torch.cat([runner.step({0: [t]}) for t in PROMPT[6:]])
        return (ours - truth).abs().max().item() / truth.abs().max().item()

    absorbed = decode_error()
    monkeypatch.setattr(mla, "absorbable", lambda kv_b_proj: False)
    up_projected = decode_error()
    assert absorbed < 0.03 and absorbed <= 1.5 * up_projected, (absorbed, up_projected)
