"""DeepSeek V3 / V2 (MLA + MoE) split over ranks, with and without expert parallel: every rank returns one process's
greedy tokens and logprobs, bit for bit, for float, the DeepSeek mix (MLA static W8A8, MLPs and experts
W8A8_DYNAMIC, kv_b float) and all-W8A8_DYNAMIC (an int8 kv_b_proj: the non-absorbed decode) checkpoints; each rank
reads its heads' rows, its part of every expert or its whole experts, and nothing of the experts it does not run;
the server answers as one process. The reference is one process on the same backend (torch-reference, or
cpu-native for the native kernels' test) and thread count."""

from __future__ import annotations

import os
import re

import pytest

from slimquant import LLM, SamplingParams
from slimquant.distributed.launch import run_ranks
from slimquant.distributed.tensor_parallel import TensorParallel
from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.kernels import native
from slimquant.models.loader import load_model
from tests.distributed.test_serve_tp import ONE_THREAD, _chat
from tests.distributed.test_tensor_parallel import PARAMS, PROMPTS
from tests.models.ascend_ckpt import write_ascend
from tests.models.test_model_deepseek_quantized import deepseek_mix
from tests.server.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def deepseek(tiny_model, tmp_path_factory) -> dict[str, str]:
    """name -> folder: V3 float / mix / all-dynamic, V2 (softmax, group-limited greedy) mix, GLM-4.7-Flash (v heads
    wider than k's non-rope part) mix."""
    v3, v2 = tiny_model("deepseek_v3"), tiny_model("deepseek_v2", norm_topk_prob=False)
    out = {"v3-float": str(v3)}
    for name, src, kind in (
        ("v3-mix", v3, deepseek_mix),
        ("v3-W8A8_DYNAMIC", v3, lambda p: "W8A8_DYNAMIC"),
        ("v2-mix", v2, deepseek_mix),
        ("glm-4.7-flash-mix", tiny_model("glm4_moe_lite"), deepseek_mix),
    ):
        out[name] = str(write_ascend(src, tmp_path_factory.mktemp(name), kind))
    return out


