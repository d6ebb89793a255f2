"""random_models.make_random_checkpoint: float checkpoints that transformers reads as written, and ascend ones that
run as docs/FORMAT.md's plain math of their own tensors, with the quantizer's default plan."""

from __future__ import annotations

import pytest
import torch

from slimquant.format.architectures import arch_spec
from slimquant.format.checkpoint import read_description, tensor_types
from slimquant.format.schemes import W8A8, W8A8_DYNAMIC
from slimquant.models.loader import load_model
from slimquant.random_models import make_random_checkpoint
from tests.models.paged import PROMPT, PagedRunner, assert_close, hf_logits
from tests.models.reference import reference_logits, reference_model

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_float_checkpoint_is_what_transformers_reads(tmp_path, arch):
    folder = make_random_checkpoint(arch, tmp_path / "f", "float", torch.float32, **SHAPE)
    ours = PagedRunner.of(load_model(str(folder)), torch.float32).step({0: PROMPT})
    assert_close(ours, hf_logits(folder, PROMPT))  # a tensor transformers missed would be initialised anew


@pytest.mark.parametrize("qtype", [W8A8, W8A8_DYNAMIC])
def test_ascend_checkpoint_runs_its_own_tensors(tmp_path, qtype):
    src = make_random_checkpoint("qwen2", tmp_path / "f", "float", torch.float32, **SHAPE)  # the reference's frame
    folder = make_random_checkpoint("qwen2", tmp_path / "q", qtype, torch.float32, seed=1, **SHAPE)
    types = tensor_types(read_description(folder))
    down_type = W8A8_DYNAMIC  # the quantizer's default mix for --type w8a8 on Qwen (and the only type otherwise)
    assert types["model.layers.1.mlp.down_proj.weight"] == down_type
    assert types["model.layers.1.self_attn.k_proj.weight"] == qtype
    assert arch_spec({"model_type": "qwen2"}).w8a8_default_mix  # (what makes down_proj dynamic above)
    loaded = load_model(str(folder), dtype=torch.float32)
    ours = PagedRunner.of(loaded, torch.float32).step({0: PROMPT})
    ref = reference_logits(reference_model(src, folder, torch.float32), PROMPT)
    assert_close(ours, ref, rel=1e-4)
    assert ours.std() > 0.1  # the random scales keep activations alive through the layers


def test_moe_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dense models only"):
        make_random_checkpoint("deepseek_v3", tmp_path / "x", "w8a8_dynamic")


def test_int8_weights_are_symmetric(tmp_path):
    """No -128, as the quantizer writes them: the CPU's native kernels take such weights on their fast path."""
    from slimquant.format.safetensors_io import SafetensorsFolder

    folder = make_random_checkpoint("llama", tmp_path / "q", W8A8_DYNAMIC, **SHAPE)
    w = SafetensorsFolder(folder).get("model.layers.0.mlp.gate_proj.weight")
    assert w.dtype == torch.int8 and int(w.min()) == -127 and int(w.max()) == 127


def test_large_int8_tensors_rotate_one_drawn_pool():
    """Past the pool size, each pool-long part is the drawn pool at its own rotation: uniform values in
    [-127, 127], parts that differ, and the same tensor for the same seed."""
    from slimquant.random_models import _random_int8

    pool = 4096

    def draw() -> torch.Tensor:
        return _random_int8((40, 1000), torch.Generator().manual_seed(3), pool=pool)  # 9 whole parts and a rest

    x = draw()
    assert x.shape == (40, 1000) and torch.equal(x, draw())
    parts = x.flatten()[: 9 * pool].view(9, pool)  # [9, pool]
    assert all(torch.equal(p.sort().values, parts[0].sort().values) for p in parts)  # one pool's values
    assert len({tuple(p[:8].tolist()) for p in parts}) == 9  # each at another rotation
    counts = torch.bincount(x.flatten().long() + 127, minlength=256)  # [256]: -127 .. 128
    assert counts[:255].min() > 0 and counts[255] == 0 and abs(x.float().mean().item()) < 6
