"""Tensor parallel under torchrun-style ranks (each runs the engine): every rank of LLM(tensor_parallel_size=N)
returns one process's greedy tokens and logprobs, bit for bit, for float, W8A8, W8A8_DYNAMIC and mixed checkpoints
of Llama, Qwen2 (qkv bias) and Qwen3 (q/k norms). The reference is one process on the same (torch-reference)
backend and thread count."""

from __future__ import annotations

import pytest
import torch

from slimquant import LLM, SamplingParams
from slimquant.backends import select
from slimquant.backends.native_ranks import NativeRanks
from slimquant.config import KernelConfig
from slimquant.distributed.launch import run_ranks
from slimquant.distributed.tensor_parallel import TensorParallel, timed_out
from slimquant.format.primitives import decode_deq_scale
from slimquant.format.safetensors_io import SafetensorsFolder
from slimquant.kernels import native
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend
from tests.models.paged import PROMPT, PagedRunner

PROMPTS = ["The capital of France is", "Hello, my name is Ada and", "0 1 2 3"]
PARAMS = dict(temperature=0, max_tokens=6, logprobs=2, ignore_eos=True)


def generate(path: str, backend: str = "torch-reference", **kwargs) -> list[tuple]:
    """(token ids, each token's logprobs) per prompt."""
    llm = LLM(path, kernels={"backend": backend}, max_model_len=64, **kwargs)
    outs = llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]


def rank_generate(rank: int, size: int, paths: list[str], backend: str = "torch-reference") -> list:
    return [generate(p, backend, tensor_parallel_size=size) for p in paths]


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


def test_fewer_kv_heads_than_ranks_are_replicated(tiny_model, tmp_path):
    """2 kv heads on 4 ranks: each kv head (its k / v rows and its int8 KV-cache scales) on 2 ranks, as vLLM does."""
    src = tiny_model("llama")  # 4 heads, 2 kv heads
    paths = [str(src), str(write_ascend(src, tmp_path / "dyn", lambda p: "W8A8_DYNAMIC"))]
    paths.append(str(write_ascend(src, tmp_path / "c8", lambda p: "W8A8", kv_cache="asym")))
    (one,) = run_ranks(rank_generate, 1, paths)
    for rank, got in enumerate(run_ranks(rank_generate, 4, paths)):
        assert got == one, f"rank {rank}"


def test_tied_embeddings_split_by_vocabulary(tiny_model, tmp_path):
    """A tied head is the split embedding table: each rank's logits of its vocabulary rows, gathered."""
    src = tiny_model("qwen2", num_key_value_heads=4, tie_word_embeddings=True)
    paths = [str(src), str(write_ascend(src, tmp_path / "q", lambda p: "W8A8_DYNAMIC"))]
    (one,) = run_ranks(rank_generate, 1, paths)
    for rank, got in enumerate(run_ranks(rank_generate, 2, paths)):
        assert got == one, f"rank {rank}"
    loaded = load_model(paths[0], tp=TensorParallel(rank=1, size=2))
    assert loaded.model.lm_head is None and loaded.model.model.embed_tokens.weight.shape[0] == 256


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_native_ranks_return_one_native_process_results(checkpoints):
    """cpu-native ranks run the whole native decoder stack, reducing the row-parallel linears (absmax, int32
    products) and the split embedding table across ranks from inside it, or per op where a layer has no stack form
    under TP (a float row-parallel linear gathers its input); one process runs the stack: the same bits."""
    names = ["llama-W8A8", "qwen3-W8A8_DYNAMIC", "qwen2-mixed", "qwen2-float"]
    paths = [checkpoints[n] for n in names]
    (one,) = run_ranks(rank_generate, 1, paths, "cpu-native")
    for rank, got in enumerate(run_ranks(rank_generate, 2, paths, "cpu-native")):
        for name, outs, want in zip(names, got, one, strict=True):
            assert outs == want, f"{name}: rank {rank} differs from one process"
    for name, path in zip(names, paths, strict=True):
        notes = load_model(path, tp=TensorParallel(rank=1, size=2)).backend.notes  # loading runs no collective
        stacked = any("reduced across 2 ranks from inside it" in n for n in notes)
        assert stacked == (name in ("llama-W8A8", "qwen3-W8A8_DYNAMIC")), (name, notes)


def rank_greedy(rank: int, size: int, paths: list[str]) -> list:
    """Per checkpoint: each prompt's greedy tokens (no logprobs: argmax-only steps), and how many steps the ranks
    decided from their screened parts of the head."""
    return [_greedy(p, size) for p in paths]


