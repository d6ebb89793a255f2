"""End to end with the project's quantizer: its checkpoints run exactly as docs/FORMAT.md's reference math says."""

from __future__ import annotations

import pytest
import torch

from slimquant.models.loader import load_model
from slimquant.quant.pipeline import quantize
from tests.models.paged import PROMPT, PagedRunner, assert_close
from tests.models.reference import reference_logits, reference_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quant_type", ["w8a8", "w8a8_dynamic", "w8a8_dynamic+w8a16"])
def test_quantizer_checkpoint_matches_reference(tiny_model, tmp_path, quant_type, dtype):
    """fp32: the native step (the 13-token prompt is a small prefill); bf16: the per-op path in bf16 (the native
    step, which computes in fp32 whatever the dtype, turned off). +w8a16: every down_proj W8A16."""
    src = tiny_model("qwen3", dtype=torch.bfloat16)
    dst = tmp_path / "q"
    method = "iterative" if quant_type == "w8a8" else "smoothquant"  # no shift into bias-free dynamic linears
    qtype, _, weight_only = quant_type.partition("+")
    mix = ["*.mlp.down_proj=w8a16"] if weight_only else None
    quantize(src, dst, qtype, anti_outlier=method, mix=mix, num_samples=2, seq_len=16, progress=False)
    loaded = load_model(str(dst), dtype=dtype)
    if dtype == torch.bfloat16:
        loaded.backend.stack = None
    ours = PagedRunner.of(loaded).step({0: PROMPT})
    assert_close(ours, reference_logits(reference_model(src, dst, dtype), PROMPT), rel=1e-3)
