"""The cpu-native backend's screened head: an int8 screen of the LM head, then float rows; the argmax equals the
full float head's (backends/greedy_screen.py)."""

from __future__ import annotations

import pytest
import torch

from slimquant.backends import greedy_screen as greedy_head
from slimquant.backends.cpu_native import ScreenedHead
from slimquant.backends.native_ops import NativeOps
from slimquant.entrypoints.commands.bench import decode_weight_bytes
from slimquant.kernels import native
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")
float_ops = NativeOps(native.load()) if native.available() else None


def GreedyHead(w: torch.Tensor) -> greedy_head.GreedyHead:  # noqa: N802 (the class, built on the default build)
    return greedy_head.GreedyHead(w, float_ops)


def _head_and_inputs(v: int, k: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 head [V, K] with rows of different scales, and fp32 hidden rows [T, K] with an outlier channel."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(v, k, generator=g) * torch.rand(v, 1, generator=g) / 10).bfloat16()
    x = torch.randn(t, k, generator=g)
    x[:, 3] *= 25  # like a final norm's outlier channel: int8 activations could not screen this
    return w, x


@needs_native
@pytest.mark.parametrize(("v", "k", "t"), [(4096, 64, 1), (3001, 72, 3), (5000, 576, 16), (2048, 40, 128)])
@pytest.mark.parametrize("seed", [0, 1])
def test_argmax_equals_the_full_heads(v, k, t, seed):
    w, x = _head_and_inputs(v, k, t, seed)
    head = GreedyHead(w)
    assert head.argmax(x) == float_ops.float_linear(x, w).argmax(dim=1).tolist()


@needs_native
def test_bound_holds_and_screens_most_rows():
    w, x = _head_and_inputs(8192, 96, 8, seed=2)
    approx, bound = greedy_head.screen_reference(x, *greedy_head.quantize_rows(w))
    exact = x.double() @ w.double().T  # [T, V]
    kernel = float_ops.float_linear(x, w).double()
    assert bool(((approx - exact).abs() <= bound).all()) and bool(((approx - kernel).abs() <= bound).all())
    assert int(greedy_head.candidates(approx, bound).sum(dim=1).max()) < 8192 // 16  # a screen, not everything


@needs_native
def test_ties_go_to_the_first_index_as_torch_argmax():
    w, x = _head_and_inputs(4096, 64, 2, seed=3)
    w[700] = (x[0] / x[0].norm() * 3).bfloat16()  # the clear maximum of token 0 ...
    w[2000] = w[700]  # ... twice: the first index wins
    w[100] = w[700]  # an earlier copy comes first
    assert GreedyHead(w).argmax(x)[0] == 100 == float_ops.float_linear(x, w)[0].argmax().item()


@needs_native
def test_declines_non_finite_rows_and_large_batches():
    w, x = _head_and_inputs(1024, 64, 2, seed=4)
    head = GreedyHead(w)
    assert head.argmax(torch.full((1, 64), float("nan"))) is None
    assert head.argmax(x.repeat(65, 1)) is None  # more rows than the native float kernel takes
    same = GreedyHead(torch.ones(1024, 64, dtype=torch.bfloat16))  # every row ties: nothing screened out
    assert same.argmax(x) == [0, 0]


@needs_native
@pytest.mark.parametrize("tied", [True, False])
def test_model_greedy_tokens_use_the_screen(tmp_path, tiny_model, tied):
    """A W8A8_DYNAMIC model (fp32 activations, bf16 head): greedy tokens from the screen equal the logits' argmax."""
    src = tiny_model("llama", tie_word_embeddings=tied)
    folder = write_ascend(src, tmp_path, lambda prefix: "W8A8_DYNAMIC", dtype=torch.bfloat16)
    loaded = load_model(str(folder))
    model, head = loaded.model, loaded.backend.head(loaded.model)
    hidden = torch.randn(5, model.config.hidden_size) * 3
    assert isinstance(head, ScreenedHead) and head._screen is False  # built by the first greedy step
    assert head.argmax(hidden) == model.compute_logits(hidden).argmax(dim=1).tolist()
    assert isinstance(head.screen(), greedy_head.GreedyHead)
    v, h = model.config.vocab_size, model.config.hidden_size
    linears = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n
    )
    screen = v * -(-h // 32) * 32 + 3 * 4 * v  # int8 rows padded to 32 bytes, three fp32 factors per row
    assert decode_weight_bytes(model, head) == linears + screen  # the head's float bytes are not read


@needs_native
@pytest.mark.parametrize("isa", native.ISA_FLAGS)
def test_both_builds_pick_the_full_heads_argmax(isa):
    if isa not in native.isas_here():
        pytest.skip(f"this CPU cannot run the {isa} build")
    w, x = _head_and_inputs(3001, 584, 9, seed=6)
    q, terms = greedy_head.quantize_rows(w)
    packed = NativeOps(native.load(isa)).pack_weight(q)
    tokens = torch.empty(9, dtype=torch.int64)
    status = native.load(isa).sq_greedy_argmax(
        x.data_ptr(), 9, 584, 584, packed.data_ptr(), 3001, packed.shape[1], terms.data_ptr(), w.data_ptr(),
        greedy_head._SLACK, greedy_head._FP32_SUM, tokens.data_ptr(),
    )  # fmt: skip
    assert status == 0 and tokens.tolist() == float_ops.float_linear(x, w).argmax(dim=1).tolist()
    cap, top = 512, float_ops.float_linear(x, w).topk(10).indices  # [9, 10]
    rows, logits = torch.empty(9, cap, dtype=torch.int64), torch.empty(9, cap)
    counts = torch.empty(9, dtype=torch.int32)
    status = native.load(isa).sq_topk_screen(
        x.data_ptr(), 9, 584, 584, packed.data_ptr(), 3001, packed.shape[1], terms.data_ptr(), w.data_ptr(),
        greedy_head._SLACK, greedy_head._FP32_SUM, 10, cap, rows.data_ptr(), logits.data_ptr(), counts.data_ptr(),
    )  # fmt: skip
    assert status == 0
    assert all(set(top[i].tolist()) <= set(rows[i, : counts[i]].tolist()) for i in range(9))


@needs_native
@pytest.mark.parametrize(("v", "k", "t", "top_k"), [(4096, 64, 1, 40), (3001, 72, 3, 1), (5000, 576, 16, 256)])
def test_top_k_candidates_hold_every_row_of_the_top_k_with_the_full_heads_logits(v, k, t, top_k):
    w, x = _head_and_inputs(v, k, t, seed=7)
    full = float_ops.float_linear(x, w)  # [T, V]
    ids, logits = GreedyHead(w).top_k_candidates(x, top_k)  # [T, C]
    for i in range(t):
        live = logits[i] > float("-inf")
        rows = ids[i][live]
        assert torch.equal(rows, rows.sort().values) and len(rows) < v // 4  # ascending; a screen
        assert set(full[i].topk(top_k).indices.tolist()) <= set(rows.tolist())
        assert torch.equal(logits[i][live], full[i][rows])  # the full head's bits
        threshold = full[i].topk(top_k).values[-1]
        outside = torch.ones(v, dtype=torch.bool)
        outside[rows] = False
        assert bool((full[i][outside] < threshold).all())  # no row left out reaches the top_k


@needs_native
def test_top_k_candidates_decline_what_they_cannot_screen(monkeypatch):
    w, x = _head_and_inputs(2048, 64, 2, seed=8)
    head = GreedyHead(w)
    assert head.top_k_candidates(torch.full((1, 64), float("nan")), 5) is None
    assert head.top_k_candidates(x, greedy_head.TOP_K_MAX + 1) is None
    assert head.top_k_candidates(x, 0) is None
    monkeypatch.setattr(greedy_head, "_CANDIDATE_CAP", 3)  # more candidates than that: the caller takes the head
    assert head.top_k_candidates(x, 5) is None


@needs_native
def test_top_k_sampling_over_the_candidates_draws_the_same_tokens(tmp_path, tiny_model, monkeypatch):
    """Seeded top-k (+ top-p, min-p) sampling of an int8 model: the same tokens whether the sampler sees the
    screen's candidates or the whole vocabulary; rows asking for logprobs take the whole vocabulary."""
    from slimquant import LLM, SamplingParams

    folder = write_ascend(tiny_model("llama"), tmp_path, lambda prefix: "W8A8_DYNAMIC", dtype=torch.bfloat16)
    llm = LLM(str(folder), max_model_len=64)
    prompts = ["Hello, my name is", "It is a truth", "The capital of"]
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, max_tokens=12, ignore_eos=True, seed=s)
        for t, k, p, m, s in [(0.8, 40, 1.0, 0.0, 1), (1.3, 7, 0.9, 0.0, 2), (0.6, 256, 0.95, 0.05, 3)]
    ]
    calls = []
    screen = greedy_head.GreedyHead.top_k_candidates
    monkeypatch.setattr(
        greedy_head.GreedyHead, "top_k_candidates", lambda self, *a: calls.append(1) or screen(self, *a)
    )
    screened = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert calls and llm.llm_engine.runner.sampler.head.screen() is not None
    monkeypatch.setattr(ScreenedHead, "screens", lambda self, top_k=None: False)  # the whole vocabulary
    full = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert screened == full and len({tuple(t) for t in full}) == 3
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(
        greedy_head.GreedyHead, "top_k_candidates", lambda self, *a: calls.append(1) or screen(self, *a)
    )
    llm.generate(prompts[0], SamplingParams(top_k=5, max_tokens=3, logprobs=2), use_tqdm=False)
    assert not calls  # logprobs need the whole vocabulary
