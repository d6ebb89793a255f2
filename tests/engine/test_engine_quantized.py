"""The engine over an ascend (W8A8 / W8A8_DYNAMIC) checkpoint: batching and preemption keep greedy results."""

from __future__ import annotations

import pytest

from slimquant import LLM, SamplingParams
from slimquant.kernels import native
from tests.models.ascend_ckpt import write_ascend

PROMPTS = ["Hello, my name is", "The capital of France is", "It is a truth"]
AUSTEN = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ascend_path(llama_path, tmp_path_factory):
    """Attention linears W8A8 (static), MLP linears W8A8_DYNAMIC."""
    dst = tmp_path_factory.mktemp("tiny-llama-ascend")
    return write_ascend(llama_path, dst, lambda prefix: "W8A8_DYNAMIC" if ".mlp." in prefix else "W8A8")


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "bfloat16"])
def test_quantized_batch_and_preemption_match_single_runs(ascend_path, kv_cache_dtype):
    kw = {"quantization": "ascend", "max_model_len": 32, "block_size": 4, "kv_cache_dtype": kv_cache_dtype}
    roomy = LLM(str(ascend_path), num_kv_blocks=64, **kw)
    alone = [roomy.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    batch = [o.outputs[0].token_ids for o in roomy.generate(PROMPTS, GREEDY, use_tqdm=False)]
    tight = LLM(str(ascend_path), num_kv_blocks=9, **kw)
    preempted = [o.outputs[0].token_ids for o in tight.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert batch == alone == preempted and all(len(t) == 12 for t in alone)
    assert tight.llm_engine.scheduler.num_preemptions > 0


@pytest.mark.skipif(not native.available() or len(native.isas_here()) < 2, reason="fewer than two native builds here")
def test_every_native_build_generates_the_same_tokens_and_logprobs(ascend_path):
    """KernelConfig.isa picks the build (named by the backend), and every build this CPU runs gives the same
    greedy tokens and logprobs: prompts of 16 tokens and more prefill on AMX tiles in the AMX build."""
    prompts = [" ".join([AUSTEN] * 2), AUSTEN, PROMPTS[0]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    got = {}
    for isa in native.isas_here():
        llm = LLM(
            str(ascend_path), quantization="ascend", max_model_len=128, kernels={"backend": "cpu-native", "isa": isa}
        )
        assert f"({native.ISA_NAMES[isa]} build)" in llm.llm_engine.runner.backend.describe()
        assert len(llm.get_tokenizer()(prompts[0]).input_ids) > 32  # two AMX tiles of tokens
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        got[isa] = [(c.token_ids, [{t: lp.logprob for t, lp in step.items()} for step in c.logprobs]) for c in outs]
    assert all(v == got["avx2"] for v in got.values())
