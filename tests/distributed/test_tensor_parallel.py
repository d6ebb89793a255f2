"""Tensor parallel on gloo ranks: every rank of LLM(tensor_parallel_size=N) returns one process's greedy tokens and
logprobs, bit for bit, for float, W8A8, W8A8_DYNAMIC and mixed checkpoints of Llama, Qwen2 (qkv bias) and Qwen3
(q/k norms). The reference is one process on the same (torch-reference) backend and thread count."""

from __future__ import annotations

import pytest

from slimquant import LLM, SamplingParams
from slimquant.distributed.tensor_parallel import TensorParallel
from slimquant.models.loader import load_model
from tests.distributed.ranks import run_ranks
from tests.models.ascend_ckpt import write_ascend

PROMPTS = ["The capital of France is", "Hello, my name is Ada and", "0 1 2 3"]
PARAMS = dict(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)


def _generate(path: str, **kwargs) -> list[tuple]:
    """(token ids, each token's logprobs) per prompt."""
    llm = LLM(path, kernels={"backend": "torch-reference"}, max_model_len=64, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]


def _rank_generate(rank: int, size: int, paths: list[str]) -> list:
    return [_generate(p, tensor_parallel_size=size) for p in paths]


def _mixed(prefix: str) -> str:
    """Attention static, MLP dynamic, down_proj float: a float row-parallel layer inside an int8 model."""
    if prefix.endswith("down_proj"):
        return "FLOAT"
    return "W8A8_DYNAMIC" if ".mlp." in prefix else "W8A8"


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory) -> dict[str, str]:
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        src = tiny_model(arch, num_key_value_heads=4)
        out[f"{arch}-float"] = str(src)
        for name, kind in (("W8A8", lambda p: "W8A8"), ("W8A8_DYNAMIC", lambda p: "W8A8_DYNAMIC"), ("mixed", _mixed)):
            dst = tmp_path_factory.mktemp(f"{arch}-{name}")
            out[f"{arch}-{name}"] = str(write_ascend(src, dst, kind, shift=arch == "qwen2"))
    return out


@pytest.mark.parametrize("size", [2, 4])
def test_every_rank_returns_one_process_tokens_and_logprobs(checkpoints, size):
    names = sorted(checkpoints) if size == 2 else ["llama-W8A8", "qwen3-W8A8_DYNAMIC", "qwen2-mixed"]
    paths = [checkpoints[n] for n in names]
    (one,) = run_ranks(_rank_generate, 1, paths)  # the same process settings (one thread)
    ranks = run_ranks(_rank_generate, size, paths)
    for i, name in enumerate(names):
        want = one[i]
        for rank, got in enumerate(ranks):
            assert got[i] == want, f"{name}: rank {rank} of {size} differs from one process"


def test_tensor_parallel_needs_a_process_group(checkpoints):
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        LLM(checkpoints["llama-float"], tensor_parallel_size=2)


@pytest.mark.parametrize(
    "arch,words",
    [("llama", "num_attention_heads = 4 is not divisible by tensor_parallel_size = 3"), ("deepseek_v3", "DeepSeek")],
)
def test_models_that_cannot_split_say_why(tiny_model, arch, words):
    with pytest.raises(ValueError, match=words):
        load_model(str(tiny_model(arch)), tp=TensorParallel(rank=1, size=3))  # loading runs no collective