def generate(path: str, backend: str = "torch-reference", notes: list[str] | None = None, **kwargs) -> list[tuple]:
    """(token ids, each token's logprobs) per prompt; the backend's description appended to notes where given."""
    llm = LLM(path, kernels={"backend": backend}, max_model_len=64, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    if notes is not None:
        notes.append(llm.llm_engine.runner.backend.describe())
    if llm.llm_engine.workers is not None:
        llm.llm_engine.shutdown()
    return [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]


def rank_generate(
    rank: int, size: int, paths: list[str], expert_parallel: bool, backend: str = "torch-reference"
) -> list:
    return [generate(p, backend, tensor_parallel_size=size, enable_expert_parallel=expert_parallel) for p in paths]


@pytest.fixture(scope="module")
def one_process(deepseek) -> dict[str, list]:
    (outs,) = run_ranks(rank_generate, 1, list(deepseek.values()), False)
    return dict(zip(deepseek, outs, strict=True))


@pytest.mark.parametrize("size,expert_parallel", [(2, False), (2, True), (4, False), (4, True)])
def test_every_rank_returns_one_process_tokens_and_logprobs(deepseek, one_process, size, expert_parallel):
    ranks = run_ranks(rank_generate, size, list(deepseek.values()), expert_parallel)
    for rank, got in enumerate(ranks):
        for name, outs in zip(deepseek, got, strict=True):
            assert outs == one_process[name], f"{name}: rank {rank} of {size} (ep={expert_parallel}) differs"


def rank_generate_native(rank: int, size: int, paths: list[str]) -> tuple[list, int]:
    """rank_generate on cpu-native, and how many MoE layer calls ran experts split over the ranks in the one native
    call."""
    from slimquant.backends.native_ops import NativeOps

    one_call, split = NativeOps.grouped_experts, []

    def counted(self, *args, **kwargs):  # RoutedExperts passes its ranks (tp) last of the positional arguments
        out = one_call(self, *args, **kwargs)
        split.append(args[-1].size > 1 and out is not None)
        return out

    NativeOps.grouped_experts = counted
    return rank_generate(rank, size, paths, False, "cpu-native"), sum(split)


def rank_generate_stacked(rank: int, size: int, paths: list[str], expert_parallel: bool) -> tuple[list, list, int]:
    """rank_generate on cpu-native, each model's backend description, and how many steps ran in one native call."""
    from slimquant.backends import cpu_native

    steps, notes, whole_step = [], [], cpu_native.decoder_model
    cpu_native.decoder_model = lambda *args: steps.append(1) or whole_step(*args)
    kwargs = dict(tensor_parallel_size=size, enable_expert_parallel=expert_parallel)
    return [generate(p, "cpu-native", notes, **kwargs) for p in paths], notes, len(steps)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_native_ranks_return_one_native_process_results(deepseek):
    """cpu-native ranks: the native absorbed MLA decode and kv_b_proj products over each rank's heads (4 ranks: one
    head each) and the int8 experts split over the ranks in one native call give one cpu-native process's numbers,
    bit for bit."""
    assert_native_ranks_match_one_process([deepseek["v3-float"], deepseek["v3-mix"], deepseek["v2-mix"]], (2, 4))


def assert_native_ranks_match_one_process(paths: list[str], sizes: tuple[int, ...] = (2,)) -> None:
    """cpu-native ranks of each size give one cpu-native process's tokens and logprobs for every path, each rank
    having run its share of the int8 experts split in the experts' native call."""
    ((one, _),) = run_ranks(rank_generate_native, 1, paths)
    for size in sizes:
        for rank, (got, split_calls) in enumerate(run_ranks(rank_generate_native, size, paths)):
            assert got == one, f"rank {rank} of {size} differs from one process"
            assert split_calls > 0


def test_engine_started_expert_parallel_ranks_match_one_process(deepseek, one_process):
    """LLM(tensor_parallel_size=2, enable_expert_parallel=True) here: rank 1 started by the engine, the expert
    outputs exchanged through shared memory."""
    threads = max(1, (os.cpu_count() or 1) // 2)
    (want,) = run_ranks(rank_generate, 1, [deepseek["v3-mix"]], False, threads=threads)
    assert rank_generate(0, 2, [deepseek["v3-mix"]], True) == want


_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.")
_COLUMN = ("q_proj", "q_b_proj", "kv_b_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")  # rows split


def expected_bytes(folder: SafetensorsFolder, rank: int, size: int, expert_parallel: bool, experts: int) -> int:
    """What one rank of a float DeepSeek reads, from the safetensors headers: column-parallel and vocabulary rows
    split, float row-parallel weights whole (their input is gathered), routed experts its own (expert parallel) or
    its rows of gate / up and whole down weights."""
    total = 0
    for key in folder.keys():
        nbytes, proj = folder.info(key).nbytes, key.split(".")[-2]
        if m := _EXPERT.search(key):
            if expert_parallel:
                mine = int(m.group(1)) // (experts // size) == rank
                total += nbytes if mine else 0
            else:
                total += nbytes // size if proj != "down_proj" else nbytes
        else:
            total += nbytes // size if proj in _COLUMN else nbytes
    return total


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_a_rank_reads_only_its_part(deepseek, expert_parallel):
    folder = SafetensorsFolder(deepseek["v3-float"])
    whole = sum(folder.info(k).nbytes for k in folder.keys())
    for rank in (0, 1):
        tp = TensorParallel(rank=rank, size=2, expert_parallel=expert_parallel)
        loaded = load_model(deepseek["v3-float"], tp=tp)  # loading runs no collective
        assert loaded.bytes_read == expected_bytes(folder, rank, 2, expert_parallel, 8) < whole


def test_experts_that_cannot_split_say_why(tiny_model):
    path = str(tiny_model("deepseek_v3", n_routed_experts=6, n_group=2))
    with pytest.raises(ValueError, match="routed experts per layer = 6 is not divisible by tensor_parallel_size = 4"):
        load_model(path, tp=TensorParallel(rank=1, size=4, expert_parallel=True))


def test_serve_expert_parallel_answers_as_one_process(deepseek):
    """`slimquant serve -tp 2 --enable-expert-parallel`: the chat answer one process gives."""
    answers = []
    for extra in ((), ("-tp", "2", "--enable-expert-parallel")):
        proc, base = start_server(deepseek["v3-mix"], "--backend", "torch-reference", *extra, env=ONE_THREAD)
        try:
            answers.append(_chat(base))
        finally:
            stop_server(proc)
    assert answers[0] == answers[1] and answers[0]


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_native_ranks_run_mla_layers_in_the_whole_step(deepseek, expert_parallel):
    """2 cpu-native ranks decode DeepSeek-V3, V2 (its group-limited router) and GLM-4.7-Flash in the whole-step
    native call: each rank's heads of MLA (q_b_proj and kv_b_proj split, the latent projections whole), o_proj's int32
    products reduced from inside the call, the experts split (or whole, expert parallel). One process's bits."""
    paths = [deepseek["v3-mix"], deepseek["v2-mix"], deepseek["glm-4.7-flash-mix"]]
    ((one, _, one_steps),) = run_ranks(rank_generate_stacked, 1, paths, False)
    assert one_steps > 0
    for rank, (got, notes, steps) in enumerate(run_ranks(rank_generate_stacked, 2, paths, expert_parallel)):
        assert got == one, f"rank {rank} of 2 (ep={expert_parallel}) differs from one process"
        assert steps > 0 and all("decode in one native call, reduced across 2 ranks from inside it" in n for n in notes)
