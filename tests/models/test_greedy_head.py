"""The greedy head: an int8 screen of the LM head, then float rows; the argmax equals the full float head's."""

from __future__ import annotations

import pytest
import torch

from slimquant.entrypoints.commands.bench import decode_weight_bytes
from slimquant.kernels import float_ops, int8_ops, native
from slimquant.layers import greedy_head
from slimquant.layers.greedy_head import GreedyHead
from slimquant.models.loader import load_model
from tests.models.ascend_ckpt import write_ascend

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable (no AVX2 or compiler)")


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
    model = load_model(str(folder)).model
    hidden = torch.randn(5, model.config.hidden_size) * 3
    assert model.greedy_head() is None  # built by the first greedy step
    assert model.greedy_tokens(hidden) == model.compute_logits(hidden).argmax(dim=1).tolist()
    assert isinstance(model.greedy_head(), GreedyHead)
    v, h = model.config.vocab_size, model.config.hidden_size
    linears = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n
    )
    screen = v * -(-h // 32) * 32 + 3 * 4 * v  # int8 rows padded to 32 bytes, three fp32 factors per row
    assert decode_weight_bytes(model) == linears + screen  # the head's float bytes are not read


@needs_native
@pytest.mark.parametrize("isa", native.ISA_FLAGS)
def test_both_builds_pick_the_full_heads_argmax(isa):
    if isa == "avx512vnni" and native.isa() != isa:
        pytest.skip("this CPU cannot run the AVX-512 VNNI build")
    w, x = _head_and_inputs(3001, 584, 9, seed=6)
    q, terms = greedy_head.quantize_rows(w)
    packed = int8_ops.pack_weight(q, isa=isa)
    tokens = torch.empty(9, dtype=torch.int64)
    status = native.library_for(isa).sq_greedy_argmax(
        x.data_ptr(), 9, 584, 584, packed.data_ptr(), 3001, packed.shape[1], terms.data_ptr(), w.data_ptr(),
        greedy_head._SLACK, greedy_head._FP32_SUM, tokens.data_ptr(),
    )  # fmt: skip
    assert status == 0 and tokens.tolist() == float_ops.float_linear(x, w).argmax(dim=1).tolist()