def _greedy(path: str, size: int) -> tuple[list, int]:
    llm = LLM(path, kernels={"backend": "cpu-native"}, max_model_len=64, tensor_parallel_size=size)
    model, screened = llm.llm_engine.runner.model, []
    split_argmax = model.split_argmax
    model.split_argmax = lambda *a: screened.append(tokens := split_argmax(*a)) or tokens
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], sum(t is not None for t in screened)


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_native_ranks_screen_their_part_of_the_head_for_greedy_steps(tiny_model, tmp_path):
    """Plain greedy steps over a head split by vocabulary (bf16: the screen's kernel): each rank screens its rows
    with an int8 copy, and the ranks take the largest exact logit, the lowest id on ties; the tokens are one
    process's, which screens the whole head. An untied head and one tied to the embeddings."""
    untied = tiny_model("qwen2", dtype=torch.bfloat16, num_key_value_heads=4)
    tied = tiny_model("llama", dtype=torch.bfloat16, tie_word_embeddings=True)
    paths = [str(write_ascend(src, tmp_path / name, lambda p: "W8A8_DYNAMIC")) for name, src in
             (("untied", untied), ("tied", tied))]  # fmt: skip
    (one,) = run_ranks(rank_greedy, 1, paths)
    for rank, got in enumerate(run_ranks(rank_greedy, 2, paths)):
        for (tokens, screened), (want, _) in zip(got, one, strict=True):
            assert tokens == want, f"rank {rank}"
            assert screened >= 5, f"rank {rank}: {screened} steps screened"


def rank_attention(rank: int, size: int, path: str, native_bf16: list[bool]) -> tuple[list, str]:
    """Greedy tokens and logprobs of prompts over 16 tokens (prefill runs per op, past the native step), with this
    rank's CPU taken to have native bf16 or not; and the backend's description."""
    select.has_native_half = lambda: native_bf16[rank]
    llm = LLM(path, kernels={"backend": "cpu-native"}, max_model_len=128, tensor_parallel_size=size)
    prompts = [" ".join(["The capital of France is Paris, and"] * 3), " ".join(PROMPTS)]
    outs = llm.generate(prompts, SamplingParams(**PARAMS), use_tqdm=False)
    got = [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]
    return got, llm.llm_engine.runner.backend.describe()


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_ranks_agree_on_bf16_prefill_attention(tiny_model, tmp_path):
    """An int8 model (fp32 activations over a bf16 KV cache): prefill attends in bf16 where the CPU has native bf16.
    Where one rank's CPU lacks it, every rank attends in fp32 and returns one fp32 process's tokens and logprobs;
    where all have it, one bf16 process's (which differ from fp32's here: the setting is seen)."""
    src = tiny_model("qwen3", dtype=torch.bfloat16)
    path = str(write_ascend(src, tmp_path / "int8", lambda p: "W8A8_DYNAMIC"))
    (fp32, fp32_notes), (bf16, bf16_notes) = (run_ranks(rank_attention, 1, path, [b])[0] for b in (False, True))
    assert fp32 != bf16 and "attends in bf16" in bf16_notes and "attends in bf16" not in fp32_notes
    for rank, (got, notes) in enumerate(run_ranks(rank_attention, 2, path, [True, False])):
        assert got == fp32, f"rank {rank}"
        assert ("another tensor-parallel rank's CPU has no native bf16" in notes) == (rank == 0), notes
        assert "attends in bf16" not in notes
    assert all(got == bf16 for got, _ in run_ranks(rank_attention, 2, path, [True, True]))


class _FailingCollectives(TensorParallel):
    """Every collective fails (a rank stopped answering), counted in calls."""

    calls: list[str] = []

    def _fail(self, name: str) -> None:
        self.calls.append(name)
        raise RuntimeError("a tensor-parallel rank stopped answering")

    def max(self, t: torch.Tensor) -> torch.Tensor:
        self._fail("max")

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        self._fail("sum")

    def sum_disjoint(self, t: torch.Tensor) -> torch.Tensor:
        self._fail("sum_disjoint")


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
def test_a_collective_that_fails_inside_the_native_step_raises_its_error(checkpoints):
    """The stack calls the ranks' collectives back from inside the native call; one that fails (a dead rank, or one
    that timed out) ends the step with its error instead of numbers, and no other collective is called (each would
    wait out the timeout again)."""
    loaded = load_model(checkpoints["qwen3-W8A8_DYNAMIC"], tp=TensorParallel(rank=0, size=2))
    backend, failing = loaded.backend, _FailingCollectives(0, 2)
    backend.ranks, backend._ranks_agree = NativeRanks(backend.lib, failing), True
    failing.calls.clear()
    with pytest.raises(RuntimeError, match="stopped answering"):
        PagedRunner.of(loaded).step({0: PROMPT[:4]})
    assert failing.calls == ["sum_disjoint"]  # the split embedding table's rows: the step's first


