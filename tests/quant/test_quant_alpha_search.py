"""alpha="auto": per smoothing group, the grid alpha with the lowest quantized output error, and it runs."""

from __future__ import annotations

import pytest
import torch

from slimquant import LLM, SamplingParams
from slimquant.quant import steps
from slimquant.quant.observers import ChannelRange, TokenSample
from slimquant.quant.pipeline import quantize
from slimquant.quant.smooth import search_alpha
from slimquant.quant.steps.alpha import SearchedAlpha
from tests.quant.common import FAST, calibration_ids, load_float, load_quantized

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def outlier_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """x [n, k] with a few channels 30x larger than the rest and a per-channel offset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) + 0.3 * torch.randn(k, generator=g)
    return x * (1 + 29 * (torch.arange(k) % 11 == 3))  # [n, k]


def brute_force_errors(x, w_list, alpha_grid, static: bool, shift: bool) -> list[float]:
    """The group's error per alpha, written out from docs/FORMAT.md independently of slimquant.quant."""
    lo, hi = x.amin(0), x.amax(0)  # [K]
    c = (hi + lo) / 2 if shift else torch.zeros_like(lo)
    a_max = (hi - lo) / 2 if shift else torch.maximum(lo.abs(), hi.abs())
    w_max = torch.stack([w.abs().amax(0) for w in w_list]).amax(0)  # [K]
    out = []
    for a in alpha_grid:
        s = (a_max**a / w_max ** (1 - a)).clamp(min=1e-5)  # [K]
        xs = ((x - c) / s).double()  # [n, K]
        total = 0.0
        for w in w_list:
            ref = x.double() @ w.double().t()
            ws = w.double() * s.double()  # [N, K]
            bias = ws @ (c / s).double()  # W (x - c)/s * s + W c: the bias takes W c
            w_scale = ws.abs().amax(1, keepdim=True) / 127  # [N, 1]
            w_deq = torch.round(ws / w_scale).clamp(-128, 127) * w_scale
            if static:
                mn, mx = min(float(xs.min()), 0.0), max(float(xs.max()), 0.0)
                scale = mx / 255 - mn / 255
                off = round(-mn / scale) - 128
                x_deq = (torch.clamp(torch.round(xs / scale + off), -128, 127) - off) * scale
            else:
                t_scale = xs.abs().amax(1, keepdim=True) / 127  # [n, 1]
                x_deq = torch.round(xs / t_scale) * t_scale
            y = x_deq @ w_deq.t() + bias
            total += float((y - ref).pow(2).sum() / ref.pow(2).sum())
        out.append(total)
    return out


@pytest.mark.parametrize("static,method", [(False, "smoothquant"), (True, "smoothquant"), (True, "iterative")])
def test_search_picks_the_brute_force_minimum(static, method):
    g = torch.Generator().manual_seed(5)
    x = outlier_inputs(256, 48)
    w_list = [torch.randn(32, 48, generator=g), torch.randn(16, 48, generator=g)]  # e.g. k_proj, v_proj
    rng = ChannelRange()
    rng.update(x)
    qtype = "W8A8" if static else "W8A8_DYNAMIC"
    members = [(w, None, qtype) for w in w_list]
    alpha, errors = search_alpha(x, rng, members, steps.smoother(method).factors, torch.float32, GRID, refine=0.0)
    want = brute_force_errors(x, w_list, GRID, static, shift=method == "iterative")
    assert list(errors) == list(GRID)
    torch.testing.assert_close(torch.tensor(list(errors.values())), torch.tensor(want), rtol=1e-2, atol=1e-6)
    assert alpha == GRID[min(range(len(GRID)), key=want.__getitem__)]


def test_refinement_scores_the_neighbours_of_the_best_grid_alpha():
    g = torch.Generator().manual_seed(6)
    x, w = outlier_inputs(128, 32), torch.randn(24, 32, generator=g)
    rng = ChannelRange()
    rng.update(x)
    members = [(w, None, "W8A8")]
    factors = steps.smoother("smoothquant").factors
    coarse, first = search_alpha(x, rng, members, factors, torch.float32, GRID, refine=0.0)
    alpha, errors = search_alpha(x, rng, members, factors, torch.float32, GRID, refine=0.125)
    assert set(errors) == set(GRID) | ({coarse - 0.125, coarse + 0.125} & {a / 8 for a in range(9)})
    assert errors[alpha] == min(errors.values()) <= first[coarse]


def test_token_sample_is_strided_and_bounded():
    sample = TokenSample(cap=512)
    x = torch.arange(3000, dtype=torch.float32)[:, None].repeat(1, 4)  # row r holds r
    for part in x.split(300):
        sample.update(part)
    got = sample.tensor()[:, 0]
    assert sample.stride == 8 and torch.equal(got, torch.arange(0, 3000, 8, dtype=torch.float32))


def test_auto_alpha_checkpoint_close_to_float_and_runs(quantized):
    src, dst, _ = quantized("llama", "w8a8", alpha="auto")
    ids = calibration_ids(src, 2, 16)
    with torch.no_grad():
        want = load_float(src)(ids).logits
        got = load_quantized(src, dst)(ids).logits
    assert ((got - want).norm() / want.norm()).item() < 0.05
    llm = LLM(str(dst), max_model_len=64, dtype="float32")
    out = llm.generate(["hello world"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_alpha_values():
    assert isinstance(steps.alpha_chooser("auto"), SearchedAlpha)
    assert isinstance(steps.alpha_chooser("AUTO"), SearchedAlpha)
    assert steps.alpha_chooser("0.3").value == 0.3 and steps.alpha_chooser(1).value == 1.0
    for bad in ("bogus", 1.5, "-0.1"):
        with pytest.raises(ValueError, match="--alpha must be"):
            steps.alpha_chooser(bad)


def test_bad_alpha_in_quantize(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="--alpha must be a number in \\[0, 1\\] or 'auto', got 'bogus'"):
        quantize(tiny_model("llama"), tmp_path / "out", alpha="bogus", **FAST)
    assert not (tmp_path / "out").exists()
