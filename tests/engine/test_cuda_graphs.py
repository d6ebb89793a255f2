"""CUDA-graph decode steps: padded, fixed-shape inputs give the eager step's results (run here with the graphs'
CPU stand-in; tests/gpu captures real graphs)."""

from __future__ import annotations

import pytest
import torch

from slimquant import LLM, SamplingParams
from slimquant.backends import cuda_graphs
from slimquant.backends.base import Backend
from tests.engine.reference import tokens_and_logprobs

PROMPTS = [[5, 17, 300, 42], [7, 99], [250, 3, 11, 60, 128, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 17, 18], [77]]


def _run(path, graphs: bool, monkeypatch, ops=None, max_tokens: int = 12, **kw) -> tuple[list, LLM]:
    """Greedy tokens and logprobs of PROMPTS (3 of them batched: a padded bucket of 4), and the LLM; the
    torch-reference backend (or one with these ops), with graph replays (here: their CPU stand-in) where graphs
    is set."""
    with monkeypatch.context() as m:
        m.setattr("slimquant.models.loader.select_backend", lambda *a: Backend(ops, graphs=graphs))
        llm = LLM(str(path), max_model_len=96, block_size=4, dtype="float32", **kw)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False) + llm.generate(PROMPTS[3:], params, use_tqdm=False)
    return tokens_and_logprobs(outs), llm


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    from slimquant import quantize

    dst = tmp_path_factory.mktemp("graphs") / "q"
    quantize(tiny_model("qwen3"), dst, "w8a8_dynamic", num_samples=4, seq_len=32, progress=False)
    return dst


@pytest.mark.parametrize("model", ["float", "int8"])
def test_graph_steps_match_eager_steps(tiny_model, quantized, model, monkeypatch):
    path = tiny_model("llama") if model == "float" else quantized
    eager, _ = _run(path, False, monkeypatch)
    graphed, llm = _run(path, True, monkeypatch)
    decoder = llm.llm_engine.runner.backend.graphs
    assert {size for size, _ in decoder.graphs} == {4, 1}  # 3 sequences ran padded to 4; then 1 alone
    assert {width for _, width in decoder.graphs} == {8}  # <= 29 tokens of 4: 8 blocks
    for (tokens_e, lp_e), (tokens_g, lp_g) in zip(eager, graphed, strict=True):
        assert tokens_g == tokens_e
        torch.testing.assert_close(torch.tensor(lp_g), torch.tensor(lp_e), rtol=0, atol=1e-4)


@pytest.mark.parametrize("scheme,rope", [("deepseek_mix", 8), ("deepseek_mix", 16), ("kv_b_quantized", 8)])
def test_deepseek_graph_steps_match_eager_steps(tiny_model, tmp_path, monkeypatch, scheme, rope):
    """MLA over the table's whole width (kv_b_proj absorbed: torch's gather and SDPA, or with 16 rope dims the
    kernel; or not absorbed) and the grouped int8 experts (the cuda-triton ops, in Triton's interpreter): graph
    steps give the eager steps' tokens."""
    pytest.importorskip("triton")
    from slimquant.backends.triton_ops import TritonOps
    from tests.models import test_model_deepseek_quantized as recipes
    from tests.models.ascend_ckpt import write_ascend

    path = write_ascend(tiny_model("deepseek_v3", qk_rope_head_dim=rope), tmp_path / "q", getattr(recipes, scheme))
    eager, _ = _run(path, False, monkeypatch, TritonOps(), max_tokens=6)
    graphed, llm = _run(path, True, monkeypatch, TritonOps(), max_tokens=6)
    assert {size for size, _ in llm.llm_engine.runner.backend.graphs.graphs} == {4, 1}
    for (tokens_e, lp_e), (tokens_g, lp_g) in zip(eager, graphed, strict=True):
        assert tokens_g == tokens_e
        torch.testing.assert_close(torch.tensor(lp_g), torch.tensor(lp_e), rtol=0, atol=1e-4)


def test_padding_rows_write_only_the_scratch_block(tiny_model, monkeypatch):
    _, llm = _run(tiny_model("llama"), True, monkeypatch, num_kv_blocks=40)
    runner = llm.llm_engine.runner
    assert runner.num_blocks == 40 and runner.backend.graphs.scratch_block == 40
    cache = runner.model.model.layers[0].self_attn.attn.kv_cache  # [2, 41, 4, KVH, D]
    assert cache.shape[1] == 41 and cache[:, 40].abs().sum() > 0  # the padding rows' writes landed there


def test_buckets_and_support():
    assert cuda_graphs._buckets(20, cuda_graphs.BATCH_BUCKETS) == [1, 2, 4, 8, 16, 20]
    assert cuda_graphs._buckets(1, cuda_graphs.BATCH_BUCKETS) == [1]


def test_models_with_host_values_decode_eagerly(tiny_model, tmp_path):
    """DeepSeek takes graphs where its experts run grouped (int8 experts, ops that group them), not one by one."""
    from slimquant.backends.torch_ops import TorchOps
    from slimquant.models.loader import load_model
    from tests.models.ascend_ckpt import write_ascend
    from tests.models.test_model_deepseek_quantized import deepseek_mix

    assert cuda_graphs.graphs_supported(load_model(str(tiny_model("qwen2"))).model)
    assert not cuda_graphs.graphs_supported(load_model(str(tiny_model("deepseek_v3"))).model)  # float experts
    int8 = load_model(str(write_ascend(tiny_model("deepseek_v3"), tmp_path / "q", deepseek_mix))).model
    Backend(TorchOps()).bind(int8)
    assert not cuda_graphs.graphs_supported(int8)  # TorchOps run the experts one by one
    pytest.importorskip("triton")
    from slimquant.backends.triton_ops import TritonOps

    Backend(TritonOps()).bind(int8)
    assert cuda_graphs.graphs_supported(int8)


def test_enforce_eager_and_cpu_have_no_graphs(tiny_model):
    llm = LLM(str(tiny_model("llama")), max_model_len=64, enforce_eager=True)
    assert llm.llm_engine.runner.backend.graphs is None and llm.llm_engine.runner.num_blocks > 0
