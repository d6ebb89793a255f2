"""Tensor parallel on GPUs (issue 19): the split layers on CUDA tensors give one process's logits, and with two or
more GPUs the engine's ranks (one GPU each, collectives over NCCL) give one process's greedy text.

On CPUs the ranks equal one process bit for bit (tests/distributed). On a GPU only the int8 products are exact:
cuBLAS may pick another kernel (another summation order) for a rank's narrower float matrix, so the float parts
agree within rounding. Skipped where torch sees no CUDA GPU (CI has none); run with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from slimquant import LLM, SamplingParams
from slimquant.config import KernelConfig
from slimquant.distributed.launch import run_ranks
from slimquant.distributed.tensor_parallel import TensorParallel
from slimquant.errors import RankFailure
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner
from tests.models.test_model_deepseek_quantized import deepseek_mix

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = ["cuda-triton", "torch-reference"]  # tensor parallel runs either on a GPU


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, str]:
    """name -> folder: Llama float / W8A8 / W8A8_DYNAMIC, Qwen2 (qkv bias) W8A8_DYNAMIC, DeepSeek-V3 mix."""
    llama, qwen2 = tiny_model("llama", num_key_value_heads=4), tiny_model("qwen2", num_key_value_heads=4)
    out = {"llama-float": str(llama)}
    for name, src, kind in (
        ("llama-W8A8", llama, lambda p: "W8A8"),
        ("llama-W8A8_DYNAMIC", llama, lambda p: "W8A8_DYNAMIC"),
        ("qwen2-W8A8_DYNAMIC", qwen2, lambda p: "W8A8_DYNAMIC"),
        ("deepseek-mix", tiny_model("deepseek_v3"), deepseek_mix),
    ):
        out[name] = str(write_ascend(src, tmp_path_factory.mktemp(name), kind))
    return out


FED = [5, 17, 300]  # decode steps' tokens, the same for every run (greedy choices could part on a near tie)


def _steps(path: str, tp: TensorParallel, backend: str) -> list[list[list[float]]]:
    """fp32 logits of a 13-token prefill's last token and of 3 decode steps on cuda:0 (lists: tensors cannot leave
    a rank's process through its result queue)."""
    loaded = load_model(path, device="cuda:0", kernels=KernelConfig(backend=backend), tp=tp)
    runner = PagedRunner.of(loaded, device="cuda:0")
    logits = [runner.step({0: PROMPT})[-1:]] + [runner.step({0: [t]}) for t in FED]
    return [x.tolist() for x in logits]


def _rank_steps(rank: int, size: int, paths: list[str], backend: str, expert_parallel: bool = False) -> list:
    return [_steps(p, TensorParallel(rank, size, expert_parallel=expert_parallel), backend) for p in paths]


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_layers_on_cuda_tensors_give_one_process_logits(models, backend):
    """Two ranks on one GPU (gloo reduces their CUDA tensors: the layers' GPU path without NCCL, which refuses two
    ranks on one device): each step's logits as one process's, within float rounding for the float model and
    within a flipped int8 rounding's reach for the others (cuda-triton: DeepSeek's split experts in the grouped
    kernels, the ranks reducing between them)."""
    paths = list(models.values())
    (one,) = run_ranks(_rank_steps, 1, paths, backend)
    for rank, got in enumerate(run_ranks(_rank_steps, 2, paths, backend)):
        for name, steps, want in zip(models, got, one, strict=True):
            rel = 1e-4 if name.endswith("float") else 1e-2
            for i, (g, w) in enumerate(zip(steps, want, strict=True)):
                g, w = torch.tensor(g), torch.tensor(w)
                err, scale = (g - w).abs().max().item(), w.abs().max().item()
                assert err <= rel * scale, f"{name}: rank {rank}, step {i}: max error {err} vs logits {scale}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_parallel_on_cuda_tensors_gives_one_process_logits(models, backend):
    """DeepSeek-V3 with whole experts per rank (cuda-triton: each rank's experts in the grouped kernels), two ranks
    on one GPU: one process's logits, within a flipped int8 rounding's reach."""
    paths = [models["deepseek-mix"]]
    ((one,),) = run_ranks(_rank_steps, 1, paths, backend)
    for rank, (got,) in enumerate(run_ranks(_rank_steps, 2, paths, backend, True)):
        for i, (g, w) in enumerate(zip(got, one, strict=True)):
            g, w = torch.tensor(g), torch.tensor(w)
            err, scale = (g - w).abs().max().item(), w.abs().max().item()
            assert err <= 1e-2 * scale, f"rank {rank}, step {i}: max error {err} vs logits {scale}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (one per rank)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_ranks_on_their_own_gpus_give_one_process_text(models, backend):
    """LLM(device='cuda', tensor_parallel_size=2): ranks on cuda:0 and cuda:1, NCCL between them; the greedy text
    and each token's logprob as one process on one GPU."""
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, ignore_eos=True)
    prompts = ["The capital of France is", "0 1 2 3"]
    for name in ("llama-float", "llama-W8A8_DYNAMIC", "deepseek-mix"):
        runs = []
        for tp in (1, 2):
            kernels = {"backend": backend}
            llm = LLM(models[name], device="cuda", kernels=kernels, max_model_len=64, tensor_parallel_size=tp)
            runs.append([o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)])
            llm.llm_engine.shutdown()
        for one, split in zip(*runs, strict=True):
            assert split.token_ids == one.token_ids, name
            for a, b, t in zip(split.logprobs, one.logprobs, one.token_ids, strict=True):
                assert abs(a[t].logprob - b[t].logprob) < 1e-3, name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (one per rank)")
def test_a_rank_killed_mid_generation_on_nccl_fails_in_seconds(models):
    """NCCL waits for a dead peer until its timeout (execute_model_timeout, 300 s here): rank 0 aborts the NCCL
    group when its rank dies (WorkerGroup.watch), so generate raises RankFailure in seconds."""
    llm = LLM(models["llama-W8A8_DYNAMIC"], device="cuda", max_model_len=512, tensor_parallel_size=2)
    assert_killed_mid_generation_fails_in_seconds(llm)


def assert_killed_mid_generation_fails_in_seconds(llm: LLM) -> None:
    """Kill rank 1 a second into generating (one generate after another, so the kill lands inside one): RankFailure
    naming it within 30 s of the kill."""
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    worker, killed = llm.llm_engine.workers.procs[0], []  # killed: when
    threading.Timer(1.0, lambda: killed.append(time.perf_counter()) or worker.kill()).start()
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] of 2 failed \(rank 1 exited with code -9"):
        for _ in range(1000):
            llm.generate(["0 1 2 3"] * 8, params, use_tqdm=False)
    assert time.perf_counter() - killed[0] < 30