@pytest.mark.parametrize(
    "arch,words",
    [
        ("llama", "num_attention_heads = 4 is not divisible by tensor_parallel_size = 3"),
        ("deepseek_v3", "num_attention_heads = 4 is not divisible by tensor_parallel_size = 3"),
    ],
)
def test_models_that_cannot_split_say_why(tiny_model, arch, words):
    with pytest.raises(ValueError, match=words):
        load_model(str(tiny_model(arch)), tp=TensorParallel(rank=1, size=3))  # loading runs no collective


@pytest.mark.parametrize("name", ["qwen2-float", "llama-W8A8"])
def test_a_rank_reads_only_its_part_of_the_linears(checkpoints, name):
    """Column-parallel tensors (q/k/v/gate/up: every per-row tensor), row-parallel int8 weights (o/down), the
    embeddings and the LM head are read half by each of 2 ranks; everything else whole (a float row-parallel layer
    keeps its whole weight). Expected
    bytes from the safetensors headers."""
    folder = SafetensorsFolder(checkpoints[name])
    column = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
    expected = 0
    for key in folder.keys():
        info, parts = folder.info(key), key.split(".")
        split = (parts[-2] in column and parts[-1] not in ("input_scale", "input_offset")) or (
            parts[-2] in ("o_proj", "down_proj") and parts[-1] == "weight" and info.dtype == "I8"
        )
        expected += info.nbytes // 2 if split else info.nbytes
    for rank in (0, 1):
        loaded = load_model(checkpoints[name], tp=TensorParallel(rank=rank, size=2))  # loading runs no collective
        assert loaded.bytes_read == expected
    assert load_model(checkpoints[name]).bytes_read == sum(folder.info(k).nbytes for k in folder.keys())


def rank_logprobs(rank: int, size: int, paths: list[str], order: str) -> list:
    """Each prompt's greedy tokens and the logprob of the first one."""
    outs = []
    for p in paths:
        llm = LLM(p, kernels={"backend": "torch-reference"}, max_model_len=64, tensor_parallel_size=size,
                  tensor_parallel_order=order)  # fmt: skip
        for o in llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False):
            first = o.outputs[0].logprobs[0][o.outputs[0].token_ids[0]].logprob
            outs.append((o.outputs[0].token_ids, first))
    return outs


def test_vllm_ascend_order_ranks_agree_and_differ_from_one_process_by_rounding(checkpoints):
    """tensor_parallel_order="vllm-ascend": each rank quantizes its own part of a row-parallel layer's input and the
    float outputs are summed. Every rank returns the same; the first token's logprob moves from one process's by
    rounding only (static W8A8 keeps one activation scale: closer than W8A8_DYNAMIC's per-rank absmax)."""
    names = ["llama-W8A8", "qwen3-W8A8_DYNAMIC", "qwen2-mixed"]
    paths = [checkpoints[n] for n in names]
    (one,) = run_ranks(rank_logprobs, 1, paths, "exact")
    ranks = run_ranks(rank_logprobs, 2, paths, "vllm-ascend")
    assert ranks[0] == ranks[1]
    got = ranks[0]
    assert got != one  # the option changes the numbers ...
    for (_, want_lp), (_, got_lp) in zip(one, got, strict=True):
        assert abs(want_lp - got_lp) < 0.05  # ... by int8 rounding, not by a wrong sum


ROW_LAYERS = {"llama-W8A8": "model.layers.0.self_attn.o_proj", "qwen3-W8A8_DYNAMIC": "model.layers.1.mlp.down_proj"}


def _row_layer_output(rank: int, size: int, path: str, name: str, x: torch.Tensor) -> list:
    """A row-parallel layer of a vllm-ascend-order rank on its part of x [T, K] (a list: tensors cannot outlive
    the rank's process in a queue)."""
    tp = TensorParallel(rank, size, order="vllm-ascend")
    layer = load_model(path, kernels=KernelConfig(backend="torch-reference"), tp=tp).model.get_submodule(name)
    k = layer.in_features
    with torch.inference_mode():
        return layer(x[:, rank * k : (rank + 1) * k]).tolist()


