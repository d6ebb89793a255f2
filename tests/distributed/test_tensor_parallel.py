"""Tensor parallel under torchrun-style ranks (each runs the engine): every rank of LLM(tensor_parallel_size=N)
returns one process's greedy tokens and logprobs, bit for bit, for float, W8A8, W8A8_DYNAMIC and mixed checkpoints
of Llama, Qwen2 (qkv bias) and Qwen3 (q/k norms). The reference is one process on the same (torch-reference)
backend and thread count."""

from __future__ import annotations

import pytest

from slimquant import LLM, SamplingParams
from slimquant.distributed.tensor_parallel import TensorParallel
from slimquant.models.loader import load_model
from tests.distributed.ranks import run_ranks

PROMPTS = ["The capital of France is", "Hello, my name is Ada and", "0 1 2 3"]
PARAMS = dict(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)


def generate(path: str, **kwargs) -> list[tuple]:
    """(token ids, each token's logprobs) per prompt."""
    llm = LLM(path, kernels={"backend": "torch-reference"}, max_model_len=64, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]


def rank_generate(rank: int, size: int, paths: list[str]) -> list:
    return [generate(p, tensor_parallel_size=size) for p in paths]


@pytest.mark.parametrize("size", [2, 4])
def test_every_rank_returns_one_process_tokens_and_logprobs(checkpoints, size):
    names = sorted(checkpoints) if size == 2 else ["llama-W8A8", "qwen3-W8A8_DYNAMIC", "qwen2-mixed"]
    paths = [checkpoints[n] for n in names]
    (one,) = run_ranks(rank_generate, 1, paths)  # the same process settings (one thread)
    ranks = run_ranks(rank_generate, size, paths)
    for i, name in enumerate(names):
        want = one[i]
        for rank, got in enumerate(ranks):
            assert got[i] == want, f"{name}: rank {rank} of {size} differs from one process"


@pytest.mark.parametrize(
    "arch,words",
    [("llama", "num_attention_heads = 4 is not divisible by tensor_parallel_size = 3"), ("deepseek_v3", "DeepSeek")],
)
def test_models_that_cannot_split_say_why(tiny_model, arch, words):
    with pytest.raises(ValueError, match=words):
        load_model(str(tiny_model(arch)), tp=TensorParallel(rank=1, size=3))  # loading runs no collective