def _plain_partial_sums(folder: SafetensorsFolder, name: str, x: torch.Tensor, size: int) -> torch.Tensor:
    """vLLM-Ascend's row-parallel math written out: each part of K quantized on its own (static: the one input
    scale; dynamic: the part's absmax), its int32 product (+ quant_bias on the first) dequantized, the parts added."""
    w, k = folder.get(f"{name}.weight").to(torch.int64), x.shape[1] // size  # [N, K]
    total = None
    for r in range(size):
        xr, wr = x[:, r * k : (r + 1) * k], w[:, r * k : (r + 1) * k]
        if f"{name}.deq_scale" in folder:  # static W8A8
            inv, off = 1 / folder.get(f"{name}.input_scale").float(), folder.get(f"{name}.input_offset").float()
            q = torch.clamp(torch.round(xr * inv + off), -128, 127).to(torch.int64)
            acc = q @ wr.T + (folder.get(f"{name}.quant_bias").to(torch.int64) if r == 0 else 0)
            y = acc.float() * decode_deq_scale(folder.get(f"{name}.deq_scale"))
        else:  # W8A8_DYNAMIC
            s = (xr.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-8)
            q = torch.clamp(torch.round(xr / s), -128, 127).to(torch.int64)
            y = (q @ wr.T).float() * s * folder.get(f"{name}.weight_scale").float().reshape(-1)
        total = y if total is None else total + y
    return total


@pytest.mark.parametrize("ckpt", ROW_LAYERS)
def test_vllm_ascend_order_row_layer_is_the_sum_of_per_rank_dequantized_parts(checkpoints, ckpt):
    name, path = ROW_LAYERS[ckpt], checkpoints[ckpt]
    folder = SafetensorsFolder(path)
    x = torch.randn(3, folder.info(f"{name}.weight").shape[1], generator=torch.Generator().manual_seed(0)) * 4
    ranks = run_ranks(_row_layer_output, 2, path, name, x)
    want = _plain_partial_sums(folder, name, x, 2)
    for got in ranks:
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-6, atol=1e-5)


def rank_generates_alone(rank: int, size: int, path: str, offer: bool) -> tuple[str, float] | None:
    """Every rank makes its engine (offer False: the ranks exchange through gloo only); then rank 0 does not
    generate for 8 s (its script went another way) while the others do, with a 2 s execute_model_timeout: what
    their generate raised, and how long it took."""
    import time

    from slimquant.distributed import workers

    if not offer:
        workers._can_offer = lambda size: False
    llm = LLM(
        path,
        kernels={"backend": "torch-reference"},
        max_model_len=64,
        tensor_parallel_size=size,
        execute_model_timeout=2,
    )
    if rank == 0:
        time.sleep(8)
        return None
    start = time.monotonic()
    with pytest.raises(RuntimeError) as failed:
        llm.generate(PROMPTS, SamplingParams(**PARAMS), use_tqdm=False)
    return str(failed.value), time.monotonic() - start


@pytest.mark.parametrize("offer", [True, False], ids=["shared-memory", "gloo"])
def test_under_torchrun_a_rank_whose_peer_never_steps_fails_in_execute_model_timeout(checkpoints, offer):
    """Every rank runs its own engine (torchrun's external launcher), so each waits for the others: execute_model_
    timeout at most, as rank 0 of the engine's own ranks does; never for ever."""
    _, (said, took) = run_ranks(rank_generates_alone, 2, checkpoints["llama-W8A8"], offer)
    assert 2 <= took < 6, (said, took)
    if offer:
        assert "rank(s) [0] of the tensor-parallel group did not answer in execute_model_timeout=2 s" in said, said
    else:
        assert "timed out" in said.lower() and "a rank did not answer in execute_model_timeout=2 s" in said, said


@pytest.mark.parametrize(
    "message,timeout",
    [
        ("[gloo/transport/tcp/pair.cc:534] Timed out waiting 3000ms for recv operation to complete", True),
        ("Operation timed out!", True),  # gloo's work wait, which may give up before the transport does
        ("Connection closed by peer [127.0.0.1]:29500", False),
    ],
)
def test_either_of_gloos_timeout_messages_is_a_timeout(message, timeout):
    """Both messages mean a rank did not answer in time (execute_model_timeout): a fresh clone's run once got the
    second, and the server said a collective failed instead of naming the timeout."""
    assert timed_out(RuntimeError(message)) is timeout
